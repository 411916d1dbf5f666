//! `vessel-bench ve-start [--runs N] [--density N]`, `vessel-bench fs [--runs N] [--in-ve 0|1]`,
//! `vessel-bench fs-ve`, `vessel-bench control` (the control center at scale: see
//! `control.rs`) and `vessel-bench repl` (replicated file systems: see `repl.rs`): run as root after `cargo build --release`. See `fsbench.rs` for
//! the file system benchmark from the host, `fsve.rs` for its part inside real VEs.
//!
//! ve-start:
//!
//! 1. VE start: time from `vessel ve create --start` of a busybox VE to a command having
//!    run in it (`vessel ve exec NAME -- /bin/true`), against `runc run` of the same busybox
//!    tree running `/bin/true`; alternating, medians. Vessel does more per start (user
//!    namespace with an id-mapped root, a veth on the node bridge, a whole init, state on disk).
//! 2. Density: daemon memory per running idle busybox VE with N VEs up, and the count of
//!    processes per VE on the host besides the VE's own (goal: none).
//!
//! Last line: `ve-start: vessel/runc = X`.

mod control;
mod forward;
mod fsbench;
mod fsve;
mod gluster;
mod repl;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vessel_testkit::{run_bounded, TestNode};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")
        .map(|r| r.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|x| x.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn vessel_bin() -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    let bin = me.with_file_name("vessel");
    if !bin.exists() {
        eprintln!(
            "vessel-bench: {} not found: run `cargo build --release` first",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter()
        .position(|x| x == name)
        .and_then(|i| a.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value after `name` on the command line, if any.
fn arg_str(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).cloned()
}

/// An OCI bundle for runc over the template's own tree (read-only, like Vessel's lower layer).
fn runc_bundle(dir: &Path, rootfs: &Path) -> PathBuf {
    let b = dir.join("runc-bundle");
    std::fs::create_dir_all(&b).unwrap();
    let st = Command::new("runc")
        .arg("spec")
        .current_dir(&b)
        .status()
        .expect("runc spec (install runc)");
    assert!(st.success());
    let p = b.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    spec["process"]["terminal"] = false.into();
    spec["root"]["path"] = rootfs.to_string_lossy().to_string().into();
    spec["root"]["readonly"] = true.into();
    std::fs::write(&p, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    b
}

fn main() {
    let cmd = std::env::args().nth(1);
    if cmd.as_deref() == Some("fs-worker") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        std::process::exit(fsve::worker(&args));
    }
    let help = std::env::args().skip(1).any(|a| a == "--help" || a == "-h");
    if help
        || !matches!(
            cmd.as_deref(),
            Some("ve-start") | Some("fs") | Some("fs-ve") | Some("control") | Some("forward") | Some("repl")
        )
    {
        let usage = "usage: vessel-bench ve-start [--runs N] [--density N] \
             | fs [--runs N] [--seq-mib N] [--mounts N] [--in-ve 0|1] [--debian 0|1] \
             | fs-ve [--runs N] [--seq-mib N] [--debian 0|1] [--only untar|fsync|seq|history] \
             | control [--nodes N] [--ves N] [--writers N] [--runs N] [--lab 0|1] [--timeout S] \
             | forward [--runs N] [--mib N] \
             | repl [--quick] [--runs N] [--files N] [--fsync-ops N] [--seq-mib N] [--targets ext4,rf1,rf2,rf3,gluster] [--warmup 0|1]";
        if help {
            println!("{usage}");
        } else {
            eprintln!("{usage}");
        }
        std::process::exit(if help { 0 } else { 2 });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vessel-bench: run as root (it starts real VEs and mounts)");
        std::process::exit(2);
    }
    if cmd.as_deref() == Some("control") {
        control::run();
        return;
    }
    if cmd.as_deref() == Some("repl") {
        repl::run();
        return;
    }
    if cmd.as_deref() == Some("forward") {
        forward::run();
        return;
    }
    if cmd.as_deref() == Some("fs") {
        fsbench::run(&vessel_bin());
        return;
    }
    if cmd.as_deref() == Some("fs-ve") {
        let base = PathBuf::from(format!("/var/tmp/vessel-fsve-tar-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let (tar, files) = fsbench::tarball(&base);
        let r = fsve::run(&vessel_bin(), &tar, files);
        println!("{}", r.line());
        let _ = std::fs::remove_dir_all(&base);
        return;
    }
    let runs = arg("--runs", 15).max(10);
    let density = arg("--density", 100);
    let node = TestNode::start(&vessel_bin(), "bench");
    node.ensure_busybox();
    let tpl = node.json(&["template", "show", "busybox"]);
    let rootfs = node
        .root
        .join("templates")
        .join(tpl["id"].as_str().unwrap())
        .join("rootfs");
    let bundle = runc_bundle(&node.root, &rootfs);
    let runc_root = node.root.join("runc-state");

    // Warm-up: one of each (page cache, first-time cgroup creation).
    node.ok(&["ve", "create", "warm", "-t", "busybox", "--start"]);
    node.ok(&["ve", "exec", "warm", "--", "/bin/true"]);
    node.ok(&["ve", "destroy", "--force", "warm"]);
    let runc = |id: &str| {
        let mut c = Command::new("runc");
        c.arg("--root")
            .arg(&runc_root)
            .args(["run", "-b"])
            .arg(&bundle)
            .arg(id)
            .stdin(Stdio::null());
        let o = run_bounded(c, Duration::from_secs(60));
        assert!(
            o.status.success(),
            "runc run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    runc("warm");

    // Each timed run starts on a settled machine: namespace and cgroup teardown of the
    // previous run (either side's) is asynchronous in the kernel and would be billed to
    // whoever runs next.
    let settle = || std::thread::sleep(Duration::from_millis(200));
    let (mut tv, mut tr) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("b{i}");
        settle();
        let t = Instant::now();
        node.ok(&["ve", "create", &name, "-t", "busybox", "--start"]);
        node.ok(&["ve", "exec", &name, "--", "/bin/true"]);
        tv.push(t.elapsed().as_secs_f64() * 1000.0);
        node.ok(&["ve", "destroy", "--force", &name]);
        settle();
        let t = Instant::now();
        runc(&format!("r{i}"));
        tr.push(t.elapsed().as_secs_f64() * 1000.0);
        eprint!("\rve-start run {}/{runs}", i + 1);
    }
    eprintln!();
    let (mv, mr) = (median(&mut tv), median(&mut tr));
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "ve-start (ms, n=".to_string() + &runs.to_string() + ")",
        "median",
        "min",
        "max"
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>10.1}",
        "vessel ve create --start + exec /bin/true",
        mv,
        tv[0],
        tv[tv.len() - 1]
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>10.1}",
        "runc run /bin/true (same busybox tree)",
        mr,
        tr[0],
        tr[tr.len() - 1]
    );

    // Density: daemon memory per running idle VE.
    // Node-side memory: the daemon plus the node's console keeper (both serve all VEs).
    let daemon = node.daemon_pid().expect("daemon pid");
    let keeper = || {
        std::fs::read_to_string(node.root.join("console-keeper.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
    };
    let node_rss = || rss_kib(daemon) + keeper().map_or(0, rss_kib);
    let before = node_rss();
    let t = Instant::now();
    for i in 0..density {
        node.ok(&["ve", "create", &format!("d{i}"), "-t", "busybox", "--start"]);
        if i % 10 == 9 {
            eprint!("\rdensity: {}/{density} VEs running", i + 1);
        }
    }
    eprintln!();
    std::thread::sleep(Duration::from_secs(3));
    let after = node_rss();
    let kids: Vec<u32> = children_of(daemon)
        .into_iter()
        .filter(|p| Some(*p) != keeper())
        .collect();
    let running = node
        .json(&["ve", "list"])
        .as_array()
        .map(|a| a.iter().filter(|v| v["status"] == "running").count())
        .unwrap_or(0);
    let per_ve_kib = (after.saturating_sub(before)) as f64 / density.max(1) as f64;
    let ve_mem: u64 = node
        .json(&["ve", "list"])
        .as_array()
        .map(|a| a.iter().filter_map(|v| v["memory_used"].as_u64()).sum())
        .unwrap_or(0);
    println!();
    println!(
        "density: {running} busybox VEs running (started in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    println!(
        "daemon + console keeper RSS: {before} KiB with 0 VEs, {after} KiB with {density}: {per_ve_kib:.1} KiB per VE (goal < 1024)"
    );
    println!(
        "host processes per VE besides its own: {} (daemon children = the {} VE inits)",
        kids.len().saturating_sub(running),
        kids.len()
    );
    println!(
        "memory charged to the VEs' cgroups: {:.0} KiB per VE",
        ve_mem as f64 / 1024.0 / density.max(1) as f64
    );
    println!("ve-start: vessel/runc = {:.2}", mv / mr);
}
