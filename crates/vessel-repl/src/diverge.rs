//! Where a replica's log leaves the writer's (minimal version; the full one with its
//! cases comes with the pure-decisions work).

use vessel_fs::epochs::EpochHistory;

/// The largest `s <= min(writer_last, replica_last)` such that both logs have the same
/// epoch for every seq `<= s`.
pub fn divergence(writer: &EpochHistory, writer_last: u64, replica: &EpochHistory, replica_last: u64) -> u64 {
    let end = writer_last.min(replica_last);
    // Points where either history changes epoch: between them both are constant.
    let mut points: Vec<u64> = writer
        .entries
        .iter()
        .chain(replica.entries.iter())
        .map(|e| e.first_seq)
        .filter(|s| *s >= 1 && *s <= end)
        .collect();
    points.push(1);
    points.sort_unstable();
    points.dedup();
    for p in points {
        if writer.epoch_at(p) != replica.epoch_at(p) {
            return p - 1;
        }
    }
    end
}
