//! Interactive terminal plumbing for `ve exec -t` and `ve console`: raw mode with restore
//! on every exit path, window size, and a two-way byte relay.

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

/// Puts stdin in raw mode while alive (if it is a terminal).
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    pub fn enter() -> RawMode {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawMode { saved: None };
        }
        let saved = tcgetattr(stdin.as_fd()).ok();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            cfmakeraw(&mut raw);
            let _ = tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw);
        }
        RawMode { saved }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, t);
        }
    }
}

/// Copy the caller's terminal size onto the pty `master`.
pub fn copy_winsize(master: RawFd) {
    // SAFETY: winsize is plain data; the ioctls read/write exactly one winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(master, libc::TIOCSWINSZ, &ws);
        }
    }
}

/// Relay stdin → `to` and `from` → stdout until `from` ends. If `detach` is set, that
/// byte typed on stdin ends the relay instead of being sent. Returns true if detached.
pub fn relay(to: BorrowedFd, from: BorrowedFd, detach: Option<u8>) -> bool {
    let to_raw = to.as_raw_fd();
    let from_raw = from.as_raw_fd();
    let mut buf = [0u8; 16 << 10];
    let mut stdin_open = true;
    loop {
        let mut fds = vec![libc::pollfd {
            fd: from_raw,
            events: libc::POLLIN,
            revents: 0,
        }];
        if stdin_open {
            fds.push(libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: fds is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[0].revents != 0 {
            match nix::unistd::read(from_raw, &mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
            }
        }
        if stdin_open && fds[1].revents != 0 {
            match std::io::stdin().read(&mut buf) {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => {
                    let data = &buf[..n];
                    if let Some(k) = detach {
                        if let Some(i) = data.iter().position(|b| *b == k) {
                            let _ = write_all(to_raw, &data[..i]);
                            return true;
                        }
                    }
                    if write_all(to_raw, data).is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) -> nix::Result<()> {
    // SAFETY: fd stays open for the duration of the relay (owned by the caller).
    let b = unsafe { BorrowedFd::borrow_raw(fd) };
    while !data.is_empty() {
        let n = nix::unistd::write(b, data)?;
        data = &data[n..];
    }
    Ok(())
}
