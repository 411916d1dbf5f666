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
