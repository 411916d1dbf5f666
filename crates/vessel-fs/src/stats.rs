//! Where a volume's time goes: FUSE requests by opcode (count and time in the handler),
//! transactions, time spent waiting for and holding the volume lock, and log syncs. Plain
//! relaxed atomics, cheap enough to stay on; read with [`Stats::snapshot`] (shown by
//! `vessel ve show --json` and the fs benchmark's profile).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The FUSE requests vessel-fs answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsOp {
    Lookup,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Release,
    Fsync,
    Opendir,
    Readdir,
    Releasedir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Create,
    Fallocate,
    Lseek,
    Other,
}

const ALL: [FsOp; 30] = [
    FsOp::Lookup,
    FsOp::Getattr,
    FsOp::Setattr,
    FsOp::Readlink,
    FsOp::Mknod,
    FsOp::Mkdir,
    FsOp::Unlink,
    FsOp::Rmdir,
    FsOp::Symlink,
    FsOp::Rename,
    FsOp::Link,
    FsOp::Open,
    FsOp::Read,
    FsOp::Write,
    FsOp::Flush,
    FsOp::Release,
    FsOp::Fsync,
    FsOp::Opendir,
    FsOp::Readdir,
    FsOp::Releasedir,
    FsOp::Fsyncdir,
    FsOp::Statfs,
    FsOp::Setxattr,
    FsOp::Getxattr,
    FsOp::Listxattr,
    FsOp::Removexattr,
    FsOp::Create,
    FsOp::Fallocate,
    FsOp::Lseek,
    FsOp::Other,
];

impl FsOp {
    pub fn name(self) -> &'static str {
        match self {
            FsOp::Lookup => "lookup",
            FsOp::Getattr => "getattr",
            FsOp::Setattr => "setattr",
            FsOp::Readlink => "readlink",
            FsOp::Mknod => "mknod",
            FsOp::Mkdir => "mkdir",
            FsOp::Unlink => "unlink",
            FsOp::Rmdir => "rmdir",
            FsOp::Symlink => "symlink",
            FsOp::Rename => "rename",
            FsOp::Link => "link",
            FsOp::Open => "open",
            FsOp::Read => "read",
            FsOp::Write => "write",
            FsOp::Flush => "flush",
            FsOp::Release => "release",
            FsOp::Fsync => "fsync",
            FsOp::Opendir => "opendir",
            FsOp::Readdir => "readdir",
            FsOp::Releasedir => "releasedir",
            FsOp::Fsyncdir => "fsyncdir",
            FsOp::Statfs => "statfs",
            FsOp::Setxattr => "setxattr",
            FsOp::Getxattr => "getxattr",
            FsOp::Listxattr => "listxattr",
            FsOp::Removexattr => "removexattr",
            FsOp::Create => "create",
            FsOp::Fallocate => "fallocate",
            FsOp::Lseek => "lseek",
            FsOp::Other => "other",
        }
    }
}

#[derive(Default)]
pub struct Stats {
    count: [AtomicU64; ALL.len()],
    ns: [AtomicU64; ALL.len()],
    txs: AtomicU64,
    lock_wait_ns: AtomicU64,
    lock_hold_ns: AtomicU64,
    syncs: AtomicU64,
    sync_ns: AtomicU64,
}

/// Counts the request and its time in the handler when dropped.
pub struct OpTimer<'a> {
    stats: &'a Stats,
    op: FsOp,
    t0: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        let i = self.op as usize;
        self.stats.count[i].fetch_add(1, Ordering::Relaxed);
        self.stats.ns[i].fetch_add(self.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

pub use vessel_types::api::{FsOpStat as OpStat, FsProfile as StatsSnapshot};

impl Stats {
    pub fn time(&self, op: FsOp) -> OpTimer<'_> {
        OpTimer {
            stats: self,
            op,
            t0: Instant::now(),
        }
    }

    pub fn tx(&self) {
        self.txs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lock_times(&self, wait_ns: u64, hold_ns: u64) {
        self.lock_wait_ns.fetch_add(wait_ns, Ordering::Relaxed);
        self.lock_hold_ns.fetch_add(hold_ns, Ordering::Relaxed);
    }

    pub fn sync_done(&self, ns: u64) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            ops: ALL
                .iter()
                .enumerate()
                .filter(|(i, _)| get(&self.count[*i]) > 0)
                .map(|(i, op)| OpStat {
                    op: op.name().to_string(),
                    count: get(&self.count[i]),
                    ns: get(&self.ns[i]),
                })
                .collect(),
            txs: get(&self.txs),
            lock_wait_ns: get(&self.lock_wait_ns),
            lock_hold_ns: get(&self.lock_hold_ns),
            syncs: get(&self.syncs),
            sync_ns: get(&self.sync_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ops_and_differences() {
        let s = Stats::default();
        {
            let _t = s.time(FsOp::Lookup);
        }
        let a = s.snapshot();
        {
            let _t = s.time(FsOp::Lookup);
            let _u = s.time(FsOp::Create);
        }
        s.tx();
        s.sync_done(5);
        let d = s.snapshot().since(&a);
        let names: Vec<(&str, u64)> = d.ops.iter().map(|o| (o.op.as_str(), o.count)).collect();
        assert_eq!(names, vec![("lookup", 1), ("create", 1)]);
        assert_eq!((d.txs, d.syncs, d.sync_ns), (1, 1, 5));
        assert_eq!(
            ALL.iter().map(|o| *o as usize).collect::<Vec<_>>(),
            (0..ALL.len()).collect::<Vec<_>>()
        );
    }
}
