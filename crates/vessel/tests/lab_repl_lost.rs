//! A lost copy is replaced (3-node lab, `--replicas 2`): the copy's node is killed, the
//! writer takes it out of the in-sync set and syncs go on (1 of 2 needed); `ve show` says
//! "lost" while it is still listed; after the grace the writer drops it from the volume's
//! record, the third node gets a copy, which catches up and comes into sync; every synced
//! record (before and after) is on it, read from its own copy. The lost node, back, sweeps
//! its copy (it is no longer listed).

mod common;
use common::repl::*;
use common::*;
use vessel_testkit::lab::TestLab;

#[test]
fn a_lost_copy_is_replaced_on_another_node_and_swept_when_its_node_returns() {
    if !need_root("a_lost_copy_is_replaced_on_another_node_and_swept_when_its_node_returns") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    let tid = create_replicated(&lab, "lw", 2, &[]);
    write_records(&lab, "node1", "lw", 1, 40);
    let s = wait_show(&lab, "node1", "lw", "one copy in sync", |v| {
        copy_nodes(v).len() == 1 && in_sync(v, &copy_nodes(v)[0])
    });
    let lost = copy_nodes(&s)[0].clone();
    let spare = if lost == "node2" { "node3" } else { "node2" };

    // The copy's node dies: syncs go on once it is out of the set.
    lab.ok(&["kill", &lost]);
    write_records(&lab, "node1", "lw", 41, 60);
    let mut seen_lost = false;
    let s = wait_show(&lab, "node1", "lw", "a new copy in sync instead of the lost one", |v| {
        seen_lost |= replica(v, &lost).is_some_and(|r| r["state"] == "lost" && r["in_sync"] == false);
        replica(v, &lost).is_none() && in_sync(v, spare)
    });
    assert!(seen_lost, "ve show never said the copy on {lost} was lost; last: {s}");
    assert_eq!(copy_nodes(&s), vec![spare.to_string()], "{s}");
    write_records(&lab, "node1", "lw", 61, 80);
    wait_show(&lab, "node1", "lw", "the new copy caught up", |v| in_sync(v, spare));
    scrub_equal(&lab, "node1", "lw", 2);

    // Stopped, the copies are closed: every synced record is on the new copy.
    lab.vessel_ok("node1", &["ve", "stop", "lw"]);
    assert_eq!(
        closed_records(&lab, "node1", "lw", &tid, 80),
        want_records(80),
        "the writer"
    );
    assert_eq!(
        closed_records(&lab, spare, "lw", &tid, 80),
        want_records(80),
        "the new copy on {spare}"
    );
    // The lost node back: its copy is no longer listed and goes.
    let old = node_root(&lab, &lost).join("replicas").join("lw");
    assert!(old.exists(), "{} was there before", old.display());
    lab.ok(&["start", &lost]);
    wait_gone(&old);
    lab.vessel_ok("node1", &["ve", "destroy", "--force", "lw"]);
    wait_gone(&node_root(&lab, spare).join("replicas").join("lw"));
}
