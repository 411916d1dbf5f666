//! Thin wrappers over the Linux syscalls that `nix` and `libc` do not wrap: the new mount
//! API (id-mapped mounts), `openat2` confined to a root, pidfds, and user namespace
//! creation. Each wrapper returns `std::io::Error` with the errno; callers add context.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Bind-mount `src` on `dst` read-only and id-mapped through the user namespace `userns`:
/// a file owned by host uid N under `src` appears owned by the uid that N maps to.
pub fn idmapped_bind(src: &Path, dst: &Path, userns: &OwnedFd) -> io::Result<()> {
    let s = cpath(src)?;
    let d = cpath(dst)?;
    // SAFETY: `s` is a valid NUL-terminated path; flags are plain integers.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            s.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    })?;
    // SAFETY: open_tree returned a new fd that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `tree` is an open mount fd, `attr` lives across the call and its size is passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    // SAFETY: both paths are valid C strings and `tree` is a detached mount fd.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            d.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Open `rel` beneath the directory `root`, resolving every component (symlinks and `..`
/// included) as if `root` were `/`. A VE cannot trick the host into writing outside it.
pub fn open_in_root(root: &OwnedFd, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let p = cpath(rel)?;
    let mut how: libc::open_how = unsafe_zeroed_open_how();
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `p` is a valid C string, `how` is a fully initialised open_how and its size is passed.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            p.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn unsafe_zeroed_open_how() -> libc::open_how {
    // SAFETY: open_how is a plain C struct of integers; all-zero is its documented default.
    unsafe { std::mem::zeroed() }
}

/// `pidfd_open(2)`: a handle on a process that stays valid after pid reuse.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Send `sig` through a pidfd (no pid-reuse race).
pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: valid pidfd, null siginfo is allowed, flags 0.
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// Wait up to `timeout_ms` for the process behind `pidfd` to exit. True if it exited.
pub fn pidfd_wait_exit(pidfd: &OwnedFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(rc > 0);
    }
}

/// Reap a child through its pidfd without blocking. `Some(code)` once it exited
/// (negative = killed by that signal); `None` if it still runs or is not our child.
pub fn pidfd_try_reap(pidfd: &OwnedFd) -> Option<i32> {
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pidfd and a writable siginfo.
    let rc = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: waitid filled `info` (si_pid 0 means nothing was reaped).
    let pid = unsafe { info.si_pid() };
    if rc != 0 || pid == 0 {
        return None;
    }
    // SAFETY: as above, the child fields are valid after a successful reap.
    let status = unsafe { info.si_status() };
    Some(if info.si_code == libc::CLD_EXITED {
        status
    } else {
        -status
    })
}

/// Create a user namespace mapping ids `0..count` to host ids `base..base+count` and
/// return a handle to it (for id-mapped mounts). Uses a short-lived child process because
/// a multi-threaded process may not `unshare(CLONE_NEWUSER)` itself.
pub fn make_userns(base: u32, count: u32) -> io::Result<OwnedFd> {
    let mut ready = [0i32; 2];
    let mut release = [0i32; 2];
    // SAFETY: arrays of two ints as pipe2 requires.
    if unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::pipe2(release.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing fds we just created.
        unsafe {
            libc::close(ready[0]);
            libc::close(ready[1]);
        }
        return Err(e);
    }
    // SAFETY: the child only calls async-signal-safe syscalls (unshare, write, read, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side of fork: raw syscalls only, then _exit.
        unsafe {
            libc::close(ready[0]);
            libc::close(release[1]);
            let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 { 1 } else { 0 };
            libc::write(ready[1], &ok as *const u8 as *const libc::c_void, 1);
            let mut b = 0u8;
            libc::read(release[0], &mut b as *mut u8 as *mut libc::c_void, 1);
            libc::_exit(0);
        }
    }
    // SAFETY: closing the child's ends in the parent.
    unsafe {
        libc::close(ready[1]);
        libc::close(release[0]);
    }
    let result = (|| {
        let mut ok = 0u8;
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(ready[0], &mut ok as *mut u8 as *mut libc::c_void, 1) };
        if n != 1 || ok != 1 {
            return Err(io::Error::other("could not create a user namespace for the id mapping"));
        }
        let map = format!("0 {base} {count}\n");
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    // SAFETY: closing our pipe ends releases the child, then we reap it.
    unsafe {
        libc::close(ready[0]);
        libc::close(release[1]);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
    result
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat):
/// with the pid it identifies one process across pid reuse.
/// A zombie (exited, not yet reaped) counts as gone.
pub fn process_start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    if after.trim_start().starts_with(['Z', 'X']) {
        return Err(io::Error::new(io::ErrorKind::NotFound, "process exited"));
    }
    after
        .split_whitespace()
        .nth(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("malformed /proc stat"))
}

/// Become a child subreaper: orphaned descendants (VE inits whose launcher exited) are
/// re-parented to us, so we can reap them and learn their exit status.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe {
        libc::prctl(36 /* PR_SET_CHILD_SUBREAPER */, 1, 0, 0, 0)
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unblock every signal; for `pre_exec` of children of the daemon, whose threads block
/// SIGTERM/SIGINT/SIGHUP for `sigwait` (a signal mask survives exec).
pub fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; sigprocmask with a valid set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Set the hostname inside the UTS namespace of process `pid` (a running VE's init). Runs
/// on a short-lived thread: `setns` of a UTS namespace affects only the calling thread,
/// and the thread's namespace goes away with it.
pub fn set_hostname_of(pid: i32, hostname: &str) -> io::Result<()> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/uts"))?;
    let name = hostname.to_string();
    std::thread::spawn(move || -> io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWUTS).map_err(io::Error::from)?;
        nix::unistd::sethostname(&name).map_err(io::Error::from)
    })
    .join()
    .map_err(|_| io::Error::other("hostname thread panicked"))?
}
