//! Resource limits of a VE. They are caps enforced by cgroups, never reservations: a VE with
//! `memory_max = 512M` uses only what its processes touch.

use serde::{Deserialize, Serialize};

/// Smallest memory cap we accept; below this not even an init and a shell fit.
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest CPU count accepted for `--cpus`.
pub const MAX_CPUS: f64 = 4096.0;
/// CFS period used to express `--cpus` as a quota.
pub const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Hard memory cap in bytes (`memory.max` / `memory.limit_in_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// Soft memory mark in bytes: reclaimed last under host pressure (`memory.low` /
    /// `memory.soft_limit_in_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_low: Option<u64>,
    /// CPU quota in CPUs (0.5 = half of one CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Relative CPU weight, 1..=10000 (cgroup v2 scale; mapped to shares on v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// Maximum number of tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    /// Disk quota of the VE's private files in bytes (template files are shared and not
    /// counted); a full quota gives ENOSPC inside the VE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<u64>,
    /// Quota of private inodes (files, directories, links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
    /// How long the file history is kept, in seconds (default 24 h); older changes are
    /// compacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitsError {
    #[error("memory limit {0} bytes is below the minimum of 8M")]
    MemoryTooSmall(u64),
    #[error("memory soft mark ({low} bytes) is above the memory limit ({max} bytes)")]
    LowAboveMax { low: u64, max: u64 },
    #[error("cpus must be a number above 0 and at most {MAX_CPUS} (got {0})")]
    BadCpus(f64),
    #[error("cpu weight must be within 1..=10000 (got {0})")]
    BadWeight(u64),
    #[error("pids limit must be at least 8 (got {0})")]
    PidsTooSmall(u64),
    #[error("disk quota must be at least 1M (got {0} bytes)")]
    DiskTooSmall(u64),
    #[error("inode quota must be at least 16 (got {0})")]
    InodesTooSmall(u64),
    #[error("history must be kept at least 1 second and at most 10 years (got {0} s)")]
    BadHistory(u64),
}

impl Limits {
    pub fn validate(&self) -> Result<(), LimitsError> {
        if let Some(m) = self.memory_max {
            if m < MIN_MEMORY {
                return Err(LimitsError::MemoryTooSmall(m));
            }
        }
        if let (Some(low), Some(max)) = (self.memory_low, self.memory_max) {
            if low > max {
                return Err(LimitsError::LowAboveMax { low, max });
            }
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0 && c <= MAX_CPUS) {
                return Err(LimitsError::BadCpus(c));
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(LimitsError::BadWeight(w));
            }
        }
        if let Some(p) = self.pids_max {
            if p < 8 {
                return Err(LimitsError::PidsTooSmall(p));
            }
        }
        if let Some(d) = self.disk {
            if d < 1 << 20 {
                return Err(LimitsError::DiskTooSmall(d));
            }
        }
        if let Some(i) = self.inodes {
            if i < 16 {
                return Err(LimitsError::InodesTooSmall(i));
            }
        }
        if let Some(h) = self.history {
            if !(1..=10 * 365 * 86400).contains(&h) {
                return Err(LimitsError::BadHistory(h));
            }
        }
        Ok(())
    }

    /// Overlay `change` on top of `self`: fields set in `change` win.
    pub fn merged(&self, change: &Limits) -> Limits {
        Limits {
            memory_max: change.memory_max.or(self.memory_max),
            memory_low: change.memory_low.or(self.memory_low),
            cpus: change.cpus.or(self.cpus),
            cpu_weight: change.cpu_weight.or(self.cpu_weight),
            pids_max: change.pids_max.or(self.pids_max),
            disk: change.disk.or(self.disk),
            inodes: change.inodes.or(self.inodes),
            history: change.history.or(self.history),
        }
    }

    /// CFS quota in microseconds per [`CPU_PERIOD_US`], if a CPU cap is set.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpus.map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
    }

    /// v1 `cpu.shares` for the v2-scale weight (v2 default 100 = v1 default 1024).
    pub fn cpu_shares(&self) -> Option<u64> {
        self.cpu_weight.map(|w| (w * 1024 / 100).clamp(2, 262_144))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_ranges() {
        assert!(Limits::default().validate().is_ok());
        let l = Limits {
            memory_max: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(l.validate(), Err(LimitsError::MemoryTooSmall(1 << 20)));
        let l = Limits {
            cpus: Some(0.0),
            ..Default::default()
        };
        assert!(matches!(l.validate(), Err(LimitsError::BadCpus(_))));
        let l = Limits {
            cpus: Some(f64::NAN),
            ..Default::default()
        };
        assert!(matches!(l.validate(), Err(LimitsError::BadCpus(_))));
        let l = Limits {
            pids_max: Some(1),
            ..Default::default()
        };
        assert_eq!(l.validate(), Err(LimitsError::PidsTooSmall(1)));
        let l = Limits {
            memory_max: Some(64 << 20),
            memory_low: Some(128 << 20),
            ..Default::default()
        };
        assert!(matches!(l.validate(), Err(LimitsError::LowAboveMax { .. })));
    }

    #[test]
    fn cpu_conversions() {
        let l = Limits {
            cpus: Some(0.5),
            cpu_weight: Some(100),
            ..Default::default()
        };
        assert_eq!(l.cpu_quota_us(), Some(50_000));
        assert_eq!(l.cpu_shares(), Some(1024));
    }

    #[test]
    fn merge_prefers_change() {
        let base = Limits {
            memory_max: Some(256 << 20),
            pids_max: Some(100),
            ..Default::default()
        };
        let ch = Limits {
            memory_max: Some(512 << 20),
            ..Default::default()
        };
        let m = base.merged(&ch);
        assert_eq!(m.memory_max, Some(512 << 20));
        assert_eq!(m.pids_max, Some(100));
    }
}
