//! The node as a member of the cluster: the control store (a private one-member etcd it
//! supervises, or the operator's etcd cluster), its registration under a lease kept alive,
//! and its candidacy for the control center's leadership.
//!
//! The node's records are `keys::member` (permanent; draining is kept there) and
//! `keys::node` (under its lease): a member without a live record is lost. The store's work runs on a small tokio runtime
//! of its own; the daemon's threads call in with [`Member::block_on`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vessel_cluster::etcd::{free_port, EtcdConfig, PrivateEtcd};
use vessel_cluster::keys::{self, NodeRecord};
use vessel_cluster::store::{Leadership, Registration, Store};
use vessel_types::api::{ClusterNode, ClusterView};
use vessel_types::config::ClusterSettings;

pub struct Member {
    pub name: String,
    pub endpoints: Vec<String>,
    rt: tokio::runtime::Runtime,
    store: Store,
    etcd: Option<Arc<Mutex<PrivateEtcd>>>,
    record: NodeRecord,
    state: Arc<Mutex<Live>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Woken at every change under `/vessel/v1/`: the leader's scheduler waits on it.
    pub changed_leader: Arc<tokio::sync::Notify>,
    /// The same, for this node's reconcile loop.
    pub changed_node: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Live {
    lease: Option<i64>,
    leader: bool,
    leadership: Option<Leadership>,
    /// Why the node is not registered now (etcd unreachable, ...).
    problem: Option<String>,
}

/// The private etcd's ports, kept from one start to the next while they are free.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ports {
    client: u16,
    peer: u16,
}

fn free(port: u16) -> bool {
    port != 0 && std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn ports(root: &Path, s: &ClusterSettings) -> std::io::Result<(u16, u16)> {
    let file = root.join("etcd.ports");
    let last: Option<Ports> = std::fs::read(&file).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let pick = |configured: u16, last: Option<u16>| -> std::io::Result<u16> {
        if configured != 0 {
            return Ok(configured);
        }
        match last {
            Some(p) if free(p) => Ok(p),
            _ => free_port(),
        }
    };
    let client = pick(s.client_port, last.as_ref().map(|p| p.client))?;
    let mut peer = pick(s.peer_port, last.as_ref().map(|p| p.peer))?;
    while peer == client {
        peer = free_port()?;
    }
    std::fs::write(&file, serde_json::to_vec(&Ports { client, peer }).expect("plain data"))?;
    Ok((client, peer))
}

/// The node's name when `[cluster] name` does not give one.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| vessel_types::Name::parse(h).is_ok())
        .unwrap_or_else(|| "node".to_string())
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// What this node has to offer.
fn resources(root: &Path) -> (u32, u64, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()))
        })
        .map_or(0, |kib| kib * 1024);
    let disk = nix::sys::statvfs::statvfs(root).map_or(0, |s| s.blocks() * s.fragment_size());
    (cpus, memory, disk)
}

impl Member {
    /// Join the cluster: start the private etcd if no etcd is configured, register, and
    /// run for leader in the background. A private etcd that does not start is an error;
    /// an external etcd that does not answer is an error at start too (the operator
    /// checks the URLs), and is retried while the node runs.
    pub fn start(root: &Path, s: &ClusterSettings) -> Result<Member, String> {
        let name = s.name.clone().unwrap_or_else(hostname);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("vessel-cluster")
            .enable_all()
            .build()
            .map_err(|e| format!("cluster runtime: {e}"))?;
        let (etcd, endpoints) = if s.etcd.is_empty() {
            let (client, peer) = ports(root, s).map_err(|e| format!("private etcd ports: {e}"))?;
            let mut cfg = EtcdConfig::new(&name, Self::etcd_data(root), client, peer);
            // In a cluster of several: also served to other nodes (TLS, client certificates).
            cfg.tls = crate::peer::etcd_tls(root, s);
            let e = PrivateEtcd::start(cfg).map_err(|e| e.to_string())?;
            let ep = e.endpoint();
            (Some(Arc::new(Mutex::new(e))), vec![ep])
        } else {
            (None, s.etcd.clone())
        };
        let store = rt
            .block_on(async {
                let st = Store::connect_with(&endpoints, crate::peer::store_tls(root).as_ref()).await?;
                // One read proves the store answers (connect alone may not).
                st.nodes().await?;
                Ok::<_, vessel_cluster::ClusterError>(st)
            })
            .map_err(|e| e.to_string())?;
        let (cpus, memory, disk) = resources(root);
        let record = NodeRecord {
            name: name.clone(),
            address: s.address.map(|a| a.to_string()).unwrap_or_default(),
            cpus,
            memory,
            disk,
            labels: Default::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            draining: false,
            since_ns: now_ns(),
        };
        let m = Member {
            name,
            endpoints,
            rt,
            store,
            etcd,
            record,
            state: Arc::default(),
            stop: Arc::default(),
            changed_leader: Arc::default(),
            changed_node: Arc::default(),
        };
        let first =
            m.rt.block_on(m.store.register(&m.record, Duration::from_secs(s.lease_ttl_secs)));
        let reg = first.map_err(|e| e.to_string())?;
        // The member record says what the operator decided about the node (draining): a
        // restart keeps it.
        m.rt.block_on(async {
            let key = keys::member(&m.name);
            let mut rec = m.record.clone();
            if let Some(old) = m.store.get::<NodeRecord>(&key).await? {
                rec.draining = old.draining;
            }
            m.store.put(&key, &rec).await
        })
        .map_err(|e| e.to_string())?;
        m.run(reg, Duration::from_secs(s.lease_ttl_secs));
        m.supervise_etcd();
        m.watch();
        Ok(m)
    }

    /// Run `f` on the cluster runtime from one of the daemon's threads.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The leadership while this node leads the control center.
    pub fn leadership(&self) -> Option<Leadership> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).leadership.clone()
    }

    /// Wake the scheduler and the reconcile loop at every change in the store.
    fn watch(&self) {
        let inner = Arc::new(tokio::sync::Notify::new());
        let (l, n) = (self.changed_leader.clone(), self.changed_node.clone());
        let fan = inner.clone();
        let _guard = self.rt.enter();
        self.store.watch_prefix(keys::PREFIX.to_string(), inner);
        self.rt.spawn(async move {
            loop {
                fan.notified().await;
                l.notify_one();
                n.notify_one();
            }
        });
    }

    /// Keep the registration alive (re-register if the lease is lost) and stand for
    /// leader under it.
    fn run(&self, first: Registration, ttl: Duration) {
        let (store, record, state, stop, changed) = (
            self.store.clone(),
            self.record.clone(),
            self.state.clone(),
            self.stop.clone(),
            self.changed_leader.clone(),
        );
        self.rt.spawn(async move {
            let mut reg = Some(first);
            let mut backoff = Duration::from_millis(200);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = match reg.take() {
                    Some(r) => r,
                    None => match store.register(&record, ttl).await {
                        Ok(r) => r,
                        Err(e) => {
                            set(&state, |l| l.problem = Some(e.to_string()));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                            continue;
                        }
                    },
                };
                backoff = Duration::from_millis(200);
                set(&state, |l| {
                    l.lease = Some(r.lease);
                    l.problem = None;
                });
                tokio::select! {
                    won = store.campaign(&record.name, r.lease) => {
                        if let Ok(l) = won {
                            set(&state, |s| {
                                s.leader = true;
                                s.leadership = Some(l.clone());
                            });
                            tracing::info!(node = %record.name, "this node leads the control center");
                            // The scheduler runs while the lease (and so the leadership) lasts.
                            let lead = crate::control::lead(store.clone(), l, changed.clone());
                            tokio::select! {
                                _ = lead => {}
                                _ = lease_ends(r.alive.clone()) => {}
                            }
                        } else {
                            // The election failed: hold until the lease ends.
                            lease_ends(r.alive.clone()).await;
                        }
                    }
                    _ = lease_ends(r.alive.clone()) => {}
                }
                set(&state, |l| {
                    l.leader = false;
                    l.leadership = None;
                    l.lease = None;
                    l.problem = Some("the node's lease ended; registering again".into());
                });
                tracing::warn!(node = %record.name, "cluster lease lost; registering again");
                drop(r);
            }
        });
    }

    fn supervise_etcd(&self) {
        let Some(etcd) = self.etcd.clone() else { return };
        let stop = self.stop.clone();
        let _ = std::thread::Builder::new().name("vessel-etcd".into()).spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let mut e = etcd.lock().unwrap_or_else(|p| p.into_inner());
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match e.ensure_running() {
                    Ok(true) => tracing::warn!(restarts = e.restarts, "the private etcd had stopped: restarted"),
                    Ok(false) => {}
                    Err(err) => tracing::error!("the private etcd: {err}"),
                }
            }
        });
    }

    /// The cluster as the store shows it now.
    pub fn view(&self) -> Result<ClusterView, String> {
        let (members, alive, leader, load, heartbeats) = self
            .rt
            .block_on(async {
                let members: Vec<NodeRecord> = self.store.list(&keys::members()).await?;
                let alive = self.store.nodes().await?;
                let leader = self.store.leader().await?;
                // What is placed on each node, and what it requests.
                let mut memory_low: BTreeMap<String, u64> = BTreeMap::new();
                for kv in self.store.list_raw(&keys::ves()).await? {
                    if let Some((ve, "spec")) = keys::ve_part(&kv.key) {
                        if let Ok(e) = keys::decode::<keys::VeEntry>(&kv.key, &kv.value) {
                            memory_low.insert(ve.to_string(), e.spec.limits.memory_low.unwrap_or(0));
                        }
                    }
                }
                let mut load: BTreeMap<String, (usize, u64)> = BTreeMap::new();
                for kv in self.store.list_raw(&keys::assigned_all()).await? {
                    let rest = kv.key.trim_start_matches(&keys::assigned_all());
                    if let Some((node, ve)) = rest.split_once('/') {
                        let l = load.entry(node.to_string()).or_default();
                        l.0 += 1;
                        l.1 += memory_low.get(ve).copied().unwrap_or(0);
                    }
                }
                let mut heartbeats: BTreeMap<String, i64> = BTreeMap::new();
                for kv in self.store.list_raw(&keys::nodes()).await? {
                    if kv.lease != 0 {
                        if let Ok(Some((granted, left))) = self.store.lease_ttl(kv.lease).await {
                            let name = kv.key.trim_start_matches(&keys::nodes()).to_string();
                            heartbeats.insert(name, (granted - left).max(0));
                        }
                    }
                }
                Ok::<_, vessel_cluster::ClusterError>((members, alive, leader, load, heartbeats))
            })
            .map_err(|e| e.to_string())?;
        let mut nodes: Vec<ClusterNode> = members
            .into_iter()
            .map(|m| {
                let live = alive.iter().find(|a| a.name == m.name);
                // Draining is the operator's word, kept in the member record.
                let state = vessel_control::model::NodeState::of(live.is_some(), m.draining).as_str();
                let mut node = live.cloned().unwrap_or_else(|| m.clone());
                node.draining = m.draining;
                let (ves, memory_requested) = load.get(&node.name).copied().unwrap_or_default();
                ClusterNode {
                    leader: leader.as_deref() == Some(node.name.as_str()),
                    state: state.to_string(),
                    ves,
                    memory_requested,
                    heartbeat_secs_ago: live.and_then(|_| heartbeats.get(&node.name).copied()),
                    node,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.node.name.cmp(&b.node.name));
        let live = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ClusterView {
            this_node: self.name.clone(),
            etcd: self.endpoints.clone(),
            private_etcd: self.etcd.is_some(),
            leader,
            problem: live.problem.clone(),
            nodes,
        })
    }

    /// Mark a member draining (or not). Any node may: it is the operator's intent.
    pub fn set_draining(&self, name: &str, drain: bool) -> Result<(), MemberError> {
        self.rt.block_on(async {
            let key = keys::member(name);
            let mut rec: NodeRecord = self
                .store
                .get(&key)
                .await
                .map_err(|e| MemberError::Store(e.to_string()))?
                .ok_or_else(|| MemberError::NotFound(name.to_string()))?;
            rec.draining = drain;
            self.store
                .put(&key, &rec)
                .await
                .map_err(|e| MemberError::Store(e.to_string()))
        })
    }

    /// Forget a member that is lost (a live node is refused: stop it first). A node that
    /// still has VEs is refused unless `force`: its VEs then stay pending (their files are
    /// on that node). Its certificate is revoked first: no node serves it any more.
    pub fn remove(&self, name: &str, force: bool) -> Result<(), MemberError> {
        self.rt.block_on(async {
            let st = |e: vessel_cluster::ClusterError| MemberError::Store(e.to_string());
            let key = keys::member(name);
            if self.store.get::<NodeRecord>(&key).await.map_err(st)?.is_none() {
                return Err(MemberError::NotFound(name.to_string()));
            }
            if self
                .store
                .get::<NodeRecord>(&keys::node(name))
                .await
                .map_err(st)?
                .is_some()
            {
                return Err(MemberError::Alive(name.to_string()));
            }
            let ves: Vec<String> = self
                .store
                .list_raw(&keys::assigned_to(name))
                .await
                .map_err(st)?
                .iter()
                .filter_map(|kv| kv.key.rsplit('/').next().map(str::to_string))
                .collect();
            if !ves.is_empty() && !force {
                return Err(MemberError::HasVes(name.to_string(), ves));
            }
            if let Some(c) = self
                .store
                .get::<keys::CertRecord>(&keys::cert(name))
                .await
                .map_err(st)?
            {
                let r = keys::Revoked {
                    node: name.to_string(),
                    sha256: c.sha256.clone(),
                    serial: c.serial.clone(),
                    removed_unix: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                };
                self.store.put(&keys::revoked(&c.sha256), &r).await.map_err(st)?;
                self.store.delete(&keys::cert(name)).await.map_err(st)?;
                tracing::info!(node = name, cert = %c.sha256, "node removed: its certificate is revoked");
            } else {
                tracing::info!(node = name, "node removed (no certificate of it is on record)");
            }
            self.store.delete(&keys::templates(name)).await.map_err(st)?;
            self.store.delete(&key).await.map_err(st)
        })
    }

    /// Leave: end the lease (the record and any leadership go at once) and stop the
    /// private etcd.
    pub fn shutdown(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let lease = self.state.lock().unwrap_or_else(|p| p.into_inner()).lease;
        if let Some(l) = lease {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(2), self.store.revoke(l)).await });
        }
        if let Some(e) = &self.etcd {
            e.lock().unwrap_or_else(|p| p.into_inner()).stop();
        }
    }

    /// Serve the private etcd to other nodes too (restarts it on the same data).
    pub fn serve_etcd_tls(&self, tls: vessel_cluster::etcd::EtcdTls) -> Result<(), String> {
        let Some(e) = &self.etcd else { return Ok(()) };
        let port = {
            let mut e = e.lock().unwrap_or_else(|p| p.into_inner());
            let mut cfg = e.config().clone();
            cfg.tls = Some(tls);
            let port = cfg.client_port;
            // The supervising thread starts it again (it must outlive etcd's start).
            e.replace_config(cfg);
            port
        };
        let t0 = std::time::Instant::now();
        while !vessel_cluster::etcd::healthy(port) {
            if t0.elapsed() > Duration::from_secs(40) {
                return Err(format!("etcd did not answer again on 127.0.0.1:{port} within 40 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// This node runs the cluster's private etcd.
    pub fn private_etcd(&self) -> bool {
        self.etcd.is_some()
    }

    /// The etcd client URLs other nodes use: the private etcd's listener for them, or the
    /// operator's etcd cluster.
    pub fn etcd_for_peers(&self) -> Vec<String> {
        match &self.etcd {
            Some(e) => match &e.lock().unwrap_or_else(|p| p.into_inner()).config().tls {
                Some(t) => vec![t.url()],
                None => self.endpoints.clone(),
            },
            None => self.endpoints.clone(),
        }
    }

    fn etcd_data(root: &Path) -> PathBuf {
        root.join("etcd")
    }
}

/// Returns when the registration's keep-alive stops.
async fn lease_ends(mut alive: tokio::sync::watch::Receiver<bool>) {
    let _ = alive.wait_for(|a| !*a).await.is_ok();
}

#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("no node {0} in the cluster: `vessel node list` shows them")]
    NotFound(String),
    #[error("node {0} is alive: stop its daemon (`vessel down` on it) before removing it, or drain it")]
    Alive(String),
    #[error("node {0} has VEs ({list}): move them (`vessel ve move VE --to NODE`) or destroy them first, or remove it with --force to leave them pending (their files stay on {0})", list = .1.join(", "))]
    HasVes(String, Vec<String>),
    #[error("{0}")]
    Store(String),
}

fn set(state: &Mutex<Live>, f: impl FnOnce(&mut Live)) {
    f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
}
