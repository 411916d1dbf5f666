//! The cluster's VE network on a 3-node lab: addresses and uid ranges come from etcd and
//! are unique across nodes (also when two nodes create at once), VEs on different nodes
//! reach each other over the VXLAN overlay both ways, each VE's gateway is its own node's
//! bridge (ARP for the gateway does not cross the overlay), a VE cannot reach a VE on
//! another node from an address that is not its own, and a destroyed VE's address is free
//! again. All VE traffic is sent from inside the VEs (`ve exec` run inside a lab node).

mod common;
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;
use vessel_testkit::lab::TestLab;

fn show(lab: &TestLab, node: &str, ve: &str) -> serde_json::Value {
    lab.vessel_json(node, &["ve", "show", ve])
}

fn ip_of(v: &serde_json::Value) -> String {
    let cidr = v["spec"]["ip"].as_str().expect("VE has an address");
    cidr.split_once('/').unwrap().0.to_string()
}

/// `sh -c script` in VE `ve`, run from lab node `node`.
fn exec(lab: &TestLab, node: &str, ve: &str, script: &str) -> std::process::Output {
    lab.vessel(node, &["ve", "exec", ve, "--", "sh", "-c", script])
}

fn ping(lab: &TestLab, node: &str, ve: &str, to: &str) -> bool {
    exec(lab, node, ve, &format!("ping -c 1 -W 2 {to}")).status.success()
}

/// The overlay's entries come from the store's watch: a few tries (bounded), not a timing.
fn reaches(lab: &TestLab, node: &str, ve: &str, to: &str) -> bool {
    (0..10).any(|i| {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        ping(lab, node, ve, to)
    })
}

/// ICMP echo requests VE `ve`'s IP stack has received so far.
fn in_echos(lab: &TestLab, node: &str, ve: &str) -> u64 {
    let o = exec(lab, node, ve, "grep '^Icmp:' /proc/net/snmp");
    assert!(o.status.success(), "{}", err(&o));
    let snmp = out(&o);
    let mut lines = snmp.lines();
    let (head, vals) = (lines.next().unwrap(), lines.next().unwrap());
    let i = head.split_whitespace().position(|f| f == "InEchos").unwrap();
    vals.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// The MAC VE `ve` has in its neighbour table for `ip`.
fn arp_entry(lab: &TestLab, node: &str, ve: &str, ip: &str) -> Option<String> {
    let o = exec(lab, node, ve, "cat /proc/net/arp");
    out(&o).lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&ip) && f.get(2) != Some(&"0x0")).then(|| f[3].to_string())
    })
}

/// The MAC of link `dev` inside lab node `node`.
fn link_mac(lab: &TestLab, node: &str, dev: &str) -> String {
    let t = lab.ok(&["exec", node, "--", "ip", "-j", "link", "show", dev]);
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

#[test]
fn ves_on_different_nodes_share_one_network() {
    if !need_root("ves_on_different_nodes_share_one_network") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3", "--etcd-members", "3"]);
    for n in ["node1", "node2", "node3"] {
        lab.vessel_ok(n, &["template", "build", "busybox"]);
    }

    // Two nodes create at once, each for itself: no address or uid range twice.
    let mut workers = Vec::new();
    for (node, tag) in [("node1", "p"), ("node2", "q")] {
        let lab_name = lab.name.clone();
        workers.push(std::thread::spawn(move || {
            let mut created = Vec::new();
            for i in 0..4 {
                let ve = format!("{tag}{i}");
                let o = std::process::Command::new(vessel_bin())
                    .args(["lab", "--name", &lab_name, "exec", node, "--", "vessel", "ve", "create"])
                    .args([&ve, "--template", "busybox", "--node", node])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap();
                assert!(o.status.success(), "create {ve} on {node}: {}", err(&o));
                created.push(ve);
            }
            created
        }));
    }
    let made: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let list = lab.vessel_json("node3", &["ve", "list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 8, "{list:?}");
    let ips: BTreeSet<String> = made.iter().map(|ve| ip_of(&show(&lab, "node3", ve))).collect();
    assert_eq!(ips.len(), 8, "addresses given out twice: {ips:?}");
    let mut bases = BTreeSet::new();
    for ve in &made {
        let node = if ve.starts_with('p') { "node1" } else { "node2" };
        let v = show(&lab, node, ve);
        assert_eq!(v["node"], node, "{v}");
        bases.insert(v["uid_base"].as_u64().expect("uid_base"));
    }
    assert_eq!(bases.len(), 8, "uid ranges given out twice: {bases:?}");

    // A destroyed VE's address is free again: the next VE (lowest free) gets it.
    let freed = ip_of(&show(&lab, "node1", "p1"));
    lab.vessel_ok("node3", &["ve", "destroy", "p1"]);
    let n = lab.vessel_json(
        "node3",
        &["ve", "create", "n", "--template", "busybox", "--node", "node3"],
    );
    assert_eq!(ip_of(&n), freed, "{n}");
    for ve in made.iter().filter(|v| *v != "p1").chain([&"n".to_string()]) {
        lab.vessel_ok("node1", &["ve", "destroy", ve]);
    }

    // a on node1, b on node2, c on node3: ping across the overlay both ways.
    for (ve, node) in [("a", "node1"), ("b", "node2"), ("c", "node3")] {
        let v = lab.vessel_json(
            "node1",
            &["ve", "create", ve, "--template", "busybox", "--start", "--node", node],
        );
        assert_eq!(
            (v["node"].as_str(), v["status"].as_str()),
            (Some(node), Some("running")),
            "{v}"
        );
    }
    let (a_ip, b_ip, c_ip) = (
        ip_of(&show(&lab, "node1", "a")),
        ip_of(&show(&lab, "node2", "b")),
        ip_of(&show(&lab, "node3", "c")),
    );
    assert!(reaches(&lab, "node1", "a", &b_ip), "a (node1) cannot ping b (node2)");
    assert!(reaches(&lab, "node2", "b", &a_ip), "b (node2) cannot ping a (node1)");
    let before = in_echos(&lab, "node3", "c");
    assert!(reaches(&lab, "node1", "a", &c_ip), "a (node1) cannot ping c (node3)");
    assert!(
        in_echos(&lab, "node3", "c") > before,
        "c's echo counter did not count a's ping"
    );

    // Each VE's gateway is its own node's bridge: the same address on every node, with
    // ARP for it kept off the overlay.
    let prefix = lab.prefix();
    let gw = {
        let r = out(&exec(&lab, "node1", "a", "ip route show default"));
        r.split_whitespace()
            .nth(2)
            .expect("default route via the gateway")
            .to_string()
    };
    for (ve, node, i) in [("a", "node1", 1), ("b", "node2", 2)] {
        let bridge_mac = link_mac(&lab, node, &format!("{prefix}v{i}"));
        assert!(ping(&lab, node, ve, &gw), "{ve} cannot ping its gateway {gw}");
        assert_eq!(
            arp_entry(&lab, node, ve, &gw),
            Some(bridge_mac.clone()),
            "{ve}'s gateway is not its own node's bridge"
        );
        // Every answer to an ARP request for the gateway comes from this node's bridge
        // (without the overlay port's rules the other nodes' bridges answer too).
        let o = exec(&lab, node, ve, &format!("arping -c 2 -w 3 -I eth0 {gw}"));
        let replies: Vec<String> = out(&o)
            .lines()
            .filter(|l| l.contains("reply from"))
            .filter_map(|l| Some(l.split_once('[')?.1.split_once(']')?.0.to_lowercase()))
            .collect();
        assert!(!replies.is_empty(), "{ve}: no ARP answer from the gateway: {}", out(&o));
        assert!(
            replies.iter().all(|m| *m == bridge_mac),
            "{ve}: the gateway was answered by another node's bridge too: {replies:?} (own: {bridge_mac})"
        );
    }

    // a takes b's address (on another node) and pings c from it: the echo requests must
    // not arrive (a's node drops them at a's port before the overlay).
    let plen = show(&lab, "node1", "a")["spec"]["ip"]
        .as_str()
        .unwrap()
        .split_once('/')
        .unwrap()
        .1
        .to_string();
    let o = exec(&lab, "node1", "a", &format!("ip addr add {b_ip}/{plen} dev eth0"));
    assert!(o.status.success(), "{}", err(&o));
    let before = in_echos(&lab, "node3", "c");
    exec(&lab, "node1", "a", &format!("ping -c 3 -W 1 -I {b_ip} {c_ip}"));
    assert_eq!(
        in_echos(&lab, "node3", "c"),
        before,
        "a's pings from b's address reached c across the overlay"
    );
    // And b still answers c.
    assert!(reaches(&lab, "node3", "c", &b_ip), "b no longer answers c");
    exec(&lab, "node1", "a", &format!("ip addr del {b_ip}/{plen} dev eth0"));
}
