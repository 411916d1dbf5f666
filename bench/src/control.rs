//! `vessel-bench control [--nodes 1000] [--ves 10000] [--writers 8] [--lab 0|1] [--runs 5]`:
//! the control center at scale (issue 9's benchmark).
//!
//! 1. A private etcd (tempdir, free ports) and N simulated nodes in this process: each has
//!    its member record, its templates (`busybox`) and its node record under its own lease
//!    (TTL 2 s, kept alive by [`Store::register`]), and its own watch on its
//!    `assigned/<node>/` prefix ([`Store::watch_prefix`]: one watch stream per node, as a real
//!    node has). One more lease campaigns and runs the real scheduler loop
//!    ([`vessel_agent::control::lead`]) woken by a watch on the whole key space, as the
//!    daemon wires it. A client writes the VE specs (`--writers` concurrent writers, each
//!    spec created only if absent as the CLI does); a node whose watch fires reads its
//!    assigned prefix and acknowledges each new VE with a `VeObserved` status (generation 1).
//!    Measured: first spec write to the last status -> creates/s; etcd CPU time and RSS.
//! 2. Lost node: one node's keep-alive stops (its registration dropped) at t0; the time until
//!    its node record is gone from the store (what the scheduler's read of `nodes/` sees),
//!    polled every 10 ms. Repeated `--runs` times on different nodes, median.
//! 3. `--lab 1`: a 3-node `vessel lab` against a one-node `TestNode`, alternating: `vessel ve
//!    create NAME --template busybox --start` + `vessel ve exec NAME -- /bin/true` from node1.
//!
//! Last line: `control: {n} creates/s, lost-node detection {ms} ms at {nodes} nodes`.

use crate::{arg, median, rss_kib, vessel_bin};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use vessel_cluster::etcd::{free_port, EtcdConfig, PrivateEtcd};
use vessel_cluster::keys::{self, NodeRecord, VeEntry, VeObserved};
use vessel_cluster::store::{Registration, Store};
use vessel_testkit::lab::TestLab;
use vessel_testkit::TestNode;

/// The lease TTL of every simulated node (the product's default).
const TTL: Duration = Duration::from_secs(2);
/// Connections the simulated nodes share (each a `Store`: one gRPC channel).
const CONNECTIONS: usize = 8;

fn record(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        address: "127.0.0.1:7000".into(),
        cpus: 4,
        memory: 16 << 30,
        disk: 200 << 30,
        labels: Default::default(),
        version: "bench".into(),
        draining: false,
        since_ns: 0,
    }
}

/// A busybox VE's desired state as the CLI writes it at create.
fn entry(name: &str) -> VeEntry {
    let spec =
        serde_json::from_value(serde_json::json!({"name": name, "template": "busybox"})).expect("a busybox spec");
    VeEntry::new(spec, true)
}

/// What a node reports once it has created and started the VE.
fn observed(node: &str, ve: &str) -> VeObserved {
    let info = serde_json::from_value(serde_json::json!({
        "spec": {"name": ve, "template": "busybox"},
        "status": "running",
        "pid": 4242,
        "uid_base": 200_000,
        "uid_count": 65536,
        "template_id": "0123456789abcdef",
        "created_unix": 1_700_000_000u64,
        "host_interface": "vb-0123456789",
        "node": node,
    }))
    .expect("a VE info");
    VeObserved {
        node: node.to_string(),
        generation: 1,
        info,
        error: None,
    }
}

/// etcd's CPU time (user + system) in seconds and its RSS in KiB.
fn proc_usage(pid: u32) -> (f64, u64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After the command: field 3 is state, so utime (14) and stime (15) are 11 and 12.
            let u: f64 = f.get(11)?.parse().ok()?;
            let s: f64 = f.get(12)?.parse().ok()?;
            Some((u + s) / hz)
        })
        .unwrap_or(f64::NAN);
    (cpu, rss_kib(pid))
}

/// One simulated node's agent: at every wake, read its assigned VEs and acknowledge the
/// new ones.
async fn agent(store: Store, name: String, wake: Arc<Notify>, acked: Arc<AtomicUsize>) {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let prefix = keys::assigned_to(&name);
    loop {
        wake.notified().await;
        let Ok(kvs) = store.list_raw(&prefix).await else {
            // Woken again by the watch's re-made stream, or by the next assignment.
            tokio::time::sleep(Duration::from_millis(100)).await;
            wake.notify_one();
            continue;
        };
        for kv in kvs {
            let ve = kv.key.trim_start_matches(&prefix).to_string();
            if seen.contains(&ve) {
                continue;
            }
            match store.put(&keys::ve(&ve, "status"), &observed(&name, &ve)).await {
                Ok(()) => {
                    seen.insert(ve);
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("control: {name}: status of {ve}: {e}");
                    wake.notify_one();
                }
            }
        }
    }
}

struct Scale {
    nodes: usize,
    ves: usize,
    creates_per_s: f64,
    write_s: f64,
    total_s: f64,
    etcd_cpu_s: f64,
    etcd_rss_before: u64,
    etcd_rss_after: u64,
    lost_ms: Vec<f64>,
    pass_ms: f64,
    read_ms: f64,
}

async fn scale(etcd: &PrivateEtcd, n_nodes: usize, n_ves: usize, writers: usize, runs: usize) -> Scale {
    let ep = vec![etcd.endpoint()];
    let mut stores = Vec::new();
    for _ in 0..CONNECTIONS {
        stores.push(Store::connect(&ep).await.expect("connect to the private etcd"));
    }
    let pid = etcd.pid().expect("etcd runs");

    // Nodes: member record, templates, node record under a lease, a watch and an agent.
    let t = Instant::now();
    let acked = Arc::new(AtomicUsize::new(0));
    let mut regs: Vec<Option<Registration>> = Vec::with_capacity(n_nodes);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n_nodes {
        let store = stores[i % CONNECTIONS].clone();
        set.spawn(async move {
            let name = format!("sim{i:04}");
            let rec = record(&name);
            store.put(&keys::member(&name), &rec).await.expect("member record");
            store
                .put(&keys::templates(&name), &vec!["busybox".to_string()])
                .await
                .expect("templates");
            (i, store.register(&rec, TTL).await.expect("register"))
        });
        // Bounded concurrency: 64 registrations in flight.
        while set.len() >= 64 {
            let (i, r) = set.join_next().await.expect("a task").expect("registration");
            regs_put(&mut regs, i, r);
        }
    }
    while let Some(r) = set.join_next().await {
        let (i, r) = r.expect("registration");
        regs_put(&mut regs, i, r);
    }
    let mut tasks = Vec::new();
    for i in 0..n_nodes {
        let store = stores[i % CONNECTIONS].clone();
        let name = format!("sim{i:04}");
        let wake = Arc::new(Notify::new());
        tasks.push(store.watch_prefix(keys::assigned_to(&name), wake.clone()));
        tasks.push(tokio::spawn(agent(store, name, wake, acked.clone())));
    }
    eprintln!(
        "control: {n_nodes} nodes registered with watches in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The leader: its own lease and connection, the real scheduler loop.
    let lstore = Store::connect(&ep).await.expect("leader connect");
    let lreg = lstore.register(&record("leader"), TTL).await.expect("leader lease");
    let l = lstore.campaign("leader", lreg.lease).await.expect("leadership");
    let changed = Arc::new(Notify::new());
    tasks.push(lstore.watch_prefix(keys::PREFIX.to_string(), changed.clone()));
    tasks.push(tokio::spawn(vessel_agent::control::lead(
        lstore.clone(),
        l.clone(),
        changed,
    )));
    // Let the watches settle before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (cpu0, rss0) = proc_usage(pid);
    let written = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut ws = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (store, written) = (Store::connect(&ep).await.expect("client connect"), written.clone());
        ws.spawn(async move {
            for k in (w..n_ves).step_by(writers) {
                let name = format!("ve{k:05}");
                let ok = store
                    .create(&keys::ve(&name, "spec"), &entry(&name))
                    .await
                    .expect("spec write");
                assert!(ok, "{name} existed before the benchmark wrote it");
                written.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut write_s = f64::NAN;
    let limit = Duration::from_secs(arg("--timeout", 900) as u64);
    let mut last = Instant::now();
    loop {
        let (w, a) = (written.load(Ordering::Relaxed), acked.load(Ordering::Relaxed));
        if w == n_ves && write_s.is_nan() {
            write_s = t0.elapsed().as_secs_f64();
        }
        if a >= n_ves {
            break;
        }
        if t0.elapsed() > limit {
            eprintln!("control: only {a}/{n_ves} acknowledged within {limit:?}; reporting that");
            break;
        }
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "control: {:>6.1} s: {w}/{n_ves} specs written, {a} acknowledged",
                t0.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total_s = t0.elapsed().as_secs_f64();
    let done = acked.load(Ordering::Relaxed).min(n_ves);
    while ws.join_next().await.is_some() {}
    let (cpu1, rss1) = proc_usage(pid);
    eprintln!("control: {done} creates acknowledged in {total_s:.1} s");
    // What one scheduler pass costs with everything placed (it reads every VE and node).
    let mut pass_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        match vessel_agent::control::schedule_once(&lstore, &l).await {
            Ok(_) => pass_ms.push(t.elapsed().as_secs_f64() * 1000.0),
            Err(e) => eprintln!("control: a scheduler pass failed: {e}"),
        }
    }
    let pass_ms = median(&mut pass_ms);
    let mut read_ms = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        if vessel_agent::control::read_ves(&lstore).await.is_ok() {
            read_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let read_ms = median(&mut read_ms);

    // Lost nodes: drop one node's keep-alive, poll its record every 10 ms.
    let probe = Store::connect(&ep).await.expect("probe connect");
    let mut lost_ms = Vec::new();
    for r in 0..runs {
        let i = (r * 197 + 11) % n_nodes;
        let name = format!("sim{i:04}");
        let key = keys::node(&name);
        let reg = regs[i].take();
        let t = Instant::now();
        drop(reg);
        loop {
            if let Ok(None) = probe.get::<NodeRecord>(&key).await {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                eprintln!("control: {name} still registered 30 s after its keep-alive stopped");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        eprintln!("control: lost node {name} seen gone after {ms:.0} ms");
        lost_ms.push(ms);
    }
    for t in tasks {
        t.abort();
    }
    drop(lreg);
    drop(regs);
    Scale {
        nodes: n_nodes,
        ves: done,
        creates_per_s: done as f64 / total_s,
        write_s,
        total_s,
        etcd_cpu_s: cpu1 - cpu0,
        etcd_rss_before: rss0,
        etcd_rss_after: rss1,
        lost_ms,
        pass_ms,
        read_ms,
    }
}

fn regs_put(regs: &mut Vec<Option<Registration>>, i: usize, r: Registration) {
    if regs.len() <= i {
        regs.resize_with(i + 1, || None);
    }
    regs[i] = Some(r);
}

/// `vessel ve create --start` + exec `/bin/true` on a 3-node lab (from node1) and on one
/// node, alternating; medians in ms: (lab, one node, `lab exec` overhead, lab placements).
fn lab_vs_one(runs: usize) -> (f64, f64, f64, Vec<String>) {
    let bin = vessel_bin();
    let lab = TestLab::new(&bin);
    eprintln!("control: lab up (3 nodes)");
    lab.ok(&["up", "--nodes", "3"]);
    for n in ["node1", "node2", "node3"] {
        lab.vessel_ok(n, &["template", "build", "busybox"]);
    }
    let one = TestNode::start(&bin, "ctl");
    one.ensure_busybox();
    // Warm-up on both.
    lab.vessel_ok(
        "node1",
        &[
            "ve",
            "create",
            "warm",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node1",
        ],
    );
    lab.vessel_ok("node1", &["ve", "exec", "warm", "--", "/bin/true"]);
    one.ok(&["ve", "create", "warm", "--template", "busybox", "--start"]);
    one.ok(&["ve", "exec", "warm", "--", "/bin/true"]);
    let settle = || std::thread::sleep(Duration::from_millis(200));
    let (mut tl, mut t1, mut tx, mut placed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("c{i}");
        settle();
        let t = Instant::now();
        lab.ok(&["exec", "node1", "--", "/bin/true"]);
        tx.push(t.elapsed().as_secs_f64() * 1000.0);
        settle();
        // `ve exec` does not reach other nodes yet: it runs on the node the VE was placed
        // on, found between the two timed steps.
        let t = Instant::now();
        lab.vessel_ok("node1", &["ve", "create", &name, "--template", "busybox", "--start"]);
        let create = t.elapsed();
        let show = lab.vessel_json("node1", &["ve", "show", &name]);
        let on = show["node"].as_str().unwrap_or("node1").to_string();
        let t = Instant::now();
        lab.vessel_ok(&on, &["ve", "exec", &name, "--", "/bin/true"]);
        tl.push((create + t.elapsed()).as_secs_f64() * 1000.0);
        placed.push(on);
        settle();
        let t = Instant::now();
        one.ok(&["ve", "create", &name, "--template", "busybox", "--start"]);
        one.ok(&["ve", "exec", &name, "--", "/bin/true"]);
        t1.push(t.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "control: lab run {}/{runs}: lab {:.0} ms (on {}), one node {:.0} ms",
            i + 1,
            tl[i],
            placed[i],
            t1[i]
        );
    }
    (median(&mut tl), median(&mut t1), median(&mut tx), placed)
}

pub fn run() {
    let n_nodes = arg("--nodes", 1000).max(1);
    let n_ves = arg("--ves", 10_000).max(1);
    let writers = arg("--writers", 8).max(1);
    let runs = arg("--runs", 5).max(1);
    let with_lab = arg("--lab", 1) == 1;

    let dir = tempfile::Builder::new()
        .prefix("vessel-bench-control-")
        .tempdir()
        .expect("a temp dir");
    let cfg = EtcdConfig::new(
        "bench",
        dir.path().join("etcd"),
        free_port().expect("a free port"),
        free_port().expect("a free port"),
    );
    // Stopped by its Drop on every way out of this function, panics included.
    let etcd = PrivateEtcd::start(cfg).expect("etcd starts (apt-get install etcd-server)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let s = rt.block_on(scale(&etcd, n_nodes, n_ves, writers, runs));
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(etcd);
    let lab = with_lab.then(|| lab_vs_one(runs));

    let mut lost = s.lost_ms.clone();
    let lost_med = median(&mut lost);
    println!();
    println!("{:<58} {:>12}", "control (real etcd, simulated nodes)", "value");
    println!(
        "{:<58} {:>12}",
        "simulated nodes (lease TTL 2 s, one watch each)", s.nodes
    );
    println!("{:<58} {:>12}", "VE creates scheduled and acknowledged", s.ves);
    println!("{:<58} {:>12.1}", "  all specs written (s)", s.write_s);
    println!("{:<58} {:>12.1}", "  first spec written to last status (s)", s.total_s);
    println!("{:<58} {:>12.0}", "  creates/s (goal >= 100)", s.creates_per_s);
    println!(
        "{:<58} {:>12.0}",
        format!("one scheduler pass with {} VEs placed (ms)", s.ves),
        s.pass_ms
    );
    println!("{:<58} {:>12.0}", "  of which reading every VE (ms)", s.read_ms);
    println!("{:<58} {:>12.1}", "etcd CPU time during the creates (s)", s.etcd_cpu_s);
    println!(
        "{:<58} {:>12}",
        "etcd RSS before -> after (MiB)",
        format!("{} -> {}", s.etcd_rss_before / 1024, s.etcd_rss_after / 1024)
    );
    println!(
        "{:<58} {:>12.0}",
        format!("lost node seen gone, median of {} (ms, goal <= 2500)", lost.len()),
        lost_med
    );
    println!(
        "{:<58} {:>12}",
        "  each (ms)",
        s.lost_ms
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some((l, o, x, placed)) = lab {
        println!(
            "{:<58} {:>12.0}",
            format!("3-node lab: ve create --start + exec, median of {runs} (ms)"),
            l
        );
        println!("{:<58} {:>12}", "  placed on", placed.join(" "));
        println!("{:<58} {:>12.0}", "  of which `vessel lab exec` itself (ms)", x);
        println!("{:<58} {:>12.0}", "one node: ve create --start + exec (ms)", o);
        println!(
            "{:<58} {:>12.2}",
            "lab/one-node (lab exec overhead subtracted)",
            (l - 2.0 * x) / o
        );
    }
    println!(
        "control: {:.0} creates/s, lost-node detection {:.0} ms at {} nodes",
        s.creates_per_s, lost_med, s.nodes
    );
}
