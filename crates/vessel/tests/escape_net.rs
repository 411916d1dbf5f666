//! A VE root (CAP_NET_ADMIN in its own network namespace) must not take another VE's IP
//! or MAC on the node bridge: its port admits only its own MAC and address, ARP included
//! (`vessel_ve::netfilter`). Three busybox VEs: A the victim, B the attacker, C the
//! witness. All traffic is sent from inside the VEs.

mod common;
use common::*;

/// The three VEs and what the node says about them.
struct Trio {
    a_ip: String,
    a_mac: String,
    b_ip: String,
    b_mac: String,
    c_ip: String,
    /// Prefix length of the node subnet.
    prefix: String,
}

fn ve_ip(node: &TestNode, ve: &str) -> (String, String) {
    let cidr = node.json(&["ve", "show", ve])["spec"]["ip"]
        .as_str()
        .expect("VE has an address")
        .to_string();
    let (ip, prefix) = cidr.split_once('/').unwrap();
    (ip.to_string(), prefix.to_string())
}

fn ve_mac(node: &TestNode, ve: &str) -> String {
    node.json(&["ve", "show", ve])["mac"]
        .as_str()
        .expect("ve show names the VE's MAC")
        .to_string()
}

/// The MAC the VE's `eth0` really has.
fn eth0_mac(node: &TestNode, ve: &str) -> String {
    node.sh(ve, "cat /sys/class/net/eth0/address").trim().to_string()
}

fn setup(node: &TestNode) -> Trio {
    node.ensure_busybox();
    for ve in ["a", "b", "c"] {
        node.ok(&["ve", "create", ve, "-t", "busybox", "--start"]);
    }
    let (a_ip, prefix) = ve_ip(node, "a");
    let t = Trio {
        a_mac: ve_mac(node, "a"),
        b_ip: ve_ip(node, "b").0,
        b_mac: ve_mac(node, "b"),
        c_ip: ve_ip(node, "c").0,
        a_ip,
        prefix,
    };
    // Fixed, host-known MACs, derived from the address: 02:56 + the address's 4 bytes.
    let octets: Vec<u8> = t.a_ip.split('.').map(|o| o.parse().unwrap()).collect();
    assert_eq!(
        t.a_mac,
        format!(
            "02:56:{:02x}:{:02x}:{:02x}:{:02x}",
            octets[0], octets[1], octets[2], octets[3]
        )
    );
    assert_eq!(eth0_mac(node, "a"), t.a_mac);
    assert_eq!(eth0_mac(node, "b"), t.b_mac);
    assert!(node
        .ok(&["ve", "show", "b"])
        .contains(&format!("mac:         {}", t.b_mac)));
    t
}

/// ICMP echo requests the VE's IP stack has received so far.
fn in_echos(node: &TestNode, ve: &str) -> u64 {
    let snmp = node.sh(ve, "grep '^Icmp:' /proc/net/snmp");
    let mut lines = snmp.lines();
    let (head, vals) = (lines.next().unwrap(), lines.next().unwrap());
    let i = head
        .split_whitespace()
        .position(|f| f == "InEchos")
        .expect("InEchos counter");
    vals.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// The hardware address in `ve`'s neighbour table for `ip`, if it has a complete entry.
fn arp_entry(node: &TestNode, ve: &str, ip: &str) -> Option<String> {
    node.sh(ve, "cat /proc/net/arp").lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&ip) && f.get(2) != Some(&"0x0")).then(|| f[3].to_string())
    })
}

/// One ping from `from` to `to` (optionally from source address `src`) got its answer.
fn ping(node: &TestNode, from: &str, to: &str, src: Option<&str>) -> bool {
    let src = src.map(|s| format!("-I {s} ")).unwrap_or_default();
    node.exec(from, &format!("ping -c 1 -W 2 {src}{to}")).status.success()
}

/// Traffic that must work: a few tries, for neighbour entries that are being re-learnt.
fn works(node: &TestNode, from: &str, to: &str) -> bool {
    (0..5).any(|_| ping(node, from, to, None))
}

/// `from` pings `to_ip` and the VE `to` itself is the one that answers (not an impostor).
fn answered_by(node: &TestNode, from: &str, to: &str, to_ip: &str) -> bool {
    let before = in_echos(node, to);
    ping(node, from, to_ip, None) && in_echos(node, to) > before
}

/// MACs the node bridge has learnt on the VE's port (read on the host; no traffic).
fn learnt_on_port(node: &TestNode, ve: &str) -> String {
    let port = node.json(&["ve", "show", ve])["host_interface"]
        .as_str()
        .unwrap()
        .to_string();
    let o = std::process::Command::new("bridge")
        .args(["fdb", "show", "br", &node.bridge, "brport", &port])
        .output()
        .expect("run bridge fdb");
    assert!(o.status.success(), "bridge fdb: {}", err(&o));
    out(&o)
}

/// B pings C from source address `src` (not B's own): the echo requests must not reach C.
fn spoofed_pings_do_not_reach_c(node: &TestNode, t: &Trio, src: &str) {
    let before = in_echos(node, "c");
    // The replies would go to the real owner: only C's counter tells whether they arrived.
    node.exec("b", &format!("ping -c 3 -W 1 -I {src} {}", t.c_ip));
    assert_eq!(
        in_echos(node, "c"),
        before,
        "B's pings from {src} reached C: the bridge let a spoofed source address through"
    );
}

/// Positive control for the counter above: B's pings from its own address do reach C.
fn own_pings_reach_c(node: &TestNode, t: &Trio) {
    let before = in_echos(node, "c");
    assert!(works(node, "b", &t.c_ip), "B cannot ping C from its own address");
    assert!(in_echos(node, "c") > before, "C's echo counter did not count B's ping");
}

/// B claims A's address: adds it, announces it with gratuitous ARP, pings C from it.
/// C must keep A's MAC for A's address and A must keep answering C.
fn b_steals_a_ip(node: &TestNode, t: &Trio) {
    assert!(works(node, "c", &t.a_ip), "C cannot ping A");
    assert_eq!(arp_entry(node, "c", &t.a_ip).as_deref(), Some(t.a_mac.as_str()));
    node.sh("b", &format!("ip addr add {}/{} dev eth0", t.a_ip, t.prefix));
    // Gratuitous ARP (unsolicited and as answers) for A's address; exit codes do not matter.
    node.exec(
        "b",
        &format!(
            "arping -U -c 2 -I eth0 -s {0} {0}; arping -A -c 2 -I eth0 -s {0} {0}",
            t.a_ip
        ),
    );
    // An ARP request from A's address for C (C would learn B's MAC for A's address).
    node.exec("b", &format!("arping -c 2 -w 2 -I eth0 -s {} {}", t.a_ip, t.c_ip));
    spoofed_pings_do_not_reach_c(node, t, &t.a_ip);
    assert_eq!(
        arp_entry(node, "c", &t.a_ip).as_deref(),
        Some(t.a_mac.as_str()),
        "C's neighbour entry for A's address no longer has A's MAC"
    );
    assert!(answered_by(node, "c", "a", &t.a_ip), "A no longer answers C");
    node.sh("b", &format!("ip addr del {}/{} dev eth0", t.a_ip, t.prefix));
}

#[test]
fn a_ve_cannot_take_another_ves_ip_or_mac() {
    if !need_root("a_ve_cannot_take_another_ves_ip_or_mac") {
        return;
    }
    let node = start("spoof");
    let t = setup(&node);
    own_pings_reach_c(&node, &t);

    // 1. B takes A's address.
    b_steals_a_ip(&node, &t);

    // 2. B uses an address nobody has.
    let net: Vec<&str> = t.c_ip.rsplitn(2, '.').collect();
    let unassigned = format!("{}.250", net[1]);
    assert!(![&t.a_ip, &t.b_ip, &t.c_ip].contains(&&unassigned));
    node.sh("b", &format!("ip addr add {unassigned}/{} dev eth0", t.prefix));
    let o = node.exec("b", &format!("arping -c 2 -w 2 -I eth0 -s {unassigned} {}", t.c_ip));
    assert!(!o.status.success(), "C answered B's ARP from an unassigned address");
    spoofed_pings_do_not_reach_c(&node, &t, &unassigned);
    assert_eq!(arp_entry(&node, "c", &unassigned), None);
    node.sh("b", &format!("ip addr del {unassigned}/{} dev eth0", t.prefix));

    // 3. B takes A's MAC: B's traffic is dropped, and the bridge does not learn A's MAC on
    //    B's port (C's frames for A still reach A).
    let gw = node.sh("b", "ip route show default");
    assert!(gw.contains("via"), "{gw}");
    node.sh("b", &format!("ip link set dev eth0 address {}", t.a_mac));
    assert_eq!(eth0_mac(&node, "b"), t.a_mac);
    let before = in_echos(&node, "c");
    assert!(!ping(&node, "b", &t.c_ip, None), "B reached C with A's MAC");
    node.exec("b", &format!("arping -U -c 2 -I eth0 -s {0} {0}", t.b_ip));
    assert_eq!(in_echos(&node, "c"), before, "B's pings with A's MAC reached C");
    let fdb = learnt_on_port(&node, "b");
    assert!(
        !fdb.contains(&t.a_mac),
        "the bridge learnt A's MAC on B's port (A's traffic would go to B):\n{fdb}"
    );
    assert!(answered_by(&node, "c", "a", &t.a_ip), "C's frames for A went elsewhere");
    assert!(answered_by(&node, "a", "c", &t.c_ip), "A cannot reach C");
    assert_eq!(arp_entry(&node, "c", &t.a_ip).as_deref(), Some(t.a_mac.as_str()));

    // 4. B back to its own MAC and address only: it works again.
    node.sh("b", &format!("ip link set dev eth0 address {}", t.b_mac));
    assert!(node.sh("b", "ip route show default").contains("via"));
    own_pings_reach_c(&node, &t);
    assert!(
        works(&node, "c", &t.b_ip),
        "C cannot reach B after B went back to its own MAC"
    );
    assert_eq!(arp_entry(&node, "c", &t.b_ip).as_deref(), Some(t.b_mac.as_str()));

    // Other ethertypes: IPv6 does not pass either (VEs have no IPv6 address; link-local
    // would otherwise work between VEs).
    let c_ll = node.sh("c", "ip -6 -o addr show dev eth0 scope link");
    let addr = c_ll
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("C has no IPv6 link-local address: {c_ll}"));
    let o = node.exec("b", &format!("ping -c 2 -W 1 {addr}%eth0"));
    assert!(!o.status.success(), "IPv6 between VEs passed the bridge: {}", out(&o));
}

#[test]
fn bridge_filter_survives_restarts_and_goes_with_the_daemon() {
    if !need_root("bridge_filter_survives_restarts_and_goes_with_the_daemon") {
        return;
    }
    let mut node = start("spoofl");
    let t = setup(&node);
    let table = node.filter_table();
    let listing = || {
        let o = std::process::Command::new("nft")
            .args(["list", "table", "bridge", &table])
            .output()
            .expect("run nft");
        o.status.success().then(|| out(&o))
    };
    let rules = listing().expect("the daemon wrote the bridge's filter table");
    let b_if = node.json(&["ve", "show", "b"])["host_interface"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(rules.contains(&b_if) && rules.contains(&t.b_mac), "{rules}");

    // `ve set` cannot change a VE's address today (the filter would have to follow it).
    let e = node.fails(&["ve", "set", "b", "--ip", &format!("{}/{}", t.a_ip, t.prefix)]);
    assert!(
        e.contains("--ip"),
        "`ve set --ip` exists now: make Node::set re-sync the bridge filter and test it here: {e}"
    );

    // A restarted VE gets the same MAC and the same rules.
    node.ok(&["ve", "restart", "b"]);
    assert_eq!(eth0_mac(&node, "b"), t.b_mac);
    own_pings_reach_c(&node, &t);
    b_steals_a_ip(&node, &t);

    // A crashed daemon leaves the table: VEs it could not stop stay filtered. The next
    // daemon restarts them and writes the table again.
    node.kill_daemon();
    assert!(listing().is_some(), "the table went with a crashed daemon");
    node.spawn_daemon();
    wait_until(
        "the new daemon to restart the VEs",
        std::time::Duration::from_secs(60),
        || {
            ["a", "b", "c"]
                .iter()
                .all(|v| node.json(&["ve", "show", v])["status"] == "running")
        },
    );
    own_pings_reach_c(&node, &t);
    b_steals_a_ip(&node, &t);

    // Destroyed VEs lose their rules; the table goes with the daemon.
    for ve in ["a", "b", "c"] {
        node.ok(&["ve", "destroy", "--force", ve]);
    }
    let rules = listing().expect("the table stays while the daemon runs");
    assert!(!rules.contains(&t.b_mac) && !rules.contains(&b_if), "{rules}");
    node.stop_daemon();
    assert_eq!(listing(), None, "the daemon left its table behind");
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    assert!(!out(&tables).contains(&table), "{}", out(&tables));
}
