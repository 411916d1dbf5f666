//! Shared by the replication lab tests: `ve show` polling, numbered synced records written
//! in a VE, and the records read back from a node's own copy of the volume.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use vessel_fs::tree::ROOT;
use vessel_fs::Volume;
use vessel_testkit::lab::TestLab;

pub fn show(lab: &TestLab, node: &str, ve: &str) -> serde_json::Value {
    lab.vessel_json(node, &["ve", "show", ve])
}

/// `ve show` (asked on `node`) until `pred` holds (bounded: 60 s).
pub fn wait_show(
    lab: &TestLab,
    node: &str,
    ve: &str,
    what: &str,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    for _ in 0..240 {
        last = show(lab, node, ve);
        if pred(&last) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("{what}: not within {:?}; last: {last}", t.elapsed());
}

/// VE `ve` made from busybox on node1 with `--replicas {replicas}` (and `extra` flags) and
/// started; the template is built on node1 only (the copies' nodes fetch it). Returns the
/// template's id.
pub fn create_replicated(lab: &TestLab, ve: &str, replicas: usize, extra: &[&str]) -> String {
    lab.vessel_ok("node1", &["template", "build", "busybox"]);
    let n = replicas.to_string();
    let mut args = vec!["ve", "create", ve, "-t", "busybox", "--node", "node1", "--replicas", &n];
    args.extend_from_slice(extra);
    args.push("--start");
    let v = lab.vessel_json("node1", &args);
    assert_eq!(v["status"], "running", "{v}");
    v["template_id"].as_str().unwrap().to_string()
}

pub fn replica<'a>(v: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    v["replicas"].as_array()?.iter().find(|r| r["node"] == node)
}

/// The nodes `ve show` lists as holding a copy (the writer aside).
pub fn copy_nodes(v: &serde_json::Value) -> Vec<String> {
    v["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub fn in_sync(v: &serde_json::Value, node: &str) -> bool {
    replica(v, node).is_some_and(|r| r["in_sync"] == true && r["lag_txs"] == 0)
}

pub fn node_root(lab: &TestLab, node: &str) -> PathBuf {
    lab.socket(node).parent().expect("a node root").to_path_buf()
}

/// Numbered records `from..=to` written in VE `ve` (on `node`), each synced (fsync through
/// the file) before the next: an acknowledged record is one whose command returned.
pub fn write_records(lab: &TestLab, node: &str, ve: &str, from: usize, to: usize) {
    lab.vessel_ok(
        node,
        &[
            "ve",
            "exec",
            ve,
            "--",
            "sh",
            "-c",
            &format!(
                "mkdir -p /data && for i in $(seq {from} {to}); do echo record-$i > /data/r$i.tmp && \
                 dd if=/data/r$i.tmp of=/data/r$i conv=fsync 2>/dev/null && rm /data/r$i.tmp; done"
            ),
        ],
    );
}

pub fn want_records(n: usize) -> Vec<Option<String>> {
    (1..=n).map(|i| Some(format!("record-{i}\n"))).collect()
}

/// The records of `node`'s copy of VE `ve`, read from the copy's own volume: the VE's
/// volume if the node has the VE, else its replica copy (an error while a daemon still
/// holds it open).
pub fn records_on(
    lab: &TestLab,
    node: &str,
    ve: &str,
    template_id: &str,
    n: usize,
) -> Result<Vec<Option<String>>, String> {
    let names: Vec<String> = (1..=n).map(|i| format!("r{i}")).collect();
    files_on(lab, node, ve, template_id, &names)
}

/// The contents of files `/data/<name>` in `node`'s copy of VE `ve` (see [`records_on`]).
pub fn files_on(
    lab: &TestLab,
    node: &str,
    ve: &str,
    template_id: &str,
    names: &[String],
) -> Result<Vec<Option<String>>, String> {
    let root = node_root(lab, node);
    let lower = vessel_fs::lower::shared(&root.join("templates").join(template_id).join("rootfs"))
        .map_err(|e| e.to_string())?;
    let own = root.join("ves").join(ve).join("volume");
    let dir = if own.join("volume.json").exists() {
        own
    } else {
        root.join("replicas").join(ve).join("volume")
    };
    let v = Volume::open(&dir, Some(lower)).map_err(|e| format!("open {}: {e}", dir.display()))?;
    let data = v.lookup(ROOT, b"data").ok();
    Ok(names
        .iter()
        .map(|name| {
            let d = data.as_ref()?;
            let a = v.lookup(d.ino, name.as_bytes()).ok()?;
            Some(String::from_utf8_lossy(&v.read(a.ino, 0, a.size as u32).ok()?).into_owned())
        })
        .collect())
}

/// [`records_on`] once the copy is closed (bounded wait).
pub fn closed_records(lab: &TestLab, node: &str, ve: &str, template_id: &str, n: usize) -> Vec<Option<String>> {
    let names: Vec<String> = (1..=n).map(|i| format!("r{i}")).collect();
    closed_files(lab, node, ve, template_id, &names)
}

/// [`files_on`] once the copy is closed (bounded wait).
pub fn closed_files(lab: &TestLab, node: &str, ve: &str, template_id: &str, names: &[String]) -> Vec<Option<String>> {
    let mut last = String::new();
    for _ in 0..40 {
        match files_on(lab, node, ve, template_id, names) {
            Ok(r) => return r,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("the copy on {node}: {last}");
}

/// `ve scrub`: every copy's hash tree equals the writer's.
pub fn scrub_equal(lab: &TestLab, node: &str, ve: &str, copies: usize) {
    let scrub = lab.vessel_json(node, &["ve", "scrub", ve]);
    let got = scrub.as_array().expect("a list of copies");
    assert_eq!(got.len(), copies, "{scrub}");
    for c in got {
        assert_eq!(c["root"], got[0]["root"], "{scrub}");
        assert!(c.get("differences").is_none() && c.get("error").is_none(), "{scrub}");
    }
}

/// Wait (bounded: 60 s) until `path` is gone.
pub fn wait_gone(path: &std::path::Path) {
    let t = Instant::now();
    while path.exists() {
        assert!(t.elapsed() < Duration::from_secs(60), "{} still there", path.display());
        std::thread::sleep(Duration::from_millis(250));
    }
}
