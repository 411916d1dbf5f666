//! The node's persistent state: its settings, templates and VEs. One JSON document,
//! versioned, replaced atomically (write to a temp file, fsync, rename, fsync the dir), so
//! a crash at any point leaves either the old or the new state.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use vessel_types::api::{TemplateKind, VeInfo};
use vessel_types::{Ipv4Cidr, Name, VeSpec, VeStatus};

/// Version of the state document. Older versions are migrated on load; newer ones are
/// refused (a newer vessel wrote them).
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeConfig {
    pub bridge: String,
    pub subnet: Ipv4Cidr,
    /// Parent cgroup of every VE (relative to each hierarchy's root).
    pub cgroup_parent: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub id: String,
    pub kind: TemplateKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VeRecord {
    pub spec: VeSpec,
    pub template_id: String,
    pub slot: u32,
    pub status: VeStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Start time of `pid` (clock ticks since boot), to tell it from a reused pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// The user stopped it: restart policies do not apply.
    #[serde(default)]
    pub user_stopped: bool,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub restart_pending: bool,
    /// Running when the daemon stopped (or died): start it again when the daemon starts.
    #[serde(default)]
    pub resume: bool,
    /// Boot from the pristine template with the VE's own tree at /mnt/ve.
    #[serde(default)]
    pub rescue: bool,
    /// The generation of its spec in the cluster this node last applied (0: never in the
    /// cluster's store: the node publishes it).
    #[serde(default)]
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    pub version: u32,
    pub config: NodeConfig,
    #[serde(default)]
    pub templates: BTreeMap<Name, TemplateRecord>,
    #[serde(default)]
    pub ves: BTreeMap<Name, VeRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node state {path} is corrupt ({reason}): restore it from {path}.bak or move it away to start empty")]
    Corrupt { path: PathBuf, reason: String },
    #[error("node state {path} has version {found}, newer than this vessel ({STATE_VERSION}): upgrade vessel")]
    TooNew { path: PathBuf, found: u32 },
}

impl NodeState {
    pub fn new(config: NodeConfig) -> Self {
        NodeState {
            version: STATE_VERSION,
            config,
            templates: BTreeMap::new(),
            ves: BTreeMap::new(),
        }
    }

    /// Load the state, or `None` if the node has none yet.
    pub fn load(path: &Path) -> Result<Option<NodeState>, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    what: "read",
                    path: path.into(),
                    source,
                })
            }
        };
        Self::decode(path, &bytes).map(Some)
    }

    pub fn decode(path: &Path, bytes: &[u8]) -> Result<NodeState, StateError> {
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.into(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        let found = v
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| corrupt("no version".into()))? as u32;
        if found > STATE_VERSION {
            return Err(StateError::TooNew {
                path: path.into(),
                found,
            });
        }
        // Version 1 is the first format; later versions add migrations here.
        serde_json::from_value(v).map_err(|e| corrupt(e.to_string()))
    }

    /// Replace the state file atomically; the previous one is kept as `.bak`.
    pub fn save(&self, path: &Path) -> Result<(), StateError> {
        let io = |what: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| StateError::Io { what, path: p, source }
        };
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        if path.exists() {
            let _ = std::fs::copy(path, path.with_extension("json.bak"));
        }
        std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl VeRecord {
    /// A VE just placed on this node: stopped, never started, made now.
    pub fn new(spec: VeSpec, template_id: String, slot: u32) -> VeRecord {
        VeRecord {
            spec,
            template_id,
            slot,
            status: VeStatus::Stopped,
            pid: None,
            pid_start: None,
            user_stopped: false,
            created_unix: vessel_ve::now_unix(),
            started_unix: None,
            last_exit: None,
            last_error: None,
            restart_pending: false,
            resume: false,
            rescue: false,
            generation: 0,
        }
    }

    pub fn info(&self) -> VeInfo {
        VeInfo {
            spec: self.spec.clone(),
            status: self.status,
            pid: self.pid.map(|p| p as u32),
            uid_base: crate::alloc::uid_base(self.slot),
            uid_count: crate::alloc::UID_COUNT,
            template_id: self.template_id.clone(),
            created_unix: self.created_unix,
            started_unix: self.started_unix,
            last_exit: self.last_exit,
            last_error: self.last_error.clone(),
            memory_used: None,
            restart_pending: self.restart_pending,
            console_lost: false,
            host_interface: String::new(),
            mac: String::new(),
            rescue: self.rescue,
            fs: None,
            replicas: Vec::new(),
            last_scrub: None,
            node: String::new(),
            pending: None,
            generation: self.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig {
            bridge: "vessel0".into(),
            subnet: Ipv4Cidr::parse("10.213.0.0/16").unwrap(),
            cgroup_parent: "vessel".into(),
        }
    }

    #[test]
    fn save_load_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        assert!(NodeState::load(&p).unwrap().is_none());
        let mut s = NodeState::new(cfg());
        let spec = VeSpec::new(Name::parse("a").unwrap(), Name::parse("busybox").unwrap());
        s.ves.insert(
            spec.name.clone(),
            VeRecord {
                created_unix: 1,
                ..VeRecord::new(spec, "x".into(), 0)
            },
        );
        s.save(&p).unwrap();
        s.save(&p).unwrap();
        assert_eq!(NodeState::load(&p).unwrap().unwrap(), s);
        assert!(p.with_extension("json.bak").exists());
    }

    #[test]
    fn corrupt_and_future_states_are_refused_with_advice() {
        let p = Path::new("/x/state.json");
        let e = NodeState::decode(p, b"{not json").unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        let e = NodeState::decode(p, br#"{"version": 9, "config": {}}"#).unwrap_err();
        assert!(matches!(e, StateError::TooNew { found: 9, .. }));
        let e = NodeState::decode(p, br#"{"version": 1}"#).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }));
    }
}
