//! The control center on one node: VEs live in the cluster's store (spec with a generation,
//! placement by the leader, status from the node), the node's reconcile loop carries out
//! what the store says (as it will for a change made on another node), and a VE that no
//! node can take stays pending with the reason.

mod common;
use common::*;
use std::time::Duration;
use vessel_cluster::keys::{self, Placement, VeEntry, VeObserved};
use vessel_cluster::store::Store;

/// The node's private etcd, as another node of the cluster would use it.
struct Etcd {
    rt: tokio::runtime::Runtime,
    store: Store,
}

impl Etcd {
    fn of(node: &TestNode) -> Etcd {
        let ports: serde_json::Value =
            serde_json::from_slice(&std::fs::read(node.root.join("etcd.ports")).expect("etcd.ports")).unwrap();
        let url = format!("http://127.0.0.1:{}", ports["client"]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(Store::connect(&[url])).expect("connect to the node's etcd");
        Etcd { rt, store }
    }

    fn entry(&self, ve: &str) -> Option<VeEntry> {
        self.rt.block_on(self.store.get(&keys::ve(ve, "spec"))).unwrap()
    }

    fn place(&self, ve: &str) -> Option<Placement> {
        self.rt.block_on(self.store.get(&keys::ve(ve, "place"))).unwrap()
    }

    fn observed(&self, ve: &str) -> Option<VeObserved> {
        self.rt.block_on(self.store.get(&keys::ve(ve, "status"))).unwrap()
    }

    fn put_entry(&self, ve: &str, e: &VeEntry) {
        self.rt.block_on(self.store.put(&keys::ve(ve, "spec"), e)).unwrap()
    }

    fn keys_of(&self, ve: &str) -> usize {
        self.rt
            .block_on(self.store.list_raw(&format!("{}{ve}/", keys::ves())))
            .unwrap()
            .len()
    }
}

fn status(node: &TestNode, ve: &str) -> String {
    node.json(&["ve", "show", ve])["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn ves_live_in_the_cluster_store_and_the_node_reconciles_them() {
    if !need_root("ves_live_in_the_cluster_store_and_the_node_reconciles_them") {
        return;
    }
    let node = start("ctl");
    node.ensure_busybox();
    let me = node.json(&["node", "list"])["this_node"].as_str().unwrap().to_string();
    let etcd = Etcd::of(&node);

    // A create from the CLI: spec (generation 1, with the address the node chose),
    // placement on this node, status from it.
    node.ok(&["ve", "create", "a", "--template", "busybox", "--start"]);
    let v = node.json(&["ve", "show", "a"]);
    assert_eq!(v["node"], me.as_str(), "{v}");
    assert_eq!(v["generation"], 1, "{v}");
    let e = etcd.entry("a").expect("the spec is in the store");
    assert_eq!((e.generation, e.run, e.deleted), (1, true, false));
    assert_eq!(
        e.spec.ip.map(|i| i.to_string()),
        v["spec"]["ip"].as_str().map(String::from),
        "the store has the address the node chose"
    );
    assert_eq!(etcd.place("a").and_then(|p| p.node), Some(me.clone()));
    let o = etcd.observed("a").expect("the node reported it");
    assert_eq!((o.node.as_str(), o.generation), (me.as_str(), 1));
    assert_eq!(o.info.status.as_str(), "running");
    let table = node.ok(&["ve", "list"]);
    assert!(table.lines().next().unwrap().ends_with("NODE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a ") && l.trim_end().ends_with(&me)),
        "{table}"
    );

    // A change here is the next generation.
    node.ok(&["ve", "stop", "a"]);
    let e = etcd.entry("a").unwrap();
    assert_eq!((e.generation, e.run), (2, false));
    wait_until("the stop is reported", Duration::from_secs(10), || {
        etcd.observed("a")
            .is_some_and(|o| o.generation == 2 && o.info.status.as_str() == "stopped")
    });
    // The same name again, anywhere in the cluster, is refused.
    let out = node.fails(&["ve", "create", "a", "--template", "busybox"]);
    assert!(out.contains("already exists"), "{out}");

    // A VE written to the store (as another node's CLI does): the leader places it here
    // and this node's reconcile loop creates and starts it.
    let mut spec = e.spec.clone();
    spec.name = vessel_types::Name::parse("b").unwrap();
    spec.ip = None;
    spec.hostname = None;
    let mut b = VeEntry::new(spec, true);
    etcd.put_entry("b", &b);
    wait_until("b is created and started here", Duration::from_secs(30), || {
        node.vessel(&["ve", "show", "b"]).status.success() && status(&node, "b") == "running"
    });
    assert_eq!(etcd.place("b").and_then(|p| p.node), Some(me.clone()));
    assert_eq!(node.sh("b", "hostname").trim(), "b");
    // Its next generations: stopped, then a new limit applied, then destroyed.
    b = etcd.entry("b").unwrap();
    b.generation += 1;
    b.run = false;
    etcd.put_entry("b", &b);
    wait_until("b is stopped", Duration::from_secs(30), || {
        status(&node, "b") == "stopped"
    });
    b.generation += 1;
    b.spec.limits.pids_max = Some(321);
    etcd.put_entry("b", &b);
    wait_until("b's new limit is applied", Duration::from_secs(30), || {
        node.json(&["ve", "show", "b"])["spec"]["limits"]["pids_max"] == 321
    });
    b.generation += 1;
    b.deleted = true;
    etcd.put_entry("b", &b);
    wait_until("b is destroyed with its keys", Duration::from_secs(30), || {
        !node.vessel(&["ve", "show", "b"]).status.success() && etcd.keys_of("b") == 0
    });
    assert!(!node.root.join("ves/b").exists(), "b's files are gone");

    // A VE that fits no node stays pending with the reason, and can be destroyed.
    let out = node.ok(&["ve", "create", "p", "--template", "busybox", "--node", "elsewhere"]);
    assert!(out.contains("pending"), "{out}");
    let v = node.json(&["ve", "show", "p"]);
    assert_eq!(v["status"], "pending", "{v}");
    assert!(
        v["pending"]
            .as_str()
            .unwrap_or("")
            .contains("node elsewhere is not in the cluster"),
        "{v}"
    );
    let shown = node.ok(&["ve", "show", "p"]);
    assert!(shown.contains("pending:"), "{shown}");
    let out = node.fails(&["ve", "exec", "p", "--", "true"]);
    assert!(out.contains("pending"), "{out}");
    node.ok(&["ve", "destroy", "p"]);
    assert_eq!(etcd.keys_of("p"), 0);

    // Destroying from the CLI removes the VE's keys too.
    node.ok(&["ve", "destroy", "a"]);
    assert_eq!(etcd.keys_of("a"), 0);
    assert!(node.ok(&["ve", "list"]).lines().count() <= 1);
}
