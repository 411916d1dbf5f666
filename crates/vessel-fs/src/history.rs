//! The txlog as a time machine: what a VE changed relative to its template, the history
//! of one path, and bringing a path (or the whole tree) back to an earlier point. A revert
//! is itself a series of ordinary transactions, so it is replicated and can be undone.

use crate::lower::Lower;
use crate::tree::{Tree, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino, Op, Tx};
use crate::view;
use crate::volume::{op_ino, SetAttr, Volume, VolumeError};
use std::collections::{HashMap, HashSet};
use std::io::Read;

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

/// Normalize a user-given path to "/a/b".
pub fn norm(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    format!("/{}", parts.join("/"))
}

fn same_content(vol: &Volume, ino: Ino, low: &Lower, idx: u64) -> bool {
    let a = std::fs::File::open(vol.dir().join("data").join(crate::volume::data_name(ino)));
    let b = low.open(idx);
    let (Ok(mut a), Ok(mut b)) = (a, b) else { return false };
    let (mut x, mut y) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let (n, m) = (read_full(&mut a, &mut x), read_full(&mut b, &mut y));
        if n != m || x[..n] != y[..n] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// What the VE changed relative to its template, under `prefix` ("/" for everything).
pub fn diff(vol: &Volume, prefix: &str) -> Vec<DiffEntry> {
    let prefix = norm(prefix);
    let mut out = Vec::new();
    vol.with_tree(|tree, lower| {
        walk_diff(vol, tree, lower, ROOT, "", lower.map(|_| 0), &mut out);
    });
    out.retain(|e| under(&e.path, &prefix));
    out
}

fn walk_diff(
    vol: &Volume,
    tree: &Tree,
    lower: Option<&Lower>,
    dir: Ino,
    path: &str,
    lower_dir: Option<u64>,
    out: &mut Vec<DiffEntry>,
) {
    let Some(d) = tree.inodes.get(&dir) else { return };
    for (name, &t) in &d.entries {
        let p = join(path, name);
        let lc = match (lower_dir, lower) {
            (Some(l), Some(low)) => low.child(l, name).map(|c| c as u64),
            _ => None,
        };
        let le = lc.and_then(|c| lower.and_then(|l| l.get(c)));
        if t == WHITEOUT {
            if let Some(e) = le {
                out.push(DiffEntry {
                    path: p,
                    change: Change::Deleted,
                    kind: e.kind,
                    size: e.size,
                });
            }
            continue;
        }
        let Some(i) = tree.inodes.get(&t) else { continue };
        let change = match le {
            None => Some(Change::Added),
            Some(e) if e.kind != i.kind => Some(Change::Modified),
            Some(e) => {
                let attrs = e.mode != i.mode & 0o7777 || e.uid != i.uid || e.gid != i.gid;
                let content = match i.kind {
                    FileKind::File => {
                        i.lower != lc
                            || i.size != e.size
                            || !lower.is_some_and(|l| same_content(vol, t, l, lc.unwrap_or(0)))
                    }
                    FileKind::Symlink => *i.target != *e.target,
                    FileKind::CharDev | FileKind::BlockDev => i.rdev != e.rdev,
                    _ => false,
                };
                (attrs || content || (i.kind != FileKind::Dir && i.lower != lc)).then_some(Change::Modified)
            }
        };
        if let Some(c) = change {
            out.push(DiffEntry {
                path: p.clone(),
                change: c,
                kind: i.kind,
                size: i.size,
            });
        }
        if i.kind == FileKind::Dir {
            let ld = le.filter(|e| e.kind == FileKind::Dir).and(lc);
            walk_diff(vol, tree, lower, t, &p, ld, out);
        }
    }
}

/// One transaction in the history of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub seq: u64,
    pub time_ns: i64,
    pub path: String,
    pub what: String,
}

/// Paths of inodes while replaying (first name of each).
#[derive(Default)]
struct Names(HashMap<Ino, (Ino, Vec<u8>)>);

impl Names {
    fn path(&self, tree: &Tree, lower: Option<&Lower>, ino: Ino) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        for _ in 0..4096 {
            if cur == ROOT {
                break;
            }
            match self.0.get(&cur) {
                Some((p, n)) => {
                    parts.push(n.clone());
                    cur = *p;
                }
                None => {
                    // Still the template's: its path in the template (its parents were
                    // never moved, or it would have been copied up).
                    if let (Some(idx), Some(low)) = (view::lower_idx(cur), lower) {
                        let rel = low.rel_path(idx);
                        let mut s = format!("/{}", rel.display());
                        for n in parts.iter().rev() {
                            s = join(&s, n);
                        }
                        return s;
                    }
                    let _ = tree;
                    break;
                }
            }
        }
        let mut s = String::from("/");
        for n in parts.iter().rev() {
            s = join(&s, n);
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

fn describe(op: &Op) -> String {
    match op {
        Op::Create { kind, mode, target, .. } => match kind {
            FileKind::Symlink => format!("create symlink -> {}", String::from_utf8_lossy(target)),
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
        Op::SetXattr { name, .. } => format!("set xattr {}", String::from_utf8_lossy(name)),
        Op::RemoveXattr { name, .. } => format!("remove xattr {}", String::from_utf8_lossy(name)),
    }
}

/// Replay `txs` over `start` (the base tree) up to and including `upto`.
fn replay<'a>(
    start: Tree,
    txs: &'a [Tx],
    upto: u64,
    mut each: impl FnMut(&Tree, &Names, &'a Tx, bool),
) -> Result<(Tree, Names), String> {
    let mut tree = start;
    let mut names = Names::default();
    for (&d, i) in &tree.inodes {
        for (n, t) in i.children() {
            names.0.entry(t).or_insert((d, n.clone()));
        }
    }
    for tx in txs.iter().take_while(|t| t.seq <= upto) {
        each(&tree, &names, tx, true);
        tree.apply(tx)
            .map_err(|e| format!("transaction {} does not apply: {e}", tx.seq))?;
        names.track(&tree, &tx.op);
        each(&tree, &names, tx, false);
    }
    Ok((tree, names))
}

fn corrupt(vol: &Volume, reason: String) -> VolumeError {
    VolumeError::Corrupt {
        volume: vol.name().to_string(),
        reason,
    }
}

/// The transactions that touched `path` (or anything under it), oldest first.
pub fn history(vol: &Volume, path: &str) -> Result<Vec<HistoryEntry>, VolumeError> {
    let path = norm(path);
    let _h = vol.history_guard();
    let base = vol.base_meta();
    let txs = vol.read_log(base.seq + 1)?;
    let lower = vol.lower();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    replay(vol.base_tree()?, &txs, u64::MAX, |tree, names, tx, before| {
        let mut paths = Vec::new();
        match &tx.op {
            Op::Unlink { parent, name, .. } if before => paths.push(join(&names.path(tree, lower, *parent), name)),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                ..
            } if before => {
                let from = join(&names.path(tree, lower, *parent), name);
                let to = join(&names.path(tree, lower, *new_parent), new_name);
                paths.push(from);
                paths.push(to);
            }
            op if !before && !matches!(op, Op::Unlink { .. } | Op::Rename { .. }) => {
                if let Some(i) = op_ino(op) {
                    paths.push(names.path(tree, lower, i));
                }
            }
            _ => {}
        }
        if let Some(p) = paths.iter().find(|p| under(p, &path)) {
            if seen.insert(tx.seq) {
                let what = match &tx.op {
                    Op::Rename { .. } => format!("rename {} -> {}", paths[0], paths[1]),
                    op => describe(op),
                };
                out.push(HistoryEntry {
                    seq: tx.seq,
                    time_ns: tx.time_ns,
                    path: p.clone(),
                    what,
                });
            }
        }
    })
    .map_err(|e| corrupt(vol, e))?;
    Ok(out)
}

/// The last seq at or before `time_ns` (0: before the first transaction).
pub fn seq_at(txs: &[Tx], time_ns: i64) -> u64 {
    txs.iter()
        .take_while(|t| t.time_ns <= time_ns)
        .last()
        .map_or(0, |t| t.seq)
}

/// Where a revert goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The state right after this transaction (0 = the pristine template).
    Seq(u64),
}

/// Contents of file `ino` as of `seq`, rebuilt from the base (or the template) and the log.
fn content_at(vol: &Volume, base: &Tree, txs: &[Tx], ino: Ino, seq: u64) -> Result<Vec<u8>, VolumeError> {
    let mut data: Vec<u8> = Vec::new();
    let mut origin_found = false;
    if seq > 0 && base.inodes.get(&ino).is_some_and(|i| i.kind == FileKind::File) {
        data = vol.base_content(ino).map_err(|source| VolumeError::Io {
            volume: vol.name().to_string(),
            what: "read the base of",
            path: vol.dir().join("base"),
            source,
        })?;
        origin_found = true;
    }
    for tx in txs.iter().take_while(|t| t.seq <= seq) {
        match &tx.op {
            Op::Create { ino: i, .. } if *i == ino => {
                data.clear();
                origin_found = true;
            }
            Op::CopyUp { ino: i, lower, .. } if *i == ino => {
                data = read_lower(vol, *lower)?;
                origin_found = true;
            }
            Op::Write {
                ino: i,
                offset,
                data: d,
            } if *i == ino => {
                let end = *offset as usize + d.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[*offset as usize..end].copy_from_slice(d);
            }
            Op::Truncate { ino: i, size } if *i == ino => data.resize(*size as usize, 0),
            Op::Fallocate {
                ino: i,
                mode,
                offset,
                len,
            } if *i == ino => {
                let end = (*offset + *len) as usize;
                if *mode & 0x10 != 0 {
                    // Zero range: zeros, growing the file unless KEEP_SIZE.
                    if *mode & 0x01 == 0 && data.len() < end {
                        data.resize(end, 0);
                    }
                    let e = end.min(data.len());
                    if (*offset as usize) < e {
                        data[*offset as usize..e].fill(0);
                    }
                } else if *mode & 0x02 != 0 {
                    // Punch hole: zeros within the current size.
                    let e = end.min(data.len());
                    if (*offset as usize) < e {
                        data[*offset as usize..e].fill(0);
                    }
                } else if *mode & 0x01 == 0 && data.len() < end {
                    data.resize(end, 0);
                }
            }
            _ => {}
        }
    }
    if !origin_found {
        if let Some(idx) = view::lower_idx(ino) {
            return read_lower(vol, idx);
        }
        return Err(corrupt(
            vol,
            format!("the history of file {ino} does not reach back to its creation"),
        ));
    }
    Ok(data)
}

fn read_lower(vol: &Volume, idx: u64) -> Result<Vec<u8>, VolumeError> {
    let low = vol.lower().ok_or_else(|| corrupt(vol, "no template layer".into()))?;
    let mut v = Vec::new();
    low.open(idx)
        .and_then(|mut f| f.read_to_end(&mut v))
        .map_err(|source| VolumeError::Io {
            volume: vol.name().to_string(),
            what: "read template file",
            path: low.path(idx),
            source,
        })?;
    Ok(v)
}

fn op_err(vol: &Volume, what: &str, path: &str, e: i32) -> VolumeError {
    VolumeError::Op(
        format!("{what} {path}: {}", std::io::Error::from_raw_os_error(e)),
        vol.name().to_string(),
    )
}

/// What a revert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevertReport {
    /// Paths written, created or removed.
    pub changed: Vec<String>,
}

/// Bring `path` (a file or a whole directory tree) back to its state as of `target`, on
/// the live volume (the VE may be running).
pub fn revert(vol: &Volume, path: &str, target: Target) -> Result<RevertReport, VolumeError> {
    let path = norm(path);
    let _h = vol.history_guard();
    let base_meta = vol.base_meta();
    let txs = vol.read_log(base_meta.seq + 1)?;
    let Target::Seq(seq) = target;
    let lower = vol.lower();
    let base = vol.base_tree()?;
    let old = if seq == 0 {
        // The pristine template.
        Volume::initial_tree(lower.is_some())
    } else if seq < base_meta.seq {
        return Err(VolumeError::Op(
            format!(
                "history before {} was compacted (older than the VE's retention); the oldest point is {}",
                base_meta.seq, base_meta.time_ns
            ),
            vol.name().to_string(),
        ));
    } else {
        replay(base.clone(), &txs, seq, |_, _, _, _| {})
            .map_err(|e| corrupt(vol, e))?
            .0
    };
    // Inodes changed after the target point (others are as they were).
    let mut touched: HashSet<Ino> = HashSet::new();
    if seq < base_meta.seq {
        // Changes between the target and the base are compacted: compare everything private.
        touched.extend(vol.with_tree(|t, _| t.inodes.keys().copied().collect::<Vec<_>>()));
    }
    for tx in txs.iter().filter(|t| t.seq > seq) {
        if let Some(i) = op_ino(&tx.op) {
            touched.insert(i);
        }
    }
    let mut rep = RevertReport::default();
    let old_ino = view::resolve(&old, lower, path.as_bytes()).ok();
    let r = Reverter {
        vol,
        txs: &txs,
        seq,
        old: &old,
        base: &base,
        touched: &touched,
    };
    if path == "/" {
        r.dir_children(ROOT, ROOT, "/", &mut rep)?;
        r.attrs(ROOT, ROOT, "/")?;
        return Ok(rep);
    }
    let (parent_path, name) = path.rsplit_once('/').expect("normalized");
    let parent_now = vol
        .with_tree(|t, l| view::resolve(t, l, parent_path.as_bytes()))
        .map_err(|e| op_err(vol, "find", parent_path, e))?;
    r.entry(parent_now, name.as_bytes(), old_ino, &path, &mut rep)?;
    Ok(rep)
}

struct Reverter<'a> {
    vol: &'a Volume,
    txs: &'a [Tx],
    seq: u64,
    old: &'a Tree,
    base: &'a Tree,
    touched: &'a HashSet<Ino>,
}

impl Reverter<'_> {
    fn lower(&self) -> Option<&Lower> {
        self.vol.lower()
    }

    fn now(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.vol.with_tree(|t, l| view::lookup(t, l, parent, name)).ok()
    }

    fn remove_all(&self, parent: Ino, name: &[u8], path: &str, rep: &mut RevertReport) -> Result<(), VolumeError> {
        if self.now(parent, name).is_none() {
            return Ok(());
        }
        self.vol
            .remove_tree(parent, name)
            .map_err(|e| op_err(self.vol, "remove", path, e))?;
        rep.changed.push(path.to_string());
        Ok(())
    }

    /// Make entry `name` of live directory `parent` what `old_ino` was (None: absent).
    fn entry(
        &self,
        parent: Ino,
        name: &[u8],
        old_ino: Option<Ino>,
        path: &str,
        rep: &mut RevertReport,
    ) -> Result<(), VolumeError> {
        let now = self.now(parent, name);
        let Some(oi) = old_ino else {
            return self.remove_all(parent, name, path, rep);
        };
        let oa = view::attr(self.old, self.lower(), oi).map_err(|e| op_err(self.vol, "read old state of", path, e))?;
        // Same inode, untouched since: nothing to do below files; directories recurse.
        if now == Some(oi) && !self.touched.contains(&oi) && oa.kind != FileKind::Dir {
            return Ok(());
        }
        let now_kind = now.and_then(|n| self.vol.getattr(n).ok()).map(|a| a.kind);
        let target: &[u8] = match view::node(self.old, self.lower(), oi) {
            Some(view::Node::Private(i)) => &i.target,
            _ => &[],
        };
        let lower_target;
        let target = if target.is_empty() && oa.kind == FileKind::Symlink {
            lower_target = view::lower_idx(oi)
                .and_then(|i| self.lower().and_then(|l| l.get(i)))
                .map(|e| e.target.to_vec())
                .unwrap_or_default();
            &lower_target[..]
        } else {
            target
        };
        let keep = match (now_kind, oa.kind) {
            (Some(FileKind::Dir), FileKind::Dir) => true,
            (Some(FileKind::File), FileKind::File) => true,
            (Some(FileKind::Symlink), FileKind::Symlink) => {
                now.and_then(|n| self.vol.readlink(n).ok()).is_some_and(|t| t == target)
            }
            _ => false,
        };
        if now.is_some() && !keep {
            self.remove_all(parent, name, path, rep)?;
        }
        let ino = match (keep, now) {
            (true, Some(n)) => n,
            _ => {
                let a = self
                    .vol
                    .mknod(parent, name, oa.kind, oa.perm, oa.uid, oa.gid, oa.rdev, target)
                    .map_err(|e| op_err(self.vol, "create", path, e))?;
                rep.changed.push(path.to_string());
                a.ino
            }
        };
        match oa.kind {
            FileKind::File => {
                let content = content_at(self.vol, self.base, self.txs, oi, self.seq)?;
                let same = self.vol.getattr(ino).is_ok_and(|a| a.size == content.len() as u64)
                    && content.chunks(1 << 20).enumerate().all(|(k, c)| {
                        self.vol
                            .read(ino, (k << 20) as u64, c.len() as u32)
                            .is_ok_and(|d| d == c)
                    });
                if !same {
                    self.vol
                        .open_file(ino, true, true)
                        .map_err(|e| op_err(self.vol, "open", path, e))?;
                    let res = content
                        .chunks(1 << 20)
                        .enumerate()
                        .try_for_each(|(k, c)| self.vol.write(ino, (k << 20) as u64, c).map(|_| ()));
                    self.vol.release(ino);
                    res.map_err(|e| op_err(self.vol, "write", path, e))?;
                    if !rep.changed.iter().any(|p| p == path) {
                        rep.changed.push(path.to_string());
                    }
                }
            }
            FileKind::Dir => self.dir_children(oi, ino, path, rep)?,
            _ => {}
        }
        self.attrs(oi, ino, path)
    }

    fn dir_children(&self, old_dir: Ino, dir: Ino, path: &str, rep: &mut RevertReport) -> Result<(), VolumeError> {
        let old_kids =
            view::readdir(self.old, self.lower(), old_dir).map_err(|e| op_err(self.vol, "list old", path, e))?;
        let (_, now_kids) = self.vol.readdir(dir).map_err(|e| op_err(self.vol, "list", path, e))?;
        let old_names: HashSet<&[u8]> = old_kids.iter().map(|(n, _, _)| n.as_slice()).collect();
        for (n, _, _) in &now_kids {
            if !old_names.contains(n.as_slice()) {
                self.remove_all(dir, n, &join(path, n), rep)?;
            }
        }
        for (n, oi, _) in &old_kids {
            self.entry(dir, n, Some(*oi), &join(path, n), rep)?;
        }
        Ok(())
    }

    fn attrs(&self, old: Ino, ino: Ino, path: &str) -> Result<(), VolumeError> {
        let (Ok(o), Ok(n)) = (view::attr(self.old, self.lower(), old), self.vol.getattr(ino)) else {
            return Ok(());
        };
        if o.kind == FileKind::Symlink {
            return Ok(());
        }
        let mut s = SetAttr::default();
        if o.perm != n.perm {
            s.mode = Some(o.perm);
        }
        if o.uid != n.uid {
            s.uid = Some(o.uid);
        }
        if o.gid != n.gid {
            s.gid = Some(o.gid);
        }
        if o.mtime_ns != n.mtime_ns {
            s.mtime_ns = Some(o.mtime_ns);
            s.atime_ns = Some(o.atime_ns);
        }
        if s.mode.is_some() || s.uid.is_some() || s.gid.is_some() || s.mtime_ns.is_some() {
            self.vol
                .setattr(ino, &s)
                .map_err(|e| op_err(self.vol, "set attributes of", path, e))?;
        }
        Ok(())
    }
}
