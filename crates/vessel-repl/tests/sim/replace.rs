//! Replacing a lost replica (only in schedules with a spare node): the control center
//! takes a dead non-writer replica out of the config and puts the spare in, one CAS
//! (`without_replica` + `with_replica`, same epoch); the writer then seeds the newcomer
//! and adds it to the in-sync set once it caught up.

use crate::world::World;

pub fn step(w: &mut World) {
    let Some(mut r) = w.extra.take() else {
        return;
    };
    if r.chance(30) {
        let c = w.master.clone();
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
    w.extra = Some(r);
}
