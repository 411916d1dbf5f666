//! A replica in the simulation: promises epochs (durably), refuses older ones, cuts after
//! the divergence point the writer computed, appends in order with a prev check, installs
//! snapshots, fdatasyncs once per batch (maybe later: a crash window) and acks durable.

use crate::world::{Msg, World};

/// Flush a pending batch (maybe) and ack it.
pub fn tick(w: &mut World, j: usize) {
    let d = &w.nodes[j].disk;
    if d.durable < d.log.len() && w.nodes[j].writer.is_none() && w.rng.chance(500) {
        w.nodes[j].disk.flush();
        ack(w, j);
    }
}

fn ack(w: &mut World, j: usize) {
    let n = &w.nodes[j];
    if let Some((to, epoch)) = n.ack_to {
        if epoch == n.disk.joined {
            let durable = n.disk.durable as u64;
            w.send(j, to, Msg::Ack { epoch, durable });
        }
    }
}

/// A message from writer `i` to replica `j`.
pub fn receive(w: &mut World, j: usize, i: usize, msg: Msg) {
    let epoch = match &msg {
        Msg::Hello { epoch } | Msg::Join { epoch, .. } | Msg::Append { epoch, .. } | Msg::Snapshot { epoch, .. } => {
            *epoch
        }
        _ => return,
    };
    let promised = w.nodes[j].disk.promised;
    if epoch < promised {
        w.send(j, i, Msg::Refuse { promised });
        return;
    }
    // A writer of an older epoch learns here that its epoch is over.
    if let Some(ws) = w.nodes[j].writer.as_mut() {
        if ws.epoch < epoch {
            ws.deposed = true;
        } else {
            return; // the same epoch has one writer: never from another node
        }
    }
    w.check.on_accept(j, epoch);
    w.nodes[j].disk.promised = epoch;
    match msg {
        Msg::Hello { .. } => {
            let d = &w.nodes[j].disk;
            let reply = Msg::State {
                epoch,
                hist: d.hist.clone(),
                last: d.last(),
                base: d.base,
            };
            w.send(j, i, reply);
        }
        Msg::Join { after, .. } => {
            if w.nodes[j].disk.joined != epoch {
                w.check.on_cut(j, after, &w.nodes[j].disk.log);
                let d = &mut w.nodes[j].disk;
                d.cut_after(after);
                d.joined = epoch;
            }
            w.nodes[j].ack_to = Some((i, epoch));
            ack(w, j);
        }
        Msg::Append {
            prev, prev_epoch, txs, ..
        } => {
            if w.nodes[j].disk.joined != epoch {
                w.send(j, i, Msg::NotJoined { epoch });
                return;
            }
            w.nodes[j].ack_to = Some((i, epoch));
            let d = &mut w.nodes[j].disk;
            if prev <= d.last() {
                if d.epoch_at(prev) != prev_epoch {
                    let v = format!(
                        "node {j} joined epoch {epoch} but its seq {prev} is epoch {} not {prev_epoch}",
                        d.epoch_at(prev)
                    );
                    w.check.violations.push(v);
                    return;
                }
                for (e, s) in txs {
                    let d = &mut w.nodes[j].disk;
                    if s <= d.last() {
                        // The protocol compares (epoch, seq); the checker also the id.
                        let mine = d.log[s as usize - 1];
                        if mine != e {
                            let v = if mine.0 == e.0 {
                                format!("two transactions named ({}, {s}): ids {} and {}", e.0, mine.1, e.1)
                            } else {
                                format!(
                                    "node {j} holds ({}, {s}) where its writer of epoch {epoch} sent ({}, {s})",
                                    mine.0, e.0
                                )
                            };
                            w.check.violations.push(v);
                            return;
                        }
                    } else if s == d.last() + 1 {
                        d.append(e);
                    }
                }
            }
            // fdatasync once per batch, now or a little later (a crash window).
            if w.rng.chance(500) {
                w.nodes[j].disk.flush();
            }
            ack(w, j);
        }
        Msg::Snapshot { log, hist, base, .. } => {
            let d = &mut w.nodes[j].disk;
            // Never shorten a log that already follows this writer (a late snapshot).
            if !(d.joined == epoch && d.log.len() >= log.len()) {
                d.log = log;
                d.hist = hist;
                d.base = base;
                d.flush();
                d.joined = epoch;
            }
            w.nodes[j].ack_to = Some((i, epoch));
            ack(w, j);
        }
        _ => {}
    }
}
