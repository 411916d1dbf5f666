//! One node's reconcile step: from the VEs the control center assigned to this node and
//! the VEs the node has, the steps that make them match. The agent runs it on every change
//! it sees (and now and then), carries the steps out in order, and reports what it observed.
//!
//! - Assigned, not here: create it (and start it in the same step if it should run).
//! - Assigned and here: when the spec's generation is newer than the one the VE was last
//!   brought to, apply it and start or stop the VE as it says. Between generations the
//!   node's own restart policy rules: a VE that powered itself off stays off until someone
//!   asks again (a new generation).
//! - Assigned here with a target to move to (this node is draining): move it there.
//! - Here, not assigned: if its spec is marked deleted, stop and destroy it; if it is
//!   assigned elsewhere, stop it and release this copy (removed once the node it is placed
//!   on has reported it: a move that ended before its old node removed its copy); if the cluster has no spec for
//!   it at all (made before the node joined, or the store lost it), adopt it: publish it as
//!   this node's. A VE's files are never removed for want of a record.
//!
//! VEs are taken in name order, so the same inputs always give the same steps.

use std::collections::{BTreeMap, BTreeSet};

/// A VE the control center wants on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub name: String,
    pub generation: u64,
    /// It should be running (else stopped).
    pub run: bool,
    /// This node is draining: the leader asks it to move the VE to this node.
    pub move_to: Option<String>,
}

/// A VE this node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub name: String,
    /// The spec generation it was made or last updated with.
    pub generation: u64,
    pub running: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Create it (and start it, as one step: a start that fails leaves nothing made).
    Create {
        ve: String,
        generation: u64,
        start: bool,
    },
    /// Apply the spec of this generation (limits, settings) to the VE here, then start it
    /// (`run: Some(true)`) or stop it (`Some(false)`), as one step: its node reports the
    /// generation once all of it is done.
    Update {
        ve: String,
        generation: u64,
        run: Option<bool>,
    },
    Stop {
        ve: String,
    },
    /// It now belongs to another node: hand its volume over (it is stopped first).
    Release {
        ve: String,
    },
    /// Its spec is marked deleted: remove it and its files, then its keys.
    Destroy {
        ve: String,
    },
    /// The cluster has no spec for it: publish it as this node's.
    Adopt {
        ve: String,
    },
    /// Move it to another node (`ve move`'s path: this node is draining).
    Move {
        ve: String,
        to: String,
    },
}

/// What the cluster says about VEs not assigned to this node.
#[derive(Debug, Clone, Default)]
pub struct Others {
    /// Specs assigned to another node (or pending).
    pub elsewhere: BTreeSet<String>,
    /// Specs marked deleted.
    pub deleted: BTreeSet<String>,
}

pub fn reconcile(assigned: &[Assigned], local: &[Local], others: &Others) -> Vec<Step> {
    let want: BTreeMap<&str, &Assigned> = assigned.iter().map(|a| (a.name.as_str(), a)).collect();
    let have: BTreeMap<&str, &Local> = local.iter().map(|l| (l.name.as_str(), l)).collect();
    let names: BTreeSet<&str> = want.keys().chain(have.keys()).copied().collect();
    let mut steps = Vec::new();
    for name in names {
        let ve = name.to_string();
        match (want.get(name), have.get(name)) {
            (Some(a), None) => {
                steps.push(Step::Create {
                    ve,
                    generation: a.generation,
                    start: a.run,
                });
            }
            (Some(a), Some(l)) => {
                if let Some(to) = &a.move_to {
                    steps.push(Step::Move { ve, to: to.clone() });
                } else if l.generation < a.generation {
                    steps.push(Step::Update {
                        ve,
                        generation: a.generation,
                        run: (a.run != l.running).then_some(a.run),
                    });
                }
            }
            (None, Some(l)) => {
                let deleted = others.deleted.contains(name);
                let elsewhere = others.elsewhere.contains(name);
                if !deleted && !elsewhere {
                    steps.push(Step::Adopt { ve });
                    continue;
                }
                if l.running {
                    steps.push(Step::Stop { ve: ve.clone() });
                }
                steps.push(if deleted {
                    Step::Destroy { ve }
                } else {
                    Step::Release { ve }
                });
            }
            (None, None) => {}
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, generation: u64, run: bool) -> Assigned {
        Assigned {
            name: name.into(),
            generation,
            run,
            move_to: None,
        }
    }

    fn l(name: &str, generation: u64, running: bool) -> Local {
        Local {
            name: name.into(),
            generation,
            running,
        }
    }

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[test]
    fn new_assignments_are_created_and_started_as_asked() {
        assert_eq!(
            reconcile(&[a("web", 1, true), a("db", 3, false)], &[], &Others::default()),
            vec![
                Step::Create {
                    ve: s("db"),
                    generation: 3,
                    start: false
                },
                Step::Create {
                    ve: s("web"),
                    generation: 1,
                    start: true
                },
            ]
        );
    }

    #[test]
    fn a_matching_node_does_nothing_and_new_generations_are_applied() {
        let assigned = [a("a", 2, true), a("b", 5, false), a("c", 1, true)];
        let none = Others::default();
        assert_eq!(
            reconcile(&assigned, &[l("a", 2, true), l("b", 5, false), l("c", 1, true)], &none),
            vec![]
        );
        assert_eq!(
            reconcile(&assigned, &[l("a", 1, false), l("b", 4, true), l("c", 0, true)], &none),
            vec![
                Step::Update {
                    ve: s("a"),
                    generation: 2,
                    run: Some(true)
                },
                Step::Update {
                    ve: s("b"),
                    generation: 5,
                    run: Some(false)
                },
                Step::Update {
                    ve: s("c"),
                    generation: 1,
                    run: None
                },
            ]
        );
        // Between generations the VE's own restart policy rules: a VE that stopped by
        // itself is not started again, one running against the spec's wish is not stopped.
        assert_eq!(
            reconcile(
                &[a("a", 2, true), a("b", 5, false)],
                &[l("a", 2, false), l("b", 5, true)],
                &none
            ),
            vec![]
        );
        // A local generation ahead of the assignment (a stale read) changes nothing.
        assert_eq!(reconcile(&[a("a", 1, true)], &[l("a", 2, true)], &none), vec![]);
    }

    #[test]
    fn ves_no_longer_assigned_here_are_destroyed_handed_over_or_adopted() {
        let others = Others {
            elsewhere: [s("moved")].into(),
            deleted: [s("deleted"), s("gone-running")].into(),
        };
        assert_eq!(
            reconcile(
                &[],
                &[
                    l("moved", 1, true),
                    l("deleted", 1, false),
                    l("gone-running", 3, true),
                    l("unknown", 0, true)
                ],
                &others
            ),
            vec![
                Step::Destroy { ve: s("deleted") },
                Step::Stop { ve: s("gone-running") },
                Step::Destroy { ve: s("gone-running") },
                Step::Stop { ve: s("moved") },
                Step::Release { ve: s("moved") },
                // No spec anywhere: never destroyed for want of a record.
                Step::Adopt { ve: s("unknown") },
            ]
        );
    }

    #[test]
    fn a_ve_to_move_off_a_draining_node_is_moved_not_updated() {
        let mut w = a("web", 3, true);
        w.move_to = Some(s("n2"));
        assert_eq!(
            reconcile(
                &[w.clone(), a("db", 1, false)],
                &[l("web", 2, true), l("db", 1, false)],
                &Others::default()
            ),
            vec![Step::Move {
                ve: s("web"),
                to: s("n2")
            }]
        );
        // Not here (yet): it is made here first, the move comes with the next pass.
        assert_eq!(
            reconcile(&[w], &[], &Others::default()),
            vec![Step::Create {
                ve: s("web"),
                generation: 3,
                start: true
            }]
        );
    }
}
