//! One thread watches every running VE's init through its pidfd in one epoll set; an exit
//! is handed to the node on a short-lived thread. Per VE this costs one file descriptor and
//! a small struct: no thread or process. (Consoles live in the console keeper.)

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use vessel_types::Name;

struct Target {
    ve: Name,
    pid: i32,
    pidfd: Arc<OwnedFd>,
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

    pub fn watch_exit(&self, ve: Name, pid: i32, pidfd: Arc<OwnedFd>) -> std::io::Result<u64> {
        let fd = pidfd.clone();
        self.add(fd.as_fd(), Target { ve, pid, pidfd })
    }

    /// Stop watching `token` (its fd may then be closed by the owner).
    pub fn unwatch(&self, token: u64) {
        if let Some(t) = self.targets.lock().unwrap_or_else(|e| e.into_inner()).remove(&token) {
            let _ = self.epoll.delete(t.pidfd.as_fd());
        }
    }

    /// The monitor loop; runs for the daemon's life.
    pub fn run(self: Arc<Self>) {
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let n = self.epoll.wait(&mut events, EpollTimeout::from(500u16)).unwrap_or(0);
            for ev in &events[..n] {
                let token = ev.data();
                let target = {
                    let targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
                    targets.get(&token).map(|t| (t.ve.clone(), t.pid, t.pidfd.clone()))
                };
                if let Some((ve, pid, pidfd)) = target {
                    self.unwatch(token);
                    let h = self.on_exit.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    if let Some(h) = h {
                        std::thread::spawn(move || h(ve, pid, pidfd));
                    }
                }
            }
        }
    }
}
