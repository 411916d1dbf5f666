//! One thread watches every running VE through epoll: each VE's console pty master
//! (output goes to its console log and to attached `vessel ve console` clients) and each
//! VE init's pidfd (an exit is handed to the node on a short-lived thread). Per VE this
//! costs a few file descriptors and a small struct: no thread or process.

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{send, MsgFlags};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vessel_types::Name;

/// Console log size before it is rotated to `console.log.1`.
pub const LOG_ROTATE_BYTES: u64 = 1 << 20;

/// A VE's console: the pty master, its log, and the clients attached to it.
pub struct Console {
    pub master: OwnedFd,
    /// A slave fd we hold so the master never reports hang-up between two gettys.
    _peer: Option<OwnedFd>,
    log: Mutex<LogFile>,
    subscribers: Mutex<Vec<UnixStream>>,
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

impl Console {
    pub fn new(master: OwnedFd, log_path: PathBuf) -> Arc<Console> {
        // SAFETY: TIOCGPTPEER on a pty master returns a new fd for its slave (or fails).
        let peer = unsafe {
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        // SAFETY: a non-negative return is a fresh fd owned by nobody else.
        let peer = (peer >= 0).then(|| unsafe { OwnedFd::from_raw_fd(peer) });
        let _ = nix::fcntl::fcntl(
            master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        Arc::new(Console {
            master,
            _peer: peer,
            log: Mutex::new(LogFile {
                path: log_path,
                file: None,
                size: 0,
            }),
            subscribers: Mutex::new(Vec::new()),
        })
    }

    /// Add a client that receives console output. The socket stays blocking (it shares its
    /// file description with the reader of the client's input); writes use MSG_DONTWAIT.
    pub fn subscribe(&self, s: UnixStream) {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    pub fn unsubscribe(&self, s: &UnixStream) {
        let fd = s.as_raw_fd();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x.as_raw_fd() != fd);
    }

    /// Write input from a console client to the VE.
    pub fn input(&self, mut data: &[u8]) -> std::io::Result<()> {
        let mut spins = 0;
        while !data.is_empty() {
            match nix::unistd::write(self.master.as_fd(), data) {
                Ok(n) => data = &data[n..],
                Err(nix::errno::Errno::EAGAIN) if spins < 200 => {
                    spins += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn pump(&self, buf: &mut [u8]) {
        for _ in 0..64 {
            let n = match nix::unistd::read(self.master.as_raw_fd(), buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let data = &buf[..n];
            self.log.lock().unwrap_or_else(|e| e.into_inner()).append(data);
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            // A client too slow to take the output misses it; a gone client is dropped.
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            subs.retain(|s| !matches!(send(s.as_raw_fd(), data, flags), Err(e) if e != Errno::EAGAIN));
        }
    }
}

enum Target {
    Console(Arc<Console>),
    Exit { ve: Name, pid: i32, pidfd: Arc<OwnedFd> },
}

type ExitHandler = Box<dyn Fn(Name, i32, Arc<OwnedFd>) + Send + Sync>;

pub struct Monitor {
    epoll: Epoll,
    targets: Mutex<HashMap<u64, Target>>,
    next: Mutex<u64>,
    on_exit: Mutex<Option<Arc<ExitHandler>>>,
}

impl Monitor {
    pub fn new() -> std::io::Result<Arc<Monitor>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        Ok(Arc::new(Monitor {
            epoll,
            targets: Mutex::new(HashMap::new()),
            next: Mutex::new(1),
            on_exit: Mutex::new(None),
        }))
    }

    pub fn set_exit_handler(&self, h: ExitHandler) {
        *self.on_exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(h));
    }

    fn add<F: AsFd>(&self, fd: F, t: Target) -> std::io::Result<u64> {
        let token = {
            let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        self.targets.lock().unwrap_or_else(|e| e.into_inner()).insert(token, t);
        if let Err(e) = self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
            self.targets.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
            return Err(e.into());
        }
        Ok(token)
    }

    pub fn watch_console(&self, c: Arc<Console>) -> std::io::Result<u64> {
        let fd = c.master.try_clone()?;
        let token = self.add(fd.as_fd(), Target::Console(c))?;
        drop(fd);
        Ok(token)
    }

    pub fn watch_exit(&self, ve: Name, pid: i32, pidfd: Arc<OwnedFd>) -> std::io::Result<u64> {
        let fd = pidfd.clone();
        self.add(fd.as_fd(), Target::Exit { ve, pid, pidfd })
    }

    /// Stop watching `token` (its fd may then be closed by the owner).
    pub fn unwatch(&self, token: u64) {
        if let Some(t) = self.targets.lock().unwrap_or_else(|e| e.into_inner()).remove(&token) {
            match &t {
                Target::Console(c) => {
                    let _ = self.epoll.delete(c.master.as_fd());
                }
                Target::Exit { pidfd, .. } => {
                    let _ = self.epoll.delete(pidfd.as_fd());
                }
            }
        }
    }

    /// The monitor loop; runs for the daemon's life. `tick` runs about once a second.
    pub fn run(self: Arc<Self>, tick: impl Fn()) {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut buf = vec![0u8; 16 << 10];
        let mut last_tick = std::time::Instant::now();
        loop {
            let n = self.epoll.wait(&mut events, EpollTimeout::from(500u16)).unwrap_or(0);
            for ev in &events[..n] {
                let token = ev.data();
                let action = {
                    let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
                    match targets.get(&token) {
                        Some(Target::Console(c)) => Some((Some(c.clone()), None)),
                        Some(Target::Exit { ve, pid, pidfd }) => Some((None, Some((ve.clone(), *pid, pidfd.clone())))),
                        None => None,
                    }
                };
                match action {
                    Some((Some(c), _)) => c.pump(&mut buf),
                    Some((None, Some((ve, pid, pidfd)))) => {
                        self.unwatch(token);
                        let h = self.on_exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if let Some(h) = h {
                            std::thread::spawn(move || h(ve, pid, pidfd));
                        }
                    }
                    _ => {}
                }
            }
            if last_tick.elapsed() >= std::time::Duration::from_secs(1) {
                last_tick = std::time::Instant::now();
                tick();
            }
        }
    }
}
