//! Real busybox VEs on a real daemon: identity, isolation, network, limits, lifecycle.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn ves_are_isolated_servers_with_their_own_root() {
    if !need_root("ves_are_isolated_servers_with_their_own_root") {
        return;
    }
    let node = start("iso");
    node.ensure_busybox();
    node.ok(&[
        "ve",
        "create",
        "alpha",
        "-t",
        "busybox",
        "--hostname",
        "alpha.example",
        "--start",
    ]);
    node.ok(&["ve", "create", "beta", "-t", "busybox", "--start"]);

    // Root inside, a different unprivileged uid on the host, unique per VE.
    assert_eq!(node.sh("alpha", "id -u").trim(), "0");
    assert_eq!(node.sh("beta", "id -u").trim(), "0");
    let (ua, ub) = (host_uid_of(node.ve_pid("alpha")), host_uid_of(node.ve_pid("beta")));
    assert_ne!(ua, 0, "VE root must not be host root");
    assert_ne!(ub, 0);
    assert_ne!(ua, ub, "two VEs must not share a host uid range");
    let show = node.json(&["ve", "show", "alpha"]);
    assert_eq!(show["uid_base"].as_u64(), Some(ua as u64));

    // Template files belong to the VE's root (id-mapped template, no per-VE copy).
    assert_eq!(
        node.sh("alpha", "stat -c %u:%g /etc/passwd /bin/busybox").trim(),
        "0:0\n0:0"
    );
    node.sh(
        "alpha",
        "echo 'x:x:1000:1000::/home/x:/bin/sh' >> /etc/passwd && chown 1000 /tmp && stat -c %u /tmp",
    );
    assert!(
        !node.sh("beta", "cat /etc/passwd").contains("x:x:1000"),
        "a VE's change must not leak into the template"
    );

    // Own hostname, own PID 1, no host processes.
    assert_eq!(node.sh("alpha", "hostname").trim(), "alpha.example");
    assert_eq!(node.sh("beta", "hostname").trim(), "beta");
    assert_eq!(node.sh("alpha", "cat /proc/1/comm").trim(), "init");
    let procs: usize = node.sh("alpha", "ls -d /proc/[0-9]* | wc -l").trim().parse().unwrap();
    assert!(procs < 10, "VE sees {procs} processes: host processes leak in");
    let daemon = node.daemon_pid().unwrap();
    let o = node.exec(
        "alpha",
        &format!("test -e /proc/{daemon}/cmdline && grep -q vessel /proc/{daemon}/cmdline"),
    );
    assert!(!o.status.success(), "the host daemon is visible from inside the VE");

    // Cannot reach the host's disks: no device nodes, cannot make one, cannot mount one.
    let dev = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root_dev = dev
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .and_then(|l| l.split(' ').nth(2))
        .unwrap()
        .to_string();
    let (maj, min) = root_dev.split_once(':').unwrap();
    let o = node.exec("alpha", &format!("mknod /tmp/disk b {maj} {min}"));
    assert!(!o.status.success(), "mknod of the host disk must fail");
    let o = node.exec(
        "alpha",
        "mkdir -p /mnt/h && mount /dev/vda /mnt/h || mount -t ext4 /dev/vda /mnt/h",
    );
    assert!(!o.status.success(), "mounting the host disk must fail");
    let o = node.exec(
        "alpha",
        "mount -t proc proc /mnt && umount /mnt; mount -t ext4 none /mnt",
    );
    assert!(!o.status.success());
    assert_eq!(
        node.sh("alpha", "ls /dev | tr '\\n' ' '")
            .split_whitespace()
            .filter(|d| d.starts_with("vd") || d.starts_with("sd"))
            .count(),
        0
    );

    // Network: each VE has its own address; they reach each other (from inside only).
    let ip_b = node.json(&["ve", "show", "beta"])["spec"]["ip"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    node.sh("alpha", &format!("ping -c 1 -W 2 {ip_b}"));
    assert!(node.sh("beta", "ip -4 -o addr show eth0").contains(&ip_b));
    assert!(node.sh("beta", "ip -o link").contains("lo:"));

    // exec passes stdout, stderr and the exit code through.
    let o = node.exec("alpha", "echo out; echo err >&2; exit 7");
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(out(&o), "out\n");
    assert_eq!(err(&o), "err\n");
    // Regression: the helper's two reports (started, exited) can reach the daemon in one
    // read; they are framed, so back-to-back short execs never fail.
    for i in 0..40 {
        let o = node.vessel(&["ve", "exec", "alpha", "--", "true"]);
        assert!(o.status.success(), "quick exec {i} failed: {}", err(&o));
    }
    let o = node.vessel(&["ve", "exec", "alpha", "--", "no-such-command"]);
    assert_eq!(o.status.code(), Some(127));

    // list shows both, as a table and as JSON.
    let table = node.ok(&["ve", "list"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("alpha") && table.contains("beta") && table.contains("running"));
    assert_eq!(node.json(&["ve", "list"]).as_array().unwrap().len(), 2);
}

#[test]
fn limits_are_enforced_and_change_live() {
    if !need_root("limits_are_enforced_and_change_live") {
        return;
    }
    let node = start("lim");
    node.ensure_busybox();
    node.ok(&[
        "ve", "create", "lim", "-t", "busybox", "--memory", "64M", "--pids", "48", "--cpus", "0.5", "--start",
    ]);
    let init = node.ve_pid("lim");

    // An allocation past the cap is OOM-killed inside the VE; the VE survives.
    let o = node.exec("lim", "head -c 200m /dev/zero | tail -n 1 > /dev/null; echo status=$?");
    assert!(
        out(&o).contains("status=137") || !o.status.success(),
        "allocation past the limit was not killed: {}",
        out(&o)
    );
    assert_eq!(
        node.ve_pid("lim"),
        init,
        "the VE's init must survive an OOM kill inside it"
    );
    assert_eq!(node.sh("lim", "echo alive").trim(), "alive");

    // The pids cap stops a fork bomb; the VE survives.
    let o = node.exec("lim", "i=0; while [ $i -lt 80 ]; do sleep 3 & i=$((i+1)); done; wait");
    assert!(
        err(&o).contains("can't fork") || !o.status.success(),
        "pids limit not enforced: {}",
        err(&o)
    );
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(node.sh("lim", "echo alive").trim(), "alive");

    // Limits are in the cgroups, and `set` changes them while the VE runs.
    let cg = node.cgroup_dirs("lim");
    let read = |ctrl: &str, f: &str| {
        cg.iter()
            .find(|d| d.starts_with(format!("/sys/fs/cgroup/{ctrl}")))
            .map(|d| std::fs::read_to_string(d.join(f)).unwrap().trim().to_string())
    };
    if let Some(v) = read("pids", "pids.max") {
        assert_eq!(v, "48");
        assert_eq!(
            read("memory", "memory.limit_in_bytes").unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us").unwrap(), "50000");
        node.ok(&["ve", "set", "lim", "--pids", "200", "--memory", "96M", "--cpus", "1.5"]);
        assert_eq!(read("pids", "pids.max").unwrap(), "200");
        assert_eq!(
            read("memory", "memory.limit_in_bytes").unwrap(),
            (96u64 << 20).to_string()
        );
        assert_eq!(read("cpu", "cpu.cfs_quota_us").unwrap(), "150000");
    } else {
        let d = &cg[0];
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap().trim(), "48");
        node.ok(&["ve", "set", "lim", "--pids", "200"]);
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap().trim(), "200");
    }
    // The hostname changes live too (kernel and /etc/hostname), without a restart.
    node.ok(&["ve", "set", "lim", "--hostname", "renamed"]);
    assert_eq!(node.sh("lim", "hostname; cat /etc/hostname").trim(), "renamed\nrenamed");
    assert_eq!(node.json(&["ve", "show", "lim"])["restart_pending"], false);
    assert_eq!(node.ve_pid("lim"), init, "live limit changes must not restart the VE");
    let show = node.json(&["ve", "show", "lim"]);
    assert_eq!(show["spec"]["limits"]["pids_max"].as_u64(), Some(200));
    // The new pids cap applies: 80 sleepers now fit.
    node.sh("lim", "i=0; while [ $i -lt 80 ]; do sleep 1 & i=$((i+1)); done; wait");
}

#[test]
fn stop_start_destroy_leave_nothing_behind() {
    if !need_root("stop_start_destroy_leave_nothing_behind") {
        return;
    }
    let node = start("life");
    node.ensure_busybox();
    node.ok(&["ve", "create", "life", "-t", "busybox", "--start"]);
    node.sh("life", "echo kept > /root/file");
    let ve_dir = node.root.join("ves/life");
    assert_eq!(node.mounts().len(), 1, "one mount per running VE: {:?}", node.mounts());
    assert!(!node.cgroup_dirs("life").is_empty());
    // The VE's own host-side veth (other tests add and remove theirs meanwhile).
    let host_if = node.json(&["ve", "show", "life"])["host_interface"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(node.link_exists(&host_if), "no host veth {host_if}");

    node.ok(&["ve", "stop", "life"]);
    assert!(node.mounts().is_empty(), "stop left mounts: {:?}", node.mounts());
    assert!(
        node.cgroup_dirs("life").is_empty(),
        "stop left cgroups: {:?}",
        node.cgroup_dirs("life")
    );
    assert!(!node.link_exists(&host_if), "stop must remove the VE's veth {host_if}");
    assert_eq!(node.json(&["ve", "show", "life"])["status"], "stopped");
    node.fails(&["ve", "exec", "life", "--", "true"]);

    // Files survive stop/start; restart works.
    node.ok(&["ve", "start", "life"]);
    assert_eq!(node.sh("life", "cat /root/file").trim(), "kept");
    let p1 = node.ve_pid("life");
    node.ok(&["ve", "restart", "life"]);
    assert_ne!(node.ve_pid("life"), p1);

    node.ok(&["ve", "destroy", "--force", "life"]);
    assert!(!path_exists(&ve_dir), "destroy left {ve_dir:?}");
    assert!(node.mounts().is_empty());
    assert!(node.cgroup_dirs("life").is_empty());
    assert!(node.json(&["ve", "list"]).as_array().unwrap().is_empty());
    assert!(!node.root.join("run/life").exists(), "runtime state left behind");
}

#[test]
fn bad_input_gets_clear_errors_and_creates_nothing() {
    if !need_root("bad_input_gets_clear_errors_and_creates_nothing") {
        return;
    }
    let node = start("bad");
    node.ensure_busybox();
    // Every refusal: non-zero exit and one line that starts with "vessel: ".
    let fails = |args: &[&str]| {
        let e = node.fails(args);
        assert!(
            e.starts_with("vessel: ") && e.trim_end().lines().count() == 1,
            "not a one-line error: {e:?}"
        );
        e
    };
    let e = fails(&["ve", "create", "Bad_Name", "-t", "busybox"]);
    assert!(
        e.contains("must start with a lowercase letter") || e.contains("lowercase"),
        "{e}"
    );
    let e = fails(&["ve", "create", "ok", "-t", "nosuch"]);
    assert!(
        e.contains("template 'nosuch' not found") && e.contains("vessel template build"),
        "{e}"
    );
    let e = fails(&["ve", "create", "ok", "-t", "busybox", "--memory", "1M"]);
    assert!(e.contains("below the minimum"), "{e}");
    let e = fails(&["ve", "create", "ok", "-t", "busybox", "--memory", "lots"]);
    assert!(e.contains("bad size"), "{e}");
    let e = fails(&["ve", "create", "ok", "-t", "busybox", "--cpus", "0"]);
    assert!(e.contains("cpus"), "{e}");
    let e = fails(&["ve", "create", "ok", "-t", "busybox", "--ip", "192.0.2.5/24"]);
    assert!(e.contains("outside the node subnet"), "{e}");
    node.ok(&["ve", "create", "ok", "-t", "busybox"]);
    let e = fails(&["ve", "create", "ok", "-t", "busybox"]);
    assert!(e.contains("already exists"), "{e}");
    let ip = node.json(&["ve", "show", "ok"])["spec"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    let e = fails(&["ve", "create", "dup", "-t", "busybox", "--ip", &ip]);
    assert!(e.contains("already used by VE 'ok'"), "{e}");
    let e = fails(&["ve", "exec", "ok", "--", "true"]);
    assert!(e.contains("not running") && e.contains("vessel ve start ok"), "{e}");
    let e = fails(&["ve", "show", "ghost"]);
    assert!(e.contains("VE 'ghost' not found"), "{e}");
    let e = fails(&["ve", "set", "ok"]);
    assert!(e.contains("nothing to change"), "{e}");
    let e = fails(&["template", "remove", "busybox"]);
    assert!(e.contains("used by VE(s) ok"), "{e}");
    // Nothing half-created.
    assert!(!node.root.join("ves/dup").exists() && !node.root.join("ves/Bad_Name").exists());
    assert_eq!(node.json(&["ve", "list"]).as_array().unwrap().len(), 1);

    // Garbage on the socket gets an error reply; the daemon lives on.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(node.socket()).unwrap();
    s.write_all(&[0, 0, 0, 5, b'{', b'x', b'x', b'x', b'}']).unwrap();
    let mut buf = vec![0u8; 4096];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("invalid-argument"));
    node.ok(&["status"]);

    // A CLI without a daemon says how to start one.
    let mut cmd = std::process::Command::new(vessel_bin());
    cmd.env("VESSEL_ROOT", node.root.join("nowhere")).args(["ve", "list"]);
    let o = run_bounded(cmd, Duration::from_secs(20));
    assert!(!o.status.success());
    assert!(
        err(&o).contains("not running") && err(&o).contains("vessel up"),
        "{}",
        err(&o)
    );
}
