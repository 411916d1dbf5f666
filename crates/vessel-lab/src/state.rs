//! The lab's state file, `RUN/<name>/lab.json`, `{"version":1,...}`: the plan (every name
//! and path the lab uses) is written before the first resource is made, and the pids after
//! each process starts, so `lab down` finds everything even after `vessel lab` itself died.
//! Replaced atomically (write a temporary file, fsync, rename).

use crate::plan::Plan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the `lab.json` format this vessel writes and reads.
pub const STATE_VERSION: u32 = 1;

/// Where labs live on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPaths {
    /// State (lab.json, namespace files, lock): `/run/vessel-lab`.
    pub run: PathBuf,
    /// Node data (daemon roots, etcd data, logs): `/var/lib/vessel-lab`.
    pub data: PathBuf,
}

impl Default for LabPaths {
    fn default() -> Self {
        LabPaths {
            run: "/run/vessel-lab".into(),
            data: "/var/lib/vessel-lab".into(),
        }
    }
}

impl LabPaths {
    pub fn state_dir(&self, lab: &str) -> PathBuf {
        self.run.join(lab)
    }
    pub fn state_file(&self, lab: &str) -> PathBuf {
        self.state_dir(lab).join("lab.json")
    }
    /// A private bind mount of its own holding the namespace files.
    pub fn ns_dir(&self, lab: &str) -> PathBuf {
        self.state_dir(lab).join("ns")
    }
    pub fn hub_net(&self, lab: &str) -> PathBuf {
        self.ns_dir(lab).join("hub.net")
    }
    pub fn node_net(&self, lab: &str, node: &str) -> PathBuf {
        self.ns_dir(lab).join(format!("{node}.net"))
    }
    pub fn node_mnt(&self, lab: &str, node: &str) -> PathBuf {
        self.ns_dir(lab).join(format!("{node}.mnt"))
    }
    pub fn data_dir(&self, lab: &str) -> PathBuf {
        self.data.join(lab)
    }
    /// The node daemon's root (`VESSEL_ROOT`).
    pub fn node_root(&self, lab: &str, node: &str) -> PathBuf {
        self.data_dir(lab).join(node)
    }
    /// The node's etcd member's data, under the node root.
    pub fn etcd_data(&self, lab: &str, node: &str) -> PathBuf {
        self.node_root(lab, node).join("etcd-member")
    }
}

/// How far `lab up` got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Planned: resources may be half made.
    Creating,
    /// Every node answered; the lab is up.
    Up,
}

/// A node's processes as last started (pids are checked against the node's cgroup before
/// any signal, so a reused pid is never hit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRun {
    pub daemon_pid: Option<i32>,
    pub etcd_pid: Option<i32>,
    /// Killed with `lab kill` (and not started since).
    #[serde(default)]
    pub killed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    pub plan: Plan,
    pub paths: LabPaths,
    /// The unified (v2) cgroup hierarchy's mount: the lab's cgroup is `<it>/<cgroup_name>`.
    pub cgroup_v2: PathBuf,
    pub phase: Phase,
    pub nodes: BTreeMap<String, NodeRun>,
    /// Node -> the nodes it is cut off from.
    #[serde(default)]
    pub partitions: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a lab state file ({message}); remove what the lab made by hand (names with its prefix) and delete the file")]
    Bad { path: PathBuf, message: String },
    #[error("{path} has format version {version}, newer than this vessel reads ({STATE_VERSION}): use a newer vessel for this lab")]
    Newer { path: PathBuf, version: u64 },
}

impl LabState {
    pub fn new(plan: Plan, paths: LabPaths, cgroup_v2: PathBuf) -> LabState {
        let nodes = plan
            .nodes
            .iter()
            .map(|n| (n.name.clone(), NodeRun::default()))
            .collect();
        LabState {
            version: STATE_VERSION,
            plan,
            paths,
            cgroup_v2,
            phase: Phase::Creating,
            nodes,
            partitions: BTreeMap::new(),
        }
    }

    /// Parse a state file's text (the version first, so a newer format is named as such).
    pub fn parse(path: &Path, text: &[u8]) -> Result<LabState, StateError> {
        let bad = |message: String| StateError::Bad {
            path: path.to_path_buf(),
            message,
        };
        let v: serde_json::Value = serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        match v.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == STATE_VERSION as u64 => {}
            Some(v) if v > STATE_VERSION as u64 => {
                return Err(StateError::Newer {
                    path: path.to_path_buf(),
                    version: v,
                })
            }
            other => return Err(bad(format!("version {other:?}, expected {STATE_VERSION}"))),
        }
        serde_json::from_value(v).map_err(|e| bad(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Option<LabState>, StateError> {
        match std::fs::read(path) {
            Ok(t) => Self::parse(path, &t).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Write atomically: a crash leaves the old file or the new one.
    pub fn save(&self) -> Result<(), StateError> {
        use std::io::Write;
        let path = self.paths.state_file(&self.plan.name);
        let tmp = path.with_extension("json.tmp");
        let w = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(self).expect("plain data");
        let mut f = std::fs::File::create(&tmp).map_err(w)?;
        f.write_all(&body).map_err(w)?;
        f.sync_all().map_err(w)?;
        std::fs::rename(&tmp, &path).map_err(w)
    }

    pub fn run(&mut self, node: &str) -> &mut NodeRun {
        self.nodes.entry(node.to_string()).or_default()
    }

    /// Node `n`'s cgroup in the unified hierarchy.
    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.lab_cgroup().join(node)
    }

    pub fn lab_cgroup(&self) -> PathBuf {
        self.cgroup_v2.join(self.plan.cgroup_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> LabState {
        let plan = Plan::new("t", "vl12345", 160, 3, 3).unwrap();
        LabState::new(plan, LabPaths::default(), "/sys/fs/cgroup/unified".into())
    }

    #[test]
    fn round_trip_and_layout() {
        let mut s = state();
        s.run("node2").daemon_pid = Some(42);
        s.partitions.insert("node1".into(), vec!["node3".into()]);
        let text = serde_json::to_vec(&s).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["phase"], "creating");
        let back = LabState::parse(Path::new("x"), &text).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            s.node_cgroup("node2"),
            Path::new("/sys/fs/cgroup/unified/vessel-lab-vl12345/node2")
        );
        let p = LabPaths::default();
        assert_eq!(p.state_file("t"), Path::new("/run/vessel-lab/t/lab.json"));
        assert_eq!(p.node_mnt("t", "node1"), Path::new("/run/vessel-lab/t/ns/node1.mnt"));
        assert_eq!(
            p.etcd_data("t", "node1"),
            Path::new("/var/lib/vessel-lab/t/node1/etcd-member")
        );
    }

    #[test]
    fn newer_and_bad_files_are_refused_with_reason() {
        let mut v = serde_json::to_value(state()).unwrap();
        v["version"] = 2.into();
        let e = LabState::parse(Path::new("lab.json"), v.to_string().as_bytes()).unwrap_err();
        assert!(matches!(e, StateError::Newer { version: 2, .. }), "{e}");
        assert!(e.to_string().contains("newer"), "{e}");
        let e = LabState::parse(Path::new("lab.json"), b"{\"plan\":1}").unwrap_err();
        assert!(matches!(e, StateError::Bad { .. }), "{e}");
        let e = LabState::parse(Path::new("lab.json"), b"{\"version\":1}").unwrap_err();
        assert!(matches!(e, StateError::Bad { .. }), "{e}");
    }
}
