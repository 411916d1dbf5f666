//! The copy's epoch history on disk (`<dir>/epochs.json`, see [`crate::epochs`]): noted
//! for every transaction recorded (a local commit or a replica's append), written durably
//! only when a new epoch starts, before the transaction that starts it reaches the log.
//! So the file may name a first seq the log never got (a crash in between); opening the
//! volume cuts the history back to the log's end.
//!
//! A volume made before the file existed derives it at its first open from the retained
//! log (the first transaction of each epoch). The compacted prefix (seq 1 through the
//! base) is no longer in the log: it is given the epoch of the first retained transaction
//! (or, with nothing retained, the promised epoch), which is an upper bound (epochs never
//! go back along a log) and exact for every volume written before replication (epoch 1).
//! Only a divergence point inside the base could depend on it, and a cut there is refused
//! anyway (such a copy is seeded from a snapshot).

use super::*;
use crate::epochs::{EpochHistory, EPOCHS_VERSION};
use crate::txlog::TxLog;

/// Name of the history file in a volume's directory.
pub const EPOCHS_FILE: &str = "epochs.json";

/// Load the history of the volume in `dir` for `log`, deriving it from the log when the
/// file is missing or does not match the log's last epoch; writes it back if it changed.
pub(super) fn load(dir: &Path, volume: &str, log: &TxLog, promised: u64) -> Result<EpochHistory> {
    let p = dir.join(EPOCHS_FILE);
    let found: Option<EpochHistory> = read_versioned(&p, volume, |h: &EpochHistory| h.version, EPOCHS_VERSION)?;
    let mut h = match found.clone() {
        Some(mut h) => {
            h.cut_after(log.last_seq());
            // The log's last epoch must be the history's last (0: nothing in the current
            // segment to tell, e.g. just after compaction).
            if log.last_epoch() != 0 && h.last_epoch() != log.last_epoch() {
                derive(log, promised)?
            } else {
                h
            }
        }
        None => derive(log, promised)?,
    };
    h.version = EPOCHS_VERSION;
    if found.as_ref() != Some(&h) {
        store(&p, &h).map_err(io_err(volume, "write", &p))?;
    }
    Ok(h)
}

/// The history as the retained log tells it (see the module's doc for the compacted
/// prefix).
pub(super) fn derive(log: &TxLog, promised: u64) -> Result<EpochHistory> {
    let mut h = EpochHistory::new();
    let reader = log.reader()?;
    let first = log.first_seq();
    let mut first_epoch = None;
    reader.for_each::<VolumeError>(first, u64::MAX, |tx, _| {
        if first_epoch.is_none() {
            first_epoch = Some(tx.epoch);
            if tx.seq > 1 {
                h.note(tx.epoch, 1);
            }
        }
        h.note(tx.epoch, tx.seq);
        Ok(true)
    })?;
    if first_epoch.is_none() && log.last_seq() > 0 {
        h.note(promised.max(1), 1);
    }
    Ok(h)
}

pub(super) fn store(p: &Path, h: &EpochHistory) -> std::io::Result<()> {
    write_durably(p, &serde_json::to_vec(h).expect("serializable"))
}

impl Volume {
    /// This copy's epoch history: for each epoch, the first seq written in it.
    /// (An epoch noted for a transaction that then did not apply is not reported.)
    pub fn epoch_history(&self) -> EpochHistory {
        let st = self.lock();
        let mut h = st.epochs.clone();
        h.cut_after(st.log.last_seq());
        h
    }

    /// Seq of the last transaction in the log (durable or not: see
    /// [`Volume::durable_through`]).
    pub fn last_seq(&self) -> u64 {
        self.lock().log.last_seq()
    }

    /// The first seq the log still holds (normally the base's seq + 1): a copy that needs
    /// an older one is seeded from a snapshot.
    pub fn first_retained_seq(&self) -> u64 {
        self.lock().log.first_seq()
    }

    /// Note `tx` in the history before it is recorded; a new epoch is written durably
    /// first (rare: once per writer change).
    pub(super) fn note_epoch(&self, st: &mut State, tx: &Tx) -> std::io::Result<()> {
        let fast = st
            .epochs
            .entries
            .last()
            .is_some_and(|l| l.epoch >= tx.epoch && l.first_seq <= tx.seq);
        if fast {
            return Ok(());
        }
        let mut h = st.epochs.clone();
        h.note(tx.epoch, tx.seq);
        if h != st.epochs {
            store(&self.dir.join(EPOCHS_FILE), &h)?;
            st.epochs = h;
        }
        Ok(())
    }
}
