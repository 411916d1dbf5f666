//! A real Debian 12 VE: sysvinit runs the VE's services, dpkg installs packages, OS
//! parameters (root password, SSH keys, DNS) land in the VE's own files.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A small .deb with a sysvinit service that records that it started at boot.
fn build_deb(dir: &std::path::Path) -> std::path::PathBuf {
    let pkg = dir.join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(pkg.join("etc/init.d")).unwrap();
    std::fs::create_dir_all(pkg.join("usr/local/bin")).unwrap();
    std::fs::write(pkg.join("DEBIAN/control"), "Package: vessel-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: Vessel tests <t@example.invalid>\nDescription: test service\n").unwrap();
    let postinst = "#!/bin/sh\nset -e\nupdate-rc.d vessel-hello defaults >/dev/null\n";
    std::fs::write(pkg.join("DEBIAN/postinst"), postinst).unwrap();
    let service = "#!/bin/sh\n### BEGIN INIT INFO\n# Provides: vessel-hello\n# Required-Start: $local_fs\n# Required-Stop: $local_fs\n# Default-Start: 2 3 4 5\n# Default-Stop: 0 1 6\n# Short-Description: test\n### END INIT INFO\ncase \"$1\" in start) date > /run/vessel-hello.started ;; esac\nexit 0\n";
    std::fs::write(pkg.join("etc/init.d/vessel-hello"), service).unwrap();
    std::fs::write(
        pkg.join("usr/local/bin/hello-vessel"),
        "#!/bin/sh\necho hello from a package\n",
    )
    .unwrap();
    for f in [
        "DEBIAN/postinst",
        "etc/init.d/vessel-hello",
        "usr/local/bin/hello-vessel",
    ] {
        Command::new("chmod").arg("0755").arg(pkg.join(f)).status().unwrap();
    }
    let deb = dir.join("vessel-hello.deb");
    let st = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&pkg)
        .arg(&deb)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    deb
}

#[test]
fn debian_ve_runs_its_services_and_packages() {
    if !need_root("debian_ve_runs_its_services_and_packages") {
        return;
    }
    let node = start("deb");
    // First build on a machine runs debootstrap; later ones reuse the cached tree.
    let built = node.ok(&["template", "build", "debian"]);
    assert!(built.contains("template debian built"), "{built}");
    let key = node.root.join("key.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE0vZ/testkeyforvessel test@vessel\n",
    )
    .unwrap();
    let hash = "$6$vessel$0YQq0tmMn8p7Qc3zJ8wXvFf1m8N5o8B7V8b2xE3cH1dQ5b7Y6p4m0W1n2v3c4x5z6a7s8d9f0g1h2j3k4l5";
    node.ok(&[
        "ve",
        "create",
        "deb",
        "-t",
        "debian",
        "--memory",
        "512M",
        "--root-password-hash",
        hash,
        "--ssh-key",
        key.to_str().unwrap(),
        "--dns",
        "192.0.2.53",
        "--start",
    ]);

    assert_eq!(node.sh("deb", "id -u").trim(), "0");
    assert!(node.sh("deb", "cat /etc/debian_version").starts_with("12"));
    assert_eq!(node.sh("deb", "cat /proc/1/comm").trim(), "init");
    wait_until("sysvinit to reach runlevel 2", Duration::from_secs(60), || {
        node.exec("deb", "runlevel").status.success() && out(&node.exec("deb", "runlevel")).contains('2')
    });
    assert_eq!(node.sh("deb", "hostname").trim(), "deb");
    assert!(node.sh("deb", "grep ^root: /etc/shadow").contains(hash));
    assert!(node.sh("deb", "cat /root/.ssh/authorized_keys").contains("test@vessel"));
    assert_eq!(
        node.sh("deb", "stat -c %a:%u /root/.ssh/authorized_keys").trim(),
        "600:0"
    );
    assert!(node.sh("deb", "cat /etc/resolv.conf").contains("nameserver 192.0.2.53"));
    let n: usize = node.sh("deb", "dpkg-query -W | wc -l").trim().parse().unwrap();
    assert!(n > 80, "only {n} packages in the Debian VE");

    // dpkg installs a package from a .deb copied in through exec's stdin.
    let deb = build_deb(&node.root);
    let mut cmd = node.command();
    cmd.args([
        "ve",
        "exec",
        "deb",
        "--",
        "sh",
        "-c",
        "cat > /root/hello.deb && dpkg -i /root/hello.deb",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&std::fs::read(&deb).unwrap())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "dpkg -i failed: {}{}", out(&o), err(&o));
    assert_eq!(node.sh("deb", "hello-vessel").trim(), "hello from a package");
    assert!(node
        .sh("deb", "dpkg -s vessel-hello")
        .contains("Status: install ok installed"));

    // The init runs the package's service at the next boot.
    node.ok(&["ve", "restart", "deb"]);
    wait_until(
        "the package's service to start at boot",
        Duration::from_secs(60),
        || node.exec("deb", "test -s /run/vessel-hello.started").status.success(),
    );
    // Clean shutdown through the init (SIGPWR → runlevel 0), within the timeout.
    let t = std::time::Instant::now();
    node.ok(&["ve", "stop", "deb", "--timeout", "30"]);
    assert!(node.mounts().is_empty());
    eprintln!("debian VE stopped in {:?}", t.elapsed());
}

/// Feed `input` to a command run in the VE; returns its output.
fn exec_with_stdin(node: &TestNode, ve: &str, script: &str, input: &[u8]) -> std::process::Output {
    let mut cmd = node.command();
    cmd.args(["ve", "exec", ve, "--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let o = child.wait_with_output().unwrap();
    let _ = feeder.join();
    o
}

fn now_arg() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    format!("@{t:.3}")
}

#[test]
fn debian_workloads_then_remote_repair() {
    if !need_root("debian_workloads_then_remote_repair") {
        return;
    }
    let node = start("work");
    node.ok(&["template", "build", "debian"]);
    node.ok(&["ve", "create", "work", "-t", "debian", "--memory", "768M", "--start"]);
    wait_until("sysvinit to reach runlevel 2", Duration::from_secs(60), || {
        out(&node.exec("work", "runlevel")).contains('2')
    });

    // dpkg installs sqlite3 from .deb files (fetched by the host from its Debian mirror).
    let debs = node.root.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let download = || {
        let mut c = Command::new("apt-get");
        c.args(["download", "sqlite3", "libsqlite3-0", "libreadline8", "readline-common"])
            .current_dir(&debs);
        run_bounded(c, Duration::from_secs(300))
    };
    let mut dl = download();
    if !dl.status.success() {
        // The host's package lists may be missing: fetch them once.
        let mut c = Command::new("apt-get");
        c.args(["update", "-qq"]);
        run_bounded(c, Duration::from_secs(300));
        dl = download();
    }
    assert!(dl.status.success(), "apt-get download sqlite3: {}", err(&dl));
    for e in std::fs::read_dir(&debs).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let o = exec_with_stdin(
            &node,
            "work",
            &format!("cat > /root/{name}"),
            &std::fs::read(&p).unwrap(),
        );
        assert!(o.status.success(), "{}", err(&o));
    }
    let o = node.exec("work", "dpkg -i /root/*.deb");
    assert!(o.status.success(), "dpkg -i: {}{}", out(&o), err(&o));
    assert!(node.sh("work", "sqlite3 --version").starts_with("3."));

    // sqlite3 under load: four concurrent writers on a WAL database (shared mmap of the
    // -shm file across processes), then an integrity check.
    let o = node.exec(
        "work",
        "cd /root && sqlite3 db 'pragma journal_mode=wal; create table t(i integer, w text)' >/dev/null && \
         for w in 1 2 3 4; do (i=0; while [ $i -lt 150 ]; do \
           sqlite3 -cmd '.timeout 10000' db \"insert into t values($i, 'w$w')\" || exit 1; i=$((i+1)); done) & done; \
         wait; sqlite3 db 'pragma integrity_check; select count(*) from t'",
    );
    assert!(o.status.success(), "sqlite load: {}{}", out(&o), err(&o));
    assert_eq!(out(&o).split_whitespace().collect::<Vec<_>>(), ["ok", "600"]);
    // A rollback-journal database with fsyncs per transaction too.
    let o = node.exec(
        "work",
        "cd /root && sqlite3 j.db 'create table k(v)' && i=0; while [ $i -lt 100 ]; do \
         sqlite3 j.db \"insert into k values($i)\"; i=$((i+1)); done; sqlite3 j.db 'pragma integrity_check; select sum(v) from k'",
    );
    assert_eq!(
        out(&o).split_whitespace().collect::<Vec<_>>(),
        ["ok", "4950"],
        "{}",
        err(&o)
    );
    let before_untar = now_arg();
    std::thread::sleep(Duration::from_millis(50));

    // A large untar: 20,000 small files in 200 directories.
    let src = node.root.join("tree");
    for d in 0..200 {
        let dir = src.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(
                dir.join(format!("f{f:03}.txt")),
                format!("file {d}/{f}\n").repeat(f + 1),
            )
            .unwrap();
        }
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&src)
        .args(["-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    let o = exec_with_stdin(
        &node,
        "work",
        "mkdir -p /srv/tree && tar -C /srv/tree -xf - && sync",
        &tar.stdout,
    );
    assert!(o.status.success(), "untar: {}", err(&o));
    assert_eq!(node.sh("work", "find /srv/tree -type f | wc -l").trim(), "20000");
    assert_eq!(node.sh("work", "cat /srv/tree/d123/f004.txt"), "file 123/4\n".repeat(5));

    // diff against the template: the package's files added, dpkg's database modified.
    let diff = node.json(&["ve", "diff", "work"]);
    let entries = diff.as_array().unwrap();
    let find = |p: &str| entries.iter().find(|e| e["path"] == p).map(|e| e["change"].clone());
    assert_eq!(find("/usr/bin/sqlite3"), Some("added".into()));
    assert_eq!(find("/var/lib/dpkg/status"), Some("modified".into()));
    assert_eq!(
        node.json(&["ve", "diff", "work", "/srv/tree"])
            .as_array()
            .unwrap()
            .len(),
        20_201
    );
    let h = node.json(&["ve", "history", "work", "/root/db"]);
    assert!(h
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["what"].as_str().unwrap().starts_with("create")));

    // revert one file on the running VE.
    let passwd = node.sh("work", "cat /etc/passwd");
    let good = now_arg();
    std::thread::sleep(Duration::from_millis(50));
    node.sh("work", "echo 'garbage' > /etc/passwd; sync");
    assert!(!node.exec("work", "id root").status.success() || node.sh("work", "cat /etc/passwd") == "garbage\n");
    node.ok(&["ve", "revert", "work", "/etc/passwd", "--to", &good]);
    assert_eq!(node.sh("work", "cat /etc/passwd"), passwd);
    // ... and one back to the template's version.
    node.sh("work", "echo changed >> /etc/debian_version");
    node.ok(&["ve", "revert", "work", "/etc/debian_version", "--template"]);
    assert!(!node.sh("work", "cat /etc/debian_version").contains("changed"));

    // rollback of the whole VE to before the untar: the tree is gone, sqlite3 stays.
    node.ok(&["ve", "rollback", "work", "--to", &before_untar]);
    assert_eq!(node.json(&["ve", "show", "work"])["status"], "running");
    assert!(!node.exec("work", "test -e /srv/tree").status.success());
    assert!(node.sh("work", "sqlite3 /root/db 'select count(*) from t'").trim() == "600");

    // rescue: a VE whose init is gone boots from the pristine template; fix it from there.
    node.sh("work", "rm /sbin/init");
    node.ok(&["ve", "stop", "work"]);
    assert!(
        node.vessel(&["ve", "start", "work"]).status.code() != Some(0) || {
            std::thread::sleep(Duration::from_secs(2));
            node.json(&["ve", "show", "work"])["status"] != "running"
        }
    );
    let _ = node.vessel(&["ve", "stop", "work"]);
    node.ok(&["ve", "rescue", "work"]);
    assert_eq!(node.json(&["ve", "show", "work"])["rescue"], true);
    assert!(node.exec("work", "test -x /sbin/init").status.success());
    assert!(!node.exec("work", "test -e /mnt/ve/sbin/init").status.success());
    node.sh("work", "cp -a /sbin/init /mnt/ve/sbin/init");
    node.ok(&["ve", "rescue", "--end", "work"]);
    wait_until("the repaired VE to boot", Duration::from_secs(60), || {
        out(&node.exec("work", "runlevel")).contains('2')
    });
    assert_eq!(
        node.sh("work", "sqlite3 /root/db 'select count(*) from t'").trim(),
        "600"
    );
}
