//! Between nodes on a 3-node lab: a node without a VE's template fetches it from a node
//! that has it (every file verified; a corrupted copy is refused and nothing is
//! installed); `ve move` of a running VE keeps its files, history, address and uid range, runs it on the
//! target only and removes the source's copy; a move that fails leaves the VE where it
//! was, running; draining a node moves its VEs off, and a VE that may run nowhere else
//! stays with the reason.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};
use vessel_testkit::lab::TestLab;

fn node_of(lab: &TestLab, from: &str, ve: &str) -> (String, String) {
    let v = lab.vessel_json(from, &["ve", "show", ve]);
    (
        v["node"].as_str().unwrap_or_default().to_string(),
        v["status"].as_str().unwrap_or_default().to_string(),
    )
}

fn data(lab: &TestLab, node: &str) -> String {
    format!("/var/lib/vessel-lab/{}/{node}", lab.name)
}

fn template_id(lab: &TestLab, node: &str, name: &str) -> Option<String> {
    let list = lab.vessel_json(node, &["template", "list"]);
    list.as_array()?
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["id"].as_str().map(str::to_string))
}

/// Scratch dirs (`.build-*`, `.move-*`) left under a node's templates/ or ves/.
fn scratch(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn templates_are_fetched_from_peers_and_verified() {
    if !need_root("templates_are_fetched_from_peers_and_verified") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    lab.vessel_ok("node1", &["template", "build", "busybox"]);
    let id = template_id(&lab, "node1", "busybox").expect("built on node1");
    assert_eq!(template_id(&lab, "node2", "busybox"), None);

    // Placed on node2, which lacks the template: node2 fetches it, verifies it, runs the VE.
    // One copy: a second one would fetch the template to its node too.
    let v = lab.vessel_json(
        "node1",
        &[
            "ve",
            "create",
            "t1",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node2",
            "--replicas",
            "1",
        ],
    );
    assert_eq!(
        (v["node"].as_str(), v["status"].as_str()),
        (Some("node2"), Some("running")),
        "{v}"
    );
    assert_eq!(template_id(&lab, "node2", "busybox").as_deref(), Some(id.as_str()));
    assert_eq!(
        lab.vessel_ok("node2", &["ve", "exec", "t1", "--", "hostname"]).trim(),
        "t1"
    );

    // node1's copy is altered on disk: a fetch from it is refused, naming the file, and
    // nothing is installed on node3.
    let passwd = format!("{}/templates/{id}/rootfs/etc/passwd", data(&lab, "node1"));
    let mut text = std::fs::read_to_string(&passwd).expect("the template has /etc/passwd");
    text.push_str("intruder:x:0:0::/root:/bin/sh\n");
    std::fs::write(&passwd, text).unwrap();
    let o = lab.vessel("node3", &["template", "fetch", "busybox", "--from", "node1"]);
    let e = err(&o);
    assert!(!o.status.success(), "a corrupted template was accepted: {}", out(&o));
    assert!(
        e.contains("refused") && e.contains("etc/passwd") && e.contains("manifest"),
        "{e}"
    );
    assert_eq!(template_id(&lab, "node3", "busybox"), None);
    assert_eq!(
        scratch(&format!("{}/templates", data(&lab, "node3"))),
        Vec::<String>::new()
    );

    // From a good copy (node2's, itself fetched) it arrives, with progress shown.
    let t0 = Instant::now();
    let o = lab.vessel("node3", &["template", "fetch", "busybox", "--from", "node2"]);
    let took = t0.elapsed();
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        out(&o).contains("verified") && err(&o).contains("fetching template"),
        "{} {}",
        out(&o),
        err(&o)
    );
    assert_eq!(template_id(&lab, "node3", "busybox").as_deref(), Some(id.as_str()));
    eprintln!(
        "MEASURE template fetch busybox (CLI, lab exec included): {} ms",
        took.as_millis()
    );
}

#[test]
fn ves_move_between_nodes_with_their_history_and_drain_moves_them_off() {
    if !need_root("ves_move_between_nodes_with_their_history_and_drain_moves_them_off") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    // Only node1 has the template: m1 goes there (preferred), and the move to node2 brings
    // the template along (by id). m1 is not pinned (`--node`): drain may move it. One
    // copy: this is the cold move (a replicated VE's move is `lab_repl_move`).
    lab.vessel_ok("node1", &["template", "build", "busybox"]);
    let v = lab.vessel_json(
        "node2",
        &[
            "ve",
            "create",
            "m1",
            "--template",
            "busybox",
            "--start",
            "--replicas",
            "1",
        ],
    );
    assert_eq!(
        (v["node"].as_str(), v["status"].as_str()),
        (Some("node1"), Some("running")),
        "{v}"
    );
    let ip = v["spec"]["ip"].as_str().unwrap_or_default().to_string();
    let uid_base = v["uid_base"].clone();
    assert!(uid_base.as_u64().is_some(), "{v}");
    lab.vessel_ok(
        "node1",
        &[
            "ve",
            "exec",
            "m1",
            "--",
            "sh",
            "-c",
            "echo before-move > /root/hello && sync",
        ],
    );
    lab.vessel_ok(
        "node1",
        &[
            "ve",
            "exec",
            "m1",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/root/big bs=1M count=100 2>/dev/null && sync",
        ],
    );
    let before = lab.vessel_ok("node1", &["ve", "history", "m1", "/root/hello"]);
    assert!(before.lines().count() >= 2, "{before}");

    // A move that fails on the target (its VE dir is taken by a file) leaves the VE on its
    // node, running, with nothing left on the target.
    let blocker = format!("{}/ves/m1", data(&lab, "node3"));
    std::fs::write(&blocker, b"in the way").unwrap();
    let o = lab.vessel("node1", &["ve", "move", "m1", "--to", "node3"]);
    assert!(!o.status.success(), "the move did not fail: {}", out(&o));
    assert!(err(&o).contains("stays on node node1"), "{}", err(&o));
    std::fs::remove_file(&blocker).unwrap();
    assert_eq!(node_of(&lab, "node2", "m1"), ("node1".into(), "running".into()));
    assert_eq!(
        lab.vessel_ok("node1", &["ve", "exec", "m1", "--", "cat", "/root/hello"])
            .trim(),
        "before-move"
    );
    assert_eq!(scratch(&format!("{}/ves", data(&lab, "node3"))), Vec::<String>::new());
    assert!(lab
        .vessel_json("node3", &["ve", "list"])
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["node"] != "node3"));

    // Moved from a third node's CLI: runs on node2 with its files, address and history.
    let t0 = Instant::now();
    let moved = lab.vessel_json("node3", &["ve", "move", "m1", "--to", "node2"]);
    let took = t0.elapsed();
    assert_eq!(
        (moved["node"].as_str(), moved["status"].as_str()),
        (Some("node2"), Some("running")),
        "{moved}"
    );
    // The VE keeps its address and uid range (its identity in the cluster's IPAM).
    let moved_ip = moved["spec"]["ip"].as_str().unwrap_or_default().to_string();
    assert!(ip.starts_with("10.") && moved_ip == ip, "{moved}");
    assert_eq!(moved["uid_base"], uid_base, "{moved}");
    eprintln!(
        "MEASURE ve move (running busybox VE, 100 MiB written; CLI on a third node): {} ms",
        took.as_millis()
    );
    assert_eq!(
        lab.vessel_ok("node2", &["ve", "exec", "m1", "--", "cat", "/root/hello"])
            .trim(),
        "before-move"
    );
    assert_eq!(
        lab.vessel_ok("node2", &["ve", "exec", "m1", "--", "sh", "-c", "wc -c < /root/big"])
            .trim(),
        "104857600"
    );
    let after = lab.vessel_ok("node2", &["ve", "history", "m1", "/root/hello"]);
    assert_eq!(after, before, "history differs after the move");
    // From the old node the VE is reached on its new one (the call is carried there).
    assert_eq!(lab.vessel_json("node1", &["ve", "show", "m1"])["node"], "node2");
    assert_eq!(
        lab.vessel_ok("node1", &["ve", "exec", "m1", "--", "cat", "/root/hello"])
            .trim(),
        "before-move"
    );
    assert!(
        !Path::new(&format!("{}/ves/m1", data(&lab, "node1"))).exists(),
        "node1 kept its copy"
    );
    // The progress went to stderr in bytes.
    let o = lab.vessel("node2", &["ve", "move", "m1", "--to", "node1"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("copying VE 'm1' to node node1"), "{}", err(&o));
    assert_eq!(node_of(&lab, "node3", "m1"), ("node1".into(), "running".into()));

    // Drain node1: m1 moves to another node; a VE that may run only on node1 stays, saying why.
    lab.vessel_ok(
        "node1",
        &[
            "ve",
            "create",
            "pin",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node1",
        ],
    );
    lab.vessel_ok("node3", &["node", "drain", "node1"]);
    wait_until("m1 moved off the draining node1", Duration::from_secs(120), || {
        let (n, s) = node_of(&lab, "node3", "m1");
        n != "node1" && !n.is_empty() && s == "running"
    });
    wait_until("pin says why it stays", Duration::from_secs(30), || {
        let v = lab.vessel_json("node3", &["ve", "show", "pin"]);
        v["node"] == "node1"
            && v["pending"]
                .as_str()
                .is_some_and(|p| p.contains("draining") && p.contains("--node"))
    });
    let (n, _) = node_of(&lab, "node2", "m1");
    assert_eq!(
        lab.vessel_ok(&n, &["ve", "exec", "m1", "--", "cat", "/root/hello"])
            .trim(),
        "before-move"
    );
    assert_eq!(node_of(&lab, "node2", "pin"), ("node1".into(), "running".into()));
    // The old copy goes once the new node has reported the VE running.
    wait_until("node1 removes its copy of m1", Duration::from_secs(30), || {
        !Path::new(&format!("{}/ves/m1", data(&lab, "node1"))).exists()
    });
}
