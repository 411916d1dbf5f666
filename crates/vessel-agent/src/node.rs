//! The node: its state, and the lifecycle of its VEs (create, start, stop, destroy, set),
//! resuming VEs after a daemon restart, and exit handling with restart policies.
//! Templates, exec and console live in sibling modules on the same `Node`.

use crate::alloc;
use crate::fsroot::VesselFsRoot;
use crate::keeper::{KeeperClient, KeeperRequest};
use crate::monitor::Monitor;
use crate::state::{NodeConfig, NodeState, VeRecord};
use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vessel_types::api::{ApiError, ErrorCode, NodeStatus, VeChange, VeInfo};
use vessel_types::{Name, VeSpec, VeStatus};
use vessel_ve::cgroup::VeCgroup;
use vessel_ve::rootfs::{RootFs, RootFsRequest};
use vessel_ve::runtime::{self, HelperRequest, NetPlan};
use vessel_ve::{oci, osconfig, sys, template, Layout};

pub type NResult<T> = Result<T, ApiError>;

pub fn err(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

pub fn internal(ctx: &str, e: impl std::fmt::Display) -> ApiError {
    err(ErrorCode::Internal, format!("{ctx}: {e}"))
}

/// Settings a daemon starts with.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub root: PathBuf,
    pub socket: PathBuf,
    pub config: NodeConfig,
    /// Where the Debian debootstrap tarball is cached between template builds.
    pub cache_dir: PathBuf,
    /// The vessel binary, re-executed as the runtime helper.
    pub exe: PathBuf,
    pub cgroup_root: PathBuf,
    pub busybox: PathBuf,
    /// The node config file (`node.toml`); `daemon::run` reads it into `settings`.
    pub config_file: crate::config::ConfigFile,
    /// Default limits, maxima and API bounds (built-in defaults until the file is read).
    pub settings: vessel_types::config::NodeSettings,
}

/// What the node does after a VE's init ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    Restart,
    Stop,
    Fail,
}

/// Pure exit decision. `code` is the init's exit code, negative for a signal. A VE that
/// ran `reboot` inside (init killed by SIGHUP) restarts; `poweroff` (SIGINT) stays off.
/// `quick_failures` counts consecutive runs shorter than 10 s; after 5 the VE is left failed.
pub fn decide_exit(spec: &VeSpec, code: Option<i32>, user_stopped: bool, quick_failures: u32) -> ExitAction {
    if user_stopped || code == Some(-libc::SIGINT) {
        return ExitAction::Stop;
    }
    if code == Some(-libc::SIGHUP) {
        return ExitAction::Restart;
    }
    let failed = code != Some(0);
    if spec.restart.should_restart(code, false) {
        if quick_failures >= 5 {
            ExitAction::Fail
        } else {
            ExitAction::Restart
        }
    } else if failed {
        ExitAction::Fail
    } else {
        ExitAction::Stop
    }
}

/// Handles on a running VE that live only in daemon memory.
pub(crate) struct Live {
    pub pidfd: Arc<OwnedFd>,
    /// The console keeper holds this VE's console.
    pub console: bool,
    pub exit_token: u64,
}

pub struct Node {
    pub opts: NodeOptions,
    pub layout: Layout,
    pub(crate) state: Mutex<NodeState>,
    ve_locks: Mutex<HashMap<Name, Arc<Mutex<()>>>>,
    pub(crate) live: Mutex<HashMap<Name, Live>>,
    quick_failures: Mutex<HashMap<Name, u32>>,
    pub(crate) monitor: Arc<Monitor>,
    pub(crate) rootfs: VesselFsRoot,
    pub(crate) template_lock: crate::templates::BuildLock,
    pub(crate) keeper: KeeperClient,
    started: Instant,
    /// Membership in the cluster (set by the daemon once it has joined).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Member>>,
    pub(crate) control: crate::control::ControlState,
    /// The node-to-node transport (set by the daemon after the cluster).
    pub peer: std::sync::OnceLock<Arc<crate::peer::Peer>>,
    /// VEs moving out of or into this node (`transfer`).
    pub(crate) moves: crate::transfer::Moves,
    /// Copies of other nodes' VE volumes this node is a replica of (`replicate`).
    pub(crate) replicas: crate::replicate::Replicas,
    pub(crate) scrubs: crate::scrubbing::Scrubs,
    /// The VXLAN port that joins this node's bridge to the others' (see `overlay`).
    pub(crate) overlay: std::sync::OnceLock<vessel_ve::netfilter::OverlayPort>,
}

/// What the root tree provider needs to know about a VE.
pub(crate) fn rootfs_request<'a>(
    rec: &'a VeRecord,
    ve: &'a vessel_ve::layout::VeLayout,
    template_rootfs: &'a std::path::Path,
) -> RootFsRequest<'a> {
    RootFsRequest {
        ve,
        template_rootfs,
        uid_base: alloc::uid_base(rec.slot),
        uid_count: alloc::UID_COUNT,
        template_id: &rec.template_id,
        disk: rec.spec.limits.disk,
        inodes: rec.spec.limits.inodes,
        history: rec.spec.limits.history,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Node {
    /// Open (or initialise) the node state under `opts.root`.
    pub fn open(opts: NodeOptions) -> NResult<Arc<Node>> {
        let layout = Layout::new(&opts.root);
        for d in [
            layout.root().to_path_buf(),
            layout.templates(),
            layout.ves(),
            layout.run(),
        ] {
            std::fs::create_dir_all(&d).map_err(|e| internal(&format!("create {}", d.display()), e))?;
        }
        let mut state = NodeState::load(&layout.state_file())
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
            .unwrap_or_else(|| NodeState::new(opts.config.clone()));
        state.config = opts.config.clone();
        state
            .save(&layout.state_file())
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        let monitor = Monitor::new().map_err(|e| internal("epoll", e))?;
        let keeper = KeeperClient::new(&opts.root, &opts.exe);
        Ok(Arc::new(Node {
            opts,
            layout,
            state: Mutex::new(state),
            ve_locks: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            quick_failures: Mutex::new(HashMap::new()),
            monitor,
            rootfs: VesselFsRoot::new(),
            template_lock: Default::default(),
            keeper,
            started: Instant::now(),
            cluster: std::sync::OnceLock::new(),
            control: Default::default(),
            peer: std::sync::OnceLock::new(),
            moves: Default::default(),
            replicas: Default::default(),
            scrubs: Default::default(),
            overlay: std::sync::OnceLock::new(),
        }))
    }

    pub(crate) fn save(&self, st: &NodeState) -> NResult<()> {
        st.save(&self.layout.state_file())
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))
    }

    /// Serialise operations on one VE (start vs destroy, exit handling vs stop).
    pub(crate) fn ve_lock(&self, name: &Name) -> Arc<Mutex<()>> {
        lock(&self.ve_locks).entry(name.clone()).or_default().clone()
    }

    pub(crate) fn record(&self, name: &Name) -> NResult<VeRecord> {
        lock(&self.state).ves.get(name).cloned().ok_or_else(|| not_found(name))
    }

    pub(crate) fn update<R>(&self, name: &Name, f: impl FnOnce(&mut VeRecord) -> R) -> NResult<R> {
        let mut st = lock(&self.state);
        let rec = st.ves.get_mut(name).ok_or_else(|| not_found(name))?;
        let r = f(rec);
        self.save(&st)?;
        Ok(r)
    }

    pub fn cgroup(&self, name: &Name) -> VeCgroup {
        VeCgroup::new(&self.opts.cgroup_root, &self.opts.config.cgroup_parent, name.as_str())
    }

    /// Host end of a VE's veth: unique per node bridge and VE slot, at most 15 bytes.
    fn host_if(&self, rec: &VeRecord) -> String {
        vessel_ve::net::host_if(&self.opts.config.bridge, rec.slot)
    }

    // ------------------------------------------------------------------ queries

    pub fn status(&self) -> NodeStatus {
        let st = lock(&self.state);
        NodeStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: vessel_types::api::API_VERSION,
            pid: std::process::id(),
            root: self.opts.root.display().to_string(),
            socket: self.opts.socket.display().to_string(),
            bridge: st.config.bridge.clone(),
            subnet: st.config.subnet,
            cgroup: vessel_ve::cgroup::CgroupVersion::detect(&self.opts.cgroup_root)
                .as_str()
                .to_string(),
            ves_total: st.ves.len(),
            ves_running: st.ves.values().filter(|v| v.status == VeStatus::Running).count(),
            templates: st.templates.len(),
            uptime_secs: self.started.elapsed().as_secs(),
        }
    }

    /// The cluster as the control store shows it.
    pub fn cluster_view(&self) -> NResult<vessel_types::api::ClusterView> {
        self.member()?
            .view()
            .map_err(|m| ApiError::new(vessel_types::api::ErrorCode::Unavailable, m))
    }

    fn member(&self) -> NResult<&Arc<crate::cluster::Member>> {
        self.cluster.get().ok_or_else(|| {
            ApiError::new(
                vessel_types::api::ErrorCode::Unavailable,
                "this node has not joined a cluster yet: see the daemon log",
            )
        })
    }

    /// The node-to-node transport.
    pub fn peer(&self) -> NResult<&Arc<crate::peer::Peer>> {
        self.peer.get().ok_or_else(|| {
            ApiError::new(
                vessel_types::api::ErrorCode::Unavailable,
                "this node has not joined a cluster yet: see the daemon log",
            )
        })
    }

    /// Drain or undrain a node of the cluster, or forget a lost one.
    /// Drain/undrain (`Some`) or remove (`None`, `force` for a node with VEs) a member.
    pub fn node_change(&self, name: &str, change: Option<bool>, force: bool) -> NResult<()> {
        use crate::cluster::MemberError;
        use vessel_types::api::ErrorCode;
        let m = self.member()?;
        let r = match change {
            Some(drain) => m.set_draining(name, drain),
            None => m.remove(name, force),
        };
        r.map_err(|e| {
            let code = match e {
                MemberError::NotFound(_) => ErrorCode::NotFound,
                MemberError::Alive(_) | MemberError::HasVes(..) => ErrorCode::Conflict,
                MemberError::Store(_) => ErrorCode::Unavailable,
            };
            ApiError::new(code, e.to_string())
        })
    }

    pub fn info(&self, rec: &VeRecord) -> VeInfo {
        let mut i = rec.info();
        i.host_interface = self.host_if(rec);
        i.mac = rec
            .spec
            .ip
            .map(|ip| vessel_ve::net::ve_mac(ip.addr).to_string())
            .unwrap_or_default();
        if rec.status == VeStatus::Running {
            i.memory_used = self.cgroup(&rec.spec.name).memory_used();
            i.console_lost = lock(&self.live).get(&rec.spec.name).is_none_or(|l| !l.console);
            i.fs = self.fs_info(&rec.spec.name);
            i.replicas = self
                .replica_status(rec.spec.name.as_str())
                .unwrap_or_default()
                .into_iter()
                .map(|r| vessel_types::api::ReplicaInfo {
                    state: if r.in_sync && r.lag_txs == 0 {
                        "in-sync".into()
                    } else {
                        r.state
                    },
                    node: r.node,
                    in_sync: r.in_sync,
                    durable_seq: r.acked,
                    lag_txs: r.lag_txs,
                    lag_bytes: r.lag_bytes,
                })
                .collect();
        }
        i.last_scrub = self.scrubs.last(rec.spec.name.as_str());
        i
    }

    pub fn list(&self) -> Vec<VeInfo> {
        let recs: Vec<VeRecord> = lock(&self.state).ves.values().cloned().collect();
        recs.iter().map(|r| self.info(r)).collect()
    }

    pub fn show(&self, name: &Name) -> NResult<VeInfo> {
        Ok(self.info(&self.record(name)?))
    }

    // ------------------------------------------------------------------ create

    pub fn create(&self, mut spec: VeSpec) -> NResult<VeInfo> {
        spec.validate()
            .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        // The node's defaults for what the creator left out; recorded in the spec.
        spec.limits = self
            .opts
            .settings
            .limits
            .admit(&spec.limits)
            .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let name = spec.name.clone();
        let vl = self.ve_lock(&name);
        let _g = lock(&vl);
        let exists = || {
            err(
                ErrorCode::AlreadyExists,
                format!("VE '{name}' already exists: pick another name or destroy it first"),
            )
        };
        if lock(&self.state).ves.contains_key(&name) {
            return Err(exists());
        }
        // In a cluster the address and uid range are claimed in etcd (kept on every node).
        let claimed = self.claim_identity(&spec)?;
        let rec = {
            let mut st = lock(&self.state);
            if st.ves.contains_key(&name) {
                return Err(exists());
            }
            let tpl = st.templates.get(&spec.template).ok_or_else(|| {
                err(ErrorCode::NotFound, format!("template '{}' not found: build it with `vessel template build {}` or see `vessel template list`", spec.template, spec.template))
            })?;
            let template_id = tpl.id.clone();
            let slots: BTreeSet<u32> = st.ves.values().map(|v| v.slot).collect();
            let subnet = st.config.subnet;
            let used: Vec<_> = st
                .ves
                .values()
                .filter_map(|v| v.spec.ip.map(|ip| (ip.addr, v.spec.name.to_string())))
                .collect();
            let slot = match &claimed {
                Some(id) => {
                    // Only a VE the cluster never registered (see `register_identities`) can collide here.
                    let here = used.iter().find(|(a, _)| *a == id.ip.addr);
                    if slots.contains(&id.slot) || here.is_some() {
                        return Err(err(
                            ErrorCode::Conflict,
                            format!("the cluster gave VE '{name}' address {} and uid range {}, but a VE of this node that the cluster does not know holds one of them: see the daemon log", id.ip, id.slot),
                        ));
                    }
                    spec.ip = Some(id.ip);
                    id.slot
                }
                None => {
                    spec.ip = Some(match spec.ip {
                        Some(ip) => alloc::check_ip(&subnet, ip, &used)
                            .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?,
                        None => {
                            let used: BTreeSet<_> = used.iter().map(|(a, _)| *a).collect();
                            alloc::alloc_ip(&subnet, &used)
                                .ok_or_else(|| err(ErrorCode::Exhausted, format!("no free address left in {subnet}")))?
                        }
                    });
                    alloc::alloc_slot(&slots)
                        .ok_or_else(|| err(ErrorCode::Exhausted, "no free uid range left on this node"))?
                }
            };
            let rec = VeRecord::new(spec.clone(), template_id, slot);
            st.ves.insert(name.clone(), rec.clone());
            rec
        };
        let ve = self.layout.ve(name.as_str());
        let tpl_root = self.layout.template_rootfs(&rec.template_id);
        let req = rootfs_request(&rec, &ve, &tpl_root);
        let created = self
            .rootfs
            .create(&req)
            .map_err(|e| internal("create VE storage", e))
            .and_then(|_| {
                let st = lock(&self.state);
                self.save(&st)
            })
            .and_then(|_| self.sync_bridge_filter());
        if let Err(e) = created {
            let _ = self.rootfs.destroy(&ve);
            let mut st = lock(&self.state);
            st.ves.remove(&name);
            let _ = self.save(&st);
            return Err(e);
        }
        Ok(self.info(&rec))
    }

    // ------------------------------------------------------------------ start

    pub fn start(&self, name: &Name) -> NResult<VeInfo> {
        let vl = self.ve_lock(name);
        let _g = lock(&vl);
        let rec = self.record(name)?;
        if !rec.status.can_start() {
            return Err(err(ErrorCode::Conflict, format!("VE '{name}' is already running")));
        }
        self.start_locked(rec)
    }

    pub(crate) fn start_locked(&self, rec: VeRecord) -> NResult<VeInfo> {
        let name = rec.spec.name.clone();
        let started = self.launch(&rec).and_then(|(pid, master)| {
            let watched = self.watch(&name, pid, master);
            if watched.is_err() {
                // Never leave a VE running that the node does not track.
                // SAFETY: kill(2) on the init we just started (its pid namespace dies with it).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            watched.map(|()| pid)
        });
        match started {
            Ok(pid) => {
                let pid_start = sys::process_start_time(pid).ok();
                let rec = self.update(&name, |r| {
                    r.status = VeStatus::Running;
                    r.pid = Some(pid);
                    r.pid_start = pid_start;
                    r.user_stopped = false;
                    r.started_unix = Some(vessel_ve::now_unix());
                    r.last_error = None;
                    r.restart_pending = false;
                    r.clone()
                })?;
                tracing::info!(ve = %name, pid, "VE started");
                Ok(self.info(&rec))
            }
            Err(e) => {
                self.cleanup_runtime(&rec);
                let msg = e.message.clone();
                let _ = self.update(&name, |r| {
                    r.status = VeStatus::Failed;
                    r.pid = None;
                    r.last_error = Some(msg);
                });
                Err(e)
            }
        }
    }

    /// Watch `pid`'s exit and record the VE as live.
    fn track(&self, name: &Name, pid: i32, pidfd: Arc<OwnedFd>, console: bool) -> std::io::Result<()> {
        let exit_token = self.monitor.watch_exit(name.clone(), pid, pidfd.clone())?;
        lock(&self.live).insert(
            name.clone(),
            Live {
                pidfd,
                console,
                exit_token,
            },
        );
        Ok(())
    }

    /// Watch a freshly started init: its exit (pidfd) and its console (handed to the keeper).
    fn watch(&self, name: &Name, pid: i32, master: OwnedFd) -> NResult<()> {
        let pidfd = Arc::new(sys::pidfd_open(pid).map_err(|e| internal("pidfd", e))?);
        let adopt = KeeperRequest::Adopt {
            ve: name.to_string(),
            log: self.layout.ve(name.as_str()).console_log(),
        };
        let console = match self.keeper.call(&adopt, &[master.as_raw_fd()], true) {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(ve = %name, "console keeper: {e}; the VE runs without a console");
                false
            }
        };
        self.track(name, pid, pidfd, console)
            .map_err(|e| internal("watch init", e))
    }

    /// Mount, configure and start the VE; returns init's pid and console master.
    fn launch(&self, rec: &VeRecord) -> NResult<(i32, OwnedFd)> {
        let name = rec.spec.name.as_str();
        let ve = self.layout.ve(name);
        let tpl_dir = self.layout.template(&rec.template_id);
        let meta = template::read_meta(&tpl_dir)
            .map_err(|e| err(ErrorCode::NotFound, format!("template of VE '{name}': {e}")))?;
        let tpl_root = tpl_dir.join("rootfs");
        let uid_base = alloc::uid_base(rec.slot);
        let req = rootfs_request(rec, &ve, &tpl_root);
        let t0 = Instant::now();
        let mut rootfs = self.rootfs.mount(&req).map_err(|e| internal("mount VE root", e))?;
        if let Some(vol) = self.rootfs.volume(&ve) {
            let template = (rec.spec.template.to_string(), rec.template_id.clone());
            if let Err(e) = self.start_writer(&rec.spec, template, &vol) {
                drop(vol);
                let _ = self.rootfs.unmount(&ve);
                return Err(e);
            }
        }
        let t_mount = t0.elapsed();
        let mut binds = Vec::new();
        if rec.rescue {
            // Rescue: a throwaway root from the pristine template; the VE's own tree at /mnt/ve.
            binds.push((rootfs.clone(), "/mnt/ve".to_string()));
            rootfs = self.mount_rescue_root(&req)?;
        }
        // The VE owns these files: if it made one unwritable for us (a directory where
        // /etc/hostname was), it still boots, with the files as it left them.
        if let Err(e) = osconfig::apply(&rootfs, &rec.spec, uid_base) {
            tracing::warn!("VE '{name}': settings not written at start: {e}");
        }
        let cgroup_path = format!("/{}/{}", self.opts.config.cgroup_parent, name);
        // The node root is root-only: the helper shows these trees to the VE elsewhere.
        let (shown_root, shown_binds, expose) = expose_plan(name, &rootfs, &binds);
        let doc = oci::render(&oci::SpecInput {
            spec: &rec.spec,
            rootfs: &shown_root,
            init: &meta.init,
            uid_base,
            uid_count: alloc::UID_COUNT,
            cgroup_path: &cgroup_path,
            binds: &shown_binds,
        });
        let bundle = ve.bundle();
        std::fs::create_dir_all(&bundle).map_err(|e| internal("bundle dir", e))?;
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&doc).unwrap_or_default(),
        )
        .map_err(|e| internal("write config.json", e))?;
        let (bridge, subnet) = {
            let st = lock(&self.state);
            (st.config.bridge.clone(), st.config.subnet)
        };
        let net = rec.spec.ip.map(|ip| NetPlan {
            host_if: self.host_if(rec),
            bridge,
            ip,
            mac: vessel_ve::net::ve_mac(ip.addr).0,
            gateway: alloc::gateway(&subnet),
            mtu: self.overlay.get().map(|_| vessel_ve::vxlan::MTU),
        });
        let req = HelperRequest::Start {
            id: name.to_string(),
            state_root: self.layout.run(),
            bundle,
            net,
            expose,
        };
        let t_prep = t0.elapsed();
        let r = runtime::start_ve(&self.opts.exe, req)
            .map_err(|e| err(ErrorCode::Internal, format!("start VE '{name}': {e}")));
        tracing::debug!(ve = name, ?t_mount, ?t_prep, total = ?t0.elapsed(), "launch timings");
        r
    }

    /// Remove everything a run of the VE created on the host: libcontainer state, cgroups,
    /// the veth, the root mount. Idempotent; errors are logged, not returned.
    pub(crate) fn cleanup_runtime(&self, rec: &VeRecord) {
        let name = rec.spec.name.as_str();
        if let Some(l) = lock(&self.live).remove(&rec.spec.name) {
            self.monitor.unwatch(l.exit_token);
        }
        let _ = self
            .keeper
            .call(&KeeperRequest::Release { ve: name.to_string() }, &[], false);
        if let Err(e) = runtime::delete_ve(&self.layout.run(), name) {
            tracing::warn!(ve = name, "delete container state: {e}");
        }
        self.cgroup(&rec.spec.name).remove();
        let _ = vessel_ve::net::delete_link(&self.host_if(rec));
        let rescue = vessel_ve::layout::VeLayout {
            dir: self.layout.ve(name).rescue(),
        };
        if let Err(e) = vessel_ve::rootfs::OverlayRootFs.unmount(&rescue) {
            tracing::warn!(ve = name, "unmount rescue root: {e}");
        }
        self.stop_writer(name);
        if let Err(e) = self.rootfs.unmount(&self.layout.ve(name)) {
            tracing::warn!(ve = name, "unmount: {e}");
        }
    }

    /// Mount a fresh rescue root (template + an empty private layer) for a VE.
    fn mount_rescue_root(&self, req: &RootFsRequest) -> NResult<std::path::PathBuf> {
        let rescue = vessel_ve::layout::VeLayout { dir: req.ve.rescue() };
        let _ = vessel_ve::rootfs::OverlayRootFs.unmount(&rescue);
        for d in [rescue.upper(), rescue.work()] {
            let _ = std::fs::remove_dir_all(&d);
        }
        let r = RootFsRequest { ve: &rescue, ..*req };
        vessel_ve::rootfs::OverlayRootFs
            .create(&r)
            .and_then(|_| vessel_ve::rootfs::OverlayRootFs.mount(&r))
            .map_err(|e| internal("mount rescue root", e))
    }

    // ------------------------------------------------------------------ stop

    pub fn stop(&self, name: &Name, timeout: Duration) -> NResult<VeInfo> {
        let vl = self.ve_lock(name);
        let _g = lock(&vl);
        let rec = self.record(name)?;
        if !rec.status.can_stop() {
            return Err(err(ErrorCode::Conflict, format!("VE '{name}' is not running")));
        }
        self.stop_locked(&rec, timeout)
    }

    pub(crate) fn stop_locked(&self, rec: &VeRecord, timeout: Duration) -> NResult<VeInfo> {
        let name = &rec.spec.name;
        self.update(name, |r| r.user_stopped = true)?;
        let pidfd = lock(&self.live).get(name).map(|l| l.pidfd.clone());
        let mut code = None;
        if let Some(pidfd) = pidfd {
            let sig = template::read_meta(&self.layout.template(&rec.template_id))
                .map(|m| m.stop_signal)
                .unwrap_or(libc::SIGTERM);
            let _ = sys::pidfd_signal(&pidfd, sig);
            let exited =
                sys::pidfd_wait_exit(&pidfd, timeout.as_millis().min(i32::MAX as u128) as i32).unwrap_or(false);
            if !exited {
                tracing::info!(ve = %name, "init did not stop within {timeout:?}; killing");
                let _ = sys::pidfd_signal(&pidfd, libc::SIGKILL);
                let _ = sys::pidfd_wait_exit(&pidfd, 10_000);
            }
            code = sys::pidfd_try_reap(&pidfd);
        }
        self.cleanup_runtime(rec);
        let rec = self.update(name, |r| {
            r.status = VeStatus::Stopped;
            r.pid = None;
            r.pid_start = None;
            if code.is_some() {
                r.last_exit = code;
            }
            r.clone()
        })?;
        Ok(self.info(&rec))
    }

    pub fn restart(&self, name: &Name, timeout: Duration) -> NResult<VeInfo> {
        let vl = self.ve_lock(name);
        let _g = lock(&vl);
        let rec = self.record(name)?;
        if rec.status == VeStatus::Running {
            self.stop_locked(&rec, timeout)?;
        }
        let rec = self.record(name)?;
        self.start_locked(rec)
    }

    // ------------------------------------------------------------------ destroy

    pub fn destroy(&self, name: &Name, force: bool) -> NResult<()> {
        let vl = self.ve_lock(name);
        let _g = lock(&vl);
        let rec = self.record(name)?;
        if rec.status == VeStatus::Running {
            if !force {
                return Err(err(
                    ErrorCode::Conflict,
                    format!("VE '{name}' is running: stop it first or use --force"),
                ));
            }
            self.stop_locked(&rec, Duration::from_secs(10))?;
        }
        self.cleanup_runtime(&rec);
        self.rootfs
            .destroy(&self.layout.ve(name.as_str()))
            .map_err(|e| internal("remove VE storage", e))?;
        let mut st = lock(&self.state);
        st.ves.remove(name);
        self.save(&st)?;
        drop(st);
        lock(&self.ve_locks).remove(name);
        if let Err(e) = self.sync_bridge_filter() {
            // Harmless: the rules of a VE without a port match nothing until its slot is reused.
            tracing::warn!(ve = %name, "{e}");
        }
        Ok(())
    }

    // ------------------------------------------------------------------ set

    pub fn set(&self, name: &Name, change: &VeChange) -> NResult<VeInfo> {
        let vl = self.ve_lock(name);
        let _g = lock(&vl);
        let rec = self.record(name)?;
        self.opts
            .settings
            .limits
            .check_change(&change.limits)
            .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let new = change.apply_to(&rec.spec);
        new.validate()
            .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let running = rec.status == VeStatus::Running;
        if running {
            if new.limits != rec.spec.limits {
                self.cgroup(name)
                    .apply(&new.limits)
                    .map_err(|e| err(ErrorCode::Conflict, format!("apply limits to VE '{name}': {e}")))?;
                self.rootfs.set_storage(&self.layout.ve(name.as_str()), &new.limits);
            }
            let ve = self.layout.ve(name.as_str());
            osconfig::apply(&ve.rootfs(), &new, alloc::uid_base(rec.slot))
                .map_err(|e| err(ErrorCode::Conflict, format!("write the settings of VE '{name}': {e}")))?;
            if new.hostname() != rec.spec.hostname() {
                if let Some(pid) = rec.pid {
                    sys::set_hostname_of(pid, new.hostname()).map_err(|e| internal("set the VE's hostname", e))?;
                }
            }
            if (new.replicas, new.min_replicas) != (rec.spec.replicas, rec.spec.min_replicas) {
                self.apply_copy_counts(&new)?;
            }
        }
        let rec = self.update(name, |r| {
            r.spec = new;
            if running && change.needs_restart() {
                r.restart_pending = true;
            }
            r.clone()
        })?;
        Ok(self.info(&rec))
    }

    // ------------------------------------------------------------------ exits and boot

    /// A VE's init exited (seen by the monitor). Decide and act per the restart policy.
    pub fn on_exit(self: &Arc<Self>, name: Name, pid: i32, pidfd: Arc<OwnedFd>) {
        let vl = self.ve_lock(&name);
        let _g = lock(&vl);
        let Ok(rec) = self.record(&name) else { return };
        if rec.pid != Some(pid) || rec.status != VeStatus::Running {
            return; // a stop or destroy already handled it
        }
        let code = sys::pidfd_try_reap(&pidfd);
        let ran = rec.started_unix.map_or(0, |s| vessel_ve::now_unix().saturating_sub(s));
        let quick = {
            let mut q = lock(&self.quick_failures);
            let c = q.entry(name.clone()).or_default();
            *c = if ran < 10 { *c + 1 } else { 0 };
            *c
        };
        let action = decide_exit(&rec.spec, code, rec.user_stopped, quick);
        tracing::info!(ve = %name, ?code, ?action, "VE init exited");
        self.cleanup_runtime(&rec);
        let _ = self.update(&name, |r| {
            r.pid = None;
            r.pid_start = None;
            r.last_exit = code;
            r.status = if action == ExitAction::Fail {
                VeStatus::Failed
            } else {
                VeStatus::Stopped
            };
            if action == ExitAction::Stop {
                r.user_stopped = true;
            }
        });
        if action == ExitAction::Restart {
            if let Ok(rec) = self.record(&name) {
                if let Err(e) = self.start_locked(rec) {
                    tracing::warn!(ve = %name, "restart failed: {e}");
                }
            }
        }
    }

    /// After a daemon (re)start: find running VEs again, clean up those that died while
    /// no daemon watched, and start VEs whose policy says so.
    pub fn recover(self: &Arc<Self>) {
        let recs: Vec<VeRecord> = lock(&self.state).ves.values().cloned().collect();
        for rec in recs {
            let name = rec.spec.name.clone();
            let vl = self.ve_lock(&name);
            let _g = lock(&vl);
            if rec.status == VeStatus::Running {
                // A VE's files are served by the daemon that started it: after that daemon
                // died its root is gone, so its processes are ended and it starts again.
                if let Some(pidfd) = self.reattach(&rec) {
                    tracing::info!(ve = %name, "the previous daemon served this VE's files: restarting it");
                    let _ = sys::pidfd_signal(&pidfd, libc::SIGKILL);
                    let _ = sys::pidfd_wait_exit(&pidfd, 10_000);
                    self.cleanup_runtime(&rec);
                    let _ = self.update(&name, |r| {
                        r.status = VeStatus::Stopped;
                        r.pid = None;
                        r.pid_start = None;
                        r.resume = true;
                    });
                } else {
                    // Its exit status went to whoever reaped it: decide as for an unknown exit.
                    let action = decide_exit(&rec.spec, None, rec.user_stopped, 0);
                    tracing::info!(ve = %name, ?action, "VE died while the daemon was away");
                    self.cleanup_runtime(&rec);
                    let _ = self.update(&name, |r| {
                        r.status = if action == ExitAction::Fail {
                            VeStatus::Failed
                        } else {
                            VeStatus::Stopped
                        };
                        r.pid = None;
                        r.pid_start = None;
                        r.last_exit = None;
                    });
                }
            }
            let rec = match self.record(&name) {
                Ok(r) => r,
                Err(_) => continue,
            };
            let always = rec.status != VeStatus::Running
                && !rec.user_stopped
                && rec.spec.restart == vessel_types::RestartPolicy::Always;
            if rec.resume || always {
                let _ = self.update(&name, |r| r.resume = false);
                if let Err(e) = self.start_locked(rec) {
                    tracing::warn!(ve = %name, "start on daemon start failed: {e}");
                }
            }
        }
    }

    /// Daemon shutdown: stop every running VE (their files are served by this process)
    /// and mark them to be started again by the next daemon.
    pub fn shutdown(self: &Arc<Self>, timeout: Duration) {
        let running: Vec<Name> = lock(&self.state)
            .ves
            .values()
            .filter(|r| r.status == VeStatus::Running)
            .map(|r| r.spec.name.clone())
            .collect();
        let workers: Vec<_> = running
            .into_iter()
            .map(|name| {
                let n = self.clone();
                std::thread::spawn(move || {
                    let vl = n.ve_lock(&name);
                    let _g = lock(&vl);
                    if let Ok(rec) = n.record(&name) {
                        if rec.status == VeStatus::Running {
                            if let Err(e) = n.stop_locked(&rec, timeout) {
                                tracing::warn!(ve = %name, "stop at shutdown: {e}");
                            }
                            let _ = n.update(&name, |r| {
                                r.user_stopped = false;
                                r.resume = true;
                            });
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
    }

    fn reattach(&self, rec: &VeRecord) -> Option<Arc<OwnedFd>> {
        let pid = rec.pid?;
        let start = sys::process_start_time(pid).ok()?;
        if Some(start) != rec.pid_start {
            return None;
        }
        let fd = sys::pidfd_open(pid).ok()?;
        // The pid could have been reused between the check and the open: check again.
        (sys::process_start_time(pid).ok()? == start).then(|| Arc::new(fd))
    }
}

pub(crate) fn not_found(name: &Name) -> ApiError {
    err(
        ErrorCode::NotFound,
        format!("VE '{name}' not found: see `vessel ve list`"),
    )
}

type Binds = Vec<(std::path::PathBuf, String)>;

/// Where the runtime helper shows a VE's root and bind sources (see
/// [`runtime::EXPOSE_DIR`]): the root with setuid honoured (the VE's own `su`, `sudo`,
/// `ping`), bind sources without. Returns the root and binds as the VE's spec names them.
fn expose_plan(name: &str, rootfs: &std::path::Path, binds: &Binds) -> (PathBuf, Binds, Vec<runtime::Expose>) {
    let dir = std::path::Path::new(runtime::EXPOSE_DIR).join(name);
    let root = dir.join("root");
    let mut expose = vec![runtime::Expose {
        src: rootfs.to_path_buf(),
        at: root.clone(),
        suid: true,
    }];
    let mut shown = Vec::new();
    for (i, (src, dst)) in binds.iter().enumerate() {
        let at = dir.join(format!("bind{i}"));
        expose.push(runtime::Expose {
            src: src.clone(),
            at: at.clone(),
            suid: false,
        });
        shown.push((at, dst.clone()));
    }
    (root, shown, expose)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_types::RestartPolicy;

    fn spec(p: RestartPolicy) -> VeSpec {
        let mut s = VeSpec::new(Name::parse("a").unwrap(), Name::parse("busybox").unwrap());
        s.restart = p;
        s
    }

    #[test]
    fn exit_decisions() {
        use ExitAction::*;
        assert_eq!(decide_exit(&spec(RestartPolicy::Always), Some(0), false, 0), Restart);
        assert_eq!(decide_exit(&spec(RestartPolicy::Always), Some(1), true, 0), Stop);
        assert_eq!(
            decide_exit(&spec(RestartPolicy::Always), Some(-libc::SIGINT), false, 0),
            Stop
        );
        assert_eq!(
            decide_exit(&spec(RestartPolicy::No), Some(-libc::SIGHUP), false, 0),
            Restart
        );
        assert_eq!(decide_exit(&spec(RestartPolicy::No), Some(1), false, 0), Fail);
        assert_eq!(decide_exit(&spec(RestartPolicy::No), Some(0), false, 0), Stop);
        assert_eq!(decide_exit(&spec(RestartPolicy::OnFailure), Some(0), false, 0), Stop);
        assert_eq!(
            decide_exit(&spec(RestartPolicy::OnFailure), Some(-9), false, 2),
            Restart
        );
        assert_eq!(decide_exit(&spec(RestartPolicy::Always), Some(1), false, 5), Fail);
    }
}
