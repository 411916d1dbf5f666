//! `vessel-bench fs-ve`: vessel-fs as a customer feels it, inside real VEs started by a
//! daemon, beside the host's ext4 with the same tool; alternating, medians.
//!
//! - untar of the same tarball: busybox tar inside a busybox VE vs busybox tar on ext4, and
//!   (with `--debian`, the default when the Debian template can be built) GNU tar inside a
//!   Debian VE vs GNU tar on ext4; each `tar -xf - && sync`, the tarball fed on stdin;
//! - 4 KiB write + fdatasync IOPS, 1 GiB sequential write + fsync and cold read: this
//!   benchmark binary itself runs inside the Debian VE as the worker (same glibc as the host);
//! - history: in a fresh busybox VE that keeps 24 h of history, the same untar five times
//!   into fresh directories (`rm -rf` of the previous one between, as a user would): does
//!   the history the VE accumulates slow it down? `history: untar #5 x{r} #1`.
//!
//! `--only untar|fsync|seq|history` runs one part. `vessel-bench fs` runs all of this after
//! its own rows (unless `--in-ve 0`). Last line: `vessel-fs in a VE: untar x{r} ext4, fsync
//! x{r} ext4, seqwrite x{r} ext4, seqread x{r} ext4`.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vessel_testkit::{run_bounded, TestNode};

use crate::{arg, arg_str, fsbench, median};

/// `vessel-bench fs-worker fsync PATH N | seqw PATH MIB | seqr PATH`: one measurement,
/// printed as a number (IOPS or MB/s). Runs inside a VE or on the host.
pub fn worker(args: &[String]) -> i32 {
    let (op, path) = match (args.first(), args.get(1)) {
        (Some(o), Some(p)) => (o.as_str(), PathBuf::from(p)),
        _ => {
            eprintln!("usage: vessel-bench fs-worker fsync PATH N | seqw PATH MIB | seqr PATH");
            return 2;
        }
    };
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let v = match op {
        "fsync" => fsbench::fsync_file(&path, n),
        "seqw" => fsbench::seq_write(&path, n),
        "seqr" => {
            fsbench::drop_cache(&path);
            fsbench::seq_read(&path)
        }
        _ => {
            eprintln!("vessel-bench fs-worker: unknown op {op}");
            return 2;
        }
    };
    println!("{v:.1}");
    0
}

pub(crate) struct Dir(pub(crate) PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn num(o: &std::process::Output, what: &str) -> f64 {
    let s = String::from_utf8_lossy(&o.stdout);
    s.trim().parse().unwrap_or_else(|_| {
        panic!(
            "{what}: no figure ({}; stderr: {})",
            s.trim(),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Seconds for `script` in the VE with the tarball on stdin.
fn in_ve(node: &TestNode, ve: &str, script: &str, stdin: Option<&Path>) -> f64 {
    let mut c = node.command();
    c.args(["ve", "exec", ve, "--", "sh", "-c", script]);
    c.stdin(match stdin {
        Some(p) => Stdio::from(fs::File::open(p).unwrap()),
        None => Stdio::null(),
    });
    let t = Instant::now();
    let o = run_bounded(c, Duration::from_secs(1800));
    assert!(
        o.status.success(),
        "in VE {ve}: {script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn on_host(script: &str, stdin: &Path) -> f64 {
    let mut c = Command::new("sh");
    c.args(["-c", script])
        .stdin(Stdio::from(fs::File::open(stdin).unwrap()));
    let t = Instant::now();
    let o = run_bounded(c, Duration::from_secs(1800));
    assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    t.elapsed().as_secs_f64()
}

fn profile(node: &TestNode, ve: &str) -> vessel_types::api::FsProfile {
    let v = node.json(&["ve", "show", ve]);
    serde_json::from_value(v["fs"]["profile"].clone()).unwrap_or_default()
}

/// Per file (or per operation, with `per` = 1) figures of one workload in the VE.
fn print_profile(what: &str, p: &vessel_types::api::FsProfile, per: f64) {
    println!("profile of {what}: FUSE requests by opcode, time in handler:");
    let total: u64 = p.ops.iter().map(|o| o.count).sum();
    let mut ops = p.ops.clone();
    ops.sort_by_key(|o| std::cmp::Reverse(o.count));
    for o in &ops {
        println!(
            "  {:<12} {:>8.2} req {:>9.1} us/req",
            o.op,
            o.count as f64 / per,
            o.ns as f64 / o.count.max(1) as f64 / 1000.0
        );
    }
    println!(
        "  all: {:.2} requests, {:.2} transactions; volume lock held {:.1} us, waited {:.1} us; {} log syncs ({:.1} ms)",
        total as f64 / per,
        p.txs as f64 / per,
        p.lock_hold_ns as f64 / per / 1000.0,
        p.lock_wait_ns as f64 / per / 1000.0,
        p.syncs,
        p.sync_ns as f64 / 1e6
    );
}

fn worker_in_ve(node: &TestNode, ve: &str, args: &str) -> f64 {
    let o = node.exec(ve, &format!("/usr/local/bin/vessel-bench fs-worker {args}"));
    assert!(
        o.status.success(),
        "worker {args}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    num(&o, args)
}

fn worker_on_host(args: &[&str]) -> f64 {
    let me = std::env::current_exe().unwrap();
    let mut c = Command::new(me);
    c.arg("fs-worker").args(args);
    let o = run_bounded(c, Duration::from_secs(1800));
    num(&o, &args.join(" "))
}

/// The in-VE figures against ext4 on the host (NaN where not measured).
#[derive(Debug, Clone, Copy)]
pub struct Ratios {
    pub untar: f64,
    pub fsync: f64,
    pub seqwrite: f64,
    pub seqread: f64,
}

impl Ratios {
    /// The benchmark's last line.
    pub fn line(&self) -> String {
        format!(
            "vessel-fs in a VE: untar x{:.2} ext4, fsync x{:.2} ext4, seqwrite x{:.2} ext4, seqread x{:.2} ext4",
            self.untar, self.fsync, self.seqwrite, self.seqread
        )
    }
}

/// Seconds of each of `n` untars of `tar` into fresh directories of one busybox VE that
/// keeps 24 h of history, the previous directory removed before each; and the profile of
/// each untar.
fn history_untars(node: &TestNode, tar: &Path, n: usize) -> Vec<(f64, vessel_types::api::FsProfile)> {
    node.ok(&["ve", "create", "hist", "-t", "busybox", "--history", "24h", "--start"]);
    let mut out = Vec::new();
    for i in 1..=n {
        if i > 1 {
            in_ve(node, "hist", &format!("rm -rf /root/h{} && sync", i - 1), None);
        }
        let p0 = profile(node, "hist");
        let t = in_ve(
            node,
            "hist",
            &format!("mkdir -p /root/h{i} && tar -C /root/h{i} -xf - && sync"),
            Some(tar),
        );
        eprintln!("history: untar #{i} {t:.2} s");
        out.push((t, profile(node, "hist").since(&p0)));
    }
    node.ok(&["ve", "destroy", "--force", "hist"]);
    out
}

pub fn run(bin: &Path, tar: &Path, files: usize) -> Ratios {
    let runs = arg("--runs", 5).max(1);
    let seq_mib = arg("--seq-mib", 1024);
    let debian = arg("--debian", 1) == 1;
    // `--only untar|fsync|seq`: one part alone (while working on it).
    let only = arg_str("--only");
    let part = |p: &str| only.as_deref().is_none_or(|o| o == p);
    if let Some(o) = only
        .as_deref()
        .filter(|o| !["untar", "fsync", "seq", "history"].contains(o))
    {
        eprintln!("vessel-bench: --only {o}: expected untar, fsync, seq or history");
        std::process::exit(2);
    }
    let base = Dir(PathBuf::from(format!("/var/tmp/vessel-fsve-{}", std::process::id())));
    fs::create_dir_all(&base.0).unwrap();
    let ext4 = base.0.join("ext4");
    fs::create_dir_all(&ext4).unwrap();
    let node = TestNode::start(bin, "fsve");
    node.ensure_busybox();
    node.ok(&["ve", "create", "bb", "-t", "busybox", "--start"]);
    let busybox = which("busybox");
    // (tool, VE, script on the host, script in the VE)
    let mut vs: Vec<(&str, &str, String, String)> = vec![(
        "busybox tar",
        "bb",
        format!("{busybox} tar -C {{DIR}} -xf - && sync"),
        "mkdir -p /root/u && tar -C /root/u -xf - && sync".to_string(),
    )];
    if debian {
        eprintln!("building the Debian template (debootstrap, once per machine)...");
        node.ok(&["template", "build", "debian"]);
        node.ok(&["ve", "create", "deb", "-t", "debian", "--start"]);
        let me = std::env::current_exe().unwrap();
        let dst = node.root.join("ves/deb/rootfs/usr/local/bin/vessel-bench");
        fs::copy(&me, &dst).expect("copy the worker into the Debian VE");
        vs.push((
            "GNU tar",
            "deb",
            "tar -C {DIR} -xf - && sync".to_string(),
            "mkdir -p /root/u && tar -C /root/u -xf - && sync".to_string(),
        ));
    }
    let mut rows = Vec::new();
    let mut profiles = Vec::new();
    let mut ratio_untar = f64::NAN;
    for (tool, ve, host_script, ve_script) in vs.iter().filter(|_| part("untar")) {
        let (mut h, mut v) = (Vec::new(), Vec::new());
        for run in 0..=runs {
            let host_dir = ext4.join(format!("u{run}"));
            fs::create_dir_all(&host_dir).unwrap();
            let host = || on_host(&host_script.replace("{DIR}", &host_dir.display().to_string()), tar);
            let mut last_profile = None;
            let mut inside = || {
                let p0 = profile(&node, ve);
                let t = in_ve(&node, ve, ve_script, Some(tar));
                last_profile = Some(profile(&node, ve).since(&p0));
                t
            };
            let (a, b) = if run % 2 == 0 {
                let a = host();
                (a, inside())
            } else {
                let b = inside();
                (host(), b)
            };
            let _ = fs::remove_dir_all(&host_dir);
            in_ve(&node, ve, "rm -rf /root/u && sync", None);
            if run == runs {
                profiles.push((
                    format!("untar, {tool} in a VE (per file)"),
                    last_profile.clone().unwrap_or_default(),
                    files as f64,
                ));
            }
            // Run 0 warms the page cache of the tarball; not counted.
            if run > 0 {
                eprintln!("{tool} run {run}: ext4 {a:.2} s, in VE {b:.2} s");
                h.push(a);
                v.push(b);
            }
        }
        let (mh, mv) = (median(&mut h), median(&mut v));
        if ratio_untar.is_nan() || *ve == "deb" {
            ratio_untar = mv / mh;
        }
        rows.push((format!("untar {files} files, {tool} (s)"), mh, mv));
    }
    let (mut fi, mut sw, mut sr) = (f64::NAN, f64::NAN, f64::NAN);
    if debian {
        let (mut h, mut v) = (Vec::new(), Vec::new());
        let hf = ext4.join("fsync-test");
        for run in (0..runs).filter(|_| part("fsync")) {
            let hs = hf.display().to_string();
            let (a, b) = if run % 2 == 0 {
                let a = worker_on_host(&["fsync", &hs, "1000"]);
                (a, worker_in_ve(&node, "deb", "fsync /root/fsync-test 1000"))
            } else {
                let b = worker_in_ve(&node, "deb", "fsync /root/fsync-test 1000");
                (worker_on_host(&["fsync", &hs, "1000"]), b)
            };
            eprintln!("fsync run {run}: ext4 {a:.0} IOPS, in VE {b:.0} IOPS");
            h.push(a);
            v.push(b);
        }
        let (mh, mv) = (median(&mut h), median(&mut v));
        fi = mv / mh;
        rows.push(("4 KiB write+fdatasync (IOPS)".into(), mh, mv));
        let (mut hw, mut vw, mut hr, mut vr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let hs = ext4.join("seq-test").display().to_string();
        let vol_data = node.root.join("ves/deb/volume/data");
        let in_host_view = node.root.join("ves/deb/rootfs/root/seq-test");
        let mib = seq_mib.to_string();
        let mut seq_profile = None;
        for run in (0..runs.min(5)).filter(|_| part("seq")) {
            let host = || {
                let w = worker_on_host(&["seqw", &hs, &mib]);
                (w, worker_on_host(&["seqr", &hs]))
            };
            let mut inside = || {
                let p0 = profile(&node, "deb");
                let w = worker_in_ve(&node, "deb", &format!("seqw /root/seq-test {seq_mib}"));
                seq_profile = Some(profile(&node, "deb").since(&p0));
                // Cold read: drop the file's pages and those of its backing data file.
                fsbench::drop_cache(&in_host_view);
                if let Ok(m) = fs::metadata(&in_host_view) {
                    fsbench::drop_cache(&vol_data.join(vessel_fs::volume::data_name(m.ino())));
                }
                (w, worker_in_ve(&node, "deb", "seqr /root/seq-test"))
            };
            let (a, b) = if run % 2 == 0 {
                let a = host();
                (a, inside())
            } else {
                let b = inside();
                (host(), b)
            };
            eprintln!(
                "seq run {run}: ext4 write {:.0} read {:.0} MB/s, in VE write {:.0} read {:.0} MB/s",
                a.0, a.1, b.0, b.1
            );
            hw.push(a.0);
            hr.push(a.1);
            vw.push(b.0);
            vr.push(b.1);
        }
        let _ = fs::remove_file(&hs);
        in_ve(&node, "deb", "rm -f /root/seq-test /root/fsync-test", None);
        if let Some(p) = seq_profile {
            profiles.push((
                format!("{seq_mib} MiB seq write + fsync in a VE (per MiB)"),
                p,
                seq_mib as f64,
            ));
        }
        let (a, b) = (median(&mut hw), median(&mut vw));
        sw = b / a;
        rows.push((format!("{seq_mib} MiB seq write+fsync (MB/s)"), a, b));
        let (a, b) = (median(&mut hr), median(&mut vr));
        sr = b / a;
        rows.push((format!("{seq_mib} MiB cold seq read (MB/s)"), a, b));
    }
    println!("vessel-fs inside a VE ({runs} runs, medians, alternating)");
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "workload", "ext4 (host)", "in a VE", "ratio"
    );
    for (name, a, b) in &rows {
        println!("{name:<44} {a:>12.2} {b:>12.2} {:>8.2}", b / a);
    }
    for (what, p, per) in &profiles {
        print_profile(what, p, *per);
    }
    if part("history") {
        let h = history_untars(&node, tar, 5);
        // The same sequence with the same tool on the host's ext4, for comparison.
        let busybox = which("busybox");
        let host: Vec<f64> = (1..=5)
            .map(|i| {
                let d = ext4.join(format!("h{i}"));
                fs::create_dir_all(&d).unwrap();
                let t = on_host(&format!("{busybox} tar -C {} -xf - && sync", d.display()), tar);
                let _ = fs::remove_dir_all(&d);
                on_host("sync", Path::new("/dev/null"));
                t
            })
            .collect();
        let list = |v: &mut dyn Iterator<Item = f64>| v.map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", ");
        println!(
            "untar {files} files 5 times, rm -rf between (s): in one busybox VE keeping 24 h of history {}; ext4 on the host {}",
            list(&mut h.iter().map(|(s, _)| *s)),
            list(&mut host.iter().copied())
        );
        for k in [0, 4] {
            print_profile(
                &format!("untar #{} in that VE (per file)", k + 1),
                &h[k].1,
                files as f64,
            );
        }
        println!("history (ext4 on the host: untar #5 x{:.2} #1)", host[4] / host[0]);
        println!("history: untar #5 x{:.2} #1", h[4].0 / h[0].0);
    }
    Ratios {
        untar: ratio_untar,
        fsync: fi,
        seqwrite: sw,
        seqread: sr,
    }
}

fn which(p: &str) -> String {
    for d in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let c = Path::new(d).join(p);
        if c.exists() {
            return c.display().to_string();
        }
    }
    p.to_string()
}
