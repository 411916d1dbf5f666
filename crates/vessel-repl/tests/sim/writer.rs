//! The writer's runtime in the simulation: hello/join handshakes, pipelined batched appends
//! with go-back-N after silence, seeding, and the in-sync/ack decisions taken by
//! `vessel_repl::decide` (CAS on the master before anything is acknowledged without a
//! replica).

use crate::world::{idx, Entry, Msg, World, ACK_MS, BATCH, RESEND_MS, SYNC_MS};
use std::collections::BTreeMap;
use vessel_repl::catchup::{plan, Plan};
use vessel_repl::config::VolumeConfig;
use vessel_repl::decide::{reconcile, AckDecision, Action, Hello, Inputs, Progress, Timeouts, WriterLog};

#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    Hello,
    Stream { next: u64 },
    Seeding { len: u64 },
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub prog: Progress,
    pub phase: Phase,
    pub sent_max: u64,
    pub last_send: Option<u64>,
    pub last_progress: u64,
}

#[derive(Debug, Clone)]
pub struct WriterState {
    pub epoch: u64,
    pub config: VolumeConfig,
    pub peers: BTreeMap<usize, Peer>,
    /// Pending syncs: (seq, since).
    pub syncs: Vec<(u64, u64)>,
    pub deposed: bool,
}

const TIMEOUTS: Timeouts = Timeouts {
    ack_ms: ACK_MS,
    sync_ms: SYNC_MS,
};

/// The node's watch delivered a config (or it restarted): step down or take over.
pub fn on_config(w: &mut World, i: usize) {
    let c = w.nodes[i].known.clone();
    let now = w.now;
    let node = &mut w.nodes[i];
    if let Some(ws) = node.writer.as_mut() {
        if c.epoch > ws.epoch {
            ws.deposed = true;
        } else if c.epoch == ws.epoch {
            ws.config = c;
        }
        return;
    }
    // Never write twice in one epoch: a writer that restarted waits for a new epoch.
    if c.writer != node.name || c.epoch <= node.disk.promised {
        return;
    }
    node.disk.flush();
    node.disk.promised = c.epoch;
    node.disk.joined = c.epoch;
    let peers = c
        .replicas
        .iter()
        .filter(|r| **r != c.writer)
        .map(|r| {
            (
                idx(r),
                Peer {
                    prog: Progress::new(r),
                    phase: Phase::Hello,
                    sent_max: 0,
                    last_send: None,
                    last_progress: now,
                },
            )
        })
        .collect();
    node.writer = Some(WriterState {
        epoch: c.epoch,
        config: c.clone(),
        peers,
        syncs: Vec::new(),
        deposed: false,
    });
    w.check.on_accept(i, c.epoch);
    w.check.on_become_writer(i, &w.nodes[i].disk);
}

/// A client's sync: the local log durable, then wait for the replicas.
pub fn sync(w: &mut World, i: usize) {
    let now = w.now;
    let node = &mut w.nodes[i];
    let Some(ws) = node.writer.as_mut() else {
        return;
    };
    node.disk.flush();
    let seq = node.disk.last();
    if seq > 0 && ws.syncs.len() < 8 {
        ws.syncs.push((seq, now));
    }
}

pub fn tick(w: &mut World, i: usize) {
    let Some(mut ws) = w.nodes[i].writer.take() else {
        return;
    };
    if !ws.deposed {
        follow_replicas(w, &mut ws);
        connectivity(w, i, &mut ws);
        let ids: Vec<usize> = ws.peers.keys().copied().collect();
        for j in ids {
            send_to(w, i, &mut ws, j);
        }
        decide(w, i, &mut ws);
    }
    if ws.deposed {
        w.stats.deposed += 1;
        w.stats.syncs_failed += ws.syncs.len() as u64;
        return; // steps down: now a replica
    }
    w.nodes[i].writer = Some(ws);
}

/// Talk to exactly the config's replicas (one was replaced: a new peer, a dropped one).
fn follow_replicas(w: &World, ws: &mut WriterState) {
    let c = &ws.config;
    ws.peers.retain(|&j, _| c.is_replica(&w.nodes[j].name));
    for r in c.replicas.iter().filter(|r| **r != c.writer) {
        ws.peers.entry(idx(r)).or_insert_with(|| Peer {
            prog: Progress::new(r),
            phase: Phase::Hello,
            sent_max: 0,
            last_send: None,
            last_progress: w.now,
        });
    }
}

fn connectivity(w: &mut World, i: usize, ws: &mut WriterState) {
    for (&j, p) in ws.peers.iter_mut() {
        let down = !w.nodes[j].alive || w.is_blocked(i, j);
        if down {
            p.prog.disconnected_since.get_or_insert(w.now);
        } else if p.prog.disconnected_since.take().is_some() {
            // A new connection: a new handshake.
            p.phase = Phase::Hello;
            p.last_send = None;
        }
    }
}

fn send_to(w: &mut World, i: usize, ws: &mut WriterState, j: usize) {
    let now = w.now;
    let epoch = ws.epoch;
    let committed = w.nodes[i].disk.last();
    let first_retained = w.nodes[i].disk.base + 1;
    let p = ws.peers.get_mut(&j).unwrap();
    if p.prog.disconnected_since.is_some() {
        return;
    }
    let quiet = p.last_send.is_none_or(|t| now - t >= RESEND_MS);
    match p.phase.clone() {
        Phase::Hello => {
            if quiet {
                p.last_send = Some(now);
                p.prog.waiting_since.get_or_insert(now);
                w.send(i, j, Msg::Hello { epoch });
            }
        }
        Phase::Seeding { .. } => {
            if quiet {
                p.phase = Phase::Hello;
            }
        }
        Phase::Stream { mut next } => {
            if p.prog.acked_seq < p.sent_max && now - p.last_progress >= RESEND_MS {
                // Go back: resend from the first unacknowledged, or seed.
                p.last_progress = now;
                match plan(p.prog.acked_seq, first_retained, committed) {
                    Plan::UpToDate => {}
                    Plan::Tail { from } => next = from,
                    Plan::Snapshot => return seed(w, i, ws, j),
                }
            }
            if next <= committed {
                if next < first_retained {
                    return seed(w, i, ws, j);
                }
                let end = committed.min(next + BATCH - 1);
                let d = &w.nodes[i].disk;
                let txs: Vec<(Entry, u64)> = (next..=end).map(|s| (d.log[s as usize - 1], s)).collect();
                let msg = Msg::Append {
                    epoch,
                    prev: next - 1,
                    prev_epoch: d.epoch_at(next - 1),
                    txs,
                };
                if p.prog.acked_seq >= p.sent_max {
                    p.last_progress = now;
                }
                p.sent_max = p.sent_max.max(end);
                p.last_send = Some(now);
                p.prog.waiting_since.get_or_insert(now);
                next = end + 1;
                w.send(i, j, msg);
            }
            p.phase = Phase::Stream { next };
        }
    }
}

fn seed(w: &mut World, i: usize, ws: &mut WriterState, j: usize) {
    let d = &w.nodes[i].disk;
    let mut hist = d.hist.clone();
    hist.cut_after(d.durable as u64);
    let log = d.log[..d.durable].to_vec();
    let len = log.len() as u64;
    let msg = Msg::Snapshot {
        epoch: ws.epoch,
        log,
        hist,
        base: d.base,
    };
    let p = ws.peers.get_mut(&j).unwrap();
    p.phase = Phase::Seeding { len };
    p.last_send = Some(w.now);
    p.prog.waiting_since.get_or_insert(w.now);
    w.stats.seeds += 1;
    w.send(i, j, msg);
}

fn decide(w: &mut World, i: usize, ws: &mut WriterState) {
    let progress: Vec<Progress> = ws.peers.values().map(|p| p.prog.clone()).collect();
    let committed = w.nodes[i].disk.last();
    let actions = Inputs {
        config: &ws.config,
        progress: &progress,
        committed,
        now: w.now,
        timeouts: TIMEOUTS,
    }
    .tick();
    for a in actions {
        let next = match &a {
            Action::RemoveFromInSync { node, .. } => ws.config.without(node),
            Action::AddToInSync { node } => ws.config.with_in_sync(node),
            other => panic!("tick decided {other:?}"),
        }
        .expect("a valid next config");
        match w.cas_as(i, &ws.config, next.clone()) {
            Ok(()) => {
                ws.config = next;
                match a {
                    Action::RemoveFromInSync { .. } => w.stats.removals += 1,
                    _ => w.stats.additions += 1,
                }
            }
            Err(Some(cur)) if cur.epoch != ws.epoch => {
                ws.deposed = true;
                return;
            }
            Err(Some(cur)) => ws.config = cur,
            // The store is out of reach: nothing changes, syncs keep waiting.
            Err(None) => break,
        }
    }
    let progress: Vec<Progress> = ws.peers.values().map(|p| p.prog.clone()).collect();
    let inputs = Inputs {
        config: &ws.config,
        progress: &progress,
        committed,
        now: w.now,
        timeouts: TIMEOUTS,
    };
    let mut keep = Vec::new();
    for &(seq, since) in &ws.syncs {
        match inputs.ack_decision(seq, since) {
            AckDecision::Ack => {
                w.stats.syncs_acked += 1;
                let log = w.nodes[i].disk.log[..seq as usize].to_vec();
                let copies = w
                    .nodes
                    .iter()
                    .filter(|n| n.disk.durable >= log.len() && n.disk.log[..log.len()] == log[..])
                    .count();
                if copies < ws.config.min_replicas {
                    w.check.violations.push(format!(
                        "n{i} acknowledged seq {seq} with {copies} durable copies, min {}",
                        ws.config.min_replicas
                    ));
                }
                w.check.on_ack(i, ws.epoch, &log);
            }
            AckDecision::Fail { .. } => w.stats.syncs_failed += 1,
            AckDecision::Wait { .. } => keep.push((seq, since)),
        }
    }
    ws.syncs = keep;
}

/// A message from replica `j` to writer `i`.
pub fn receive(w: &mut World, i: usize, j: usize, msg: Msg) {
    let Some(mut ws) = w.nodes[i].writer.take() else {
        return;
    };
    if !ws.deposed && ws.peers.contains_key(&j) {
        on_msg(w, i, &mut ws, j, msg);
    }
    w.nodes[i].writer = Some(ws);
}

fn on_msg(w: &mut World, i: usize, ws: &mut WriterState, j: usize, msg: Msg) {
    let now = w.now;
    match msg {
        Msg::State {
            epoch,
            hist,
            last,
            base,
        } => {
            if epoch != ws.epoch || ws.peers[&j].phase != Phase::Hello {
                return;
            }
            let d = &w.nodes[i].disk;
            let hello = Hello {
                node: w.nodes[j].name.clone(),
                history: hist,
                last,
                base,
            };
            let actions = reconcile(
                WriterLog {
                    history: &d.hist,
                    last: d.last(),
                    first_retained: d.base + 1,
                },
                &hello,
            );
            let mut after = None;
            for a in actions {
                match a {
                    Action::Cut { after: s, .. } => {
                        after = Some(s);
                        w.stats.cuts += 1;
                    }
                    Action::CatchUp { from, .. } => {
                        let p = ws.peers.get_mut(&j).unwrap();
                        p.phase = Phase::Stream { next: from };
                        p.sent_max = p.sent_max.max(from - 1);
                        p.last_progress = now;
                        p.last_send = Some(now);
                        let after = after.unwrap_or(from - 1);
                        w.send(i, j, Msg::Join { epoch, after });
                    }
                    Action::Seed { .. } => seed(w, i, ws, j),
                    other => panic!("reconcile decided {other:?}"),
                }
            }
        }
        Msg::Ack { epoch, durable } => {
            if epoch != ws.epoch {
                return;
            }
            let p = ws.peers.get_mut(&j).unwrap();
            if let Phase::Seeding { len } = p.phase {
                if durable >= len {
                    p.phase = Phase::Stream { next: durable + 1 };
                    p.sent_max = p.sent_max.max(len);
                }
            }
            let progressed = durable > p.prog.acked_seq;
            if progressed {
                p.prog.acked_seq = durable;
                p.last_progress = now;
            }
            let streaming = matches!(p.phase, Phase::Stream { .. });
            let outstanding = !streaming || p.prog.acked_seq < p.sent_max;
            if !outstanding {
                p.prog.waiting_since = None;
            } else if progressed {
                p.prog.waiting_since = Some(now);
            }
        }
        Msg::NotJoined { epoch } if epoch == ws.epoch => {
            let p = ws.peers.get_mut(&j).unwrap();
            if matches!(p.phase, Phase::Stream { .. }) {
                p.phase = Phase::Hello;
                p.last_send = None;
            }
        }
        Msg::Refuse { promised } if promised > ws.epoch => ws.deposed = true,
        _ => {}
    }
}
