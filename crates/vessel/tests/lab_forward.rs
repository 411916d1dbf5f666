//! Every `vessel ve ...` command from any node: on a 3-node lab, a VE placed on node2 is
//! reached from node1 over the node-to-node transport. exec (exit code, stdout and stderr
//! apart, stdin piped through to its EOF, 4 MiB byte-exact both ways, a reader that goes
//! away), exec -t (a terminal, its size), logs, console, diff, history, revert, rescue,
//! restart and export (byte-identical to the export made on node2 itself) answer as they
//! do on node2; when node2 dies, an exec in progress ends with an error that says it was
//! cut, and new calls fail at once naming the node.

mod common;
use common::*;
use std::io::Read;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use vessel_testkit::lab::TestLab;
use vessel_testkit::{console_dialog_at, exec_tty_at};

fn sh(lab: &TestLab, node: &str, script: &str) -> Output {
    lab.run(&["exec", node, "--", "sh", "-c", script])
}

fn sh_ok(lab: &TestLab, node: &str, script: &str) -> String {
    let o = sh(lab, node, script);
    assert!(o.status.success(), "on {node}: {script}: {}\n{}", out(&o), err(&o));
    out(&o)
}

#[test]
fn ve_commands_from_another_node_reach_the_ves_node() {
    if !need_root("ve_commands_from_another_node_reach_the_ves_node") {
        return;
    }
    let lab = TestLab::new(&vessel_bin());
    lab.ok(&["up", "--nodes", "3", "--etcd-members", "3"]);
    lab.vessel_ok("node2", &["template", "build", "busybox"]);
    let v = lab.vessel_json(
        "node1",
        &[
            "ve",
            "create",
            "fa",
            "--template",
            "busybox",
            "--start",
            "--node",
            "node2",
        ],
    );
    assert_eq!(
        (v["node"].as_str(), v["status"].as_str()),
        (Some("node2"), Some("running")),
        "{v}"
    );
    let bin = vessel_bin().display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().display().to_string();

    // exec: the exit code, stdout and stderr apart, as on the VE's own node.
    let script = "echo out; echo err >&2; printf 'no newline'; exit 7";
    for n in ["node2", "node1"] {
        let o = lab.vessel(n, &["ve", "exec", "fa", "--", "sh", "-c", script]);
        assert_eq!(o.status.code(), Some(7), "from {n}: {}", err(&o));
        assert_eq!(
            (out(&o).as_str(), err(&o).as_str()),
            ("out\nno newline", "err\n"),
            "from {n}"
        );
    }
    assert_eq!(lab.vessel_ok("node1", &["ve", "exec", "fa", "--", "hostname"]), "fa\n");
    // stdin piped through, its end included (cat returns); no stdin at all is an EOF.
    assert_eq!(
        sh_ok(&lab, "node1", &format!("printf 'hi\\nthere' | {bin} ve exec fa -- cat")),
        "hi\nthere"
    );
    assert_eq!(lab.vessel_ok("node1", &["ve", "exec", "fa", "--", "cat"]), "");
    // 4 MiB of every byte value both ways, byte-exact.
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(tmp.path().join("in.bin"), &data).unwrap();
    sh_ok(
        &lab,
        "node1",
        &format!("{bin} ve exec fa -- cat < {dir}/in.bin > {dir}/out.bin"),
    );
    let back = std::fs::read(tmp.path().join("out.bin")).unwrap();
    assert!(
        back == data,
        "4 MiB through cat came back as {} different bytes",
        back.len()
    );
    let sums: Vec<String> = ["node1", "node2"]
        .iter()
        .map(|n| sh_ok(&lab, n, &format!("{bin} ve exec fa -- md5sum < {dir}/in.bin")))
        .collect();
    assert_eq!(sums[0], sums[1]);
    // A reader that goes away: the command in the VE gets EPIPE and the exec ends.
    assert_eq!(
        sh_ok(&lab, "node1", &format!("{bin} ve exec fa -- yes | head -c 6")),
        "y\ny\ny\n"
    );

    // exec -t from node1: a terminal in the VE, the environment, the directory, the size.
    let (text, code) = exec_tty_at(
        &lab.socket("node1"),
        "fa",
        &["GREETING=hi-from-env"],
        Some("/tmp"),
        b"tty; pwd; echo $GREETING; i=0; while [ \"$(stty size)\" != '33 101' ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; stty size | tr ' ' x; exit 3\n",
        Some((33, 101)),
    )
    .unwrap();
    assert!(text.contains("/dev/pts/"), "not a terminal: {text:?}");
    assert!(text.contains("/tmp") && text.contains("hi-from-env"), "{text:?}");
    assert!(
        text.contains("33x101"),
        "the window size did not reach the VE: {text:?}"
    );
    assert_eq!(code, 3, "{text:?}");

    // logs and the console.
    wait_until(
        "the login prompt in the console log, read from node1",
        Duration::from_secs(30),
        || lab.vessel_ok("node1", &["ve", "logs", "fa"]).contains("fa login:"),
    );
    let seen = console_dialog_at(&lab.socket("node1"), "fa", b"root\n", "assword").unwrap();
    assert!(seen.contains("assword"), "the console did not answer: {seen:?}");

    // diff, history, revert.
    lab.vessel_ok(
        "node1",
        &["ve", "exec", "fa", "--", "sh", "-c", "echo hello > /root/fwd-file"],
    );
    let entry = |n: &str| {
        lab.vessel_json(n, &["ve", "diff", "fa"])
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == "/root/fwd-file")
            .cloned()
    };
    let e1 = entry("node1");
    assert!(e1.is_some(), "diff from node1 lacks the new file");
    assert_eq!(e1, entry("node2"));
    let h1 = lab.vessel_json("node1", &["ve", "history", "fa", "/root/fwd-file"]);
    assert!(!h1.as_array().unwrap().is_empty(), "{h1}");
    assert_eq!(h1, lab.vessel_json("node2", &["ve", "history", "fa", "/root/fwd-file"]));
    lab.vessel_ok("node1", &["ve", "revert", "fa", "/root/fwd-file", "--template"]);
    assert_eq!(
        lab.vessel_ok(
            "node1",
            &[
                "ve",
                "exec",
                "fa",
                "--",
                "sh",
                "-c",
                "test ! -e /root/fwd-file && echo gone"
            ]
        ),
        "gone\n"
    );

    // rescue and back, restart.
    let r = lab.vessel_ok("node1", &["ve", "rescue", "fa"]);
    assert!(r.contains("rescue mode"), "{r}");
    assert!(
        lab.vessel_ok("node1", &["ve", "exec", "fa", "--", "ls", "/mnt/ve"])
            .contains("root"),
        "the VE's own files are not at /mnt/ve in rescue mode"
    );
    let r = lab.vessel_ok("node1", &["ve", "rescue", "fa", "--end"]);
    assert!(r.contains("boots normally"), "{r}");
    let before = lab.vessel_json("node2", &["ve", "show", "fa"])["pid"].clone();
    let r = lab.vessel_json("node1", &["ve", "restart", "fa"]);
    assert_eq!(r["status"], "running", "{r}");
    assert_ne!(r["pid"], before, "{r}");

    // export: the same bytes as an export made on node2 itself (stopped, so nothing moves).
    lab.vessel_ok("node1", &["ve", "stop", "fa"]);
    sh_ok(&lab, "node1", &format!("{bin} ve export fa > {dir}/remote.tar"));
    sh_ok(&lab, "node2", &format!("{bin} ve export fa > {dir}/local.tar"));
    let (remote, local) = (
        std::fs::read(tmp.path().join("remote.tar")).unwrap(),
        std::fs::read(tmp.path().join("local.tar")).unwrap(),
    );
    // (The export holds the VE's own files and settings; the template is named, not copied.)
    assert!(local.len() >= 2048, "a short export: {} bytes", local.len());
    assert!(
        remote == local,
        "exports differ: {} bytes from node1, {} on node2",
        remote.len(),
        local.len()
    );
    lab.vessel_ok("node1", &["ve", "start", "fa"]);

    // node2 dies: an exec in progress says it was cut; new calls name the node at once.
    let mut c = lab.cmd(&[
        "exec", "node1", "--", "vessel", "ve", "exec", "fa", "--", "sleep", "600",
    ]);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_until("the sleep runs in the VE", Duration::from_secs(30), || {
        lab.vessel_ok("node2", &["ve", "exec", "fa", "--", "ps"])
            .contains("sleep 600")
    });
    lab.ok(&["kill", "node2"]);
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let status = status.unwrap_or_else(|| panic!("the exec did not end after node2 died: {stderr}"));
    eprintln!("an exec in progress ended {:?} after node2 was killed", t0.elapsed());
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("cut") && stderr.contains("node2"), "{stderr}");
    let t0 = Instant::now();
    let o = lab.vessel("node1", &["ve", "exec", "fa", "--", "true"]);
    eprintln!("exec on a dead node failed in {:?}: {}", t0.elapsed(), err(&o).trim());
    assert!(!o.status.success() && err(&o).contains("node node2"), "{}", err(&o));
    let o = lab.vessel("node1", &["ve", "logs", "fa"]);
    assert!(!o.status.success() && err(&o).contains("node node2"), "{}", err(&o));
}
