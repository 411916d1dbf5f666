//! The read-only lower layer of a volume: a template's file tree, indexed once per node
//! and shared by every volume of that template. Entries are numbered in a deterministic
//! order (depth first, names sorted), so entry numbers are the same on every node that
//! holds the template: transactions refer to template files by these numbers.

use crate::tx::FileKind;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Index 0 is the template's root directory.
pub const LOWER_ROOT: u32 = 0;

#[derive(Debug)]
pub struct LowerEntry {
    pub parent: u32,
    pub name: Box<[u8]>,
    pub kind: FileKind,
    /// Permission and set-id bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub target: Box<[u8]>,
    /// Directories only.
    pub children: Option<BTreeMap<Box<[u8]>, u32>>,
}

#[derive(Debug)]
pub struct Lower {
    root: PathBuf,
    entries: Vec<LowerEntry>,
}

pub(crate) fn kind_of(ft: std::fs::FileType) -> FileKind {
    if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else if ft.is_char_device() {
        FileKind::CharDev
    } else if ft.is_block_device() {
        FileKind::BlockDev
    } else {
        FileKind::File
    }
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl Lower {
    /// Index the tree at `root` (a template's rootfs).
    pub fn scan(root: &Path) -> std::io::Result<Lower> {
        let mut l = Lower {
            root: root.to_path_buf(),
            entries: Vec::new(),
        };
        let md = std::fs::symlink_metadata(root)?;
        l.push(LOWER_ROOT, b"", &md, Vec::new());
        l.walk(LOWER_ROOT, root)?;
        Ok(l)
    }

    fn push(&mut self, parent: u32, name: &[u8], md: &std::fs::Metadata, target: Vec<u8>) -> u32 {
        let kind = kind_of(md.file_type());
        self.entries.push(LowerEntry {
            parent,
            name: name.into(),
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            rdev: md.rdev(),
            size: md.size(),
            blocks: md.blocks(),
            mtime_ns: ns(md.mtime(), md.mtime_nsec()),
            ctime_ns: ns(md.ctime(), md.ctime_nsec()),
            target: target.into(),
            children: (kind == FileKind::Dir).then(BTreeMap::new),
        });
        (self.entries.len() - 1) as u32
    }

    /// Number the tree depth first, names sorted (a directory's entries right after it),
    /// with a work list instead of recursion.
    fn walk(&mut self, dir: u32, path: &Path) -> std::io::Result<()> {
        fn sorted(path: &Path) -> std::io::Result<std::vec::IntoIter<std::ffi::OsString>> {
            let mut names: Vec<_> = std::fs::read_dir(path)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            Ok(names.into_iter())
        }
        let mut stack = vec![(dir, path.to_path_buf(), sorted(path)?)];
        while let Some((dir, path, names)) = stack.last_mut() {
            let Some(n) = names.next() else {
                stack.pop();
                continue;
            };
            let (dir, p) = (*dir, path.join(&n));
            let md = std::fs::symlink_metadata(&p)?;
            let target = if md.file_type().is_symlink() {
                std::fs::read_link(&p)?.into_os_string().as_bytes().to_vec()
            } else {
                Vec::new()
            };
            let idx = self.push(dir, n.as_bytes(), &md, target);
            if let Some(c) = self.entries[dir as usize].children.as_mut() {
                c.insert(n.as_bytes().into(), idx);
            }
            if md.is_dir() {
                let kids = sorted(&p)?;
                stack.push((idx, p, kids));
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, idx: u64) -> Option<&LowerEntry> {
        self.entries.get(usize::try_from(idx).ok()?)
    }

    pub fn child(&self, dir: u64, name: &[u8]) -> Option<u32> {
        self.get(dir)?.children.as_ref()?.get(name).copied()
    }

    pub fn children(&self, dir: u64) -> impl Iterator<Item = (&[u8], u32)> {
        self.get(dir)
            .and_then(|e| e.children.as_ref())
            .into_iter()
            .flat_map(|c| c.iter().map(|(n, i)| (&**n, *i)))
    }

    /// The host path of entry `idx`.
    pub fn path(&self, idx: u64) -> PathBuf {
        let mut parts = Vec::new();
        let mut i = idx as usize;
        for _ in 0..self.entries.len() {
            if i == LOWER_ROOT as usize || i >= self.entries.len() {
                break;
            }
            parts.push(&self.entries[i].name);
            i = self.entries[i].parent as usize;
        }
        let mut p = self.root.clone();
        for n in parts.iter().rev() {
            p.push(std::ffi::OsStr::from_bytes(n));
        }
        p
    }

    /// The names from the root down to entry `idx` (empty for the root).
    pub fn names_to(&self, idx: u64) -> Vec<&[u8]> {
        let mut parts = Vec::new();
        let mut i = idx as usize;
        for _ in 0..self.entries.len() {
            if i == LOWER_ROOT as usize || i >= self.entries.len() {
                break;
            }
            parts.push(&*self.entries[i].name);
            i = self.entries[i].parent as usize;
        }
        parts.reverse();
        parts
    }

    /// The path of entry `idx` relative to the tree's root (for people).
    pub fn rel_path(&self, idx: u64) -> PathBuf {
        self.path(idx)
            .strip_prefix(&self.root)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Open a regular file of the template for reading.
    pub fn open(&self, idx: u64) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.path(idx))
    }

    /// One extended attribute of entry `idx` (None if it has none of that name).
    pub fn xattr(&self, idx: u64, name: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        let path = CString::new(self.path(idx).into_os_string().as_bytes())?;
        let name = CString::new(name)?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: path and name are NUL-terminated; buf is valid for buf.len() bytes.
            let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(Some(buf));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
                Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
                _ => return Err(e),
            }
        }
    }

    /// Names of the extended attributes of entry `idx`.
    pub fn xattr_names(&self, idx: u64) -> std::io::Result<Vec<Vec<u8>>> {
        let path = CString::new(self.path(idx).into_os_string().as_bytes())?;
        let mut buf = vec![0u8; 1024];
        loop {
            // SAFETY: path is NUL-terminated; buf is valid for buf.len() bytes.
            let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                buf.truncate(n as usize);
                return Ok(buf
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOTSUP) => return Ok(Vec::new()),
                Some(libc::ERANGE) if buf.len() < (1 << 20) => buf.resize(buf.len() * 4, 0),
                _ => return Err(e),
            }
        }
    }
}

/// One index per template tree on this node, shared by all its volumes.
pub fn shared(root: &Path) -> std::io::Result<Arc<Lower>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Weak<Lower>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = c.get(root).and_then(Weak::upgrade) {
        return Ok(l);
    }
    let l = Arc::new(Lower::scan(root)?);
    c.retain(|_, w| w.strong_count() > 0);
    c.insert(root.to_path_buf(), Arc::downgrade(&l));
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_numbered_depth_first_with_sorted_names() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for p in ["b/y/deep", "a", "c"] {
            std::fs::create_dir_all(r.join(p)).unwrap();
        }
        std::fs::write(r.join("b/x"), "x").unwrap();
        std::fs::write(r.join("b/y/deep/f"), "f").unwrap();
        std::fs::write(r.join("a0"), "").unwrap();
        let l = Lower::scan(r).unwrap();
        let order: Vec<String> = (1..l.len() as u64)
            .map(|i| l.rel_path(i).to_string_lossy().into_owned())
            .collect();
        assert_eq!(order, ["a", "a0", "b", "b/x", "b/y", "b/y/deep", "b/y/deep/f", "c"]);
        assert_eq!(l.child(3, b"y"), Some(5));
        assert_eq!(l.get(7).unwrap().parent, 6);
    }

    #[test]
    fn a_deep_chain_is_numbered_along_the_chain() {
        let d = tempfile::tempdir().unwrap();
        // As deep as a host path allows (templates are indexed by host paths).
        let mut p = d.path().to_path_buf();
        for _ in 0..1500 {
            p.push("d");
            std::fs::create_dir(&p).unwrap();
        }
        let l = Lower::scan(d.path()).unwrap();
        assert_eq!(l.len(), 1501);
        assert!((1..1501u64).all(|i| l.get(i).unwrap().parent as u64 == i - 1));
    }
}
