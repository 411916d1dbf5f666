//! A volume on one node: its txlog, its metadata tree (`apply(txlog)`, checkpointed), and
//! the contents of its private files by inode id. Every mutating call turns into one
//! transaction that is appended to the log before anything on disk changes, so after a
//! crash `checkpoint + replay(log)` gives back the tree at a transaction boundary.
//!
//! ```text
//! <dir>/volume.json      VolumeMeta (format version, name, template)
//! <dir>/txlog/*.seg      the transaction log
//! <dir>/checkpoint       the tree as of some seq (data files synced up to it)
//! <dir>/data/<ino:x>     contents of private regular files
//! <dir>/base/             the volume as of the oldest point history reaches (after
//!                         compaction): checkpoint, meta.json, data/<ino:x> (a hard link
//!                         to data/<ino:x> while that file is unchanged since; copied on
//!                         its next change)
//! ```

use crate::lower::Lower;
use crate::tree::{Inode, Tree, TreeError, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino, Op, Tx};
use crate::txlog::{TxLog, TxLogError};
use crate::view::{self, Attr, FsResult, Node, LOWER_BASE};
use crate::xattr::Incoming;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Version of `volume.json`.
pub const VOLUME_VERSION: u32 = 1;
/// Log bytes after which a checkpoint is taken (bounds replay after a crash).
pub const CHECKPOINT_BYTES: u64 = 256 << 20;
/// History kept by default (older transactions are compacted into the base).
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 3600;
/// Version of `base/meta.json`.
pub const BASE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseMeta {
    pub version: u32,
    /// History starts after this transaction.
    pub seq: u64,
    /// Time of that transaction.
    pub time_ns: i64,
    /// A compaction up to this seq started and did not finish: redo it at open.
    #[serde(default)]
    pub pending: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct VolumeOptions {
    /// Log segment size (compaction drops whole segments).
    pub segment_bytes: u64,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            segment_bytes: crate::txlog::DEFAULT_SEGMENT_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume '{volume}': {what} {path}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] TxLogError),
    #[error("volume '{volume}': {reason}; restore this volume from a replica or a backup")]
    Corrupt { volume: String, reason: String },
    #[error("volume '{volume}': {0}", volume = .1)]
    Op(String, String),
}

pub type Result<T> = std::result::Result<T, VolumeError>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub version: u32,
    pub name: String,
    /// Template id of the lower layer (none: an empty volume).
    pub template: Option<String>,
    pub created_ns: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub bytes: Option<u64>,
    pub inodes: Option<u64>,
}

/// Space use of the private tree (template files are shared and not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// Attribute changes of a setattr call (owners VE-relative).
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime_ns: Option<i64>,
    pub mtime_ns: Option<i64>,
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn tree_err(e: TreeError) -> i32 {
    e.errno()
}

pub fn data_name(ino: Ino) -> String {
    format!("{ino:016x}")
}

pub struct Volume {
    name: String,
    dir: PathBuf,
    lower: Option<Arc<Lower>>,
    st: Mutex<State>,
    synced: AtomicU64,
    sync_lock: Mutex<()>,
    broken: AtomicBool,
    /// One checkpoint at a time.
    ckpt_lock: Mutex<()>,
    /// History readers share it; compaction (which rewrites the base) takes it alone.
    history_lock: std::sync::RwLock<()>,
    /// Exclusive `flock` on `<dir>/lock`: one process and one instance per volume.
    _lock: nix::fcntl::Flock<File>,
    stats: crate::stats::Stats,
}

/// The volume lock, held: counts its wait and hold times.
struct Locked<'a> {
    g: MutexGuard<'a, State>,
    since: std::time::Instant,
    waited_ns: u64,
    stats: &'a crate::stats::Stats,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.g
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.g
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.stats
            .lock_times(self.waited_ns, self.since.elapsed().as_nanos() as u64);
    }
}

struct State {
    tree: Tree,
    log: TxLog,
    epoch: u64,
    next_ino: Ino,
    /// Data files of private files that have open handles.
    files: HashMap<Ino, Arc<File>>,
    open: HashMap<Ino, u32>,
    /// Unlinked files that are still open (their contents live until the last close).
    orphans: HashMap<Ino, Inode>,
    dirty: HashSet<Ino>,
    since_ckpt: u64,
    usage: Usage,
    quota: Quota,
    retention_ns: i64,
    base: BaseMeta,
    /// Files whose base copy is the live file itself (hard link): copied before a change.
    shared: HashSet<Ino>,
}

impl Volume {
    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
        let (volume, path) = (self.name.clone(), path.to_path_buf());
        move |source| VolumeError::Io {
            volume,
            what,
            path,
            source,
        }
    }

    /// Create an empty volume in `dir` (which must not hold one).
    pub fn create(dir: &Path, name: &str, template: Option<&str>) -> Result<()> {
        let io = |what, path: &Path| {
            let (volume, path) = (name.to_string(), path.to_path_buf());
            move |source| VolumeError::Io {
                volume,
                what,
                path,
                source,
            }
        };
        for d in [dir.to_path_buf(), dir.join("data"), dir.join("txlog")] {
            std::fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        // A VE's files, log and history are root-only on the host, whatever holds the volume.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io("make root-only", dir))?;
        let meta = VolumeMeta {
            version: VOLUME_VERSION,
            name: name.to_string(),
            template: template.map(str::to_string),
            created_ns: now_ns(),
        };
        let p = dir.join("volume.json");
        write_durably(&p, &serde_json::to_vec_pretty(&meta).expect("serializable")).map_err(io("write", &p))
    }

    pub fn read_meta(dir: &Path) -> Result<VolumeMeta> {
        let p = dir.join("volume.json");
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let b = std::fs::read(&p).map_err(|source| VolumeError::Io {
            volume: name.clone(),
            what: "read",
            path: p.clone(),
            source,
        })?;
        let m: VolumeMeta = serde_json::from_slice(&b).map_err(|e| VolumeError::Corrupt {
            volume: name.clone(),
            reason: format!("{} is not a volume description: {e}", p.display()),
        })?;
        if m.version != VOLUME_VERSION {
            return Err(VolumeError::Corrupt {
                volume: name,
                reason: format!(
                    "{} has format version {} (this build reads {VOLUME_VERSION})",
                    p.display(),
                    m.version
                ),
            });
        }
        Ok(m)
    }

    /// The tree a volume starts from (before its first transaction).
    pub fn initial_tree(has_lower: bool) -> Tree {
        let mut t = Tree::new(0o755, 0, 0);
        if has_lower {
            t.inodes.get_mut(&ROOT).expect("root").lower = Some(0);
        }
        t
    }

    /// Open the volume in `dir`: load the checkpoint, replay the log after it (contents
    /// too), and drop what a crash left half done. `lower` must be the template named in
    /// the volume's description.
    pub fn open(dir: &Path, lower: Option<Arc<Lower>>) -> Result<Volume> {
        Self::open_with(dir, lower, VolumeOptions::default())
    }

    pub fn open_with(dir: &Path, lower: Option<Arc<Lower>>, opts: VolumeOptions) -> Result<Volume> {
        let meta = Self::read_meta(dir)?;
        let name = meta.name.clone();
        // Volumes made before 0.3 were 0755: root-only from their next open on.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(|source| {
            VolumeError::Io {
                volume: name.clone(),
                what: "make root-only",
                path: dir.to_path_buf(),
                source,
            }
        })?;
        let (log, _rec) = TxLog::open_with(&dir.join("txlog"), &name, opts.segment_bytes)?;
        let lock_path = dir.join("lock");
        let lockf = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| VolumeError::Io {
                volume: name.clone(),
                what: "open",
                path: lock_path.clone(),
                source,
            })?;
        let lockf = match nix::fcntl::Flock::lock(lockf, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err(_) => {
                return Err(VolumeError::Op(
                    "the volume is in use (mounted by a daemon or being repaired): stop the VE or wait".into(),
                    name,
                ))
            }
        };
        let base = read_base_meta(dir, &name)?;
        let corrupt = |reason: String| VolumeError::Corrupt {
            volume: name.clone(),
            reason,
        };
        if meta.template.is_some() != lower.is_some() {
            return Err(corrupt("the volume's template layer is missing".into()));
        }
        let ck = dir.join("checkpoint");
        let mut tree = match std::fs::read(&ck) {
            Ok(b) => Tree::from_checkpoint(&b)
                .map_err(|e| corrupt(format!("checkpoint {} is damaged: {e}", ck.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::initial_tree(lower.is_some()),
            Err(source) => {
                return Err(VolumeError::Io {
                    volume: name,
                    what: "read",
                    path: ck,
                    source,
                })
            }
        };
        if tree.applied > log.last_seq() {
            return Err(corrupt(format!(
                "the checkpoint is at seq {} but the log ends at seq {}",
                tree.applied,
                log.last_seq()
            )));
        }
        let vol = Volume {
            name: name.clone(),
            dir: dir.to_path_buf(),
            lower,
            st: Mutex::new(State {
                tree: Tree::new(0, 0, 0),
                log,
                epoch: 1,
                next_ino: 2,
                files: HashMap::new(),
                open: HashMap::new(),
                orphans: HashMap::new(),
                dirty: HashSet::new(),
                since_ckpt: 0,
                usage: Usage::default(),
                quota: Quota::default(),
                retention_ns: (DEFAULT_RETENTION_SECS * 1_000_000_000) as i64,
                base,
                shared: HashSet::new(),
            }),
            synced: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            broken: AtomicBool::new(false),
            ckpt_lock: Mutex::new(()),
            history_lock: std::sync::RwLock::new(()),
            _lock: lockf,
            stats: Default::default(),
        };
        // Replay: metadata into the tree, contents into the data files (one transaction
        // in memory at a time).
        let reader = vol.lock().log.reader()?;
        let mut shared = vol.find_shared();
        let mut touched = HashSet::new();
        let mut replayed_txs = 0u64;
        reader.for_each::<VolumeError>(tree.applied + 1, u64::MAX, |tx, _| {
            let freed = freed_by(&tree, &tx.op);
            tree.apply(&tx)
                .map_err(|e| corrupt(format!("transaction {} does not apply: {e}", tx.seq)))?;
            let freed: Vec<Ino> = freed.iter().map(|(i, _)| *i).collect();
            if let Some(i) = data_op_ino(&tx.op) {
                vol.unshare(&mut shared, i)
                    .map_err(|e| corrupt(format!("copying the base of file {i}: {e}")))?;
            }
            vol.apply_data(&tree, &tx.op, &freed, true)
                .map_err(|e| corrupt(format!("replaying transaction {}: {e}", tx.seq)))?;
            if let Some(i) = op_ino(&tx.op) {
                touched.insert(i);
            }
            replayed_txs += 1;
            Ok(true)
        })?;
        let replayed: Vec<Ino> = touched.iter().copied().collect();
        // Contents past a file's size can only be from transactions that never made it
        // into the log: cut them. Data files without an inode are leftovers.
        for ino in touched {
            if let Some(i) = tree.inodes.get(&ino).filter(|i| i.kind == FileKind::File) {
                let p = vol.data_path(ino);
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
                    f.set_len(i.size).map_err(vol.io("truncate", &p))?;
                }
            }
        }
        let data = dir.join("data");
        if let Ok(rd) = std::fs::read_dir(&data) {
            for e in rd.flatten() {
                let keep = u64::from_str_radix(&e.file_name().to_string_lossy(), 16)
                    .ok()
                    .and_then(|i| tree.inodes.get(&i))
                    .is_some_and(|i| i.kind == FileKind::File);
                if !keep {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        {
            let mut st = vol.lock();
            st.epoch = st.log.last_epoch().max(1);
            st.next_ino = tree.max_ino + 1;
            st.usage = usage_of(&tree);
            st.since_ckpt = replayed_txs * 64;
            st.tree = tree;
            st.shared = shared;
            // Replayed contents are on disk only once the checkpoint after replay syncs them.
            st.dirty.extend(replayed);
        }
        vol.synced.store(0, Ordering::SeqCst);
        if replayed_txs > 0 {
            vol.checkpoint()?;
        }
        let base = vol.lock().base;
        if base.pending > base.seq {
            vol.compact_through(base.pending)?;
        }
        Ok(vol)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lower(&self) -> Option<&Lower> {
        self.lower.as_deref()
    }

    fn lock(&self) -> Locked<'_> {
        let t0 = std::time::Instant::now();
        let g = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let since = std::time::Instant::now();
        Locked {
            g,
            since,
            waited_ns: since.duration_since(t0).as_nanos() as u64,
            stats: &self.stats,
        }
    }

    /// Where this volume's time goes (see [`crate::stats`]).
    pub fn stats(&self) -> &crate::stats::Stats {
        &self.stats
    }

    fn data_path(&self, ino: Ino) -> PathBuf {
        self.dir.join("data").join(data_name(ino))
    }

    pub fn set_quota(&self, q: Quota) {
        self.lock().quota = q;
    }

    pub fn usage(&self) -> (Usage, Quota) {
        let st = self.lock();
        (st.usage, st.quota)
    }

    /// Seq of the last transaction, and bytes of log on disk.
    pub fn log_status(&self) -> (u64, u64) {
        let st = self.lock();
        (st.log.last_seq(), st.log.disk_bytes())
    }

    /// A reader over the log as it is now (read without the volume's lock; hold
    /// [`Volume::history_guard`] meanwhile so that compaction does not drop segments).
    pub fn log_reader(&self) -> Result<crate::txlog::LogReader> {
        Ok(self.lock().log.reader()?)
    }

    /// Run `f` over the live tree.
    pub fn with_tree<R>(&self, f: impl FnOnce(&Tree, Option<&Lower>) -> R) -> R {
        let st = self.lock();
        f(&st.tree, self.lower.as_deref())
    }

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
    fn with_blocks(&self, mut a: Attr) -> Attr {
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

    // ---- writes ----

    /// Append `op` as the next transaction and apply it to the tree; then apply its
    /// effect on file contents.
    fn commit(&self, st: &mut State, op: Op) -> FsResult<u64> {
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
        let freed = freed_by(&st.tree, &tx.op);
        let before = usage_delta_base(&st.tree, &tx.op);
        st.tree.apply(&tx).map_err(tree_err)?;
        if let Err(e) = st.log.append(&tx) {
            // The tree is ahead of the log now: refuse further changes until reopened.
            self.broken.store(true, Ordering::SeqCst);
            eprintln!("vessel-fs: {e}; volume '{}' is read-only until remounted", self.name);
            return Err(libc::EIO);
        }
        self.stats.tx();
        st.since_ckpt += 64 + op_data_len(&tx.op);
        account(st, &tx.op, before, &freed);
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
        Ok(tx.seq)
    }

    fn quota_check(&self, st: &State, op: &Op) -> FsResult<()> {
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

    fn data_file(&self, st: &mut State, ino: Ino) -> std::io::Result<Arc<File>> {
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

    fn apply_data_live(&self, st: &mut State, op: &Op, gone: &[Ino]) -> std::io::Result<()> {
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
    fn apply_data(&self, tree: &Tree, op: &Op, freed: &[Ino], replay: bool) -> std::io::Result<()> {
        apply_data_in(&self.dir.join("data"), self.lower(), tree, op, freed, replay)
    }

    fn base_dir(&self) -> PathBuf {
        self.dir.join("base")
    }

    /// Files of the base that are the live file itself (same inode on disk).
    fn find_shared(&self) -> HashSet<Ino> {
        use std::os::unix::fs::MetadataExt;
        let mut out = HashSet::new();
        if let Ok(rd) = std::fs::read_dir(self.base_dir().join("data")) {
            for e in rd.flatten() {
                let Ok(ino) = u64::from_str_radix(&e.file_name().to_string_lossy(), 16) else {
                    continue;
                };
                let (Ok(a), Ok(b)) = (e.metadata(), std::fs::metadata(self.data_path(ino))) else {
                    continue;
                };
                if a.ino() == b.ino() && a.dev() == b.dev() {
                    out.insert(ino);
                }
            }
        }
        out
    }

    /// Before the live file changes, give the base its own copy.
    fn unshare(&self, shared: &mut HashSet<Ino>, ino: Ino) -> std::io::Result<()> {
        if !shared.remove(&ino) {
            return Ok(());
        }
        let b = self.base_dir().join("data").join(data_name(ino));
        let tmp = b.with_extension("tmp");
        std::fs::copy(self.data_path(ino), &tmp)?;
        std::fs::rename(&tmp, &b)
    }
}

/// Where a volume's contents go for `op` (also used for the base and by replay, where
/// files may already be ahead of the op: every effect is idempotent).
fn apply_data_in(
    data_dir: &Path,
    lower: Option<&Lower>,
    tree: &Tree,
    op: &Op,
    freed: &[Ino],
    replay: bool,
) -> std::io::Result<()> {
    let path = |ino: Ino| data_dir.join(data_name(ino));
    {
        // In replay a file may be gone already (a later transaction freed it): recreate it;
        // the later transaction removes it again.
        let open_rw = |ino: Ino, truncate: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(truncate || replay)
                .truncate(truncate)
                .custom_flags(libc::O_CLOEXEC)
                .open(path(ino))
        };
        match op {
            Op::Create {
                ino,
                kind: FileKind::File,
                ..
            } => {
                open_rw(*ino, true)?;
            }
            Op::CopyUp {
                ino,
                lower: idx,
                kind: FileKind::File,
                ..
            } => {
                let low = lower.ok_or_else(|| std::io::Error::other("copy-up without a template"))?;
                let mut src = low.open(*idx)?;
                let mut dst = open_rw(*ino, true)?;
                std::io::copy(&mut src, &mut dst)?;
            }
            Op::Write { ino, offset, data } if replay && tree.inodes.contains_key(ino) => {
                open_rw(*ino, false)?.write_all_at(data, *offset)?;
            }
            Op::Truncate { ino, size } if replay && tree.inodes.contains_key(ino) => {
                open_rw(*ino, false)?.set_len(*size)?;
            }
            Op::Fallocate { ino, mode, offset, len } if replay && tree.inodes.contains_key(ino) => {
                fallocate(&open_rw(*ino, false)?, *mode, *offset, *len)?;
            }
            _ => {}
        }
        for ino in freed {
            match std::fs::remove_file(path(*ino)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

impl Volume {
    /// Make `ino` (and the directories above it) private, copying it up from the template
    /// if needed; returns its inode number (unchanged).
    fn ensure_private(&self, st: &mut State, ino: Ino) -> FsResult<Ino> {
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
    fn copy_up_one(&self, st: &mut State, low: &Lower, idx: u64) -> FsResult<()> {
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

    fn attr_locked(&self, st: &State, ino: Ino) -> FsResult<Attr> {
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
        let mut st = self.lock();
        if st.orphans.contains_key(&ino) {
            let f = self.data_file(&mut st, ino).map_err(|e| errno_of(&e))?;
            f.write_all_at(data, offset).map_err(|e| errno_of(&e))?;
            let o = st.orphans.get_mut(&ino).expect("checked");
            o.size = o.size.max(offset + data.len() as u64);
            return Ok(data.len() as u32);
        }
        self.commit(
            &mut st,
            Op::Write {
                ino,
                offset,
                data: data.to_vec(),
            },
        )?;
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

    /// Make every transaction so far durable (group commit: callers that arrive while a
    /// sync runs share the next one).
    pub fn sync(&self) -> FsResult<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        let target = self.lock().tree.applied;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_locked(target)
    }

    /// A sync only if none runs now (the background flusher: never queue behind a caller).
    pub fn try_sync(&self) -> FsResult<()> {
        let target = self.lock().tree.applied;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        match self.sync_lock.try_lock() {
            Ok(_g) => self.sync_locked(target),
            Err(_) => Ok(()),
        }
    }

    fn sync_locked(&self, target: u64) -> FsResult<()> {
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (upto, h) = {
            let st = self.lock();
            (st.tree.applied, st.log.segment_handle())
        };
        let h = h.map_err(|_| libc::EIO)?;
        let t0 = std::time::Instant::now();
        h.sync_data().map_err(|e| errno_of(&e))?;
        self.stats.sync_done(t0.elapsed().as_nanos() as u64);
        self.synced.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Take a checkpoint if enough log has accumulated since the last one.
    pub fn maybe_checkpoint(&self) -> Result<()> {
        if self.lock().since_ckpt >= CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Sync the log and the data files changed since the last checkpoint, then write the
    /// tree as a new checkpoint.
    pub fn checkpoint(&self) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(VolumeError::Op(
                "an earlier write failed; not checkpointing a tree the log does not hold".into(),
                self.name.clone(),
            ));
        }
        let _one = self.ckpt_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (bytes, dirty, seg) = {
            let mut st = self.lock();
            let dirty: Vec<Ino> = st.dirty.drain().collect();
            st.since_ckpt = 0;
            let seg = st.log.segment_handle();
            (st.tree.checkpoint(), dirty, seg)
        };
        let synced = (|| -> Result<()> {
            seg?.sync_data()
                .map_err(self.io("fsync log of", &self.dir.join("txlog")))?;
            for ino in &dirty {
                let p = self.data_path(*ino);
                if let Ok(f) = File::open(&p) {
                    f.sync_data().map_err(self.io("fsync", &p))?;
                }
            }
            File::open(self.dir.join("data"))
                .and_then(|d| d.sync_all())
                .map_err(self.io("fsync", &self.dir.join("data")))
        })();
        if let Err(e) = synced {
            self.lock().dirty.extend(dirty);
            return Err(e);
        }
        let p = self.dir.join("checkpoint");
        write_durably(&p, &bytes).map_err(self.io("write", &p))
    }

    /// How long history is kept (None: the default of 24 h).
    pub fn set_retention(&self, secs: Option<u64>) {
        let secs = secs.unwrap_or(DEFAULT_RETENTION_SECS);
        self.lock().retention_ns = (secs.min(100 * 365 * 86400) * 1_000_000_000) as i64;
    }

    pub fn retention_secs(&self) -> u64 {
        (self.lock().retention_ns / 1_000_000_000) as u64
    }

    /// Held while reading history (compaction waits for readers).
    pub fn history_guard(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.history_lock.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Where history starts: the base's seq and time (seq 0: the pristine template).
    pub fn base_meta(&self) -> BaseMeta {
        self.lock().base
    }

    /// The oldest point one can return to (ns since the epoch), if there is history.
    pub fn oldest_point(&self) -> Option<i64> {
        let st = self.lock();
        if st.base.seq > 0 {
            return Some(st.base.time_ns);
        }
        st.log.segment_starts().first().and_then(|(_, t)| *t)
    }

    /// The tree as of the base (where history starts).
    pub fn base_tree(&self) -> Result<Tree> {
        let p = self.base_dir().join("checkpoint");
        match std::fs::read(&p) {
            Ok(b) => Tree::from_checkpoint(&b).map_err(|e| VolumeError::Corrupt {
                volume: self.name.clone(),
                reason: format!("base checkpoint {} is damaged: {e}", p.display()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::initial_tree(self.lower.is_some())),
            Err(source) => Err(VolumeError::Io {
                volume: self.name.clone(),
                what: "read",
                path: p,
                source,
            }),
        }
    }

    /// Contents of file `ino` as of the base.
    pub fn open_base_data(&self, ino: Ino) -> std::io::Result<File> {
        File::open(self.base_dir().join("data").join(data_name(ino)))
    }

    /// An unnamed scratch file on the volume's file system (gone when closed).
    pub fn scratch_file(&self) -> std::io::Result<File> {
        crate::sparse::temp_file(&self.dir)
    }

    /// Compact history older than the retention into the base, dropping whole log
    /// segments; returns the bytes of log freed. The VE's file system waits meanwhile.
    pub fn compact(&self, now_ns: i64) -> Result<u64> {
        if self.broken.load(Ordering::SeqCst) {
            return Ok(0);
        }
        let horizon = {
            let st = self.lock();
            now_ns - st.retention_ns
        };
        // The newest segment start that is older than the horizon: everything before it goes.
        let starts = self.lock().log.segment_starts();
        let mut through = None;
        for (first, t) in starts.iter().skip(1) {
            if t.is_some_and(|t| t <= horizon) {
                through = Some(first - 1);
            }
        }
        let Some(through) = through else { return Ok(0) };
        if through <= self.lock().base.seq {
            return Ok(0);
        }
        self.compact_through(through)
    }

    fn write_base_meta(&self, meta: &BaseMeta) -> Result<()> {
        let base_dir = self.base_dir();
        std::fs::create_dir_all(&base_dir).map_err(self.io("create", &base_dir))?;
        let mp = base_dir.join("meta.json");
        write_durably(&mp, &serde_json::to_vec(meta).expect("serializable")).map_err(self.io("write", &mp))
    }

    /// Move the base up to `through` (redone from the start if interrupted: every step is
    /// idempotent, and the live files are linked in only after the commit).
    fn compact_through(&self, through: u64) -> Result<u64> {
        // The live checkpoint must be past what the log drops.
        self.checkpoint()?;
        let _history = self.history_lock.write().unwrap_or_else(|p| p.into_inner());
        let mut st = self.lock();
        let base_dir = self.base_dir();
        let bdata = base_dir.join("data");
        std::fs::create_dir_all(&bdata).map_err(self.io("create", &bdata))?;
        let mut tree = self.base_tree()?;
        let reader = st.log.reader()?;
        let mut touched: HashSet<Ino> = HashSet::new();
        let corrupt = |reason: String| VolumeError::Corrupt {
            volume: self.name.clone(),
            reason,
        };
        let mut marked = st.base;
        marked.pending = through;
        self.write_base_meta(&marked)?;
        let mut shared = std::mem::take(&mut st.shared);
        let mut last_time = st.base.time_ns;
        let res = (|| -> Result<()> {
            reader.for_each::<VolumeError>(st.base.seq + 1, through, |tx, _| {
                let freed: Vec<Ino> = freed_by(&tree, &tx.op).into_iter().map(|(i, _)| i).collect();
                tree.apply(&tx)
                    .map_err(|e| corrupt(format!("compacting: transaction {} does not apply: {e}", tx.seq)))?;
                if let Some(i) = data_op_ino(&tx.op) {
                    // Never write through a link into the live file.
                    self.unshare(&mut shared, i).map_err(self.io("copy base of", &bdata))?;
                }
                for f in &freed {
                    shared.remove(f);
                }
                apply_data_in(&bdata, self.lower(), &tree, &tx.op, &freed, true)
                    .map_err(|e| corrupt(format!("compacting transaction {}: {e}", tx.seq)))?;
                if let Some(i) = op_ino(&tx.op) {
                    touched.insert(i);
                }
                last_time = tx.time_ns;
                Ok(true)
            })?;
            for ino in &touched {
                let p = bdata.join(data_name(*ino));
                match tree.inodes.get(ino) {
                    Some(i) if i.kind == FileKind::File => {
                        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) {
                            f.set_len(i.size)
                                .and_then(|_| f.sync_all())
                                .map_err(self.io("sync", &p))?;
                        }
                    }
                    _ => {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
            File::open(&bdata)
                .and_then(|d| d.sync_all())
                .map_err(self.io("fsync", &bdata))?;
            // Commit point: the base checkpoint, then its description.
            let ck = base_dir.join("checkpoint");
            write_durably(&ck, &tree.checkpoint()).map_err(self.io("write", &ck))?;
            self.write_base_meta(&BaseMeta {
                version: BASE_VERSION,
                seq: through,
                time_ns: last_time,
                pending: 0,
            })
        })();
        if let Err(e) = res {
            st.shared = shared;
            return Err(e);
        }
        st.base = BaseMeta {
            version: BASE_VERSION,
            seq: through,
            time_ns: last_time,
            pending: 0,
        };
        // Files unchanged since the new base point share their contents with it again.
        let mut changed_after: HashSet<Ino> = HashSet::new();
        if let Err(e) = reader.for_each::<TxLogError>(through + 1, u64::MAX, |t, _| {
            changed_after.extend(op_ino(&t.op));
            Ok(true)
        }) {
            st.shared = shared;
            return Err(e.into());
        }
        for (ino, i) in &tree.inodes {
            if i.kind != FileKind::File
                || changed_after.contains(ino)
                || shared.contains(ino)
                || st.orphans.contains_key(ino)
                || !st.tree.inodes.contains_key(ino)
            {
                continue;
            }
            let (live, b) = (self.data_path(*ino), bdata.join(data_name(*ino)));
            let tmp = b.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(&live, &tmp)
                .and_then(|_| std::fs::rename(&tmp, &b))
                .is_ok()
            {
                shared.insert(*ino);
            }
        }
        st.shared = shared;
        let freed = st.log.drop_through(through)?;
        Ok(freed)
    }
}

/// Replace `path` with `bytes` so that a crash leaves the old or the new file, whole:
/// write a temporary file, fsync it, rename it over, fsync the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(d) => File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Names are at most 255 bytes (NAME_MAX), as on Linux disk file systems.
fn long_name(name: &[u8]) -> FsResult<()> {
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(())
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

fn fallocate(f: &File, mode: u32, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode as i32, offset as i64, len as i64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drop one handle; true when it was the last.
fn release_count(st: &mut State, ino: Ino) -> bool {
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

fn lower_has(tree: &Tree, lower: Option<&Lower>, private_dir: Ino, name: &[u8]) -> bool {
    match (tree.inodes.get(&private_dir).and_then(|d| d.lower), lower) {
        (Some(l), Some(low)) => low.child(l, name).is_some(),
        _ => false,
    }
}

/// The file whose contents `op` changes in place.
fn data_op_ino(op: &Op) -> Option<Ino> {
    match op {
        Op::Write { ino, .. } | Op::Truncate { ino, .. } | Op::Fallocate { ino, .. } => Some(*ino),
        _ => None,
    }
}

fn read_base_meta(dir: &Path, volume: &str) -> Result<BaseMeta> {
    let p = dir.join("base").join("meta.json");
    match std::fs::read(&p) {
        Ok(b) => {
            let m: BaseMeta = serde_json::from_slice(&b).map_err(|e| VolumeError::Corrupt {
                volume: volume.to_string(),
                reason: format!("{} is damaged: {e}", p.display()),
            })?;
            if m.version != BASE_VERSION {
                return Err(VolumeError::Corrupt {
                    volume: volume.to_string(),
                    reason: format!(
                        "{} has format version {} (this build reads {BASE_VERSION})",
                        p.display(),
                        m.version
                    ),
                });
            }
            Ok(m)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BaseMeta {
            version: BASE_VERSION,
            seq: 0,
            time_ns: 0,
            pending: 0,
        }),
        Err(source) => Err(VolumeError::Io {
            volume: volume.to_string(),
            what: "read",
            path: p,
            source,
        }),
    }
}

/// The inode an op changes (for dirty tracking and replay bookkeeping).
pub fn op_ino(op: &Op) -> Option<Ino> {
    match op {
        Op::Create { ino, .. }
        | Op::CopyUp { ino, .. }
        | Op::Link { ino, .. }
        | Op::Write { ino, .. }
        | Op::Truncate { ino, .. }
        | Op::Fallocate { ino, .. }
        | Op::SetAttr { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. } => Some(*ino),
        Op::Unlink { .. } | Op::Rename { .. } => None,
    }
}

fn op_data_len(op: &Op) -> u64 {
    match op {
        Op::Write { data, .. } => data.len() as u64,
        _ => 0,
    }
}

/// Inodes that `op` would free (their last name goes away), with their last state.
pub(crate) fn freed_by(tree: &Tree, op: &Op) -> Vec<(Ino, Inode)> {
    let victim = match op {
        Op::Unlink { parent, name, .. } => tree.lookup(*parent, name),
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
            ..
        } if flags & crate::tree::RENAME_EXCHANGE == 0 => {
            let src = tree.lookup(*parent, name);
            tree.lookup(*new_parent, new_name).filter(|d| Some(*d) != src)
        }
        _ => None,
    };
    match victim
        .filter(|v| *v != WHITEOUT)
        .and_then(|v| tree.inodes.get(&v).map(|i| (v, i)))
    {
        Some((v, i)) if i.kind == FileKind::Dir || i.nlink <= 1 => vec![(v, i.clone())],
        _ => Vec::new(),
    }
}

fn counted(i: &Inode) -> u64 {
    match i.kind {
        FileKind::File | FileKind::Symlink => i.size,
        _ => 0,
    }
}

fn usage_of(tree: &Tree) -> Usage {
    Usage {
        bytes: tree.inodes.values().map(counted).sum(),
        inodes: tree.inodes.len() as u64,
    }
}

fn usage_delta_base(tree: &Tree, op: &Op) -> u64 {
    op_ino(op).and_then(|i| tree.inodes.get(&i)).map_or(0, counted)
}

fn account(st: &mut State, op: &Op, before: u64, freed: &[(Ino, Inode)]) {
    if let Some(i) = op_ino(op) {
        let after = st.tree.inodes.get(&i).map_or(0, counted);
        st.usage.bytes = (st.usage.bytes + after).saturating_sub(before);
        if matches!(op, Op::Create { .. } | Op::CopyUp { .. }) {
            st.usage.inodes += 1;
        }
    }
    for (_, i) in freed {
        st.usage.bytes = st.usage.bytes.saturating_sub(counted(i));
        st.usage.inodes = st.usage.inodes.saturating_sub(1);
    }
}
