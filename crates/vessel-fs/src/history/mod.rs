//! The txlog as a time machine: what a VE changed relative to its template, the history
//! of one path, and bringing a path (or the whole tree) back to an earlier point. A revert
//! is itself a series of ordinary transactions, so it is replicated and can be undone.
//!
//! A VE's tree is attacker-shaped (any depth, any number of entries, files of any apparent
//! size), so nothing here recurses, builds a path for an entry it does not report, holds
//! the log in memory (it is read one transaction at a time) or a file's contents (they are
//! rebuilt in a scratch file and compared in chunks), and answers are bounded in bytes:
//! what does not fit is counted in [`Listing::omitted`].

mod content;
mod revert;
#[cfg(test)]
mod tests;

pub use revert::{revert, RevertReport, Target};

use crate::lower::Lower;
use crate::tree::{Tree, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino, Op};
use crate::view;
use crate::volume::{op_ino, Volume, VolumeError};
use std::collections::HashMap;

/// Default bound of one answer: bytes of its paths and descriptions.
pub const ANSWER_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "added",
            Change::Modified => "modified",
            Change::Deleted => "deleted",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffEntry {
    pub path: String,
    pub change: Change,
    pub kind: FileKind,
    pub size: u64,
}

/// A bounded answer: the entries that fit, and how many more there were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing<T> {
    pub entries: Vec<T>,
    pub omitted: u64,
}

impl<T> Default for Listing<T> {
    fn default() -> Self {
        Listing {
            entries: Vec::new(),
            omitted: 0,
        }
    }
}

pub fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "dir",
        FileKind::Symlink => "symlink",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::CharDev => "chardev",
        FileKind::BlockDev => "blockdev",
    }
}

fn join(p: &str, n: &[u8]) -> String {
    format!("{}/{}", p.trim_end_matches('/'), String::from_utf8_lossy(n))
}

fn under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// A path for messages (shortened: a VE's paths can be very long).
pub(crate) fn shown(p: &str) -> String {
    if p.chars().count() > 200 {
        let head: String = p.chars().take(100).collect();
        let tail: String = p.chars().skip(p.chars().count() - 80).collect();
        format!("{head}...{tail}")
    } else {
        p.to_string()
    }
}

/// Normalize a user-given path to "/a/b".
pub fn norm(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    format!("/{}", parts.join("/"))
}

/// What the VE changed relative to its template, under `prefix` ("/" for everything), at
/// most about `max_bytes` of paths. The tree is walked under the volume's lock (no file
/// contents are read there); contents of copied-up files are compared after it.
pub fn diff(vol: &Volume, prefix: &str, max_bytes: usize) -> Listing<DiffEntry> {
    let prefix = norm(prefix);
    // (index in the answer or None when left out, file, its template entry)
    let mut compare: Vec<(Option<usize>, Ino, u64)> = Vec::new();
    let mut out = vol.with_tree(|tree, lower| walk_diff(tree, lower, &prefix, max_bytes, &mut compare));
    let mut drop = vec![false; out.entries.len()];
    for (at, ino, idx) in compare {
        if same_as_template(vol, ino, idx) {
            if let Some(i) = at {
                drop[i] = true;
            }
        } else if at.is_none() {
            out.omitted += 1;
        }
    }
    let mut k = 0;
    out.entries.retain(|_| {
        k += 1;
        !drop[k - 1]
    });
    out
}

fn same_as_template(vol: &Volume, ino: Ino, idx: u64) -> bool {
    let (Some(low), Ok(a)) = (vol.lower(), vol.open_data(ino)) else {
        return false;
    };
    let (Ok(b), Some(e)) = (low.open(idx), low.get(idx)) else {
        return false;
    };
    a.metadata().is_ok_and(|m| m.len() == e.size) && crate::sparse::same(&a, &b, e.size).unwrap_or(false)
}

fn walk_diff(
    tree: &Tree,
    lower: Option<&Lower>,
    prefix: &str,
    max_bytes: usize,
    compare: &mut Vec<(Option<usize>, Ino, u64)>,
) -> Listing<DiffEntry> {
    let mut out = Listing::default();
    let mut used = 0usize;
    let Some(root) = tree.inodes.get(&ROOT) else {
        return out;
    };
    let mut path = String::new();
    // (entries left, template directory, length of the directory's path)
    let mut stack = vec![(root.entries.iter(), lower.map(|_| 0u64), 0usize)];
    while let Some((entries, lower_dir, len)) = stack.last_mut() {
        let Some((name, &t)) = entries.next() else {
            stack.pop();
            continue;
        };
        let (lower_dir, len) = (*lower_dir, *len);
        path.truncate(len);
        path.push('/');
        path.push_str(&String::from_utf8_lossy(name));
        let inside = under(&path, prefix);
        if !inside && !under(prefix, &path) {
            continue;
        }
        let lc = match (lower_dir, lower) {
            (Some(l), Some(low)) => low.child(l, name).map(|c| c as u64),
            _ => None,
        };
        let le = lc.and_then(|c| lower.and_then(|l| l.get(c)));
        let mut emit = |out: &mut Listing<DiffEntry>, change, kind, size, check: Option<(Ino, u64)>| {
            let cost = path.len() + 32;
            let at = if used + cost <= max_bytes {
                used += cost;
                out.entries.push(DiffEntry {
                    path: path.clone(),
                    change,
                    kind,
                    size,
                });
                Some(out.entries.len() - 1)
            } else {
                // Full: everything after this is left out too (the answer stays a prefix).
                used = max_bytes;
                if check.is_none() {
                    out.omitted += 1;
                }
                None
            };
            if let Some((ino, idx)) = check {
                compare.push((at, ino, idx));
            }
        };
        if t == WHITEOUT {
            if let (Some(e), true) = (le, inside) {
                emit(&mut out, Change::Deleted, e.kind, e.size, None);
            }
            continue;
        }
        let Some(i) = tree.inodes.get(&t) else { continue };
        if inside {
            match le {
                None => emit(&mut out, Change::Added, i.kind, i.size, None),
                Some(e) if e.kind != i.kind => emit(&mut out, Change::Modified, i.kind, i.size, None),
                Some(e) => {
                    let attrs = e.mode != i.mode & 0o7777 || e.uid != i.uid || e.gid != i.gid;
                    let other = match i.kind {
                        FileKind::File => i.lower != lc || i.size != e.size,
                        FileKind::Symlink => *i.target != *e.target,
                        FileKind::CharDev | FileKind::BlockDev => i.rdev != e.rdev,
                        _ => false,
                    } || (i.kind != FileKind::Dir && i.lower != lc);
                    if attrs || other {
                        emit(&mut out, Change::Modified, i.kind, i.size, None);
                    } else if i.kind == FileKind::File {
                        // Same size and origin: only the contents can tell (read later).
                        emit(&mut out, Change::Modified, i.kind, i.size, lc.map(|c| (t, c)));
                    }
                }
            }
        }
        if i.kind == FileKind::Dir {
            let ld = le.filter(|e| e.kind == FileKind::Dir).and(lc);
            stack.push((i.entries.iter(), ld, path.len()));
        }
    }
    out
}

/// One transaction in the history of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub seq: u64,
    pub time_ns: i64,
    pub path: String,
    pub what: String,
}

/// Names of inodes while replaying (the first name of each): (parent, name).
#[derive(Default)]
struct Names(HashMap<Ino, (Ino, Vec<u8>)>);

impl Names {
    fn of_tree(tree: &Tree) -> Names {
        let mut names = Names::default();
        for (&d, i) in &tree.inodes {
            for (n, t) in i.children() {
                names.0.entry(t).or_insert((d, n.clone()));
            }
        }
        names
    }

    /// The path of `ino`, built once (a walk up to the root or to the template).
    fn path(&self, lower: Option<&Lower>, ino: Ino) -> String {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut cur = ino;
        let mut top: Vec<&[u8]> = Vec::new();
        for _ in 0..=self.0.len() {
            if cur == ROOT {
                break;
            }
            match self.0.get(&cur) {
                Some((p, n)) => {
                    parts.push(n);
                    cur = *p;
                }
                None => {
                    // Still the template's: its path in the template (its parents were
                    // never moved, or it would have been copied up).
                    if let (Some(idx), Some(low)) = (view::lower_idx(cur), lower) {
                        top = low.names_to(idx);
                    }
                    break;
                }
            }
        }
        let mut s = String::new();
        for n in top.iter().chain(parts.iter().rev()) {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(n));
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }

    fn track(&mut self, tree: &Tree, op: &Op) {
        match op {
            Op::Create { parent, name, ino, .. } | Op::CopyUp { parent, name, ino, .. } => {
                self.0.insert(*ino, (*parent, name.clone()));
            }
            Op::Link { ino, parent, name } => {
                self.0.entry(*ino).or_insert((*parent, name.clone()));
            }
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                ..
            } => {
                // After the apply: whatever now sits at each name lives there.
                for (p, n) in [(parent, name), (new_parent, new_name)] {
                    if let Some(t) = tree.lookup(*p, n).filter(|t| *t != WHITEOUT) {
                        self.0.insert(t, (*p, n.clone()));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Where a path lies relative to the asked prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rel {
    /// The prefix or below it.
    Under,
    /// The first k components of the prefix.
    Above(usize),
    Outside,
}

/// Which inodes lie under the prefix, remembered per inode (forgotten when a directory
/// moves): each answer costs a walk up to the nearest remembered ancestor.
struct Prefix {
    parts: Vec<Vec<u8>>,
    memo: HashMap<Ino, Rel>,
}

impl Prefix {
    fn new(prefix: &str) -> Prefix {
        Prefix {
            parts: prefix
                .split('/')
                .filter(|c| !c.is_empty())
                .map(|c| c.as_bytes().to_vec())
                .collect(),
            memo: HashMap::new(),
        }
    }

    fn root(&self) -> Rel {
        if self.parts.is_empty() {
            Rel::Under
        } else {
            Rel::Above(0)
        }
    }

    fn step(&self, r: Rel, name: &[u8]) -> Rel {
        match r {
            Rel::Above(k) if self.parts.get(k).is_some_and(|p| p == name) => {
                if k + 1 == self.parts.len() {
                    Rel::Under
                } else {
                    Rel::Above(k + 1)
                }
            }
            Rel::Above(_) => Rel::Outside,
            r => r,
        }
    }

    fn of(&mut self, names: &Names, lower: Option<&Lower>, ino: Ino) -> Rel {
        let mut chain: Vec<(Ino, &[u8])> = Vec::new();
        let mut cur = ino;
        let mut r = loop {
            if let Some(r) = self.memo.get(&cur) {
                break *r;
            }
            if cur == ROOT {
                break self.root();
            }
            if chain.len() > names.0.len() {
                break Rel::Outside; // a cycle: cannot happen in a valid tree
            }
            match names.0.get(&cur) {
                Some((p, n)) => {
                    chain.push((cur, n));
                    cur = *p;
                }
                None => {
                    let mut r = self.root();
                    if let (Some(idx), Some(low)) = (view::lower_idx(cur), lower) {
                        for n in low.names_to(idx) {
                            r = self.step(r, n);
                        }
                    }
                    self.memo.insert(cur, r);
                    break r;
                }
            }
        };
        for (i, n) in chain.into_iter().rev() {
            r = self.step(r, n);
            self.memo.insert(i, r);
        }
        r
    }

    fn child(&mut self, names: &Names, lower: Option<&Lower>, parent: Ino, name: &[u8]) -> Rel {
        let r = self.of(names, lower, parent);
        self.step(r, name)
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::Create { kind, mode, target, .. } => match kind {
            FileKind::Symlink => format!("create symlink -> {}", shown(&String::from_utf8_lossy(target))),
            k => format!("create {} mode {:04o}", kind_name(*k), mode),
        },
        Op::CopyUp { .. } => "copy-up from template".into(),
        Op::Link { .. } => "hard link".into(),
        Op::Unlink { .. } => "delete".into(),
        Op::Rename { .. } => "rename".into(),
        Op::Write { offset, data, .. } => format!("write {} bytes at {offset}", data.len()),
        Op::Truncate { size, .. } => format!("truncate to {size} bytes"),
        Op::Fallocate { offset, len, mode, .. } => format!("fallocate {len} bytes at {offset} (mode {mode:#x})"),
        Op::SetAttr {
            mode,
            uid,
            gid,
            atime_ns,
            mtime_ns,
            ..
        } => {
            let mut v = Vec::new();
            if let Some(m) = mode {
                v.push(format!("mode {m:04o}"));
            }
            if let Some(u) = uid {
                v.push(format!("owner {u}"));
            }
            if let Some(g) = gid {
                v.push(format!("group {g}"));
            }
            if atime_ns.is_some() || mtime_ns.is_some() {
                v.push("times".into());
            }
            format!("set {}", v.join(", "))
        }
        Op::SetXattr { name, .. } => format!("set xattr {}", shown(&String::from_utf8_lossy(name))),
        Op::RemoveXattr { name, .. } => format!("remove xattr {}", shown(&String::from_utf8_lossy(name))),
    }
}

fn corrupt(vol: &Volume, reason: String) -> VolumeError {
    VolumeError::Corrupt {
        volume: vol.name().to_string(),
        reason,
    }
}

/// The transactions that touched `path` (or anything under it), oldest first, at most
/// about `max_bytes` of paths and descriptions. The log is read one transaction at a
/// time; paths are built only for what is reported.
pub fn history(vol: &Volume, path: &str, max_bytes: usize) -> Result<Listing<HistoryEntry>, VolumeError> {
    let path = norm(path);
    let _h = vol.history_guard();
    let base = vol.base_meta();
    let reader = vol.log_reader()?;
    let lower = vol.lower();
    let mut tree = vol.base_tree()?;
    let mut names = Names::of_tree(&tree);
    let mut pre = Prefix::new(&path);
    let mut out = Listing::default();
    let mut used = 0usize;
    reader.for_each::<VolumeError>(base.seq + 1, u64::MAX, |tx, _| {
        // Unlinks and renames are named as they were before; the rest as they are after.
        // Paths are built only while the answer has room.
        let room = used < max_bytes;
        let mut hit = match &tx.op {
            Op::Unlink { parent, name, .. } if pre.child(&names, lower, *parent, name) == Rel::Under => {
                Some(room.then(|| (join(&names.path(lower, *parent), name), None)))
            }
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                ..
            } => {
                let from = pre.child(&names, lower, *parent, name) == Rel::Under;
                let to = pre.child(&names, lower, *new_parent, new_name) == Rel::Under;
                (from || to).then(|| {
                    room.then(|| {
                        let f = join(&names.path(lower, *parent), name);
                        let t = join(&names.path(lower, *new_parent), new_name);
                        let what = format!("rename {} -> {}", shown(&f), shown(&t));
                        (if from { f } else { t }, Some(what))
                    })
                })
            }
            _ => None,
        };
        let (dir_moved, moved) = match &tx.op {
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                ..
            } => {
                let a = tree.lookup(*parent, name);
                let b = tree.lookup(*new_parent, new_name);
                let is_dir = |t: Option<Ino>| {
                    t.and_then(|t| tree.inodes.get(&t))
                        .is_some_and(|i| i.kind == FileKind::Dir)
                };
                (is_dir(a) || is_dir(b), [a, b])
            }
            _ => (false, [None, None]),
        };
        tree.apply(&tx)
            .map_err(|e| corrupt(vol, format!("transaction {} does not apply: {e}", tx.seq)))?;
        names.track(&tree, &tx.op);
        if dir_moved {
            pre.memo.clear();
        } else {
            for m in moved.into_iter().flatten() {
                pre.memo.remove(&m);
            }
        }
        if !matches!(tx.op, Op::Unlink { .. } | Op::Rename { .. }) {
            if let Some(i) = op_ino(&tx.op) {
                if pre.of(&names, lower, i) == Rel::Under {
                    hit = Some(room.then(|| (names.path(lower, i), None)));
                }
            }
        }
        let Some(report) = hit else { return Ok(true) };
        let Some((p, what)) = report else {
            out.omitted += 1;
            return Ok(true);
        };
        let what = what.unwrap_or_else(|| describe(&tx.op));
        let cost = p.len() + what.len() + 48;
        if used + cost > max_bytes {
            used = max_bytes;
            out.omitted += 1;
            return Ok(true);
        }
        used += cost;
        out.entries.push(HistoryEntry {
            seq: tx.seq,
            time_ns: tx.time_ns,
            path: p,
            what,
        });
        Ok(true)
    })?;
    Ok(out)
}

/// The last transaction at or before `time_ns` (0: none after the base is).
pub fn seq_at(vol: &Volume, time_ns: i64) -> Result<u64, VolumeError> {
    let _h = vol.history_guard();
    let base = vol.base_meta();
    let mut last = 0;
    vol.log_reader()?
        .for_each::<VolumeError>(base.seq + 1, u64::MAX, |tx, _| {
            if tx.time_ns > time_ns {
                return Ok(false);
            }
            last = tx.seq;
            Ok(true)
        })?;
    Ok(last)
}

#[cfg(test)]
mod walk_tests {
    use super::*;
    use crate::tx::Tx;

    fn chain(depth: u64) -> (Tree, Vec<Tx>) {
        let mut t = Tree::new(0o755, 0, 0);
        let mut txs = Vec::new();
        for i in 0..depth {
            let tx = Tx {
                epoch: 1,
                seq: i + 1,
                time_ns: 0,
                op: Op::Create {
                    parent: if i == 0 { ROOT } else { i + 1 },
                    name: b"d".to_vec(),
                    ino: i + 2,
                    kind: FileKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    rdev: 0,
                    target: vec![],
                },
            };
            t.apply(&tx).unwrap();
            txs.push(tx);
        }
        (t, txs)
    }

    #[test]
    fn a_deep_diff_is_walked_without_recursion_and_cut_to_the_bound() {
        let (t, _) = chain(50_000);
        let mut cmp = Vec::new();
        let all = walk_diff(&t, None, "/", usize::MAX, &mut cmp);
        assert_eq!(all.entries.len(), 50_000);
        assert_eq!(all.entries[2].path, "/d/d/d");
        let cut = walk_diff(&t, None, "/", 1 << 20, &mut cmp);
        assert!(!cut.entries.is_empty() && cut.entries.len() < 50_000);
        assert_eq!(cut.entries.len() as u64 + cut.omitted, 50_000);
        let bytes: usize = cut.entries.iter().map(|e| e.path.len()).sum();
        assert!(bytes <= 1 << 20, "{bytes}");
        // A prefix: only what lies under it, and nothing beside it is walked for nothing.
        let under3 = walk_diff(&t, None, "/d/d/d", usize::MAX, &mut cmp);
        assert_eq!(under3.entries.len(), 50_000 - 2);
        assert_eq!(under3.entries[0].path, "/d/d/d");
        assert!(walk_diff(&t, None, "/x", usize::MAX, &mut cmp).entries.is_empty());
        assert!(cmp.is_empty());
    }

    #[test]
    fn prefixes_follow_renames_of_directories() {
        let (mut t, txs) = chain(3);
        let mut names = Names::of_tree(&Tree::new(0o755, 0, 0));
        for tx in &txs {
            names.track(&t, &tx.op);
        }
        let mut pre = Prefix::new("/d/d");
        assert_eq!(pre.of(&names, None, 4), Rel::Under, "/d/d/d");
        assert_eq!(pre.of(&names, None, 2), Rel::Above(1), "/d");
        assert_eq!(names.path(None, 4), "/d/d/d");
        // Move /d/d to /e: its subtree leaves the prefix.
        let mv = Op::Rename {
            parent: 2,
            name: b"d".to_vec(),
            new_parent: ROOT,
            new_name: b"e".to_vec(),
            flags: 0,
            whiteout: false,
        };
        t.apply(&Tx {
            epoch: 1,
            seq: 4,
            time_ns: 0,
            op: mv.clone(),
        })
        .unwrap();
        names.track(&t, &mv);
        pre.memo.clear();
        assert_eq!(pre.of(&names, None, 4), Rel::Outside);
        assert_eq!(names.path(None, 4), "/e/d");
        assert_eq!(Prefix::new("/").of(&names, None, 4), Rel::Under);
    }
}
