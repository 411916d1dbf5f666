//! Regression tests for the daemon's input boundary, each named after what an escape
//! battery found (root inside a VE, a local client of the API): VEs without limits, frames
//! and connections that grew the daemon, control characters forging CLI output, and limits
//! the daemon accepted but could not apply.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vessel_types::api::{ErrorCode, Response};

/// Restart the node's daemon with `toml` as its node config (ROOT/node.toml).
fn restart_with_config(node: &mut TestNode, toml: &str) {
    node.stop_daemon();
    std::fs::write(node.root.join("node.toml"), toml).unwrap();
    node.spawn_daemon();
}

fn limits(node: &TestNode, ve: &str) -> serde_json::Value {
    node.json(&["ve", "show", ve])["spec"]["limits"].clone()
}

/// One line on stderr, the way the CLI reports bad input.
fn assert_one_line(what: &str, stderr: &str) {
    assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: not one line: {stderr:?}");
    assert!(stderr.starts_with("vessel: "), "{what}: {stderr:?}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A connection to the daemon's socket with bounded reads and writes.
fn raw_conn(node: &TestNode) -> UnixStream {
    let s = UnixStream::connect(node.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn frame(body: &str) -> Vec<u8> {
    let mut m = (body.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(body.as_bytes());
    m
}

/// The next reply on a raw connection.
fn reply(s: &UnixStream) -> Response {
    vessel_api::frame::read_frame::<Response>(s.as_raw_fd())
        .expect("a reply frame")
        .0
}

fn expect_error(r: Response, what: &str) -> vessel_types::api::ApiError {
    match r {
        Response::Error(e) => e,
        r => panic!("{what}: expected an error reply, got {r:?}"),
    }
}

#[test]
fn ves_created_without_limits_were_unlimited() {
    if !need_root("ves_created_without_limits_were_unlimited") {
        return;
    }
    let mut node = start("deflim");
    node.ensure_busybox();

    // No node.toml: the built-in defaults, recorded in the spec.
    node.ok(&["ve", "create", "plain", "-t", "busybox", "--start"]);
    let l = limits(&node, "plain");
    assert_eq!(l["memory_max"].as_u64(), Some(2 << 30), "{l}");
    assert_eq!(l["pids_max"].as_u64(), Some(4096), "{l}");
    assert_eq!(l["disk"].as_u64(), Some(20 << 30), "{l}");
    assert_eq!(l["inodes"].as_u64(), Some(500_000), "{l}");
    assert_eq!(l["history"].as_u64(), Some(86_400), "{l}");
    let show = node.ok(&["ve", "show", "plain"]);
    assert!(show.contains("pids:        4096"), "{show}");
    assert!(show.contains("quota 20G, inodes 500000"), "{show}");
    // Applied, not only recorded: the VE's pids cgroup has the cap.
    let pids_max: Vec<String> = node
        .cgroup_dirs("plain")
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("pids.max")).ok())
        .map(|s| s.trim().to_string())
        .collect();
    assert!(pids_max.contains(&"4096".to_string()), "pids.max: {pids_max:?}");
    // Explicit values win.
    node.ok(&[
        "ve", "create", "own", "-t", "busybox", "--pids", "100", "--memory", "64M",
    ]);
    let l = limits(&node, "own");
    assert_eq!(
        (l["pids_max"].as_u64(), l["memory_max"].as_u64()),
        (Some(100), Some(64 << 20))
    );
    assert_eq!(l["disk"].as_u64(), Some(20 << 30));

    // The operator's config: other defaults, and maxima that create and set respect.
    restart_with_config(
        &mut node,
        "version = 1\n[defaults]\nmemory = \"512M\"\npids = 256\n[max]\nmemory = \"1G\"\ncpus = 2\n",
    );
    node.ok(&["ve", "create", "conf", "-t", "busybox"]);
    let l = limits(&node, "conf");
    assert_eq!(l["memory_max"].as_u64(), Some(512 << 20), "{l}");
    assert_eq!(l["pids_max"].as_u64(), Some(256), "{l}");
    assert_eq!(
        l["cpus"].as_f64(),
        Some(2.0),
        "a cap with a maximum defaults to it: {l}"
    );
    let e = node.fails(&["ve", "create", "big", "-t", "busybox", "--memory", "2G"]);
    assert_one_line("create above max", &e);
    assert!(e.contains("max.memory"), "{e}");
    let e = node.fails(&["ve", "set", "conf", "--cpus", "3"]);
    assert_one_line("set above max", &e);
    assert!(e.contains("max.cpus"), "{e}");
    assert_eq!(
        limits(&node, "conf")["cpus"].as_f64(),
        Some(2.0),
        "a refused set changes nothing"
    );
    let names: Vec<String> = node
        .json(&["ve", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"big".to_string()), "{names:?}");

    // A VE recorded before defaults existed (no limits in state.json) still loads and runs.
    node.ok(&["ve", "stop", "plain"]);
    node.stop_daemon();
    let state_path = node.root.join("state.json");
    let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    st["ves"]["plain"]["spec"].as_object_mut().unwrap().remove("limits");
    std::fs::write(&state_path, serde_json::to_vec_pretty(&st).unwrap()).unwrap();
    node.spawn_daemon();
    assert_eq!(limits(&node, "plain"), serde_json::json!({}));
    node.ok(&["ve", "start", "plain"]);
    assert_eq!(node.sh("plain", "echo up").trim(), "up");

    // A bad config stops the daemon at start with the file, line and key.
    node.stop_daemon();
    let cfg = node.root.join("node.toml");
    std::fs::write(&cfg, "version = 1\n[defaults]\nmemory = \"2X\"\n").unwrap();
    let mut cmd = node.command();
    cmd.arg("daemon").stdin(std::process::Stdio::null());
    let o = run_bounded(cmd, Duration::from_secs(60));
    let e = err(&o);
    assert!(!o.status.success(), "the daemon started with a bad config: {e}");
    assert!(
        e.contains(&cfg.display().to_string()) && e.contains("line 3") && e.contains("defaults.memory"),
        "{e}"
    );
    // --config names another file; it must exist.
    let mut cmd = node.command();
    cmd.args(["daemon", "--config", "/nonexistent/vessel-node.toml"])
        .stdin(std::process::Stdio::null());
    let o = run_bounded(cmd, Duration::from_secs(60));
    assert!(!o.status.success());
    assert!(err(&o).contains("/nonexistent/vessel-node.toml"), "{}", err(&o));
    std::fs::remove_file(&cfg).unwrap();
    node.spawn_daemon();
}

#[test]
fn huge_frames_and_connection_floods_grew_the_daemon() {
    if !need_root("huge_frames_and_connection_floods_grew_the_daemon") {
        return;
    }
    let node = start("frames");
    let pid = node.daemon_pid().unwrap();
    node.ok(&["ve", "list"]);
    let before = rss_kib(pid);

    // 40 clients each announce a 16 MiB request and send 4 MiB of it.
    let part = vec![b' '; 64 << 10];
    let conns: Vec<UnixStream> = (0..40)
        .map(|_| {
            let mut s = raw_conn(&node);
            let mut m = (16u32 << 20).to_be_bytes().to_vec();
            m.extend_from_slice(br#"{"v":1,"body":{"op":"status"}"#);
            // The daemon may refuse (and close) before all of it is written.
            if s.write_all(&m).is_ok() {
                for _ in 0..64 {
                    if s.write_all(&part).is_err() {
                        break;
                    }
                }
            }
            s
        })
        .collect();
    // The daemon still answers while they are open.
    node.ok(&["ve", "list"]);
    let after = rss_kib(pid);
    assert!(
        after < before + 100 * 1024,
        "daemon RSS grew from {before} KiB to {after} KiB for 40 refused frames"
    );
    // Each got an error reply saying why.
    for s in &conns {
        let e = expect_error(reply(s), "16 MiB request");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("over the"), "{}", e.message);
    }
}

#[test]
fn stalled_and_surplus_connections_pinned_daemon_threads() {
    if !need_root("stalled_and_surplus_connections_pinned_daemon_threads") {
        return;
    }
    let mut node = start("conns");
    node.ensure_busybox();
    node.ok(&["ve", "create", "c", "-t", "busybox", "--start"]);

    // At most 4 connections: a fifth gets `busy` from the accept thread.
    restart_with_config(
        &mut node,
        "version = 1\n[api]\nmax_connections = 4\nrequest_timeout = \"1h\"\n",
    );
    let status = frame(r#"{"v":1,"body":{"op":"status"}}"#);
    // Four connections that each hold a slot. The readiness probe's connection may still
    // hold one for a moment after its client left (its thread has not seen the close yet):
    // a connection answered `busy` at once did not get a slot, so it is made again.
    let mut stalled: Vec<UnixStream> = Vec::new();
    for _ in 0..100 {
        if stalled.len() == 4 {
            break;
        }
        let mut s = raw_conn(&node);
        s.write_all(&status[..10]).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                stalled.push(s)
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    assert_eq!(stalled.len(), 4, "four connections hold the four slots");
    let fifth = raw_conn(&node);
    let e = expect_error(reply(&fifth), "fifth connection");
    assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
    let e = node.fails(&["ve", "list"]);
    assert_one_line("busy", &e);
    assert!(e.contains("busy") && e.contains("max_connections"), "{e}");
    drop(stalled);
    wait_until("a free connection slot", Duration::from_secs(30), || {
        node.vessel(&["ve", "list"]).status.success()
    });

    // A client that sends half a request and stalls is cut off after the request timeout,
    // while exec and console, which keep their connection open longer, keep working.
    restart_with_config(&mut node, "version = 1\n[api]\nrequest_timeout = \"2s\"\n");
    let mut half = raw_conn(&node);
    half.write_all(&status[..10]).unwrap();
    let e = expect_error(reply(&half), "stalled request");
    assert!(e.message.contains("no complete request"), "{}", e.message);
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the daemon closes the connection after the error");

    let o = node.exec("c", "sleep 4; echo done");
    assert!(o.status.success(), "exec longer than the request timeout: {}", err(&o));
    assert_eq!(out(&o).trim(), "done");

    let client = vessel_api::Client::connect(&node.socket()).unwrap();
    client
        .send(
            &vessel_types::api::Request::VeConsole {
                name: vessel_types::Name::parse("c").unwrap(),
            },
            &[],
        )
        .unwrap();
    let (r, fds) = client.recv().unwrap();
    assert!(matches!(r, Response::ConsoleAttached), "{r:?}");
    let mut con = UnixStream::from(fds.into_iter().next().expect("console connection"));
    std::thread::sleep(Duration::from_secs(4));
    con.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    con.write_all(b"root\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && !String::from_utf8_lossy(&seen).contains("assword") {
        if let Ok(n) = con.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("assword"),
        "console attached longer than the request timeout stopped answering: {:?}",
        String::from_utf8_lossy(&seen)
    );
}

#[test]
fn control_characters_forged_table_lines_and_drove_the_terminal() {
    if !need_root("control_characters_forged_table_lines_and_drove_the_terminal") {
        return;
    }
    let node = start("ctl");
    node.ensure_busybox();
    node.ok(&["ve", "create", "ctl", "-t", "busybox", "--start"]);
    node.sh(
        "ctl",
        r#"mkdir /root/d && cd /root/d && touch "$(printf 'new\nline')" "$(printf 'carriage\rreturn')" "$(printf 'esc\033[2Jclear')""#,
    );
    let raw_bytes = |o: &std::process::Output| o.stdout.iter().any(|&b| b == 0x1b || b == b'\r');

    let entries = node.json(&["ve", "diff", "ctl", "/root/d"]);
    let n = entries.as_array().unwrap().len();
    assert!(n >= 3, "{entries}");
    let o = node.vessel(&["ve", "diff", "ctl", "/root/d"]);
    assert!(o.status.success());
    assert_eq!(
        out(&o).lines().count(),
        n + 1,
        "one line per entry plus the header:\n{}",
        out(&o)
    );
    assert!(!raw_bytes(&o), "raw ESC/CR in the diff table: {:?}", out(&o));
    assert!(
        out(&o).contains("new\\nline") && out(&o).contains("esc\\x1b[2Jclear"),
        "{}",
        out(&o)
    );
    // JSON stays exact.
    assert!(entries.to_string().contains("new\\nline"), "{entries}");
    assert!(entries
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["path"].as_str().unwrap().contains('\u{1b}')));

    let entries = node.json(&["ve", "history", "ctl", "/root/d"]);
    let n = entries.as_array().unwrap().len();
    assert!(n >= 3, "{entries}");
    let o = node.vessel(&["ve", "history", "ctl", "/root/d"]);
    assert!(o.status.success());
    assert_eq!(out(&o).lines().count(), n + 1, "{}", out(&o));
    assert!(!raw_bytes(&o), "raw ESC/CR in the history table: {:?}", out(&o));

    // Daemon errors quote what they were given: still one line, no escapes.
    let o = node.vessel(&["ve", "create", "h", "-t", "busybox", "--hostname", "bad\nline\x1b[2J"]);
    assert!(!o.status.success());
    assert_one_line("error quoting a hostname", &err(&o));
    assert!(!o.stderr.contains(&0x1b), "{:?}", err(&o));

    // The console log: escapes shown, not passed to the terminal; --raw gives the bytes.
    node.sh("ctl", r"printf '\033[2J\033]0;title\007marker-line\n' > /dev/console");
    wait_until("the marker in the console log", Duration::from_secs(20), || {
        node.ok(&["ve", "logs", "ctl"]).contains("marker-line")
    });
    let o = node.vessel(&["ve", "logs", "ctl"]);
    assert!(!o.stdout.contains(&0x1b), "raw ESC in `ve logs`: {:?}", out(&o));
    assert!(out(&o).contains("\\x1b[2J\\x1b]0;title\\x07marker-line"), "{}", out(&o));
    let o = node.vessel(&["ve", "logs", "ctl", "--raw"]);
    assert!(
        o.stdout.windows(5).any(|w| w == b"\x1b[2J\x1b"),
        "--raw must give the exact bytes: {:?}",
        out(&o)
    );
}

#[test]
fn limits_the_kernel_refuses_were_accepted() {
    if !need_root("limits_the_kernel_refuses_were_accepted") {
        return;
    }
    let node = start("badlim");
    node.ensure_busybox();
    let ves = |node: &TestNode| node.json(&["ve", "list"]).as_array().unwrap().len();

    for (flag, value, says) in [
        ("--cpus", "NaN", "cpus"),
        ("--cpus", "inf", "cpus"),
        ("--cpus=-1", "", "cpus"),
        ("--cpus", "0", "cpus"),
        ("--pids", "18446744073709551615", "pids"),
        ("--pids", "5000000", "pids"),
        ("--memory", "4M", "memory"),
        ("--memory", "16000T", "memory"),
        ("--memory-low", "16000T", "memory"),
        ("--disk", "2000000T", "disk"),
        ("--inodes", "18446744073709551615", "inode"),
        ("--cpu-weight", "0", "weight"),
        ("--history", "0s", "history"),
    ] {
        let mut args = vec!["ve", "create", "bad", "-t", "busybox", flag];
        if !value.is_empty() {
            args.push(value);
        }
        let e = node.fails(&args);
        assert_one_line(&format!("{flag} {value}"), &e);
        assert!(e.contains(says), "{flag} {value}: {e}");
        assert_eq!(ves(&node), 0, "{flag} {value} created a VE");
    }
    assert!(!node.root.join("ves/bad").exists(), "a refused create left files");

    // Set is checked the same way.
    node.ok(&["ve", "create", "good", "-t", "busybox"]);
    let before = limits(&node, "good");
    for (flag, value) in [
        ("--pids", "18446744073709551615"),
        ("--cpus", "nan"),
        ("--memory", "16000T"),
    ] {
        let e = node.fails(&["ve", "set", "good", flag, value]);
        assert_one_line(&format!("set {flag} {value}"), &e);
    }
    assert_eq!(limits(&node, "good"), before, "a refused set changed limits");

    // Straight to the socket: what serde cannot read and what validation refuses.
    let spec = |limits: &str| {
        format!(
            r#"{{"v":1,"body":{{"op":"ve-create","spec":{{"name":"raw","template":"busybox","limits":{limits}}}}}}}"#
        )
    };
    for limits in [
        r#"{"cpus":1e400}"#,
        r#"{"cpus":-1}"#,
        r#"{"cpus":"NaN"}"#,
        r#"{"pids_max":-1}"#,
        r#"{"pids_max":18446744073709551615}"#,
        r#"{"pids_max":18446744073709551616}"#,
        r#"{"memory_max":-1}"#,
        r#"{"memory_max":1e30}"#,
        r#"{"inodes":4294967297}"#,
        r#"{"history":0}"#,
    ] {
        let mut s = raw_conn(&node);
        s.write_all(&frame(&spec(limits))).unwrap();
        let e = expect_error(reply(&s), limits);
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{limits}: {}", e.message);
        assert!(!e.message.contains('\n'), "{limits}: {}", e.message);
        assert_eq!(ves(&node), 1, "{limits} created a VE");
    }
    let mut s = raw_conn(&node);
    s.write_all(&frame(
        r#"{"v":1,"body":{"op":"ve-set","name":"good","change":{"limits":{"pids_max":18446744073709551615}}}}"#,
    ))
    .unwrap();
    expect_error(reply(&s), "set over the socket");
    assert_eq!(limits(&node, "good"), before);
}
