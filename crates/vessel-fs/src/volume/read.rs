//! Reads: attributes, lookups, directories, links, xattrs and file contents.

use super::write::long_name;
use super::*;

impl Volume {
    // ---- reads ----

    pub fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let a = {
            let st = self.lock();
            match st.orphans.get(&ino) {
                Some(o) => view::inode_attr(ino, o),
                None => view::attr(&st.tree, self.lower(), ino)?,
            }
        };
        Ok(self.with_blocks(a))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        long_name(name)?;
        let a = {
            let st = self.lock();
            let ino = view::lookup(&st.tree, self.lower(), parent, name)?;
            view::attr(&st.tree, self.lower(), ino)?
        };
        Ok(self.with_blocks(a))
    }

    /// Blocks actually allocated by a private file (sparse files, fallocate).
    pub(super) fn with_blocks(&self, mut a: Attr) -> Attr {
        if a.kind == FileKind::File && a.ino < LOWER_BASE {
            if let Ok(md) = std::fs::metadata(self.data_path(a.ino)) {
                a.blocks = std::os::unix::fs::MetadataExt::blocks(&md);
            }
        }
        a
    }

    pub fn readdir(&self, dir: Ino) -> FsResult<(Ino, view::DirEntries)> {
        let st = self.lock();
        let v = view::readdir(&st.tree, self.lower(), dir)?;
        Ok((view::parent_of(&st.tree, self.lower(), dir), v))
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let st = self.lock();
        match view::node(&st.tree, self.lower(), ino).ok_or(libc::ENOENT)? {
            Node::Private(i) if i.kind == FileKind::Symlink => Ok(i.target.clone()),
            Node::Lower(idx) => match self.lower().and_then(|l| l.get(idx)) {
                Some(e) if e.kind == FileKind::Symlink => Ok(e.target.to_vec()),
                _ => Err(libc::EINVAL),
            },
            _ => Err(libc::EINVAL),
        }
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let node = match st.orphans.get(&ino) {
            Some(o) => Node::Private(o),
            None => view::node(&st.tree, self.lower(), ino).ok_or(libc::ENOENT)?,
        };
        match node {
            Node::Private(i) => i.xattrs.get(name).cloned().ok_or(libc::ENODATA),
            Node::Lower(idx) => {
                let low = self.lower().ok_or(libc::ENOENT)?;
                low.xattr(idx, name).map_err(|e| errno_of(&e))?.ok_or(libc::ENODATA)
            }
        }
    }

    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<Vec<u8>>> {
        let st = self.lock();
        let node = match st.orphans.get(&ino) {
            Some(o) => Node::Private(o),
            None => view::node(&st.tree, self.lower(), ino).ok_or(libc::ENOENT)?,
        };
        match node {
            Node::Private(i) => Ok(i.xattrs.keys().cloned().collect()),
            Node::Lower(idx) => self
                .lower()
                .ok_or(libc::ENOENT)?
                .xattr_names(idx)
                .map_err(|e| errno_of(&e)),
        }
    }

    /// Whether `ino` is a template file that was never copied up (its contents are the
    /// template's).
    pub fn is_lower_file(&self, ino: Ino) -> bool {
        let st = self.lock();
        matches!(view::node(&st.tree, self.lower(), ino), Some(Node::Lower(_)))
    }

    /// Open a template file for reading (passthrough backing or plain reads).
    pub fn open_lower(&self, ino: Ino) -> FsResult<File> {
        let idx = view::lower_idx(ino).ok_or(libc::EINVAL)?;
        self.lower().ok_or(libc::ENOENT)?.open(idx).map_err(|e| errno_of(&e))
    }

    /// The contents of a private file, for reading them without the volume's lock (export,
    /// revert, diff). The handle keeps the contents as they change; a file removed later
    /// keeps what it had.
    pub fn open_data(&self, ino: Ino) -> FsResult<File> {
        let st = self.lock();
        let kind = st.tree.inodes.get(&ino).or(st.orphans.get(&ino)).map(|i| i.kind);
        match kind {
            Some(FileKind::File) => File::open(self.data_path(ino)).map_err(|e| errno_of(&e)),
            Some(_) => Err(libc::EINVAL),
            None => Err(libc::ENOENT),
        }
    }

    /// Read from a private file (or, for a template file, from the template).
    pub fn read(&self, ino: Ino, off: u64, size: u32) -> FsResult<Vec<u8>> {
        let f = {
            let st = self.lock();
            match st.files.get(&ino) {
                Some(f) => Some(f.clone()),
                None if st.tree.inodes.contains_key(&ino) => None,
                None => {
                    drop(st);
                    let f = Arc::new(self.open_lower(ino)?);
                    return read_at(&f, off, size);
                }
            }
        };
        let f = match f {
            Some(f) => f,
            None => Arc::new(File::open(self.data_path(ino)).map_err(|e| errno_of(&e))?),
        };
        let data = read_at(&f, off, size)?;
        // Large requests come from the kernel's readahead on a sequential reader: start
        // reading the next stretch of the backing file now, so it is cached when asked.
        if size >= 128 << 10 && data.len() == size as usize {
            use std::os::fd::AsRawFd;
            let next = off + size as u64;
            // SAFETY: advice on our own fd; no memory is passed.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), next as i64, 4 * size as i64, libc::POSIX_FADV_WILLNEED);
            }
        }
        Ok(data)
    }
}

pub(crate) fn read_at(f: &File, off: u64, size: u32) -> FsResult<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf: Vec<u8> = Vec::with_capacity(size as usize);
    let mut n = 0usize;
    while n < size as usize {
        // SAFETY: pread writes at most `size - n` bytes into the vector's spare capacity,
        // which starts at `as_mut_ptr() + n` and holds `size - n` bytes.
        let r = unsafe {
            libc::pread(
                f.as_raw_fd(),
                buf.as_mut_ptr().add(n).cast(),
                size as usize - n,
                (off + n as u64) as i64,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(errno_of(&e));
        }
        if r == 0 {
            break;
        }
        n += r as usize;
    }
    // SAFETY: the first n bytes were written by pread above.
    unsafe { buf.set_len(n) };
    Ok(buf)
}
