//! Cutting a divergent tail: a new writer's log wins, and a replica whose log runs past
//! the divergence point `s` drops everything after it. The applied tail changed the live
//! tree and data files in place, so the live state is rebuilt as `base + log through s`:
//! the base's checkpoint becomes the live one, the live data files become hard links to
//! the base's (shared, as after compaction: copied before their next change), and the
//! ordinary open replays the log from the base on.
//!
//! Crash safety: a durable intent `<dir>/cut.json` {version, seq} is written before
//! anything changes and removed only after the checkpoint that follows the replay; every
//! open that finds it redoes the whole cut (each step is idempotent). The epoch history
//! follows the log's end at open (see `epochfile`).
//!
//! A cut below the base's seq is refused: the base cannot go back; such a copy is
//! seeded from a snapshot ([`crate::seed`]).

use super::*;

/// Version of `cut.json`.
pub const CUT_VERSION: u32 = 1;
/// Name of the intent file in a volume's directory.
pub const CUT_FILE: &str = "cut.json";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct CutIntent {
    version: u32,
    /// The log is cut after this seq.
    seq: u64,
}

/// Why a cut to `seq` cannot be made on a volume with this base (None: it can).
fn refusal(base: &BaseMeta, seq: u64) -> Option<String> {
    if seq < base.seq {
        return Some(format!(
            "cannot cut the log after seq {seq}: history through seq {} is compacted into the base; seed this copy from a snapshot instead",
            base.seq
        ));
    }
    if base.pending > seq {
        return Some(format!(
            "cannot cut the log after seq {seq}: an unfinished compaction through seq {} may have moved the base past it; seed this copy from a snapshot instead",
            base.pending
        ));
    }
    None
}

impl Volume {
    /// Cut the log of the (closed) volume in `dir` after `seq` and make its live state
    /// `base + log through seq`; returns the volume, opened, and how many transactions
    /// were cut. `seq` at or past the log's end cuts nothing. `seq` below the base's seq
    /// is refused (a snapshot is needed). An interrupted cut is finished by the next open.
    pub fn cut_after(dir: &Path, lower: Option<Arc<Lower>>, seq: u64) -> Result<(Volume, u64)> {
        Self::cut_after_with(dir, lower, seq, VolumeOptions::default())
    }

    pub fn cut_after_with(
        dir: &Path,
        lower: Option<Arc<Lower>>,
        seq: u64,
        opts: VolumeOptions,
    ) -> Result<(Volume, u64)> {
        let name = Self::read_meta(dir)?.name;
        let cut = {
            let _lock = lock_volume(dir, &name)?;
            let base = read_base_meta(dir, &name)?;
            if let Some(reason) = refusal(&base, seq) {
                return Err(VolumeError::Op(reason, name));
            }
            let (mut log, _) = TxLog::open_with(&dir.join("txlog"), &name, opts.segment_bytes)?;
            let pending = dir.join(CUT_FILE).exists();
            if log.last_seq() <= seq && !pending {
                0
            } else {
                let p = dir.join(CUT_FILE);
                let intent = CutIntent {
                    version: CUT_VERSION,
                    seq,
                };
                write_durably(&p, &serde_json::to_vec(&intent).expect("serializable"))
                    .map_err(io_err(&name, "write", &p))?;
                log.truncate_after(seq)?
            }
        };
        Ok((Self::open_with(dir, lower, opts)?, cut))
    }
}

/// Take the volume's `flock` (as [`Volume::open`] does): nobody has it open meanwhile.
fn lock_volume(dir: &Path, volume: &str) -> Result<nix::fcntl::Flock<File>> {
    let p = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(io_err(volume, "open", &p))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        VolumeError::Op(
            "the volume is in use: close it before cutting its log".into(),
            volume.to_string(),
        )
    })
}

/// At open, before the checkpoint is read: redo a cut whose intent is on disk (the log,
/// then the live checkpoint and data files from the base). Returns whether there was one
/// (the caller checkpoints after the replay, then calls [`finish`]).
pub(super) fn redo(dir: &Path, volume: &str, log: &mut TxLog, base: &BaseMeta) -> Result<bool> {
    let p = dir.join(CUT_FILE);
    let Some(intent) = read_versioned::<CutIntent>(&p, volume, |c| c.version, CUT_VERSION)? else {
        return Ok(false);
    };
    if let Some(reason) = refusal(base, intent.seq) {
        return Err(VolumeError::Op(reason, volume.to_string()));
    }
    log.truncate_after(intent.seq)?;
    let io = |what, path: &Path| io_err(volume, what, path);
    // The live tree: the base's checkpoint (none: the base is the initial tree).
    let (ck, bck) = (dir.join("checkpoint"), dir.join("base").join("checkpoint"));
    match std::fs::read(&bck) {
        Ok(b) => write_durably(&ck, &b).map_err(io("write", &ck))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::remove_file(&ck) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("remove", &ck)(e)),
            _ => File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))?,
        },
        Err(e) => return Err(io("read", &bck)(e)),
    }
    // The live files: the base's, shared (hard links; copied before their next change).
    let (data, bdata) = (dir.join("data"), dir.join("base").join("data"));
    for (_, f) in data_files(&data) {
        std::fs::remove_file(&f).map_err(io("remove", &f))?;
    }
    layout_data(&data).map_err(io("lay out", &data))?;
    for (ino, b) in data_files(&bdata) {
        let l = data.join(data_name(ino));
        std::fs::hard_link(&b, &l).map_err(io("link", &l))?;
    }
    for i in 0..DATA_SHARDS {
        let d = data.join(shard_name(i));
        File::open(&d).and_then(|d| d.sync_all()).map_err(io("fsync", &d))?;
    }
    Ok(true)
}

/// The cut is complete (its replay is checkpointed): drop the intent.
pub(super) fn finish(dir: &Path, volume: &str) -> Result<()> {
    let p = dir.join(CUT_FILE);
    std::fs::remove_file(&p).map_err(io_err(volume, "remove", &p))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(volume, "fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(seq: u64, pending: u64) -> BaseMeta {
        BaseMeta {
            version: BASE_VERSION,
            seq,
            time_ns: 0,
            pending,
        }
    }

    #[test]
    fn a_cut_inside_the_base_or_an_unfinished_compaction_is_refused() {
        assert_eq!(refusal(&base(0, 0), 0), None);
        assert_eq!(refusal(&base(10, 0), 10), None);
        assert!(refusal(&base(10, 0), 9).unwrap().contains("snapshot"));
        assert!(refusal(&base(10, 20), 15).unwrap().contains("unfinished compaction"));
        assert_eq!(refusal(&base(10, 20), 20), None);
    }
}
