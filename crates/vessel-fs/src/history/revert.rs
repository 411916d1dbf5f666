//! Bringing a path back to an earlier point, on the live volume, as ordinary
//! transactions. The tree as of the target is rebuilt by replaying the log (one
//! transaction at a time); the walk over old and live trees uses a work list, so a tree of
//! any depth costs no stack; paths are kept as (parent, name) and spelled out only for
//! the report and for messages.

use super::content::{content_at, restore};
use super::{corrupt, norm, shown, ANSWER_BYTES};
use crate::lower::Lower;
use crate::tree::{Tree, ROOT};
use crate::tx::{FileKind, Ino, Op};
use crate::txlog::{LogReader, RecordPos};
use crate::view;
use crate::volume::{op_ino, SetAttr, Volume, VolumeError};
use std::collections::{HashMap, HashSet};

/// Where a revert goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The state right after this transaction (0 = the pristine template).
    Seq(u64),
}

/// What a revert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevertReport {
    /// Paths written, created or removed (at most about [`ANSWER_BYTES`] of them).
    pub changed: Vec<String>,
    /// Changed paths left out of `changed`.
    pub omitted: u64,
}

fn op_err(vol: &Volume, what: &str, path: &str, e: i32) -> VolumeError {
    VolumeError::Op(
        format!("{what} {}: {}", shown(path), std::io::Error::from_raw_os_error(e)),
        vol.name().to_string(),
    )
}

/// The transactions that write contents, by file, for the files of `old` under `top`.
fn content_index(
    old: &Tree,
    top: Option<Ino>,
    reader: &LogReader,
    from: u64,
    seq: u64,
) -> Result<HashMap<Ino, Vec<RecordPos>>, VolumeError> {
    let mut files: HashSet<Ino> = HashSet::new();
    let mut work: Vec<Ino> = top.into_iter().collect();
    while let Some(i) = work.pop() {
        match old.inodes.get(&i) {
            Some(n) if n.kind == FileKind::File => {
                files.insert(i);
            }
            Some(n) if n.kind == FileKind::Dir => work.extend(n.children().map(|(_, t)| t)),
            _ => {}
        }
    }
    let mut index: HashMap<Ino, Vec<RecordPos>> = HashMap::new();
    if files.is_empty() || seq < from {
        return Ok(index);
    }
    reader.for_each::<VolumeError>(from, seq, |tx, pos| {
        if let Op::Create { ino, .. }
        | Op::CopyUp { ino, .. }
        | Op::Write { ino, .. }
        | Op::Truncate { ino, .. }
        | Op::Fallocate { ino, .. } = tx.op
        {
            if files.contains(&ino) {
                index.entry(ino).or_default().push(pos);
            }
        }
        Ok(true)
    })?;
    Ok(index)
}

/// Bring `path` (a file or a whole directory tree) back to its state as of `target`, on
/// the live volume (the VE may be running).
pub fn revert(vol: &Volume, path: &str, target: Target) -> Result<RevertReport, VolumeError> {
    let path = norm(path);
    let _h = vol.history_guard();
    let base_meta = vol.base_meta();
    let reader = vol.log_reader()?;
    let Target::Seq(seq) = target;
    let lower = vol.lower();
    let base = vol.base_tree()?;
    if seq > 0 && seq < base_meta.seq {
        return Err(VolumeError::Op(
            format!(
                "history before {} was compacted (older than the VE's retention); the oldest point is {}",
                base_meta.seq, base_meta.time_ns
            ),
            vol.name().to_string(),
        ));
    }
    // The tree as of the target, and the inodes changed after it (others are as they were).
    let mut old = if seq == 0 {
        Volume::initial_tree(lower.is_some())
    } else {
        base.clone()
    };
    let mut touched: HashSet<Ino> = HashSet::new();
    if seq < base_meta.seq {
        // Changes between the target and the base are compacted: compare everything private.
        touched.extend(vol.with_tree(|t, _| t.inodes.keys().copied().collect::<Vec<_>>()));
    }
    reader.for_each::<VolumeError>(base_meta.seq + 1, u64::MAX, |tx, _| {
        if tx.seq <= seq {
            old.apply(&tx)
                .map_err(|e| corrupt(vol, format!("transaction {} does not apply: {e}", tx.seq)))?;
        } else {
            touched.extend(op_ino(&tx.op));
        }
        Ok(true)
    })?;
    let old_ino = view::resolve(&old, lower, path.as_bytes()).ok();
    let index = content_index(&old, old_ino, &reader, base_meta.seq + 1, seq)?;
    let mut r = Reverter {
        vol,
        reader: &reader,
        seq,
        old: &old,
        base: &base,
        touched: &touched,
        index: &index,
        names: Vec::new(),
        report: RevertReport::default(),
        used: 0,
    };
    let top = r.name(None, path.trim_start_matches('/').as_bytes());
    if path == "/" {
        r.run(vec![Work::Children {
            old: ROOT,
            dir: ROOT,
            at: top,
        }])?;
        r.attrs(ROOT, ROOT, top)?;
        return Ok(r.report);
    }
    let (parent_path, name) = path.rsplit_once('/').expect("normalized");
    let parent_now = vol
        .with_tree(|t, l| view::resolve(t, l, parent_path.as_bytes()))
        .map_err(|e| op_err(vol, "find", parent_path, e))?;
    r.run(vec![Work::Entry {
        parent: parent_now,
        name: name.as_bytes().to_vec(),
        old: old_ino,
        at: top,
    }])?;
    Ok(r.report)
}

/// A step of the walk. `at` names the path (an index into the reverter's names).
enum Work {
    /// Make entry `name` of live directory `parent` what `old` was (None: absent).
    Entry {
        parent: Ino,
        name: Vec<u8>,
        old: Option<Ino>,
        at: u32,
    },
    /// Make the entries of live directory `dir` those of old directory `old`.
    Children { old: Ino, dir: Ino, at: u32 },
    /// Then its attributes (after its entries, which change its times).
    Attrs { old: Ino, ino: Ino, at: u32 },
}

struct Reverter<'a> {
    vol: &'a Volume,
    reader: &'a LogReader,
    seq: u64,
    old: &'a Tree,
    base: &'a Tree,
    touched: &'a HashSet<Ino>,
    index: &'a HashMap<Ino, Vec<RecordPos>>,
    /// Paths as (parent name index, name, length of the whole path).
    names: Vec<(u32, Vec<u8>, usize)>,
    report: RevertReport,
    used: usize,
}

const NO_PARENT: u32 = u32::MAX;

impl Reverter<'_> {
    fn lower(&self) -> Option<&Lower> {
        self.vol.lower()
    }

    /// Remember a path: `name` below the path `parent` (None: below the root).
    fn name(&mut self, parent: Option<u32>, name: &[u8]) -> u32 {
        let (p, plen) = match parent {
            Some(p) => (p, self.names[p as usize].2),
            None => (NO_PARENT, 0),
        };
        self.names.push((p, name.to_vec(), plen + 1 + name.len()));
        (self.names.len() - 1) as u32
    }

    fn path(&self, at: u32) -> String {
        let mut parts = Vec::new();
        let mut i = at;
        while i != NO_PARENT {
            let (p, n, _) = &self.names[i as usize];
            if !n.is_empty() {
                parts.push(&n[..]);
            }
            i = *p;
        }
        let mut s = String::new();
        for n in parts.iter().rev() {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(n));
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }

    fn changed(&mut self, at: u32) {
        let len = self.names[at as usize].2;
        if self.used + len + 8 > ANSWER_BYTES {
            self.used = ANSWER_BYTES;
            self.report.omitted += 1;
            return;
        }
        self.used += len + 8;
        let p = self.path(at);
        self.report.changed.push(p);
    }

    fn now(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.vol.with_tree(|t, l| view::lookup(t, l, parent, name)).ok()
    }

    fn remove_all(&mut self, parent: Ino, name: &[u8], at: u32) -> Result<(), VolumeError> {
        if self.now(parent, name).is_none() {
            return Ok(());
        }
        self.vol
            .remove_tree(parent, name)
            .map_err(|e| op_err(self.vol, "remove", &self.path(at), e))?;
        self.changed(at);
        Ok(())
    }

    fn run(&mut self, mut work: Vec<Work>) -> Result<(), VolumeError> {
        while let Some(w) = work.pop() {
            match w {
                Work::Entry { parent, name, old, at } => self.entry(parent, &name, old, at, &mut work)?,
                Work::Children { old, dir, at } => self.children(old, dir, at, &mut work)?,
                Work::Attrs { old, ino, at } => self.attrs(old, ino, at)?,
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        parent: Ino,
        name: &[u8],
        old_ino: Option<Ino>,
        at: u32,
        work: &mut Vec<Work>,
    ) -> Result<(), VolumeError> {
        let now = self.now(parent, name);
        let Some(oi) = old_ino else {
            return self.remove_all(parent, name, at);
        };
        let oa = view::attr(self.old, self.lower(), oi)
            .map_err(|e| op_err(self.vol, "read old state of", &self.path(at), e))?;
        // Same inode, untouched since: nothing to do below files; directories go on.
        if now == Some(oi) && !self.touched.contains(&oi) && oa.kind != FileKind::Dir {
            return Ok(());
        }
        let now_kind = now.and_then(|n| self.vol.getattr(n).ok()).map(|a| a.kind);
        let target: Vec<u8> = match view::node(self.old, self.lower(), oi) {
            Some(view::Node::Private(i)) => i.target.clone(),
            _ if oa.kind == FileKind::Symlink => view::lower_idx(oi)
                .and_then(|i| self.lower().and_then(|l| l.get(i)))
                .map(|e| e.target.to_vec())
                .unwrap_or_default(),
            _ => Vec::new(),
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
            self.remove_all(parent, name, at)?;
        }
        let mut reported = false;
        let ino = match (keep, now) {
            (true, Some(n)) => n,
            _ => {
                let a = self
                    .vol
                    .mknod(parent, name, oa.kind, oa.perm, oa.uid, oa.gid, oa.rdev, &target)
                    .map_err(|e| op_err(self.vol, "create", &self.path(at), e))?;
                if now.is_none() {
                    self.changed(at);
                    reported = true;
                }
                a.ino
            }
        };
        match oa.kind {
            FileKind::File => {
                let old = content_at(self.vol, self.base, self.reader, self.index, oi, self.seq)?;
                if restore(self.vol, ino, &old, &self.path(at))? && !reported && now.is_some() && keep {
                    self.changed(at);
                }
                self.attrs(oi, ino, at)
            }
            FileKind::Dir => {
                work.push(Work::Attrs { old: oi, ino, at });
                work.push(Work::Children { old: oi, dir: ino, at });
                Ok(())
            }
            _ => self.attrs(oi, ino, at),
        }
    }

    fn children(&mut self, old_dir: Ino, dir: Ino, at: u32, work: &mut Vec<Work>) -> Result<(), VolumeError> {
        let old_kids = view::readdir(self.old, self.lower(), old_dir)
            .map_err(|e| op_err(self.vol, "list old", &self.path(at), e))?;
        let (_, now_kids) = self
            .vol
            .readdir(dir)
            .map_err(|e| op_err(self.vol, "list", &self.path(at), e))?;
        let old_names: HashSet<&[u8]> = old_kids.iter().map(|(n, _, _)| n.as_slice()).collect();
        for (n, _, _) in &now_kids {
            if !old_names.contains(n.as_slice()) {
                let k = self.name(Some(at), n);
                self.remove_all(dir, n, k)?;
            }
        }
        // Pushed last first: processed in name order.
        for (n, oi, _) in old_kids.into_iter().rev() {
            let k = self.name(Some(at), &n);
            work.push(Work::Entry {
                parent: dir,
                name: n,
                old: Some(oi),
                at: k,
            });
        }
        Ok(())
    }

    fn attrs(&self, old: Ino, ino: Ino, at: u32) -> Result<(), VolumeError> {
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
                .map_err(|e| op_err(self.vol, "set attributes of", &self.path(at), e))?;
        }
        Ok(())
    }
}
