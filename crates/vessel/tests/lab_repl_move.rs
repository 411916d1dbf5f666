//! `ve move` of a replicated VE (3-node lab, `--replicas 2`) to the node holding its
//! in-sync copy: a writer change, nothing copied. A workload in the VE writes numbered
//! records with fsync during the move and prints each acknowledged number (outside the
//! VE: the exec's output); after the move every acknowledged record is on the new writer
//! and on the old one, which is now a copy, in sync, with an equal hash tree. Moved back,
//! the same holds (the epochs go on; the old writer's tail, if any, is cut). Moved on to
//! the third node, which has no copy: the cold copy, the record names it in the old
//! writer's place, and the old writer's files go.

mod common;
use common::repl::*;
use common::*;
use std::time::Instant;
use vessel_testkit::lab::TestLab;

/// Records `b1, b2, ...` written in the VE on `node` until the VE stops; the numbers whose
/// fsync returned (printed after it).
fn background_writer(lab: &TestLab, node: &str, ve: &str) -> Vec<usize> {
    let o = lab.vessel(
        node,
        &[
            "ve",
            "exec",
            ve,
            "--",
            "sh",
            "-c",
            "mkdir -p /data && i=1; while [ $i -le 20000 ]; do echo bg-$i > /data/b$i.tmp && \
             dd if=/data/b$i.tmp of=/data/b$i conv=fsync 2>/dev/null && rm /data/b$i.tmp && echo $i || exit 1; \
             i=$((i+1)); done",
        ],
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The move's own report of its time (`... in 1.2 s`).
fn move_secs(out: &str) -> Option<f64> {
    let line = &out[out.find("moved VE")?..];
    let at = line.find(" in ")?;
    line[at + 4..].split_whitespace().next()?.parse().ok()
}

#[test]
fn a_move_to_an_in_sync_copy_is_a_writer_change_and_loses_no_acknowledged_record() {
    if !need_root("a_move_to_an_in_sync_copy_is_a_writer_change_and_loses_no_acknowledged_record") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    let tid = create_replicated(&lab, "mv", 2, &[]);
    write_records(&lab, "node1", "mv", 1, 40);
    let s = wait_show(&lab, "node1", "mv", "one copy in sync", |v| {
        copy_nodes(v).len() == 1 && in_sync(v, &copy_nodes(v)[0])
    });
    let to = copy_nodes(&s)[0].clone();

    // The move, while the workload writes; the workload ends when the VE stops.
    let (acked, out) = std::thread::scope(|sc| {
        let w = sc.spawn(|| background_writer(&lab, "node1", "mv"));
        // The workload runs before the move starts (bounded).
        let t = Instant::now();
        while !lab
            .vessel("node1", &["ve", "exec", "mv", "--", "test", "-e", "/data/b3"])
            .status
            .success()
        {
            assert!(t.elapsed().as_secs() < 60, "the workload did not start");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let o = lab.vessel("node1", &["ve", "move", "mv", "--to", &to]);
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{out}");
        (w.join().unwrap(), out)
    });
    assert!(out.contains("a writer change"), "{out}");
    let secs = move_secs(&out).unwrap_or_else(|| panic!("no time in: {out}"));
    eprintln!(
        "move of a replicated VE to its copy's node: {secs:.2} s, {} records acknowledged during it",
        acked.len()
    );
    assert!(acked.len() >= 3, "{acked:?}");

    // On the target, running; the old writer is a copy and comes into sync.
    let s = wait_show(&lab, &to, "mv", "the old writer in sync as a copy", |v| {
        in_sync(v, "node1")
    });
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(s["node"], to.as_str(), "{s}");
    assert_eq!(copy_nodes(&s), vec!["node1".to_string()], "{s}");
    assert!(!node_root(&lab, "node1").join("ves/mv").exists());
    write_records(&lab, &to, "mv", 41, 60);
    wait_show(&lab, &to, "mv", "node1 caught up", |v| in_sync(v, "node1"));
    scrub_equal(&lab, &to, "mv", 2);

    // Moved back to node1 (a copy again, in sync): the same, one more writer change.
    let o = lab.vessel_ok(&to, &["ve", "move", "mv", "--to", "node1"]);
    let _ = o;
    let s = wait_show(&lab, "node1", "mv", "moved back, the copy in sync", |v| in_sync(v, &to));
    assert_eq!(s["status"], "running", "{s}");
    write_records(&lab, "node1", "mv", 61, 80);
    wait_show(&lab, "node1", "mv", "caught up", |v| in_sync(v, &to));
    scrub_equal(&lab, "node1", "mv", 2);

    // To the third node, which holds no copy: the cold copy, and the record names it in
    // node1's place (node1's files go; the other copy stays, in sync).
    let third = if to == "node2" { "node3" } else { "node2" };
    let o = lab.vessel("node1", &["ve", "move", "mv", "--to", third]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success() && out.contains("copying VE 'mv'"), "{out}");
    let s = wait_show(&lab, third, "mv", "on the third node, the other copy in sync", |v| {
        in_sync(v, &to)
    });
    assert_eq!(
        (s["status"].as_str(), s["node"].as_str()),
        (Some("running"), Some(third)),
        "{s}"
    );
    assert_eq!(copy_nodes(&s), vec![to.clone()], "{s}");
    wait_gone(&node_root(&lab, "node1").join("ves").join("mv"));
    wait_gone(&node_root(&lab, "node1").join("replicas").join("mv"));
    scrub_equal(&lab, third, "mv", 2);

    // Stopped: every acknowledged record on both copies, read from the copies themselves.
    lab.vessel_ok(third, &["ve", "stop", "mv"]);
    let bg: Vec<String> = acked.iter().map(|i| format!("b{i}")).collect();
    let want_bg: Vec<Option<String>> = acked.iter().map(|i| Some(format!("bg-{i}\n"))).collect();
    for n in [third, to.as_str()] {
        assert_eq!(closed_records(&lab, n, "mv", &tid, 80), want_records(80), "{n}");
        assert_eq!(
            closed_files(&lab, n, "mv", &tid, &bg),
            want_bg,
            "{n}: the records acknowledged during the move"
        );
    }
    lab.vessel_ok(third, &["ve", "destroy", "--force", "mv"]);
    wait_gone(&node_root(&lab, &to).join("replicas").join("mv"));
}
