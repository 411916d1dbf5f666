//! The console keeper: one process per node (not per VE) that holds every running VE's
//! console pty master, writes console logs, and serves `vessel ve console` attachments.
//! It outlives daemon restarts (`vessel down`/`up`, an upgrade, a crash), so a re-attached
//! VE keeps its console and its log. Single-threaded, epoll-driven.
//!
//! Protocol on `ROOT/console-keeper.sock` (root only), frames as in `vessel_api::frame`:
//! one request per connection. `Adopt` carries the pty master as an fd; after `Attach` the
//! connection carries raw bytes both ways (the daemon hands it to the CLI).

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{send, MsgFlags};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vessel_api::frame::{read_frame, write_frame};

/// Console log size before it is rotated to `console.log.1`.
pub const LOG_ROTATE_BYTES: u64 = 1 << 20;
/// The keeper exits after holding no console for this long.
const IDLE_EXIT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum KeeperRequest {
    /// Take the attached pty master as VE `ve`'s console, logging to `log`.
    Adopt { ve: String, log: PathBuf },
    /// Switch this connection to VE `ve`'s console.
    Attach { ve: String },
    /// The VE stopped: close its console.
    Release { ve: String },
    /// Which consoles are held.
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum KeeperResponse {
    Ok,
    Attached,
    Consoles { ves: Vec<String> },
    Error { message: String },
}

pub fn socket_path(root: &Path) -> PathBuf {
    root.join("console-keeper.sock")
}

pub fn pid_path(root: &Path) -> PathBuf {
    root.join("console-keeper.pid")
}

struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl LogFile {
    fn append(&mut self, data: &[u8]) {
        if self.file.is_none() || self.size > LOG_ROTATE_BYTES {
            if self.size > LOG_ROTATE_BYTES {
                let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            }
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
            self.size = self
                .file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
        }
        if let Some(f) = &mut self.file {
            if f.write_all(data).is_ok() {
                self.size += data.len() as u64;
            }
        }
    }
}

struct Console {
    master: OwnedFd,
    /// A slave fd held so the master never reports hang-up between two gettys.
    _peer: Option<OwnedFd>,
    log: LogFile,
    clients: Vec<UnixStream>,
}

enum Token {
    Listener,
    Master(String),
    Client(String, RawFd),
}

struct Keeper {
    epoll: Epoll,
    consoles: HashMap<String, Console>,
    tokens: HashMap<u64, Token>,
    next: u64,
}

fn slave_of(master: &OwnedFd) -> Option<OwnedFd> {
    // SAFETY: TIOCGPTPEER on a pty master returns a new fd for its slave (or fails).
    let fd = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    // SAFETY: a non-negative return is a fresh fd owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Keeper {
    fn watch<F: AsFd>(&mut self, fd: F, t: Token) -> std::io::Result<()> {
        self.next += 1;
        self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, self.next))?;
        self.tokens.insert(self.next, t);
        Ok(())
    }

    fn release(&mut self, ve: &str) {
        if let Some(c) = self.consoles.remove(ve) {
            let _ = self.epoll.delete(c.master.as_fd());
            for s in &c.clients {
                let _ = self.epoll.delete(s.as_fd());
            }
            self.tokens
                .retain(|_, t| !matches!(t, Token::Master(v) | Token::Client(v, _) if v == ve));
        }
    }

    fn handle_request(&mut self, conn: UnixStream) {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let (req, mut fds) = match read_frame::<KeeperRequest>(conn.as_raw_fd()) {
            Ok(x) => x,
            Err(_) => return,
        };
        let reply = |r: &KeeperResponse| {
            let _ = write_frame(conn.as_raw_fd(), r, &[]);
        };
        match req {
            KeeperRequest::Adopt { ve, log } => {
                let Some(master) = fds.pop() else {
                    return reply(&KeeperResponse::Error {
                        message: "adopt needs the pty master".into(),
                    });
                };
                self.release(&ve);
                let _ = nix::fcntl::fcntl(
                    master.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                let peer = slave_of(&master);
                let watch = master
                    .try_clone()
                    .and_then(|m| self.watch(m.as_fd(), Token::Master(ve.clone())));
                if let Err(e) = watch {
                    return reply(&KeeperResponse::Error {
                        message: format!("watch console: {e}"),
                    });
                }
                self.consoles.insert(
                    ve,
                    Console {
                        master,
                        _peer: peer,
                        log: LogFile {
                            path: log,
                            file: None,
                            size: 0,
                        },
                        clients: Vec::new(),
                    },
                );
                reply(&KeeperResponse::Ok);
            }
            KeeperRequest::Attach { ve } => {
                if !self.consoles.contains_key(&ve) {
                    return reply(&KeeperResponse::Error {
                        message: format!("no console for VE '{ve}'"),
                    });
                }
                let _ = conn.set_read_timeout(None);
                reply(&KeeperResponse::Attached);
                let fd = conn.as_raw_fd();
                if self.watch(conn.as_fd(), Token::Client(ve.clone(), fd)).is_ok() {
                    if let Some(c) = self.consoles.get_mut(&ve) {
                        c.clients.push(conn);
                    }
                }
            }
            KeeperRequest::Release { ve } => {
                self.release(&ve);
                reply(&KeeperResponse::Ok);
            }
            KeeperRequest::List => reply(&KeeperResponse::Consoles {
                ves: self.consoles.keys().cloned().collect(),
            }),
        }
    }

    fn pump(&mut self, ve: &str, buf: &mut [u8]) {
        let Some(c) = self.consoles.get_mut(ve) else { return };
        for _ in 0..64 {
            let n = match nix::unistd::read(c.master.as_raw_fd(), buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let data = &buf[..n];
            c.log.append(data);
            // A client too slow to take the output misses it; a gone client is dropped.
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            c.clients
                .retain(|s| !matches!(send(s.as_raw_fd(), data, flags), Err(e) if e != Errno::EAGAIN));
        }
    }

    fn client_input(&mut self, ve: &str, fd: RawFd, buf: &mut [u8]) {
        let Some(c) = self.consoles.get_mut(ve) else { return };
        let n = match nix::unistd::read(fd, buf) {
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return,
            Err(_) => 0,
        };
        if n == 0 {
            if let Some(i) = c.clients.iter().position(|s| s.as_raw_fd() == fd) {
                let s = c.clients.remove(i);
                let _ = self.epoll.delete(s.as_fd());
            }
            self.tokens.retain(|_, t| !matches!(t, Token::Client(_, f) if *f == fd));
            return;
        }
        let mut data = &buf[..n];
        let mut spins = 0;
        while !data.is_empty() && spins < 200 {
            match nix::unistd::write(c.master.as_fd(), data) {
                Ok(w) => data = &data[w..],
                Err(Errno::EAGAIN) => {
                    spins += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => break,
            }
        }
    }
}

/// Run the keeper for the node rooted at `root` until it has been idle for a while.
pub fn run(root: &Path) -> std::io::Result<()> {
    let pid_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(pid_path(root))?;
    // SAFETY: flock on an fd we own; the lock lives as long as `pid_file`.
    if unsafe { libc::flock(pid_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(()); // another keeper serves this node
    }
    pid_file.set_len(0)?;
    (&pid_file).write_all(std::process::id().to_string().as_bytes())?;
    let sock = socket_path(root);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let mut k = Keeper {
        epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
        consoles: HashMap::new(),
        tokens: HashMap::new(),
        next: 0,
    };
    k.watch(listener.as_fd(), Token::Listener)?;
    let mut events = vec![EpollEvent::empty(); 64];
    let mut buf = vec![0u8; 16 << 10];
    let mut idle_since = Instant::now();
    loop {
        let n = k.epoll.wait(&mut events, EpollTimeout::from(1000u16)).unwrap_or(0);
        for ev in &events[..n] {
            match k.tokens.get(&ev.data()) {
                Some(Token::Listener) => {
                    while let Ok((conn, _)) = listener.accept() {
                        let _ = conn.set_nonblocking(false);
                        k.handle_request(conn);
                    }
                }
                Some(Token::Master(v)) => {
                    let v = v.clone();
                    k.pump(&v, &mut buf);
                }
                Some(Token::Client(v, fd)) => {
                    let (v, fd) = (v.clone(), *fd);
                    k.client_input(&v, fd, &mut buf);
                }
                None => {}
            }
        }
        if !k.consoles.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() > IDLE_EXIT {
            let _ = std::fs::remove_file(&sock);
            return Ok(());
        }
    }
}

/// Daemon side: one request to the keeper, starting it first if none runs.
pub struct KeeperClient {
    root: PathBuf,
    exe: PathBuf,
}

impl KeeperClient {
    pub fn new(root: &Path, exe: &Path) -> Self {
        KeeperClient {
            root: root.to_path_buf(),
            exe: exe.to_path_buf(),
        }
    }

    fn connect(&self, spawn: bool) -> std::io::Result<UnixStream> {
        match UnixStream::connect(socket_path(&self.root)) {
            Ok(s) => return Ok(s),
            Err(e) if !spawn => return Err(e),
            Err(_) => {}
        }
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("__console-keeper")
            .arg(&self.root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        // SAFETY: runs in the forked child before exec: a new session and a clean signal
        // mask, so the keeper is not tied to the daemon's terminal or signals.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                vessel_ve::sys::unblock_all_signals()?;
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(s) = UnixStream::connect(socket_path(&self.root)) {
                // The keeper outlives us; reap it if it exits while we still run.
                std::thread::spawn(move || child.wait());
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other("console keeper did not start"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send one request (with `fds`) and return the reply and the connection. Starts a
    /// keeper first if none runs and `spawn` is set.
    pub fn call(
        &self,
        req: &KeeperRequest,
        fds: &[RawFd],
        spawn: bool,
    ) -> std::io::Result<(KeeperResponse, UnixStream)> {
        let s = self.connect(spawn)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write_frame(s.as_raw_fd(), req, fds).map_err(std::io::Error::other)?;
        let (r, _) = read_frame::<KeeperResponse>(s.as_raw_fd()).map_err(std::io::Error::other)?;
        s.set_read_timeout(None)?;
        match r {
            KeeperResponse::Error { message } => Err(std::io::Error::other(message)),
            r => Ok((r, s)),
        }
    }

    /// Whether a keeper runs (without starting one).
    pub fn list_if_running(&self) -> Option<Vec<String>> {
        let s = UnixStream::connect(socket_path(&self.root)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write_frame(s.as_raw_fd(), &KeeperRequest::List, &[]).ok()?;
        match read_frame::<KeeperResponse>(s.as_raw_fd()).ok()?.0 {
            KeeperResponse::Consoles { ves } => Some(ves),
            _ => None,
        }
    }
}
