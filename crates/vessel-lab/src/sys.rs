//! The lab's system calls and tools: namespace files (util-linux `unshare`), links
//! (`ip`), nftables (`nft`), cgroups (the unified hierarchy's `cgroup.kill`), starting a
//! process inside a node (its cgroup, network and mount namespaces) and probing from
//! inside a namespace. Every wait here is bounded.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: `{cmd}` failed ({status}): {stderr}")]
    Command {
        what: String,
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0}")]
    Other(String),
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SysError {
    let what = what.into();
    move |source| SysError::Io { what, source }
}

type Result<T> = std::result::Result<T, SysError>;

/// Run a short tool to completion (at most 30 s; then it is killed), with `input` on its
/// stdin; its stdout, or its stderr in the error.
pub fn run(what: &str, cmd: &mut Command, input: Option<&str>) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io(format!("{what}: start {shown}")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(io(format!("{what}: write to {shown}")))?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait().map_err(io(what))? {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SysError::Other(format!("{what}: {shown} did not finish within 30 s")));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let out = child.wait_with_output().map_err(io(what))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SysError::Command {
            what: what.to_string(),
            cmd: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A command run in the network namespace of `ns` (a namespace file).
pub fn in_net(ns: &Path, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.display())).arg("--").arg(program);
    c
}

/// The mount points of this mount namespace (field 5 of mountinfo), octal escapes undone.
pub fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(p: &Path) -> bool {
    mount_points().iter().any(|m| m == p)
}

/// Lazily detach a mount; not mounted is fine.
pub fn detach(p: &Path) -> Result<()> {
    let Ok(c) = CString::new(p.as_os_str().as_encoded_bytes()) else {
        return Ok(());
    };
    // SAFETY: umount2 with a valid C string; no memory is shared with the kernel after it.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(SysError::Io {
                what: format!("unmount {}", p.display()),
                source: e,
            });
        }
    }
    Ok(())
}

/// Detach every mount at or under `dir` (deepest first).
pub fn detach_under(dir: &Path) -> Result<()> {
    let mut ms: Vec<PathBuf> = mount_points().into_iter().filter(|m| m.starts_with(dir)).collect();
    ms.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    ms.dedup();
    for m in ms {
        detach(&m)?;
    }
    Ok(())
}

/// Make `dir` a private mount of its own (bind onto itself), so namespace files bound in it
/// neither propagate into other mount namespaces nor pin a namespace inside itself.
pub fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    if !is_mount_point(dir) {
        run(
            "private namespace dir",
            Command::new("mount").arg("--bind").arg(dir).arg(dir),
            None,
        )?;
    }
    run(
        "private namespace dir",
        Command::new("mount").arg("--make-private").arg(dir),
        None,
    )?;
    Ok(())
}

fn touch(p: &Path) -> Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map(drop)
        .map_err(io(format!("create {}", p.display())))
}

/// A new network namespace kept by the file `net` (and, with `mnt`, a mount namespace whose
/// mounts are slaves of this one: host mounts show inside, the node's own never leave it).
/// An existing one is kept.
pub fn make_namespaces(net: &Path, mnt: Option<&Path>) -> Result<()> {
    if is_mount_point(net) && mnt.is_none_or(is_mount_point) {
        return Ok(());
    }
    detach(net)?;
    touch(net)?;
    let mut c = Command::new("unshare");
    c.arg(format!("--net={}", net.display()));
    if let Some(m) = mnt {
        detach(m)?;
        touch(m)?;
        c.arg(format!("--mount={}", m.display()))
            .arg("--propagation")
            .arg("slave");
    }
    c.arg("true");
    run("create namespaces", &mut c, None).map(drop)
}

/// The unified (v2) cgroup hierarchy: `/sys/fs/cgroup` itself, or the `unified` mount of a
/// hybrid layout. It is what makes `cgroup.kill` (a whole node's processes at once) work.
pub fn cgroup_v2_root() -> Result<PathBuf> {
    for p in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let p = PathBuf::from(p);
        if p.join("cgroup.controllers").exists() && p.join("cgroup.procs").exists() {
            return Ok(p);
        }
    }
    Err(SysError::Other(
        "no cgroup v2 (unified) hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: the lab needs it to kill a node's processes (mount cgroup2 there)".into(),
    ))
}

/// The mount points of the v1 cgroup hierarchies (where node daemons make VE cgroups).
pub fn cgroup_v1_roots() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            (post.split(' ').next() == Some("cgroup")).then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .collect()
}

/// Whether a v2 cgroup (or one below it) holds a process.
pub fn populated(cg: &Path) -> bool {
    std::fs::read_to_string(cg.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Whether `pid` is in `cg` or below it (unified hierarchy).
pub fn pid_in(pid: i32, cg_root: &Path, cg: &Path) -> bool {
    let Ok(rel) = cg.strip_prefix(cg_root) else {
        return false;
    };
    let want = Path::new("/").join(rel);
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(PathBuf::from)))
        .is_some_and(|p| p.starts_with(&want))
}

/// Kill every process in `cg` and below (SIGKILL, `cgroup.kill`) and wait until it is empty.
pub fn kill_cgroup(cg: &Path, timeout: Duration) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    loop {
        if !populated(cg) {
            return Ok(());
        }
        std::fs::write(cg.join("cgroup.kill"), "1").map_err(io(format!("kill {}", cg.display())))?;
        if Instant::now() > deadline {
            return Err(SysError::Other(format!(
                "{} still holds processes {timeout:?} after cgroup.kill (see its cgroup.procs; a process in D state waits for I/O)",
                cg.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Remove a cgroup directory tree bottom-up (cgroups are removed with rmdir). A missing one
/// is fine.
pub fn remove_cgroup_tree(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    let mut dirs = vec![root.to_path_buf()];
    let mut i = 0;
    // Breadth-first listing (bounded by what exists), then removal deepest first.
    while i < dirs.len() && dirs.len() < 100_000 {
        if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    dirs.push(e.path());
                }
            }
        }
        i += 1;
    }
    for d in dirs.iter().rev() {
        if let Err(e) = std::fs::remove_dir(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(SysError::Io {
                    what: format!("remove cgroup {} (does it still hold processes?)", d.display()),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

/// What to start inside a node.
pub struct InNode<'a> {
    pub cgroup: &'a Path,
    pub net: &'a Path,
    pub mnt: Option<&'a Path>,
    /// Detach from our session (a daemon outlives `vessel lab`).
    pub setsid: bool,
    /// Working directory after entering (the caller's, for `lab exec`).
    pub cwd: Option<PathBuf>,
}

/// Make `cmd` start inside the node: the child joins the node's cgroup first (so it and
/// everything it spawns dies with `lab kill`), then its network and mount namespaces.
pub fn enter_node(cmd: &mut Command, at: &InNode) -> Result<()> {
    let open = |p: &Path| -> Result<OwnedFd> {
        std::fs::File::open(p)
            .map(OwnedFd::from)
            .map_err(io(format!("open {}", p.display())))
    };
    let procs: OwnedFd = std::fs::OpenOptions::new()
        .write(true)
        .open(at.cgroup.join("cgroup.procs"))
        .map(OwnedFd::from)
        .map_err(io(format!("open {}/cgroup.procs", at.cgroup.display())))?;
    let net = open(at.net)?;
    let mnt = at.mnt.map(open).transpose()?;
    let cwd = at
        .cwd
        .as_ref()
        .and_then(|c| CString::new(c.as_os_str().as_encoded_bytes()).ok());
    let setsid = at.setsid;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (write, setns, setsid, chdir) on fds and a C string
    // prepared before the fork; the fds live in the closure, so they stay open until exec.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return fail();
            }
            if setsid && libc::setsid() < 0 {
                return fail();
            }
            if libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return fail();
            }
            if let Some(m) = &mnt {
                if libc::setns(m.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
            }
            if let Some(c) = &cwd {
                // The caller's directory, if the node's mount namespace has it; else /.
                let _ = libc::chdir(c.as_ptr());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Start a long-running process inside a node, its output appended to `log`.
pub fn spawn_in_node(mut cmd: Command, at: &InNode, log: &Path) -> Result<Child> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("open {}", log.display())))?;
    let f2 = f.try_clone().map_err(io("log"))?;
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    enter_node(&mut cmd, at)?;
    cmd.spawn()
        .map_err(io(format!("start {:?} in the node", cmd.get_program())))
}

/// An HTTP GET of `path` at `addr` made from inside the network namespace `ns` (a thread
/// of ours joins it: the root namespace never talks to lab addresses). The reply body, or
/// None when nothing answered within `timeout`.
pub fn http_get_in(ns: &Path, addr: std::net::SocketAddr, path: &str, timeout: Duration) -> Option<String> {
    let ns = std::fs::File::open(ns).ok()?;
    let path = path.to_string();
    let t = std::thread::Builder::new()
        .name("vessel-lab-probe".into())
        .spawn(move || -> Option<String> {
            // SAFETY: setns on an open namespace fd; CLONE_NEWNET changes only this thread's
            // network namespace, which ends with the thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
            s.set_read_timeout(Some(timeout)).ok()?;
            s.set_write_timeout(Some(timeout)).ok()?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
            let mut body = Vec::new();
            s.take(64 * 1024).read_to_end(&mut body).ok()?;
            let text = String::from_utf8_lossy(&body).into_owned();
            text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
        })
        .ok()?;
    t.join().ok().flatten()
}

/// Whether a process is there and not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

/// A short random hex string (the lab's prefix).
pub fn random_hex(n: usize) -> String {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    let v = if ok {
        u64::from_ne_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ ((std::process::id() as u64) << 32)
    };
    format!("{v:016x}")[..n].to_string()
}

/// An exclusive `flock` on `path` (created), held while the returned file lives; waits at
/// most `timeout`.
pub fn lock(path: &Path, timeout: Duration) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io(format!("open {}", path.display())))?;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: flock on an fd we own; the lock lives as long as `f`.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(f);
        }
        if Instant::now() > deadline {
            return Err(SysError::Other(format!(
                "{} is locked by another `vessel lab` command for over {timeout:?}: wait for it, or check `ps` for one",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }
}
