//! Writes: every mutating call becomes one transaction (`commit`).

use super::*;
use crate::apply::{apply_data_in, data_op_ino, fallocate, freed_by, op_ino};

impl Volume {
    // ---- writes ----

    /// Append `op` as the next transaction and apply it to the tree; then apply its
    /// effect on file contents.
    pub(super) fn commit(&self, st: &mut State, op: Op) -> FsResult<u64> {
        self.commit_tx(st, op).map(|tx| tx.seq)
    }

    /// [`Volume::commit`], giving the transaction back (its buffers can be reused).
    pub(super) fn commit_tx(&self, st: &mut State, op: Op) -> FsResult<Tx> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(libc::EIO);
        }
        self.quota_check(st, &op)?;
        let tx = Tx {
            epoch: st.epoch,
            seq: st.tree.applied + 1,
            time_ns: now_ns(),
            op,
        };
        let freed = self.record(st, &tx)?;
        st.acks.committed(&tx);
        // Inodes freed while open live on as orphans until their last close.
        let mut gone = Vec::new();
        for (ino, mut inode) in freed {
            if st.open.get(&ino).copied().unwrap_or(0) > 0 {
                inode.nlink = 0;
                // Writes to the orphan must not reach the base through a hard link.
                let mut shared = std::mem::take(&mut st.shared);
                let r = self.unshare(&mut shared, ino);
                st.shared = shared;
                if r.is_err() {
                    self.broken.store(true, Ordering::SeqCst);
                    return Err(libc::EIO);
                }
                st.orphans.insert(ino, inode);
            } else {
                gone.push(ino);
            }
        }
        if let Err(e) = self.apply_data_live(st, &tx.op, &gone) {
            self.broken.store(true, Ordering::SeqCst);
            eprintln!(
                "vessel-fs: volume '{}': applying transaction {} to file contents: {e}; read-only until remounted",
                self.name, tx.seq
            );
            return Err(libc::EIO);
        }
        Ok(tx)
    }

    /// What a commit and a replica's append share: the tree, the log (before any file
    /// changes), accounting. Returns the inodes the transaction frees.
    pub(super) fn record(&self, st: &mut State, tx: &Tx) -> FsResult<Vec<(Ino, Inode)>> {
        if let Err(e) = self.note_epoch(st, tx) {
            eprintln!(
                "vessel-fs: volume '{}': writing {}: {e}",
                self.name,
                epochfile::EPOCHS_FILE
            );
            return Err(libc::EIO);
        }
        let freed = freed_by(&st.tree, &tx.op);
        let before = usage_delta_base(&st.tree, &tx.op);
        st.tree.apply(tx).map_err(tree_err)?;
        if let Err(e) = st.log.append(tx) {
            // The tree is ahead of the log now: refuse further changes until reopened.
            self.broken.store(true, Ordering::SeqCst);
            eprintln!("vessel-fs: {e}; volume '{}' is read-only until remounted", self.name);
            return Err(libc::EIO);
        }
        self.stats.tx();
        st.since_ckpt += 64 + op_data_len(&tx.op);
        account(st, &tx.op, before, &freed);
        if let Some(c) = st.compacting.as_mut() {
            c.extend(op_ino(&tx.op));
        }
        Ok(freed)
    }

    pub(super) fn quota_check(&self, st: &State, op: &Op) -> FsResult<()> {
        let (db, di) = match op {
            Op::Create { .. } => (0, 1),
            Op::CopyUp { size, kind, .. } => (if *kind == FileKind::File { *size } else { 0 }, 1),
            Op::Write { ino, offset, data } => {
                let cur = st.tree.inodes.get(ino).map_or(0, |i| i.size);
                ((offset + data.len() as u64).saturating_sub(cur), 0)
            }
            Op::Truncate { ino, size } | Op::Fallocate { ino, len: size, .. } => {
                let cur = st.tree.inodes.get(ino).map_or(0, |i| i.size);
                let want = match op {
                    Op::Fallocate { offset, .. } => offset + size,
                    _ => *size,
                };
                (want.saturating_sub(cur), 0)
            }
            _ => (0, 0),
        };
        if db > 0 && st.quota.bytes.is_some_and(|q| st.usage.bytes + db > q) {
            return Err(libc::ENOSPC);
        }
        if di > 0 && st.quota.inodes.is_some_and(|q| st.usage.inodes + di > q) {
            return Err(libc::ENOSPC);
        }
        Ok(())
    }

    pub(super) fn data_file(&self, st: &mut State, ino: Ino) -> std::io::Result<Arc<File>> {
        if let Some(f) = st.files.get(&ino) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(self.data_path(ino))?,
        );
        if st.open.get(&ino).copied().unwrap_or(0) > 0 {
            st.files.insert(ino, f.clone());
        }
        Ok(f)
    }

    pub(super) fn apply_data_live(&self, st: &mut State, op: &Op, gone: &[Ino]) -> std::io::Result<()> {
        if let Some(i) = data_op_ino(op) {
            let mut shared = std::mem::take(&mut st.shared);
            let r = self.unshare(&mut shared, i);
            st.shared = shared;
            r?;
        }
        match op {
            Op::Write { ino, offset, data } => {
                let f = self.data_file(st, *ino)?;
                f.write_all_at(data, *offset)?;
                crate::pagecache::write_behind(&f, *offset, data.len() as u64);
                st.dirty.insert(*ino);
            }
            Op::Truncate { ino, size } => {
                let f = self.data_file(st, *ino)?;
                f.set_len(*size)?;
                st.dirty.insert(*ino);
            }
            Op::Fallocate { ino, mode, offset, len } => {
                let f = self.data_file(st, *ino)?;
                fallocate(&f, *mode, *offset, *len)?;
                st.dirty.insert(*ino);
            }
            _ => {
                self.apply_data(&st.tree, op, gone, false)?;
                if let Some(i) = op_ino(op) {
                    st.dirty.insert(i);
                }
            }
        }
        Ok(())
    }

    /// The effect of `op` on file contents (also used by replay, where files may already
    /// be ahead of the op: every effect is idempotent).
    pub(super) fn apply_data(&self, tree: &Tree, op: &Op, freed: &[Ino], replay: bool) -> std::io::Result<()> {
        apply_data_in(&self.dir.join("data"), self.lower(), tree, op, freed, replay)
    }

    pub(super) fn base_dir(&self) -> PathBuf {
        self.dir.join("base")
    }

    /// Files of the base that are the live file itself (same inode on disk).
    pub(super) fn find_shared(&self) -> HashSet<Ino> {
        use std::os::unix::fs::MetadataExt;
        let mut out = HashSet::new();
        for (ino, p) in data_files(&self.base_dir().join("data")) {
            let (Ok(a), Ok(b)) = (std::fs::metadata(&p), std::fs::metadata(self.data_path(ino))) else {
                continue;
            };
            if a.ino() == b.ino() && a.dev() == b.dev() {
                out.insert(ino);
            }
        }
        out
    }

    /// Before the live file changes, give the base its own copy.
    pub(super) fn unshare(&self, shared: &mut HashSet<Ino>, ino: Ino) -> std::io::Result<()> {
        if !shared.remove(&ino) {
            return Ok(());
        }
        let b = self.base_dir().join("data").join(data_name(ino));
        let tmp = b.with_extension("tmp");
        std::fs::copy(self.data_path(ino), &tmp)?;
        std::fs::rename(&tmp, &b)
    }

    /// Make `ino` (and the directories above it) private, copying it up from the template
    /// if needed; returns its inode number (unchanged).
    pub(super) fn ensure_private(&self, st: &mut State, ino: Ino) -> FsResult<Ino> {
        if st.tree.inodes.contains_key(&ino) {
            return Ok(ino);
        }
        let low = self.lower.clone().ok_or(libc::ENOENT)?;
        // The template entries from `ino` up to the first private directory, copied up
        // from the top down.
        let mut chain = Vec::new();
        let mut cur = ino;
        while !st.tree.inodes.contains_key(&cur) {
            let idx = view::lower_idx(cur).ok_or(libc::ENOENT)?;
            let e = low.get(idx).ok_or(libc::ENOENT)?;
            if idx == 0 {
                break;
            }
            if chain.len() > low.len() {
                return Err(libc::ELOOP);
            }
            chain.push(idx);
            cur = if e.parent == 0 {
                ROOT
            } else {
                LOWER_BASE + e.parent as u64
            };
        }
        if chain.is_empty() {
            return Ok(ROOT);
        }
        for idx in chain.into_iter().rev() {
            self.copy_up_one(st, &low, idx)?;
        }
        Ok(ino)
    }

    /// Copy up template entry `idx`, whose parent is private already.
    pub(super) fn copy_up_one(&self, st: &mut State, low: &Lower, idx: u64) -> FsResult<()> {
        let ino = LOWER_BASE + idx;
        let e = low.get(idx).ok_or(libc::ENOENT)?;
        let parent = if e.parent == 0 {
            ROOT
        } else {
            LOWER_BASE + e.parent as u64
        };
        // Still visible there (not deleted or replaced meanwhile)?
        if view::lookup(&st.tree, Some(low), parent, &e.name) != Ok(ino) {
            return Err(libc::ENOENT);
        }
        let op = Op::CopyUp {
            parent,
            name: e.name.to_vec(),
            ino,
            lower: idx,
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            rdev: e.rdev,
            target: e.target.to_vec(),
            size: if e.kind == FileKind::File { e.size } else { 0 },
            mtime_ns: e.mtime_ns,
        };
        self.commit(st, op)?;
        // Extended attributes (file capabilities, ACLs) come along.
        for name in low.xattr_names(idx).unwrap_or_default() {
            if let Ok(Some(value)) = low.xattr(idx, &name) {
                self.commit(st, Op::SetXattr { ino, name, value })?;
            }
        }
        Ok(())
    }

    pub(super) fn attr_locked(&self, st: &State, ino: Ino) -> FsResult<Attr> {
        view::attr(&st.tree, self.lower(), ino)
    }

    /// Create a file, directory, node or symlink.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: &[u8],
    ) -> FsResult<Attr> {
        long_name(name)?;
        let mut st = self.lock();
        match view::lookup(&st.tree, self.lower(), parent, name) {
            Ok(_) => return Err(libc::EEXIST),
            Err(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let p = self.ensure_private(&mut st, parent)?;
        // Set-group-id directories pass on their group (and, to directories, the bit).
        let pi = &st.tree.inodes[&p];
        let (gid, mode) = if pi.mode & libc::S_ISGID != 0 {
            (
                pi.gid,
                if kind == FileKind::Dir {
                    mode | libc::S_ISGID
                } else {
                    mode
                },
            )
        } else {
            (gid, mode)
        };
        let ino = st.next_ino;
        if ino >= LOWER_BASE {
            return Err(libc::ENOSPC);
        }
        st.next_ino += 1;
        self.commit(
            &mut st,
            Op::Create {
                parent: p,
                name: name.to_vec(),
                ino,
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                rdev,
                target: target.to_vec(),
            },
        )?;
        self.attr_locked(&st, ino)
    }

    pub fn link(&self, ino: Ino, new_parent: Ino, name: &[u8]) -> FsResult<Attr> {
        long_name(name)?;
        let mut st = self.lock();
        match view::lookup(&st.tree, self.lower(), new_parent, name) {
            Ok(_) => return Err(libc::EEXIST),
            Err(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        if st.orphans.contains_key(&ino) {
            return Err(libc::ENOENT);
        }
        let i = self.ensure_private(&mut st, ino)?;
        let p = self.ensure_private(&mut st, new_parent)?;
        self.commit(
            &mut st,
            Op::Link {
                ino: i,
                parent: p,
                name: name.to_vec(),
            },
        )?;
        self.attr_locked(&st, i)
    }

    /// unlink(2) (`dir` false) or rmdir(2) (`dir` true).
    pub fn remove(&self, parent: Ino, name: &[u8], dir: bool) -> FsResult<()> {
        long_name(name)?;
        let mut st = self.lock();
        let low = self.lower.clone();
        let t = view::lookup(&st.tree, low.as_deref(), parent, name)?;
        let a = view::attr(&st.tree, low.as_deref(), t)?;
        match (dir, a.kind == FileKind::Dir) {
            (true, false) => return Err(libc::ENOTDIR),
            (false, true) => return Err(libc::EISDIR),
            (true, true) if !view::is_empty_dir(&st.tree, low.as_deref(), t)? => return Err(libc::ENOTEMPTY),
            _ => {}
        }
        let p = self.ensure_private(&mut st, parent)?;
        let whiteout = lower_has(&st.tree, low.as_deref(), p, name);
        self.commit(
            &mut st,
            Op::Unlink {
                parent: p,
                name: name.to_vec(),
                whiteout,
            },
        )?;
        Ok(())
    }

    /// Remove `name` in `parent` and everything under it (absent is fine). Depth-first
    /// with a work list: a tree of any depth costs no stack.
    pub fn remove_tree(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        let a = match self.lookup(parent, name) {
            Ok(a) => a,
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        // (parent, name, ino, is a directory, its entries were queued)
        let mut work = vec![(parent, name.to_vec(), a.ino, a.kind == FileKind::Dir, false)];
        while let Some(top) = work.last_mut() {
            if top.3 && !top.4 {
                top.4 = true;
                let dir = top.2;
                let (_, kids) = self.readdir(dir)?;
                work.extend(
                    kids.into_iter()
                        .map(|(n, ino, k)| (dir, n, ino, k == FileKind::Dir, false)),
                );
                continue;
            }
            let (p, n, _, is_dir, _) = work.pop().expect("non-empty");
            match self.remove(p, &n, is_dir) {
                Ok(()) | Err(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn rename(&self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], flags: u32) -> FsResult<()> {
        long_name(name)?;
        long_name(new_name)?;
        let mut st = self.lock();
        let low = self.lower.clone();
        let lw = low.as_deref();
        let src = view::lookup(&st.tree, lw, parent, name)?;
        let dst = match view::lookup(&st.tree, lw, new_parent, new_name) {
            Ok(d) => Some(d),
            Err(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
        const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
        if flags & !(NOREPLACE | EXCHANGE) != 0 {
            return Err(libc::EINVAL);
        }
        if dst == Some(src) {
            return Ok(());
        }
        if flags & NOREPLACE != 0 && dst.is_some() {
            return Err(libc::EEXIST);
        }
        if flags & EXCHANGE != 0 && dst.is_none() {
            return Err(libc::ENOENT);
        }
        let src_dir = view::attr(&st.tree, lw, src)?.kind == FileKind::Dir;
        if let (Some(d), true) = (dst, flags & EXCHANGE == 0) {
            let dst_dir = view::attr(&st.tree, lw, d)?.kind == FileKind::Dir;
            match (src_dir, dst_dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !view::is_empty_dir(&st.tree, lw, d)? => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        let np = self.ensure_private(&mut st, new_parent)?;
        let p = self.ensure_private(&mut st, parent)?;
        self.ensure_private(&mut st, src)?;
        if flags & EXCHANGE != 0 {
            if let Some(d) = dst {
                self.ensure_private(&mut st, d)?;
            }
        } else if let Some(d) = dst {
            // A replaced directory that merges template entries (all whited out) goes
            // away with the rename; one that is template-only is simply shadowed.
            let _ = d;
        }
        let whiteout = flags & EXCHANGE == 0 && lower_has(&st.tree, lw, p, name);
        self.commit(
            &mut st,
            Op::Rename {
                parent: p,
                name: name.to_vec(),
                new_parent: np,
                new_name: new_name.to_vec(),
                flags,
                whiteout,
            },
        )
        .map(|_| ())
    }

    pub fn setattr(&self, ino: Ino, a: &SetAttr) -> FsResult<Attr> {
        let mut st = self.lock();
        if st.orphans.contains_key(&ino) {
            // Open but unlinked: invisible to everyone else; not part of the history.
            let o = st.orphans.get_mut(&ino).expect("checked");
            if let Some(m) = a.mode {
                o.mode = m & 0o7777;
            }
            if let Some(s) = a.size {
                o.size = s;
                if let Some(f) = st.files.get(&ino) {
                    f.set_len(s).map_err(|e| errno_of(&e))?;
                }
            }
            return Ok(view::inode_attr(ino, &st.orphans[&ino]));
        }
        let i = self.ensure_private(&mut st, ino)?;
        if let Some(size) = a.size {
            let k = st.tree.inodes[&i].kind;
            if k == FileKind::Dir {
                return Err(libc::EISDIR);
            }
            if k != FileKind::File {
                return Err(libc::EINVAL);
            }
            self.commit(&mut st, Op::Truncate { ino: i, size })?;
        }
        if a.mode.is_some() || a.uid.is_some() || a.gid.is_some() || a.atime_ns.is_some() || a.mtime_ns.is_some() {
            self.commit(
                &mut st,
                Op::SetAttr {
                    ino: i,
                    mode: a.mode.map(|m| (m & 0o7777) as u64),
                    uid: a.uid.map(u64::from),
                    gid: a.gid.map(u64::from),
                    atime_ns: a.atime_ns.map(|t| t as u64),
                    mtime_ns: a.mtime_ns.map(|t| t as u64),
                },
            )?;
        }
        self.attr_locked(&st, i)
    }

    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], create: bool, replace: bool) -> FsResult<()> {
        let mut st = self.lock();
        let i = self.ensure_private(&mut st, ino)?;
        let exists = st.tree.inodes[&i].xattrs.contains_key(name);
        if create && exists {
            return Err(libc::EEXIST);
        }
        if replace && !exists {
            return Err(libc::ENODATA);
        }
        self.commit(
            &mut st,
            Op::SetXattr {
                ino: i,
                name: name.to_vec(),
                value: value.to_vec(),
            },
        )
        .map(|_| ())
    }

    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        let mut st = self.lock();
        let i = self.ensure_private(&mut st, ino)?;
        self.commit(
            &mut st,
            Op::RemoveXattr {
                ino: i,
                name: name.to_vec(),
            },
        )
        .map(|_| ())
    }

    /// Apply an attribute that came from outside (through the mount or from an archive),
    /// as [`crate::xattr::incoming`] decided: an access ACL also sets the permission bits.
    pub fn apply_xattr(&self, ino: Ino, name: &[u8], inc: Incoming, create: bool, replace: bool) -> FsResult<()> {
        let (value, bits) = match inc {
            Incoming::Drop => return Ok(()),
            Incoming::Store(v) => (Some(v), None),
            Incoming::ModeOnly(b) => (None, Some(b)),
            Incoming::AclWithMode(v, b) => (Some(v), Some(b)),
        };
        if let Some(bits) = bits {
            let cur = self.getattr(ino)?.perm;
            self.setattr(
                ino,
                &SetAttr {
                    mode: Some((cur & 0o7000) | bits),
                    ..Default::default()
                },
            )?;
        }
        match value {
            Some(v) => self.setxattr(ino, name, &v, create, replace),
            // It says no more than the bits: not kept as an attribute.
            None => match self.removexattr(ino, name) {
                Err(libc::ENODATA) => Ok(()),
                r => r,
            },
        }
    }

    /// Open a file for writing (copying it up first) or count a private read handle.
    /// Returns false if `ino` is a template file opened read-only (the caller serves it
    /// from the template).
    pub fn open_file(&self, ino: Ino, write: bool, trunc: bool) -> FsResult<bool> {
        let mut st = self.lock();
        if !write && !trunc && !st.tree.inodes.contains_key(&ino) && !st.orphans.contains_key(&ino) {
            return match view::node(&st.tree, self.lower(), ino) {
                Some(Node::Lower(_)) => Ok(false),
                _ => Err(libc::ENOENT),
            };
        }
        let i = if st.orphans.contains_key(&ino) {
            ino
        } else {
            self.ensure_private(&mut st, ino)?
        };
        let kind = st.tree.inodes.get(&i).or(st.orphans.get(&i)).map(|n| n.kind);
        if kind != Some(FileKind::File) {
            return Err(if kind == Some(FileKind::Dir) {
                libc::EISDIR
            } else {
                libc::EINVAL
            });
        }
        *st.open.entry(i).or_default() += 1;
        if let Err(e) = self.data_file(&mut st, i) {
            release_count(&mut st, i);
            return Err(errno_of(&e));
        }
        if trunc && st.tree.inodes.get(&i).is_some_and(|n| n.size > 0) {
            if let Err(e) = self.commit(&mut st, Op::Truncate { ino: i, size: 0 }) {
                release_count(&mut st, i);
                return Err(e);
            }
        }
        Ok(true)
    }

    /// A private handle closed.
    pub fn release(&self, ino: Ino) {
        let mut st = self.lock();
        if release_count(&mut st, ino) && st.orphans.remove(&ino).is_some() {
            let _ = std::fs::remove_file(self.data_path(ino));
        }
    }

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<u32> {
        // The copy is made before the volume's lock is taken, into a reused buffer.
        let buf = write_buffer(data);
        let mut st = self.lock();
        if st.orphans.contains_key(&ino) {
            let f = self.data_file(&mut st, ino).map_err(|e| errno_of(&e))?;
            f.write_all_at(data, offset).map_err(|e| errno_of(&e))?;
            let o = st.orphans.get_mut(&ino).expect("checked");
            o.size = o.size.max(offset + data.len() as u64);
            drop(st);
            reuse_write_buffer(buf);
            return Ok(data.len() as u32);
        }
        let tx = self.commit_tx(&mut st, Op::Write { ino, offset, data: buf })?;
        drop(st);
        if let Op::Write { data: buf, .. } = tx.op {
            reuse_write_buffer(buf);
        }
        Ok(data.len() as u32)
    }

    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: u32) -> FsResult<()> {
        let mut st = self.lock();
        if st.orphans.contains_key(&ino) {
            let f = self.data_file(&mut st, ino).map_err(|e| errno_of(&e))?;
            return fallocate(&f, mode, offset, len).map_err(|e| errno_of(&e));
        }
        let i = self.ensure_private(&mut st, ino)?;
        self.commit(
            &mut st,
            Op::Fallocate {
                ino: i,
                mode,
                offset,
                len,
            },
        )
        .map(|_| ())
    }
}

/// Buffers of large writes kept for the next ones: with the daemon's malloc settings
/// (`fuse::keep_big_buffers_unmapped`) every fresh 1 MiB buffer is an mmap, 256 page faults
/// and an munmap. At most this many are kept, shared by all volumes.
const WRITE_BUFFERS: usize = 8;
const POOLED_MIN: usize = 128 << 10;
const POOLED_MAX: usize = 2 << 20;
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn write_buffer(data: &[u8]) -> Vec<u8> {
    if data.len() >= POOLED_MIN {
        if let Some(mut b) = BUFFERS.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            b.clear();
            b.extend_from_slice(data);
            return b;
        }
    }
    data.to_vec()
}

fn reuse_write_buffer(b: Vec<u8>) {
    if (POOLED_MIN..=POOLED_MAX).contains(&b.capacity()) {
        let mut pool = BUFFERS.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < WRITE_BUFFERS {
            pool.push(b);
        }
    }
}

/// Names are at most 255 bytes (NAME_MAX), as on Linux disk file systems.
pub(super) fn long_name(name: &[u8]) -> FsResult<()> {
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(())
}

/// Drop one handle; true when it was the last.
pub(super) fn release_count(st: &mut State, ino: Ino) -> bool {
    let last = match st.open.get_mut(&ino) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => true,
        None => false,
    };
    if last {
        st.open.remove(&ino);
        st.files.remove(&ino);
    }
    last
}

pub(super) fn lower_has(tree: &Tree, lower: Option<&Lower>, private_dir: Ino, name: &[u8]) -> bool {
    match (tree.inodes.get(&private_dir).and_then(|d| d.lower), lower) {
        (Some(l), Some(low)) => low.child(l, name).is_some(),
        _ => false,
    }
}

pub(super) fn op_data_len(op: &Op) -> u64 {
    match op {
        Op::Write { data, .. } => data.len() as u64,
        _ => 0,
    }
}
