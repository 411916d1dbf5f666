//! `vessel-bench repl [--quick] [--runs N] [--files N] [--fsync-ops N] [--seq-mib N]
//! [--targets ext4,rf1,rf2,rf3,gluster] [--warmup 0|1]`: the replicated file system benchmark (issue 10),
//! on a 3-node `vessel lab`, every target side by side in one run, alternating, medians.
//!
//! Targets (rows):
//! - `ext4`: a directory under the bench's temp dir on the host's disk (the disk's limit);
//! - `rf1`: vessel-fs inside a Debian VE on lab node1 (today's vessel-fs); the tools run
//!   in the VE through `vessel lab exec node1 -- vessel ve exec VE -- ...`;
//! - `rf2`, `rf3`: the same with `vessel ve create --replicas N`. HOOK for the replication
//!   being built now: the code path is here and runs as soon as `ve create --help` offers
//!   `--replicas`; until then the rows are skipped with a printed note;
//! - `gluster`: GlusterFS `replica 3`, one glusterd and one brick per lab node, a FUSE mount
//!   on the host (see `gluster.rs`); the tools run on the host as for ext4.
//!
//! Workloads, the same tool on every target:
//! (a) GNU tar `tar -C DIR -xf - && sync` of a deterministic tarball of `--files` small files
//!     (generated once per run of the bench, on stdin), into a fresh directory each run;
//! (b) 4 KiB write + fdatasync, `--fsync-ops` times (`vessel-bench fs-worker fsync`): IOPS;
//! (c) `--seq-mib` MiB sequential write in 1 MiB writes + fsync (`fs-worker seqw`): MB/s.
//!
//! Each round runs every target once per workload, the order rotated by round so each
//! target goes first equally often; round 0 warms caches and is not counted (`--warmup 0`
//! leaves it out: GlusterFS takes minutes per untar of 30,000 files). Defaults:
//! 5 counted rounds, 30,000 files, 1,000 fsyncs, 1024 MiB; `--quick`: 2 rounds, 5,000 files,
//! 300 fsyncs, 256 MiB. Last line (the issue's): `replicated vessel-fs RF3: untar x{r} ext4,
//! fsync x{r} ext4, seqwrite x{r} ext4; glusterfs r3: untar x{r}, fsync x{r}`; while RF 3
//! cannot be made it carries RF 1's figures, marked `(RF1: replication not built yet)`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vessel_testkit::lab::TestLab;
use vessel_testkit::run_bounded;

use crate::gluster::{self, Gluster};
use crate::{arg, arg_str, median, vessel_bin};

/// Files per directory of the generated tree (like a package's doc dir).
const PER_DIR: usize = 100;
/// Where the worker binary goes inside the VEs.
const WORKER: &str = "/usr/local/bin/vessel-bench";

/// Size of generated file `i`: 100 B to ~8 KiB, spread deterministically (most of
/// /usr/share/doc is this small).
pub fn file_size(i: usize) -> usize {
    100 + (i * 7919) % 8000
}

/// Write the tree of `files` files under `dir` and tar it (fixed order, owner and mtime, so
/// the tarball is the same bytes every time) into `tar`.
fn make_tarball(dir: &Path, tar: &Path, files: usize) {
    let tree = dir.join("tree");
    let mut buf = Vec::new();
    for i in 0..files {
        let d = tree.join(format!("pkg{:04}/doc", i / PER_DIR));
        if i % PER_DIR == 0 {
            fs::create_dir_all(&d).expect("create the tarball's tree");
        }
        buf.clear();
        let line = format!("file {i} of the vessel-bench repl tree\n");
        while buf.len() < file_size(i) {
            buf.extend_from_slice(line.as_bytes());
        }
        buf.truncate(file_size(i));
        fs::write(d.join(format!("f{:03}.txt", i % PER_DIR)), &buf).expect("write the tarball's tree");
    }
    let mut c = Command::new("tar");
    c.args([
        "--sort=name",
        "--mtime=@0",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "-cf",
    ])
    .arg(tar)
    .arg("-C")
    .arg(&tree)
    .arg(".");
    let o = run_bounded(c, Duration::from_secs(600));
    assert!(o.status.success(), "tar -cf: {}", String::from_utf8_lossy(&o.stderr));
    let _ = fs::remove_dir_all(&tree);
}

/// The order targets run in during round `round` (rotated so each goes first in turn).
pub fn order(round: usize, n: usize) -> Vec<usize> {
    (0..n).map(|k| (round + k) % n.max(1)).collect()
}

/// Whether `vessel ve create --help` offers `--replicas`.
pub fn offers_replicas(help: &str) -> bool {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == '<')
        .any(|w| w == "--replicas")
}

/// Medians of one target: (untar s, fsync IOPS, seqwrite MB/s); NaN when not measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub untar: f64,
    pub fsync: f64,
    pub seqw: f64,
}

/// Ratios against ext4, in the sense "x{r} ext4": time ratio for untar (>1 is slower), rate
/// ratio for IOPS and MB/s (<1 is slower).
pub fn ratios(t: &Figures, ext4: &Figures) -> Figures {
    Figures {
        untar: t.untar / ext4.untar,
        fsync: t.fsync / ext4.fsync,
        seqw: t.seqw / ext4.seqw,
    }
}

/// The last line; `rf3` None means RF 3 could not be made and `rf1` stands in.
pub fn last_line(rf3: Option<&Figures>, rf1: &Figures, gluster: &Figures) -> String {
    let (v, mark) = match rf3 {
        Some(r) => (r, ""),
        None => (rf1, " (RF1: replication not built yet)"),
    };
    format!(
        "replicated vessel-fs RF3{mark}: untar x{:.2} ext4, fsync x{:.2} ext4, seqwrite x{:.2} ext4; glusterfs r3: untar x{:.2}, fsync x{:.2}",
        v.untar, v.fsync, v.seqw, gluster.untar, gluster.fsync
    )
}

/// Where a target's files live and how its tools are run.
enum Place {
    /// A directory of the host (ext4 or the GlusterFS mount): tools run on the host.
    Host(PathBuf),
    /// A VE on a lab node: tools run in it through `vessel ve exec`.
    Ve { node: String, ve: String },
}

struct Target {
    label: String,
    key: String,
    place: Place,
    untar: Vec<f64>,
    fsync: Vec<f64>,
    seqw: Vec<f64>,
}

impl Target {
    fn new(key: &str, label: String, place: Place) -> Target {
        Target {
            label,
            key: key.into(),
            place,
            untar: Vec::new(),
            fsync: Vec::new(),
            seqw: Vec::new(),
        }
    }

    fn figures(&mut self) -> Figures {
        Figures {
            untar: median(&mut self.untar),
            fsync: median(&mut self.fsync),
            seqw: median(&mut self.seqw),
        }
    }
}

use crate::fsve::Dir;

/// `vessel ve exec VE -- ARGV` on `node`, stdin from `stdin`: its output (bounded).
fn ve_exec(lab: &TestLab, node: &str, ve: &str, argv: &[&str], stdin: Option<&Path>) -> std::process::Output {
    let mut a = vec!["exec", node, "--", "vessel", "ve", "exec", ve, "--"];
    a.extend_from_slice(argv);
    let mut c = lab.cmd(&a);
    c.stdin(match stdin {
        Some(p) => Stdio::from(fs::File::open(p).expect("open stdin file")),
        None => Stdio::null(),
    });
    run_bounded(c, Duration::from_secs(3600))
}

fn ve_ok(lab: &TestLab, node: &str, ve: &str, argv: &[&str], stdin: Option<&Path>) -> std::process::Output {
    let o = ve_exec(lab, node, ve, argv, stdin);
    assert!(
        o.status.success(),
        "in VE {ve} on {node}: {argv:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn host_ok(argv: &[&str], stdin: Option<&Path>) -> std::process::Output {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..]);
    c.stdin(match stdin {
        Some(p) => Stdio::from(fs::File::open(p).expect("open stdin file")),
        None => Stdio::null(),
    });
    let o = run_bounded(c, Duration::from_secs(3600));
    assert!(o.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Run `argv` where `t`'s tools run (`{DIR}` in it: the target's directory); seconds.
fn timed(lab: &TestLab, t: &Target, script: &str, stdin: Option<&Path>) -> (f64, std::process::Output) {
    let start = Instant::now();
    let o = match &t.place {
        Place::Host(d) => {
            let s = script.replace("{DIR}", &d.display().to_string());
            host_ok(&["sh", "-c", &s], stdin)
        }
        Place::Ve { node, ve } => {
            let s = script.replace("{DIR}", "/root/bench");
            ve_ok(lab, node, ve, &["sh", "-c", &s], stdin)
        }
    };
    (start.elapsed().as_secs_f64(), o)
}

fn worker(lab: &TestLab, t: &Target, op: &str, file: &str, n: usize) -> f64 {
    let what = format!("{} fs-worker {op}", t.label);
    match &t.place {
        Place::Host(d) => {
            let me = std::env::current_exe().expect("current exe");
            let p = d.join(file).display().to_string();
            let o = host_ok(&[&me.display().to_string(), "fs-worker", op, &p, &n.to_string()], None);
            crate::fsve::num(&o, &what)
        }
        Place::Ve { node, ve } => {
            let p = format!("/root/bench/{file}");
            let o = ve_ok(lab, node, ve, &[WORKER, "fs-worker", op, &p, &n.to_string()], None);
            crate::fsve::num(&o, &what)
        }
    }
}

/// Create a Debian VE on `node` (with `--replicas rf` when the CLI offers it), start it and
/// put the worker into it. Err: why the row is skipped.
///
/// HOOK (issue 10, RF 2 and RF 3): this is the code path of the replicated rows. It runs
/// as soon as `vessel ve create --help` offers `--replicas`; until then RF > 1 is skipped
/// with a note. RF 1 passes `--replicas 1` explicitly once the flag exists (the default on
/// a cluster of 2+ nodes will be 2). Before measuring, it waits (bounded) until `ve show`
/// lists every replica in sync, so seeding is not billed to the first workload.
fn make_ve(lab: &TestLab, node: &str, ve: &str, rf: usize, replicas_flag: bool) -> Result<(), String> {
    let rf_s = rf.to_string();
    let mut args = vec!["ve", "create", ve, "--template", "debian", "--start", "--node", node];
    if replicas_flag {
        args.extend_from_slice(&["--replicas", &rf_s]);
    } else if rf > 1 {
        return Err(format!(
            "RF {rf}: skipped: `vessel ve create` does not offer --replicas yet (replication not built)"
        ));
    }
    let o = lab.vessel(node, &args);
    if !o.status.success() {
        return Err(format!(
            "RF {rf}: skipped: `vessel {}` refused: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    if replicas_flag && rf > 1 {
        wait_in_sync(lab, node, ve, rf)?;
    }
    let me = std::env::current_exe().expect("current exe");
    let script = format!("cat > {WORKER} && chmod 755 {WORKER} && mkdir -p /root/bench");
    ve_ok(lab, node, ve, &["sh", "-c", &script], Some(&me));
    Ok(())
}

/// Whether `ve show --json` lists the `rf - 1` other copies (the writer's own is not
/// listed), all in sync: None when it lists no replicas at all (nothing to wait for).
pub fn replicas_in_sync(show: &serde_json::Value, rf: usize) -> Option<bool> {
    let reps = show["replicas"].as_array()?;
    let synced = reps
        .iter()
        .filter(|r| {
            r["state"]
                .as_str()
                .is_some_and(|s| s.replace(['-', '_', ' '], "").eq_ignore_ascii_case("insync"))
        })
        .count();
    let others = rf.saturating_sub(1);
    Some(reps.len() >= others && synced >= others)
}

/// Wait (at most 5 minutes) until the VE's `rf` replicas are in sync.
fn wait_in_sync(lab: &TestLab, node: &str, ve: &str, rf: usize) -> Result<(), String> {
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    for _ in 0..600 {
        let o = lab.vessel(node, &["ve", "show", ve, "--json"]);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
            match replicas_in_sync(&v, rf) {
                None | Some(true) => return Ok(()),
                Some(false) => last = v["replicas"].clone(),
            }
        }
        if t.elapsed() > Duration::from_secs(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!(
        "RF {rf}: skipped: replicas not in sync within 5 minutes: {last}"
    ))
}

/// The lab addresses of the nodes (from the lab's state), node1 first.
fn addresses(lab: &TestLab, nodes: &[&str]) -> Vec<String> {
    let st = lab.state().expect("lab.json");
    nodes
        .iter()
        .map(|n| {
            st["plan"]["nodes"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == *n))
                .and_then(|x| x["address"].as_str())
                .unwrap_or_else(|| panic!("no address of {n} in lab.json"))
                .to_string()
        })
        .collect()
}

pub fn run() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = arg("--runs", if quick { 2 } else { 5 }).max(1);
    let files = arg("--files", if quick { 5_000 } else { 30_000 }).max(PER_DIR);
    let fsync_ops = arg("--fsync-ops", if quick { 300 } else { 1000 }).max(10);
    let seq_mib = arg("--seq-mib", if quick { 256 } else { 1024 }).max(1);
    // Round 0 warms caches (the tarball is in the page cache from its making anyway).
    let warmup = arg("--warmup", 1).min(1);
    let wanted = arg_str("--targets").unwrap_or_else(|| "ext4,rf1,rf2,rf3,gluster".into());
    let want = |k: &str| wanted.split(',').any(|w| w == k);
    let bin = vessel_bin();

    if want("gluster") {
        if let Err(e) = gluster::ensure_packages() {
            eprintln!("vessel-bench repl: {e}");
            std::process::exit(2);
        }
    }
    // Drop order (reverse of declaration): the GlusterFS mount, then the lab, then the dir.
    let base = Dir(PathBuf::from(format!(
        "/var/tmp/vessel-bench-repl-{}",
        std::process::id()
    )));
    fs::create_dir_all(&base.0).expect("create the bench's temp dir");
    let tar = base.0.join("tree.tar");
    eprintln!("repl: generating the tarball ({files} files)");
    make_tarball(&base.0, &tar, files);

    let help = {
        let mut c = Command::new(&bin);
        c.args(["ve", "create", "--help"]);
        let o = run_bounded(c, Duration::from_secs(30));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let replicas_flag = offers_replicas(&help);

    let lab = TestLab::new(&bin);
    eprintln!("repl: lab {} up (3 nodes)", lab.name);
    lab.ok(&["up", "--nodes", "3"]);
    let nodes = ["node1", "node2", "node3"];
    let mut notes = Vec::new();
    let mut targets = Vec::new();
    {
        // ext4 is every ratio's denominator: always measured.
        let d = base.0.join("ext4");
        fs::create_dir_all(&d).expect("create the ext4 dir");
        targets.push(Target::new("ext4", "ext4 (host disk)".into(), Place::Host(d)));
    }
    let rfs: Vec<usize> = [1, 2, 3].into_iter().filter(|rf| want(&format!("rf{rf}"))).collect();
    if !rfs.is_empty() {
        eprintln!("repl: building the Debian template on the lab nodes");
        // Replicas need the template wherever they may be placed.
        let build_on: &[&str] = if replicas_flag && rfs.iter().any(|r| *r > 1) {
            &nodes
        } else {
            &nodes[..1]
        };
        for n in build_on {
            lab.vessel_ok(n, &["template", "build", "debian"]);
        }
    }
    for rf in rfs {
        let ve = format!("rf{rf}");
        match make_ve(&lab, "node1", &ve, rf, replicas_flag) {
            Ok(()) => targets.push(Target::new(
                &ve,
                format!("vessel-fs RF{rf} (VE on node1)"),
                Place::Ve {
                    node: "node1".into(),
                    ve: ve.clone(),
                },
            )),
            Err(e) => {
                eprintln!("repl: {e}");
                notes.push(e);
            }
        }
    }
    let gl = if want("gluster") {
        eprintln!("repl: GlusterFS replica 3 on the lab nodes");
        let addrs = addresses(&lab, &nodes);
        match Gluster::start(&lab, &nodes, &addrs, &base.0) {
            Ok(g) => {
                targets.push(Target::new(
                    "gluster",
                    "glusterfs replica 3 (FUSE)".into(),
                    Place::Host(g.mnt.clone()),
                ));
                Some(g)
            }
            Err(e) => {
                eprintln!("repl: glusterfs: {e}");
                notes.push(format!("glusterfs: skipped: {e}"));
                None
            }
        }
    } else {
        None
    };

    // What reaching a VE costs (in its untar figures): `lab exec` + `ve exec` of /bin/true.
    let mut reach = Vec::new();
    if let Some(t) = targets.iter().find(|t| matches!(t.place, Place::Ve { .. })) {
        for _ in 0..5 {
            reach.push(timed(&lab, t, "true", None).0 * 1000.0);
        }
    }

    let n = targets.len();
    for round in (1 - warmup)..=runs {
        let counted = round > 0;
        for k in order(round, n) {
            let t = &targets[k];
            let script = format!("mkdir -p {{DIR}}/u{round} && tar -C {{DIR}}/u{round} -xf - && sync");
            let (s, _) = timed(&lab, t, &script, Some(&tar));
            eprintln!("repl: round {round}: untar {:<30} {s:8.2} s", t.label);
            if counted {
                targets[k].untar.push(s);
            }
        }
        for k in order(round, n) {
            let t = &targets[k];
            let v = worker(&lab, t, "fsync", "fsync-test", fsync_ops);
            eprintln!("repl: round {round}: fsync {:<30} {v:8.0} IOPS", t.label);
            if counted {
                targets[k].fsync.push(v);
            }
        }
        for k in order(round, n) {
            let t = &targets[k];
            let v = worker(&lab, t, "seqw", "seq-test", seq_mib);
            timed(&lab, t, "rm -f {DIR}/seq-test {DIR}/fsync-test && sync", None);
            eprintln!("repl: round {round}: seqw  {:<30} {v:8.0} MB/s", t.label);
            if counted {
                targets[k].seqw.push(v);
            }
        }
    }

    let figs: Vec<(String, String, Figures)> = targets
        .iter_mut()
        .map(|t| (t.key.clone(), t.label.clone(), t.figures()))
        .collect();
    let ext4 = figs[0].2;
    let get = |k: &str| figs.iter().find(|f| f.0 == k).map(|f| f.2);
    println!();
    println!(
        "replicated file systems: {files} files untar + sync, 4 KiB write + fdatasync x{fsync_ops}, \
         {seq_mib} MiB write + fsync; medians of {runs} alternating rounds ({warmup} warm-up round not counted)"
    );
    println!(
        "{:<32} {:>9} {:>8} {:>11} {:>8} {:>14} {:>8}",
        "target", "untar s", "x ext4", "fsync IOPS", "x ext4", "seqwrite MB/s", "x ext4"
    );
    for (_, label, f) in &figs {
        let r = ratios(f, &ext4);
        println!(
            "{label:<32} {:>9.2} {:>8.2} {:>11.0} {:>8.2} {:>14.0} {:>8.2}",
            f.untar, r.untar, f.fsync, r.fsync, f.seqw, r.seqw
        );
    }
    for note in &notes {
        println!("note: {note}");
    }
    if !reach.is_empty() {
        println!(
            "note: VE rows include reaching the VE (`vessel lab exec` + `vessel ve exec` of /bin/true: median {:.0} ms) in each untar",
            median(&mut reach)
        );
    }
    println!("note: `sync` on a FUSE mount flushes what the kernel holds; whether GlusterFS makes it durable on its bricks is up to GlusterFS");
    let nan = Figures {
        untar: f64::NAN,
        fsync: f64::NAN,
        seqw: f64::NAN,
    };
    let rf1 = get("rf1").map(|f| ratios(&f, &ext4)).unwrap_or(nan);
    let rf3 = get("rf3").map(|f| ratios(&f, &ext4));
    let g = get("gluster").map(|f| ratios(&f, &ext4)).unwrap_or(nan);
    // Everything made is removed before the last line: mount, lab, temp dir.
    drop(gl);
    drop(lab);
    drop(base);
    println!("{}", last_line(rf3.as_ref(), &rf1, &g));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_goes_first_once_per_cycle() {
        let firsts: Vec<usize> = (0..4).map(|r| order(r, 4)[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 3]);
        for r in 0..4 {
            let mut o = order(r, 4);
            o.sort();
            assert_eq!(o, [0, 1, 2, 3], "round {r} runs every target once");
        }
    }

    #[test]
    fn replicas_flag_found_only_as_an_option() {
        assert!(offers_replicas("      --replicas <N>  copies of the volume (1-5)"));
        assert!(offers_replicas("  -r, --replicas=N"));
        assert!(!offers_replicas("      --template <T>\n  how many replicas you want"));
        assert!(!offers_replicas("      --min-replicas <M>"));
    }

    #[test]
    fn last_line_marks_rf1_standing_in_for_rf3() {
        let rf1 = Figures {
            untar: 2.0,
            fsync: 0.5,
            seqw: 0.25,
        };
        let g = Figures {
            untar: 155.0,
            fsync: 0.15,
            seqw: 0.3,
        };
        assert_eq!(
            last_line(None, &rf1, &g),
            "replicated vessel-fs RF3 (RF1: replication not built yet): untar x2.00 ext4, fsync x0.50 ext4, seqwrite x0.25 ext4; glusterfs r3: untar x155.00, fsync x0.15"
        );
        let rf3 = Figures {
            untar: 3.0,
            fsync: 0.6,
            seqw: 0.31,
        };
        assert_eq!(
            last_line(Some(&rf3), &rf1, &g),
            "replicated vessel-fs RF3: untar x3.00 ext4, fsync x0.60 ext4, seqwrite x0.31 ext4; glusterfs r3: untar x155.00, fsync x0.15"
        );
    }

    #[test]
    fn ratios_are_time_for_untar_and_rate_for_the_rest() {
        let ext4 = Figures {
            untar: 2.0,
            fsync: 5000.0,
            seqw: 1200.0,
        };
        let t = Figures {
            untar: 8.0,
            fsync: 2500.0,
            seqw: 400.0,
        };
        let r = ratios(&t, &ext4);
        assert_eq!((r.untar, r.fsync), (4.0, 0.5));
        assert!((r.seqw - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn waits_for_every_replica_in_sync_and_not_for_a_show_without_replicas() {
        let v = |states: &[&str]| serde_json::json!({"replicas": states.iter().map(|s| serde_json::json!({"node": "n", "state": s})).collect::<Vec<_>>()});
        assert_eq!(replicas_in_sync(&v(&["in-sync", "in-sync"]), 3), Some(true));
        assert_eq!(replicas_in_sync(&v(&["in-sync", "catching up"]), 3), Some(false));
        assert_eq!(replicas_in_sync(&v(&["in-sync"]), 3), Some(false));
        assert_eq!(replicas_in_sync(&v(&["InSync"]), 2), Some(true));
        assert_eq!(replicas_in_sync(&serde_json::json!({"name": "rf1"}), 2), None);
    }

    #[test]
    fn generated_files_are_small_and_varied() {
        let sizes: Vec<usize> = (0..1000).map(file_size).collect();
        assert!(sizes.iter().all(|s| (100..8100).contains(s)));
        let distinct: std::collections::BTreeSet<_> = sizes.iter().collect();
        assert!(distinct.len() > 500);
    }
}
