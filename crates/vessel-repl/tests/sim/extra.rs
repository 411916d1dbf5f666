//! Faults only in the schedules with a spare node (a separate random stream, so the other
//! schedules and their regression seeds stay as they were):
//! - a lost replica is replaced: the control center takes a dead non-writer replica out
//!   of the config and puts the spare in, one CAS (`without_replica` + `with_replica`,
//!   same epoch); the writer seeds the newcomer and adds it once it caught up;
//! - a node is cut off from the store (its CAS fails, its watch is silent; a writer so
//!   cut is replaced after the failover delay and learns it from a replica's refusal);
//! - the copy counts change live (`with_counts`, same epoch).

use crate::world::World;

pub fn step(w: &mut World) {
    let Some(mut r) = w.extra.take() else {
        return;
    };
    let c = w.master.clone();
    if r.chance(30) {
        let dead: Vec<usize> = (0..w.nodes.len())
            .filter(|&i| {
                let n = &w.nodes[i];
                !n.alive && c.is_replica(&n.name) && n.name != c.writer
            })
            .collect();
        let spares: Vec<usize> = (0..w.nodes.len())
            .filter(|&i| w.nodes[i].alive && !c.is_replica(&w.nodes[i].name))
            .collect();
        if let (Some(d), Some(s)) = (r.pick(&dead), r.pick(&spares)) {
            let next = c
                .without_replica(&w.nodes[d].name)
                .and_then(|n| n.with_replica(&w.nodes[s].name))
                .expect("replacing a dead replica by a spare");
            if w.cas(&c, next).is_ok() {
                w.stats.replacements += 1;
            }
        }
    }
    if r.chance(8) {
        let i = r.below(w.nodes.len() as u64) as usize;
        if w.store_cut.insert(i) {
            w.stats.store_cuts += 1;
        }
    }
    if r.chance(60) {
        let cut: Vec<usize> = w.store_cut.iter().copied().collect();
        if let Some(i) = r.pick(&cut) {
            w.store_cut.remove(&i);
        }
    }
    if r.chance(5) {
        let c = w.master.clone();
        let min = r.range(1, c.want_replicas as u64) as usize;
        let next = c.with_counts(min, c.want_replicas).expect("min within 1..=want");
        if w.cas(&c, next).is_ok() {
            w.stats.count_changes += 1;
        }
    }
    w.extra = Some(r);
}
