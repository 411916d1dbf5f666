//! What the protocol reads of a local copy.

use vessel_fs::epochs::EpochHistory;
use vessel_fs::Volume;

/// The copy's last seq.
pub fn last_seq(vol: &Volume) -> u64 {
    vol.last_seq()
}

/// The first seq the copy's log still holds.
pub fn first_seq(vol: &Volume) -> u64 {
    vol.first_retained_seq()
}

/// The copy's epoch history.
pub fn history(vol: &Volume) -> EpochHistory {
    vol.epoch_history()
}
