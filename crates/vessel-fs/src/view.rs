//! The merged view of a volume: the private tree over the template (lower). Pure
//! functions over a [`Tree`] and a [`Lower`], shared by the FUSE frontend (live tree)
//! and the history tools (a tree rebuilt as of some past transaction).
//!
//! Inode numbers: private inodes keep their tree ids; a template entry that was never
//! copied up is `LOWER_BASE + index`, and copy-up keeps that number, so a file's inode
//! number does not change when it is first written.

use crate::lower::Lower;
use crate::tree::{Inode, Tree, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino};

/// First inode number of template entries (private ids stay below it).
pub const LOWER_BASE: Ino = 1 << 40;

pub type FsResult<T> = Result<T, i32>;

/// Directory entries: (name, ino, kind), sorted by name.
pub type DirEntries = Vec<(Vec<u8>, Ino, FileKind)>;

/// Attributes with VE-relative owners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission and set-id bits.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub rdev: u64,
}

/// One node of the merged view.
pub enum Node<'a> {
    Private(&'a Inode),
    Lower(u64),
}

pub fn lower_idx(ino: Ino) -> Option<u64> {
    ino.checked_sub(LOWER_BASE)
}

pub fn node<'a>(tree: &'a Tree, lower: Option<&Lower>, ino: Ino) -> Option<Node<'a>> {
    if let Some(i) = tree.inodes.get(&ino) {
        return Some(Node::Private(i));
    }
    let idx = lower_idx(ino)?;
    if idx == 0 {
        return None;
    }
    lower?.get(idx).map(|_| Node::Lower(idx))
}

/// The entry `name` in directory `parent`.
pub fn lookup(tree: &Tree, lower: Option<&Lower>, parent: Ino, name: &[u8]) -> FsResult<Ino> {
    match node(tree, lower, parent).ok_or(libc::ENOENT)? {
        Node::Private(p) => {
            if p.kind != FileKind::Dir {
                return Err(libc::ENOTDIR);
            }
            match p.entries.get(name) {
                Some(&WHITEOUT) => Err(libc::ENOENT),
                Some(&t) => Ok(t),
                None => match (p.lower, lower) {
                    (Some(l), Some(low)) => low.child(l, name).map(|c| LOWER_BASE + c as u64).ok_or(libc::ENOENT),
                    _ => Err(libc::ENOENT),
                },
            }
        }
        Node::Lower(idx) => {
            let low = lower.ok_or(libc::ENOENT)?;
            if low.get(idx).map(|e| e.kind) != Some(FileKind::Dir) {
                return Err(libc::ENOTDIR);
            }
            low.child(idx, name).map(|c| LOWER_BASE + c as u64).ok_or(libc::ENOENT)
        }
    }
}

/// Entries of a directory, sorted by name: (name, ino, kind).
pub fn readdir(tree: &Tree, lower: Option<&Lower>, dir: Ino) -> FsResult<DirEntries> {
    let mut out: std::collections::BTreeMap<Vec<u8>, (Ino, FileKind)> = Default::default();
    let lower_dir = match node(tree, lower, dir).ok_or(libc::ENOENT)? {
        Node::Private(p) => {
            if p.kind != FileKind::Dir {
                return Err(libc::ENOTDIR);
            }
            for (n, t) in p.children() {
                if let Some(i) = tree.inodes.get(&t) {
                    out.insert(n.clone(), (t, i.kind));
                }
            }
            p.lower.map(|l| (l, Some(p)))
        }
        Node::Lower(idx) => Some((idx, None)),
    };
    if let (Some((l, private)), Some(low)) = (lower_dir, lower) {
        for (n, c) in low.children(l) {
            if private.is_some_and(|p| p.entries.contains_key(n)) {
                continue;
            }
            if let Some(e) = low.get(c as u64) {
                out.insert(n.to_vec(), (LOWER_BASE + c as u64, e.kind));
            }
        }
    }
    Ok(out.into_iter().map(|(n, (i, k))| (n, i, k)).collect())
}

/// Parent of a directory in the merged view.
pub fn parent_of(tree: &Tree, lower: Option<&Lower>, dir: Ino) -> Ino {
    match node(tree, lower, dir) {
        Some(Node::Private(p)) => p.parent,
        Some(Node::Lower(idx)) => match lower.and_then(|l| l.get(idx)).map(|e| e.parent as u64) {
            Some(0) | None => ROOT,
            Some(pi) => LOWER_BASE + pi,
        },
        None => ROOT,
    }
}

/// True if a directory has no entries in the merged view.
pub fn is_empty_dir(tree: &Tree, lower: Option<&Lower>, dir: Ino) -> FsResult<bool> {
    Ok(readdir(tree, lower, dir)?.is_empty())
}

fn subdirs(tree: &Tree, lower: Option<&Lower>, dir: Ino) -> u32 {
    readdir(tree, lower, dir)
        .map(|v| v.iter().filter(|(_, _, k)| *k == FileKind::Dir).count() as u32)
        .unwrap_or(0)
}

pub fn inode_attr(ino: Ino, i: &Inode) -> Attr {
    Attr {
        ino,
        kind: i.kind,
        perm: i.mode & 0o7777,
        uid: i.uid,
        gid: i.gid,
        size: i.size,
        blocks: i.size.div_ceil(512),
        nlink: i.nlink,
        atime_ns: i.atime_ns,
        mtime_ns: i.mtime_ns,
        ctime_ns: i.ctime_ns,
        rdev: i.rdev,
    }
}

pub fn attr(tree: &Tree, lower: Option<&Lower>, ino: Ino) -> FsResult<Attr> {
    match node(tree, lower, ino).ok_or(libc::ENOENT)? {
        Node::Private(i) => {
            let mut a = inode_attr(ino, i);
            if i.kind == FileKind::Dir && i.lower.is_some() {
                a.nlink = 2 + subdirs(tree, lower, ino);
            }
            Ok(a)
        }
        Node::Lower(idx) => {
            let e = lower.and_then(|l| l.get(idx)).ok_or(libc::ENOENT)?;
            Ok(Attr {
                ino,
                kind: e.kind,
                perm: e.mode,
                uid: e.uid,
                gid: e.gid,
                size: e.size,
                blocks: e.blocks,
                nlink: if e.kind == FileKind::Dir {
                    2 + subdirs(tree, lower, ino)
                } else {
                    1
                },
                atime_ns: e.mtime_ns,
                mtime_ns: e.mtime_ns,
                ctime_ns: e.ctime_ns,
                rdev: e.rdev,
            })
        }
    }
}

/// Resolve a path (components separated by '/') from the root, without following
/// symlinks.
pub fn resolve(tree: &Tree, lower: Option<&Lower>, path: &[u8]) -> FsResult<Ino> {
    let mut cur = ROOT;
    for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".") {
        cur = if c == b".." {
            parent_of(tree, lower, cur)
        } else {
            lookup(tree, lower, cur, c)?
        };
    }
    Ok(cur)
}
