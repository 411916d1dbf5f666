//! Resource limits of a VE. They are caps enforced by cgroups, never reservations: a VE with
//! `memory_max = 512M` uses only what its processes touch.

use serde::{Deserialize, Serialize};

/// Smallest memory cap we accept; below this not even an init and a shell fit.
pub const MIN_MEMORY: u64 = 8 << 20;
/// Largest memory cap or soft mark accepted (1 PiB): more than any host has, and far below
/// the kernel's page counter limit (`PAGE_COUNTER_MAX`), so every accepted value is written
/// to the cgroup as given.
pub const MAX_MEMORY: u64 = 1 << 50;
/// Largest CPU count accepted for `--cpus`.
pub const MAX_CPUS: f64 = 4096.0;
/// Smallest CPU count accepted: the kernel's smallest CFS quota is 1 ms per
/// [`CPU_PERIOD_US`] (100 ms).
pub const MIN_CPUS: f64 = 0.01;
/// Largest pids limit accepted: `PID_MAX_LIMIT` on 64-bit Linux (2^22); no VE can have more
/// tasks than the kernel has pids.
pub const MAX_PIDS: u64 = 1 << 22;
/// Largest disk quota accepted (1 EiB): keeps vessel-fs's byte accounting far from overflow.
pub const MAX_DISK: u64 = 1 << 60;
/// Largest inode quota accepted (2^32). Each private inode costs the daemon about 430 bytes
/// of memory (the volume's in-memory tree), so operators cap this much lower in `node.toml`.
pub const MAX_INODES: u64 = 1 << 32;
/// Longest history retention accepted: 10 years, in seconds.
pub const MAX_HISTORY: u64 = 10 * 365 * 86400;
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
    /// CPU quota in CPUs (0.5 = half of one CPU). Never serialized when not finite: JSON
    /// has no NaN, and `serde_json` would silently write `null` (= no cap) for it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_finite"
    )]
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
    #[error("memory limit {0} bytes is above the maximum of 1P (1125899906842624 bytes)")]
    MemoryTooLarge(u64),
    #[error("memory soft mark {0} bytes is above the maximum of 1P (1125899906842624 bytes)")]
    LowTooLarge(u64),
    #[error("memory soft mark ({low} bytes) is above the memory limit ({max} bytes)")]
    LowAboveMax { low: u64, max: u64 },
    #[error("cpus must be a number from {MIN_CPUS} to {MAX_CPUS} (got {0})")]
    BadCpus(f64),
    #[error("cpu weight must be within 1..=10000 (got {0})")]
    BadWeight(u64),
    #[error("pids limit must be within 8..={MAX_PIDS} (the kernel's pid limit; got {0})")]
    BadPids(u64),
    #[error("disk quota must be within 1M..=1E (got {0} bytes)")]
    BadDisk(u64),
    #[error("inode quota must be within 16..={MAX_INODES} (got {0})")]
    BadInodes(u64),
    #[error("history must be kept at least 1 second and at most 10 years (got {0} s)")]
    BadHistory(u64),
    #[error("{what} {value} is above this node's maximum of {max} (`max.{key}` in the node config): ask the node operator, or ask for less")]
    AboveMax {
        what: &'static str,
        key: &'static str,
        value: String,
        max: String,
    },
}

/// One limit, for messages and the node config: its config key and how people read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Memory,
    MemoryLow,
    Cpus,
    CpuWeight,
    Pids,
    Disk,
    Inodes,
    History,
}

impl Field {
    pub const ALL: [Field; 8] = [
        Field::Memory,
        Field::MemoryLow,
        Field::Cpus,
        Field::CpuWeight,
        Field::Pids,
        Field::Disk,
        Field::Inodes,
        Field::History,
    ];

    /// The key in `node.toml` (the CLI flag is the same with `-` for `_`).
    pub fn key(self) -> &'static str {
        match self {
            Field::Memory => "memory",
            Field::MemoryLow => "memory_low",
            Field::Cpus => "cpus",
            Field::CpuWeight => "cpu_weight",
            Field::Pids => "pids",
            Field::Disk => "disk",
            Field::Inodes => "inodes",
            Field::History => "history",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Field::Memory => "memory limit",
            Field::MemoryLow => "memory soft mark",
            Field::Cpus => "cpus",
            Field::CpuWeight => "cpu weight",
            Field::Pids => "pids limit",
            Field::Disk => "disk quota",
            Field::Inodes => "inode quota",
            Field::History => "history",
        }
    }

    /// True for caps where "not set" means unlimited (so a node maximum also serves as the
    /// default); the others have a kernel or vessel-fs default when not set.
    pub fn unset_is_unlimited(self) -> bool {
        !matches!(self, Field::MemoryLow | Field::CpuWeight | Field::History)
    }
}

/// A value of one limit, compared and printed per its field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitValue {
    Int(u64),
    Cpus(f64),
}

impl LimitValue {
    fn above(self, max: LimitValue) -> bool {
        match (self, max) {
            (LimitValue::Int(a), LimitValue::Int(b)) => a > b,
            (LimitValue::Cpus(a), LimitValue::Cpus(b)) => a > b,
            _ => false,
        }
    }

    /// For people: sizes as `2G`, durations as `1d`.
    pub fn show(self, f: Field) -> String {
        match (f, self) {
            (Field::Memory | Field::MemoryLow | Field::Disk, LimitValue::Int(b)) => crate::size::format_size(b),
            (Field::History, LimitValue::Int(s)) => crate::time::format_duration_secs(s),
            (_, LimitValue::Int(n)) => n.to_string(),
            (_, LimitValue::Cpus(c)) => c.to_string(),
        }
    }
}

fn serialize_finite<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(c) if !c.is_finite() => Err(serde::ser::Error::custom(format!(
            "cpus must be a finite number (got {c})"
        ))),
        v => v.serialize(s),
    }
}

impl Limits {
    /// Check every set limit against what the kernel and vessel-fs accept. The daemon calls
    /// this for every create, set and import; the CLI calls it too, for an early message.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if let Some(m) = self.memory_max {
            if m < MIN_MEMORY {
                return Err(LimitsError::MemoryTooSmall(m));
            }
            if m > MAX_MEMORY {
                return Err(LimitsError::MemoryTooLarge(m));
            }
        }
        if let Some(low) = self.memory_low {
            if low > MAX_MEMORY {
                return Err(LimitsError::LowTooLarge(low));
            }
        }
        if let (Some(low), Some(max)) = (self.memory_low, self.memory_max) {
            if low > max {
                return Err(LimitsError::LowAboveMax { low, max });
            }
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && (MIN_CPUS..=MAX_CPUS).contains(&c)) {
                return Err(LimitsError::BadCpus(c));
            }
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(LimitsError::BadWeight(w));
            }
        }
        if let Some(p) = self.pids_max {
            if !(8..=MAX_PIDS).contains(&p) {
                return Err(LimitsError::BadPids(p));
            }
        }
        if let Some(d) = self.disk {
            if !(1 << 20..=MAX_DISK).contains(&d) {
                return Err(LimitsError::BadDisk(d));
            }
        }
        if let Some(i) = self.inodes {
            if !(16..=MAX_INODES).contains(&i) {
                return Err(LimitsError::BadInodes(i));
            }
        }
        if let Some(h) = self.history {
            if !(1..=MAX_HISTORY).contains(&h) {
                return Err(LimitsError::BadHistory(h));
            }
        }
        Ok(())
    }

    /// The value of one limit, if set.
    pub fn get(&self, f: Field) -> Option<LimitValue> {
        let int = |v: Option<u64>| v.map(LimitValue::Int);
        match f {
            Field::Memory => int(self.memory_max),
            Field::MemoryLow => int(self.memory_low),
            Field::Cpus => self.cpus.map(LimitValue::Cpus),
            Field::CpuWeight => int(self.cpu_weight),
            Field::Pids => int(self.pids_max),
            Field::Disk => int(self.disk),
            Field::Inodes => int(self.inodes),
            Field::History => int(self.history),
        }
    }

    /// Set one limit (`None` clears it). A value of the wrong kind is ignored.
    pub fn set(&mut self, f: Field, v: Option<LimitValue>) {
        let int = |v: Option<LimitValue>| match v {
            Some(LimitValue::Int(n)) => Some(n),
            _ => None,
        };
        match f {
            Field::Memory => self.memory_max = int(v),
            Field::MemoryLow => self.memory_low = int(v),
            Field::Cpus => {
                self.cpus = match v {
                    Some(LimitValue::Cpus(c)) => Some(c),
                    _ => None,
                }
            }
            Field::CpuWeight => self.cpu_weight = int(v),
            Field::Pids => self.pids_max = int(v),
            Field::Disk => self.disk = int(v),
            Field::Inodes => self.inodes = int(v),
            Field::History => self.history = int(v),
        }
    }

    /// Refuse any set limit above the node's maximum for it (`max`: the operator's maxima,
    /// unset = no maximum).
    pub fn check_max(&self, max: &Limits) -> Result<(), LimitsError> {
        for f in Field::ALL {
            if let (Some(v), Some(m)) = (self.get(f), max.get(f)) {
                if v.above(m) {
                    return Err(LimitsError::AboveMax {
                        what: f.what(),
                        key: f.key(),
                        value: v.show(f),
                        max: m.show(f),
                    });
                }
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
        assert_eq!(l.validate(), Err(LimitsError::BadPids(1)));
        let l = Limits {
            memory_max: Some(64 << 20),
            memory_low: Some(128 << 20),
            ..Default::default()
        };
        assert!(matches!(l.validate(), Err(LimitsError::LowAboveMax { .. })));
    }

    fn one(f: Field, v: LimitValue) -> Limits {
        let mut l = Limits::default();
        l.set(f, Some(v));
        l
    }

    #[test]
    fn refuses_values_the_kernel_or_the_fs_would_not_take() {
        use LimitValue::{Cpus, Int};
        let bad = [
            (Field::Memory, Int(u64::MAX)),
            (Field::Memory, Int(MAX_MEMORY + 1)),
            (Field::MemoryLow, Int(u64::MAX)),
            (Field::Cpus, Cpus(f64::NAN)),
            (Field::Cpus, Cpus(f64::INFINITY)),
            (Field::Cpus, Cpus(f64::NEG_INFINITY)),
            (Field::Cpus, Cpus(-1.0)),
            (Field::Cpus, Cpus(0.001)),
            (Field::Cpus, Cpus(4097.0)),
            (Field::CpuWeight, Int(0)),
            (Field::CpuWeight, Int(10_001)),
            (Field::Pids, Int(u64::MAX)),
            (Field::Pids, Int(MAX_PIDS + 1)),
            (Field::Pids, Int(7)),
            (Field::Disk, Int(u64::MAX)),
            (Field::Disk, Int(1000)),
            (Field::Inodes, Int(u64::MAX)),
            (Field::Inodes, Int(15)),
            (Field::History, Int(0)),
            (Field::History, Int(u64::MAX)),
        ];
        for (f, v) in bad {
            let e = one(f, v).validate().expect_err(&format!("{f:?} {v:?} must be refused"));
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.is_empty(), "one line: {msg}");
        }
        let good = [
            (Field::Memory, Int(MAX_MEMORY)),
            (Field::Memory, Int(MIN_MEMORY)),
            (Field::MemoryLow, Int(0)),
            (Field::Cpus, Cpus(MIN_CPUS)),
            (Field::Cpus, Cpus(MAX_CPUS)),
            (Field::CpuWeight, Int(10_000)),
            (Field::Pids, Int(MAX_PIDS)),
            (Field::Disk, Int(MAX_DISK)),
            (Field::Inodes, Int(MAX_INODES)),
            (Field::History, Int(MAX_HISTORY)),
        ];
        for (f, v) in good {
            assert_eq!(one(f, v).validate(), Ok(()), "{f:?} {v:?}");
            assert_eq!(one(f, v).get(f), Some(v));
        }
    }

    #[test]
    fn json_with_out_of_range_numbers_is_refused_or_invalid() {
        // What a client could send straight to the socket.
        for bad in [
            r#"{"cpus": 1e400}"#,
            r#"{"cpus": -1e400}"#,
            r#"{"cpus": "NaN"}"#,
            r#"{"pids_max": -1}"#,
            r#"{"pids_max": 18446744073709551616}"#,
            r#"{"memory_max": 1.5}"#,
            r#"{"inodes": -5}"#,
        ] {
            let decoded: Result<Limits, _> = serde_json::from_str(bad);
            assert!(
                decoded.is_err() || decoded.as_ref().is_ok_and(|l| l.validate().is_err()),
                "{bad} gave {decoded:?}"
            );
        }
        for (json, want) in [
            (r#"{"cpus": -1}"#, "cpus"),
            (r#"{"cpus": 0}"#, "cpus"),
            (r#"{"pids_max": 18446744073709551615}"#, "pids"),
            (r#"{"memory_max": 18446744073709551615}"#, "memory"),
            (r#"{"disk": 18446744073709551615}"#, "disk"),
        ] {
            let l: Limits = serde_json::from_str(json).unwrap();
            assert!(l.validate().unwrap_err().to_string().contains(want), "{json}");
        }
    }

    #[test]
    fn non_finite_cpus_never_serialize_as_no_cap() {
        let l = Limits {
            cpus: Some(f64::NAN),
            ..Default::default()
        };
        assert!(
            serde_json::to_string(&l).is_err(),
            "NaN must not become null (= unlimited)"
        );
        let l = Limits {
            cpus: Some(0.5),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"cpus":0.5}"#);
    }

    #[test]
    fn maxima_refuse_larger_values_with_the_key_to_change() {
        let max = Limits {
            memory_max: Some(4 << 30),
            cpus: Some(2.0),
            pids_max: Some(1000),
            ..Default::default()
        };
        let ok = Limits {
            memory_max: Some(4 << 30),
            cpus: Some(1.5),
            disk: Some(1 << 40),
            ..Default::default()
        };
        assert_eq!(ok.check_max(&max), Ok(()));
        let e = one(Field::Memory, LimitValue::Int(8 << 30))
            .check_max(&max)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "memory limit 8G is above this node's maximum of 4G (`max.memory` in the node config): ask the node operator, or ask for less"
        );
        let e = one(Field::Cpus, LimitValue::Cpus(2.5)).check_max(&max).unwrap_err();
        assert!(e.to_string().contains("max.cpus"), "{e}");
        assert!(one(Field::Pids, LimitValue::Int(1001)).check_max(&max).is_err());
        assert!(Limits::default().check_max(&max).is_ok());
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
