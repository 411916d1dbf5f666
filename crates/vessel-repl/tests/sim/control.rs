//! What happens to the cluster from outside the protocol: faults (crashes, restarts,
//! partitions, planned moves, compaction), each node's config watch, the control center's
//! failover (by `decide::choose_writer`, the epoch raised by CAS first), clients writing
//! and syncing, and the final heal + quiesce.

use crate::world::{idx, Disk, Faults, World, FAILOVER_MS};
use vessel_repl::decide::{choose_writer, Candidate};

impl World {
    pub(crate) fn faults_step(&mut self) {
        let n = self.nodes.len();
        let f = self.faults.clone();
        if self.rng.chance(f.crash) {
            let alive: Vec<usize> = (0..n).filter(|&i| self.nodes[i].alive).collect();
            if let Some(i) = self.rng.pick(&alive) {
                self.crash(i);
            }
        }
        for i in 0..n {
            if !self.nodes[i].alive && self.rng.chance(f.restart) {
                self.restart(i);
            }
        }
        if self.rng.chance(f.partition) {
            let a = self.rng.below(n as u64) as usize;
            let b = self.rng.below(n as u64) as usize;
            if a != b {
                self.blocked.insert((a.min(b), a.max(b)));
                self.stats.partitions += 1;
            }
        }
        if self.rng.chance(f.heal) {
            let pairs: Vec<(usize, usize)> = self.blocked.iter().copied().collect();
            if let Some(p) = self.rng.pick(&pairs) {
                self.blocked.remove(&p);
            }
        }
        if self.rng.chance(f.moves) {
            let targets: Vec<usize> = self
                .master
                .in_sync
                .iter()
                .map(|s| idx(s))
                .filter(|&i| self.nodes[i].alive && self.nodes[i].name != self.master.writer)
                .collect();
            if let Some(t) = self.rng.pick(&targets) {
                let next = self.master.with_writer(&self.nodes[t].name).unwrap();
                let cur = self.master.clone();
                if self.cas(&cur, next).is_ok() {
                    self.stats.moves += 1;
                }
            }
        }
        if self.rng.chance(f.compact) {
            let i = self.rng.below(n as u64) as usize;
            let alive = self.nodes[i].alive;
            let d = &mut self.nodes[i].disk;
            if alive && d.compactable() {
                let hi = d.durable as u64;
                d.base = self.rng.range(d.base, hi);
                self.stats.compactions += 1;
            }
        }
        crate::extra::step(self);
    }

    pub fn crash(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.alive = false;
        node.disk.crash();
        node.writer = None;
        node.ack_to = None;
        self.stats.crashes += 1;
    }

    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.alive = true;
        node.known = self.master.clone();
        node.known_rev = self.master_rev;
    }

    /// Each node's watch delivers the master's config after a random delay.
    pub(crate) fn watch(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive
                && !self.store_cut.contains(&i)
                && self.nodes[i].known_rev < self.master_rev
                && self.rng.chance(400)
            {
                self.nodes[i].known = self.master.clone();
                self.nodes[i].known_rev = self.master_rev;
                crate::writer::on_config(self, i);
            }
        }
        // A restarted node named writer learns it through the same path.
        for i in 0..self.nodes.len() {
            if self.nodes[i].alive && self.nodes[i].writer.is_none() {
                crate::writer::on_config(self, i);
            }
        }
    }

    fn acting_writer(&self) -> bool {
        let w = idx(&self.master.writer);
        let n = &self.nodes[w];
        n.alive
            && !self.store_cut.contains(&w)
            && n.writer
                .as_ref()
                .is_some_and(|ws| ws.epoch == self.master.epoch && !ws.deposed)
    }

    /// The control center: a writer not acting for FAILOVER_MS is replaced by the rule in
    /// `decide::choose_writer` (the epoch is raised by CAS first).
    pub(crate) fn control_center(&mut self) {
        if self.acting_writer() {
            self.writer_missing_since = None;
            return;
        }
        let since = *self.writer_missing_since.get_or_insert(self.now);
        if self.now - since < FAILOVER_MS {
            return;
        }
        let cands: Vec<Candidate> = self
            .nodes
            .iter()
            .map(|n| Candidate {
                node: n.name.clone(),
                reachable: n.alive,
                last_epoch: n.disk.hist.last_epoch(),
                last_seq: n.disk.last(),
            })
            .collect();
        if let Some(w) = choose_writer(&self.master, &cands) {
            let cur = self.master.clone();
            let next = cur.with_writer(&w).unwrap();
            if self.cas(&cur, next).is_ok() {
                self.stats.failovers += 1;
            }
        }
        self.writer_missing_since = Some(self.now);
    }

    /// Clients of every node acting as writer (a deposed one that does not know yet too).
    pub(crate) fn clients(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let Some(epoch) = self.nodes[i].writer.as_ref().filter(|w| !w.deposed).map(|w| w.epoch) else {
                continue;
            };
            if self.rng.chance(self.faults.write) {
                let k = self.rng.range(1, 3);
                for _ in 0..k {
                    self.next_tx += 1;
                    self.nodes[i].disk.append((epoch, self.next_tx));
                    self.stats.writes += 1;
                }
            }
            if self.rng.chance(100) {
                self.nodes[i].disk.flush();
            }
            if self.rng.chance(self.faults.sync) {
                crate::writer::sync(self, i);
            }
        }
    }

    /// Heal everything, restart everyone, stop faults and run until the replicas converge
    /// (bounded); then a last sync must be acknowledged.
    pub fn quiesce(&mut self) -> Result<u64, String> {
        self.faults = Faults::none();
        self.blocked.clear();
        self.store_cut.clear();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                self.restart(i);
            }
        }
        for round in 0..4_000u64 {
            self.step();
            if let Some(v) = self.check.violations.first() {
                return Err(v.clone());
            }
            if round % 50 == 49 {
                if let Some(w) = self.nodes.iter().position(|n| {
                    n.writer
                        .as_ref()
                        .is_some_and(|ws| ws.epoch == self.master.epoch && !ws.deposed)
                }) {
                    crate::writer::sync(self, w);
                }
            }
            if self.converged() {
                return Ok(round);
            }
        }
        Err(format!(
            "no convergence after quiesce: master {:?}, logs {:?}",
            self.master,
            self.nodes
                .iter()
                .map(|n| (n.name.clone(), n.disk.durable, n.disk.log.len()))
                .collect::<Vec<_>>()
        ))
    }

    fn converged(&self) -> bool {
        if !self.acting_writer() {
            return false;
        }
        let w = &self.nodes[idx(&self.master.writer)];
        let ws = w.writer.as_ref().unwrap();
        let all_in = self.master.replicas.iter().all(|r| self.master.is_in_sync(r));
        all_in
            && ws.syncs.is_empty()
            && self
                .nodes
                .iter()
                .filter(|n| self.master.is_replica(&n.name))
                .all(|n| n.disk.log == w.disk.log && n.disk.durable == n.disk.log.len())
    }
}

impl Disk {
    fn compactable(&self) -> bool {
        self.durable as u64 > self.base
    }
}
