//! The leader's scheduler: where each VE goes.
//!
//! - A VE stays where it is placed while its node is ready (or lost: restarting it
//!   elsewhere is failover's decision, not the scheduler's).
//! - A VE on a draining node moves to another node that fits, if any.
//! - An unplaced VE goes to the node that fits it best: among ready nodes that match its
//!   `--node` and `--label`s and have room for its requests (CPU and memory up to the
//!   overcommit ratio, disk never overcommitted), one that has its template (another
//!   fetches it first), then the one left least full after placing it, then the one with
//!   the fewest VEs (VEs without requests spread by count), then by name (the same
//!   snapshot always gives the same answer).
//! - A VE that fits nowhere stays pending, with every node's reason.
//!
//! VEs are taken in name order and each placement counts against its node before the next.

use crate::model::{Node, NodeState, Policy, Resources, Snapshot, Ve};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Put an unplaced VE on a node.
    Place { ve: String, node: String },
    /// Move a VE to another node (its node is draining).
    Move { ve: String, from: String, to: String },
    /// Nowhere to put it now; the reason is shown by `ve show`.
    Pending { ve: String, reason: String },
    /// A placement whose VE no longer exists.
    Forget { ve: String },
    /// The VE's node was removed from the cluster: it stays placed there (its files are
    /// there; it is never started elsewhere from nothing) and says why.
    Stranded { ve: String, node: String, reason: String },
}

/// What each node has placed on it.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    used: Resources,
    ves: usize,
}

pub fn schedule(s: &Snapshot, p: &Policy) -> Vec<Action> {
    let nodes: BTreeMap<&str, &Node> = s.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut ves: Vec<&Ve> = s.ves.iter().collect();
    ves.sort_by(|a, b| a.name.cmp(&b.name));
    let by_name: BTreeMap<&str, &Ve> = ves.iter().map(|v| (v.name.as_str(), *v)).collect();
    let mut actions = Vec::new();
    let mut load: BTreeMap<&str, Load> = nodes.keys().map(|n| (*n, Load::default())).collect();
    for (ve, node) in &s.placements {
        match by_name.get(ve.as_str()) {
            None => actions.push(Action::Forget { ve: ve.clone() }),
            Some(v) => {
                if let Some(l) = load.get_mut(node.as_str()) {
                    l.used = l.used.plus(v.requests);
                    l.ves += 1;
                }
            }
        }
    }
    for v in ves {
        match s.placements.get(&v.name) {
            Some(at) => match nodes.get(at.as_str()).map(|n| n.state) {
                Some(NodeState::Ready) | Some(NodeState::Lost) => {}
                Some(NodeState::Draining) => match best(v, &nodes, &load, p, Some(at)) {
                    Ok(to) => {
                        let l = load.get_mut(at.as_str()).expect("placed on a known node");
                        l.used = sub(l.used, v.requests);
                        l.ves -= 1;
                        take(&mut load, &to, v);
                        actions.push(Action::Move {
                            ve: v.name.clone(),
                            from: at.clone(),
                            to,
                        });
                    }
                    Err(why) => actions.push(Action::Pending {
                        ve: v.name.clone(),
                        reason: format!("its node {at} is draining and no other node fits: {why}"),
                    }),
                },
                None => actions.push(Action::Stranded {
                    ve: v.name.clone(),
                    node: at.clone(),
                    reason: format!(
                        "its node {at} was removed from the cluster (its files are there): destroy it, or bring {at} back"
                    ),
                }),
            },
            None => match best(v, &nodes, &load, p, None) {
                Ok(node) => {
                    take(&mut load, &node, v);
                    actions.push(Action::Place {
                        ve: v.name.clone(),
                        node,
                    });
                }
                Err(why) => actions.push(Action::Pending {
                    ve: v.name.clone(),
                    reason: format!("no node fits: {why}"),
                }),
            },
        }
    }
    actions
}

fn sub(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_milli: a.cpu_milli.saturating_sub(b.cpu_milli),
        memory: a.memory.saturating_sub(b.memory),
        disk: a.disk.saturating_sub(b.disk),
    }
}

fn take(load: &mut BTreeMap<&str, Load>, node: &str, v: &Ve) {
    if let Some(l) = load.get_mut(node) {
        l.used = l.used.plus(v.requests);
        l.ves += 1;
    }
}

/// The best node for `v`, or every node's reason why not.
fn best(
    v: &Ve,
    nodes: &BTreeMap<&str, &Node>,
    load: &BTreeMap<&str, Load>,
    p: &Policy,
    except: Option<&String>,
) -> Result<String, String> {
    // (lacks the template, fullness, VE count, name): a node that has the template wins
    // over one that would fetch it first, then the usual spread.
    let mut fitting: Vec<(bool, u64, usize, &str)> = Vec::new();
    let mut why: Vec<String> = Vec::new();
    for (name, n) in nodes {
        if except.is_some_and(|e| e == name) {
            continue;
        }
        if v.node.as_deref().is_some_and(|want| want != *name) {
            continue;
        }
        let l = load.get(name).copied().unwrap_or_default();
        match fit(v, n, l, p) {
            Ok(score) => fitting.push((lacks_template(v, n), score, l.ves, name)),
            Err(r) => why.push(format!("{name}: {r}")),
        }
    }
    if let Some((_, _, _, n)) = fitting.into_iter().min() {
        return Ok(n.to_string());
    }
    if why.is_empty() {
        why.push(match &v.node {
            Some(n) if except == Some(n) => format!("it may run only on node {n} (--node)"),
            Some(n) => format!("node {n} is not in the cluster"),
            None => "the cluster has no nodes".into(),
        });
    }
    Err(why.join("; "))
}

/// Whether `n` would have to fetch `v`'s template from another node first.
fn lacks_template(v: &Ve, n: &Node) -> bool {
    match (&v.template, &n.templates) {
        (Some(t), Some(has)) => !has.contains(t),
        _ => false,
    }
}

/// Whether `v` fits on `n` with load `l`; the score is how full the node's fullest
/// resource would be, in thousandths (lower is better).
fn fit(v: &Ve, n: &Node, l: Load, p: &Policy) -> Result<u64, String> {
    match n.state {
        NodeState::Ready => {}
        NodeState::Draining => return Err("draining".into()),
        NodeState::Lost => return Err("lost".into()),
    }
    for (k, want) in &v.labels {
        if n.labels.get(k) != Some(want) {
            return Err(format!("no label {k}={want}"));
        }
    }
    let cap = |x: u64, ratio: f64| (x as f64 * ratio) as u64;
    let a = n.allocatable;
    let caps = [
        (
            "cpu",
            cap(a.cpu_milli, p.cpu_overcommit),
            l.used.cpu_milli,
            v.requests.cpu_milli,
        ),
        (
            "memory",
            cap(a.memory, p.memory_overcommit),
            l.used.memory,
            v.requests.memory,
        ),
        ("disk", a.disk, l.used.disk, v.requests.disk),
    ];
    let mut score = 0;
    for (what, cap, used, want) in caps {
        if want == 0 {
            continue;
        }
        let left = cap.saturating_sub(used);
        if want > left {
            return Err(format!(
                "{what}: {} left, {} asked",
                amount(what, left),
                amount(what, want)
            ));
        }
        score = score.max(((used + want) as u128 * 1000 / cap.max(1) as u128) as u64);
    }
    Ok(score)
}

fn amount(what: &str, x: u64) -> String {
    if what == "cpu" {
        return format!("{:.2} CPUs", x as f64 / 1000.0);
    }
    const G: f64 = (1u64 << 30) as f64;
    const M: f64 = (1u64 << 20) as f64;
    if x as f64 >= G {
        format!("{:.1} GiB", x as f64 / G)
    } else {
        format!("{:.0} MiB", x as f64 / M)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, cpus: u64, mem_gib: u64) -> Node {
        Node {
            name: name.into(),
            state: NodeState::Ready,
            allocatable: Resources {
                cpu_milli: cpus * 1000,
                memory: mem_gib * GIB,
                disk: 100 * GIB,
            },
            labels: BTreeMap::new(),
            templates: None,
        }
    }

    fn ve(name: &str, cpu_milli: u64, mem_gib: u64) -> Ve {
        Ve {
            name: name.into(),
            generation: 1,
            requests: Resources {
                cpu_milli,
                memory: mem_gib * GIB,
                disk: 0,
            },
            node: None,
            labels: BTreeMap::new(),
            template: None,
        }
    }

    #[test]
    fn nodes_with_the_template_are_preferred_and_the_others_fetch_it() {
        let mut a = node("a", 4, 8);
        a.templates = Some(["debian".to_string()].into());
        let mut b = node("b", 4, 8);
        b.templates = Some(["busybox".to_string()].into());
        let mut c = node("c", 4, 8);
        c.templates = Some(["busybox".to_string()].into());
        let tpl = |name: &str, t: &str| {
            let mut v = ve(name, 0, 0);
            v.template = Some(t.into());
            v
        };
        // Three busybox VEs: b and c have the template and take them (spread between the
        // two by count), though a is emptier; a fetches only when it is the only fit.
        let s = Snapshot {
            nodes: vec![a.clone(), b.clone(), c.clone()],
            ves: vec![
                tpl("v1", "busybox"),
                tpl("v2", "busybox"),
                tpl("v3", "busybox"),
                tpl("db", "alpine"),
            ],
            placements: BTreeMap::new(),
        };
        assert_eq!(
            schedule(&s, &Policy::default()),
            vec![place("db", "a"), place("v1", "b"), place("v2", "c"), place("v3", "b")]
        );
        // Nodes with the template full: the VE goes to a node that will fetch it.
        let small = |n: &Node| {
            let mut n = n.clone();
            n.allocatable.memory = GIB;
            n
        };
        let s = Snapshot {
            nodes: vec![a, small(&b), small(&c)],
            ves: vec![{
                let mut v = ve("big", 0, 4);
                v.template = Some("busybox".into());
                v
            }],
            placements: BTreeMap::new(),
        };
        assert_eq!(schedule(&s, &Policy::default()), vec![place("big", "a")]);
    }

    fn place(ve: &str, node: &str) -> Action {
        Action::Place {
            ve: ve.into(),
            node: node.into(),
        }
    }

    const NO_OVERCOMMIT: Policy = Policy {
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
    };

    #[test]
    fn pending_ves_spread_over_the_least_full_nodes() {
        let s = Snapshot {
            nodes: vec![node("n1", 4, 8), node("n2", 4, 8), node("n3", 4, 16)],
            ves: vec![ve("a", 1000, 4), ve("b", 1000, 4), ve("c", 1000, 4), ve("d", 0, 0)],
            placements: BTreeMap::new(),
        };
        // a: all empty; n3 is left least full (4 of 16). b: n1 (4 of 8 = n2's; by name).
        // c: n2 (n3 would be 8 of 16 = n2's 4 of 8; fewer VEs wins). d asks nothing: n1..n3
        // all score 0 for it; the fewest VEs... all have one: by name.
        assert_eq!(
            schedule(&s, &NO_OVERCOMMIT),
            vec![place("a", "n3"), place("b", "n1"), place("c", "n2"), place("d", "n1")]
        );
    }

    #[test]
    fn placed_ves_stay_and_count_against_their_node() {
        let s = Snapshot {
            nodes: vec![node("n1", 4, 8), node("n2", 4, 8)],
            ves: vec![ve("a", 0, 6), ve("b", 0, 4)],
            placements: [("a".to_string(), "n2".to_string())].into(),
        };
        assert_eq!(schedule(&s, &NO_OVERCOMMIT), vec![place("b", "n1")]);
    }

    #[test]
    fn a_ve_that_fits_nowhere_is_pending_with_every_nodes_reason() {
        let mut n2 = node("n2", 4, 8);
        n2.state = NodeState::Draining;
        let mut n3 = node("n3", 64, 64);
        n3.state = NodeState::Lost;
        let s = Snapshot {
            nodes: vec![node("n1", 2, 8), n2, n3],
            ves: vec![ve("big", 3000, 1)],
            placements: BTreeMap::new(),
        };
        assert_eq!(
            schedule(&s, &NO_OVERCOMMIT),
            vec![Action::Pending {
                ve: "big".into(),
                reason: "no node fits: n1: cpu: 2.00 CPUs left, 3.00 CPUs asked; n2: draining; n3: lost".into()
            }]
        );
        // With the default overcommit (4x CPU) it fits on n1.
        assert_eq!(schedule(&s, &Policy::default()), vec![place("big", "n1")]);
    }

    #[test]
    fn node_and_labels_restrict_the_choice() {
        let mut n2 = node("n2", 4, 8);
        n2.labels.insert("disk".into(), "ssd".into());
        let mut pinned = ve("pinned", 0, 1);
        pinned.node = Some("n1".into());
        let mut ssd = ve("ssd", 0, 1);
        ssd.labels.insert("disk".into(), "ssd".into());
        let mut nvme = ve("nvme", 0, 1);
        nvme.labels.insert("disk".into(), "nvme".into());
        let mut gone = ve("gone", 0, 1);
        gone.node = Some("n9".into());
        let s = Snapshot {
            nodes: vec![node("n1", 4, 8), n2],
            ves: vec![pinned, ssd, nvme, gone],
            placements: BTreeMap::new(),
        };
        assert_eq!(
            schedule(&s, &NO_OVERCOMMIT),
            vec![
                Action::Pending {
                    ve: "gone".into(),
                    reason: "no node fits: node n9 is not in the cluster".into()
                },
                Action::Pending {
                    ve: "nvme".into(),
                    reason: "no node fits: n1: no label disk=nvme; n2: no label disk=nvme".into()
                },
                place("pinned", "n1"),
                place("ssd", "n2"),
            ]
        );
    }

    #[test]
    fn draining_moves_ves_off_or_says_why_not() {
        let mut n1 = node("n1", 4, 8);
        n1.state = NodeState::Draining;
        let s = Snapshot {
            nodes: vec![n1, node("n2", 4, 8)],
            ves: vec![ve("a", 0, 4), ve("b", 0, 4), ve("c", 0, 4)],
            placements: [("a", "n1"), ("b", "n1"), ("c", "n1")]
                .map(|(v, n)| (v.to_string(), n.to_string()))
                .into(),
        };
        assert_eq!(
            schedule(&s, &NO_OVERCOMMIT),
            vec![
                Action::Move {
                    ve: "a".into(),
                    from: "n1".into(),
                    to: "n2".into()
                },
                Action::Move {
                    ve: "b".into(),
                    from: "n1".into(),
                    to: "n2".into()
                },
                Action::Pending {
                    ve: "c".into(),
                    reason: "its node n1 is draining and no other node fits: n2: memory: 0 MiB left, 4.0 GiB asked"
                        .into()
                },
            ]
        );
    }

    #[test]
    fn lost_nodes_keep_their_ves_and_removed_nodes_and_deleted_ves_are_reported() {
        let mut n1 = node("n1", 4, 8);
        n1.state = NodeState::Lost;
        let s = Snapshot {
            nodes: vec![n1],
            ves: vec![ve("a", 0, 1), ve("b", 0, 1)],
            placements: [("a", "n1"), ("b", "n7"), ("zombie", "n1")]
                .map(|(v, n)| (v.to_string(), n.to_string()))
                .into(),
        };
        // a stays on its lost node (failover decides about it); b's node is gone; the
        // placement of a deleted VE is dropped.
        assert_eq!(
            schedule(&s, &NO_OVERCOMMIT),
            vec![
                Action::Forget { ve: "zombie".into() },
                Action::Stranded {
                    ve: "b".into(),
                    node: "n7".into(),
                    reason:
                        "its node n7 was removed from the cluster (its files are there): destroy it, or bring n7 back"
                            .into()
                },
            ]
        );
    }

    proptest! {
        /// Whatever the cluster, no ready node is ever given more than it has (after
        /// overcommit), a VE gets one answer, and the answer does not depend on input order.
        #[test]
        fn never_overfills_and_is_deterministic(
            caps in prop::collection::vec((1u64..16, 1u64..64), 1..6),
            asks in prop::collection::vec((0u64..8000, 0u64..32), 0..40),
        ) {
            let nodes: Vec<Node> = caps.iter().enumerate().map(|(i, (c, m))| node(&format!("n{i}"), *c, *m)).collect();
            let ves: Vec<Ve> = asks.iter().enumerate().map(|(i, (c, m))| ve(&format!("v{i:02}"), *c, *m)).collect();
            let s = Snapshot { nodes: nodes.clone(), ves: ves.clone(), placements: BTreeMap::new() };
            let p = Policy::default();
            let out = schedule(&s, &p);
            prop_assert_eq!(out.len(), ves.len());
            let mut used: BTreeMap<String, Resources> = BTreeMap::new();
            for a in &out {
                if let Action::Place { ve, node } = a {
                    let v = ves.iter().find(|v| &v.name == ve).unwrap();
                    let u = used.entry(node.clone()).or_default();
                    *u = u.plus(v.requests);
                }
            }
            for n in &nodes {
                let u = used.get(&n.name).copied().unwrap_or_default();
                prop_assert!(u.cpu_milli as f64 <= n.allocatable.cpu_milli as f64 * p.cpu_overcommit);
                prop_assert!(u.memory as f64 <= n.allocatable.memory as f64 * p.memory_overcommit);
            }
            let mut rev = s.clone();
            rev.nodes.reverse();
            rev.ves.reverse();
            prop_assert_eq!(schedule(&rev, &p), out);
        }
    }
}
