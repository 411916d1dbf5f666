//! The node daemon: VEs come back after a daemon restart and after kill -9 (files intact),
//! restart policies, singleton, status, console attach and logs.

mod common;
use common::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[test]
fn ves_come_back_after_daemon_restart_and_kill() {
    if !need_root("ves_come_back_after_daemon_restart_and_kill") {
        return;
    }
    let mut node = start("re");
    node.ensure_busybox();
    node.ok(&["ve", "create", "keep", "-t", "busybox", "--start"]);
    node.ok(&["ve", "create", "dies", "-t", "busybox", "--start"]);
    node.ok(&["ve", "create", "off", "-t", "busybox", "--restart", "no", "--start"]);
    node.sh("keep", "echo data > /root/f");
    wait_until("login prompt of keep", Duration::from_secs(20), || {
        node.ok(&["ve", "logs", "keep"]).contains("keep login:")
    });
    let keep = node.ve_pid("keep");
    let dies = node.ve_pid("dies");
    let off = node.ve_pid("off");

    // status --json carries the daemon pid; a second daemon for the same root is refused.
    let st = node.json(&["status"]);
    assert_eq!(st["pid"].as_u64(), node.daemon_pid().map(|p| p as u64));
    assert_eq!(st["running"], true);
    let e = node.fails(&["up"]);
    assert!(e.contains("already runs"), "{e}");
    let o = node.vessel(&["daemon"]);
    assert!(
        !o.status.success() && (err(&o).contains("already") || err(&o).contains("another")),
        "{}",
        err(&o)
    );

    // kill -9: the VEs' files were served by that daemon, so their roots are gone; while
    // no daemon watches, two VEs die.
    node.kill_daemon();
    // SAFETY: these pids are VE inits this test started.
    unsafe {
        libc::kill(dies, libc::SIGKILL);
        libc::kill(off, libc::SIGKILL);
    }
    wait_until("killed inits to exit", Duration::from_secs(10), || {
        !std::fs::read_to_string(format!("/proc/{dies}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    });
    node.spawn_daemon();

    // The running one is started again with its files intact (a new init) ...
    wait_until("keep to run again", Duration::from_secs(20), || {
        let v = node.json(&["ve", "show", "keep"]);
        v["status"] == "running" && v["pid"].as_i64().is_some_and(|p| p as i32 != keep)
    });
    assert_eq!(node.sh("keep", "cat /root/f").trim(), "data");
    // ... "always" restarts the dead one; "no" leaves it down, marked failed.
    wait_until(
        "the VE that died meanwhile to be restarted",
        Duration::from_secs(20),
        || {
            let v = node.json(&["ve", "show", "dies"]);
            v["status"] == "running" && v["pid"].as_i64().is_some_and(|p| p as i32 != dies)
        },
    );
    assert_eq!(node.json(&["ve", "show", "off"])["status"], "failed");
    wait_until("login prompt of keep again", Duration::from_secs(20), || {
        node.ok(&["ve", "logs", "keep"]).matches("keep login:").count() >= 2
    });
    let seen = console_dialog(&node, "keep", b"root\n", "assword");
    assert!(
        seen.contains("assword"),
        "console after daemon restart: {seen:?}\nlog: {:?}",
        node.ok(&["ve", "logs", "keep"])
    );

    // Graceful daemon stop: the VEs stop cleanly and start again with the next daemon.
    let keep = node.ve_pid("keep");
    node.sh("keep", "echo more >> /root/f");
    node.stop_daemon();
    assert!(
        !std::path::Path::new(&format!("/proc/{keep}")).exists()
            || std::fs::read_to_string(format!("/proc/{keep}/stat")).is_ok_and(|s| s.contains(") Z ")),
        "VE init must be stopped with the daemon"
    );
    node.spawn_daemon();
    wait_until("keep to run after daemon start", Duration::from_secs(20), || {
        node.json(&["ve", "show", "keep"])["status"] == "running"
    });
    assert_eq!(node.sh("keep", "cat /root/f"), "data\nmore\n");
    assert_eq!(node.json(&["ve", "show", "off"])["status"], "failed");
    // `poweroff` inside a VE this daemon started: it stays off, nothing left mounted.
    // (For a re-adopted init the exit status goes to the host's init, so the daemon
    // cannot tell poweroff from a crash; the restart policy applies then.)
    node.ok(&["ve", "restart", "dies"]);
    node.exec("dies", "poweroff");
    wait_until(
        "VE powered off from inside to be seen stopped",
        Duration::from_secs(20),
        || node.json(&["ve", "show", "dies"])["status"] == "stopped",
    );
    assert!(!node.mounts().iter().any(|m| m.contains("/ves/dies/")));
}

#[test]
fn init_exit_follows_restart_policy() {
    if !need_root("init_exit_follows_restart_policy") {
        return;
    }
    let node = start("pol");
    node.ensure_busybox();
    node.ok(&["ve", "create", "rb", "-t", "busybox", "--start"]);
    let p = node.ve_pid("rb");
    // reboot inside the VE: the node starts it again.
    let _ = node.exec("rb", "reboot");
    wait_until("VE to come back after reboot", Duration::from_secs(20), || {
        let v = node.json(&["ve", "show", "rb"]);
        v["status"] == "running" && v["pid"].as_i64().is_some_and(|x| x as i32 != p)
    });
    // Killed from outside: "always" brings it back too.
    let p = node.ve_pid("rb");
    // SAFETY: a VE init this test started.
    unsafe { libc::kill(p, libc::SIGKILL) };
    wait_until("VE restarted after being killed", Duration::from_secs(20), || {
        node.json(&["ve", "show", "rb"])["pid"]
            .as_i64()
            .is_some_and(|x| x as i32 != p)
    });
}

#[test]
fn console_attach_and_logs() {
    if !need_root("console_attach_and_logs") {
        return;
    }
    let node = start("con");
    node.ensure_busybox();
    node.ok(&["ve", "create", "con", "-t", "busybox", "--start"]);
    wait_until("login prompt in the console log", Duration::from_secs(20), || {
        node.ok(&["ve", "logs", "con"]).contains("con login:")
    });

    // Type a user name at the getty prompt: it answers with a password prompt.
    let seen = console_dialog(&node, "con", b"root\n", "assword");
    assert!(
        seen.contains("assword"),
        "console did not answer: {seen:?}\nlog: {:?}\nps: {}",
        node.ok(&["ve", "logs", "con"]),
        node.sh(
            "con",
            "ps; for p in /proc/[0-9]*; do echo $p $(cat $p/wchan) $(cut -d\" \" -f3 $p/stat); done"
        )
    );
    // The dialog is in the log too.
    assert!(node.ok(&["ve", "logs", "con"]).contains("assword"));
}

/// Attach to a VE's console through the API, type `input`, read until `until` shows up
/// (or 20 s pass); returns what the console printed.
fn console_dialog(node: &TestNode, ve: &str, input: &[u8], until: &str) -> String {
    let client = vessel_api::Client::connect(&node.socket()).unwrap();
    let req = vessel_types::api::Request::VeConsole {
        name: vessel_types::Name::parse(ve).unwrap(),
    };
    client.send(&req, &[]).unwrap();
    let (r, fds) = client.recv().unwrap();
    assert!(matches!(r, vessel_types::api::Response::ConsoleAttached));
    let mut s = std::os::unix::net::UnixStream::from(fds.into_iter().next().expect("console connection"));
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    s.write_all(input).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !String::from_utf8_lossy(&seen).contains(until) {
        if let Ok(n) = s.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn exec_with_a_terminal() {
    if !need_root("exec_with_a_terminal") {
        return;
    }
    let node = start("tty");
    node.ensure_busybox();
    node.ok(&["ve", "create", "tty", "-t", "busybox", "--start"]);
    let (text, code) = node
        .exec_tty(
            "tty",
            &["GREETING=hi-from-env"],
            Some("/tmp"),
            b"tty; pwd; echo $GREETING; exit 3\n",
        )
        .unwrap();
    assert!(text.contains("/dev/pts/"), "not a terminal: {text:?}");
    assert!(text.contains("/tmp") && text.contains("hi-from-env"), "{text:?}");
    assert_eq!(code, 3);
}
