//! The simulated cluster: nodes with in-memory logs, a config master with CAS, a network
//! that drops, delays, reorders, duplicates and partitions, and one step of a schedule.
//! Faults, the control center and clients are in `control.rs`. Every decision is taken
//! by the real code in `vessel_repl` (decide, diverge, catchup, config).

use crate::check::Checker;
use crate::rng::Rng;
use crate::writer::WriterState;
use std::collections::BTreeSet;
use vessel_fs::epochs::EpochHistory;
use vessel_repl::config::{default_min, VolumeConfig};

/// A replica removed after this long without an answer.
pub const ACK_MS: u64 = 2_000;
/// A sync fails after this long.
pub const SYNC_MS: u64 = 10_000;
/// The writer resends (go-back-N, hello) after this long without progress.
pub const RESEND_MS: u64 = 300;
/// The control center replaces a writer not acting for this long.
pub const FAILOVER_MS: u64 = 3_000;
/// Transactions per append frame.
pub const BATCH: u64 = 8;

/// A transaction as the simulation knows it: (epoch, unique id). The protocol sees only the
/// epoch and the seq (its index + 1); the id lets the checker see two different
/// transactions under one (epoch, seq).
pub type Entry = (u64, u64);

/// A copy's storage: the log (an [`Entry`] per seq, seq = index + 1), how much of it is
/// durable, its epoch history, base (compacted through), promised and joined epochs (both
/// durable, as `epoch.json`).
#[derive(Debug, Clone, Default)]
pub struct Disk {
    pub log: Vec<Entry>,
    pub durable: usize,
    pub hist: EpochHistory,
    pub base: u64,
    pub promised: u64,
    /// The epoch whose writer this copy reconciled with: appends are accepted only in it.
    pub joined: u64,
}

impl Disk {
    pub fn last(&self) -> u64 {
        self.log.len() as u64
    }

    pub fn append(&mut self, (epoch, id): Entry) {
        self.log.push((epoch, id));
        let seq = self.last();
        self.hist.note(epoch, seq);
    }

    pub fn flush(&mut self) {
        self.durable = self.log.len();
    }

    /// A crash: the part not yet durable is gone.
    pub fn crash(&mut self) {
        self.log.truncate(self.durable);
        self.hist.cut_after(self.durable as u64);
    }

    /// Truncate after `s` (durably).
    pub fn cut_after(&mut self, s: u64) {
        if self.last() > s {
            self.log.truncate(s as usize);
            self.hist.cut_after(s);
        }
        self.flush();
    }

    pub fn epoch_at(&self, seq: u64) -> u64 {
        if seq == 0 {
            0
        } else {
            self.log[seq as usize - 1].0
        }
    }
}

#[derive(Debug, Clone)]
pub enum Msg {
    /// Writer -> replica: promise `epoch`, tell me where your log stands.
    Hello { epoch: u64 },
    /// Replica -> writer: its history and last seq.
    State {
        epoch: u64,
        hist: EpochHistory,
        last: u64,
        base: u64,
    },
    /// Writer -> replica: cut after `after`, then take my transactions in `epoch`.
    Join { epoch: u64, after: u64 },
    /// Writer -> replica: transactions (entry, seq) following `prev`.
    Append {
        epoch: u64,
        prev: u64,
        prev_epoch: u64,
        txs: Vec<(Entry, u64)>,
    },
    /// Writer -> replica: install this log (base + tail) as your copy.
    Snapshot {
        epoch: u64,
        log: Vec<Entry>,
        hist: EpochHistory,
        base: u64,
    },
    /// Replica -> writer: durable through `durable` in `epoch`.
    Ack { epoch: u64, durable: u64 },
    /// Replica -> writer: an append in an epoch it did not join; start over.
    NotJoined { epoch: u64 },
    /// Replica -> writer: your epoch is over.
    Refuse { promised: u64 },
}

#[derive(Debug, Clone)]
pub struct InFlight {
    pub at: u64,
    pub id: u64,
    pub from: usize,
    pub to: usize,
    pub msg: Msg,
}

#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub alive: bool,
    pub disk: Disk,
    /// The config as this node's watch last delivered it.
    pub known: VolumeConfig,
    pub known_rev: u64,
    pub writer: Option<WriterState>,
    /// Where to send acks (volatile): (writer node, epoch).
    pub ack_to: Option<(usize, u64)>,
}

/// Fault rates of one schedule, per mille per step unless said otherwise.
#[derive(Debug, Clone)]
pub struct Faults {
    pub drop: u64,
    pub dup: u64,
    pub max_delay_ms: u64,
    pub crash: u64,
    pub restart: u64,
    pub partition: u64,
    pub heal: u64,
    pub moves: u64,
    pub compact: u64,
    pub write: u64,
    pub sync: u64,
}

impl Faults {
    pub fn random(rng: &mut Rng) -> Self {
        Faults {
            drop: rng.range(0, 150),
            dup: rng.range(0, 80),
            max_delay_ms: rng.range(1, 400),
            crash: rng.range(0, 25),
            restart: rng.range(5, 300),
            partition: rng.range(0, 40),
            heal: rng.range(5, 200),
            moves: rng.range(0, 15),
            compact: rng.range(0, 60),
            write: rng.range(300, 900),
            sync: rng.range(100, 600),
        }
    }

    pub fn none() -> Self {
        Faults {
            drop: 0,
            dup: 0,
            max_delay_ms: 20,
            crash: 0,
            restart: 1000,
            partition: 0,
            heal: 1000,
            moves: 0,
            compact: 0,
            write: 0,
            sync: 0,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: u64,
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub moves: u64,
    pub failovers: u64,
    pub deposed: u64,
    pub writes: u64,
    pub syncs_acked: u64,
    pub syncs_failed: u64,
    pub removals: u64,
    pub additions: u64,
    pub cuts: u64,
    pub seeds: u64,
    pub compactions: u64,
    pub replacements: u64,
    pub store_cuts: u64,
    pub count_changes: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.sent += o.sent;
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.moves += o.moves;
        self.failovers += o.failovers;
        self.deposed += o.deposed;
        self.writes += o.writes;
        self.syncs_acked += o.syncs_acked;
        self.syncs_failed += o.syncs_failed;
        self.removals += o.removals;
        self.additions += o.additions;
        self.cuts += o.cuts;
        self.seeds += o.seeds;
        self.compactions += o.compactions;
        self.replacements += o.replacements;
        self.store_cuts += o.store_cuts;
        self.count_changes += o.count_changes;
    }
}

pub struct World {
    pub rng: Rng,
    pub now: u64,
    pub nodes: Vec<Node>,
    pub master: VolumeConfig,
    pub master_rev: u64,
    pub net: Vec<InFlight>,
    pub next_id: u64,
    pub blocked: BTreeSet<(usize, usize)>,
    pub faults: Faults,
    pub stats: Stats,
    pub check: Checker,
    pub writer_missing_since: Option<u64>,
    pub next_tx: u64,
    /// With a spare node: the draws for replacing lost replicas (a separate stream, so the
    /// schedules without one stay as they were).
    pub extra: Option<Rng>,
    /// Nodes cut off from the store: their CAS fails, their watch is silent.
    pub store_cut: BTreeSet<usize>,
}

pub fn idx(name: &str) -> usize {
    name[1..].parse().unwrap_or(usize::MAX)
}

impl World {
    /// `spare`: one more node outside the replicas, used to replace a lost one.
    pub fn build(seed: u64, spare: bool) -> Self {
        let mut rng = Rng::new(seed);
        let n = rng.range(3, 5) as usize;
        let want = n;
        let min = if rng.chance(500) {
            default_min(n)
        } else {
            rng.range(1, n as u64) as usize
        };
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let mut master = VolumeConfig::new(&names[0], min, want);
        for nm in &names[1..] {
            master = master.with_replica(nm).unwrap();
            master = master.with_in_sync(nm).unwrap();
        }
        master.validate().unwrap();
        let faults = Faults::random(&mut rng);
        let total = n + usize::from(spare);
        let nodes = (0..total)
            .map(|i| format!("n{i}"))
            .map(|nm| Node {
                name: nm,
                alive: true,
                disk: Disk {
                    hist: EpochHistory::new(),
                    ..Disk::default()
                },
                known: master.clone(),
                known_rev: 0,
                writer: None,
                ack_to: None,
            })
            .collect();
        World {
            rng,
            now: 0,
            nodes,
            master,
            master_rev: 1,
            net: Vec::new(),
            next_id: 0,
            blocked: BTreeSet::new(),
            faults,
            stats: Stats::default(),
            check: Checker::new(total),
            writer_missing_since: None,
            next_tx: 0,
            extra: spare.then(|| Rng::new(seed ^ 0xA5A5_A5A5)),
            store_cut: BTreeSet::new(),
        }
    }

    pub fn is_blocked(&self, a: usize, b: usize) -> bool {
        self.blocked.contains(&(a.min(b), a.max(b)))
    }

    /// Compare-and-swap on the master: Err(current) when it changed.
    pub fn cas(&mut self, expected: &VolumeConfig, next: VolumeConfig) -> Result<(), VolumeConfig> {
        if self.master != *expected {
            return Err(self.master.clone());
        }
        next.validate().expect("a next config from config.rs validates");
        self.master = next;
        self.master_rev += 1;
        Ok(())
    }

    /// A node's CAS: Err(None) when it cannot reach the store.
    pub fn cas_as(
        &mut self,
        node: usize,
        expected: &VolumeConfig,
        next: VolumeConfig,
    ) -> Result<(), Option<VolumeConfig>> {
        if self.store_cut.contains(&node) {
            return Err(None);
        }
        self.cas(expected, next).map_err(Some)
    }

    pub fn send(&mut self, from: usize, to: usize, msg: Msg) {
        self.stats.sent += 1;
        if self.is_blocked(from, to) || self.rng.chance(self.faults.drop) {
            self.stats.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults.dup) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.rng.range(1, self.faults.max_delay_ms);
            self.next_id += 1;
            self.net.push(InFlight {
                at,
                id: self.next_id,
                from,
                to,
                msg: msg.clone(),
            });
        }
    }

    /// One step of the schedule.
    pub fn step(&mut self) {
        self.stats.steps += 1;
        self.now += self.rng.range(5, 60);
        self.faults_step();
        self.deliver();
        self.watch();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            crate::replica::tick(self, i);
            crate::writer::tick(self, i);
        }
        self.control_center();
        self.clients();
        let violations = self.check.after_step(&self.nodes, &self.master);
        self.check.violations.extend(violations);
    }

    fn deliver(&mut self) {
        let now = self.now;
        let (mut due, rest): (Vec<_>, Vec<_>) = self.net.drain(..).partition(|m| m.at <= now);
        self.net = rest;
        due.sort_by_key(|m| (m.at, m.id));
        for m in due {
            if !self.nodes[m.to].alive || self.is_blocked(m.from, m.to) {
                self.stats.dropped += 1;
                continue;
            }
            match m.msg {
                Msg::State { .. } | Msg::Ack { .. } | Msg::NotJoined { .. } | Msg::Refuse { .. } => {
                    crate::writer::receive(self, m.to, m.from, m.msg)
                }
                _ => crate::replica::receive(self, m.to, m.from, m.msg),
            }
        }
    }
}
