//! The metadata of a volume's tree, as `apply(txlog)` builds it: inodes by stable id,
//! directory entries, link counts, attributes, xattrs and sizes (file contents live apart,
//! by inode id). Applying a transaction is atomic: it either fully applies or returns the
//! errno the VE would see and changes nothing. Checkpoints (versioned) let a replica start
//! from a saved tree instead of the whole log.

use crate::codec::{Dec, DecodeError, Enc};
use crate::tx::{FileKind, Ino, Op, Tx};
use std::collections::BTreeMap;

/// Inode id of the volume's root directory.
pub const ROOT: Ino = 1;
/// A directory entry that hides the template's entry of the same name (a delete of a
/// template file, or the old name of a moved one).
pub const WHITEOUT: Ino = 0;
/// Version of the checkpoint format.
pub const CHECKPOINT_VERSION: u32 = 1;
const CHECKPOINT_MAGIC: &[u8; 8] = b"VSLCKPT1";

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const FALLOC_FL_KEEP_SIZE: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("no such attribute")]
    NoData,
    #[error("operation not permitted")]
    Perm,
    #[error("transaction out of order")]
    OutOfOrder,
}

impl TreeError {
    pub fn errno(self) -> i32 {
        match self {
            TreeError::NotFound => libc_errno::ENOENT,
            TreeError::Exists => libc_errno::EEXIST,
            TreeError::NotDir => libc_errno::ENOTDIR,
            TreeError::IsDir => libc_errno::EISDIR,
            TreeError::NotEmpty => libc_errno::ENOTEMPTY,
            TreeError::Invalid | TreeError::OutOfOrder => libc_errno::EINVAL,
            TreeError::NoData => libc_errno::ENODATA,
            TreeError::Perm => libc_errno::EPERM,
        }
    }
}

/// Linux errno values (stable ABI), so this crate needs no libc.
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EEXIST: i32 = 17;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENOTEMPTY: i32 = 39;
    pub const ENODATA: i32 = 61;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Symlink target.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Directory entries (directories only).
    pub entries: BTreeMap<Vec<u8>, Ino>,
    /// Parent directory (directories only; the root is its own parent).
    pub parent: Ino,
    /// The template entry this inode was copied up from: a directory merges that
    /// template directory's entries; a file's contents started as that file's.
    pub lower: Option<u64>,
}

impl Inode {
    /// Real entries (whiteouts left out).
    pub fn children(&self) -> impl Iterator<Item = (&Vec<u8>, Ino)> {
        self.entries
            .iter()
            .filter(|(_, t)| **t != WHITEOUT)
            .map(|(n, t)| (n, *t))
    }
    fn has_children(&self) -> bool {
        self.children().next().is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub inodes: BTreeMap<Ino, Inode>,
    /// Seq of the last applied transaction.
    pub applied: u64,
    /// Highest private inode number ever created (numbers are never reused).
    pub max_ino: Ino,
}

fn valid_name(n: &[u8]) -> bool {
    !n.is_empty() && n.len() <= 255 && n != b"." && n != b".." && !n.contains(&b'/') && !n.contains(&0)
}

impl Tree {
    pub fn new(mode: u32, uid: u32, gid: u32) -> Tree {
        let root = Inode {
            kind: FileKind::Dir,
            mode,
            uid,
            gid,
            rdev: 0,
            size: 0,
            nlink: 2,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            target: Vec::new(),
            xattrs: BTreeMap::new(),
            entries: BTreeMap::new(),
            parent: ROOT,
            lower: None,
        };
        Tree {
            inodes: BTreeMap::from([(ROOT, root)]),
            applied: 0,
            max_ino: ROOT,
        }
    }

    /// The entry `name` in `parent` (`Some(WHITEOUT)` for a whiteout).
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.inodes.get(&parent)?.entries.get(name).copied()
    }

    /// The real entry `name` in `parent` (whiteouts read as absent).
    fn real(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.lookup(parent, name).filter(|t| *t != WHITEOUT)
    }

    fn dir(&self, ino: Ino) -> Result<&Inode, TreeError> {
        let i = self.inodes.get(&ino).ok_or(TreeError::NotFound)?;
        if i.kind != FileKind::Dir {
            return Err(TreeError::NotDir);
        }
        Ok(i)
    }

    fn is_ancestor(&self, a: Ino, mut b: Ino) -> bool {
        // Walk up from b; bounded by the number of inodes.
        for _ in 0..=self.inodes.len() {
            if a == b {
                return true;
            }
            match self.inodes.get(&b) {
                Some(i) if b != ROOT => b = i.parent,
                _ => return false,
            }
        }
        false
    }

    /// Apply `tx` (the next in sequence). On error nothing changes.
    pub fn apply(&mut self, tx: &Tx) -> Result<(), TreeError> {
        if tx.seq != self.applied + 1 {
            return Err(TreeError::OutOfOrder);
        }
        // Validate fully first, then change: a failing op leaves the tree as it was.
        self.check(&tx.op)?;
        self.commit(&tx.op, tx.time_ns);
        self.applied = tx.seq;
        Ok(())
    }

    /// Validate an op against the current tree without changing it.
    fn check(&self, op: &Op) -> Result<(), TreeError> {
        match op {
            Op::Create { parent, name, ino, .. } => {
                let p = self.dir(*parent)?;
                if !valid_name(name) || *ino == ROOT {
                    return Err(TreeError::Invalid);
                }
                if self.real(*parent, name).is_some() || self.inodes.contains_key(ino) || *ino == WHITEOUT {
                    return Err(TreeError::Exists);
                }
                let _ = p;
            }
            Op::CopyUp { parent, name, ino, .. } => {
                self.dir(*parent)?;
                if !valid_name(name) || *ino == ROOT || *ino == WHITEOUT {
                    return Err(TreeError::Invalid);
                }
                if self.lookup(*parent, name).is_some() || self.inodes.contains_key(ino) {
                    return Err(TreeError::Exists);
                }
            }
            Op::Link { ino, parent, name } => {
                let i = self.inodes.get(ino).ok_or(TreeError::NotFound)?;
                if i.kind == FileKind::Dir {
                    return Err(TreeError::Perm);
                }
                let p = self.dir(*parent)?;
                if !valid_name(name) {
                    return Err(TreeError::Invalid);
                }
                if self.real(*parent, name).is_some() {
                    return Err(TreeError::Exists);
                }
                let _ = p;
            }
            Op::Unlink { parent, name, whiteout } => {
                self.dir(*parent)?;
                match self.real(*parent, name) {
                    Some(t) => {
                        let i = &self.inodes[&t];
                        if i.kind == FileKind::Dir && i.has_children() {
                            return Err(TreeError::NotEmpty);
                        }
                    }
                    None if *whiteout && valid_name(name) => {}
                    None => return Err(TreeError::NotFound),
                }
            }
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
                whiteout,
            } => {
                if *flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
                    || *flags == RENAME_NOREPLACE | RENAME_EXCHANGE
                    || (*whiteout && *flags & RENAME_EXCHANGE != 0)
                {
                    return Err(TreeError::Invalid);
                }
                self.dir(*parent)?;
                let src = self.real(*parent, name).ok_or(TreeError::NotFound)?;
                self.dir(*new_parent)?;
                let dst = self.real(*new_parent, new_name);
                if !valid_name(new_name) {
                    return Err(TreeError::Invalid);
                }
                let src_dir = self.inodes[&src].kind == FileKind::Dir;
                if src_dir && self.is_ancestor(src, *new_parent) {
                    return Err(TreeError::Invalid); // into its own subtree
                }
                if *flags & RENAME_EXCHANGE != 0 {
                    let d = dst.ok_or(TreeError::NotFound)?;
                    if self.inodes[&d].kind == FileKind::Dir && self.is_ancestor(d, *parent) {
                        return Err(TreeError::Invalid);
                    }
                } else if let Some(d) = dst {
                    if *flags & RENAME_NOREPLACE != 0 {
                        return Err(TreeError::Exists);
                    }
                    if d != src {
                        let di = &self.inodes[&d];
                        match (src_dir, di.kind == FileKind::Dir) {
                            (true, false) => return Err(TreeError::NotDir),
                            (false, true) => return Err(TreeError::IsDir),
                            (true, true) if di.has_children() => return Err(TreeError::NotEmpty),
                            _ => {}
                        }
                    }
                }
            }
            Op::Write { ino, .. } | Op::Truncate { ino, .. } | Op::Fallocate { ino, .. } => {
                match self.inodes.get(ino).ok_or(TreeError::NotFound)?.kind {
                    FileKind::File => {}
                    FileKind::Dir => return Err(TreeError::IsDir),
                    _ => return Err(TreeError::Invalid),
                }
            }
            Op::SetAttr { ino, .. } | Op::SetXattr { ino, .. } => {
                self.inodes.get(ino).ok_or(TreeError::NotFound)?;
            }
            Op::RemoveXattr { ino, name } => {
                if !self
                    .inodes
                    .get(ino)
                    .ok_or(TreeError::NotFound)?
                    .xattrs
                    .contains_key(name)
                {
                    return Err(TreeError::NoData);
                }
            }
        }
        Ok(())
    }

    fn touch_dir(&mut self, d: Ino, t: i64) {
        if let Some(i) = self.inodes.get_mut(&d) {
            i.mtime_ns = t;
            i.ctime_ns = t;
        }
    }

    /// Remove one name of `t` (found in `parent`); frees the inode at zero links.
    fn drop_link(&mut self, parent: Ino, t: Ino) {
        let is_dir = self.inodes[&t].kind == FileKind::Dir;
        if is_dir {
            self.inodes.remove(&t);
            if let Some(p) = self.inodes.get_mut(&parent) {
                p.nlink -= 1;
            }
        } else if let Some(i) = self.inodes.get_mut(&t) {
            i.nlink -= 1;
            if i.nlink == 0 {
                self.inodes.remove(&t);
            }
        }
    }

    /// Apply a validated op.
    fn commit(&mut self, op: &Op, t: i64) {
        if let Op::Write { ino, offset, data } = op {
            // Only the length of a write matters here: its data is not cloned below.
            let i = self.inodes.get_mut(ino).expect("checked");
            if !data.is_empty() {
                i.size = i.size.max(offset.saturating_add(data.len() as u64));
            }
            i.mtime_ns = t;
            i.ctime_ns = t;
            return;
        }
        match op.clone() {
            Op::Create {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                rdev,
                target,
            } => {
                let is_dir = kind == FileKind::Dir;
                let size = if kind == FileKind::Symlink {
                    target.len() as u64
                } else {
                    0
                };
                let node = Inode {
                    kind,
                    mode,
                    uid,
                    gid,
                    rdev,
                    size,
                    nlink: if is_dir { 2 } else { 1 },
                    atime_ns: t,
                    mtime_ns: t,
                    ctime_ns: t,
                    target,
                    xattrs: BTreeMap::new(),
                    entries: BTreeMap::new(),
                    parent,
                    lower: None,
                };
                self.inodes.insert(ino, node);
                if ino < 1 << 40 {
                    self.max_ino = self.max_ino.max(ino);
                }
                let p = self.inodes.get_mut(&parent).expect("checked");
                p.entries.insert(name, ino);
                if is_dir {
                    p.nlink += 1;
                }
                self.touch_dir(parent, t);
            }
            Op::Link { ino, parent, name } => {
                let i = self.inodes.get_mut(&ino).expect("checked");
                i.nlink += 1;
                i.ctime_ns = t;
                self.inodes.get_mut(&parent).expect("checked").entries.insert(name, ino);
                self.touch_dir(parent, t);
            }
            Op::CopyUp {
                parent,
                name,
                ino,
                lower,
                kind,
                mode,
                uid,
                gid,
                rdev,
                target,
                size,
                mtime_ns,
            } => {
                let is_dir = kind == FileKind::Dir;
                let node = Inode {
                    kind,
                    mode,
                    uid,
                    gid,
                    rdev,
                    size,
                    nlink: if is_dir { 2 } else { 1 },
                    atime_ns: mtime_ns,
                    mtime_ns,
                    ctime_ns: t,
                    target,
                    xattrs: BTreeMap::new(),
                    entries: BTreeMap::new(),
                    parent,
                    lower: Some(lower),
                };
                self.inodes.insert(ino, node);
                let p = self.inodes.get_mut(&parent).expect("checked");
                p.entries.insert(name, ino);
                if is_dir {
                    p.nlink += 1;
                }
            }
            Op::Unlink { parent, name, whiteout } => {
                let p = self.inodes.get_mut(&parent).expect("checked");
                let target = p.entries.remove(&name).filter(|t| *t != WHITEOUT);
                if whiteout {
                    p.entries.insert(name, WHITEOUT);
                }
                if let Some(target) = target {
                    self.drop_link(parent, target);
                    if let Some(i) = self.inodes.get_mut(&target) {
                        i.ctime_ns = t;
                    }
                }
                self.touch_dir(parent, t);
            }
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
                whiteout,
            } => {
                let src = self.inodes[&parent].entries[&name];
                let dst = self.real(new_parent, &new_name);
                if flags & RENAME_EXCHANGE != 0 {
                    let d = dst.expect("checked");
                    self.inodes.get_mut(&parent).expect("checked").entries.insert(name, d);
                    self.inodes
                        .get_mut(&new_parent)
                        .expect("checked")
                        .entries
                        .insert(new_name, src);
                    self.reparent(src, parent, new_parent);
                    self.reparent(d, new_parent, parent);
                } else if dst != Some(src) {
                    if let Some(d) = dst {
                        self.inodes
                            .get_mut(&new_parent)
                            .expect("checked")
                            .entries
                            .remove(&new_name);
                        self.drop_link(new_parent, d);
                        if let Some(i) = self.inodes.get_mut(&d) {
                            i.ctime_ns = t;
                        }
                    }
                    let p = self.inodes.get_mut(&parent).expect("checked");
                    p.entries.remove(&name);
                    if whiteout {
                        p.entries.insert(name, WHITEOUT);
                    }
                    self.inodes
                        .get_mut(&new_parent)
                        .expect("checked")
                        .entries
                        .insert(new_name, src);
                    self.reparent(src, parent, new_parent);
                }
                if let Some(i) = self.inodes.get_mut(&src) {
                    i.ctime_ns = t;
                }
                self.touch_dir(parent, t);
                self.touch_dir(new_parent, t);
            }
            Op::Write { .. } => {} // above
            Op::Truncate { ino, size } => {
                let i = self.inodes.get_mut(&ino).expect("checked");
                i.size = size;
                i.mtime_ns = t;
                i.ctime_ns = t;
            }
            Op::Fallocate { ino, mode, offset, len } => {
                let i = self.inodes.get_mut(&ino).expect("checked");
                if mode & FALLOC_FL_KEEP_SIZE == 0 {
                    i.size = i.size.max(offset.saturating_add(len));
                }
                i.ctime_ns = t;
            }
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                atime_ns,
                mtime_ns,
            } => {
                let i = self.inodes.get_mut(&ino).expect("checked");
                if let Some(m) = mode {
                    i.mode = m as u32;
                }
                if let Some(u) = uid {
                    i.uid = u as u32;
                }
                if let Some(g) = gid {
                    i.gid = g as u32;
                }
                if let Some(a) = atime_ns {
                    i.atime_ns = a as i64;
                }
                if let Some(m) = mtime_ns {
                    i.mtime_ns = m as i64;
                }
                i.ctime_ns = t;
            }
            Op::SetXattr { ino, name, value } => {
                let i = self.inodes.get_mut(&ino).expect("checked");
                i.xattrs.insert(name, value);
                i.ctime_ns = t;
            }
            Op::RemoveXattr { ino, name } => {
                let i = self.inodes.get_mut(&ino).expect("checked");
                i.xattrs.remove(&name);
                i.ctime_ns = t;
            }
        }
    }

    /// Keep a moved directory's parent pointer and both parents' link counts right.
    fn reparent(&mut self, ino: Ino, from: Ino, to: Ino) {
        if from == to || self.inodes.get(&ino).is_none_or(|i| i.kind != FileKind::Dir) {
            return;
        }
        self.inodes.get_mut(&ino).expect("present").parent = to;
        self.inodes.get_mut(&from).expect("present").nlink -= 1;
        self.inodes.get_mut(&to).expect("present").nlink += 1;
    }

    /// Structural invariants (for tests and scrub): every entry points to an inode, link
    /// counts match the entries, directories form a tree under the root.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut names: BTreeMap<Ino, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<Ino, u32> = BTreeMap::new();
        for (&d, i) in &self.inodes {
            for (n, t) in i.children() {
                let ti = self
                    .inodes
                    .get(&t)
                    .ok_or(format!("entry {n:?} in {d} points to missing {t}"))?;
                *names.entry(t).or_default() += 1;
                if ti.kind == FileKind::Dir {
                    *subdirs.entry(d).or_default() += 1;
                    if ti.parent != d {
                        return Err(format!("dir {t} has parent {} but sits in {d}", ti.parent));
                    }
                }
            }
        }
        for (&ino, i) in &self.inodes {
            if i.kind == FileKind::Dir {
                let want = 2 + subdirs.get(&ino).copied().unwrap_or(0);
                if i.nlink != want {
                    return Err(format!("dir {ino} nlink {} != {want}", i.nlink));
                }
                if ino != ROOT && names.get(&ino) != Some(&1) {
                    return Err(format!("dir {ino} has {:?} names", names.get(&ino)));
                }
                if !self.is_ancestor(ROOT, ino) {
                    return Err(format!("dir {ino} is not under the root"));
                }
            } else if names.get(&ino).copied().unwrap_or(0) != i.nlink || i.nlink == 0 {
                return Err(format!("inode {ino} nlink {} != names {:?}", i.nlink, names.get(&ino)));
            }
        }
        Ok(())
    }

    /// Versioned checkpoint bytes (magic, version, applied seq, inodes), checksummed.
    pub fn checkpoint(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.0.extend_from_slice(CHECKPOINT_MAGIC);
        e.u32(CHECKPOINT_VERSION)
            .u64(self.applied)
            .u64(self.max_ino)
            .u64(self.inodes.len() as u64);
        for (&ino, i) in &self.inodes {
            e.u64(ino)
                .u8(i.kind.code())
                .u32(i.mode)
                .u32(i.uid)
                .u32(i.gid)
                .u64(i.rdev)
                .u64(i.size)
                .u32(i.nlink);
            e.i64(i.atime_ns)
                .i64(i.mtime_ns)
                .i64(i.ctime_ns)
                .bytes(&i.target)
                .u64(i.parent)
                .opt_u64(i.lower);
            e.u32(i.xattrs.len() as u32);
            for (k, v) in &i.xattrs {
                e.bytes(k).bytes(v);
            }
            e.u32(i.entries.len() as u32);
            for (n, t) in &i.entries {
                e.bytes(n).u64(*t);
            }
        }
        let crc = crc32fast::hash(&e.0);
        e.u32(crc);
        e.0
    }

    pub fn from_checkpoint(b: &[u8]) -> Result<Tree, DecodeError> {
        if b.len() < 12 || &b[..8] != CHECKPOINT_MAGIC {
            return Err(DecodeError::Unknown {
                what: "checkpoint magic",
                value: 0,
            });
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(DecodeError::Unknown {
                what: "checkpoint checksum",
                value: 0,
            });
        }
        let mut d = Dec::new(&body[8..]);
        let v = d.u32()?;
        if v != CHECKPOINT_VERSION {
            return Err(DecodeError::Unknown {
                what: "checkpoint version",
                value: v as u64,
            });
        }
        let applied = d.u64()?;
        let max_ino = d.u64()?;
        let n = d.u64()?;
        let mut inodes = BTreeMap::new();
        for _ in 0..n {
            let ino = d.u64()?;
            let kind = FileKind::from_code(d.u8()?)?;
            let (mode, uid, gid, rdev, size, nlink) = (d.u32()?, d.u32()?, d.u32()?, d.u64()?, d.u64()?, d.u32()?);
            let (atime_ns, mtime_ns, ctime_ns) = (d.i64()?, d.i64()?, d.i64()?);
            let (target, parent, lower) = (d.bytes()?, d.u64()?, d.opt_u64()?);
            let mut xattrs = BTreeMap::new();
            for _ in 0..d.u32()? {
                xattrs.insert(d.bytes()?, d.bytes()?);
            }
            let mut entries = BTreeMap::new();
            for _ in 0..d.u32()? {
                entries.insert(d.bytes()?, d.u64()?);
            }
            inodes.insert(
                ino,
                Inode {
                    kind,
                    mode,
                    uid,
                    gid,
                    rdev,
                    size,
                    nlink,
                    atime_ns,
                    mtime_ns,
                    ctime_ns,
                    target,
                    xattrs,
                    entries,
                    parent,
                    lower,
                },
            );
        }
        d.finish()?;
        Ok(Tree {
            inodes,
            applied,
            max_ino,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct Log {
        tree: Tree,
        txs: Vec<Tx>,
    }

    impl Log {
        fn new() -> Log {
            Log {
                tree: Tree::new(0o755, 0, 0),
                txs: Vec::new(),
            }
        }
        fn try_op(&mut self, op: Op) -> Result<(), TreeError> {
            let tx = Tx {
                epoch: 1,
                seq: self.tree.applied + 1,
                time_ns: self.tree.applied as i64 + 1,
                op,
            };
            let before = self.tree.clone();
            let r = self.tree.apply(&tx);
            match r {
                Ok(()) => self.txs.push(tx),
                Err(_) => assert_eq!(self.tree, before, "a failed op changed the tree"),
            }
            self.tree.check_invariants().unwrap();
            r
        }
        fn create(&mut self, parent: Ino, name: &str, ino: Ino, kind: FileKind) -> Result<(), TreeError> {
            self.try_op(Op::Create {
                parent,
                name: name.into(),
                ino,
                kind,
                mode: 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: vec![],
            })
        }
        fn rename(&mut self, p: Ino, n: &str, np: Ino, nn: &str, flags: u32) -> Result<(), TreeError> {
            self.try_op(Op::Rename {
                parent: p,
                name: n.into(),
                new_parent: np,
                new_name: nn.into(),
                flags,
                whiteout: false,
            })
        }
    }

    #[test]
    fn posix_rules_for_names_links_and_renames() {
        let mut l = Log::new();
        l.create(ROOT, "d", 2, FileKind::Dir).unwrap();
        l.create(2, "f", 3, FileKind::File).unwrap();
        l.create(ROOT, "e", 4, FileKind::Dir).unwrap();
        assert_eq!(l.create(ROOT, "d", 9, FileKind::File), Err(TreeError::Exists));
        assert_eq!(l.create(3, "x", 9, FileKind::File), Err(TreeError::NotDir));
        assert_eq!(l.create(ROOT, "a/b", 9, FileKind::File), Err(TreeError::Invalid));
        assert_eq!(l.tree.inodes[&ROOT].nlink, 4);
        // Hard links count; the last unlink frees the inode.
        l.try_op(Op::Link {
            ino: 3,
            parent: ROOT,
            name: b"g".to_vec(),
        })
        .unwrap();
        assert_eq!(l.tree.inodes[&3].nlink, 2);
        assert_eq!(
            l.try_op(Op::Link {
                ino: 2,
                parent: ROOT,
                name: b"dl".to_vec()
            }),
            Err(TreeError::Perm)
        );
        l.try_op(Op::Unlink {
            parent: 2,
            name: b"f".to_vec(),
            whiteout: false,
        })
        .unwrap();
        assert_eq!(l.tree.inodes[&3].nlink, 1);
        l.try_op(Op::Unlink {
            parent: ROOT,
            name: b"g".to_vec(),
            whiteout: false,
        })
        .unwrap();
        assert!(!l.tree.inodes.contains_key(&3));
        // Directories: not-empty, into own subtree, type clashes, noreplace, exchange.
        l.create(2, "sub", 5, FileKind::Dir).unwrap();
        assert_eq!(
            l.try_op(Op::Unlink {
                parent: ROOT,
                name: b"d".to_vec(),
                whiteout: false,
            }),
            Err(TreeError::NotEmpty)
        );
        assert_eq!(l.rename(ROOT, "d", 5, "loop", 0), Err(TreeError::Invalid));
        assert_eq!(l.rename(ROOT, "e", ROOT, "d", 0), Err(TreeError::NotEmpty));
        l.create(ROOT, "file", 6, FileKind::File).unwrap();
        assert_eq!(l.rename(ROOT, "file", ROOT, "e", 0), Err(TreeError::IsDir));
        assert_eq!(l.rename(ROOT, "e", ROOT, "file", 0), Err(TreeError::NotDir));
        assert_eq!(
            l.rename(ROOT, "file", ROOT, "d", RENAME_NOREPLACE),
            Err(TreeError::Exists)
        );
        l.rename(ROOT, "file", ROOT, "d", RENAME_EXCHANGE).unwrap();
        assert_eq!(l.tree.lookup(ROOT, b"d"), Some(6));
        assert_eq!(l.tree.lookup(ROOT, b"file"), Some(2));
        // Moving a directory moves its link count contribution.
        l.rename(2, "sub", 4, "moved", 0).unwrap();
        assert_eq!((l.tree.inodes[&2].nlink, l.tree.inodes[&4].nlink), (2, 3));
        assert_eq!(l.tree.inodes[&5].parent, 4);
        // Replacing an empty directory by rename frees it.
        l.create(ROOT, "empty", 7, FileKind::Dir).unwrap();
        l.rename(ROOT, "file", ROOT, "empty", 0).unwrap();
        assert!(!l.tree.inodes.contains_key(&7));
    }

    #[test]
    fn sizes_follow_writes_truncate_and_fallocate() {
        let mut l = Log::new();
        l.create(ROOT, "f", 2, FileKind::File).unwrap();
        l.try_op(Op::Write {
            ino: 2,
            offset: 5 << 30,
            data: vec![1; 10],
        })
        .unwrap();
        assert_eq!(l.tree.inodes[&2].size, (5 << 30) + 10, "files over 4 GiB");
        l.try_op(Op::Truncate { ino: 2, size: 3 }).unwrap();
        l.try_op(Op::Fallocate {
            ino: 2,
            mode: FALLOC_FL_KEEP_SIZE,
            offset: 0,
            len: 100,
        })
        .unwrap();
        assert_eq!(l.tree.inodes[&2].size, 3);
        l.try_op(Op::Fallocate {
            ino: 2,
            mode: 0,
            offset: 0,
            len: 100,
        })
        .unwrap();
        assert_eq!(l.tree.inodes[&2].size, 100);
        assert_eq!(
            l.try_op(Op::Write {
                ino: ROOT,
                offset: 0,
                data: vec![1]
            }),
            Err(TreeError::IsDir)
        );
        assert_eq!(
            l.try_op(Op::RemoveXattr {
                ino: 2,
                name: b"user.x".to_vec()
            }),
            Err(TreeError::NoData)
        );
        l.try_op(Op::SetXattr {
            ino: 2,
            name: b"security.capability".to_vec(),
            value: vec![1, 2],
        })
        .unwrap();
        l.try_op(Op::RemoveXattr {
            ino: 2,
            name: b"security.capability".to_vec(),
        })
        .unwrap();
    }

    #[test]
    fn out_of_order_and_corrupt_checkpoints_are_refused() {
        let mut t = Tree::new(0o755, 0, 0);
        let tx = Tx {
            epoch: 1,
            seq: 2,
            time_ns: 0,
            op: Op::Truncate { ino: ROOT, size: 0 },
        };
        assert_eq!(t.apply(&tx), Err(TreeError::OutOfOrder));
        let mut b = t.checkpoint();
        assert_eq!(Tree::from_checkpoint(&b).unwrap(), t);
        let mid = b.len() / 2;
        b[mid] ^= 1;
        assert!(Tree::from_checkpoint(&b).is_err());
        assert!(Tree::from_checkpoint(b"garbage").is_err());
    }

    /// A random intent, resolved against the tree as it is when it runs.
    fn intent() -> impl Strategy<Value = (u8, u16, u16, u16, u8)> {
        (0u8..9, any::<u16>(), any::<u16>(), any::<u16>(), 0u8..4)
    }

    fn resolve(t: &Tree, next_ino: &mut Ino, (k, a, b, c, f): (u8, u16, u16, u16, u8)) -> Op {
        let dirs: Vec<Ino> = t
            .inodes
            .iter()
            .filter(|(_, i)| i.kind == FileKind::Dir)
            .map(|(n, _)| *n)
            .collect();
        let all: Vec<Ino> = t.inodes.keys().copied().collect();
        let pick = |v: &Vec<Ino>, x: u16| v[x as usize % v.len()];
        let name = |x: u16| format!("n{}", x % 6).into_bytes();
        let entry_of = |d: Ino, x: u16| {
            let e: Vec<&Vec<u8>> = t.inodes[&d].entries.keys().collect();
            if e.is_empty() {
                name(x)
            } else {
                e[x as usize % e.len()].clone()
            }
        };
        match k {
            0 | 1 => {
                *next_ino += 1;
                let kind = if k == 0 { FileKind::Dir } else { FileKind::File };
                Op::Create {
                    parent: pick(&dirs, a),
                    name: name(b),
                    ino: *next_ino,
                    kind,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: vec![],
                }
            }
            2 => Op::Link {
                ino: pick(&all, a),
                parent: pick(&dirs, b),
                name: name(c),
            },
            3 => {
                let d = pick(&dirs, a);
                Op::Unlink {
                    parent: d,
                    name: entry_of(d, b),
                    whiteout: f == 1,
                }
            }
            4 => {
                let (d, nd) = (pick(&dirs, a), pick(&dirs, c));
                Op::Rename {
                    parent: d,
                    name: entry_of(d, b),
                    new_parent: nd,
                    new_name: name(c / 7),
                    flags: [0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE][f as usize],
                    whiteout: f == 1,
                }
            }
            5 => Op::Write {
                ino: pick(&all, a),
                offset: b as u64,
                data: vec![0; c as usize % 100],
            },
            6 => Op::Truncate {
                ino: pick(&all, a),
                size: b as u64,
            },
            7 => Op::SetXattr {
                ino: pick(&all, a),
                name: name(b),
                value: vec![f],
            },
            _ => Op::RemoveXattr {
                ino: pick(&all, a),
                name: name(b),
            },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn random_histories_keep_invariants_and_checkpoints_are_equivalent(
            intents in proptest::collection::vec(intent(), 1..120),
            split in 0.0f64..1.0,
        ) {
            let mut l = Log::new();
            let mut next = ROOT;
            for i in intents {
                let op = resolve(&l.tree, &mut next, i);
                let _ = l.try_op(op);
            }
            // Replaying the log gives the same tree (the replication contract) ...
            let mut replay = Tree::new(0o755, 0, 0);
            for tx in &l.txs { replay.apply(tx).unwrap(); }
            prop_assert_eq!(&replay, &l.tree);
            // ... and so does a checkpoint of a prefix plus the rest of the log.
            let k = (l.txs.len() as f64 * split) as usize;
            let mut prefix = Tree::new(0o755, 0, 0);
            for tx in &l.txs[..k] { prefix.apply(tx).unwrap(); }
            let mut from_ckpt = Tree::from_checkpoint(&prefix.checkpoint()).unwrap();
            for tx in &l.txs[k..] { from_ckpt.apply(tx).unwrap(); }
            prop_assert_eq!(&from_ckpt, &l.tree);
        }
    }
}
