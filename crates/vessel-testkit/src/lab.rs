//! A `vessel lab` for root tests: a unique lab name and `lab down` on every way out.

use crate::{err, out, run_bounded};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A lab of this test; `lab down` on every way out.
pub struct TestLab {
    pub name: String,
    bin: PathBuf,
}

impl TestLab {
    /// A new lab name for this test process (`bin`: the `vessel` binary under test).
    pub fn new(bin: &Path) -> TestLab {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        TestLab {
            name: format!("t{}x{n}", std::process::id()),
            bin: bin.to_path_buf(),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("lab")
            .arg("--name")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null());
        c.env_remove("VESSEL_LAB")
            .env_remove("VESSEL_ROOT")
            .env_remove("VESSEL_SOCKET");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_bounded(self.cmd(args), Duration::from_secs(300))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vessel lab {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            out(&o),
            err(&o)
        );
        out(&o)
    }

    /// `vessel node list --json` run inside `node` (None: it failed, e.g. no quorum).
    pub fn node_list(&self, node: &str) -> Option<serde_json::Value> {
        let mut c = Command::new(&self.bin);
        c.args([
            "lab", "--name", &self.name, "exec", node, "--", "vessel", "node", "list", "--json",
        ])
        .stdin(Stdio::null());
        let o = run_bounded(c, Duration::from_secs(60));
        if !o.status.success() {
            return None;
        }
        serde_json::from_str(&out(&o)).ok()
    }

    /// Wait (bounded) until `node`'s node list satisfies `pred`; on timeout, fail with the
    /// last list seen and the tail of that node's daemon log.
    pub fn wait_list(&self, what: &str, node: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let limit = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut last = None;
        while t0.elapsed() < limit {
            let v = self.node_list(node);
            if v.as_ref().is_some_and(&pred) {
                return;
            }
            last = v.or(last);
            std::thread::sleep(Duration::from_millis(200));
        }
        let log =
            std::fs::read_to_string(format!("/var/lib/vessel-lab/{}/{node}/daemon.log", self.name)).unwrap_or_default();
        panic!(
            "{what}: not within {limit:?}; last node list on {node}: {last:?}\ndaemon log tail:\n{}",
            log.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// `vessel ARGS...` inside `node`.
    pub fn vessel(&self, node: &str, args: &[&str]) -> Output {
        let mut a = vec!["exec", node, "--", "vessel"];
        a.extend_from_slice(args);
        self.run(&a)
    }

    /// `vessel ARGS...` inside `node`, which must succeed: its stdout.
    pub fn vessel_ok(&self, node: &str, args: &[&str]) -> String {
        let o = self.vessel(node, args);
        assert!(
            o.status.success(),
            "on {node}: vessel {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            out(&o),
            err(&o)
        );
        out(&o)
    }

    /// `vessel ARGS... --json` inside `node`, parsed.
    pub fn vessel_json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let t = self.vessel_ok(node, &a);
        serde_json::from_str(&t).unwrap_or_else(|e| panic!("on {node}: vessel {args:?}: {e}: {t}"))
    }

    /// `node`'s daemon socket (reachable from the host: a path, not an address).
    pub fn socket(&self, node: &str) -> PathBuf {
        PathBuf::from(format!("/var/lib/vessel-lab/{}/{node}/vessel.sock", self.name))
    }

    pub fn state(&self) -> Option<serde_json::Value> {
        let t = std::fs::read(format!("/run/vessel-lab/{}/lab.json", self.name)).ok()?;
        serde_json::from_slice(&t).ok()
    }

    pub fn prefix(&self) -> String {
        self.state().expect("lab.json")["plan"]["prefix"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

/// The state of `node` in a node list, and the leader.
pub fn state_of(v: &serde_json::Value, node: &str) -> Option<String> {
    v["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

pub fn leader(v: &serde_json::Value) -> Option<String> {
    v["leader"].as_str().map(str::to_string)
}
