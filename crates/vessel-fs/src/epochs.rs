//! A copy's epoch history: for each writer epoch, the first seq written in it (as Kafka's
//! leader-epoch cache, KIP-101). Two copies agree on every transaction below the point
//! where their histories first differ, because one epoch has one writer: `(epoch, seq)`
//! names one transaction. The history is what a new writer and a replica compare to find
//! where a replica's log diverges (never by the high watermark alone).

use serde::{Deserialize, Serialize};

/// Version of `epochs.json`.
pub const EPOCHS_VERSION: u32 = 1;

/// The first transaction written in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    pub epoch: u64,
    pub first_seq: u64,
}

/// Epochs in increasing order, each with its first seq (increasing too; an epoch in which
/// nothing was written has no entry).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHistory {
    pub version: u32,
    pub entries: Vec<EpochStart>,
}

impl EpochHistory {
    pub fn new() -> Self {
        EpochHistory {
            version: EPOCHS_VERSION,
            entries: Vec::new(),
        }
    }

    /// Note that transaction `seq` was written in `epoch`; returns whether that added an
    /// entry (a new epoch). Entries after `seq` (a tail cut since) are dropped first.
    pub fn note(&mut self, epoch: u64, seq: u64) -> bool {
        self.cut_after(seq.saturating_sub(1));
        match self.entries.last() {
            Some(l) if l.epoch >= epoch => false,
            _ => {
                self.entries.push(EpochStart { epoch, first_seq: seq });
                true
            }
        }
    }

    /// The epoch transaction `seq` was written in (None: before the first entry).
    pub fn epoch_at(&self, seq: u64) -> Option<u64> {
        self.entries.iter().rev().find(|e| e.first_seq <= seq).map(|e| e.epoch)
    }

    /// Forget entries that start after `seq` (the log was cut there).
    pub fn cut_after(&mut self, seq: u64) {
        self.entries.retain(|e| e.first_seq <= seq);
    }

    pub fn last_epoch(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_new_epochs_only_and_forgets_cut_ones() {
        let mut h = EpochHistory::new();
        assert!(h.note(1, 1));
        assert!(!h.note(1, 2));
        assert!(h.note(3, 10));
        assert_eq!(h.epoch_at(9), Some(1));
        assert_eq!(h.epoch_at(10), Some(3));
        assert_eq!(h.epoch_at(0), None);
        // A cut to 5, then epoch 4 from seq 6.
        assert!(h.note(4, 6));
        assert_eq!(
            h.entries,
            vec![
                EpochStart { epoch: 1, first_seq: 1 },
                EpochStart { epoch: 4, first_seq: 6 }
            ]
        );
        assert_eq!(h.last_epoch(), 4);
    }
}
