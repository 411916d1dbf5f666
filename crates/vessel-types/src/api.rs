//! The node API: versioned requests and responses exchanged as JSON frames over the
//! daemon's Unix socket. The CLI sends exactly these types; the daemon answers with them.
//!
//! Wire format (version [`API_VERSION`]): each frame is a 4-byte big-endian length followed
//! by that many bytes of JSON `{"v": 1, "body": ...}`. File descriptors (the caller's stdio
//! for `exec`, a pty master back to the caller) travel as `SCM_RIGHTS` on the frame they
//! belong to. A request gets zero or more `Progress` frames, then one final frame.

use crate::{Ipv4Cidr, Limits, Name, RestartPolicy, VeSpec, VeStatus};
use serde::{Deserialize, Serialize};

/// Version of the wire format. Bumped on any incompatible change; a peer speaking another
/// version gets `ErrorCode::VersionMismatch` and a message saying which side to upgrade.
pub const API_VERSION: u32 = 1;
/// Largest reply frame (the daemon writes replies; a VE list or a diff can be long). Bad
/// input must not make either side allocate without bound.
pub const MAX_FRAME: usize = 16 << 20;
/// Largest request frame of every kind but `ve-exec`: specs, names and paths are small.
/// Large payloads (imports, exports) travel through passed fds, never in frames.
pub const MAX_REQUEST_FRAME: usize = 64 << 10;
/// Largest `ve-exec` request: its argv may carry a script (`sh -c ...`); Linux caps one
/// argument at 128 KiB (`MAX_ARG_STRLEN`), so this fits one such argument plus the rest.
pub const MAX_EXEC_FRAME: usize = 256 << 10;
/// Largest request frame of any kind: the daemon refuses a longer declared length before
/// reading any of it.
pub const MAX_ANY_REQUEST_FRAME: usize = MAX_EXEC_FRAME;
const _: () = assert!(MAX_ANY_REQUEST_FRAME >= MAX_EXEC_FRAME && MAX_EXEC_FRAME > MAX_REQUEST_FRAME);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    pub body: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    Busybox,
    Debian,
}

impl std::str::FromStr for TemplateKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "busybox" => Ok(TemplateKind::Busybox),
            "debian" => Ok(TemplateKind::Debian),
            _ => Err(format!("unknown template kind '{s}': use busybox or debian")),
        }
    }
}

/// Changes to a VE; fields left `None` keep their value. Limits apply live.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VeChange {
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_password_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u8>,
}

impl VeChange {
    /// The spec after this change (not yet validated).
    pub fn apply_to(&self, spec: &VeSpec) -> VeSpec {
        let mut s = spec.clone();
        s.limits = spec.limits.merged(&self.limits);
        if let Some(h) = &self.hostname {
            s.hostname = Some(h.clone());
        }
        if let Some(h) = &self.root_password_hash {
            s.root_password_hash = Some(h.clone());
        }
        if let Some(k) = &self.ssh_keys {
            s.ssh_keys = k.clone();
        }
        if let Some(e) = &self.env {
            s.env = e.clone();
        }
        if let Some(r) = self.restart {
            s.restart = r;
        }
        if let Some(d) = &self.dns {
            s.dns = d.clone();
        }
        if let Some(n) = self.replicas {
            s.replicas = Some(n);
        }
        if let Some(m) = self.min_replicas {
            s.min_replicas = Some(m);
        }
        s
    }

    /// True when the change touches settings read only at VE start (the init's environment).
    pub fn needs_restart(&self) -> bool {
        self.env.is_some()
    }
}

/// Where in the cluster a new VE may go (`ve create --node N --label k=v`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceRules {
    /// Only this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes with all these labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl PlaceRules {
    pub fn is_empty(&self) -> bool {
        self.node.is_none() && self.labels.is_empty()
    }
}

/// Largest frame a request with this `op` may have ([`MAX_REQUEST_FRAME`] but for exec).
pub fn request_frame_limit(op: &str) -> usize {
    match op {
        "ve-exec" => MAX_EXEC_FRAME,
        _ => MAX_REQUEST_FRAME,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// The cluster's nodes and leader.
    NodeList,
    /// Drain a node (it takes no new VEs and its VEs move elsewhere) or undrain it.
    NodeDrain {
        name: String,
        drain: bool,
    },
    /// Forget a lost node (and revoke its certificate); `force`: even if it has VEs.
    NodeRemove {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Make the cluster CA and this node's certificate, serve the node-to-node port, and
    /// make a join token (`vessel cluster init`).
    ClusterInit {
        /// How long the first join token is valid.
        token_ttl_secs: u64,
    },
    /// A new join token (`vessel cluster token`).
    ClusterToken {
        ttl_secs: u64,
    },
    TemplateBuild {
        kind: TemplateKind,
        /// Name to register the template under; defaults to the kind.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Name>,
    },
    TemplateList,
    TemplateShow {
        name: Name,
    },
    TemplateRemove {
        name: Name,
    },
    VeCreate {
        spec: VeSpec,
        #[serde(default)]
        start: bool,
        /// Where in the cluster it may go.
        #[serde(default, skip_serializing_if = "PlaceRules::is_empty")]
        place: PlaceRules,
    },
    VeList,
    VeShow {
        name: Name,
    },
    VeStart {
        name: Name,
    },
    VeStop {
        name: Name,
        /// Seconds to wait after the graceful signal before killing.
        timeout_secs: u64,
    },
    VeRestart {
        name: Name,
        timeout_secs: u64,
    },
    VeDestroy {
        name: Name,
        /// Stop a running VE first instead of refusing.
        #[serde(default)]
        force: bool,
    },
    VeSet {
        name: Name,
        change: VeChange,
    },
    /// Run a command in a running VE. Without `tty` the request frame carries the caller's
    /// stdin, stdout and stderr as three fds. With `tty` the reply `ExecStarted` carries the
    /// pty master. The final reply is `Exit`.
    VeExec {
        name: Name,
        argv: Vec<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// Attach to the init's console: after `ConsoleAttached` the connection carries raw bytes
    /// both ways until the caller closes it.
    VeConsole {
        name: Name,
    },
    /// The console log: `Logs` (UTF-8, invalid sequences replaced), or with `raw` the exact
    /// bytes as `LogBytes`.
    VeLogs {
        name: Name,
        /// Only the last N bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        raw: bool,
    },
    /// What the VE changed relative to its template (under `path`, default everything).
    VeDiff {
        name: Name,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// The transactions that touched a path.
    VeHistory {
        name: Name,
        path: String,
    },
    /// Bring one file or directory back to a point in time or to the template's version.
    VeRevert {
        name: Name,
        path: String,
        to: RepairPoint,
    },
    /// The whole VE back to a point in time (stopped for it, started again if it ran).
    VeRollback {
        name: Name,
        to: RepairPoint,
    },
    /// Write the VE's export (a tar stream: description + its changes over the template)
    /// to the fd this request carries.
    VeExport {
        name: Name,
    },
    /// Create a VE from an export stream read from the fd this request carries (the same
    /// template must be on the node). `name` overrides the exported name.
    VeImport {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<Name>,
        #[serde(default)]
        start: bool,
    },
    /// Boot from the pristine template with the VE's own tree at /mnt/ve (`end`: back to
    /// normal).
    VeRescue {
        name: Name,
        #[serde(default)]
        end: bool,
    },
    /// Compare the copies of a VE's volume (a hash tree over each copy's tree and contents).
    VeScrub {
        name: Name,
        /// Drop each copy that differs (or could not be compared) from the volume's record:
        /// another copy is picked and seeded from the writer's.
        #[serde(default)]
        repair: bool,
    },
    /// Fetch a template from a node that has it (`from`, else any), verify every file
    /// against its manifest and content address, and register it here.
    TemplateFetch {
        name: Name,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// Move a VE to another node, cold: stopped, its volume copied (history included),
    /// started there if it ran.
    VeMove {
        name: Name,
        to: String,
    },
    /// Node to node, during a move: take VE `name` from node `from` (pull its stopped
    /// volume, verify it, make its record here; not started). Answered with `Moved`.
    VeMoveIn {
        name: Name,
        from: String,
    },
    /// Node to node, during a move of a replicated VE to a node with an in-sync copy: the
    /// volume's record names this node as the writer already; take this node's copy of
    /// VE `name` as the VE's volume and make its record here (not started). Answered
    /// with `Moved` (nothing copied).
    VeAdoptCopy {
        name: Name,
        from: String,
    },
}

/// A point in a VE's file history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RepairPoint {
    /// The state as of this time (ns since the Unix epoch).
    Time { ns: i64 },
    /// The template's version (before the VE's first change).
    Template,
}

/// One changed path relative to the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffItem {
    pub path: String,
    /// added, modified or deleted; `truncated` for a last item that says how many changes
    /// an answer too large for one reply left out (its path holds the note)
    pub change: String,
    /// file, dir, symlink, fifo, socket, chardev, blockdev
    pub kind: String,
    pub size: u64,
}

/// One transaction in a path's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryItem {
    pub seq: u64,
    pub time_ns: i64,
    pub path: String,
    pub what: String,
}

/// The VE's file system (vessel-fs volume).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsInfo {
    /// Bytes of the VE's own files (template files are shared, not counted).
    pub used_bytes: u64,
    pub used_inodes: u64,
    /// Size of the transaction log on disk.
    pub log_bytes: u64,
    /// Seq of the last transaction.
    pub last_seq: u64,
    /// The oldest point `revert`/`rollback` can return to (ns since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_ns: Option<i64>,
    /// Where the volume's time went since it was mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<FsProfile>,
}

/// One FUSE opcode's figures: requests and time in the handler.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsOpStat {
    pub op: String,
    pub count: u64,
    pub ns: u64,
}

/// A volume's counters since it was mounted: requests by opcode, transactions, time waiting
/// for and holding the volume lock, log syncs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsProfile {
    /// Opcodes that were seen, in a fixed order.
    pub ops: Vec<FsOpStat>,
    pub txs: u64,
    pub lock_wait_ns: u64,
    pub lock_hold_ns: u64,
    pub syncs: u64,
    pub sync_ns: u64,
}

impl FsProfile {
    /// `self - earlier`, field by field: the profile of what ran in between.
    pub fn since(&self, earlier: &FsProfile) -> FsProfile {
        let before = |op: &str| earlier.ops.iter().find(|o| o.op == op).cloned().unwrap_or_default();
        FsProfile {
            ops: self
                .ops
                .iter()
                .map(|o| {
                    let b = before(&o.op);
                    FsOpStat {
                        op: o.op.clone(),
                        count: o.count.saturating_sub(b.count),
                        ns: o.ns.saturating_sub(b.ns),
                    }
                })
                .filter(|o| o.count > 0)
                .collect(),
            txs: self.txs.saturating_sub(earlier.txs),
            lock_wait_ns: self.lock_wait_ns.saturating_sub(earlier.lock_wait_ns),
            lock_hold_ns: self.lock_hold_ns.saturating_sub(earlier.lock_hold_ns),
            syncs: self.syncs.saturating_sub(earlier.syncs),
            sync_ns: self.sync_ns.saturating_sub(earlier.sync_ns),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    /// The object is in a state that does not allow the operation (e.g. start a running VE).
    Conflict,
    /// No room: addresses, uid ranges, disk.
    Exhausted,
    VersionMismatch,
    /// The daemon serves as many connections as it is configured for: try again.
    Busy,
    /// Something the node depends on (the control store) does not answer now.
    Unavailable,
    /// The caller may not do this (node-to-node: no node certificate of the cluster).
    PermissionDenied,
    Internal,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: String,
    pub api_version: u32,
    pub pid: u32,
    pub root: String,
    pub socket: String,
    pub bridge: String,
    pub subnet: Ipv4Cidr,
    pub cgroup: String,
    pub ves_total: usize,
    pub ves_running: usize,
    pub templates: usize,
    pub uptime_secs: u64,
}

/// The cluster as this node sees it (`vessel node list`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    pub this_node: String,
    /// The control store's client URLs.
    pub etcd: Vec<String>,
    /// The store is this node's private one-member etcd.
    pub private_etcd: bool,
    pub leader: Option<String>,
    /// Why this node is not registered right now, if it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    pub nodes: Vec<ClusterNode>,
}

/// What a node tells the cluster about itself (stored in the control store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Where other nodes reach its API (host:port).
    pub address: String,
    pub cpus: u32,
    pub memory: u64,
    pub disk: u64,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Vessel version the node runs.
    pub version: String,
    /// Draining: it takes no new VEs and its VEs move elsewhere.
    #[serde(default)]
    pub draining: bool,
    /// When it registered (ns since the epoch).
    pub since_ns: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterNode {
    #[serde(flatten)]
    pub node: NodeRecord,
    /// ready, draining or lost (its lease expired).
    pub state: String,
    pub leader: bool,
    /// VEs placed on it.
    #[serde(default)]
    pub ves: usize,
    /// The memory its VEs request (`--memory-low`), against its `memory`.
    #[serde(default)]
    pub memory_requested: u64,
    /// Seconds since its lease was last renewed (a live node only; etcd counts in seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_secs_ago: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: Name,
    pub kind: TemplateKind,
    /// Content address: sha256 of the manifest.
    pub id: String,
    pub files: u64,
    pub bytes: u64,
    pub created_unix: u64,
    /// VEs using this template.
    pub used_by: Vec<Name>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VeInfo {
    pub spec: VeSpec,
    pub status: VeStatus,
    /// Host pid of the VE's init while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// First host uid/gid of the VE's range; VE uid N is host uid `uid_base + N`.
    pub uid_base: u32,
    pub uid_count: u32,
    pub template_id: String,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_unix: Option<u64>,
    /// Exit code of the last init run (negative: killed by that signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Memory the VE's processes use now, in bytes (running VEs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used: Option<u64>,
    /// True when a setting changed since start that only applies after a restart.
    #[serde(default)]
    pub restart_pending: bool,
    /// Console is unavailable (the daemon re-attached to a VE it did not start).
    #[serde(default)]
    pub console_lost: bool,
    /// Host end of the VE's veth on the node bridge.
    #[serde(default)]
    pub host_interface: String,
    /// MAC of the VE's `eth0`, the only one its bridge port admits (empty without an address).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// Booted in rescue mode (pristine template root, the VE's tree at /mnt/ve).
    #[serde(default)]
    pub rescue: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsInfo>,
    /// The node it is on (empty: not placed yet).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Why it is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// The generation of its spec in the cluster that its node last applied.
    #[serde(default)]
    pub generation: u64,
    /// The other copies of its volume, as its writer sees them (running, replicated VEs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaInfo>,
    /// The last comparison of its copies (`ve scrub`, by hand or on the writer's schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scrub: Option<ScrubReport>,
}

/// Version of [`ScrubReport`] as the control store keeps it (`/vessel/v1/ves/<ve>/scrub`).
pub const SCRUB_REPORT_VERSION: u32 = 1;

/// The outcome of one scrub of a VE's copies, kept in the control store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    pub version: u32,
    /// When it finished (seconds since the epoch).
    pub at_unix: u64,
    /// Run by the writer's schedule (`[replication] scrub_interval`), not by hand.
    pub scheduled: bool,
    /// The writer's copy first.
    pub copies: Vec<ScrubCopy>,
}

impl ScrubReport {
    /// The copies that differ from the writer's or could not be compared.
    pub fn bad(&self) -> Vec<&str> {
        self.copies
            .iter()
            .filter(|c| !c.differences.is_empty() || c.error.is_some())
            .map(|c| c.node.as_str())
            .collect()
    }

    /// One line for people: "all 3 copies the same" or what is wrong.
    pub fn verdict(&self) -> String {
        let bad = self.bad();
        if bad.is_empty() {
            format!("all {} copies the same", self.copies.len())
        } else {
            format!(
                "{} of {} copies differ or were not compared ({})",
                bad.len(),
                self.copies.len(),
                bad.join(", ")
            )
        }
    }
}

/// One copy of a VE's volume, as `ve scrub` compared it with the writer's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubCopy {
    pub node: String,
    /// The transaction the copy's hash tree was taken at.
    pub seq: u64,
    /// The root of its hash tree (hex).
    pub root: String,
    /// How it differs from the writer's copy (empty: the same).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<String>,
    /// Why it could not be compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One copy of a VE's volume on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub node: String,
    /// "in-sync", "catching up", or why it is not (e.g. "unreachable: ...").
    pub state: String,
    pub in_sync: bool,
    /// The last transaction it holds durably.
    pub durable_seq: u64,
    /// How far it trails the writer, in transactions and in bytes (of those the writer
    /// still holds in memory).
    pub lag_txs: u64,
    pub lag_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Response {
    Ok,
    Error(ApiError),
    /// Progress of a long operation: `done` of `total` steps (total 0 = unknown).
    Progress {
        message: String,
        done: u64,
        total: u64,
    },
    Status(NodeStatus),
    Cluster(ClusterView),
    Templates {
        templates: Vec<TemplateInfo>,
    },
    Template(TemplateInfo),
    Ves {
        ves: Vec<VeInfo>,
    },
    Ve(Box<VeInfo>),
    ExecStarted,
    Exit {
        code: i32,
    },
    ConsoleAttached,
    Logs {
        text: String,
    },
    /// The console log's exact bytes (at most two rotation files of 1 MiB).
    LogBytes {
        data: Vec<u8>,
    },
    Diff {
        entries: Vec<DiffItem>,
    },
    History {
        entries: Vec<HistoryItem>,
    },
    /// What a revert or rollback changed.
    Reverted {
        changed: Vec<String>,
    },
    /// Each copy of a VE's volume as a scrub found it (the writer's first).
    Scrubbed {
        copies: Vec<ScrubCopy>,
    },
    JoinToken(JoinTokenInfo),
    /// What a move or fetch copied.
    Moved {
        items: u64,
        bytes: u64,
        /// The VE's address on its new node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ip: Option<crate::Ipv4Cidr>,
    },
}

/// A join token and how to use it (`vessel cluster init|token`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenInfo {
    /// `vessel1.<id>.<secret>.<pin>`: a secret, shown once.
    pub token: String,
    /// The node to join through (host:port).
    pub join: String,
    /// The command to run on the new machine.
    pub command: String,
    /// How long it is valid from its making.
    pub ttl_secs: u64,
    pub expires_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_stable() {
        let r = Envelope {
            v: API_VERSION,
            body: Request::VeStart {
                name: Name::parse("web").unwrap(),
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"v":1,"body":{"op":"ve-start","name":"web"}}"#);
        let back: Envelope<Request> = serde_json::from_str(&s).unwrap();
        assert!(matches!(back.body, Request::VeStart { .. }));
    }

    #[test]
    fn exec_alone_may_use_a_larger_frame() {
        assert_eq!(request_frame_limit("ve-exec"), MAX_EXEC_FRAME);
        assert_eq!(request_frame_limit("ve-create"), MAX_REQUEST_FRAME);
        assert_eq!(request_frame_limit("no-such-op"), MAX_REQUEST_FRAME);
        // The names above are the wire names of the ops.
        let exec = Request::VeExec {
            name: Name::parse("a").unwrap(),
            argv: vec!["x".into()],
            tty: false,
            env: vec![],
            cwd: None,
        };
        assert!(serde_json::to_string(&exec).unwrap().contains(r#""op":"ve-exec""#));
        let busy = serde_json::to_string(&ErrorCode::Busy).unwrap();
        assert_eq!(busy, r#""busy""#);
    }

    #[test]
    fn bad_names_rejected_at_decode() {
        let s = r#"{"v":1,"body":{"op":"ve-show","name":"../../etc"}}"#;
        assert!(serde_json::from_str::<Envelope<Request>>(s).is_err());
    }

    #[test]
    fn change_applies_and_flags_restart() {
        let spec = VeSpec::new(Name::parse("a").unwrap(), Name::parse("busybox").unwrap());
        let ch = VeChange {
            limits: Limits {
                pids_max: Some(64),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!ch.needs_restart());
        assert_eq!(ch.apply_to(&spec).limits.pids_max, Some(64));
        let ch = VeChange {
            hostname: Some("h".into()),
            ..Default::default()
        };
        assert!(!ch.needs_restart(), "the hostname applies live");
        assert_eq!(ch.apply_to(&spec).hostname(), "h");
        let ch = VeChange {
            env: Some(vec!["A=1".into()]),
            ..Default::default()
        };
        assert!(ch.needs_restart());
    }
}
