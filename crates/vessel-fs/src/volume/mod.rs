//! A volume on one node: its txlog, its metadata tree (`apply(txlog)`, checkpointed), and
//! the contents of its private files by inode id. Every mutating call turns into one
//! transaction that is appended to the log before anything on disk changes, so after a
//! crash `checkpoint + replay(log)` gives back the tree at a transaction boundary.
//!
//! ```text
//! <dir>/volume.json      VolumeMeta (format version, name, template)
//! <dir>/epoch.json       the highest epoch this copy has promised (appends below it are
//!                         refused: a fenced writer)
//! <dir>/epochs.json     the epoch history: each epoch's first seq (see `epochfile`)
//! <dir>/cut.json        a cut of the log's tail in progress (see `cut`)
//! <dir>/txlog/*.seg      the transaction log
//! <dir>/checkpoint       the tree as of some seq (data files synced up to it)
//! <dir>/data/<ino:x>     contents of private regular files
//! <dir>/base/             the volume as of the oldest point history reaches (after
//!                         compaction): checkpoint, meta.json, data/<ino:x> (a hard link
//!                         to data/<ino:x> while that file is unchanged since; copied on
//!                         its next change)
//! ```

use crate::apply::Applier;
use crate::lower::Lower;
use crate::tree::{Inode, Tree, TreeError, ROOT};
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

mod cut;
mod epochfile;
mod maint;
mod read;
mod repl;
mod snap;
mod write;

#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;

pub use cut::{CUT_FILE, CUT_VERSION};
pub use epochfile::EPOCHS_FILE;
pub use maint::{Maintainer, FLUSH_INTERVAL};
pub(crate) use snap::{seed_live_from_base, write_seed_meta};
pub use snap::{BaseFile, SeedMeta, SeedView};

pub(crate) use crate::apply::op_ino;
pub(crate) use read::read_at;

/// Version of `volume.json`.
pub const VOLUME_VERSION: u32 = 1;
/// Log bytes after which a checkpoint is taken (bounds replay after a crash).
pub const CHECKPOINT_BYTES: u64 = 256 << 20;
/// History kept by default (older transactions are compacted into the base).
pub const DEFAULT_RETENTION_SECS: u64 = 24 * 3600;
/// Tries (50 ms apart) to take a volume's lock from a holder that is letting go.
const LOCK_TRIES: u32 = 60;
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

/// Version of `epoch.json`.
pub const EPOCH_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct EpochFile {
    version: u32,
    epoch: u64,
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
    #[error("volume '{volume}': epoch {got} is older than the epoch {current} this copy promised (a fenced writer); refused")]
    StaleEpoch { volume: String, current: u64, got: u64 },
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

/// Data files are spread over this many subdirectories of `data/`, by the inode number's
/// low byte. In one flat directory every new file's inode is allocated in the directory's
/// ext4 block group; once that fills (and with recently deleted inodes in it) creating a
/// file cost 5-15x more on this machine (20,000 creates: 3.3-11 s flat, 0.7 s sharded).
/// The shards themselves are spread over the block groups ([`spread_subdirs`]).
pub const DATA_SHARDS: u64 = 256;

/// The shard directory (relative to a `data/` directory) of file `ino`.
pub(crate) fn shard_name(ino: Ino) -> String {
    format!("{:02x}", ino % DATA_SHARDS)
}

/// Where file `ino`'s contents live, relative to a `data/` directory.
pub fn data_name(ino: Ino) -> String {
    format!("{}/{ino:016x}", shard_name(ino))
}

/// Every data file in a `data/` directory, with its inode number (files of the flat
/// layout of volumes made before 0.3 included).
pub(crate) fn data_files(data: &Path) -> Vec<(Ino, PathBuf)> {
    let ino = |e: &std::fs::DirEntry| u64::from_str_radix(&e.file_name().to_string_lossy(), 16).ok();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(data) else { return out };
    for e in rd.flatten() {
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && e.file_name().len() == 2 {
            if let Ok(sub) = std::fs::read_dir(e.path()) {
                out.extend(sub.flatten().filter_map(|f| Some((ino(&f)?, f.path()))));
            }
        } else if !is_dir && e.file_name().len() == 16 {
            if let Some(i) = ino(&e) {
                out.push((i, e.path()));
            }
        }
    }
    out
}

/// Ask ext4 to spread the subdirectories of `dir` over its block groups (the top-directory
/// flag, as for `/home`), so the shards' data files are too. Without it every shard sits in
/// the group of `data/`, and on an ext4 without a journal each file made there scans past
/// every inode freed in that group in the last minute (`recently_deleted`): deleting and
/// making a few thousand files, as an untar after an `rm -rf` does, became 20 times
/// slower. Best effort: other file systems have no such flag and need none.
fn spread_subdirs(dir: &Path) {
    use std::os::fd::AsRawFd;
    const FS_TOPDIR_FL: libc::c_long = 0x0002_0000;
    let Ok(f) = File::open(dir) else { return };
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long through the pointer, which points at `flags`;
    // the descriptor is open for the call's duration.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) } != 0 {
        return;
    }
    flags |= FS_TOPDIR_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one long through the pointer, which points at `flags`.
    unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
}

/// Make the shard directories of a `data/` directory and move files of the flat layout
/// into their shard (idempotent: an interrupted move is finished at the next open).
pub(crate) fn layout_data(data: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(data)?;
    if !data.join(shard_name(0)).exists() {
        spread_subdirs(data);
    }
    for i in 0..DATA_SHARDS {
        match std::fs::create_dir(data.join(shard_name(i))) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    for (ino, p) in data_files(data) {
        let want = data.join(data_name(ino));
        if p != want {
            std::fs::rename(&p, &want)?;
        }
    }
    Ok(())
}

pub struct Volume {
    name: String,
    dir: PathBuf,
    lower: Option<Arc<Lower>>,
    st: Mutex<State>,
    /// The log is on disk through this seq (shared with the log).
    durable: Arc<AtomicU64>,
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
    /// While a compaction runs: the files changed since it started.
    compacting: Option<HashSet<Ino>>,
    /// Who else gets committed transactions, and what a sync waits for.
    acks: Arc<dyn crate::ack::Acks>,
    /// How long a sync waits for acknowledgements.
    ack_timeout: std::time::Duration,
    last_compact: std::time::Instant,
    /// Each epoch's first seq in this copy's log (persisted in `epochs.json`).
    epochs: crate::epochs::EpochHistory,
}

impl Volume {
    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
        io_err(&self.name, what, path)
    }

    /// Create an empty volume in `dir` (which must not hold one).
    pub fn create(dir: &Path, name: &str, template: Option<&str>) -> Result<()> {
        let io = |what, path: &Path| io_err(name, what, path);
        for d in [dir.to_path_buf(), dir.join("txlog")] {
            std::fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        let data = dir.join("data");
        layout_data(&data).map_err(io("create", &data))?;
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
        let (mut log, _rec) = TxLog::open_with(&dir.join("txlog"), &name, opts.segment_bytes)?;
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
        // A holder that is going away (a FUSE session ending, a child forked while the
        // file was open and not yet exec'd) lets go within moments: wait a bounded while.
        let mut lockf = lockf;
        let mut tries = 0;
        let lockf = loop {
            match nix::fcntl::Flock::lock(lockf, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(l) => break l,
                Err((f, _)) if tries < LOCK_TRIES => {
                    lockf = f;
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(_) => {
                    return Err(VolumeError::Op(
                        "the volume is in use (mounted by a daemon or being repaired): stop the VE or wait".into(),
                        name,
                    ))
                }
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
        // An interrupted cut of the log's tail is finished first (see `cut`).
        let cut = cut::redo(dir, &name, &mut log, &base)?;
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
        let promised = read_epoch(dir, &name)?;
        let epochs = epochfile::load(dir, &name, &log, promised)?;
        let durable = log.durable_handle();
        let vol = Volume {
            name: name.clone(),
            dir: dir.to_path_buf(),
            lower,
            st: Mutex::new(State {
                tree: Tree::new(0, 0, 0),
                log,
                epoch: promised,
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
                compacting: None,
                acks: Arc::new(crate::ack::LocalOnly),
                ack_timeout: crate::ack::DEFAULT_ACK_TIMEOUT,
                last_compact: std::time::Instant::now(),
                epochs,
            }),
            durable,
            sync_lock: Mutex::new(()),
            broken: AtomicBool::new(false),
            ckpt_lock: Mutex::new(()),
            history_lock: std::sync::RwLock::new(()),
            _lock: lockf,
            stats: Default::default(),
        };
        // Data files of the flat layout (before 0.3) move into their shards, in the base too.
        let (data, bdata) = (dir.join("data"), vol.base_dir().join("data"));
        layout_data(&data).map_err(vol.io("lay out", &data))?;
        if bdata.exists() {
            layout_data(&bdata).map_err(vol.io("lay out", &bdata))?;
        }
        // Replay: metadata into the tree, contents into the data files (one transaction
        // in memory at a time).
        let reader = vol.lock().log.reader()?;
        let mut shared = vol.find_shared();
        let mut replayed_txs = 0u64;
        let mut applier = Applier::new(&data, vol.lower.as_deref());
        reader.for_each::<VolumeError>(tree.applied + 1, u64::MAX, |tx, _| {
            applier
                .apply(&mut tree, &tx, &mut |i| vol.unshare(&mut shared, i))
                .map_err(|e| corrupt(format!("replaying the log: {e}")))?;
            replayed_txs += 1;
            Ok(true)
        })?;
        let replayed = applier
            .finish(&tree)
            .map_err(vol.io("settle the data files in", &data))?;
        // Data files without an inode are leftovers.
        for (ino, p) in data_files(&data) {
            if !tree.inodes.get(&ino).is_some_and(|i| i.kind == FileKind::File) {
                let _ = std::fs::remove_file(p);
            }
        }
        {
            let mut st = vol.lock();
            st.epoch = st.log.last_epoch().max(promised).max(1);
            st.next_ino = tree.max_ino + 1;
            st.usage = usage_of(&tree);
            st.since_ckpt = replayed_txs * 64;
            st.tree = tree;
            st.shared = shared;
            // Replayed contents are on disk only once the checkpoint after replay syncs them.
            st.dirty.extend(replayed);
        }
        if replayed_txs > 0 || cut {
            vol.checkpoint()?;
        }
        if cut {
            cut::finish(dir, &name)?;
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

/// The error for a failed `what` on `path` of `volume`.
fn io_err(volume: &str, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let (volume, path) = (volume.to_string(), path.to_path_buf());
    move |source| VolumeError::Io {
        volume,
        what,
        path,
        source,
    }
}

/// A small versioned JSON file of the volume (`None` if it does not exist): a damaged one
/// or one of another format version is an error naming it.
fn read_versioned<T: serde::de::DeserializeOwned>(
    p: &Path,
    volume: &str,
    version: impl Fn(&T) -> u32,
    expected: u32,
) -> Result<Option<T>> {
    let corrupt = |reason: String| VolumeError::Corrupt {
        volume: volume.to_string(),
        reason,
    };
    match std::fs::read(p) {
        Ok(b) => {
            let v: T = serde_json::from_slice(&b).map_err(|e| corrupt(format!("{} is damaged: {e}", p.display())))?;
            if version(&v) != expected {
                return Err(corrupt(format!(
                    "{} has format version {} (this build reads {expected})",
                    p.display(),
                    version(&v)
                )));
            }
            Ok(Some(v))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(volume, "read", p)(e)),
    }
}

/// The epoch promised in `epoch.json` (0 if none was promised yet).
fn read_epoch(dir: &Path, volume: &str) -> Result<u64> {
    let e: Option<EpochFile> = read_versioned(
        &dir.join("epoch.json"),
        volume,
        |e: &EpochFile| e.version,
        EPOCH_VERSION,
    )?;
    Ok(e.map_or(0, |e| e.epoch))
}

fn read_base_meta(dir: &Path, volume: &str) -> Result<BaseMeta> {
    let p = dir.join("base").join("meta.json");
    let m: Option<BaseMeta> = read_versioned(&p, volume, |m: &BaseMeta| m.version, BASE_VERSION)?;
    Ok(m.unwrap_or(BaseMeta {
        version: BASE_VERSION,
        seq: 0,
        time_ns: 0,
        pending: 0,
    }))
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
