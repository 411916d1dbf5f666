//! The lab's operations: `up`, `start`/`kill` of a node, `partition`/`heal`, `status`,
//! `exec` and `down`. Each mutating operation holds the lab's lock and writes `lab.json`
//! before it makes anything, so `down` can always remove what exists.

use crate::nft;
use crate::plan::{self, Plan, PlanError, ETCD_CLIENT_PORT};
use crate::state::{LabPaths, LabState, NodeRun, Phase, StateError};
use crate::sys::{self, InNode, SysError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("lab {0} exists (state in {1}): `vessel lab down --name {0}` removes it first")]
    Exists(String, PathBuf),
    #[error("no lab {0} on this machine (no {1}): `vessel lab up --name {0}` makes one")]
    NotFound(String, PathBuf),
    #[error("lab {lab} has no node {node}: its nodes are {nodes}")]
    UnknownNode { lab: String, node: String, nodes: String },
    #[error("{node} runs (its cgroup holds processes): `vessel lab kill {node}` first")]
    Running { node: String },
    #[error("{what} within {secs} s; {hint}")]
    Timeout { what: String, secs: u64, hint: String },
    #[error("stopped after {0} as asked (--fail-after): the lab is half made; `vessel lab down` removes it")]
    Injected(String),
    #[error("lab down left some things behind: {0}")]
    Leftovers(String),
    #[error("the lab's cluster certificates: {0}")]
    Certs(String),
}

type Result<T> = std::result::Result<T, LabError>;

/// A lab node's key and certificate from the lab's CA under `root/cluster/` (the first
/// node also keeps the CA key: it admits joining nodes, as the one that ran `cluster init`).
fn node_certs(
    ca: &vessel_peer::ca::CertKey,
    root: &std::path::Path,
    name: &str,
    address: std::net::IpAddr,
    keep_ca_key: bool,
) -> Result<()> {
    use vessel_peer::ca;
    let c = |e: ca::CaError| LabError::Certs(format!("{name}: {e}"));
    let (key_pem, csr) = ca::node_key_and_csr(name, address).map_err(c)?;
    let cert_pem = ca::issue(ca, &csr, name, address).map_err(c)?;
    ca::ClusterFiles::new(root)
        .save(
            &ca.cert_pem,
            keep_ca_key.then_some(ca.key_pem.as_str()),
            &ca::CertKey { cert_pem, key_pem },
        )
        .map_err(c)
}

/// `lab up`'s choices.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub nodes: usize,
    /// None: [`plan::default_members`].
    pub etcd_members: Option<usize>,
    pub paths: LabPaths,
    /// The `vessel` binary the nodes run.
    pub exe: PathBuf,
    /// The etcd binary.
    pub etcd: PathBuf,
    /// Fault injection for tests: stop with an error after this step (network, etcd, daemons).
    pub fail_after: Option<String>,
}

/// A lab, loaded with its lock held.
pub struct Lab {
    pub state: LabState,
    exe: PathBuf,
    etcd: PathBuf,
    lock: Option<std::fs::File>,
}

/// The default etcd binary: `VESSEL_LAB_ETCD` or Debian's.
pub fn default_etcd() -> PathBuf {
    std::env::var_os("VESSEL_LAB_ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/etcd".into())
}

const LOCK_WAIT: Duration = Duration::from_secs(120);
const ETCD_WAIT: Duration = Duration::from_secs(60);
const NODES_WAIT: Duration = Duration::from_secs(120);
const STOP_WAIT: Duration = Duration::from_secs(20);
const KILL_WAIT: Duration = Duration::from_secs(15);

/// How a node is doing.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    pub ve_subnet: String,
    /// up (its cgroup holds processes), down (killed or not started).
    pub state: String,
    pub daemon_pid: Option<i32>,
    pub daemon_alive: bool,
    pub etcd_member: bool,
    pub etcd_pid: Option<i32>,
    pub etcd_alive: bool,
    /// The member's `/health`, asked from inside the node (None: not a member).
    pub etcd_healthy: Option<bool>,
    pub partitioned_from: Vec<String>,
    pub root: String,
    pub socket: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub version: u32,
    pub name: String,
    pub prefix: String,
    pub net: String,
    pub phase: Phase,
    pub etcd: Vec<String>,
    pub nodes: Vec<NodeStatus>,
}

impl Lab {
    /// Open an existing lab (and take its lock).
    pub fn open(name: &str, paths: &LabPaths, exe: PathBuf) -> Result<Lab> {
        plan::check_name(name)?;
        let file = paths.state_file(name);
        if !file.exists() {
            return Err(LabError::NotFound(name.to_string(), file));
        }
        let lock = sys::lock(&paths.state_dir(name).join("lock"), LOCK_WAIT)?;
        let state = LabState::load(&file)?.ok_or_else(|| LabError::NotFound(name.to_string(), file.clone()))?;
        Ok(Lab {
            state,
            exe,
            etcd: default_etcd(),
            lock: Some(lock),
        })
    }

    /// Make a lab: plan it, write the plan, then the network, the etcd members and the
    /// node daemons; returns when every node's daemon lists every node ready.
    pub fn up(o: &UpOptions, progress: &mut dyn FnMut(&str)) -> Result<Lab> {
        plan::check_name(&o.name)?;
        let members = o.etcd_members.unwrap_or_else(|| plan::default_members(o.nodes));
        // Check the numbers before anything is made.
        Plan::new(&o.name, "vl00000", *plan::NET_RANGE.start(), o.nodes, members)?;
        if !o.etcd.exists() {
            return Err(SysError::Other(format!(
                "no etcd at {} (Debian: apt-get install etcd-server; or set VESSEL_LAB_ETCD)",
                o.etcd.display()
            ))
            .into());
        }
        let cgroup_v2 = sys::cgroup_v2_root()?;
        std::fs::create_dir_all(&o.paths.run).map_err(sys::io(format!("create {}", o.paths.run.display())))?;
        let lab = {
            // One lab at a time picks its net and claims its name.
            let _global = sys::lock(&o.paths.run.join(".lock"), LOCK_WAIT)?;
            let file = o.paths.state_file(&o.name);
            if file.exists() {
                return Err(LabError::Exists(o.name.clone(), file));
            }
            let routes = plan::parse_routes(&std::fs::read_to_string("/proc/net/route").unwrap_or_default());
            let used = other_labs(&o.paths);
            let net = plan::pick_net(&routes, &used)?;
            let prefix = format!("vl{}", sys::random_hex(5));
            let plan = Plan::new(&o.name, &prefix, net, o.nodes, members)?;
            let dir = o.paths.state_dir(&o.name);
            std::fs::create_dir_all(&dir).map_err(sys::io(format!("create {}", dir.display())))?;
            let lock = sys::lock(&dir.join("lock"), LOCK_WAIT)?;
            let state = LabState::new(plan, o.paths.clone(), cgroup_v2);
            state.save()?;
            Lab {
                state,
                exe: o.exe.clone(),
                etcd: o.etcd.clone(),
                lock: Some(lock),
            }
        };
        let mut lab = lab;
        let p = lab.state.plan.clone();
        progress(&format!(
            "lab {}: prefix {}, net 10.{}.0.0/16, {} nodes, {} etcd member(s); state {}",
            p.name,
            p.prefix,
            p.net,
            p.nodes.len(),
            members,
            o.paths.state_file(&p.name).display()
        ));
        lab.make_network(progress)?;
        lab.injected(o, "network")?;
        for n in p.members() {
            lab.start_etcd(&n.name)?;
        }
        progress(&format!(
            "etcd: {} member(s) started, waiting for a healthy cluster",
            members
        ));
        lab.wait_etcd(ETCD_WAIT)?;
        progress("etcd: healthy");
        lab.injected(o, "etcd")?;
        for n in &p.nodes {
            let pid = lab.start_daemon(&n.name)?;
            progress(&format!("{}: daemon pid {pid}, {}", n.name, n.address));
        }
        lab.injected(o, "daemons")?;
        progress(&format!("waiting for {} nodes in `vessel node list`", p.nodes.len()));
        let names: Vec<String> = p.nodes.iter().map(|n| n.name.clone()).collect();
        let leader = lab.wait_ready(&names, NODES_WAIT)?;
        lab.state.phase = Phase::Up;
        lab.state.save()?;
        progress(&format!(
            "lab {} up: {} nodes ready, leader {leader}; `vessel lab exec node1 -- vessel node list`",
            p.name,
            p.nodes.len()
        ));
        Ok(lab)
    }

    /// Let go of the lab's lock (for a long command that may itself use the lab).
    pub fn release(mut self) -> Lab {
        self.lock = None;
        self
    }

    fn injected(&self, o: &UpOptions, step: &str) -> Result<()> {
        if o.fail_after.as_deref() == Some(step) {
            return Err(LabError::Injected(step.to_string()));
        }
        Ok(())
    }

    fn paths(&self) -> &LabPaths {
        &self.state.paths
    }

    fn name(&self) -> &str {
        &self.state.plan.name
    }

    fn node(&self, node: &str) -> Result<plan::NodePlan> {
        self.state
            .plan
            .node(node)
            .cloned()
            .ok_or_else(|| LabError::UnknownNode {
                lab: self.name().to_string(),
                node: node.to_string(),
                nodes: self
                    .state
                    .plan
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The hub (a namespace with the lab bridge), the cgroups, and per node its data dir,
    /// config, namespaces and veth with its lab address.
    fn make_network(&mut self, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let (name, paths, p) = (self.name().to_string(), self.paths().clone(), self.state.plan.clone());
        sys::private_dir(&paths.ns_dir(&name))?;
        let hub = paths.hub_net(&name);
        sys::make_namespaces(&hub, None)?;
        let ip = |ns: &Path, args: &[&str]| -> Result<()> {
            let mut c = sys::in_net(ns, "ip");
            c.args(args);
            sys::run(&format!("ip {}", args.join(" ")), &mut c, None)?;
            Ok(())
        };
        ip(&hub, &["link", "set", "lo", "up"])?;
        ip(&hub, &["link", "add", &p.hub_bridge, "type", "bridge"])?;
        ip(&hub, &["link", "set", &p.hub_bridge, "up"])?;
        let lab_cg = self.state.lab_cgroup();
        std::fs::create_dir_all(&lab_cg).map_err(sys::io(format!("create cgroup {}", lab_cg.display())))?;
        // One cluster CA for the lab (as `cluster init` + joins would make): every node has
        // its certificate before its daemon starts, so the node-to-node port is served.
        let ca = vessel_peer::ca::make_ca(&p.prefix).map_err(|e| LabError::Certs(e.to_string()))?;
        for n in &p.nodes {
            let root = paths.node_root(&name, &n.name);
            std::fs::create_dir_all(&root).map_err(sys::io(format!("create {}", root.display())))?;
            std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(sys::io(format!("make {} root-only", root.display())))?;
            std::fs::write(root.join("node.toml"), p.node_toml(n))
                .map_err(sys::io(format!("write {}/node.toml", root.display())))?;
            node_certs(&ca, &root, &n.name, n.address.into(), n.index == 1)?;
            let cg = self.state.node_cgroup(&n.name);
            std::fs::create_dir_all(&cg).map_err(sys::io(format!("create cgroup {}", cg.display())))?;
            let (net, mnt) = (paths.node_net(&name, &n.name), paths.node_mnt(&name, &n.name));
            sys::make_namespaces(&net, Some(&mnt))?;
            let net_s = net.display().to_string();
            ip(
                &hub,
                &[
                    "link",
                    "add",
                    &n.hub_veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &net_s,
                ],
            )?;
            ip(&hub, &["link", "set", &n.hub_veth, "master", &p.hub_bridge, "up"])?;
            ip(&net, &["link", "set", "lo", "up"])?;
            ip(&net, &["addr", "add", &format!("{}/24", n.address), "dev", "eth0"])?;
            ip(&net, &["link", "set", "eth0", "up"])?;
            progress(&format!("{}: namespaces, {} on {}", n.name, n.address, p.hub_bridge));
        }
        Ok(())
    }

    fn in_node(&self, node: &str) -> (PathBuf, PathBuf, PathBuf) {
        let name = self.name();
        (
            self.state.node_cgroup(node),
            self.paths().node_net(name, node),
            self.paths().node_mnt(name, node),
        )
    }

    fn start_etcd(&mut self, node: &str) -> Result<i32> {
        let n = self.node(node)?;
        let data = self.paths().etcd_data(self.name(), node);
        let log = self.paths().node_root(self.name(), node).join("etcd.log");
        let mut c = Command::new(&self.etcd);
        c.args(self.state.plan.etcd_args(&n, &data.display().to_string()));
        let pid = self.spawn_daemonized(node, c, &log)?;
        self.state.run(node).etcd_pid = Some(pid);
        self.state.save()?;
        Ok(pid)
    }

    /// Start a long-lived process of `node` (its etcd member, its daemon) in the node's
    /// cgroup and namespaces, in a session of its own, output to `log`: its pid.
    fn spawn_daemonized(&self, node: &str, c: Command, log: &std::path::Path) -> Result<i32> {
        let (cg, net, mnt) = self.in_node(node);
        let child = sys::spawn_in_node(
            c,
            &InNode {
                cgroup: &cg,
                net: &net,
                mnt: Some(&mnt),
                setsid: true,
                cwd: None,
            },
            log,
        )?;
        Ok(child.id() as i32)
    }

    /// The environment a node's `vessel` commands (and its daemon) get.
    pub fn node_env(&self, node: &str) -> Result<Vec<(String, String)>> {
        let n = self.node(node)?;
        let root = self.paths().node_root(self.name(), node);
        Ok(vec![
            ("VESSEL_ROOT".into(), root.display().to_string()),
            ("VESSEL_SOCKET".into(), root.join("vessel.sock").display().to_string()),
            ("VESSEL_CONFIG".into(), root.join("node.toml").display().to_string()),
            ("VESSEL_BRIDGE".into(), n.ve_bridge.clone()),
            ("VESSEL_SUBNET".into(), n.ve_subnet.clone()),
            ("VESSEL_CGROUP_PARENT".into(), self.state.plan.cgroup_parent(&n)),
            ("VESSEL_LAB".into(), self.name().to_string()),
            ("VESSEL_LAB_NODE".into(), node.to_string()),
        ])
    }

    fn start_daemon(&mut self, node: &str) -> Result<i32> {
        let log = self.paths().node_root(self.name(), node).join("daemon.log");
        let mut c = Command::new(&self.exe);
        c.arg("daemon").envs(self.node_env(node)?);
        let pid = self.spawn_daemonized(node, c, &log)?;
        let run = self.state.run(node);
        run.daemon_pid = Some(pid);
        run.killed = false;
        self.state.save()?;
        Ok(pid)
    }

    /// Whether node `n`'s etcd member says it is healthy (asked from inside the node).
    fn etcd_healthy(&self, node: &plan::NodePlan) -> bool {
        let net = self.paths().node_net(self.name(), &node.name);
        let addr = std::net::SocketAddr::from((node.address, ETCD_CLIENT_PORT));
        sys::http_get_in(&net, addr, "/health", Duration::from_secs(1))
            .is_some_and(|b| b.replace(' ', "").contains("\"health\":\"true\""))
    }

    fn wait_etcd(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let members: Vec<plan::NodePlan> = self.state.plan.members().cloned().collect();
        loop {
            let sick: Vec<&str> = members
                .iter()
                .filter(|n| !self.etcd_healthy(n))
                .map(|n| n.name.as_str())
                .collect();
            if sick.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!("etcd members on {} did not become healthy", sick.join(", ")),
                    secs: timeout.as_secs(),
                    hint: format!(
                        "see {}",
                        self.paths().node_root(self.name(), sick[0]).join("etcd.log").display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The cluster as node `node`'s daemon sees it (None: it does not answer).
    pub fn cluster_view(&self, node: &str) -> Option<vessel_types::api::ClusterView> {
        let sock = self.paths().node_root(self.name(), node).join("vessel.sock");
        let c = vessel_api::Client::connect(&sock).ok()?;
        c.stream().set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.stream().set_write_timeout(Some(Duration::from_secs(5))).ok()?;
        match c.call(&vessel_types::api::Request::NodeList).ok()? {
            vessel_types::api::Response::Cluster(v) => Some(v),
            _ => None,
        }
    }

    /// Wait until each of `nodes`' daemons lists every node of the lab that is not killed
    /// as ready and names a leader; returns the leader.
    fn wait_ready(&self, nodes: &[String], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let want: Vec<&str> = self
            .state
            .plan
            .nodes
            .iter()
            .filter(|n| !self.state.nodes.get(&n.name).is_some_and(|r| r.killed))
            .map(|n| n.name.as_str())
            .collect();
        loop {
            let mut leader = None;
            let mut waiting = None;
            for node in nodes {
                match self.cluster_view(node) {
                    Some(v) => {
                        let ready = want
                            .iter()
                            .all(|w| v.nodes.iter().any(|n| n.node.name == *w && n.state == "ready"));
                        if !ready || v.leader.is_none() {
                            waiting = Some(format!(
                                "{node} sees {}, leader {:?}",
                                v.nodes
                                    .iter()
                                    .map(|n| format!("{} {}", n.node.name, n.state))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                v.leader
                            ));
                        }
                        leader = v.leader.clone();
                    }
                    None => waiting = Some(format!("{node}'s daemon does not answer")),
                }
                if waiting.is_some() {
                    break;
                }
            }
            let last = match waiting {
                None => return Ok(leader.unwrap_or_default()),
                Some(w) => w,
            };
            if Instant::now() > deadline {
                return Err(LabError::Timeout {
                    what: format!("the nodes did not all become ready ({last})"),
                    secs: timeout.as_secs(),
                    hint: format!(
                        "see the daemon logs, e.g. {}",
                        self.paths()
                            .node_root(self.name(), &nodes[0])
                            .join("daemon.log")
                            .display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Power loss: kill everything in the node's cgroup (daemon, etcd member, VEs, helpers)
    /// and wait until it is empty. Its namespaces, data and partitions stay.
    pub fn kill(&mut self, node: &str) -> Result<()> {
        self.node(node)?;
        sys::kill_cgroup(&self.state.node_cgroup(node), KILL_WAIT)?;
        *self.state.run(node) = NodeRun {
            killed: true,
            ..NodeRun::default()
        };
        self.state.save()?;
        Ok(())
    }

    /// Start a killed node again on its data: its etcd member (if it has one), then its
    /// daemon; returns when its daemon lists it ready.
    pub fn start(&mut self, node: &str, progress: &mut dyn FnMut(&str)) -> Result<()> {
        let n = self.node(node)?;
        if sys::populated(&self.state.node_cgroup(node)) {
            return Err(LabError::Running { node: node.to_string() });
        }
        if n.etcd_member {
            let pid = self.start_etcd(node)?;
            progress(&format!("{node}: etcd member pid {pid}"));
        }
        let pid = self.start_daemon(node)?;
        progress(&format!("{node}: daemon pid {pid}"));
        self.wait_ready(&[node.to_string()], NODES_WAIT)?;
        progress(&format!("{node}: ready"));
        Ok(())
    }

    /// Cut `node` off from every other node, or from `from` only (added to any cut it has).
    pub fn partition(&mut self, node: &str, from: Option<&str>) -> Result<Vec<String>> {
        self.node(node)?;
        let peers: Vec<String> = match from {
            Some(f) => {
                self.node(f)?;
                vec![f.to_string()]
            }
            None => self
                .state
                .plan
                .nodes
                .iter()
                .filter(|n| n.name != node)
                .map(|n| n.name.clone())
                .collect(),
        };
        let mut cut = self.state.partitions.get(node).cloned().unwrap_or_default();
        cut.extend(peers.into_iter().filter(|p| p != node));
        cut.sort();
        cut.dedup();
        self.state.partitions.insert(node.to_string(), cut.clone());
        self.state.save()?;
        self.apply_partition(node, &cut)?;
        Ok(cut)
    }

    fn apply_partition(&self, node: &str, peers: &[String]) -> Result<()> {
        let addrs: Vec<std::net::Ipv4Addr> = peers
            .iter()
            .filter_map(|p| self.state.plan.node(p).map(|n| n.address))
            .collect();
        let script = nft::render(&self.state.plan.nft_table(), &addrs);
        let net = self.paths().node_net(self.name(), node);
        let mut c = sys::in_net(&net, "nft");
        c.args(["-f", "-"]);
        sys::run(&format!("partition table in {node}"), &mut c, Some(&script))?;
        Ok(())
    }

    /// Remove every partition.
    pub fn heal(&mut self) -> Result<Vec<String>> {
        let healed: Vec<String> = self.state.partitions.keys().cloned().collect();
        let nodes: Vec<String> = self.state.plan.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &nodes {
            self.apply_partition(n, &[])?;
        }
        self.state.partitions.clear();
        self.state.save()?;
        Ok(healed)
    }

    pub fn status(&self) -> LabStatus {
        let p = &self.state.plan;
        let nodes = p
            .nodes
            .iter()
            .map(|n| {
                let run = self.state.nodes.get(&n.name).cloned().unwrap_or_default();
                let cg = self.state.node_cgroup(&n.name);
                let mine = |pid: Option<i32>| {
                    pid.is_some_and(|pid| sys::alive(pid) && sys::pid_in(pid, &self.state.cgroup_v2, &cg))
                };
                let root = self.paths().node_root(self.name(), &n.name);
                NodeStatus {
                    name: n.name.clone(),
                    address: n.address.to_string(),
                    ve_subnet: n.ve_subnet.clone(),
                    state: if sys::populated(&cg) { "up" } else { "down" }.to_string(),
                    daemon_pid: run.daemon_pid,
                    daemon_alive: mine(run.daemon_pid),
                    etcd_member: n.etcd_member,
                    etcd_pid: run.etcd_pid,
                    etcd_alive: mine(run.etcd_pid),
                    etcd_healthy: n.etcd_member.then(|| self.etcd_healthy(n)),
                    partitioned_from: self.state.partitions.get(&n.name).cloned().unwrap_or_default(),
                    socket: root.join("vessel.sock").display().to_string(),
                    root: root.display().to_string(),
                }
            })
            .collect();
        LabStatus {
            version: self.state.version,
            name: p.name.clone(),
            prefix: p.prefix.clone(),
            net: format!("10.{}.0.0/16", p.net),
            phase: self.state.phase,
            etcd: p.etcd_client_urls(),
            nodes,
        }
    }

    /// Run `argv` inside `node` (its cgroup, network and mount namespaces, its `VESSEL_*`
    /// environment; `vessel` is this binary), stdio passed through; its exit code (128 +
    /// signal when killed). Works while the node is down too (for diagnostics).
    pub fn exec(&self, node: &str, argv: &[String]) -> Result<i32> {
        self.node(node)?;
        let Some((prog, args)) = argv.split_first() else {
            return Err(SysError::Other("nothing to run: give a command after --".into()).into());
        };
        let mut c = if prog == "vessel" {
            Command::new(&self.exe)
        } else {
            Command::new(prog)
        };
        c.args(args).envs(self.node_env(node)?);
        let (cg, net, mnt) = self.in_node(node);
        sys::enter_node(
            &mut c,
            &InNode {
                cgroup: &cg,
                net: &net,
                mnt: Some(&mnt),
                setsid: false,
                cwd: std::env::current_dir().ok(),
            },
        )?;
        let mut child = c.spawn().map_err(sys::io(format!("run {prog} in {node}")))?;
        // The terminal's Ctrl-C reaches the command; we stay to report its exit.
        // SAFETY: ignoring two signals in this process; no handler is installed.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        }
        let st = child.wait().map_err(sys::io(format!("wait for {prog} in {node}")))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
    }
}

/// The nets of the other labs on this machine.
fn other_labs(paths: &LabPaths) -> Vec<u8> {
    let Ok(rd) = std::fs::read_dir(&paths.run) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| LabState::load(&e.path().join("lab.json")).ok().flatten())
        .map(|s| s.plan.net)
        .collect()
}

/// The labs on this machine (names), for `lab list`-like messages.
pub fn labs(paths: &LabPaths) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(&paths.run) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().join("lab.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Remove lab `name` and everything it made: stop the daemons (bounded), kill what is left
/// by cgroup, remove cgroups, namespace files, data and state. Works on a half-made lab and
/// after `vessel lab` itself crashed; a missing lab is not an error (returns false).
pub fn down(name: &str, paths: &LabPaths, progress: &mut dyn FnMut(&str)) -> Result<bool> {
    plan::check_name(name)?;
    let dir = paths.state_dir(name);
    let file = paths.state_file(name);
    if !file.exists() {
        // A crash before the first save leaves at most an empty state dir.
        if dir.exists() {
            sys::detach_under(&dir)?;
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(false);
    }
    let _lock = sys::lock(&dir.join("lock"), LOCK_WAIT)?;
    let state = LabState::load(&file)?.ok_or_else(|| LabError::NotFound(name.to_string(), file.clone()))?;
    let mut left: Vec<String> = Vec::new();
    let lab_cg = state.lab_cgroup();

    // 1. Daemons first, gracefully: they stop their VEs and leave the cluster.
    let mut stopping = Vec::new();
    for (node, run) in &state.nodes {
        if let Some(pid) = run.daemon_pid {
            if sys::alive(pid) && sys::pid_in(pid, &state.cgroup_v2, &state.node_cgroup(node)) {
                // SAFETY: a pid we started, checked to be in this lab's cgroup just now.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                stopping.push(pid);
            }
        }
    }
    if !stopping.is_empty() {
        progress(&format!("stopping {} node daemon(s)", stopping.len()));
        let deadline = Instant::now() + STOP_WAIT;
        while stopping.iter().any(|p| sys::alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // 2. Everything left in the lab's cgroup (etcd members, VEs, helpers, exec'd commands).
    if let Err(e) = sys::kill_cgroup(&lab_cg, KILL_WAIT) {
        left.push(e.to_string());
    }
    // 3. Cgroups: the unified one, and the VEs' cgroups the daemons made in each v1 hierarchy.
    let mut cgs = vec![lab_cg.clone()];
    cgs.extend(
        sys::cgroup_v1_roots()
            .into_iter()
            .map(|r| r.join(state.plan.cgroup_name())),
    );
    for cg in cgs {
        if let Err(e) = sys::remove_cgroup_tree(&cg) {
            left.push(e.to_string());
        }
    }
    // 4. Namespace files: with no process left in them, the namespaces (and every link,
    //    bridge, nft table and mount inside) go with the last reference.
    let ns = paths.ns_dir(name);
    if let Ok(rd) = std::fs::read_dir(&ns) {
        for e in rd.flatten() {
            if let Err(e) = sys::detach(&e.path()) {
                left.push(e.to_string());
            }
        }
    }
    if let Err(e) = sys::detach_under(&ns) {
        left.push(e.to_string());
    }
    // 5. Data and state (nothing of the nodes is mounted in this namespace; detach anyway
    //    so a removal never crosses into a mounted file system).
    let data = paths.data_dir(name);
    if let Err(e) = sys::detach_under(&data) {
        left.push(e.to_string());
    }
    if let Err(e) = std::fs::remove_dir_all(&data) {
        if e.kind() != std::io::ErrorKind::NotFound {
            left.push(format!("remove {}: {e}", data.display()));
        }
    }
    progress(&format!("lab {name} ({}) removed", state.plan.prefix));
    if !left.is_empty() {
        // Keep the state file: a second `down` tries again.
        return Err(LabError::Leftovers(left.join("; ")));
    }
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(LabError::Leftovers(format!("remove {}: {e}", dir.display())));
        }
    }
    Ok(true)
}
