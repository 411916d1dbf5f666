use super::*;
use vessel_fs::epochs::EpochStart;

fn cfg(in_sync: &[&str], min: usize) -> VolumeConfig {
    VolumeConfig {
        version: 1,
        epoch: 2,
        writer: "a".into(),
        replicas: vec!["a".into(), "b".into(), "c".into()],
        in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
        min_replicas: min,
        want_replicas: 3,
    }
}

fn p(node: &str, acked: u64, waiting: Option<u64>, disc: Option<u64>) -> Progress {
    Progress {
        node: node.into(),
        acked_seq: acked,
        waiting_since: waiting,
        disconnected_since: disc,
    }
}

fn inputs<'a>(config: &'a VolumeConfig, progress: &'a [Progress], now: u64) -> Inputs<'a> {
    Inputs {
        config,
        progress,
        committed: 10,
        now,
        timeouts: Timeouts {
            ack_ms: 2_000,
            sync_ms: 10_000,
        },
    }
}

fn hist(entries: &[(u64, u64)]) -> EpochHistory {
    EpochHistory {
        version: 1,
        entries: entries
            .iter()
            .map(|&(epoch, first_seq)| EpochStart { epoch, first_seq })
            .collect(),
    }
}

#[test]
fn all_caught_up_nothing_to_do_and_sync_acked() {
    let c = cfg(&["a", "b", "c"], 2);
    let pr = [p("b", 10, None, None), p("c", 10, None, None)];
    let i = inputs(&c, &pr, 5_000);
    assert_eq!(i.tick(), vec![]);
    assert_eq!(i.ack_decision(10, 4_000), AckDecision::Ack);
}

#[test]
fn a_slow_in_sync_replica_is_removed_only_after_the_ack_timeout() {
    let c = cfg(&["a", "b", "c"], 2);
    let pr = [p("b", 7, Some(3_001), None), p("c", 10, None, None)];
    assert_eq!(inputs(&c, &pr, 5_000).tick(), vec![]);
    assert_eq!(
        inputs(&c, &pr, 5_001).tick(),
        vec![Action::RemoveFromInSync {
            node: "b".into(),
            reason: Lag::NoAck { waited_ms: 2_000 }
        }]
    );
    // Until the CAS lands the sync waits for b, naming it.
    assert_eq!(
        inputs(&c, &pr, 5_001).ack_decision(9, 5_000),
        AckDecision::Wait {
            why: "waiting for in-sync node b (acked 7 of 9)".into()
        }
    );
    // After the CAS: acknowledged without b (2 copies in sync, min 2).
    let c2 = c.without("b").unwrap();
    assert_eq!(inputs(&c2, &pr, 5_001).ack_decision(9, 5_000), AckDecision::Ack);
}

#[test]
fn a_disconnected_replica_is_removed_with_that_reason() {
    let c = cfg(&["a", "b", "c"], 2);
    let pr = [p("b", 10, None, Some(1_000)), p("c", 10, None, None)];
    assert_eq!(
        inputs(&c, &pr, 3_500).tick(),
        vec![Action::RemoveFromInSync {
            node: "b".into(),
            reason: Lag::Disconnected { for_ms: 2_500 }
        }]
    );
    assert_eq!(
        Lag::Disconnected { for_ms: 2_500 }.to_string(),
        "disconnected for 2500 ms"
    );
    // A replica with no progress entry counts as disconnected since 0.
    let only_c = [p("c", 10, None, None)];
    assert_eq!(
        inputs(&c, &only_c, 2_000).tick(),
        vec![Action::RemoveFromInSync {
            node: "b".into(),
            reason: Lag::Disconnected { for_ms: 2_000 }
        }]
    );
}

#[test]
fn a_replica_that_acked_everything_is_added_back() {
    let c = cfg(&["a", "c"], 2);
    let caught_up = [p("b", 10, None, None), p("c", 10, None, None)];
    assert_eq!(
        inputs(&c, &caught_up, 1).tick(),
        vec![Action::AddToInSync { node: "b".into() }]
    );
    // Behind, outstanding sends, or disconnected: not yet.
    for b in [
        p("b", 9, Some(0), None),
        p("b", 10, Some(0), None),
        p("b", 10, None, Some(0)),
    ] {
        let pr = [b.clone(), p("c", 10, None, None)];
        assert_eq!(inputs(&c, &pr, 1).tick(), vec![], "{b:?}");
    }
}

#[test]
fn removal_and_addition_in_one_tick_in_replica_order() {
    let c = cfg(&["a", "c"], 1);
    let pr = [p("b", 10, None, None), p("c", 3, Some(0), None)];
    assert_eq!(
        inputs(&c, &pr, 2_000).tick(),
        vec![
            Action::AddToInSync { node: "b".into() },
            Action::RemoveFromInSync {
                node: "c".into(),
                reason: Lag::NoAck { waited_ms: 2_000 }
            },
        ]
    );
}

#[test]
fn too_few_copies_wait_with_a_reason_then_fail() {
    let c = cfg(&["a"], 2);
    let pr = [p("b", 4, Some(100), None), p("c", 0, None, Some(50))];
    let why = "1 of 2 required copies in sync: node b is catching up (acked 4 of 10), \
               node c is disconnected"
        .to_string();
    assert_eq!(
        inputs(&c, &pr, 9_999).ack_decision(10, 0),
        AckDecision::Wait { why: why.clone() }
    );
    assert_eq!(inputs(&c, &pr, 10_000).ack_decision(10, 0), AckDecision::Fail { why });
    // One node, min 2: nobody to wait for.
    let mut solo = VolumeConfig::new("a", 2, 2);
    solo.epoch = 2;
    assert_eq!(
        inputs(&solo, &[], 0).ack_decision(1, 0),
        AckDecision::Wait {
            why: "1 of 2 required copies in sync: no other copy exists".into()
        }
    );
    // min 1 on one node: acknowledged at once.
    assert_eq!(
        inputs(&VolumeConfig::new("a", 1, 1), &[], 0).ack_decision(1, 0),
        AckDecision::Ack
    );
}

#[test]
fn both_reasons_are_given() {
    let c = cfg(&["a", "b"], 3);
    let pr = [p("b", 5, None, None), p("c", 10, None, None)];
    assert_eq!(
        inputs(&c, &pr, 0).ack_decision(8, 0),
        AckDecision::Wait {
            why: "2 of 3 required copies in sync: node c is about to rejoin; \
                  waiting for in-sync node b (acked 5 of 8)"
                .into()
        }
    );
}

fn hello(history: EpochHistory, last: u64, base: u64) -> Hello {
    Hello {
        node: "b".into(),
        history,
        last,
        base,
    }
}

#[test]
fn reconcile_cuts_then_tails() {
    let wh = hist(&[(1, 1), (3, 6)]);
    let w = WriterLog {
        history: &wh,
        last: 12,
        first_retained: 1,
    };
    // A tail from epoch 2 the writer never saw.
    assert_eq!(
        reconcile(w, &hello(hist(&[(1, 1), (2, 6)]), 9, 0)),
        vec![
            Action::Cut {
                node: "b".into(),
                after: 5
            },
            Action::CatchUp {
                node: "b".into(),
                from: 6
            }
        ]
    );
    // Behind without divergence: no cut.
    assert_eq!(
        reconcile(w, &hello(hist(&[(1, 1), (3, 6)]), 8, 0)),
        vec![Action::CatchUp {
            node: "b".into(),
            from: 9
        }]
    );
    // Up to date: the live stream continues after the writer's last.
    assert_eq!(
        reconcile(w, &hello(wh.clone(), 12, 4)),
        vec![Action::CatchUp {
            node: "b".into(),
            from: 13
        }]
    );
}

#[test]
fn reconcile_seeds_when_a_log_no_longer_holds_what_is_needed() {
    let wh = hist(&[(1, 1), (3, 6)]);
    let compacted = WriterLog {
        history: &wh,
        last: 12,
        first_retained: 8,
    };
    // The writer's log starts at 8; the replica needs 6.
    assert_eq!(
        reconcile(compacted, &hello(hist(&[(1, 1), (2, 6)]), 9, 0)),
        vec![
            Action::Cut {
                node: "b".into(),
                after: 5
            },
            Action::Seed { node: "b".into() }
        ]
    );
    // The replica folded its divergent tail into its base (base 7 > point 5): seed only.
    let w = WriterLog {
        first_retained: 1,
        ..compacted
    };
    assert_eq!(
        reconcile(w, &hello(hist(&[(1, 1), (2, 6)]), 9, 7)),
        vec![Action::Seed { node: "b".into() }]
    );
}

#[test]
fn the_next_writer_is_the_reachable_in_sync_node_with_the_longest_log() {
    let c = cfg(&["a", "b", "c"], 2);
    let cand = |node: &str, reachable, e, s| Candidate {
        node: node.into(),
        reachable,
        last_epoch: e,
        last_seq: s,
    };
    assert_eq!(
        choose_writer(
            &c,
            &[cand("a", false, 2, 20), cand("b", true, 2, 15), cand("c", true, 2, 17)]
        ),
        Some("c".into())
    );
    // A later epoch wins over a longer log.
    assert_eq!(
        choose_writer(&c, &[cand("b", true, 1, 30), cand("c", true, 2, 17)]),
        Some("c".into())
    );
    // Ties: in_sync order.
    assert_eq!(
        choose_writer(&c, &[cand("c", true, 2, 17), cand("b", true, 2, 17)]),
        Some("b".into())
    );
    // Not in sync: never, however long its log.
    let c2 = cfg(&["a", "b"], 1);
    assert_eq!(
        choose_writer(&c2, &[cand("b", true, 2, 1), cand("c", true, 2, 99)]),
        Some("b".into())
    );
    assert_eq!(choose_writer(&c2, &[cand("b", false, 2, 1)]), None);
}
