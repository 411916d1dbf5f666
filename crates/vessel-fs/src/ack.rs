//! The acknowledgement seam: where a committed transaction is handed to other parties, and
//! what a sync waits for besides the local log.
//!
//! A volume calls [`Acks::committed`] for every transaction it commits, in commit order,
//! right after the transaction is in its log; a `sync` (fsync, fdatasync, O_SYNC, syncfs)
//! first makes the local log durable through the last commit, then calls [`Acks::wait`]
//! for it and answers only when that returns. [`LocalOnly`] is the one-node case: nothing
//! to hand on, nothing to wait for. A replicating implementation (the next step: streaming
//! to replicas) hands transactions to its senders in `committed` and blocks in `wait` until
//! every in-sync replica has them durably, or the timeout passes (the sync then fails with
//! EIO rather than acknowledge with too few copies).

use crate::tx::Tx;
use std::time::Duration;

/// How long a sync waits for acknowledgements before it fails (EIO).
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("transaction {seq} was not acknowledged within {waited_ms} ms{}", if .why.is_empty() { String::new() } else { format!(" ({})", .why) })]
    Timeout { seq: u64, waited_ms: u64, why: String },
    #[error("acknowledging transaction {seq}: {reason}")]
    Failed { seq: u64, reason: String },
}

/// Parties besides the local log that a sync waits for.
pub trait Acks: Send + Sync {
    /// `tx` is committed locally (in the log, applied). Called under the volume's lock, in
    /// seq order, for every transaction: it must not block.
    fn committed(&self, tx: &Tx);

    /// A sync of `seq` starts (before the local log's fdatasync): a replicating
    /// implementation asks its replicas to make `seq` durable now, so their fdatasyncs run
    /// while the local one does. Must not block.
    fn syncing(&self, _seq: u64) {}

    /// Return once every transaction up to `seq` is acknowledged (the local log is durable
    /// through `seq` already), or fail after at most `timeout`.
    fn wait(&self, seq: u64, timeout: Duration) -> Result<(), AckError>;
}

/// One node, no replicas: the local log's fdatasync is the whole acknowledgement.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalOnly;

impl Acks for LocalOnly {
    fn committed(&self, _tx: &Tx) {}

    fn wait(&self, _seq: u64, _timeout: Duration) -> Result<(), AckError> {
        Ok(())
    }
}
