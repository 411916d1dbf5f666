//! Test harness: a real `vessel daemon` with its own data dir, bridge, subnet and cgroup
//! parent, all named with a unique prefix, and removed on every exit path (Drop runs on
//! success, failure and panic). Host tests need root; without it they print why they skip.

pub mod lab;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Returns false (and says so) when the test cannot run here.
pub fn need_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {test}: needs root (real namespaces, mounts and cgroups); CI runs it as root");
        return false;
    }
    true
}

pub struct TestNode {
    pub bin: PathBuf,
    pub id: String,
    pub root: PathBuf,
    pub bridge: String,
    pub subnet: String,
    pub cgroup_parent: String,
    /// More environment for the daemon (e.g. `VESSEL_CACHE_DIR`).
    daemon_env: Vec<(String, std::ffi::OsString)>,
    daemon: Option<Child>,
}

impl TestNode {
    /// Start a daemon for this test. `tag` shows in names to tell tests apart.
    pub fn start(bin: &Path, tag: &str) -> TestNode {
        Self::start_with_env(bin, tag, &[])
    }

    /// Start a daemon with more environment (kept for its restarts too).
    pub fn start_with_env(bin: &Path, tag: &str, env: &[(&str, &std::ffi::OsStr)]) -> TestNode {
        let mut node = Self::prepare_with_env(bin, tag, env);
        node.spawn_daemon();
        node
    }

    /// A node's names and data dir, without a daemon yet (write its `node.toml`, then
    /// [`TestNode::spawn_daemon`]).
    pub fn prepare(bin: &Path, tag: &str) -> TestNode {
        Self::prepare_with_env(bin, tag, &[])
    }

    fn prepare_with_env(bin: &Path, tag: &str, env: &[(&str, &std::ffi::OsStr)]) -> TestNode {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("vt{}{}", pid % 100_000, n);
        let octet = (pid.wrapping_mul(7).wrapping_add(n * 13)) % 200 + 20;
        let root = std::env::temp_dir().join(format!("vessel-test-{id}-{tag}"));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        TestNode {
            bin: bin.to_path_buf(),
            id: id.clone(),
            root,
            bridge: id.clone(),
            subnet: format!("10.254.{octet}.0/24"),
            cgroup_parent: format!("vessel-test-{id}"),
            daemon_env: env.iter().map(|(k, v)| (k.to_string(), v.to_os_string())).collect(),
            daemon: None,
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("vessel.sock")
    }

    fn envs(&self, cmd: &mut Command) {
        cmd.env("VESSEL_ROOT", &self.root)
            .env("VESSEL_SOCKET", self.socket())
            .env("VESSEL_BRIDGE", &self.bridge)
            .env("VESSEL_SUBNET", &self.subnet)
            .env("VESSEL_CGROUP_PARENT", &self.cgroup_parent)
            .env_remove("VESSEL_LOG")
            .env_remove("VESSEL_CONFIG");
    }

    /// Start `vessel daemon` in the foreground as our child, wait for its socket.
    pub fn spawn_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("test-daemon.log"))
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        self.envs(&mut cmd);
        cmd.envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        cmd.arg("daemon")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.daemon = Some(cmd.spawn().expect("start vessel daemon"));
        self.wait_ready();
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.vessel(&["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not become ready; log:\n{}", self.daemon_log());
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.root.join("test-daemon.log")).unwrap_or_default()
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|c| c.id())
    }

    /// SIGKILL the daemon (its VEs lose their root file system; the next daemon restarts them).
    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the daemon and wait for it.
    pub fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            // The daemon stops its VEs first (bounded by its own stop timeouts).
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        self.envs(&mut cmd);
        cmd
    }

    pub fn vessel(&self, args: &[&str]) -> Output {
        let mut cmd = self.command();
        cmd.args(args).stdin(Stdio::null());
        run_bounded(cmd, Duration::from_secs(300))
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.vessel(args);
        assert!(
            o.status.success(),
            "vessel {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndaemon log tail:\n{}",
            o.status,
            out(&o),
            err(&o),
            tail(&self.daemon_log(), 30)
        );
        out(&o)
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.vessel(args);
        assert!(!o.status.success(), "vessel {args:?} should have failed:\n{}", out(&o));
        err(&o)
    }

    pub fn exec(&self, ve: &str, script: &str) -> Output {
        self.vessel(&["ve", "exec", ve, "--", "sh", "-c", script])
    }

    /// Run a shell script in the VE and return its stdout; fails the test if it fails.
    pub fn sh(&self, ve: &str, script: &str) -> String {
        let o = self.exec(ve, script);
        assert!(
            o.status.success(),
            "in VE {ve}: {script:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            out(&o),
            err(&o)
        );
        out(&o)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("json output")
    }

    pub fn ve_pid(&self, ve: &str) -> i32 {
        self.json(&["ve", "show", ve])["pid"]
            .as_i64()
            .expect("running VE has a pid") as i32
    }

    pub fn ensure_busybox(&self) {
        self.ok(&["template", "build", "busybox"]);
    }

    /// `vessel ve exec -t VE -- sh` through the API: feeds `input` to the terminal and reads
    /// until the shell is gone (at most 20 s). Ok((what the terminal showed, exit code)), or
    /// Err(the daemon's refusal).
    pub fn exec_tty(&self, ve: &str, env: &[&str], cwd: Option<&str>, input: &[u8]) -> Result<(String, i32), String> {
        exec_tty_at(&self.socket(), ve, env, cwd, input, None)
    }

    /// Mount points below this node's data dir.
    pub fn mounts(&self) -> Vec<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.root.to_string_lossy().to_string();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    /// Every cgroup hierarchy mounted under /sys/fs/cgroup.
    fn hierarchies() -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// The cgroup directory of every VE of this node, in every hierarchy.
    fn all_ve_cgroup_dirs(&self) -> Vec<PathBuf> {
        Self::hierarchies()
            .into_iter()
            .flat_map(|h| {
                std::fs::read_dir(h.join(&self.cgroup_parent))
                    .map(|r| r.flatten().map(|e| e.path()).collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .filter(|p| p.is_dir())
            .collect()
    }

    pub fn cgroup_dirs(&self, ve: &str) -> Vec<PathBuf> {
        Self::hierarchies()
            .into_iter()
            .map(|h| h.join(&self.cgroup_parent).join(ve))
            .filter(|p| p.exists())
            .collect()
    }

    /// The nftables table filtering this node's bridge (see `vessel_ve::netfilter`).
    pub fn filter_table(&self) -> String {
        format!("vessel_{}", self.bridge)
    }

    pub fn link_exists(&self, name: &str) -> bool {
        std::fs::read_to_string("/proc/self/net/dev")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(':').next().map(str::trim) == Some(name))
    }
}

pub fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Run a command with a time bound: a hung command fails the test instead of hanging CI.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let t1 = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut s) = stdout {
            let _ = std::io::Read::read_to_end(&mut s, &mut b);
        }
        b
    });
    let t2 = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut s) = stderr {
            let _ = std::io::Read::read_to_end(&mut s, &mut b);
        }
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            eprintln!("command timed out after {limit:?}: {cmd:?}");
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // VEs first (through the daemon), then anything a crash left behind.
        if self.daemon.is_some() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.vessel(&["ve", "list", "--json"]).stdout) {
                for ve in v.as_array().cloned().unwrap_or_default() {
                    if let Some(name) = ve["spec"]["name"].as_str() {
                        let _ = self.vessel(&["ve", "destroy", "--force", name]);
                    }
                }
            }
        }
        self.stop_daemon();
        // The node's console keeper outlives daemons by design; this test's goes now.
        if let Some(pid) = std::fs::read_to_string(self.root.join("console-keeper.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            if std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("__console-keeper")) {
                // SAFETY: the keeper this test's daemon started (checked by its command line).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Kill any process still in our cgroups (only ours: the parent carries our prefix).
        for _ in 0..3 {
            for ve in self.all_ve_cgroup_dirs() {
                if let Ok(procs) = std::fs::read_to_string(ve.join("cgroup.procs")) {
                    for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                        // SAFETY: killing processes inside a cgroup this test created.
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: lazy unmount of a mount point under our own temp dir.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        for ve in self.all_ve_cgroup_dirs() {
            let _ = std::fs::remove_dir(ve);
        }
        for ctrl in Self::hierarchies() {
            let _ = std::fs::remove_dir(ctrl.join(&self.cgroup_parent));
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        // The daemon removes its bridge filter when it exits; this covers a killed one.
        let _ = Command::new("nft")
            .args(["delete", "table", "bridge", &self.filter_table()])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

pub fn host_uid_of(pid: i32) -> u32 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

pub fn path_exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

/// One vessel-fs volume served by `vessel __fs-serve` (a child process this test owns)
/// at a mount point under a unique temp dir; killed, unmounted and removed on drop.
pub struct FsServer {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub mnt: PathBuf,
    pub vol: PathBuf,
    pub template: Option<PathBuf>,
    child: Option<Child>,
}

impl FsServer {
    pub fn new(bin: &Path, tag: &str, template: Option<&Path>) -> FsServer {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vessel-fstest-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("mnt")).unwrap();
        FsServer {
            bin: bin.to_path_buf(),
            mnt: dir.join("mnt"),
            vol: dir.join("vol"),
            dir,
            template: template.map(Path::to_path_buf),
            child: None,
        }
    }

    /// Serve the volume (creating it on first use); Err(stderr) if the server fails.
    pub fn start(&mut self, extra: &[&str]) -> Result<(), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("__fs-serve").arg(&self.vol).arg(&self.mnt);
        if let Some(t) = &self.template {
            cmd.arg("--template").arg(t);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn vessel __fs-serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "ready" => {
                self.child = Some(child);
                Ok(())
            }
            _ => {
                let _ = child.kill();
                let o = child.wait_with_output().expect("wait");
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        }
    }

    /// kill -9 the server (a crash), and detach its dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.detach();
    }

    /// SIGTERM: clean unmount (the server checkpoints the volume).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.detach();
    }

    fn detach(&self) {
        let c = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).expect("path");
        for _ in 0..4 {
            // SAFETY: a NUL-terminated path; MNT_DETACH on our own mount point.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
    }
}

impl Drop for FsServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `vessel ve exec -t VE -- sh` through the daemon API at `socket` (see
/// [`TestNode::exec_tty`]); `size`: rows and columns set on the terminal first, as the CLI
/// copies its own.
pub fn exec_tty_at(
    socket: &Path,
    ve: &str,
    env: &[&str],
    cwd: Option<&str>,
    input: &[u8],
    size: Option<(u16, u16)>,
) -> Result<(String, i32), String> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use vessel_types::api::{Request, Response};
    let client = vessel_api::Client::connect(socket).map_err(|e| e.to_string())?;
    let req = Request::VeExec {
        name: vessel_types::Name::parse(ve).map_err(|e| e.to_string())?,
        argv: vec!["sh".into()],
        tty: true,
        env: env.iter().map(|e| e.to_string()).collect(),
        cwd: cwd.map(str::to_string),
    };
    client.send(&req, &[]).map_err(|e| e.to_string())?;
    let (r, fds) = client.recv().map_err(|e| e.to_string())?;
    match r {
        Response::ExecStarted => {}
        Response::Error(e) => return Err(e.message),
        r => return Err(format!("unexpected answer {r:?}")),
    }
    let master = fds.into_iter().next().ok_or("no pty master")?;
    if let Some((rows, cols)) = size {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live local.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
    let mut m = std::fs::File::from(master);
    m.write_all(input).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the shell exits (EIO on the master once the slave side is gone).
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match m.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let code = match client.recv() {
        Ok((Response::Exit { code }, _)) => code,
        other => return Err(format!("no exit code: {other:?}")),
    };
    Ok((String::from_utf8_lossy(&seen).into_owned(), code))
}

/// Attach to a VE's console through the daemon API at `socket`, type `input`, read until
/// `until` shows up (or 20 s pass); returns what the console printed.
pub fn console_dialog_at(socket: &Path, ve: &str, input: &[u8], until: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let client = vessel_api::Client::connect(socket).map_err(|e| e.to_string())?;
    let req = vessel_types::api::Request::VeConsole {
        name: vessel_types::Name::parse(ve).map_err(|e| e.to_string())?,
    };
    client.send(&req, &[]).map_err(|e| e.to_string())?;
    let (r, fds) = client.recv().map_err(|e| e.to_string())?;
    if !matches!(r, vessel_types::api::Response::ConsoleAttached) {
        return Err(format!("{r:?}"));
    }
    let mut s = std::os::unix::net::UnixStream::from(fds.into_iter().next().ok_or("no console connection")?);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    s.write_all(input).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !String::from_utf8_lossy(&seen).contains(until) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}
