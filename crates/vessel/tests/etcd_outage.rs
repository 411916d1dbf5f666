//! The control store is the operator's etcd (`[cluster] etcd`): one that does not answer at
//! start is a clear error that names it and says what to check, and nothing is left
//! running; a node whose etcd goes away keeps its VEs running and serving, refuses what
//! needs the store with the reason, and is back in the cluster when etcd is.

mod common;
use common::*;
use std::process::Stdio;
use std::time::Duration;
use vessel_cluster::etcd::{free_port, EtcdConfig, PrivateEtcd};
use vessel_cluster::keys;
use vessel_cluster::store::Store;

fn config(n: &TestNode, url: &str) {
    std::fs::write(
        n.root.join("node.toml"),
        format!("version = 1\n[cluster]\nname = \"outage\"\netcd = [\"{url}\"]\n"),
    )
    .unwrap();
}

#[test]
fn a_node_outlives_its_etcd_and_an_unreachable_one_is_a_clear_error() {
    if !need_root("a_node_outlives_its_etcd_and_an_unreachable_one_is_a_clear_error") {
        return;
    }
    // Nothing listens on this port.
    let dead = format!("http://127.0.0.1:{}", free_port().unwrap());
    let mut n = TestNode::prepare(&vessel_bin(), "eo");
    config(&n, &dead);
    let mut cmd = n.command();
    cmd.arg("daemon").stdin(Stdio::null());
    let o = run_bounded(cmd, Duration::from_secs(60));
    assert!(!o.status.success(), "a daemon started without its etcd: {}", out(&o));
    let e = err(&o);
    assert!(e.contains(&dead) && e.contains("etcd"), "{e}");
    assert!(!n.vessel(&["status"]).status.success(), "a daemon is left");

    // The operator's etcd (a real one, its data in this test's dir).
    let data = n.root.join("ext-etcd");
    let (cport, pport) = (free_port().unwrap(), free_port().unwrap());
    let mut etcd = PrivateEtcd::start(EtcdConfig::new("ext", data.clone(), cport, pport)).unwrap();
    config(&n, &etcd.endpoint());
    n.spawn_daemon();
    n.ensure_busybox();
    n.ok(&["ve", "create", "eo1", "-t", "busybox", "--start"]);
    assert_eq!(n.sh("eo1", "echo up").trim(), "up");

    // etcd goes away: the VE keeps running and serving; what needs the store says so.
    etcd.stop();
    let e = n.fails(&["ve", "create", "eo2", "-t", "busybox"]);
    assert!(e.contains("control store") || e.contains("etcd"), "{e}");
    let e = n.fails(&["node", "list"]);
    assert!(!e.is_empty(), "node list failed without a reason");
    assert_eq!(n.sh("eo1", "echo still").trim(), "still");
    n.ok(&["ve", "stop", "eo1", "--timeout", "5"]);
    n.ok(&["ve", "start", "eo1"]);
    assert_eq!(n.sh("eo1", "echo again").trim(), "again");
    // Stopped while the store is away: the cluster hears of it when it is back.
    n.ok(&["ve", "stop", "eo1", "--timeout", "5"]);
    assert!(!n.daemon_log().contains("panicked"), "{}", n.daemon_log());

    // etcd is back (same data): the node registers again and publishes what it did.
    let mut etcd = PrivateEtcd::start(EtcdConfig::new("ext", data, cport, pport)).unwrap();
    wait_until("the node is back in the cluster", Duration::from_secs(40), || {
        n.vessel(&["node", "list", "--json"]).status.success()
            && n.json(&["node", "list"])["nodes"][0]["state"] == "ready"
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt.block_on(Store::connect(&[etcd.endpoint()])).unwrap();
    let stored = |part: &str| {
        rt.block_on(store.get::<serde_json::Value>(&keys::ve("eo1", part)))
            .unwrap()
            .unwrap_or_default()
    };
    wait_until("the stop is published", Duration::from_secs(30), || {
        stored("status")["info"]["status"] == "stopped" && stored("spec")["run"] == false
    });
    assert_eq!(n.json(&["ve", "show", "eo1"])["status"], "stopped");
    n.ok(&["ve", "start", "eo1"]);
    assert_eq!(n.sh("eo1", "echo back").trim(), "back");
    n.ok(&["ve", "create", "eo2", "-t", "busybox"]);
    n.ok(&["ve", "destroy", "eo1", "--force"]);
    n.ok(&["ve", "destroy", "eo2"]);
    n.stop_daemon();
    etcd.stop();
}
