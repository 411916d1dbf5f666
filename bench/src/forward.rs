//! `vessel-bench forward [--runs 20] [--mib 50]`: VE calls carried to another node against
//! the same calls on the VE's own node, on a 3-node `vessel lab` (busybox VE on node2).
//!
//! Both are timed from this process through each daemon's API socket (a path, so no lab
//! address is touched from the host), so neither pays a process start:
//! 1. `ve exec /bin/true` (stdio `/dev/null`): node1 (TLS connect, the request, the
//!    two-way stream, the exec on node2, `Exit`) vs node2 itself, alternating, medians.
//! 2. `ve export` of the stopped VE with `--mib` MiB of random files into a file on the
//!    host: node1 (the tar streamed over TLS) vs node2 itself, alternating, medians, MB/s.
//!
//! Last line: `forward: exec remote/local = R, export remote/local = E`.

use crate::{arg, median, vessel_bin};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;
use vessel_testkit::lab::TestLab;
use vessel_types::api::{Request, Response};
use vessel_types::Name;

fn exec_true(socket: &Path, ve: &Name) -> f64 {
    let null = || {
        std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap()
    };
    let (i, o, e) = (null(), null(), null());
    let t = Instant::now();
    let c = vessel_api::Client::connect(socket).expect("the daemon's socket");
    let req = Request::VeExec {
        name: ve.clone(),
        argv: vec!["/bin/true".into()],
        tty: false,
        env: vec![],
        cwd: None,
    };
    c.send(&req, &[i.as_raw_fd(), o.as_raw_fd(), e.as_raw_fd()]).unwrap();
    match c.recv().unwrap().0 {
        Response::ExecStarted => {}
        r => panic!("exec: {r:?}"),
    }
    match c.recv().unwrap().0 {
        Response::Exit { code: 0 } => {}
        r => panic!("exec: {r:?}"),
    }
    t.elapsed().as_secs_f64() * 1000.0
}

/// Seconds for one export into `out`, and its size.
fn export(socket: &Path, ve: &Name, out: &Path) -> (f64, u64) {
    let f = std::fs::File::create(out).unwrap();
    let t = Instant::now();
    let c = vessel_api::Client::connect(socket).expect("the daemon's socket");
    c.send(&Request::VeExport { name: ve.clone() }, &[f.as_raw_fd()])
        .unwrap();
    match c.recv().unwrap().0 {
        Response::Ok => {}
        r => panic!("export: {r:?}"),
    }
    let s = t.elapsed().as_secs_f64();
    let len = std::fs::metadata(out).unwrap().len();
    std::fs::remove_file(out).unwrap();
    (s, len)
}

pub fn run() {
    let runs = arg("--runs", 20).max(1);
    let mib = arg("--mib", 50).max(1);
    let lab = TestLab::new(&vessel_bin());
    eprintln!("forward: lab up (3 nodes)");
    lab.ok(&["up", "--nodes", "3"]);
    lab.vessel_ok("node2", &["template", "build", "busybox"]);
    lab.vessel_ok(
        "node1",
        &[
            "ve",
            "create",
            "fwd",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node2",
        ],
    );
    let ve = Name::parse("fwd").unwrap();
    let (s1, s2) = (lab.socket("node1"), lab.socket("node2"));
    exec_true(&s1, &ve);
    exec_true(&s2, &ve);
    let (mut remote, mut local) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        remote.push(exec_true(&s1, &ve));
        local.push(exec_true(&s2, &ve));
    }
    let (er, el) = (median(&mut remote), median(&mut local));

    lab.vessel_ok(
        "node2",
        &[
            "ve",
            "exec",
            "fwd",
            "--",
            "sh",
            "-c",
            &format!("for i in $(seq 1 {mib}); do dd if=/dev/urandom of=/root/f$i bs=1M count=1 2>/dev/null; done"),
        ],
    );
    lab.vessel_ok("node1", &["ve", "stop", "fwd"]);
    let dir = tempfile::Builder::new().prefix("vessel-bench-fwd-").tempdir().unwrap();
    let out = dir.path().join("export.tar");
    export(&s1, &ve, &out);
    let (mut tr, mut tl, mut size) = (Vec::new(), Vec::new(), 0);
    let xruns = (runs / 4).max(3);
    for _ in 0..xruns {
        let (s, n) = export(&s1, &ve, &out);
        tr.push(s);
        let (s, m) = export(&s2, &ve, &out);
        tl.push(s);
        assert_eq!(n, m, "the exports differ in size");
        size = n;
    }
    let (xr, xl) = (median(&mut tr), median(&mut tl));
    let mb = size as f64 / 1e6;
    println!("{:<34} {:>12} {:>12}", "", "from node1", "on node2");
    println!(
        "{:<34} {:>9.2} ms {:>9.2} ms",
        format!("exec /bin/true (median of {runs})"),
        er,
        el
    );
    println!(
        "{:<34} {:>7.0} MB/s {:>7.0} MB/s",
        format!("export {mb:.0} MB (median of {xruns})"),
        mb / xr,
        mb / xl
    );
    println!(
        "forward: exec remote/local = {:.2}, export remote/local = {:.2}",
        er / el,
        xr / xl
    );
}
