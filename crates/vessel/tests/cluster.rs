//! The node in its cluster (one machine): `vessel up` runs a private etcd and supervises
//! it, the node registers under a lease and leads the control center, `vessel node list`
//! shows it; the etcd dies with the daemon, even with a kill -9.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// The daemon's private etcd: the process whose parent is the daemon and whose data dir
/// is this test's.
fn etcd_pid(node: &vessel_testkit::TestNode) -> Option<i32> {
    let want = format!("--data-dir={}", node.root.join("etcd").display());
    let daemon = node.daemon_pid()? as i32;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !cmd.split(|b| *b == 0).any(|a| a == want.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(daemon) {
            return Some(pid);
        }
    }
    None
}

fn alive(pid: i32) -> bool {
    // Not a zombie and still there.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

#[test]
fn one_node_is_a_cluster_with_a_supervised_private_etcd() {
    if !need_root("one_node_is_a_cluster_with_a_supervised_private_etcd") {
        return;
    }
    let mut node = start("cl");
    let v = node.json(&["node", "list"]);
    assert_eq!(v["private_etcd"], true, "{v}");
    let me = v["this_node"].as_str().unwrap().to_string();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    assert_eq!(nodes[0]["name"], me.as_str());
    assert_eq!(nodes[0]["state"], "ready");
    wait_until("this node leads", Duration::from_secs(10), || {
        node.json(&["node", "list"])["nodes"][0]["leader"] == true
    });
    assert!(nodes[0]["cpus"].as_u64().unwrap() >= 1 && nodes[0]["memory"].as_u64().unwrap() > 0);
    let table = node.ok(&["node", "list"]);
    assert!(table.starts_with("NAME") && table.contains(" ready "), "{table}");
    let show = node.ok(&["node", "show", &me]);
    assert!(show.contains("(private, this node's)"), "{show}");
    let e = node.fails(&["node", "show", "no-such-node"]);
    assert!(e.contains("no node no-such-node"), "{e}");

    // Drain and undrain (the operator's word, kept in the member record); a live node
    // cannot be removed, an unknown one is not found.
    node.ok(&["node", "drain", &me]);
    assert_eq!(node.json(&["node", "list"])["nodes"][0]["state"], "draining");
    node.ok(&["node", "undrain", &me]);
    assert_eq!(node.json(&["node", "list"])["nodes"][0]["state"], "ready");
    let e = node.fails(&["node", "remove", &me]);
    assert!(e.contains("is alive"), "{e}");
    let e = node.fails(&["node", "drain", "ghost"]);
    assert!(e.contains("no node ghost"), "{e}");
    let e = node.fails(&["node", "remove", "ghost"]);
    assert!(e.contains("no node ghost"), "{e}");

    // etcd dies: the daemon starts it again on the same data; the node is still there.
    let pid = etcd_pid(&node).expect("the daemon's private etcd runs");
    // SAFETY: a process this test's daemon started (its data dir is this test's).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until("etcd restarted", Duration::from_secs(20), || {
        etcd_pid(&node).is_some_and(|p| p != pid)
    });
    wait_until("node listed again", Duration::from_secs(20), || {
        node.vessel(&["node", "list", "--json"]).status.success()
    });
    let v = node.json(&["node", "list"]);
    assert_eq!(v["nodes"][0]["name"], me.as_str(), "{v}");

    // A kill -9 of the daemon takes its etcd along; the next daemon runs a new one on
    // the same data, and the node is the same member.
    // ... and the node stays drained across it.
    node.ok(&["node", "drain", &me]);
    let pid = etcd_pid(&node).unwrap();
    node.kill_daemon();
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(15), "etcd outlived its daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
    node.spawn_daemon();
    wait_until("registered again, still draining", Duration::from_secs(20), || {
        node.vessel(&["node", "list", "--json"]).status.success()
            && node.json(&["node", "list"])["nodes"][0]["state"] == "draining"
    });
    node.ok(&["node", "undrain", &me]);
    assert_eq!(node.json(&["node", "list"])["nodes"][0]["state"], "ready");
    // A clean stop stops it too.
    let pid = etcd_pid(&node).unwrap();
    node.stop_daemon();
    assert!(!alive(pid), "etcd left running after the daemon stopped");
}
