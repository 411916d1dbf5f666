//! What the protocol reads of a local copy. (Until the volume keeps its epoch history in
//! `epochs.json`, it is derived from the retained log here.)

use vessel_fs::epochs::EpochHistory;
use vessel_fs::Volume;

/// The copy's last seq.
pub fn last_seq(vol: &Volume) -> u64 {
    vol.log_status().0
}

/// The first seq the copy's log still holds.
pub fn first_seq(vol: &Volume) -> u64 {
    vol.base_meta().seq + 1
}

/// The copy's epoch history.
pub fn history(vol: &Volume) -> EpochHistory {
    let mut h = EpochHistory::new();
    let _g = vol.history_guard();
    let base = vol.base_meta().seq;
    if let Ok(r) = vol.log_reader() {
        let _ = r.for_each::<vessel_fs::TxLogError>(base + 1, u64::MAX, |tx, _| {
            h.note(tx.epoch, tx.seq);
            Ok(true)
        });
    }
    h
}
