//! Writing a long stream (an export) to an fd a client handed over, without letting a
//! client that went away pin a daemon thread: every write first waits, in one-second ticks,
//! until the output can take bytes *or* the client's connection hangs up. Pipes and sockets
//! get at most `PIPE_BUF` bytes per write, which a ready pipe always takes without blocking;
//! regular files are written straight.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// True once the peer of `conn` closed or reset its end.
pub fn peer_gone(conn: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: conn,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call; zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

pub struct ClientOut {
    out: std::fs::File,
    conn: RawFd,
    regular: bool,
}

impl ClientOut {
    /// `conn` is the client's API connection (watched for hang-up, not owned).
    pub fn new(out: OwnedFd, conn: RawFd) -> ClientOut {
        let out = std::fs::File::from(out);
        let regular = out.metadata().map(|m| m.is_file()).unwrap_or(false);
        ClientOut { out, conn, regular }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
}

impl Write for ClientOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.regular {
            if peer_gone(self.conn) {
                return Err(gone());
            }
            return self.out.write(buf);
        }
        // At most ten minutes for a reader that never drains; the client's hang-up ends it
        // at the next tick.
        for _ in 0..600 {
            let mut p = [
                libc::pollfd {
                    fd: self.out.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.conn,
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds that live across the call.
            let n = unsafe { libc::poll(p.as_mut_ptr(), 2, 1000) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if p[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(gone());
            }
            if p[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the reader of the output closed it (broken pipe)",
                ));
            }
            if p[0].revents & libc::POLLOUT != 0 {
                return self.out.write(&buf[..buf.len().min(libc::PIPE_BUF)]);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "nobody read the output for ten minutes",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_stalled_pipe_ends_when_the_client_hangs_up() {
        let (client, server) = UnixStream::pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut out = ClientOut::new(w, server.as_raw_fd());
        // Fill the pipe; nobody reads.
        let chunk = vec![7u8; 4096];
        let mut written = 0;
        while written < 64 << 10 {
            written += out.write(&chunk).unwrap();
        }
        drop(client);
        let e = out.write(&chunk).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        drop(r);
    }

    #[test]
    fn regular_files_are_written_whole() {
        let (_client, server) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let mut out = ClientOut::new(OwnedFd::from(f), server.as_raw_fd());
        assert_eq!(out.write(&[1u8; 100_000]).unwrap(), 100_000);
        assert!(!peer_gone(server.as_raw_fd()));
    }
}
