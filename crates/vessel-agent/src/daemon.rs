//! `vessel daemon`: one process per node. Takes the node lock, becomes a child subreaper
//! (VE inits are re-parented to it), restarts the VEs the previous daemon ran, serves the API, and on
//! SIGTERM/SIGINT stops the VEs (their files are served by this process) and marks them
//! to be started again by the next daemon. It owns the node bridge's filter table
//! ([`crate::bridge_filter`]) while it runs.

use crate::node::{Node, NodeOptions};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another vessel daemon runs for {root} (pid {pid}): use `vessel status`, or `vessel down` to stop it")]
    AlreadyRunning { root: String, pid: String },
    #[error(transparent)]
    Config(#[from] crate::config::LoadError),
    #[error("{0}")]
    Setup(String),
}

pub fn run(mut opts: NodeOptions) -> Result<(), DaemonError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| DaemonError::Setup(format!("{what}: {e}"));
    // A bad config stops the daemon before it touches anything.
    opts.settings = crate::config::load(&opts.config_file)?;
    tracing::info!(
        file = %opts.config_file.path.display(),
        defaults = ?opts.settings.limits.defaults,
        max = ?opts.settings.limits.max,
        api = ?opts.settings.api,
        "node config"
    );
    vessel_fs::fuse::keep_big_buffers_unmapped();
    // Signals are taken by sigwait below; every thread spawned after this inherits the mask.
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().map_err(|e| setup("block signals", &e))?;

    std::fs::create_dir_all(&opts.root).map_err(|e| setup(&format!("create {}", opts.root.display()), &e))?;
    // Node data is root-only: VE files, logs, templates with setuid binaries, state. VEs
    // reach their own root through the runtime helper (vessel-ve `runtime::EXPOSE_DIR`).
    std::fs::set_permissions(&opts.root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(|e| setup(&format!("make {} root-only", opts.root.display()), &e))?;
    let layout = vessel_ve::Layout::new(&opts.root);
    let pid_path = layout.pid_file();
    let mut pid_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&pid_path)
        .map_err(|e| setup("pid file", &e))?;
    // SAFETY: flock on an fd we own; the lock lives as long as `pid_file`.
    if unsafe { libc::flock(pid_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(&pid_path)
            .unwrap_or_default()
            .trim()
            .to_string();
        return Err(DaemonError::AlreadyRunning {
            root: opts.root.display().to_string(),
            pid,
        });
    }
    pid_file.set_len(0).map_err(|e| setup("pid file", &e))?;
    write!(pid_file, "{}", std::process::id()).map_err(|e| setup("pid file", &e))?;

    vessel_ve::sys::set_child_subreaper().map_err(|e| setup("subreaper", &e))?;
    let node = Node::open(opts.clone()).map_err(|e| DaemonError::Setup(e.message))?;
    let (bridge, subnet) = {
        let st = node.state.lock().unwrap_or_else(|e| e.into_inner());
        (st.config.bridge.clone(), st.config.subnet)
    };
    let gw = subnet.with_addr(crate::alloc::gateway(&subnet));
    vessel_ve::net::ensure_bridge(&bridge, gw).map_err(|e| setup("node bridge", &e))?;
    // Before any VE starts: their ports admit only their own MAC and address. The guard
    // removes the table on every way out of this function (after a clean shutdown: once
    // the VEs are stopped). A crashed daemon leaves it, so lingering VEs stay filtered.
    node.sync_bridge_filter().map_err(|e| DaemonError::Setup(e.message))?;
    let filter = crate::bridge_filter::FilterGuard { bridge: bridge.clone() };

    let n = node.clone();
    node.monitor
        .set_exit_handler(Box::new(move |ve, pid, pidfd| n.on_exit(ve, pid, pidfd)));
    let mon = node.monitor.clone();
    std::thread::Builder::new()
        .name("vessel-monitor".into())
        .spawn(move || mon.run())
        .map_err(|e| setup("monitor thread", &e))?;

    // The control store: a private etcd (the one-machine default) or the operator's.
    let member = std::sync::Arc::new(
        crate::cluster::Member::start(&opts.root, &opts.settings.cluster)
            .map_err(|e| DaemonError::Setup(format!("joining the cluster: {e}")))?,
    );
    tracing::info!(node = %member.name, etcd = ?member.endpoints, "in the cluster");
    let _ = node.cluster.set(member.clone());
    // One VE network per cluster (recorded by the first node), then the overlay joining
    // this node's bridge to the others' (with a cluster address), then the addresses and
    // uid ranges of VEs made before the cluster knew them.
    let network = member
        .block_on(crate::ipam::ensure_network(member.store(), &subnet))
        .map_err(|e| DaemonError::Setup(format!("the cluster's VE network: {e}")))?;
    let underlay = crate::overlay::underlay(opts.settings.cluster.address);
    if let Err(e) = crate::ipam::check_network(&network, &subnet) {
        if underlay.is_some() {
            return Err(DaemonError::Setup(format!("the cluster's VE network: {e}")));
        }
        tracing::warn!("{e} (no overlay on this node: its VEs reach only each other)");
    }
    if let Some(local) = underlay {
        node.start_overlay(member.clone(), &network, local)
            .map_err(DaemonError::Setup)?;
        node.sync_bridge_filter().map_err(|e| DaemonError::Setup(e.message))?;
    }
    node.register_identities();
    // Node-to-node calls (mutual TLS), once the cluster is initialized.
    let peer = crate::peer::Peer::new(&node, member.clone());
    peer.start_if_initialized().map_err(DaemonError::Setup)?;
    let _ = node.peer.set(peer);

    let listener =
        crate::server::bind(&opts.socket).map_err(|e| setup(&format!("socket {}", opts.socket.display()), &e))?;
    node.recover();
    node.start_reconciler();
    node.start_scrubber();
    let n = node.clone();
    std::thread::Builder::new()
        .name("vessel-api".into())
        .spawn(move || crate::server::serve(n, listener))
        .map_err(|e| setup("api thread", &e))?;
    tracing::info!(pid = std::process::id(), socket = %opts.socket.display(), "vessel daemon ready");

    let sig = sigs.wait().map_err(|e| setup("sigwait", &e))?;
    tracing::info!(
        "{sig:?}: stopping VEs (their files are served by this daemon); they start again with the next daemon"
    );
    node.shutdown(Duration::from_secs(10));
    member.shutdown();
    let _ = std::fs::remove_file(&opts.socket);
    // While we hold the node lock: a next daemon may write the table as soon as it is free.
    drop(filter);
    drop(pid_file);
    Ok(())
}
