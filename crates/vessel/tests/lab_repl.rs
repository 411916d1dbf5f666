//! A replicated VE on a 3-node lab: `--replicas 3` puts copies of its volume on the two
//! other nodes (which fetch the template from the writer's node); every record the VE
//! wrote and synced is on each copy that was in sync (read back from the copies
//! themselves after the VE stopped); a killed replica node leaves the in-sync set, syncs in
//! the VE go on with the copies left (2 of 3 needed), and `ve show` says so. The writer
//! scrubs on its schedule (`[replication] scrub_interval`) and `ve show` keeps the outcome.

mod common;
use common::repl::*;
use common::*;
use std::time::{Duration, Instant};
use vessel_fs::tree::ROOT;
use vessel_fs::Volume;
use vessel_testkit::lab::TestLab;

#[test]
fn synced_records_are_on_every_in_sync_copy_and_a_lost_copy_leaves_the_set() {
    if !need_root("synced_records_are_on_every_in_sync_copy_and_a_lost_copy_leaves_the_set") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    // node1, the writer, scrubs its replicated VEs every 2 s (a week by default): its
    // daemon restarted on the changed node.toml.
    let toml = node_root(&lab, "node1").join("node.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str("\n[replication]\nscrub_interval = \"2s\"\n");
    lab.ok(&["kill", "node1"]);
    std::fs::write(&toml, text).unwrap();
    lab.ok(&["start", "node1"]);
    let tid = create_replicated(&lab, "web", 3, &[]);
    // Numbered records, each synced (fsync through the file) before the next: an
    // acknowledged record is one whose command returned.
    let write = |from: usize, to: usize| {
        lab.vessel_ok(
            "node1",
            &[
                "ve",
                "exec",
                "web",
                "--",
                "sh",
                "-c",
                &format!(
                    "mkdir -p /data && for i in $(seq {from} {to}); do echo record-$i > /data/r$i.tmp && \
                     dd if=/data/r$i.tmp of=/data/r$i conv=fsync 2>/dev/null && rm /data/r$i.tmp; done"
                ),
            ],
        );
    };
    write(1, 40);
    let s = wait_show(&lab, "node1", "web", "both copies in sync", |v| {
        ["node2", "node3"]
            .iter()
            .all(|n| replica(v, n).is_some_and(|r| r["in_sync"] == true && r["lag_txs"] == 0))
    });
    let last = s["fs"]["last_seq"].as_u64().unwrap();
    for n in ["node2", "node3"] {
        assert!(replica(&s, n).unwrap()["durable_seq"].as_u64().unwrap() >= last, "{s}");
    }
    let table = lab.vessel_ok("node1", &["ve", "show", "web"]);
    assert!(
        table.contains("replicas:") && table.contains("node2") && table.contains("in-sync"),
        "{table}"
    );
    // The copies' hash trees are the writer's (asked from another node: carried to node1).
    let scrub = lab.vessel_json("node2", &["ve", "scrub", "web"]);
    let copies = scrub.as_array().unwrap();
    assert_eq!(copies.len(), 3, "{scrub}");
    for c in copies {
        assert_eq!(c["root"], copies[0]["root"], "{scrub}");
        assert!(c.get("differences").is_none() && c.get("error").is_none(), "{scrub}");
    }
    // The writer's schedule compares the copies too, and `ve show` keeps the outcome.
    let s = wait_show(&lab, "node1", "web", "a scheduled scrub", |v| {
        v["last_scrub"]["scheduled"] == true
    });
    let copies = s["last_scrub"]["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 3, "{s}");
    for c in copies {
        assert!(c.get("differences").is_none() && c.get("error").is_none(), "{s}");
    }
    let table = lab.vessel_ok("node1", &["ve", "show", "web"]);
    assert!(
        table.contains("last scrub:") && table.contains("(scheduled): all 3 copies the same"),
        "{table}"
    );

    // node3 dies: the next syncs go on with node1 and node2 (2 of 3 needed), once node3
    // is out of the in-sync set.
    lab.ok(&["kill", "node3"]);
    write(41, 60);
    let s = wait_show(&lab, "node1", "web", "node3 out of the set", |v| {
        replica(v, "node3").is_some_and(|r| r["in_sync"] == false)
    });
    assert_eq!(replica(&s, "node2").unwrap()["in_sync"], true, "{s}");

    // Asking for 3 copies in sync while only 2 are (a live `ve set`): syncs wait, then fail
    // with EIO instead of returning with too few copies, and `ve show` says why.
    lab.vessel_ok("node1", &["ve", "set", "web", "--min-replicas", "3"]);
    let table = lab.vessel_ok("node1", &["ve", "show", "web"]);
    assert!(
        table.contains("WAITING: 2 of the 3 copies a sync needs are in sync"),
        "{table}"
    );
    // The writer applies the new count at its watcher's next look (every second).
    let t = Instant::now();
    let blocked = (0..100).take_while(|_| t.elapsed() < Duration::from_secs(60)).any(|_| {
        let o = lab.vessel(
            "node1",
            &[
                "ve",
                "exec",
                "web",
                "--",
                "sh",
                "-c",
                "echo x > /data/blocked && dd if=/data/blocked of=/data/blocked2 conv=fsync",
            ],
        );
        !o.status.success()
    });
    assert!(blocked, "a sync with 2 of 3 required copies in sync returned");
    lab.vessel_ok("node1", &["ve", "set", "web", "--min-replicas", "2"]);
    let table = lab.vessel_ok("node1", &["ve", "show", "web"]);
    assert!(!table.contains("WAITING"), "{table}");

    // Stopped, the VE's copies are closed: every acknowledged record is on node1 and
    // node2 (in sync throughout), and records 1-40 on node3 (in sync until it died).
    lab.vessel_ok("node1", &["ve", "stop", "web"]);
    let want = |n: usize| -> Vec<Option<String>> { (1..=n).map(|i| Some(format!("record-{i}\n"))).collect() };
    assert_eq!(
        closed_records(&lab, "node1", "web", &tid, 60),
        want(60),
        "the writer's own copy"
    );
    assert_eq!(
        closed_records(&lab, "node2", "web", &tid, 60),
        want(60),
        "node2 (in sync throughout)"
    );
    assert_eq!(
        closed_records(&lab, "node3", "web", &tid, 40),
        want(40),
        "node3 (in sync until it died)"
    );

    // A byte flipped in node2's copy of record 5 (under vessel-fs, as a bad disk would):
    // the scrub names the file and fails.
    let root = node_root(&lab, "node2");
    let file = {
        let lower = vessel_fs::lower::shared(&root.join("templates").join(&tid).join("rootfs")).unwrap();
        let v = Volume::open(&root.join("replicas/web/volume"), Some(lower)).unwrap();
        let d = v.lookup(ROOT, b"data").unwrap();
        let a = v.lookup(d.ino, b"r5").unwrap();
        root.join("replicas/web/volume/data")
            .join(vessel_fs::volume::data_name(a.ino))
    };
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&file, &bytes).unwrap();
    let o = lab.vessel("node1", &["ve", "scrub", "web"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let errs = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("/data/r5") && out.contains("content differs"), "{out}");
    assert!(errs.contains("node2") && errs.contains("--repair"), "{errs}");

    // `--repair` drops node2's copy; node2 removes it, and (node3 back, the VE running
    // again) a new copy is made on node2 from the writer's: every record, scrub equal.
    let o = lab.vessel("node1", &["ve", "scrub", "web", "--repair"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("dropped the copies on node2"));
    let copy = node_root(&lab, "node2").join("replicas").join("web");
    let t = Instant::now();
    while copy.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "{} still there", copy.display());
        std::thread::sleep(Duration::from_millis(250));
    }
    lab.ok(&["start", "node3"]);
    lab.vessel_ok("node1", &["ve", "start", "web"]);
    wait_show(&lab, "node1", "web", "node2 (a new copy) and node3 in sync", |v| {
        ["node2", "node3"]
            .iter()
            .all(|n| replica(v, n).is_some_and(|r| r["in_sync"] == true && r["lag_txs"] == 0))
    });
    let scrub = lab.vessel_json("node1", &["ve", "scrub", "web"]);
    let copies = scrub.as_array().unwrap();
    assert_eq!(copies.len(), 3, "{scrub}");
    for c in copies {
        assert_eq!(c["root"], copies[0]["root"], "{scrub}");
    }
    lab.vessel_ok("node1", &["ve", "stop", "web"]);
    assert_eq!(
        closed_records(&lab, "node2", "web", &tid, 60),
        want(60),
        "node2's new copy"
    );

    // Destroyed, the VE's copies go from the nodes that kept them (node2 is alive).
    lab.vessel_ok("node1", &["ve", "destroy", "--force", "web"]);
    let copy = node_root(&lab, "node2").join("replicas").join("web");
    let t = Instant::now();
    while copy.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "{} still there", copy.display());
        std::thread::sleep(Duration::from_millis(250));
    }
}
