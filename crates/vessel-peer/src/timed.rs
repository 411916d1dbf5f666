//! A TCP stream whose reads end at a deadline (the TLS layer reads through it, so a peer
//! that trickles bytes cannot hold a connection past the deadline).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

pub struct TimedSock {
    pub tcp: TcpStream,
    /// Reads after this fail with `TimedOut`; `None`: no bound.
    pub deadline: Option<Instant>,
}

impl TimedSock {
    pub fn new(tcp: TcpStream) -> TimedSock {
        TimedSock { tcp, deadline: None }
    }
}

impl Read for TimedSock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"));
                }
                self.tcp.set_read_timeout(Some(left))?;
            }
            None => self.tcp.set_read_timeout(None)?,
        }
        match self.tcp.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))
            }
            r => r,
        }
    }
}

impl Write for TimedSock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}
