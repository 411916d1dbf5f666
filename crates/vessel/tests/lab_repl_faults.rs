//! The acknowledged-write checker on a 3-node lab under faults. A workload inside a
//! replicated VE (`--replicas 3`, writer node1) writes numbered records, each through a
//! temp file that is renamed into place (every third one truncated to its length from a
//! longer write), a hard link to every fifth, a marker file made and its predecessor
//! removed, then fsyncs and prints `ack N`; the test records N only once that line has
//! come out of `vessel ve exec`. Faults, one phase each while the workload runs: a replica
//! node killed and started again (it catches up from the writer's log and is in sync
//! again), the writer partitioned from one replica and healed, and packet loss plus a
//! slow link on a replica's node (nftables `numgen` drops and a `tbf` qdisc in its
//! namespace: this kernel has no `sch_netem`, so there is no plain delay).
//!
//! After each phase, with every copy back in sync: `vessel ve scrub` finds the copies
//! equal while the VE runs; then the VE stops and every acknowledged record is checked on
//! each copy's own volume (writer and every replica in sync), and the copies are walked
//! in full (names, kinds, sizes, contents, xattrs, link targets) and compared.

mod common;
use common::repl::create_replicated;
use common::*;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vessel_fs::tree::ROOT;
use vessel_fs::tx::{FileKind, Ino};
use vessel_fs::Volume;
use vessel_testkit::lab::TestLab;

const VE: &str = "acks";
const REPLICAS: [&str; 2] = ["node2", "node3"];

fn show(lab: &TestLab) -> serde_json::Value {
    lab.vessel_json("node1", &["ve", "show", VE])
}

fn replica<'a>(v: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    v["replicas"].as_array()?.iter().find(|r| r["node"] == node)
}

/// Wait (bounded) until `ve show` satisfies `pred`.
fn wait_show(lab: &TestLab, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    for _ in 0..360 {
        last = show(lab);
        if pred(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{what}: not within {:?}; last: {last}", t.elapsed());
}

fn all_in_sync(lab: &TestLab, what: &str) -> serde_json::Value {
    wait_show(lab, what, |v| {
        REPLICAS
            .iter()
            .all(|n| replica(v, n).is_some_and(|r| r["in_sync"] == true && r["lag_txs"] == 0))
    })
}

fn node_root(lab: &TestLab, node: &str) -> PathBuf {
    lab.socket(node).parent().expect("a node root").to_path_buf()
}

/// The workload: records `from..=to` (see the module doc); `ack N` after each fsync.
fn script(from: u64, to: u64) -> String {
    format!(
        r#"mkdir -p /data || exit 1
i={from}
while [ $i -le {to} ]; do
  l="record-$i"
  if [ $((i % 3)) -eq 0 ]; then
    printf '%s\nJUNK-JUNK-JUNK-JUNK-JUNK' "$l" > /data/r$i.tmp || exit 1
    truncate -s $((${{#l}} + 1)) /data/r$i.tmp || exit 1
  else
    printf '%s\n' "$l" > /data/r$i.tmp || exit 1
  fi
  mv /data/r$i.tmp /data/r$i || exit 1
  if [ $((i % 5)) -eq 0 ]; then ln /data/r$i /data/h$i || exit 1; fi
  : > /data/del$i || exit 1
  rm -f /data/del$((i - 1)) || exit 1
  sync /data/r$i || exit 1
  echo "ack $i"
  i=$((i + 1))
done
"#
    )
}

/// A workload running in the VE; acknowledged numbers are collected as their lines come.
struct Workload {
    child: std::process::Child,
    acks: Arc<Mutex<Vec<u64>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Workload {
    fn start(lab: &TestLab, from: u64, to: u64) -> Workload {
        let s = script(from, to);
        let mut c = lab.cmd(&["exec", "node1", "--", "vessel", "ve", "exec", VE, "--", "sh", "-c", &s]);
        c.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = c.spawn().expect("start the workload");
        let out = child.stdout.take().expect("stdout");
        let acks = Arc::new(Mutex::new(Vec::new()));
        let a = acks.clone();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ack ").and_then(|n| n.trim().parse().ok()) {
                    a.lock().unwrap().push(n);
                }
            }
        });
        Workload {
            child,
            acks,
            reader: Some(reader),
        }
    }

    /// Wait (bounded) until `n` records are acknowledged, or the workload ended.
    fn wait_acks(&mut self, n: usize) {
        let t = Instant::now();
        while self.acks.lock().unwrap().len() < n {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{n} acks not within {:?}",
                t.elapsed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (bounded) for the end; the acknowledged numbers (in order, no gaps).
    fn finish(mut self) -> (bool, Vec<u64>) {
        let t = Instant::now();
        let ok = loop {
            if let Some(s) = self.child.try_wait().expect("wait for the workload") {
                break s.success();
            }
            if t.elapsed() > Duration::from_secs(180) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the workload did not end within {:?}", t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let acks = self.acks.lock().unwrap().clone();
        for w in acks.windows(2) {
            assert_eq!(w[1], w[0] + 1, "acks in order: {acks:?}");
        }
        (ok, acks)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Open a copy's own volume once the daemon has let go of it (bounded wait).
fn open_copy(lab: &TestLab, node: &str, tid: &str) -> Volume {
    let root = node_root(lab, node);
    let dir = if node == "node1" {
        root.join("ves").join(VE).join("volume")
    } else {
        root.join("replicas").join(VE).join("volume")
    };
    let mut last = String::new();
    for _ in 0..40 {
        let lower = vessel_fs::lower::shared(&root.join("templates").join(tid).join("rootfs"))
            .unwrap_or_else(|e| panic!("{node}'s template: {e}"));
        match Volume::open(&dir, Some(lower)) {
            Ok(v) => return v,
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("the copy on {node} ({}): {last}", dir.display());
}

/// Every acknowledged record `1..=last` is on the copy, whole, with what came with it.
fn check_records(v: &Volume, node: &str, last: u64) {
    let data = v
        .lookup(ROOT, b"data")
        .unwrap_or_else(|e| panic!("{node}: /data: errno {e}"));
    let read = |name: &str| -> Option<(Vec<u8>, u32)> {
        let a = v.lookup(data.ino, name.as_bytes()).ok()?;
        Some((v.read(a.ino, 0, a.size as u32).ok()?, a.nlink))
    };
    let mut bad = Vec::new();
    for i in 1..=last {
        let want = format!("record-{i}\n").into_bytes();
        match read(&format!("r{i}")) {
            Some((got, nlink)) => {
                if got != want {
                    bad.push(format!("r{i} holds {:?}", String::from_utf8_lossy(&got)));
                }
                if i % 5 == 0 {
                    if nlink != 2 {
                        bad.push(format!("r{i} has {nlink} links"));
                    }
                    if read(&format!("h{i}")).map(|r| r.0) != Some(want.clone()) {
                        bad.push(format!("h{i} (hard link) missing or different"));
                    }
                }
            }
            None => bad.push(format!("r{i} missing")),
        }
        if read(&format!("r{i}.tmp")).is_some() {
            bad.push(format!("r{i}.tmp still there after its rename was acknowledged"));
        }
        if i < last && read(&format!("del{i}")).is_some() {
            bad.push(format!("del{i} still there after its removal was acknowledged"));
        }
    }
    assert!(
        bad.is_empty(),
        "{node}: {} of {last} acknowledged records wrong: {bad:?}",
        bad.len()
    );
}

type Walk = BTreeMap<String, (FileKind, u64, u32, u32, Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>)>;

/// Everything a copy shows through its tree: path -> (kind, size, perm, nlink, contents
/// or link target, xattrs).
fn walk(v: &Volume) -> Walk {
    let mut out = Walk::new();
    let mut todo: Vec<(String, Ino)> = vec![(String::new(), ROOT)];
    while let Some((path, ino)) = todo.pop() {
        let (_, entries) = v.readdir(ino).unwrap();
        for (name, child, _) in entries {
            if name == b"." || name == b".." {
                continue;
            }
            let p = format!("{path}/{}", String::from_utf8_lossy(&name));
            let a = v.getattr(child).unwrap();
            let body = match a.kind {
                FileKind::File => v.read(child, 0, a.size as u32).unwrap(),
                FileKind::Symlink => v.readlink(child).unwrap(),
                _ => Vec::new(),
            };
            let xattrs = v
                .listxattr(child)
                .unwrap_or_default()
                .into_iter()
                .map(|n| {
                    let val = v.getxattr(child, &n).unwrap_or_default();
                    (n, val)
                })
                .collect();
            if a.kind == FileKind::Dir {
                todo.push((p.clone(), child));
            }
            out.insert(p, (a.kind, a.size, a.perm, a.nlink, body, xattrs));
        }
    }
    out
}

/// Stop the VE; every acknowledged record on the writer's copy and on every copy in sync
/// at the stop; the copies walked in full and equal; start the VE again.
fn stop_and_check(lab: &TestLab, tid: &str, last: u64, phase: &str) {
    let s = all_in_sync(lab, &format!("{phase}: every copy in sync before the stop"));
    let scrub = lab.vessel_json("node1", &["ve", "scrub", VE]);
    let copies = scrub.as_array().expect("scrub: a list of copies");
    assert_eq!(copies.len(), 3, "{phase}: {scrub}");
    for c in copies {
        assert_eq!(c["root"], copies[0]["root"], "{phase}: {scrub}");
        assert!(
            c.get("differences").is_none() && c.get("error").is_none(),
            "{phase}: {scrub}"
        );
    }
    lab.vessel_ok("node1", &["ve", "stop", VE]);
    let w = open_copy(lab, "node1", tid);
    check_records(&w, "node1", last);
    let ww = walk(&w);
    for n in REPLICAS
        .iter()
        .filter(|n| replica(&s, n).is_some_and(|r| r["in_sync"] == true))
    {
        let r = open_copy(lab, n, tid);
        check_records(&r, n, last);
        assert_eq!(
            r.last_seq(),
            w.last_seq(),
            "{phase}: {n}'s log ends where the writer's does"
        );
        let wr = walk(&r);
        for (p, e) in &ww {
            assert_eq!(wr.get(p), Some(e), "{phase}: {n}: {p}");
        }
        assert_eq!(ww.len(), wr.len(), "{phase}: {n}: the same paths");
    }
    drop(w);
    lab.vessel_ok("node1", &["ve", "start", VE]);
}

/// Run records `from..=to` with `fault` applied once `at` of them are acknowledged and
/// `heal` after the workload ended; returns the last acknowledged number.
fn phase(lab: &TestLab, from: u64, to: u64, at: usize, fault: impl FnOnce(), heal: impl FnOnce()) -> u64 {
    let mut w = Workload::start(lab, from, to);
    w.wait_acks(at);
    let before = w.acks.lock().unwrap().len();
    let running = w.child.try_wait().ok().flatten().is_none();
    fault();
    let (ok, acks) = w.finish();
    heal();
    eprintln!(
        "records {from}..={to}: fault after {before} acks (workload running: {running}), {} acks in all",
        acks.len()
    );
    assert!(ok, "the workload failed after acks {acks:?}");
    assert_eq!(acks.first(), Some(&from), "{acks:?}");
    *acks.last().unwrap()
}

/// A node's network (inside its namespace): `sh -c` of `cmd`.
fn in_node(lab: &TestLab, node: &str, cmd: &str) {
    lab.ok(&["exec", node, "--", "sh", "-c", cmd]);
}

#[test]
fn acknowledged_records_survive_kill_partition_and_lossy_links() {
    if !need_root("acknowledged_records_survive_kill_partition_and_lossy_links") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3"]);
    let tid = create_replicated(&lab, VE, 3, &[]);
    all_in_sync(&lab, "both copies in sync at the start");

    // 1. A replica node dies mid-workload and comes back: syncs go on without it (2 of
    // 3), it catches up from the writer's log and is in sync again.
    let last = phase(
        &lab,
        1,
        60,
        15,
        || {
            lab.ok(&["kill", "node3"]);
        },
        || {
            // Syncs went on without node3 only once the writer had it out of the set.
            wait_show(&lab, "node3 out of the in-sync set", |v| {
                replica(v, "node3").is_some_and(|r| r["in_sync"] == false)
            });
            lab.ok(&["start", "node3"]);
        },
    );
    assert_eq!(last, 60);
    stop_and_check(&lab, &tid, last, "node3 killed and started again");

    // 2. The writer cut off from node2 mid-workload, then healed.
    let last = phase(
        &lab,
        last + 1,
        last + 60,
        15,
        || {
            lab.ok(&["partition", "node2", "--from", "node1"]);
        },
        || {
            wait_show(&lab, "node2 out of the in-sync set", |v| {
                replica(v, "node2").is_some_and(|r| r["in_sync"] == false)
            });
            lab.ok(&["heal"]);
        },
    );
    stop_and_check(&lab, &tid, last, "node1 partitioned from node2 and healed");

    // 3. node3's link loses a fifth of its packets both ways and is slow (a token bucket
    // in its namespace). Rules in a table of this test's own, removed after.
    let table = format!("vtf{}", std::process::id());
    let last = phase(
        &lab,
        last + 1,
        last + 60,
        10,
        || {
            in_node(
                &lab,
                "node3",
                &format!(
                    "nft add table inet {table} && \
                     nft add chain inet {table} i '{{ type filter hook input priority 0; }}' && \
                     nft add chain inet {table} o '{{ type filter hook output priority 0; }}' && \
                     nft add rule inet {table} i numgen random mod 100 '<' 20 drop && \
                     nft add rule inet {table} o numgen random mod 100 '<' 20 drop && \
                     for d in $(ip -o link show | cut -d: -f2 | cut -d@ -f1); do \
                       [ $d = lo ] || tc qdisc add dev $d root tbf rate 4mbit burst 16kbit latency 200ms || exit 1; \
                     done"
                ),
            );
        },
        || {
            in_node(
                &lab,
                "node3",
                &format!(
                    "nft delete table inet {table}; \
                     for d in $(ip -o link show | cut -d: -f2 | cut -d@ -f1); do \
                       [ $d = lo ] || tc qdisc del dev $d root 2>/dev/null; \
                     done; true"
                ),
            );
        },
    );
    stop_and_check(&lab, &tid, last, "lossy and slow link to node3");
    lab.vessel_ok("node1", &["ve", "destroy", "--force", VE]);
}
