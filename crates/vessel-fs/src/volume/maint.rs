//! Durability and upkeep: sync, checkpoints, retention and compaction.

use super::*;
use crate::apply::{op_ino, Applier};
use crate::txlog::LogReader;

impl Volume {
    /// Make every transaction so far durable: the local log (group commit: callers that
    /// arrive while a sync runs share the next one), then whatever the volume's
    /// [`crate::ack::Acks`] waits for (nothing on one node; the in-sync replicas when
    /// replicated). Fails with EIO when the acknowledgements do not come in time.
    pub fn sync(&self) -> FsResult<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(libc::EIO);
        }
        let (target, acks, timeout) = {
            let st = self.lock();
            (st.tree.applied, st.acks.clone(), st.ack_timeout)
        };
        acks.syncing(target);
        if self.durable.load(Ordering::Acquire) < target {
            let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
            self.sync_locked(target)?;
        }
        acks.wait(target, timeout).map_err(|e| {
            eprintln!("vessel-fs: volume '{}': sync: {e}", self.name);
            libc::EIO
        })
    }

    /// A sync of the local log only if none runs now (the background flusher: never queue
    /// behind a caller).
    pub fn try_sync(&self) -> FsResult<()> {
        let target = self.lock().tree.applied;
        if self.durable.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        match self.sync_lock.try_lock() {
            Ok(_g) => self.sync_locked(target),
            Err(_) => Ok(()),
        }
    }

    pub(super) fn sync_locked(&self, target: u64) -> FsResult<()> {
        if self.durable.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let syncer = self.lock().log.syncer().map_err(|_| libc::EIO)?;
        let t0 = std::time::Instant::now();
        syncer.sync().map_err(|e| errno_of(&e))?;
        self.stats.sync_done(t0.elapsed().as_nanos() as u64);
        Ok(())
    }

    /// Every transaction up to this seq is in the local log on disk.
    pub fn durable_through(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// One round of upkeep, run every [`FLUSH_INTERVAL`] by a [`Maintainer`]: changes
    /// nobody synced become durable (the kernel does not pass sync(2) on to FUSE servers),
    /// a checkpoint is taken when enough log has grown, and history older than the
    /// retention is compacted now and then.
    pub fn maintain(&self) -> Result<()> {
        let _ = self.try_sync();
        self.maybe_checkpoint()?;
        let due = {
            let mut st = self.lock();
            let every = std::time::Duration::from_secs((st.retention_ns / 4_000_000_000).clamp(1, 60) as u64);
            let due = st.last_compact.elapsed() >= every;
            if due {
                st.last_compact = std::time::Instant::now();
            }
            due
        };
        if due {
            self.compact(now_ns())?;
        }
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
        let (bytes, dirty, syncer) = {
            let mut st = self.lock();
            let dirty: Vec<Ino> = st.dirty.drain().collect();
            st.since_ckpt = 0;
            let syncer = st.log.syncer();
            (st.tree.checkpoint(), dirty, syncer)
        };
        let synced = (|| -> Result<()> {
            syncer?
                .sync()
                .map_err(self.io("fsync log of", &self.dir.join("txlog")))?;
            for ino in &dirty {
                let p = self.data_path(*ino);
                if let Ok(f) = File::open(&p) {
                    f.sync_data().map_err(self.io("fsync", &p))?;
                }
            }
            // The directories that gained or lost a file.
            let shards: std::collections::BTreeSet<String> = dirty.iter().map(|i| shard_name(*i)).collect();
            for s in shards {
                let d = self.dir.join("data").join(s);
                File::open(&d)
                    .and_then(|d| d.sync_all())
                    .map_err(self.io("fsync", &d))?;
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

    /// Held while reading history (compaction waits for readers; the retention-driven
    /// one skips its round while any reader holds it).
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
        // A long reader of history (a seeding snapshot streams for as long as the network
        // takes) holds the guard: compact at a later round rather than stall the upkeep
        // (and every new reader) behind it.
        let history = match self.history_lock.try_write() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
        };
        self.compact_through_locked(through, history)
    }

    pub(super) fn write_base_meta(&self, meta: &BaseMeta) -> Result<()> {
        let base_dir = self.base_dir();
        std::fs::create_dir_all(&base_dir).map_err(self.io("create", &base_dir))?;
        let mp = base_dir.join("meta.json");
        write_durably(&mp, &serde_json::to_vec(meta).expect("serializable")).map_err(self.io("write", &mp))
    }

    /// Move the base up to `through` (redone from the start if interrupted: every step is
    /// idempotent, and the live files are linked in only after the commit). The base is
    /// built from the log without the volume's lock; the VE's file system waits only while
    /// unchanged live files are linked in, a batch at a time.
    pub(super) fn compact_through(&self, through: u64) -> Result<u64> {
        let history = self.history_lock.write().unwrap_or_else(|p| p.into_inner());
        self.compact_through_locked(through, history)
    }

    /// [`Volume::compact_through`] with the history held exclusively.
    fn compact_through_locked(&self, through: u64, _history: std::sync::RwLockWriteGuard<'_, ()>) -> Result<u64> {
        // The live checkpoint must be past what the log drops.
        self.checkpoint()?;
        let (reader, base) = {
            let mut st = self.lock();
            // From here on, commits note the files they change (see `link_base`).
            st.compacting = Some(HashSet::new());
            (st.log.reader(), st.base)
        };
        let res = reader.map_err(VolumeError::from).and_then(|reader| {
            let (tree, time_ns) = self.build_base(&reader, base, through)?;
            self.link_base(&reader, &tree, through)?;
            Ok(time_ns)
        });
        let mut st = self.lock();
        st.compacting = None;
        let time_ns = res?;
        st.base = BaseMeta {
            version: BASE_VERSION,
            seq: through,
            time_ns,
            pending: 0,
        };
        Ok(st.log.drop_through(through)?)
    }

    /// Apply the log from the base up to `through` to the base's tree and files and commit
    /// it (checkpoint, then meta.json); returns the new base tree and its time.
    pub(super) fn build_base(&self, reader: &LogReader, base: BaseMeta, through: u64) -> Result<(Tree, i64)> {
        let base_dir = self.base_dir();
        let bdata = base_dir.join("data");
        std::fs::create_dir_all(&bdata).map_err(self.io("create", &bdata))?;
        let mut tree = self.base_tree()?;
        self.write_base_meta(&BaseMeta {
            pending: through,
            ..base
        })?;
        let mut applier = Applier::new(&bdata, self.lower());
        let mut freed = Vec::new();
        let mut last_time = base.time_ns;
        reader.for_each::<VolumeError>(base.seq + 1, through, |tx, _| {
            // Never write through a link into the live file (a file changed since the base
            // point was copied when it changed, so this is only a guard).
            let mut unshare = |i| {
                let mut st = self.lock();
                let mut shared = std::mem::take(&mut st.shared);
                let r = self.unshare(&mut shared, i);
                st.shared = shared;
                r
            };
            freed.extend(
                applier
                    .apply(&mut tree, &tx, &mut unshare)
                    .map_err(|e| self.corrupt(format!("compacting: {e}")))?,
            );
            last_time = tx.time_ns;
            Ok(true)
        })?;
        {
            let mut st = self.lock();
            for f in &freed {
                st.shared.remove(f);
            }
        }
        for ino in applier.finish(&tree).map_err(self.io("settle the files of", &bdata))? {
            let p = bdata.join(data_name(ino));
            File::open(&p).and_then(|f| f.sync_all()).map_err(self.io("sync", &p))?;
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
        })?;
        Ok((tree, last_time))
    }

    /// Files unchanged since the new base point share their contents with it again (a
    /// hard link; the live file is copied before its next change). Files changed after
    /// `through` are found in the log up to where `reader` ends and, after that, in what
    /// commits noted while the compaction ran.
    pub(super) fn link_base(&self, reader: &LogReader, tree: &Tree, through: u64) -> Result<()> {
        let mut changed_after: HashSet<Ino> = HashSet::new();
        reader.for_each::<TxLogError>(through + 1, u64::MAX, |t, _| {
            changed_after.extend(op_ino(&t.op));
            Ok(true)
        })?;
        let bdata = self.base_dir().join("data");
        let candidates: Vec<Ino> = tree
            .inodes
            .iter()
            .filter(|(ino, i)| i.kind == FileKind::File && !changed_after.contains(ino))
            .map(|(ino, _)| *ino)
            .collect();
        for batch in candidates.chunks(LINK_BATCH) {
            let mut st = self.lock();
            for ino in batch {
                let changed = st.compacting.as_ref().is_some_and(|c| c.contains(ino));
                if changed
                    || st.shared.contains(ino)
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
                    st.shared.insert(*ino);
                }
            }
        }
        Ok(())
    }

    pub(super) fn corrupt(&self, reason: String) -> VolumeError {
        VolumeError::Corrupt {
            volume: self.name.clone(),
            reason,
        }
    }
}

/// How often a [`Maintainer`] runs [`Volume::maintain`]: changes nobody syncs are durable
/// within this time.
pub const FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Runs a volume's upkeep on a thread of its own, whether or not the volume is mounted;
/// stops (and waits for the thread) when dropped.
pub struct Maintainer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Maintainer {
    pub fn start(vol: &Arc<Volume>) -> std::io::Result<Maintainer> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let weak = Arc::downgrade(vol);
        let thread = std::thread::Builder::new()
            .name("vessel-fs-upkeep".into())
            .spawn(move || {
                // Wakes every FLUSH_INTERVAL; ends when the Maintainer is dropped.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(FLUSH_INTERVAL) {
                    let Some(v) = weak.upgrade() else { break };
                    if let Err(e) = v.maintain() {
                        eprintln!("vessel-fs: {e}");
                    }
                }
            })?;
        Ok(Maintainer {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Maintainer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Files linked into the base per hold of the volume's lock.
const LINK_BATCH: usize = 256;
