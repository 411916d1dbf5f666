//! The invariants, checked after every step (and at the events that can break them):
//! 1. every acknowledged sync's transactions are on every in-sync replica's durable log;
//! 2. ... and on every later writer (checked when a node takes over);
//! 3. no two writers acknowledge in the same epoch, and acknowledged logs never conflict;
//! 4. a replica never accepts an older epoch than one it accepted before;
//! 5. a cut never removes an acknowledged transaction; an acknowledged sync had at least
//!    min_replicas durable copies; (epoch, seq) names one transaction (replica.rs);
//! 6. (after heal + quiesce, in `World::quiesce`) all copies hold identical logs.

use crate::world::{idx, Disk, Entry, Node};
use std::collections::BTreeMap;
use vessel_repl::config::VolumeConfig;

#[derive(Debug, Default)]
pub struct Checker {
    /// The acknowledged prefix: the epoch of each seq 1..=len.
    pub acked: Vec<Entry>,
    /// Which node acknowledged in each epoch.
    ack_writer: BTreeMap<u64, usize>,
    /// The highest epoch each node accepted (never forgotten, crash or not).
    max_accepted: Vec<u64>,
    pub violations: Vec<String>,
}

impl Checker {
    pub fn new(n: usize) -> Self {
        Checker {
            max_accepted: vec![0; n],
            ..Checker::default()
        }
    }

    pub fn on_ack(&mut self, node: usize, epoch: u64, log: &[Entry]) {
        if let Some(&other) = self.ack_writer.get(&epoch) {
            if other != node {
                self.violations.push(format!(
                    "two writers acknowledged in epoch {epoch}: n{other} and n{node}"
                ));
            }
        }
        self.ack_writer.insert(epoch, node);
        let common = log.len().min(self.acked.len());
        if log[..common] != self.acked[..common] {
            self.violations.push(format!(
                "n{node} acknowledged seq {} in epoch {epoch} over a log that conflicts with \
                 an acknowledged one",
                log.len()
            ));
        }
        if log.len() > self.acked.len() {
            self.acked = log.to_vec();
        }
    }

    pub fn on_accept(&mut self, node: usize, epoch: u64) {
        if epoch < self.max_accepted[node] {
            self.violations.push(format!(
                "n{node} accepted epoch {epoch} after epoch {}",
                self.max_accepted[node]
            ));
        }
        self.max_accepted[node] = self.max_accepted[node].max(epoch);
    }

    pub fn on_become_writer(&mut self, node: usize, disk: &Disk) {
        if let Some(why) = self.missing(disk) {
            self.violations
                .push(format!("n{node} became writer without acknowledged data: {why}"));
        }
    }

    pub fn on_cut(&mut self, node: usize, after: u64, log: &[Entry]) {
        let hi = log.len().min(self.acked.len());
        let lo = (after as usize).min(hi);
        if lo < hi && log[lo..hi] == self.acked[lo..hi] {
            self.violations.push(format!(
                "n{node} told to cut after {after}, dropping acknowledged seqs {}..={hi}",
                lo + 1
            ));
        }
    }

    fn missing(&self, d: &Disk) -> Option<String> {
        let n = self.acked.len();
        if d.durable < n {
            return Some(format!("durable through {} of acknowledged {n}", d.durable));
        }
        (d.log[..n] != self.acked[..]).then(|| {
            let s = (0..n).find(|&k| d.log[k] != self.acked[k]).unwrap_or(0) + 1;
            format!(
                "seq {s} is {:?} not the acknowledged {:?}",
                d.log[s - 1],
                self.acked[s - 1]
            )
        })
    }

    /// Invariant 1 over the master's in-sync set.
    pub fn after_step(&self, nodes: &[Node], master: &VolumeConfig) -> Vec<String> {
        master
            .in_sync
            .iter()
            .filter_map(|n| {
                self.missing(&nodes[idx(n)].disk)
                    .map(|why| format!("in-sync {n} (epoch {}) lacks acknowledged data: {why}", master.epoch))
            })
            .collect()
    }
}
