//! A copy whose log the writer no longer holds is seeded from a snapshot (3-node lab,
//! `--replicas 3`, history kept 2 s): node3 dies; the VE writes past a few log segments
//! (64 MiB each) and the writer compacts them away; node3 comes back (or is picked anew,
//! once dropped after the grace) and cannot be caught up from the log: the writer sends it
//! a snapshot through the stream, it comes into sync, and every synced record and the big
//! file are on its own copy, byte for byte as on the writer's.

mod common;
use common::repl::*;
use common::*;
use std::time::{Duration, Instant};
use vessel_testkit::lab::TestLab;

#[test]
fn a_copy_the_log_no_longer_reaches_is_seeded_from_a_snapshot() {
    if !need_root("a_copy_the_log_no_longer_reaches_is_seeded_from_a_snapshot") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    let tid = create_replicated(&lab, "sd", 3, &["--history", "2s"]);
    write_records(&lab, "node1", "sd", 1, 20);
    wait_show(&lab, "node1", "sd", "node2 and node3 in sync", |v| {
        in_sync(v, "node2") && in_sync(v, "node3")
    });

    lab.ok(&["kill", "node3"]);
    // 192 MiB (three log segments) of a pattern, synced, then more records. (Not `yes |
    // head`: busybox's `yes` runs inside its shell and spins on the closed pipe.)
    lab.vessel_ok(
        "node1",
        &[
            "ve",
            "exec",
            "sd",
            "--",
            "sh",
            "-c",
            "head -c 201326592 /dev/zero | tr '\\000' v > /data/big && dd if=/data/big of=/data/big2 bs=1M count=1 conv=fsync 2>/dev/null && sync",
        ],
    );
    write_records(&lab, "node1", "sd", 21, 40);
    // The writer compacts history older than 2 s: its log shrinks below one segment.
    let s = wait_show(&lab, "node1", "sd", "the writer's log compacted", |v| {
        v["fs"]["log_bytes"].as_u64().is_some_and(|b| b < 64 << 20)
    });
    assert!(in_sync(&s, "node2"), "{s}");

    lab.ok(&["start", "node3"]);
    // Seeding 200 MiB on a loaded machine: a longer bound than `wait_show`'s.
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    while t.elapsed() < Duration::from_secs(300) {
        last = show(&lab, "node1", "sd");
        if in_sync(&last, "node3") && in_sync(&last, "node2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(in_sync(&last, "node3"), "node3 not in sync again: {last}");
    let log = std::fs::read_to_string(node_root(&lab, "node1").join("daemon.log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("seeding snapshot sent") && l.contains("node3")),
        "node3 was not seeded from a snapshot (caught up from the log?)"
    );
    scrub_equal(&lab, "node1", "sd", 3);

    lab.vessel_ok("node1", &["ve", "stop", "sd"]);
    assert_eq!(
        closed_records(&lab, "node3", "sd", &tid, 40),
        want_records(40),
        "node3's seeded copy"
    );
    let big = |node: &str| closed_files(&lab, node, "sd", &tid, &["big".to_string()]);
    let on1 = big("node1");
    assert_eq!(on1[0].as_ref().map(|b| b.len()), Some(201_326_592));
    assert!(on1 == big("node3"), "node3's /data/big differs from the writer's");
}
