//! Live resource limits through cgroups, v1 and v2. libcontainer creates a VE's cgroups
//! and applies the limits at start; this module changes them while the VE runs and reads
//! usage. The decision of what to write is a pure function ([`limit_writes`]); the cgroup
//! file system root is a parameter so tests can point it at a temporary directory.

use std::path::{Path, PathBuf};
use vessel_types::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    /// v2 only when `/sys/fs/cgroup` itself is the unified hierarchy; a hybrid layout
    /// (v1 controllers plus an almost empty unified mount) counts as v1.
    pub fn detect(cgroup_root: &Path) -> CgroupVersion {
        if cgroup_root.join("cgroup.controllers").exists() {
            CgroupVersion::V2
        } else {
            CgroupVersion::V1
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

/// One file write: (v1 controller or "" on v2, file name, value).
pub type CgWrite = (&'static str, &'static str, String);

/// What to write so the cgroup enforces `l`. Unset limits are written as "no limit", so
/// this also lifts a limit that was removed.
pub fn limit_writes(v: CgroupVersion, l: &Limits) -> Vec<CgWrite> {
    let mut w = Vec::new();
    match v {
        CgroupVersion::V1 => {
            w.push((
                "memory",
                "memory.limit_in_bytes",
                l.memory_max.map_or("-1".into(), |m| m.to_string()),
            ));
            w.push((
                "memory",
                "memory.soft_limit_in_bytes",
                l.memory_low.map_or("-1".into(), |m| m.to_string()),
            ));
            w.push((
                "cpu",
                "cpu.cfs_period_us",
                vessel_types::limits::CPU_PERIOD_US.to_string(),
            ));
            w.push((
                "cpu",
                "cpu.cfs_quota_us",
                l.cpu_quota_us().map_or("-1".into(), |q| q.to_string()),
            ));
            w.push(("cpu", "cpu.shares", l.cpu_shares().unwrap_or(1024).to_string()));
            w.push(("pids", "pids.max", l.pids_max.map_or("max".into(), |p| p.to_string())));
        }
        CgroupVersion::V2 => {
            w.push(("", "memory.max", l.memory_max.map_or("max".into(), |m| m.to_string())));
            w.push(("", "memory.low", l.memory_low.unwrap_or(0).to_string()));
            let quota = l.cpu_quota_us().map_or("max".into(), |q| q.to_string());
            w.push((
                "",
                "cpu.max",
                format!("{quota} {}", vessel_types::limits::CPU_PERIOD_US),
            ));
            w.push(("", "cpu.weight", l.cpu_weight.unwrap_or(100).to_string()));
            w.push(("", "pids.max", l.pids_max.map_or("max".into(), |p| p.to_string())));
        }
    }
    w
}

/// A VE's cgroup: `<parent>/<name>` in each hierarchy under `root` (normally /sys/fs/cgroup).
#[derive(Debug, Clone)]
pub struct VeCgroup {
    pub root: PathBuf,
    pub version: CgroupVersion,
    /// Relative path, e.g. `vessel/web`.
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {file}: {source}")]
pub struct CgroupError {
    pub file: PathBuf,
    pub source: std::io::Error,
}

impl VeCgroup {
    pub fn new(root: impl Into<PathBuf>, parent: &str, name: &str) -> Self {
        let root = root.into();
        let version = CgroupVersion::detect(&root);
        VeCgroup {
            root,
            version,
            path: format!("{parent}/{name}"),
        }
    }

    fn dir(&self, controller: &str) -> PathBuf {
        match self.version {
            CgroupVersion::V2 => self.root.join(&self.path),
            CgroupVersion::V1 => self.root.join(controller).join(&self.path),
        }
    }

    /// Apply `limits` now. Memory cap is written last when shrinking would fail otherwise
    /// is the kernel's business: an error says which file refused which value.
    pub fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (ctrl, file, value) in limit_writes(self.version, limits) {
            let p = self.dir(ctrl).join(file);
            if !p.exists() {
                continue; // controller not enabled for this hierarchy (e.g. v2 without cpu)
            }
            std::fs::write(&p, &value).map_err(|source| CgroupError {
                file: p.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Current memory use of the VE in bytes.
    pub fn memory_used(&self) -> Option<u64> {
        let f = match self.version {
            CgroupVersion::V1 => "memory.usage_in_bytes",
            CgroupVersion::V2 => "memory.current",
        };
        std::fs::read_to_string(self.dir("memory").join(f))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Read one limit file back (for tests and `show`).
    pub fn read(&self, controller: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir(controller).join(file))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Every directory this cgroup has on this host (v1: one per mounted controller).
    pub fn dirs(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V2 => vec![self.dir("")],
            CgroupVersion::V1 => std::fs::read_dir(&self.root)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.path().join(&self.path))
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Remove the (empty) cgroup directories; leftovers after a crash are cleaned here.
    pub fn remove(&self) {
        for d in self.dirs() {
            let _ = std::fs::remove_dir(&d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_writes() {
        let l = Limits {
            memory_max: Some(256 << 20),
            cpus: Some(0.5),
            pids_max: Some(128),
            ..Default::default()
        };
        let w = limit_writes(CgroupVersion::V1, &l);
        assert!(w.contains(&("memory", "memory.limit_in_bytes", (256u64 << 20).to_string())));
        assert!(w.contains(&("cpu", "cpu.cfs_quota_us", "50000".into())));
        assert!(w.contains(&("pids", "pids.max", "128".into())));
        let none = limit_writes(CgroupVersion::V1, &Limits::default());
        assert!(none.contains(&("memory", "memory.limit_in_bytes", "-1".into())));
        assert!(none.contains(&("pids", "pids.max", "max".into())));
    }

    #[test]
    fn v2_writes() {
        let l = Limits {
            memory_max: Some(1 << 30),
            cpus: Some(2.0),
            cpu_weight: Some(50),
            ..Default::default()
        };
        let w = limit_writes(CgroupVersion::V2, &l);
        assert!(w.contains(&("", "memory.max", (1u64 << 30).to_string())));
        assert!(w.contains(&("", "cpu.max", "200000 100000".into())));
        assert!(w.contains(&("", "cpu.weight", "50".into())));
        assert!(limit_writes(CgroupVersion::V2, &Limits::default()).contains(&("", "cpu.max", "max 100000".into())));
    }

    #[test]
    fn applies_to_a_fake_v1_tree() {
        let d = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids"] {
            let p = d.path().join(c).join("vt/web");
            std::fs::create_dir_all(&p).unwrap();
        }
        std::fs::write(d.path().join("pids/vt/web/pids.max"), "max").unwrap();
        std::fs::write(d.path().join("memory/vt/web/memory.limit_in_bytes"), "-1").unwrap();
        let cg = VeCgroup::new(d.path(), "vt", "web");
        assert_eq!(cg.version, CgroupVersion::V1);
        cg.apply(&Limits {
            pids_max: Some(64),
            memory_max: Some(64 << 20),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cg.read("pids", "pids.max").as_deref(), Some("64"));
        assert_eq!(
            cg.read("memory", "memory.limit_in_bytes"),
            Some((64u64 << 20).to_string())
        );
        assert_eq!(cg.dirs().len(), 3);
    }
}
