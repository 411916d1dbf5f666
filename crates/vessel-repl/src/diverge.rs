//! Where a replica's log leaves the writer's. One epoch has one writer, so `(epoch, seq)`
//! names one transaction: two logs hold the same transaction at `seq` iff their epoch
//! histories give the same epoch for `seq`. The divergence point is found by comparing
//! histories (as Kafka's leader epochs after KIP-101), never by the high watermark alone:
//! a replica may hold as many transactions as the writer and still disagree on the last
//! few (a tail written by an old writer that the new one never saw).
//!
//! Cut-point semantics: the replica keeps seq `1..=s` (s = [`divergence`]) and truncates
//! everything after `s` (`TxLog::truncate_after(s)`, then `EpochHistory::cut_after(s)`);
//! a replica that applied the cut tail rebuilds its live state from its base plus its log
//! through `s`. It then continues from `s + 1` with the writer's transactions (see
//! [`crate::catchup`]). A seq below a history's first entry counts as epoch 0 (written
//! before the volume was replicated, by its one node): both copies agree there.

use vessel_fs::epochs::EpochHistory;

/// The largest `s <= min(writer_last, replica_last)` such that for every seq `<= s` both
/// histories give the same epoch. 0 when they disagree on seq 1 or either log is empty.
pub fn divergence(writer: &EpochHistory, writer_last: u64, replica: &EpochHistory, replica_last: u64) -> u64 {
    let upto = writer_last.min(replica_last);
    // epoch_at is a step function changing only at an entry's first_seq: compare at seq 1
    // and at every first_seq of either history, in increasing order.
    let mut points: Vec<u64> = writer
        .entries
        .iter()
        .chain(replica.entries.iter())
        .map(|e| e.first_seq.max(1))
        .chain(std::iter::once(1))
        .filter(|&p| p <= upto)
        .collect();
    points.sort_unstable();
    points.dedup();
    for p in points {
        if writer.epoch_at(p).unwrap_or(0) != replica.epoch_at(p).unwrap_or(0) {
            return p - 1;
        }
    }
    upto
}

/// Whether the replica must cut its log: it holds transactions after the divergence point.
pub fn must_cut(agrees_through: u64, replica_last: u64) -> bool {
    replica_last > agrees_through
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_fs::epochs::EpochStart;

    fn hist(entries: &[(u64, u64)]) -> EpochHistory {
        EpochHistory {
            version: 1,
            entries: entries
                .iter()
                .map(|&(epoch, first_seq)| EpochStart { epoch, first_seq })
                .collect(),
        }
    }

    #[test]
    fn identical_logs_agree_through_the_end() {
        let h = hist(&[(1, 1), (2, 7)]);
        assert_eq!(divergence(&h, 10, &h, 10), 10);
        assert!(!must_cut(10, 10));
    }

    #[test]
    fn a_replica_behind_agrees_through_its_last() {
        let w = hist(&[(1, 1), (2, 7)]);
        assert_eq!(divergence(&w, 10, &hist(&[(1, 1)]), 5), 5);
        assert_eq!(divergence(&w, 10, &hist(&[(1, 1), (2, 7)]), 8), 8);
    }

    #[test]
    fn a_replica_ahead_in_the_same_epoch_is_cut_to_the_writer() {
        // The old writer sent 9..=12 to this replica, the new writer (same epochs) stopped at 8.
        let w = hist(&[(1, 1), (3, 9)]);
        let r = hist(&[(1, 1)]);
        assert_eq!(divergence(&w, 8, &r, 12), 8);
        assert!(must_cut(8, 12));
    }

    #[test]
    fn a_tail_from_an_epoch_the_writer_never_saw_is_cut() {
        // Replica took 6..=9 in epoch 2 from a writer that died; the new writer (epoch 3)
        // never saw epoch 2 and wrote from 6.
        let w = hist(&[(1, 1), (3, 6)]);
        let r = hist(&[(1, 1), (2, 6)]);
        assert_eq!(divergence(&w, 12, &r, 9), 5);
    }

    #[test]
    fn kip_101_an_old_epoch_closed_earlier_by_the_writer() {
        // Same length, same last epoch at the replica's end would fool a high watermark:
        // the replica's epoch-1 tail 6..=8 was never acknowledged; the writer's history
        // closes epoch 1 at 5 and wrote 6.. in epoch 2.
        let w = hist(&[(1, 1), (2, 6)]);
        let r = hist(&[(1, 1)]);
        assert_eq!(divergence(&w, 8, &r, 8), 5);
        // And the symmetric case: the writer still in epoch 1, the replica's tail in 2.
        assert_eq!(divergence(&r, 8, &w, 8), 5);
    }

    #[test]
    fn disagreement_on_the_first_seq_gives_zero() {
        assert_eq!(divergence(&hist(&[(2, 1)]), 4, &hist(&[(1, 1)]), 4), 0);
    }

    #[test]
    fn empty_histories_and_seq_zero() {
        let e = EpochHistory::new();
        assert_eq!(divergence(&e, 0, &e, 0), 0);
        // Logs written before replication (no history) agree with each other.
        assert_eq!(divergence(&e, 7, &e, 4), 4);
        // An empty replica agrees through 0 with anyone.
        assert_eq!(divergence(&hist(&[(1, 1)]), 5, &e, 0), 0);
        // Pre-replication seqs (epoch 0) then epoch 2 on the writer only.
        assert_eq!(divergence(&hist(&[(2, 4)]), 9, &e, 9), 3);
        // An entry at first_seq 0 is read as seq 1.
        assert_eq!(divergence(&hist(&[(1, 0)]), 3, &hist(&[(1, 1)]), 3), 3);
    }

    #[test]
    fn several_epochs_agree_up_to_the_first_difference() {
        let w = hist(&[(1, 1), (2, 4), (4, 9), (6, 15)]);
        let r = hist(&[(1, 1), (2, 4), (5, 9)]);
        assert_eq!(divergence(&w, 20, &r, 18), 8);
        let r2 = hist(&[(1, 1), (2, 4), (4, 9)]);
        assert_eq!(divergence(&w, 20, &r2, 18), 14);
    }
}
