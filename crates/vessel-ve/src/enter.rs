//! Run a process inside a running VE: join every namespace of the VE's init (user first,
//! so the process is the VE's root and not the host's), join its cgroups, apply the VE's
//! capability bounding set and seccomp profile, optionally on a new pty allocated in the
//! VE's own devpts, then exec.
//!
//! libcontainer 0.7 has a "tenant" builder for this, but it never joins the user
//! namespace (`NAMESPACE_TYPES` in tenant_builder.rs lacks "user"), so the process would
//! keep host-root credentials inside the VE. That breaks invariant 4 (a VE's root cannot
//! touch the host), so Vessel enters VEs itself. Runs in the single-threaded helper.

use crate::runtime::RuntimeError;
use oci_spec::runtime::Spec;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub struct EnterPlan<'a> {
    pub init_pid: i32,
    /// The VE's OCI config (for its capabilities, seccomp profile and base environment).
    pub config: &'a Path,
    /// cgroup directories of the VE (one per v1 hierarchy, or the v2 one).
    pub cgroup_dirs: &'a [PathBuf],
    pub argv: &'a [String],
    pub env: &'a [String],
    pub cwd: Option<&'a str>,
    pub tty: bool,
}

fn cstr(s: &str) -> Result<CString, RuntimeError> {
    CString::new(s).map_err(|_| RuntimeError::Helper(format!("argument holds a NUL byte: {s:?}")))
}

fn os(what: &str) -> RuntimeError {
    RuntimeError::Helper(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Merge `extra` KEY=VALUE entries over `base` (later wins).
pub fn merge_env(base: &[String], extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in base.iter().chain(extra) {
        let key = e.split('=').next().unwrap_or("");
        out.retain(|x| x.split('=').next() != Some(key));
        out.push(e.clone());
    }
    out
}

/// Start the process; returns its host pid (our child) and, with `tty`, the pty master.
pub fn enter(plan: &EnterPlan) -> Result<(i32, Option<OwnedFd>), RuntimeError> {
    let spec: Spec = serde_json::from_slice(&std::fs::read(plan.config)?)
        .map_err(|e| RuntimeError::Helper(format!("VE config: {e}")))?;
    let process = spec
        .process()
        .clone()
        .ok_or_else(|| RuntimeError::Helper("VE config has no process".into()))?;
    let caps = process.capabilities().clone();
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().clone());
    let mut base_env = process.env().clone().unwrap_or_default();
    base_env.push("HOME=/root".into());
    let env = merge_env(&base_env, plan.env);
    let argv: Vec<CString> = plan.argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let envp: Vec<CString> = env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let cwd = plan.cwd.map(cstr).transpose()?;
    if argv.is_empty() {
        return Err(RuntimeError::Helper("empty command".into()));
    }

    // Namespace handles first, while /proc is the host's. The user namespace comes first
    // so the child gains its capabilities there before joining the others.
    let open_ns = |ns: &str| -> Result<OwnedFd, RuntimeError> {
        std::fs::File::open(format!("/proc/{}/ns/{ns}", plan.init_pid))
            .map(OwnedFd::from)
            .map_err(|e| RuntimeError::Helper(format!("VE init {} is gone: {e}", plan.init_pid)))
    };
    let ns_fds: Vec<OwnedFd> = ["user", "ipc", "uts", "net", "cgroup", "mnt"]
        .into_iter()
        .map(open_ns)
        .collect::<Result<_, _>>()?;
    let pid_ns = open_ns("pid")?;
    // With a tty, the pty is opened by the child once it is the VE's root inside the VE's
    // mount namespace, and its master comes back over this socket pair. Host root never
    // resolves a path inside a VE: a VE that replaced /dev/ptmx with a symlink (or a FIFO,
    // or a bind mount of something else) only fools itself.
    let pty_chan = if plan.tty {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        Some((OwnedFd::from(a), OwnedFd::from(b)))
    } else {
        None
    };
    // Children of this helper are born in the VE's pid namespace. The helper itself stays
    // on the host (and out of the VE's cgroup, where the OOM killer would find it).
    // SAFETY: setns with a pid namespace fd; affects only children created after it.
    if unsafe { libc::setns(pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(os("enter VE pid namespace"));
    }
    let mut sync = [0i32; 2];
    // SAFETY: a two-int array for pipe2.
    if unsafe { libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe"));
    }
    // SAFETY: this helper is single-threaded, so the child may allocate and call anything.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os("fork"));
    }
    if pid == 0 {
        // Wait until the parent has moved us into the VE's cgroups.
        let mut b = 0u8;
        // SAFETY: closing our copy of the write end, then a one-byte read into a local.
        let n = unsafe {
            libc::close(sync[1]);
            libc::read(sync[0], &mut b as *mut u8 as *mut libc::c_void, 1)
        };
        let msg = if n != 1 {
            "the runtime helper gave up".to_string()
        } else {
            let mut m = String::new();
            for fd in &ns_fds {
                // SAFETY: setns with a namespace fd we opened; 0 accepts its own type.
                if unsafe { libc::setns(fd.as_raw_fd(), 0) } != 0 {
                    m = format!("enter VE namespace: {}", std::io::Error::last_os_error());
                    break;
                }
            }
            if m.is_empty() {
                child(
                    pty_chan.as_ref().map(|(_, theirs)| theirs),
                    &argv,
                    &envp,
                    cwd.as_deref(),
                    caps.as_ref(),
                    seccomp.as_ref(),
                )
            } else {
                m
            }
        };
        let line = format!("vessel: exec {}: {msg}\n", plan.argv[0]);
        // SAFETY: writing a buffer to stderr, then leaving without running destructors.
        unsafe {
            libc::write(2, line.as_ptr() as *const libc::c_void, line.len());
            libc::_exit(if msg.contains("No such file") { 127 } else { 126 });
        }
    }
    // SAFETY: closing the read end we do not use.
    unsafe { libc::close(sync[0]) };
    let joined = plan.cgroup_dirs.iter().try_for_each(|d| {
        std::fs::write(d.join("cgroup.procs"), pid.to_string())
            .map_err(|e| RuntimeError::Helper(format!("join cgroup {}: {e}", d.display())))
    });
    let go = 1u8;
    if joined.is_ok() {
        // SAFETY: one-byte write to our pipe end.
        unsafe { libc::write(sync[1], &go as *const u8 as *const libc::c_void, 1) };
    }
    // SAFETY: closing our write end releases (or, without the byte, aborts) the child.
    unsafe { libc::close(sync[1]) };
    joined?;
    let master = match pty_chan {
        Some((ours, theirs)) => {
            drop(theirs);
            Some(receive_pty_master(&ours)?)
        }
        None => None,
    };
    Ok((pid, master))
}

/// The pty master the child opened inside the VE. The socket closes without an fd when the
/// child failed first (it has written why to stderr). Whatever the VE handed over must be
/// a pty master before it goes to the admin's terminal.
fn receive_pty_master(sock: &OwnedFd) -> Result<OwnedFd, RuntimeError> {
    let tv = libc::timeval { tv_sec: 10, tv_usec: 0 };
    // SAFETY: setsockopt with a timeval that lives across the call and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut fds = Vec::new();
    let mut b = [0u8; 512];
    let n = vessel_api::fdpass::recv_with_fds(sock.as_raw_fd(), &mut b, &mut fds)
        .map_err(|e| RuntimeError::Helper(format!("no terminal from the VE: {e}")))?;
    let Some(m) = fds.pop() else {
        let why = String::from_utf8_lossy(&b[..n]);
        let why = if why.is_empty() {
            "the process ended first".into()
        } else {
            why
        };
        return Err(RuntimeError::Helper(format!(
            "no terminal in the VE ({why}): check /dev/ptmx -> pts/ptmx inside it"
        )));
    };
    if !is_pty_master(&m) {
        return Err(RuntimeError::Helper(
            "the VE's /dev/ptmx is not a pty multiplexer: repair /dev/ptmx inside the VE (ve rescue)".into(),
        ));
    }
    Ok(m)
}

/// The pty multiplexer is character device 5:2 (in every devpts instance). Only `fstat`
/// is used: no ioctl goes to an fd of unknown kind from host root.
fn is_pty_master(fd: &OwnedFd) -> bool {
    // SAFETY: an all-zero stat is a valid buffer for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we own into a local buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(5, 2)
}

/// In the child, as the VE's root in the VE's namespaces: a new pty in the VE's own devpts.
/// Returns (master, slave).
fn open_pty_in_ve() -> Result<(OwnedFd, OwnedFd), String> {
    let err = |w: &str| format!("{w}: {}", std::io::Error::last_os_error());
    // SAFETY: opening a constant path with constant flags.
    let m = unsafe { libc::open(c"/dev/ptmx".as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(err("open /dev/ptmx"));
    }
    // SAFETY: m is a fresh fd we own.
    let m = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: unlockpt on the fd we just opened; it fails cleanly on a non-pty.
    if unsafe { libc::unlockpt(m.as_raw_fd()) } != 0 {
        return Err(err("unlockpt"));
    }
    // SAFETY: TIOCGPTPEER on a pty master returns a new slave fd.
    let s = unsafe {
        libc::ioctl(
            m.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(err("open pty slave"));
    }
    // SAFETY: fresh fd we own.
    Ok((m, unsafe { OwnedFd::from_raw_fd(s) }))
}

/// In the forked child: become the VE's root and exec. Returns only on failure.
fn child(
    pty_chan: Option<&OwnedFd>,
    argv: &[CString],
    envp: &[CString],
    cwd: Option<&std::ffi::CStr>,
    caps: Option<&oci_spec::runtime::LinuxCapabilities>,
    seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
) -> String {
    let err = |w: &str| format!("{w}: {}", std::io::Error::last_os_error());
    // SAFETY: plain syscalls on our own process and fds.
    unsafe {
        libc::setsid();
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return err("setgroups");
        }
        if libc::setresgid(0, 0, 0) != 0 {
            return err("setgid");
        }
        if libc::setresuid(0, 0, 0) != 0 {
            return err("setuid");
        }
        if let Some(chan) = pty_chan {
            let (m, s) = match open_pty_in_ve() {
                Ok(x) => x,
                Err(e) => {
                    let _ = vessel_api::fdpass::send_with_fds(chan.as_raw_fd(), e.as_bytes(), &[]);
                    return e;
                }
            };
            if libc::ioctl(s.as_raw_fd(), libc::TIOCSCTTY, 0) != 0 {
                return err("set controlling terminal");
            }
            if let Err(e) = vessel_api::fdpass::send_with_fds(chan.as_raw_fd(), b"m", &[m.as_raw_fd()]) {
                return format!("hand over the terminal: {e}");
            }
            for fd in 0..3 {
                libc::dup2(s.as_raw_fd(), fd);
            }
        }
        let dir = cwd.unwrap_or(c"/root");
        if libc::chdir(dir.as_ptr()) != 0 && (cwd.is_some() || libc::chdir(c"/".as_ptr()) != 0) {
            return err("chdir");
        }
    }
    if let Some(c) = caps {
        let sys = libcontainer::syscall::syscall::create_syscall();
        if let Err(e) = libcontainer::capabilities::drop_privileges(c, sys.as_ref()) {
            return format!("drop capabilities: {e}");
        }
    }
    if let Some(s) = seccomp {
        if let Err(e) = libcontainer::seccomp::initialize_seccomp(s) {
            return format!("seccomp: {e}");
        }
    }
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    e.push(std::ptr::null());
    // execvpe searches PATH from the environ of this process: set it from the VE env first.
    for v in envp {
        if let Some(p) = v.to_str().ok().and_then(|s| s.strip_prefix("PATH=")) {
            std::env::set_var("PATH", p);
        }
    }
    // SAFETY: NUL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execvpe(a[0], a.as_ptr(), e.as_ptr()) };
    err("exec")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_overrides_by_key() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        let m = merge_env(&base, &["A=2".to_string(), "B=3".to_string()]);
        assert_eq!(m, vec!["PATH=/bin", "A=2", "B=3"]);
    }
}
