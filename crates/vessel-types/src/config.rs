//! The node operator's settings for the daemon, read from `node.toml` at daemon start: the
//! limits a VE gets when its creator names none, the most any VE may have, and the bounds
//! of the API server. This module is pure (text in, settings or a located error out); the
//! daemon reads the file.
//!
//! ```toml
//! version = 1               # format version of this file (required)
//!
//! [defaults]                # applied at create to every limit the creator left out
//! memory = "2G"             # sizes: "512M", "2G" or bytes; "unlimited" removes a default
//! pids = 4096
//! disk = "20G"
//! inodes = 500000
//! history = "24h"           # durations: "90s", "30m", "24h", "7d" or seconds
//!
//! [max]                     # create/set above these is refused; none by default
//! memory = "64G"
//! cpus = 8
//!
//! [api]
//! max_connections = 64      # more concurrent clients get a `busy` error
//! request_timeout = "30s"   # a request frame must arrive whole within this
//!
//! [cluster]
//! name = "node1"            # this node's name in the cluster (default: the host name)
//! address = "10.0.0.1"      # this node's address on the cluster network (default: none)
//! etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
//!                           # an existing etcd cluster; none: a private one-member etcd
//! client_port = 12379       # the private etcd's ports on 127.0.0.1 (0 or absent: free
//! peer_port = 12380         #   ports, kept from one start to the next while free)
//! lease_ttl = "2s"          # a node that does not renew its lease this long is lost
//! replica_grace = "10s"     # a copy on a node lost this long is dropped and replaced
//! address = "10.0.0.5"      # where other nodes reach this one (default 127.0.0.1)
//! port = 7150               # the node-to-node port (mutual TLS), served once the
//!                           #   cluster is initialized (`vessel cluster init` or a join)
//!
//! [replication]
//! scrub_interval = "7d"     # compare the copies of each replicated VE this node writes
//!                           #   this often (`vessel ve scrub` on a schedule); 0: never
//! ```
//!
//! Keys in `[defaults]` and `[max]`: memory, memory_low, cpus, cpu_weight, pids, disk,
//! inodes, history. A cap with a maximum and no default (memory, cpus, pids, disk, inodes)
//! defaults to its maximum, so a node with maxima never creates an unlimited VE.

use crate::limits::{Field, LimitValue, Limits, LimitsError};
use crate::size::parse_size;
use crate::time::parse_duration_secs;
use toml_edit::{Item, TableLike};

/// Version of the `node.toml` format this vessel reads.
pub const CONFIG_VERSION: i64 = 1;
/// File name of the node config in the node's data directory.
pub const CONFIG_FILE: &str = "node.toml";

/// Built-in default limits (a VE created without `--memory` etc. gets these unless the
/// node config says otherwise). Chosen so that one VE cannot take a small node down, while
/// ordinary services never meet them:
/// * memory 2G: a cap, not a reservation; a typical web or database VE fits, a runaway
///   process is killed inside its VE instead of pressing the host.
/// * pids 4096: far above what a service needs (a Debian VE idles at ~10 tasks), far
///   below the host's pid space, so a fork bomb stops at its own VE.
/// * disk 20G: the VE's own files (template files are shared and not counted).
/// * inodes 500,000: each private inode costs the daemon about 430 bytes of memory (the
///   volume's in-memory tree) and one host file, so this bounds one VE's share of the
///   daemon's memory to about 200 MB in the worst case.
/// * history 24h: the file history `ve revert`/`ve rollback` can return into.
pub fn builtin_defaults() -> Limits {
    Limits {
        memory_max: Some(2 << 30),
        pids_max: Some(4096),
        disk: Some(20 << 30),
        inodes: Some(500_000),
        history: Some(86_400),
        ..Limits::default()
    }
}

/// Default bound on concurrent API connections: each holds one daemon thread.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default time a client has to send one whole request frame.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
const MAX_MAX_CONNECTIONS: u64 = 4096;
const MAX_REQUEST_TIMEOUT_SECS: u64 = 3600;

/// How the node takes part in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// This node's name (None: the host name).
    pub name: Option<String>,
    /// This node's address on the cluster network, put in its node record; other nodes
    /// reach its port there (None: 127.0.0.1, a cluster on one machine).
    pub address: Option<std::net::IpAddr>,
    /// Client URLs of an existing etcd cluster; empty: run a private one-member etcd.
    pub etcd: Vec<String>,
    /// Ports of the private etcd on 127.0.0.1 (0: pick free ones).
    pub client_port: u16,
    pub peer_port: u16,
    pub lease_ttl_secs: u64,
    /// A copy of a VE's volume on a node that has been lost this long is dropped from the
    /// volume's record (and another node gets one); a node back sooner catches up from
    /// the writer's log.
    pub replica_grace_secs: u64,
    /// The node-to-node port (mutual TLS) on `address`.
    pub port: u16,
}

/// Default node-to-node port.
pub const DEFAULT_PEER_PORT: u16 = 7150;

/// Default node lease: lost after 2 s without a renewal.
pub const DEFAULT_LEASE_TTL_SECS: u64 = 2;

/// Default grace before a lost node's copies are replaced: long enough for a daemon
/// restart or a short network hiccup (the node comes back and catches up from the
/// writer's log, a few transactions), short enough that the VE is not left with fewer
/// copies for long (a new copy is a full reseed).
pub const DEFAULT_REPLICA_GRACE_SECS: u64 = 10;

impl ClusterSettings {
    /// Where other nodes reach this one.
    pub fn peer_address(&self) -> std::net::IpAddr {
        self.address
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            name: None,
            address: None,
            etcd: Vec::new(),
            client_port: 0,
            peer_port: 0,
            lease_ttl_secs: DEFAULT_LEASE_TTL_SECS,
            replica_grace_secs: DEFAULT_REPLICA_GRACE_SECS,
            port: DEFAULT_PEER_PORT,
        }
    }
}

/// How this node looks after the replicated volumes it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationSettings {
    /// Seconds between two scheduled scrubs of one VE (0: no scheduled scrub).
    pub scrub_interval_secs: u64,
}

/// Default scrub interval: a week, as Ceph's deep scrub. A scrub reads every byte of every
/// copy, so it is a background cost; a week finds silent corruption long before a second
/// failure is likely to meet it, and an operator can ask for one any time (`ve scrub`).
pub const DEFAULT_SCRUB_INTERVAL_SECS: u64 = 7 * 86_400;

impl Default for ReplicationSettings {
    fn default() -> Self {
        ReplicationSettings {
            scrub_interval_secs: DEFAULT_SCRUB_INTERVAL_SECS,
        }
    }
}

/// Everything `node.toml` sets.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    pub limits: LimitPolicy,
    pub api: ApiSettings,
    pub cluster: ClusterSettings,
    pub replication: ReplicationSettings,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            limits: LimitPolicy {
                defaults: builtin_defaults(),
                max: Limits::default(),
            },
            api: ApiSettings::default(),
            cluster: ClusterSettings::default(),
            replication: ReplicationSettings::default(),
        }
    }
}

/// The operator's limit policy: defaults for what a creator leaves out, maxima for all.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitPolicy {
    pub defaults: Limits,
    /// Unset fields have no maximum beyond what [`Limits::validate`] accepts.
    pub max: Limits,
}

impl LimitPolicy {
    /// The limits a new VE gets: what its creator asked for, the defaults for the rest (a
    /// cap with a maximum and no default takes its maximum), all checked against the
    /// maxima. These are recorded in the VE's spec, so `ve show` reports them.
    pub fn admit(&self, requested: &Limits) -> Result<Limits, LimitsError> {
        requested.validate()?;
        let limits = self.effective_defaults().merged(requested);
        limits.validate()?;
        limits.check_max(&self.max)?;
        Ok(limits)
    }

    /// A change to an existing VE: every value it sets must be valid and within the maxima
    /// (limits it leaves alone are not re-checked, so lowering a maximum does not lock
    /// older VEs out of other changes).
    pub fn check_change(&self, change: &Limits) -> Result<(), LimitsError> {
        change.validate()?;
        change.check_max(&self.max)
    }

    fn effective_defaults(&self) -> Limits {
        let mut d = self.defaults;
        for f in Field::ALL {
            if d.get(f).is_none() && f.unset_is_unlimited() {
                d.set(f, self.max.get(f));
            }
        }
        d
    }
}

/// Bounds of the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiSettings {
    /// Concurrent connections served; more get a `busy` error reply and are closed.
    pub max_connections: usize,
    /// Seconds a client has to send one whole request frame (from when the daemon starts
    /// waiting for it); a stalled or idle client is then disconnected.
    pub request_timeout_secs: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
        }
    }
}

/// A bad `node.toml`: where and what. `Display` is one line: `line 4, defaults.pids: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {message}", key.as_ref().map(|k| format!(", key {k}")).unwrap_or_default())]
pub struct ConfigError {
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> usize {
    span.map_or(1, |s| {
        text.as_bytes()[..s.start.min(text.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    })
}

struct Parser<'a> {
    text: &'a str,
}

impl Parser<'_> {
    fn err(&self, t: &dyn TableLike, key: &str, path: &str, message: impl Into<String>) -> ConfigError {
        let span = t.key(key).and_then(|k| k.span());
        ConfigError {
            line: line_of(self.text, span),
            key: Some(path.to_string()),
            message: message.into(),
        }
    }

    fn table<'t>(&self, root: &'t dyn TableLike, key: &str) -> Result<Option<&'t dyn TableLike>, ConfigError> {
        match root.get(key) {
            None => Ok(None),
            Some(item) => item.as_table_like().map(Some).ok_or_else(|| {
                self.err(
                    root,
                    key,
                    key,
                    format!("must be a table ([{key}]), not {}", item.type_name()),
                )
            }),
        }
    }

    fn limits(&self, t: &dyn TableLike, section: &str, start: Limits) -> Result<Limits, ConfigError> {
        let mut l = start;
        for (key, item) in t.iter() {
            let path = format!("{section}.{key}");
            let Some(f) = Field::ALL.into_iter().find(|f| f.key() == key) else {
                let keys: Vec<&str> = Field::ALL.iter().map(|f| f.key()).collect();
                return Err(self.err(t, key, &path, format!("unknown limit: use one of {}", keys.join(", "))));
            };
            let v = limit_value(f, item).map_err(|m| self.err(t, key, &path, m))?;
            let mut one = Limits::default();
            one.set(f, v);
            one.validate().map_err(|e| self.err(t, key, &path, e.to_string()))?;
            l.set(f, v);
        }
        Ok(l)
    }

    fn api(&self, t: &dyn TableLike) -> Result<ApiSettings, ConfigError> {
        let mut a = ApiSettings::default();
        for (key, item) in t.iter() {
            let path = format!("api.{key}");
            match key {
                "max_connections" => {
                    let n = item
                        .as_integer()
                        .and_then(|n| u64::try_from(n).ok())
                        .filter(|n| (1..=MAX_MAX_CONNECTIONS).contains(n))
                        .ok_or_else(|| {
                            self.err(
                                t,
                                key,
                                &path,
                                format!("must be a whole number from 1 to {MAX_MAX_CONNECTIONS}"),
                            )
                        })?;
                    a.max_connections = n as usize;
                }
                "request_timeout" => {
                    let s = duration(item)
                        .ok()
                        .flatten()
                        .filter(|s| (1..=MAX_REQUEST_TIMEOUT_SECS).contains(s))
                        .ok_or_else(|| {
                            self.err(
                                t,
                                key,
                                &path,
                                "must be a duration from 1s to 1h, e.g. \"30s\" (or whole seconds)",
                            )
                        })?;
                    a.request_timeout_secs = s;
                }
                _ => {
                    return Err(self.err(
                        t,
                        key,
                        &path,
                        "unknown setting: [api] has max_connections and request_timeout",
                    ))
                }
            }
        }
        Ok(a)
    }

    fn cluster(&self, t: &dyn TableLike) -> Result<ClusterSettings, ConfigError> {
        let mut c = ClusterSettings::default();
        for (key, item) in t.iter() {
            let path = format!("cluster.{key}");
            let bad = |m: &str| self.err(t, key, &path, m.to_string());
            match key {
                "name" => {
                    let n = item
                        .as_str()
                        .filter(|n| crate::Name::parse(n).is_ok())
                        .ok_or_else(|| bad("must be a name: letters, digits and '-', like \"node1\""))?;
                    c.name = Some(n.to_string());
                }
                "address" => {
                    let a = item
                        .as_str()
                        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                        .filter(|a| !a.is_unspecified() && !a.is_multicast())
                        .ok_or_else(|| bad("must be this node's IP address, like \"10.0.0.1\""))?;
                    c.address = Some(a);
                }
                "etcd" => {
                    let urls = item
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|v| v.as_str().map(str::to_string))
                                .collect::<Option<Vec<_>>>()
                        })
                        .or_else(|| item.as_str().map(|s| Some(vec![s.to_string()])))
                        .flatten()
                        .filter(|u| u.iter().all(|u| u.starts_with("http://") || u.starts_with("https://")))
                        .ok_or_else(|| bad("must be etcd client URLs, like [\"http://10.0.0.1:2379\"]"))?;
                    c.etcd = urls;
                }
                "client_port" | "peer_port" => {
                    let p = item
                        .as_integer()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| bad("must be a port from 0 (any free port) to 65535"))?;
                    if key == "client_port" {
                        c.client_port = p;
                    } else {
                        c.peer_port = p;
                    }
                }
                "port" => {
                    c.port = item
                        .as_integer()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|p| *p != 0)
                        .ok_or_else(|| bad("must be a port from 1 to 65535 (default 7150)"))?;
                }
                "lease_ttl" => {
                    c.lease_ttl_secs = duration(item)
                        .ok()
                        .flatten()
                        .filter(|s| (1..=60).contains(s))
                        .ok_or_else(|| bad("must be a duration from 1s to 60s, e.g. \"2s\""))?;
                }
                "replica_grace" => {
                    c.replica_grace_secs = duration(item)
                        .ok()
                        .flatten()
                        .filter(|s| (1..=86400).contains(s))
                        .ok_or_else(|| bad("must be a duration from 1s to 1 day, e.g. \"10s\""))?;
                }
                _ => return Err(bad(
                    "unknown setting: [cluster] has name, etcd, client_port, peer_port, lease_ttl, replica_grace, address and port",
                )),
            }
        }
        if c.client_port != 0 && c.client_port == c.peer_port {
            return Err(self.err(t, "peer_port", "cluster.peer_port", "must differ from client_port"));
        }
        Ok(c)
    }
}

impl Parser<'_> {
    fn replication(&self, t: &dyn TableLike) -> Result<ReplicationSettings, ConfigError> {
        let mut r = ReplicationSettings::default();
        for (key, item) in t.iter() {
            let path = format!("replication.{key}");
            let bad = |m: &str| self.err(t, key, &path, m.to_string());
            match key {
                "scrub_interval" => {
                    r.scrub_interval_secs = match item.as_integer() {
                        Some(0) => 0,
                        _ => duration(item).ok().flatten().filter(|s| *s >= 1).ok_or_else(|| {
                            bad("must be a duration like \"7d\" or \"12h\", or 0 for no scheduled scrub")
                        })?,
                    };
                }
                _ => return Err(bad("unknown setting: [replication] has scrub_interval")),
            }
        }
        Ok(r)
    }
}

/// A duration: whole seconds or a string like "30s"; `None` for "unlimited".
fn duration(item: &Item) -> Result<Option<u64>, String> {
    if let Some(n) = item.as_integer() {
        return u64::try_from(n).map(Some).map_err(|_| format!("{n} is negative"));
    }
    match item.as_str() {
        Some("unlimited") => Ok(None),
        Some(s) => parse_duration_secs(s).map(Some),
        None => Err(format!(
            "must be a duration like \"24h\" or whole seconds, not {}",
            item.type_name()
        )),
    }
}

/// One limit's value as the config writes it; `None` for "unlimited".
fn limit_value(f: Field, item: &Item) -> Result<Option<LimitValue>, String> {
    if item.as_str() == Some("unlimited") {
        return Ok(None);
    }
    let whole = |item: &Item| -> Result<u64, String> {
        let n = item
            .as_integer()
            .ok_or_else(|| format!("must be a whole number, not {}", item.type_name()))?;
        u64::try_from(n).map_err(|_| format!("{n} is negative"))
    };
    let v = match f {
        Field::Memory | Field::MemoryLow | Field::Disk => match item.as_str() {
            Some(s) => parse_size(s).map_err(|e| e.to_string())?,
            None => whole(item).map_err(|e| format!("{e} (sizes: \"2G\", \"512M\" or bytes)"))?,
        },
        Field::History => match duration(item)? {
            Some(s) => s,
            None => return Ok(None),
        },
        Field::Cpus => {
            let c = match (item.as_float(), item.as_integer()) {
                (Some(c), _) => c,
                (None, Some(n)) => n as f64,
                _ => {
                    return Err(format!(
                        "must be a number of CPUs like 2 or 0.5, not {}",
                        item.type_name()
                    ))
                }
            };
            return Ok(Some(LimitValue::Cpus(c)));
        }
        Field::CpuWeight | Field::Pids | Field::Inodes => whole(item)?,
    };
    Ok(Some(LimitValue::Int(v)))
}

/// Parse `node.toml`. Unknown keys are errors (a typo must not silently leave a VE
/// unlimited); every error names its line and key.
pub fn parse(text: &str) -> Result<NodeSettings, ConfigError> {
    let doc = toml_edit::Document::parse(text).map_err(|e| ConfigError {
        line: line_of(text, e.span()),
        key: None,
        message: format!("not valid TOML: {}", e.message().trim()),
    })?;
    let p = Parser { text };
    let root: &dyn TableLike = doc.as_table();
    match root.get("version").map(|v| v.as_integer()) {
        None => {
            return Err(ConfigError {
                line: 1,
                key: Some("version".into()),
                message: format!("missing: start the file with `version = {CONFIG_VERSION}`"),
            })
        }
        Some(Some(CONFIG_VERSION)) => {}
        Some(Some(v)) if v > CONFIG_VERSION => {
            return Err(p.err(
                root,
                "version",
                "version",
                format!("format version {v} is newer than this vessel reads ({CONFIG_VERSION}): upgrade vessel"),
            ))
        }
        Some(_) => return Err(p.err(root, "version", "version", format!("must be {CONFIG_VERSION}"))),
    }
    for (key, _) in root.iter() {
        if !matches!(key, "version" | "defaults" | "max" | "api" | "cluster" | "replication") {
            return Err(p.err(
                root,
                key,
                key,
                "unknown setting: the node config has version, [defaults], [max], [api], [cluster] and [replication]",
            ));
        }
    }
    let mut s = NodeSettings::default();
    let defaults_t = p.table(root, "defaults")?;
    if let Some(t) = defaults_t {
        s.limits.defaults = p.limits(t, "defaults", s.limits.defaults)?;
    }
    if let Some(t) = p.table(root, "max")? {
        s.limits.max = p.limits(t, "max", Limits::default())?;
    }
    if let Some(t) = p.table(root, "api")? {
        s.api = p.api(t)?;
    }
    if let Some(t) = p.table(root, "cluster")? {
        s.cluster = p.cluster(t)?;
    }
    if let Some(t) = p.table(root, "replication")? {
        s.replication = p.replication(t)?;
    }
    // A built-in default above the operator's maximum gives way to the maximum; a default
    // the operator wrote must fit under it (blame the default's line).
    let written = |f: Field| defaults_t.is_some_and(|t| t.contains_key(f.key()));
    for f in Field::ALL {
        if let (Some(d), Some(m)) = (s.limits.defaults.get(f), s.limits.max.get(f)) {
            let mut one = Limits::default();
            one.set(f, Some(d));
            if one.check_max(&s.limits.max).is_err() {
                let Some(t) = defaults_t.filter(|t| t.contains_key(f.key())) else {
                    s.limits.defaults.set(f, Some(m));
                    continue;
                };
                let path = format!("defaults.{}", f.key());
                return Err(p.err(
                    t,
                    f.key(),
                    &path,
                    format!("default {} is above max.{} {}", d.show(f), f.key(), m.show(f)),
                ));
            }
        }
    }
    if let Err(e) = s.limits.defaults.validate() {
        // Only memory_low against memory can fail here (each value was checked alone).
        let f = if written(Field::MemoryLow) {
            Field::MemoryLow
        } else {
            Field::Memory
        };
        return Err(match defaults_t {
            Some(t) if written(f) => p.err(t, f.key(), &format!("defaults.{}", f.key()), e.to_string()),
            _ => ConfigError {
                line: 1,
                key: Some(format!("defaults.{}", f.key())),
                message: e.to_string(),
            },
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_needs_a_version_and_a_minimal_one_gives_builtins() {
        let e = parse("").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("version"));
        assert_eq!(parse("version = 1\n").unwrap(), NodeSettings::default());
        let d = NodeSettings::default().limits.defaults;
        assert_eq!(d.memory_max, Some(2 << 30));
        assert_eq!(d.pids_max, Some(4096));
        assert_eq!(d.disk, Some(20 << 30));
        assert_eq!(d.inodes, Some(500_000));
        assert_eq!(d.history, Some(86_400));
        assert_eq!(d.cpus, None);
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn replication_scrub_interval() {
        assert_eq!(
            NodeSettings::default().replication.scrub_interval_secs,
            DEFAULT_SCRUB_INTERVAL_SECS
        );
        let s = parse("version = 1\n[replication]\nscrub_interval = \"12h\"\n").unwrap();
        assert_eq!(s.replication.scrub_interval_secs, 12 * 3600);
        let s = parse("version = 1\n[replication]\nscrub_interval = 0\n").unwrap();
        assert_eq!(s.replication.scrub_interval_secs, 0);
        for (text, key) in [
            (
                "version = 1\n[replication]\nscrub_interval = \"soon\"\n",
                "replication.scrub_interval",
            ),
            (
                "version = 1\n[replication]\nscrub_interval = \"unlimited\"\n",
                "replication.scrub_interval",
            ),
            (
                "version = 1\n[replication]\nscrub_every = \"1d\"\n",
                "replication.scrub_every",
            ),
            ("version = 1\nreplication = 3\n", "replication"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
            assert_eq!(e.line, if key == "replication" { 2 } else { 3 }, "{text}: {e}");
        }
    }

    #[test]
    fn full_file_parses() {
        let s = parse(
            r#"
version = 1
[defaults]
memory = "1G"
memory_low = 134217728
cpus = 2
pids = 1_000
disk = "unlimited"
history = "7d"
[max]
memory = "8G"
cpus = 4.5
inodes = 1000000
[api]
max_connections = 8
request_timeout = "5s"
[cluster]
name = "node-2"
address = "10.0.0.2"
etcd = ["http://10.0.0.1:2379", "https://10.0.0.2:2379"]
client_port = 22379
peer_port = 22380
lease_ttl = "3s"
replica_grace = "1m"
port = 7151
"#,
        )
        .unwrap();
        assert_eq!(
            s.cluster,
            ClusterSettings {
                name: Some("node-2".into()),
                address: Some("10.0.0.2".parse().unwrap()),
                etcd: vec!["http://10.0.0.1:2379".into(), "https://10.0.0.2:2379".into()],
                client_port: 22379,
                peer_port: 22380,
                lease_ttl_secs: 3,
                replica_grace_secs: 60,
                port: 7151,
            }
        );
        let d = s.limits.defaults;
        assert_eq!(d.memory_max, Some(1 << 30));
        assert_eq!(d.memory_low, Some(128 << 20));
        assert_eq!(d.cpus, Some(2.0));
        assert_eq!(d.pids_max, Some(1000));
        assert_eq!(d.disk, None);
        assert_eq!(d.inodes, Some(500_000), "built-in default kept");
        assert_eq!(d.history, Some(7 * 86_400));
        assert_eq!(s.limits.max.memory_max, Some(8 << 30));
        assert_eq!(s.limits.max.cpus, Some(4.5));
        assert_eq!(s.limits.max.inodes, Some(1_000_000));
        assert_eq!(
            s.api,
            ApiSettings {
                max_connections: 8,
                request_timeout_secs: 5
            }
        );
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases = [
            (
                "version = 1\n[defaults]\nmemory = \"2X\"\n",
                3,
                Some("defaults.memory"),
                "bad size",
            ),
            (
                "version = 1\n\n[defaults]\npids = 3\n",
                4,
                Some("defaults.pids"),
                "8..=",
            ),
            ("version = 1\n[max]\ncpus = nan\n", 3, Some("max.cpus"), "cpus must"),
            ("version = 1\n[max]\ncpus = inf\n", 3, Some("max.cpus"), "cpus must"),
            ("version = 1\n[max]\npids = -1\n", 3, Some("max.pids"), "negative"),
            (
                "version = 1\n[max]\nmemroy = \"1G\"\n",
                3,
                Some("max.memroy"),
                "unknown limit",
            ),
            ("version = 1\n[defalts]\n", 2, Some("defalts"), "unknown setting"),
            ("version = 1\ndefaults = 3\n", 2, Some("defaults"), "must be a table"),
            ("version = 2\n", 1, Some("version"), "upgrade vessel"),
            ("version = \"1\"\n", 1, Some("version"), "must be 1"),
            (
                "version = 1\n[api]\nmax_connections = 0\n",
                3,
                Some("api.max_connections"),
                "from 1",
            ),
            (
                "version = 1\n[api]\nrequest_timeout = \"2w\"\n",
                3,
                Some("api.request_timeout"),
                "duration",
            ),
            (
                "version = 1\n[cluster]\netcd = [\"10.0.0.1:2379\"]\n",
                3,
                Some("cluster.etcd"),
                "client URLs",
            ),
            (
                "version = 1\n[cluster]\nlease_ttl = \"0s\"\n",
                3,
                Some("cluster.lease_ttl"),
                "1s to 60s",
            ),
            (
                "version = 1\n[cluster]\naddress = \"10.0.0\"\n",
                3,
                Some("cluster.address"),
                "IP address",
            ),
            (
                "version = 1\n[cluster]\naddress = \"0.0.0.0\"\n",
                3,
                Some("cluster.address"),
                "IP address",
            ),
            (
                "version = 1\n[cluster]\nport = 0\n",
                3,
                Some("cluster.port"),
                "1 to 65535",
            ),
            (
                "version = 1\n[cluster]\nport = 65536\n",
                3,
                Some("cluster.port"),
                "1 to 65535",
            ),
            (
                "version = 1\n[cluster]\nclient_port = 70000\n",
                3,
                Some("cluster.client_port"),
                "65535",
            ),
            (
                "version = 1\n[cluster]\nclient_port = 5\npeer_port = 5\n",
                4,
                Some("cluster.peer_port"),
                "differ",
            ),
            (
                "version = 1\n[cluster]\naddress = 10\n",
                3,
                Some("cluster.address"),
                "IP address",
            ),
            (
                "version = 1\n[cluster]\nname = \"a b\"\n",
                3,
                Some("cluster.name"),
                "must be a name",
            ),
            (
                "version = 1\n[defaults]\nmemory = [1]\n",
                3,
                Some("defaults.memory"),
                "array",
            ),
            ("version = 1\n[defaults\n", 2, None, "not valid TOML"),
            (
                "version = 1\n[defaults]\nmemory = \"64M\"\nmemory_low = \"128M\"\n",
                4,
                Some("defaults.memory_low"),
                "above the memory limit",
            ),
            (
                "version = 1\n[defaults]\nmemory = \"4G\"\n[max]\nmemory = \"2G\"\n",
                3,
                Some("defaults.memory"),
                "default 4G is above max.memory 2G",
            ),
        ];
        for (text, line, key, msg) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!((e.line, e.key.as_deref()), (line, key), "{text:?}: {e}");
            assert!(e.to_string().contains(msg), "{text:?}: {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn admit_applies_defaults_explicit_values_win_and_maxima_hold() {
        let p = parse("version = 1\n[defaults]\nmemory = \"unlimited\"\n[max]\nmemory = \"8G\"\ncpus = 2\n")
            .unwrap()
            .limits;
        let l = p.admit(&Limits::default()).unwrap();
        assert_eq!(l.memory_max, Some(8 << 30), "a cap with a maximum defaults to it");
        assert_eq!(l.cpus, Some(2.0));
        assert_eq!(l.pids_max, Some(4096), "built-in default");
        let asked = Limits {
            memory_max: Some(1 << 30),
            pids_max: Some(100),
            ..Default::default()
        };
        let l = p.admit(&asked).unwrap();
        assert_eq!((l.memory_max, l.pids_max), (Some(1 << 30), Some(100)));
        let too_much = Limits {
            memory_max: Some(16 << 30),
            ..Default::default()
        };
        assert!(matches!(p.admit(&too_much), Err(LimitsError::AboveMax { .. })));
        assert!(matches!(p.check_change(&too_much), Err(LimitsError::AboveMax { .. })));
        assert_eq!(p.check_change(&asked), Ok(()));
        let bad = Limits {
            pids_max: Some(u64::MAX),
            ..Default::default()
        };
        assert!(matches!(p.admit(&bad), Err(LimitsError::BadPids(_))));
        assert!(matches!(p.check_change(&bad), Err(LimitsError::BadPids(_))));
        // A built-in default above an operator's maximum gives way to it.
        let p = parse("version = 1\n[max]\npids = 100\nmemory = \"1G\"\n")
            .unwrap()
            .limits;
        assert_eq!((p.defaults.pids_max, p.defaults.memory_max), (Some(100), Some(1 << 30)));
        assert_eq!(p.admit(&Limits::default()).unwrap().pids_max, Some(100));
        // Without a config: the built-ins, no maxima.
        let l = NodeSettings::default().limits.admit(&Limits::default()).unwrap();
        assert_eq!(l, builtin_defaults());
    }
}
