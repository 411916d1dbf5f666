//! The control center on a 3-node lab with a 3-member etcd: VEs created from one node are
//! placed across the nodes (by `--node`, or by the scheduler) and listed from every node;
//! start, stop, set, exec and destroy from any node reach the VE's node; a VE no node can take
//! stays pending with the reason; a draining node's VEs say why they stay; after the
//! leader's node is killed another node leads and creates keep working.

mod common;
use common::*;
use std::time::Duration;
use vessel_testkit::lab::{leader, state_of, TestLab};

fn ves(lab: &TestLab, node: &str) -> Vec<serde_json::Value> {
    lab.vessel_json(node, &["ve", "list"]).as_array().unwrap().clone()
}

fn find<'a>(list: &'a [serde_json::Value], ve: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|v| v["spec"]["name"] == ve)
}

#[test]
fn ves_are_placed_across_nodes_and_reached_from_every_node() {
    if !need_root("ves_are_placed_across_nodes_and_reached_from_every_node") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3", "--etcd-members", "3"]);
    let nodes = ["node1", "node2", "node3"];
    for n in nodes {
        lab.vessel_ok(n, &["template", "build", "busybox"]);
    }

    // Created from node1: on the node asked for, or where the scheduler puts it.
    let a = lab.vessel_json(
        "node1",
        &[
            "ve",
            "create",
            "a",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node2",
        ],
    );
    assert_eq!(
        (a["node"].as_str(), a["status"].as_str()),
        (Some("node2"), Some("running")),
        "{a}"
    );
    let b = lab.vessel_json(
        "node1",
        &[
            "ve",
            "create",
            "b",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node3",
            "--memory-low",
            "64M",
        ],
    );
    assert_eq!(b["node"], "node3", "{b}");
    let c = lab.vessel_json("node2", &["ve", "create", "c", "--template", "busybox", "--start"]);
    let c_node = c["node"].as_str().unwrap().to_string();
    assert!(nodes.contains(&c_node.as_str()), "{c}");
    assert_eq!(c["status"], "running", "{c}");

    // Every node lists all three, each on its node.
    for n in nodes {
        let list = ves(&lab, n);
        assert_eq!(list.len(), 3, "on {n}: {list:?}");
        assert_eq!(find(&list, "a").unwrap()["node"], "node2", "on {n}");
        assert_eq!(find(&list, "b").unwrap()["node"], "node3", "on {n}");
        assert_eq!(find(&list, "c").unwrap()["node"], c_node.as_str(), "on {n}");
        let table = lab.vessel_ok(n, &["ve", "list"]);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("b ") && l.trim_end().ends_with("node3")),
            "{table}"
        );
    }
    // `node list`: each node's VEs, the memory they request, a recent heartbeat.
    let v = lab.node_list("node1").unwrap();
    let listed = v["nodes"].as_array().unwrap();
    assert_eq!(listed.iter().map(|n| n["ves"].as_u64().unwrap()).sum::<u64>(), 3, "{v}");
    let n3 = listed.iter().find(|n| n["name"] == "node3").unwrap();
    assert!(n3["memory_requested"].as_u64().unwrap() >= 64 << 20, "{v}");
    assert!(listed.iter().all(|n| n["heartbeat_secs_ago"].is_i64()), "{v}");
    let table = lab.vessel_ok("node1", &["node", "list"]);
    assert!(table.contains("HEARTBEAT") && table.contains(" ago"), "{table}");

    // Each VE runs on its node; exec from another node reaches it there.
    assert_eq!(
        lab.vessel_ok("node3", &["ve", "exec", "b", "--", "hostname"]).trim(),
        "b"
    );
    assert_eq!(
        lab.vessel_ok("node1", &["ve", "exec", "b", "--", "hostname"]).trim(),
        "b"
    );

    // Stop, set and start from another node reach the VE's node.
    let s = lab.vessel_json("node1", &["ve", "stop", "a"]);
    assert_eq!(
        (s["status"].as_str(), s["node"].as_str()),
        (Some("stopped"), Some("node2")),
        "{s}"
    );
    assert_eq!(lab.vessel_json("node2", &["ve", "show", "a"])["status"], "stopped");
    lab.vessel_ok("node3", &["ve", "set", "a", "--pids", "300"]);
    assert_eq!(
        lab.vessel_json("node2", &["ve", "show", "a"])["spec"]["limits"]["pids_max"],
        300
    );
    let s = lab.vessel_json("node3", &["ve", "start", "a"]);
    assert_eq!(s["status"], "running", "{s}");
    assert_eq!(
        lab.vessel_ok("node2", &["ve", "exec", "a", "--", "cat", "/proc/1/comm"])
            .trim(),
        "init"
    );
    // A running VE on another node is not destroyed without --force; with it, it is gone
    // everywhere, files included.
    let o = lab.vessel("node1", &["ve", "destroy", "a"]);
    assert!(!o.status.success() && err(&o).contains("--force"), "{}", err(&o));
    lab.vessel_ok("node1", &["ve", "destroy", "a", "--force"]);
    for n in nodes {
        assert!(find(&ves(&lab, n), "a").is_none(), "a still listed on {n}");
    }
    assert!(!lab.vessel("node2", &["ve", "show", "a"]).status.success());
    assert!(!std::path::Path::new(&format!("/var/lib/vessel-lab/{}/node2/ves/a", lab.name)).exists());

    // No node fits: pending with the reason, everywhere.
    let p = lab.vessel_json(
        "node1",
        &["ve", "create", "p", "--template", "busybox", "--node", "node9"],
    );
    assert_eq!(p["status"], "pending", "{p}");
    let shown = lab.vessel_ok("node3", &["ve", "show", "p"]);
    assert!(
        shown.contains("pending:") && shown.contains("node node9 is not in the cluster"),
        "{shown}"
    );
    lab.vessel_ok("node2", &["ve", "destroy", "p"]);

    // A draining node's VE says why it stays (moving VEs comes with `ve move`).
    lab.vessel_ok("node1", &["node", "drain", "node3"]);
    wait_until("b says its node drains", Duration::from_secs(30), || {
        lab.vessel_json("node1", &["ve", "show", "b"])["pending"]
            .as_str()
            .is_some_and(|p| p.contains("draining"))
    });
    lab.vessel_ok("node1", &["node", "undrain", "node3"]);

    // The leader's node dies: another node leads, and creates keep working there.
    let old = leader(&lab.node_list("node1").unwrap()).expect("a leader");
    lab.ok(&["kill", &old]);
    let other = nodes.iter().find(|n| **n != old).unwrap();
    lab.wait_list("a new leader, the old one lost", other, |v| {
        state_of(v, &old).as_deref() == Some("lost") && leader(v).is_some_and(|l| l != old)
    });
    let d = lab.vessel_json(other, &["ve", "create", "d", "--template", "busybox", "--start"]);
    assert_eq!(d["status"], "running", "{d}");
    assert_ne!(d["node"], old.as_str(), "placed on the lost node: {d}");
    // The lost node's VEs are still listed (restarting them elsewhere is failover's job).
    let list = ves(&lab, other);
    assert!(find(&list, "d").is_some() && list.len() == 3, "{list:?}");
}
