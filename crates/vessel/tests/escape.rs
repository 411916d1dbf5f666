//! The escape battery: root inside a VE acting as an attacker against the host, other VEs
//! and the admin. Every test performs the attack and asserts that it fails. Tests named
//! after a hole are its regression tests (issue 7); `escape_battery_*` runs the classic
//! container escapes. Network spoofing, crafted imports, deep trees and sparse files, and
//! the API boundary have their own files: `escape_net.rs`, `escape_fs.rs`, `escape_api.rs`.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn exec_tty(node: &TestNode, ve: &str, input: &[u8]) -> Result<String, String> {
    node.exec_tty(ve, &[], None, input).map(|(out, _)| out)
}

fn history(node: &TestNode, ve: &str, path: &str) -> String {
    node.ok(&["ve", "history", ve, path])
}

/// Run `cmd` on the host as user nobody (uid/gid 65534, no groups).
fn as_nobody(cmd: &str) -> std::process::Output {
    let mut c = std::process::Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", cmd]);
    run_bounded(c, Duration::from_secs(20))
}

fn mount_options(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = mountpoint.to_str().unwrap();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want))
        .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
}

#[test]
fn exec_tty_never_opens_a_ptmx_the_ve_planted() {
    if !need_root("exec_tty_never_opens_a_ptmx_the_ve_planted") {
        return;
    }
    let node = start("ptmx");
    node.ensure_busybox();
    node.ok(&["ve", "create", "atk", "-t", "busybox", "--start"]);
    node.ok(&["ve", "create", "vic", "-t", "busybox", "--start"]);
    assert!(exec_tty(&node, "atk", b"echo tty-$((6*7)); exit\n")
        .unwrap()
        .contains("tty-42"));

    // The attacker points its /dev/ptmx at host paths: another VE's file through the host
    // side of its mount, a host file that exists, and one that does not.
    let victim_file = node.root.join("ves/vic/rootfs/etc/inittab");
    let host_secret = node.root.join("host-secret");
    std::fs::write(&host_secret, "secret").unwrap();
    let before = history(&node, "vic", "/etc/inittab");
    let mut errors = Vec::new();
    for target in [
        victim_file.display().to_string(),
        host_secret.display().to_string(),
        node.root.join("no-such-file").display().to_string(),
    ] {
        node.sh("atk", &format!("rm -f /dev/ptmx && ln -s {target} /dev/ptmx"));
        match exec_tty(&node, "atk", b"exit\n") {
            Ok(out) => panic!("a terminal through a planted /dev/ptmx -> {target}: {out:?}"),
            Err(e) => errors.push(e.replace(&target, "TARGET")),
        }
    }
    // The path was resolved inside the attacker's own tree: nothing of the victim changed,
    // and the answers do not tell which host paths exist.
    assert_eq!(
        history(&node, "vic", "/etc/inittab"),
        before,
        "the victim VE's log was written"
    );
    assert!(
        !node.ok(&["ve", "diff", "vic"]).contains("/etc/inittab"),
        "the victim VE's file was copied up"
    );
    assert_eq!(std::fs::read_to_string(&host_secret).unwrap(), "secret");
    assert!(
        errors.iter().all(|e| e == &errors[0]),
        "errors differ by host path (a probe): {errors:?}"
    );
    // A FIFO in its place must not hang the helper or the daemon.
    node.sh("atk", "rm -f /dev/ptmx && mkfifo /dev/ptmx");
    assert!(exec_tty(&node, "atk", b"exit\n").is_err());
    // Repaired inside the VE, terminals work again.
    node.sh("atk", "rm -f /dev/ptmx && ln -s pts/ptmx /dev/ptmx");
    assert!(exec_tty(&node, "atk", b"echo back-$((6*7)); exit\n")
        .unwrap()
        .contains("back-42"));
}

#[test]
fn ve_set_through_planted_symlinks_stays_inside_the_ve() {
    if !need_root("ve_set_through_planted_symlinks_stays_inside_the_ve") {
        return;
    }
    let node = start("oscfg");
    node.ensure_busybox();
    node.ok(&["ve", "create", "sym", "-t", "busybox", "--start"]);
    let probe = format!("/tmp/vessel-escape-probe-{}", node.id);
    let _ = std::fs::remove_file(&probe);
    // Absolute and ../ symlinks aimed at the host; a FIFO where the daemon writes.
    node.sh(
        "sym",
        &format!(
            "ln -sf /../../../../..{probe} /etc/hostname && ln -sf {probe}-hosts /etc/hosts && \
             rm -f /etc/resolv.conf && mkfifo /etc/resolv.conf && \
             mkdir -p /root && rm -rf /root/.ssh && ln -s ../../../../../tmp /root/.ssh"
        ),
    );
    let key = node.root.join("key.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEscapeTestKeyOnly escape@test\n",
    )
    .unwrap();
    node.ok(&[
        "ve",
        "set",
        "sym",
        "--hostname",
        "planted.example",
        "--dns",
        "192.0.2.53",
        "--ssh-key",
        key.to_str().unwrap(),
    ]);
    for p in [
        probe.clone(),
        format!("{probe}-hosts"),
        "/tmp/authorized_keys".to_string(),
    ] {
        if p == "/tmp/authorized_keys" {
            // The host's /tmp may hold one of its own: it must not be ours.
            if let Ok(s) = std::fs::read_to_string(&p) {
                assert!(!s.contains("EscapeTestKeyOnly"), "host {p} written");
            }
        } else {
            assert!(!Path::new(&p).exists(), "host file {p} was written");
        }
    }
    // Written inside the VE instead, where its own links lead.
    assert_eq!(node.sh("sym", &format!("cat {probe}")).trim(), "planted.example");
    assert!(node
        .sh("sym", &format!("cat {probe}-hosts"))
        .contains("planted.example"));
    assert_eq!(
        node.sh("sym", "test -f /etc/resolv.conf && cat /etc/resolv.conf")
            .trim(),
        "nameserver 192.0.2.53"
    );
    assert!(node.sh("sym", "cat /tmp/authorized_keys").contains("EscapeTestKeyOnly"));
    // A directory in the way is a clear error for `set`, and never keeps the VE from booting.
    node.sh("sym", "rm -f /etc/resolv.conf && mkdir /etc/resolv.conf");
    let e = node.fails(&["ve", "set", "sym", "--dns", "192.0.2.54"]);
    assert!(e.contains("/etc/resolv.conf") && e.contains("directory"), "{e}");
    node.ok(&["ve", "restart", "sym"]);
    assert_eq!(node.sh("sym", "hostname").trim(), "planted.example");
    assert!(!Path::new(&probe).exists());
}

#[test]
fn node_data_is_root_only_and_host_mounts_ignore_setuid() {
    if !need_root("node_data_is_root_only_and_host_mounts_ignore_setuid") {
        return;
    }
    let node = start("perm");
    node.ensure_busybox();
    node.ok(&["ve", "create", "own", "-t", "busybox", "--start"]);
    node.sh(
        "own",
        "echo top-secret > /root/private && chmod 0600 /root/private && \
         cp /bin/busybox /bin/suid-shell && chmod 4755 /bin/suid-shell && sync",
    );
    let mode = std::fs::metadata(&node.root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "node root is {mode:o}");
    // And again below it: the volume (log, data files, history) is root-only by itself.
    let vmode = std::fs::metadata(node.root.join("ves/own/volume"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(vmode, 0o700, "volume dir is {vmode:o}");
    // Host user nobody reaches nothing: not the VE's files through the mount, not its
    // log or data files, not the templates.
    for p in [
        "ves/own/rootfs/root/private",
        "ves/own/rootfs/etc/shadow",
        "ves/own/rootfs/bin/suid-shell",
        "ves/own/volume",
        "templates",
        "state.json",
    ] {
        let path = node.root.join(p);
        let o = as_nobody(&format!("cat {0} 2>&1 || ls {0} 2>&1; exit 0", path.display()));
        let text = out(&o);
        assert!(
            text.contains("Permission denied") && !text.contains("top-secret"),
            "nobody reached {p}: {text}"
        );
    }
    let o = as_nobody(&format!(
        "exec {}",
        node.root.join("ves/own/rootfs/bin/suid-shell").display()
    ));
    assert!(!o.status.success());
    // The host-side mounts never honour setuid or devices; the VE's own root does.
    let host = mount_options(&node.root.join("ves/own/rootfs")).expect("VE root mounted on the host");
    assert!(host.contains("nosuid") && host.contains("nodev"), "host mount: {host}");
    let inside = node.sh("own", "awk '$5 == \"/\" { print $6 }' /proc/self/mountinfo");
    assert!(!inside.contains("nosuid"), "the VE lost setuid on its root: {inside}");
    assert!(inside.contains("nodev"), "{inside}");
    // Nothing of the VE's view leaks into the host's mount table.
    assert!(mount_options(&Path::new(vessel_ve::runtime::EXPOSE_DIR).join("own/root")).is_none());
}

#[test]
fn escape_battery_from_root_inside_a_ve() {
    if !need_root("escape_battery_from_root_inside_a_ve") {
        return;
    }
    let node = start("battery");
    node.ensure_busybox();
    node.ok(&["ve", "create", "atk", "-t", "busybox", "--start"]);
    node.ok(&["ve", "create", "other", "-t", "busybox", "--start"]);
    let daemon = node.daemon_pid().unwrap();
    let other_pid = node.ve_pid("other");
    // (what, script that must fail inside the attacker VE)
    let attacks: Vec<(&str, String)> = vec![
        (
            "load a kernel module",
            "insmod /lib/modules/x.ko || modprobe dummy".into(),
        ),
        ("write a host sysctl", "echo 1 > /proc/sys/kernel/sysrq".into()),
        (
            "write a net sysctl of the host",
            "echo 1 > /proc/sys/net/core/bpf_jit_enable".into(),
        ),
        ("trigger sysrq", "echo h > /proc/sysrq-trigger".into()),
        ("read kernel memory", "head -c 1 /proc/kcore".into()),
        ("see the host daemon", format!("test -e /proc/{daemon}/status")),
        ("signal the host daemon", format!("kill -0 {daemon}")),
        ("signal the other VE's init", format!("kill -0 {other_pid}")),
        ("make a device node", "mknod /tmp/mem c 1 1".into()),
        ("open a host disk", "cat /dev/vda || cat /dev/sda".into()),
        (
            "raise its own memory cap",
            "for f in /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max; do \
             test -e $f && echo -1 > $f && exit 0; done; exit 1"
                .into(),
        ),
        (
            "escape its cgroup",
            "for d in /sys/fs/cgroup/pids /sys/fs/cgroup; do test -w $d/cgroup.procs && echo $$ > $d/cgroup.procs \
             && exit 0; done; exit 1"
                .into(),
        ),
        (
            "set the clock",
            "date -s '2001-01-01 00:00:00' >/dev/null 2>&1; test \"$(date +%Y)\" = 2001".into(),
        ),
        (
            "swap on",
            "dd if=/dev/zero of=/sw bs=1k count=64 2>/dev/null; mkswap /sw && swapon /sw".into(),
        ),
    ];
    let mut survived = Vec::new();
    for (what, script) in &attacks {
        let o = node.exec("atk", script);
        if o.status.success() {
            survived.push(format!("{what}: {}", out(&o)));
        }
    }
    assert!(survived.is_empty(), "attacks that worked: {survived:#?}");
    // The attacker and the other VE still run; the host daemon too.
    assert_eq!(node.sh("other", "echo alive").trim(), "alive");
    assert_eq!(node.sh("atk", "echo alive").trim(), "alive");
    // uid clash: the two VEs' roots are different host users, so neither can touch the
    // other's processes or files even through the host.
    assert_ne!(host_uid_of(node.ve_pid("atk")), host_uid_of(other_pid));
}

#[test]
fn admin_commands_never_follow_ve_symlinks_out_of_the_ve() {
    if !need_root("admin_commands_never_follow_ve_symlinks_out_of_the_ve") {
        return;
    }
    let node = start("links");
    node.ensure_busybox();
    node.ok(&["ve", "create", "lnk", "-t", "busybox", "--start"]);
    let host_dir = node.root.join("host-only");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("secret"), "host-secret\n").unwrap();
    let hd = host_dir.display().to_string();
    // Links aimed at the host's tree, absolute and relative, as files and as directories.
    node.sh(
        "lnk",
        &format!(
            "ln -s {hd} /evil-dir && ln -s ../../../../..{hd}/secret /evil-file && \
             ln -s / /loop && echo mine > /mine && sync"
        ),
    );
    // diff/history/revert/export answer about the links themselves, inside the VE.
    let diff = node.ok(&["ve", "diff", "lnk", "/evil-dir"]);
    assert!(!diff.contains("secret"), "diff followed a link to the host: {diff}");
    let _ = node.vessel(&["ve", "history", "lnk", "/evil-dir/secret"]);
    let _ = node.vessel(&["ve", "history", "lnk", "/loop/loop/loop/evil-file"]);
    let _ = node.vessel(&["ve", "revert", "lnk", "/evil-dir/secret", "--template"]);
    let _ = node.vessel(&["ve", "revert", "lnk", "/evil-file", "--template"]);
    assert_eq!(
        std::fs::read_to_string(host_dir.join("secret")).unwrap(),
        "host-secret\n"
    );
    let export = node.root.join("lnk.tar");
    let o = node
        .command()
        .args(["ve", "export", "lnk"])
        .stdout(std::fs::File::create(&export).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "export: {}", err(&o));
    let bytes = std::fs::read(&export).unwrap();
    assert!(
        !bytes.windows(11).any(|w| w == b"host-secret"),
        "export carried a host file's contents"
    );
    // `ve logs` and `ve console` read the node's own files, not paths in the VE.
    node.sh(
        "lnk",
        "rm -f /dev/console 2>/dev/null; ln -sf /etc/shadow /dev/console 2>/dev/null; true",
    );
    let _ = node.vessel(&["ve", "logs", "lnk"]);
    node.ok(&["ve", "restart", "lnk"]);
    assert_eq!(node.sh("lnk", "cat /mine").trim(), "mine");
    assert_eq!(
        std::fs::read_to_string(host_dir.join("secret")).unwrap(),
        "host-secret\n"
    );
}
