//! How a replica that agrees with the writer through some seq gets the rest: from the
//! writer's log when the log still holds the next transaction, else from a snapshot (the
//! writer's base: checkpoint and data files as of base seq B, then the log from B + 1,
//! then the live stream).

/// What the writer sends a replica that agrees with it through `agrees_through`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// The replica has everything the writer committed: the live stream continues.
    UpToDate,
    /// Send the writer's log from `from` (= agrees_through + 1).
    Tail { from: u64 },
    /// The writer's log no longer holds `agrees_through + 1`: seed from a snapshot.
    Snapshot,
}

/// Decide how a replica catches up. `writer_first_retained` is the first seq the writer's
/// log still holds (base seq + 1; 1 when nothing was compacted); `writer_last` its last.
pub fn plan(agrees_through: u64, writer_first_retained: u64, writer_last: u64) -> Plan {
    if agrees_through >= writer_last {
        Plan::UpToDate
    } else if agrees_through + 1 >= writer_first_retained {
        Plan::Tail {
            from: agrees_through + 1,
        }
    } else {
        Plan::Snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_to_date_tail_or_snapshot() {
        assert_eq!(plan(10, 1, 10), Plan::UpToDate);
        assert_eq!(plan(0, 1, 0), Plan::UpToDate);
        assert_eq!(plan(4, 1, 10), Plan::Tail { from: 5 });
        // The log holds 5 exactly: still a tail.
        assert_eq!(plan(4, 5, 10), Plan::Tail { from: 5 });
        // Compacted through 5: the replica needs 5, gone.
        assert_eq!(plan(4, 6, 10), Plan::Snapshot);
        // An empty replica of a compacted volume.
        assert_eq!(plan(0, 3, 10), Plan::Snapshot);
        // An empty replica of a fresh volume replays the whole log.
        assert_eq!(plan(0, 1, 10), Plan::Tail { from: 1 });
        // A writer compacted through everything it has: a replica at the end is up to date.
        assert_eq!(plan(10, 11, 10), Plan::UpToDate);
    }
}
