//! The writer's decisions as pure functions (openraft's engine style): inputs are the
//! volume's config as last read from the store, each replica's progress, the writer's
//! committed seq and the time; outputs are [`Action`]s the runtime carries out (a CAS in
//! the store, a cut, a catch-up or a seed) and [`AckDecision`]s for pending syncs.
//!
//! Rules:
//! - A replica in the in-sync set that leaves an answer outstanding (a transaction sent,
//!   or the divergence handshake) longer than the ack timeout without acknowledging
//!   progress, or is disconnected longer than that, is removed by CAS. Until the CAS has
//!   succeeded (the config here changed) it still counts for syncs: no sync is
//!   acknowledged without it.
//! - A replica outside the in-sync set that acknowledged everything the writer committed
//!   (and has nothing outstanding) is added back by CAS.
//! - A sync of `seq` is acknowledged iff every in-sync replica other than the writer
//!   acknowledged `>= seq` and at least `min_replicas` copies are in sync.
//! - A new writer reconciles each replica from its hello (epoch history and last seq):
//!   cut after the divergence point, then log tail or snapshot ([`reconcile`]).
//! - The writer after a failure is the reachable in-sync replica with the longest log
//!   ([`choose_writer`]); every in-sync replica has every acknowledged transaction, so the
//!   rule only decides how many unacknowledged ones survive.
//!
//! Times are milliseconds on the caller's monotonic clock (any origin).

use crate::catchup::{plan, Plan};
use crate::config::{NodeId, VolumeConfig};
use crate::diverge::divergence;
use std::fmt;
use vessel_fs::epochs::EpochHistory;

/// Default time a replica may leave an answer outstanding before it is removed.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 2_000;
/// Default time a sync waits before it fails (EIO).
pub const DEFAULT_SYNC_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub ack_ms: u64,
    pub sync_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            ack_ms: DEFAULT_ACK_TIMEOUT_MS,
            sync_ms: DEFAULT_SYNC_TIMEOUT_MS,
        }
    }
}

/// What the writer knows of one replica in its current epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub node: NodeId,
    /// Highest seq the replica acknowledged as durable in this epoch, after its
    /// divergence handshake (its log agrees with the writer's through it).
    pub acked_seq: u64,
    /// Since when an answer has been outstanding without acknowledged progress (the oldest
    /// unacknowledged send, or the handshake); None: nothing outstanding.
    pub waiting_since: Option<u64>,
    /// Since when the connection is down; None: connected.
    pub disconnected_since: Option<u64>,
}

impl Progress {
    /// A replica the writer just started talking to.
    pub fn new(node: &str) -> Self {
        Progress {
            node: node.to_string(),
            acked_seq: 0,
            waiting_since: None,
            disconnected_since: None,
        }
    }
}

/// Why a replica leaves the in-sync set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    /// It left an answer outstanding this long.
    NoAck { waited_ms: u64 },
    /// Its connection has been down this long.
    Disconnected { for_ms: u64 },
}

impl fmt::Display for Lag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lag::NoAck { waited_ms } => write!(f, "no acknowledgement for {waited_ms} ms"),
            Lag::Disconnected { for_ms } => write!(f, "disconnected for {for_ms} ms"),
        }
    }
}

/// Something the runtime does for the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// CAS the config to `config.without(node)`.
    RemoveFromInSync { node: NodeId, reason: Lag },
    /// CAS the config to `config.with_in_sync(node)`.
    AddToInSync { node: NodeId },
    /// Tell the replica to truncate its log after `after` (see [`crate::diverge`]).
    Cut { node: NodeId, after: u64 },
    /// Stream the writer's log to the replica from `from` (`from` = committed + 1: nothing
    /// to resend, the live stream continues there).
    CatchUp { node: NodeId, from: u64 },
    /// Seed the replica from a snapshot, then stream the rest.
    Seed { node: NodeId },
}

/// Whether a pending sync may be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckDecision {
    Ack,
    /// Not yet; `why` says what is missing, for `ve show` and the logs.
    Wait {
        why: String,
    },
    /// The sync timeout passed: fail it (EIO).
    Fail {
        why: String,
    },
}

/// The writer's view at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs<'a> {
    /// The config as last read or written by this writer.
    pub config: &'a VolumeConfig,
    /// One entry per replica other than the writer; a replica without one counts as
    /// disconnected since time 0.
    pub progress: &'a [Progress],
    /// The writer's last committed seq.
    pub committed: u64,
    pub now: u64,
    pub timeouts: Timeouts,
}

impl Inputs<'_> {
    fn progress_of(&self, node: &str) -> Progress {
        self.progress
            .iter()
            .find(|p| p.node == node)
            .cloned()
            .unwrap_or(Progress {
                disconnected_since: Some(0),
                ..Progress::new(node)
            })
    }

    fn others(&self) -> impl Iterator<Item = &NodeId> {
        self.config.replicas.iter().filter(move |n| **n != self.config.writer)
    }

    /// In-sync bookkeeping: removals and additions, in `replicas` order.
    pub fn tick(&self) -> Vec<Action> {
        let ack = self.timeouts.ack_ms;
        let mut out = Vec::new();
        for node in self.others() {
            let p = self.progress_of(node);
            if self.config.is_in_sync(node) {
                let disc = p.disconnected_since.map(|t| self.now.saturating_sub(t));
                let wait = p.waiting_since.map(|t| self.now.saturating_sub(t));
                let reason = match (disc, wait) {
                    (Some(d), _) if d >= ack => Some(Lag::Disconnected { for_ms: d }),
                    (_, Some(w)) if w >= ack => Some(Lag::NoAck { waited_ms: w }),
                    _ => None,
                };
                if let Some(reason) = reason {
                    out.push(Action::RemoveFromInSync {
                        node: node.clone(),
                        reason,
                    });
                }
            } else if p.disconnected_since.is_none() && p.waiting_since.is_none() && p.acked_seq >= self.committed {
                out.push(Action::AddToInSync { node: node.clone() });
            }
        }
        out
    }

    /// May the sync of `seq`, waiting since `since`, be acknowledged?
    pub fn ack_decision(&self, seq: u64, since: u64) -> AckDecision {
        let c = self.config;
        let mut why = Vec::new();
        if c.in_sync.len() < c.min_replicas {
            let out: Vec<String> = self
                .others()
                .filter(|n| !c.is_in_sync(n))
                .map(|n| format!("node {n} {}", self.state_of(&self.progress_of(n))))
                .collect();
            why.push(format!(
                "{} of {} required copies in sync: {}",
                c.in_sync.len(),
                c.min_replicas,
                if out.is_empty() {
                    "no other copy exists".to_string()
                } else {
                    out.join(", ")
                }
            ));
        }
        let behind: Vec<String> = c
            .in_sync
            .iter()
            .filter(|n| **n != c.writer)
            .map(|n| self.progress_of(n))
            .filter(|p| p.acked_seq < seq)
            .map(|p| format!("node {} (acked {} of {seq})", p.node, p.acked_seq))
            .collect();
        if !behind.is_empty() {
            why.push(format!("waiting for in-sync {}", behind.join(", ")));
        }
        if why.is_empty() {
            return AckDecision::Ack;
        }
        let why = why.join("; ");
        if self.now.saturating_sub(since) >= self.timeouts.sync_ms {
            AckDecision::Fail { why }
        } else {
            AckDecision::Wait { why }
        }
    }

    fn state_of(&self, p: &Progress) -> String {
        if p.disconnected_since.is_some() {
            "is disconnected".to_string()
        } else if p.acked_seq < self.committed {
            format!("is catching up (acked {} of {})", p.acked_seq, self.committed)
        } else {
            "is about to rejoin".to_string()
        }
    }
}

/// A replica's answer to a new writer: where its log stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub node: NodeId,
    pub history: EpochHistory,
    pub last: u64,
    /// Its base seq (its log holds `base + 1 ..= last`; 0 when nothing was compacted).
    pub base: u64,
}

/// The writer's log as a replica is reconciled against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterLog<'a> {
    pub history: &'a EpochHistory,
    pub last: u64,
    /// First seq its log still holds (base + 1).
    pub first_retained: u64,
}

/// What to do with a replica after its hello: cut after the divergence point when it
/// holds more, then a log tail or a snapshot. A replica whose base lies past the point
/// (its cut tail is already folded into the base) cannot cut: it is seeded.
pub fn reconcile(w: WriterLog<'_>, h: &Hello) -> Vec<Action> {
    let s = divergence(w.history, w.last, &h.history, h.last);
    let node = h.node.clone();
    if s < h.base {
        return vec![Action::Seed { node }];
    }
    let mut out = Vec::new();
    if h.last > s {
        out.push(Action::Cut {
            node: node.clone(),
            after: s,
        });
    }
    out.push(match plan(s, w.first_retained, w.last) {
        Plan::UpToDate => Action::CatchUp { node, from: s + 1 },
        Plan::Tail { from } => Action::CatchUp { node, from },
        Plan::Snapshot => Action::Seed { node },
    });
    out
}

/// A node that could take over as writer, with where its log ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    pub reachable: bool,
    /// The epoch of its last transaction (its history's last epoch).
    pub last_epoch: u64,
    pub last_seq: u64,
}

/// The next writer: a reachable in-sync node with the highest `(last_epoch, last_seq)`;
/// ties go to the earlier node in `in_sync`. None: no in-sync node is reachable (the
/// volume waits; a node outside the in-sync set may miss acknowledged transactions).
pub fn choose_writer(config: &VolumeConfig, candidates: &[Candidate]) -> Option<NodeId> {
    let mut best: Option<&Candidate> = None;
    for node in &config.in_sync {
        let Some(c) = candidates.iter().find(|c| &c.node == node && c.reachable) else {
            continue;
        };
        if best.is_none_or(|b| (c.last_epoch, c.last_seq) > (b.last_epoch, b.last_seq)) {
            best = Some(c);
        }
    }
    best.map(|c| c.node.clone())
}

#[cfg(test)]
mod tests;
