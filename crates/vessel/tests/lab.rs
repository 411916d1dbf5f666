//! `vessel lab`: a 3-node lab with a 3-member etcd on this machine. Every node lists every
//! node (with its address) and one leader; a busybox VE runs on node 2; killing the leader
//! node (a power loss, by cgroup) elects another, which places new VEs, and shows the
//! killed one lost; `lab start` brings it
//! back; a partitioned node is lost to the others until `lab heal`; `lab down` leaves
//! nothing, also after `vessel lab up` was killed -9 midway or failed on purpose.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vessel_testkit::lab::{leader, state_of, TestLab};

/// Nothing with the lab's name or prefix is left: state, data, cgroups in any hierarchy,
/// mounts, processes, links and nft tables of the root namespace.
fn assert_nothing_left(name: &str, prefix: &str) {
    assert!(prefix.starts_with("vl") && prefix.len() == 7, "{prefix}");
    for p in [format!("/run/vessel-lab/{name}"), format!("/var/lib/vessel-lab/{name}")] {
        assert!(!Path::new(&p).exists(), "{p} left behind");
    }
    let cg = format!("vessel-lab-{prefix}");
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let d = h.path().join(&cg);
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mi.lines() {
        assert!(
            !l.contains(prefix) && !l.contains(&format!("/vessel-lab/{name}/")),
            "mount left behind: {l}"
        );
    }
    // Killed processes may stay zombies for a moment until their reaper collects them.
    wait_until("no process of the lab", Duration::from_secs(20), || {
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let in_lab = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(&cg));
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
                .unwrap_or(true);
            if in_lab && !zombie {
                left.push(pid);
            }
        }
        if !left.is_empty() {
            eprintln!("lab processes left: {left:?}");
        }
        left.is_empty()
    });
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !out(&links).contains(prefix),
        "link left in the root namespace:\n{}",
        out(&links)
    );
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!out(&tables).contains(prefix), "nft table left:\n{}", out(&tables));
}

#[test]
fn three_nodes_elect_fail_over_partition_heal_and_leave_nothing() {
    if !need_root("three_nodes_elect_fail_over_partition_heal_and_leave_nothing") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3", "--etcd-members", "3"]);
    let prefix = lab.prefix();
    let st: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "--json"])).unwrap();
    assert_eq!(st["nodes"].as_array().unwrap().len(), 3, "{st}");
    for n in st["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "up", "{st}");
        assert_eq!(n["daemon_alive"], true, "{st}");
        assert_eq!(n["etcd_healthy"], true, "{st}");
    }
    let addrs: Vec<String> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["address"].as_str().unwrap().to_string())
        .collect();

    // Every node sees the three, ready, each with its address, and one leader.
    for node in ["node1", "node2", "node3"] {
        let v = lab.node_list(node).unwrap_or_else(|| panic!("node list on {node}"));
        assert_eq!(v["this_node"], node, "{v}");
        assert_eq!(v["private_etcd"], false, "{v}");
        let nodes = v["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{v}");
        for (i, n) in nodes.iter().enumerate() {
            assert_eq!(n["name"], format!("node{}", i + 1), "{v}");
            assert_eq!(n["state"], "ready", "{v}");
            assert_eq!(n["address"], addrs[i].as_str(), "{v}");
        }
        assert_eq!(nodes.iter().filter(|n| n["leader"] == true).count(), 1, "{v}");
    }
    let e = err(&lab.run(&["up", "--nodes", "3"]));
    assert!(e.contains("exists"), "a second lab of the same name: {e}");
    let e = err(&lab.run(&["kill", "node9"]));
    assert!(e.contains("has no node node9"), "{e}");
    // The root namespace has no lab address and no lab link.
    let links = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    assert!(!out(&links).contains(&addrs[0]), "{}", out(&links));

    // A busybox VE on node2 (built offline from the host's busybox-static) runs a command.
    lab.ok(&["exec", "node2", "--", "vessel", "template", "build", "busybox"]);
    lab.ok(&[
        "exec",
        "node2",
        "--",
        "vessel",
        "ve",
        "create",
        "x",
        "--template",
        "busybox",
        "--start",
    ]);
    let said = lab.ok(&[
        "exec",
        "node2",
        "--",
        "vessel",
        "ve",
        "exec",
        "x",
        "--",
        "sh",
        "-c",
        "echo hi from $(hostname)",
    ]);
    assert_eq!(said.trim(), "hi from x");
    // lab exec passes the exit code through.
    let o = lab.run(&["exec", "node1", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7));

    // Kill the leader node: another node leads and the killed one is lost.
    let old = leader(&lab.node_list("node1").unwrap()).expect("a leader");
    lab.ok(&["kill", &old]);
    let st: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "--json"])).unwrap();
    let killed = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == old.as_str())
        .unwrap();
    assert_eq!(
        (killed["state"].as_str(), killed["daemon_alive"].as_bool()),
        (Some("down"), Some(false)),
        "{st}"
    );
    let other = if old == "node1" { "node2" } else { "node1" };
    lab.wait_list("a new leader, the old one lost", other, |v| {
        leader(v).is_some_and(|l| l != old) && state_of(v, &old).as_deref() == Some("lost")
    });
    let v = lab.node_list(other).unwrap();
    let lost = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == old.as_str())
        .unwrap();
    assert!(
        lost["heartbeat_secs_ago"].is_null(),
        "a lost node has no heartbeat: {v}"
    );
    // Creates keep working under the new leader (placed by it, on a live node).
    lab.ok(&["exec", other, "--", "vessel", "template", "build", "busybox"]);
    let made = lab.ok(&[
        "exec",
        other,
        "--",
        "vessel",
        "ve",
        "create",
        "after",
        "--template",
        "busybox",
        "--node",
        other,
        "--start",
        "--json",
    ]);
    let made: serde_json::Value = serde_json::from_str(&made).unwrap();
    assert_eq!(
        (made["status"].as_str(), made["node"].as_str()),
        (Some("running"), Some(other)),
        "{made}"
    );
    lab.ok(&["exec", other, "--", "vessel", "ve", "destroy", "after", "--force"]);
    // The killed node can still be entered (its namespaces stay) for diagnostics.
    lab.ok(&["exec", &old, "--", "true"]);
    lab.ok(&["start", &old]);
    lab.wait_list("the restarted node is ready for the others", other, |v| {
        state_of(v, &old).as_deref() == Some("ready")
    });

    // Partition node3: the others see it lost; heal: ready again.
    lab.ok(&["partition", "node3"]);
    let st: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "--json"])).unwrap();
    assert_eq!(
        st["nodes"][2]["partitioned_from"],
        serde_json::json!(["node1", "node2"]),
        "{st}"
    );
    lab.wait_list("node3 lost to node1", "node1", |v| {
        state_of(v, "node3").as_deref() == Some("lost")
    });
    let o = lab.run(&[
        "exec",
        "node3",
        "--",
        "sh",
        "-c",
        "ping -c1 -W1 10.0.0.1 >/dev/null 2>&1",
    ]);
    assert!(!o.status.success(), "nodes have no way out");
    lab.ok(&["heal"]);
    lab.wait_list("node3 ready again", "node1", |v| {
        state_of(v, "node3").as_deref() == Some("ready")
    });

    lab.ok(&["down"]);
    assert_nothing_left(&lab.name, &prefix);
    // Idempotent.
    let again = lab.ok(&["down"]);
    assert!(again.contains("no lab"), "{again}");
}

#[test]
fn down_removes_a_half_made_lab_after_a_crash_or_a_failure() {
    if !need_root("down_removes_a_half_made_lab_after_a_crash_or_a_failure") {
        return;
    }
    // kill -9 of `vessel lab up` once a daemon runs.
    let lab = TestLab::new(&vessel_bin());
    let mut up = lab.cmd(&["up", "--nodes", "2"]);
    up.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = up.spawn().unwrap();
    let t0 = Instant::now();
    let started = loop {
        let daemon = lab.state().and_then(|s| s["nodes"]["node1"]["daemon_pid"].as_i64());
        if daemon.is_some() {
            break true;
        }
        if child.try_wait().unwrap().is_some() || t0.elapsed() > Duration::from_secs(120) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(started, "lab up did not get to the daemons");
    let prefix = lab.prefix();
    let d: PathBuf = format!("/sys/fs/cgroup/unified/vessel-lab-{prefix}").into();
    assert!(d.exists() || Path::new(&format!("/sys/fs/cgroup/vessel-lab-{prefix}")).exists());
    lab.ok(&["down"]);
    assert_nothing_left(&lab.name, &prefix);

    // A failure after etcd started (injected): the error says how to clean up; down does.
    let lab = TestLab::new(&vessel_bin());
    let o = lab.run(&["up", "--nodes", "2", "--fail-after", "etcd"]);
    assert!(!o.status.success());
    assert!(err(&o).contains("vessel lab down"), "{}", err(&o));
    let prefix = lab.prefix();
    let st: serde_json::Value = serde_json::from_str(&lab.ok(&["status", "--json"])).unwrap();
    assert_eq!(st["phase"], "creating", "{st}");
    assert_eq!(st["nodes"][0]["etcd_alive"], true, "{st}");
    lab.ok(&["down"]);
    assert_nothing_left(&lab.name, &prefix);

    // Bad input: too many etcd members (nothing is made), a lab that is not there.
    let lab = TestLab::new(&vessel_bin());
    let e = err(&lab.run(&["up", "--nodes", "2", "--etcd-members", "3"]));
    assert!(e.contains("--etcd-members 3"), "{e}");
    assert!(
        !Path::new(&format!("/run/vessel-lab/{}", lab.name)).exists(),
        "nothing made"
    );
    let e = err(&lab.run(&["kill", "node1"]));
    assert!(e.contains("no lab"), "{e}");
}
