//! Starting and entering VEs with youki's libcontainer.
//!
//! libcontainer forks with raw `clone3`, which is only safe from a single-threaded process,
//! and the node daemon is multi-threaded. So each start or exec runs in a short-lived
//! helper: the daemon re-executes its own binary as `vessel __runtime <json>` with a
//! socket on fd 3; the helper does the libcontainer work, reports on fd 3 (with the pty
//! master attached) and exits. The VE's init is then re-parented to the daemon, which is
//! a child subreaper. No helper stays alive per VE.

use crate::net;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use vessel_api::fdpass::recv_with_fds;
use vessel_api::frame::{read_frame, write_frame, FrameError};
use vessel_types::Ipv4Cidr;

/// fd number on which the helper reports to the daemon.
pub const REPORT_FD: RawFd = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetPlan {
    pub host_if: String,
    pub bridge: String,
    pub ip: Ipv4Cidr,
    /// MAC of the VE's `eth0` ([`net::ve_mac`]): the only one its bridge port admits.
    pub mac: [u8; 6],
    pub gateway: std::net::Ipv4Addr,
    /// MTU of the veth (None: 1500; the overlay's is [`crate::vxlan::MTU`]).
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// Where the helper shows a VE's root (and bind sources) to libcontainer. The node root is
/// root-only (0700), so the VE's mapped root could not walk to its own root tree there;
/// the helper binds each tree here, in a mount namespace of its own (a private tmpfs on
/// this directory), and the VE's mount namespace is born from that one. On the host this
/// directory stays empty.
pub const EXPOSE_DIR: &str = "/run/vessel-roots";

/// A host tree the VE's spec refers to, bound at `at` (under [`EXPOSE_DIR`]) for the VE only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expose {
    pub src: PathBuf,
    pub at: PathBuf,
    /// Honour setuid bits in the VE's view (its own root); the host-side mounts never do.
    pub suid: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum HelperRequest {
    Start {
        id: String,
        state_root: PathBuf,
        bundle: PathBuf,
        net: Option<NetPlan>,
        #[serde(default)]
        expose: Vec<Expose>,
    },
    Exec {
        init_pid: i32,
        /// The VE's OCI config.json.
        config: PathBuf,
        cgroup_dirs: Vec<PathBuf>,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: Option<String>,
        tty: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HelperReport {
    /// Init runs; the pty master of its console is attached.
    Started {
        pid: i32,
    },
    /// The exec'd process runs; with a tty its pty master is attached.
    ExecStarted {
        pid: i32,
    },
    Exited {
        code: i32,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Helper(String),
    #[error("runtime helper: {0}")]
    Io(#[from] std::io::Error),
    #[error("libcontainer: {0}")]
    Container(String),
}

fn lc<E: std::error::Error>(e: E) -> RuntimeError {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    RuntimeError::Container(s)
}

// ---------------------------------------------------------------- helper side

/// Entry point of `vessel __runtime <json>`. Reports on [`REPORT_FD`]; exits with 0, or
/// for exec with the command's exit code.
pub fn helper_main(json: &str) -> i32 {
    let _ = crate::sys::unblock_all_signals();
    // SAFETY: the daemon placed our report socket on fd 3 and nothing else owns it.
    let report = unsafe { OwnedFd::from_raw_fd(REPORT_FD) };
    // Framed like the API: the daemon may read two quick reports in one go.
    let send = |r: &HelperReport, fds: &[RawFd]| {
        let _ = write_frame(report.as_raw_fd(), r, fds);
    };
    let req: HelperRequest = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(e) => {
            send(
                &HelperReport::Error {
                    message: format!("bad helper request: {e}"),
                },
                &[],
            );
            return 2;
        }
    };
    match req {
        HelperRequest::Start {
            id,
            state_root,
            bundle,
            net,
            expose,
        } => match expose_privately(&expose).and_then(|_| start(&id, &state_root, &bundle, net.as_ref())) {
            Ok((pid, master)) => {
                send(&HelperReport::Started { pid }, &[master.as_raw_fd()]);
                0
            }
            Err(e) => {
                send(&HelperReport::Error { message: e.to_string() }, &[]);
                1
            }
        },
        HelperRequest::Exec {
            init_pid,
            config,
            cgroup_dirs,
            argv,
            env,
            cwd,
            tty,
        } => {
            let plan = crate::enter::EnterPlan {
                init_pid,
                config: &config,
                cgroup_dirs: &cgroup_dirs,
                argv: &argv,
                env: &env,
                cwd: cwd.as_deref(),
                tty,
            };
            match crate::enter::enter(&plan) {
                Ok((pid, master)) => {
                    let fds: Vec<RawFd> = master.iter().map(|m| m.as_raw_fd()).collect();
                    send(&HelperReport::ExecStarted { pid }, &fds);
                    drop(master);
                    let code = wait_child(pid);
                    send(&HelperReport::Exited { code }, &[]);
                    0
                }
                Err(e) => {
                    send(&HelperReport::Error { message: e.to_string() }, &[]);
                    1
                }
            }
        }
    }
}

fn wait_child(pid: i32) -> i32 {
    loop {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return 255;
        }
        if libc::WIFEXITED(st) {
            return libc::WEXITSTATUS(st);
        }
        if libc::WIFSIGNALED(st) {
            return 128 + libc::WTERMSIG(st);
        }
    }
}

/// In a mount namespace of this helper's own (the VE's is copied from it), bind each tree
/// at its place under [`EXPOSE_DIR`]. Nothing of it propagates to the host.
fn expose_privately(list: &[Expose]) -> Result<(), RuntimeError> {
    use nix::mount::{mount, MsFlags};
    if list.is_empty() {
        return Ok(());
    }
    let fail =
        |what: &str, p: &Path, e: &dyn std::fmt::Display| RuntimeError::Helper(format!("{what} {}: {e}", p.display()));
    let base = Path::new(EXPOSE_DIR);
    std::fs::create_dir_all(base).map_err(|e| fail("create", base, &e))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| fail("new mount namespace for", base, &e))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_SLAVE, none)
        .map_err(|e| fail("make the helper's mounts private at", Path::new("/"), &e))?;
    mount(
        Some("vessel-roots"),
        base,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| fail("mount tmpfs at", base, &e))?;
    for x in list {
        if !x.at.starts_with(base) {
            return Err(fail("refusing to bind outside the helper's dir:", &x.at, &""));
        }
        std::fs::create_dir_all(&x.at).map_err(|e| fail("create", &x.at, &e))?;
        mount(Some(&x.src), &x.at, none, MsFlags::MS_BIND, none).map_err(|e| fail("bind", &x.src, &e))?;
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NODEV;
        if !x.suid {
            flags |= MsFlags::MS_NOSUID;
        }
        mount(none, &x.at, none, flags, none).map_err(|e| fail("set the VE's mount flags on", &x.at, &e))?;
    }
    Ok(())
}

/// Listen on a console socket, returning the listener; libcontainer connects to it from
/// inside the VE and sends the pty master it created in the VE's own devpts.
fn console_listener(path: &Path) -> Result<UnixListener, RuntimeError> {
    let _ = std::fs::remove_file(path);
    Ok(UnixListener::bind(path)?)
}

fn receive_master(l: &UnixListener) -> Result<OwnedFd, RuntimeError> {
    l.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let conn: UnixStream = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(RuntimeError::Helper(format!("no console from the VE: {e}"))),
        }
    };
    conn.set_nonblocking(false)?;
    let mut fds = Vec::new();
    let mut buf = [0u8; 256];
    recv_with_fds(conn.as_raw_fd(), &mut buf, &mut fds)?;
    fds.pop()
        .ok_or_else(|| RuntimeError::Helper("VE sent no console".into()))
}

/// Runs last inside the VE's init, right before exec: gives up the console as controlling
/// terminal (libcontainer sets it) so the VE's own getty can take it, as on a real boot.
#[derive(Clone)]
struct VeInitExecutor;

impl libcontainer::workload::Executor for VeInitExecutor {
    fn exec(&self, spec: &oci_spec::runtime::Spec) -> Result<(), libcontainer::workload::ExecutorError> {
        // SAFETY: signal disposition changes and an ioctl on stdin of this process. A pid
        // namespace's init would ignore the SIGHUP anyway; SIG_IGN makes it explicit.
        unsafe {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            libc::ioctl(0, libc::TIOCNOTTY);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
        }
        libcontainer::workload::default::DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &oci_spec::runtime::Spec) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        libcontainer::workload::default::DefaultExecutor {}.validate(spec)
    }
}

fn start(id: &str, root: &Path, bundle: &Path, net: Option<&NetPlan>) -> Result<(i32, OwnedFd), RuntimeError> {
    let t0 = std::time::Instant::now();
    let sock_path = bundle.join("console.sock");
    let listener = console_listener(&sock_path)?;
    // Leftover state from a crash would make libcontainer refuse the id.
    let _ = std::fs::remove_dir_all(root.join(id));
    let mut container = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map_err(lc)?
        .with_console_socket(Some(&sock_path))
        .with_executor(VeInitExecutor)
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(lc)?;
    let result = (|| {
        let t_build = t0.elapsed();
        let master = receive_master(&listener)?;
        let pid = container
            .pid()
            .ok_or_else(|| RuntimeError::Helper("VE has no init pid".into()))?
            .as_raw();
        if let Some(n) = net {
            net::attach_ve(&n.host_if, &n.bridge, pid, n.ip, net::Mac(n.mac), n.gateway, n.mtu)
                .map_err(|e| RuntimeError::Helper(e.to_string()))?;
        }
        let t_net = t0.elapsed();
        container.start().map_err(lc)?;
        // Visible with VESSEL_RUNTIME_LOG=debug in the daemon's environment.
        tracing::debug!(?t_build, ?t_net, total = ?t0.elapsed(), "helper start timings");
        Ok((pid, master))
    })();
    let _ = std::fs::remove_file(&sock_path);
    if result.is_err() {
        let _ = container.delete(true);
    }
    result
}

// ---------------------------------------------------------------- daemon side

/// A running helper, seen from the daemon.
pub struct Helper {
    pub child: std::process::Child,
    report: UnixStream,
}

impl Helper {
    /// Re-execute `exe __runtime <req>` with the report socket on fd 3 and the given stdio.
    pub fn spawn(exe: &Path, req: &HelperRequest, stdio: Option<[OwnedFd; 3]>) -> Result<Helper, RuntimeError> {
        let (ours, theirs) = UnixStream::pair()?;
        let json = serde_json::to_string(req).map_err(|e| RuntimeError::Helper(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("__runtime").arg(json);
        match stdio {
            Some([i, o, e]) => {
                cmd.stdin(Stdio::from(i)).stdout(Stdio::from(o)).stderr(Stdio::from(e));
            }
            None => {
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let fd = theirs.as_raw_fd();
        // SAFETY: runs in the forked child before exec; dup2 is async-signal-safe and
        // clears close-on-exec on fd 3.
        unsafe {
            cmd.pre_exec(move || {
                crate::sys::unblock_all_signals()?;
                if libc::dup2(fd, REPORT_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        Ok(Helper { child, report: ours })
    }

    /// Next report with its attached fds; a helper that died without a word is an error.
    pub fn next_report(&mut self) -> Result<(HelperReport, Vec<OwnedFd>), RuntimeError> {
        match read_frame::<HelperReport>(self.report.as_raw_fd()) {
            Ok(x) => Ok(x),
            Err(FrameError::Closed) => {
                let st = self.child.wait()?;
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                Err(RuntimeError::Helper(format!(
                    "runtime helper ended without a report ({st}) {err}"
                )))
            }
            Err(e) => Err(RuntimeError::Helper(format!("bad helper report: {e}"))),
        }
    }

    pub fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }

    /// Readable when the next report (or the helper's end) is there: for a poll loop.
    pub fn report_fd(&self) -> std::os::fd::RawFd {
        self.report.as_raw_fd()
    }
}

/// Start a VE through a helper: returns init's pid and its console's pty master.
pub fn start_ve(exe: &Path, req: HelperRequest) -> Result<(i32, OwnedFd), RuntimeError> {
    let mut h = Helper::spawn(exe, &req, None)?;
    let res = match h.next_report()? {
        (HelperReport::Started { pid }, mut fds) => {
            let master = fds
                .pop()
                .ok_or_else(|| RuntimeError::Helper("no console master from helper".into()))?;
            Ok((pid, master))
        }
        (HelperReport::Error { message }, _) => Err(RuntimeError::Helper(message)),
        (other, _) => Err(RuntimeError::Helper(format!("unexpected helper report {other:?}"))),
    };
    let _ = h.wait();
    res
}

/// Remove libcontainer's record of a VE, its cgroups and any process left in it.
pub fn delete_ve(state_root: &Path, id: &str) -> Result<(), RuntimeError> {
    let dir = state_root.join(id);
    if !dir.exists() {
        return Ok(());
    }
    match Container::load(dir.clone()) {
        Ok(mut c) => {
            let _ = c.kill(Signal::try_from(libc::SIGKILL).map_err(lc)?, true);
            c.delete(true).map_err(lc)
        }
        Err(_) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
    }
}
