//! One peer connection as a two-way stream of [`Frame`]s, driven by the caller's `poll`
//! loop (one thread serves both directions; the TCP socket is non-blocking).
//!
//! The caller puts [`Channel::raw_fd`] with [`Channel::events`] in its poll set, calls
//! [`Channel::pump`] with what poll returned, then takes frames with [`Channel::event`]
//! until it says `Wait`. Frames sent with [`Channel::send`] are queued and go out as the
//! socket takes them; [`Channel::backlog`] tells how much waits, so a caller stops reading
//! its own sources while the other node does not keep up. Reading stops while 1 MiB of
//! received frames waits to be taken.
//!
//! The end: the sender of the last frame calls [`Channel::finish`] (its TLS close); the
//! other side sees `Closed`. A connection that ends without the TLS close is `Cut`.
//! TCP keep-alive (10 s idle, 3 probes 5 s apart) and a 30 s bound on unacknowledged data
//! end a connection to a node that vanished without a word.

use crate::duplex::{Decoder, DuplexError, Frame, MAX_PAYLOAD};
use rustls::Connection;
use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Received bytes held before the channel stops reading.
const READ_LIMIT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the connection was cut ({0})")]
    Cut(String),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error(transparent)]
    Frame(#[from] DuplexError),
}

/// What [`Channel::event`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Frame(Frame),
    /// Nothing whole yet: poll again.
    Wait,
    /// The other side ended the stream with its TLS close.
    Closed,
}

pub struct Channel {
    conn: Connection,
    tcp: TcpStream,
    dec: Decoder,
    /// Encoded frames rustls did not take yet: `out[out_at..]` (a cursor, not a drain:
    /// moving megabytes for every 16 KiB TLS takes cost more than the crypto).
    out: Vec<u8>,
    out_at: usize,
    clean_end: bool,
    cut: Option<String>,
}

fn setsockopt(fd: RawFd, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: `value` is a live i32 and its size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `poll(2)` over `fds`, retried on EINTR; `timeout_ms` < 0 waits without bound.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> std::io::Result<usize> {
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of that many pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Channel {
    /// Take over a connection whose handshake and request/answer are done (bytes rustls
    /// already decrypted are kept).
    pub fn new(conn: Connection, tcp: TcpStream) -> Result<Channel, ChannelError> {
        tcp.set_nonblocking(true)?;
        let fd = tcp.as_raw_fd();
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 30_000)?;
        let mut c = Channel {
            conn,
            tcp,
            dec: Decoder::default(),
            out: Vec::new(),
            out_at: 0,
            clean_end: false,
            cut: None,
        };
        c.conn.process_new_packets().map_err(ChannelError::Tls)?;
        c.take_plaintext()?;
        Ok(c)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }

    /// The poll events this channel waits for now.
    pub fn events(&self) -> i16 {
        let mut e = 0;
        if !self.clean_end && self.cut.is_none() && self.dec.pending() < READ_LIMIT {
            e |= libc::POLLIN;
        }
        if self.backlog() > 0 || self.conn.wants_write() {
            e |= libc::POLLOUT;
        }
        e
    }

    /// Bytes of queued frames not yet handed to TLS.
    pub fn backlog(&self) -> usize {
        self.out.len() - self.out_at
    }

    /// Queue a frame.
    pub fn send(&mut self, f: &Frame) {
        f.encode(&mut self.out);
    }

    /// Queue data as frames of kind `kind` (`Frame::Stdout` ...), in pieces that fit one.
    pub fn send_data(&mut self, kind: fn(Vec<u8>) -> Frame, data: &[u8]) {
        for piece in data.chunks(MAX_PAYLOAD) {
            Frame::encode_data(kind, piece, &mut self.out);
        }
    }

    /// Move bytes after a poll that returned `revents` for this channel (0: only write
    /// what can go).
    pub fn pump(&mut self, revents: i16) -> Result<(), ChannelError> {
        self.write_some()?;
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_some()?;
        }
        Ok(())
    }

    /// The next frame received, `Wait`, or `Closed`; a cut connection is an error.
    pub fn event(&mut self) -> Result<Event, ChannelError> {
        if let Some(f) = self.dec.frame()? {
            return Ok(Event::Frame(f));
        }
        if let Some(why) = &self.cut {
            return Err(ChannelError::Cut(why.clone()));
        }
        if self.clean_end {
            if self.dec.pending() > 0 {
                return Err(ChannelError::Cut("it ended inside a frame".into()));
            }
            return Ok(Event::Closed);
        }
        Ok(Event::Wait)
    }

    /// The TLS close, without waiting for the socket: queued only when everything before
    /// it went to TLS (otherwise the other side sees a cut, never a clean end that lost
    /// data).
    pub fn close_notify(&mut self) {
        if self.write_some().is_ok() && self.backlog() == 0 {
            self.conn.send_close_notify();
            let _ = self.write_some();
        }
    }

    /// Send what is queued, then the TLS close; waits at most `timeout` for the socket.
    pub fn finish(mut self, timeout: Duration) -> Result<(), ChannelError> {
        let deadline = Instant::now() + timeout;
        self.flush(deadline)?;
        self.conn.send_close_notify();
        self.flush(deadline)?;
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
        Ok(())
    }

    fn flush(&mut self, deadline: Instant) -> Result<(), ChannelError> {
        loop {
            self.write_some()?;
            if self.backlog() == 0 && !self.conn.wants_write() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::Io(std::io::Error::new(
                    ErrorKind::TimedOut,
                    "the other node did not take the stream's last bytes in time",
                )));
            }
            let mut p = [libc::pollfd {
                fd: self.raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            }];
            poll(&mut p, left.as_millis().clamp(1, i32::MAX as u128) as i32)?;
        }
    }

    fn write_some(&mut self) -> Result<(), ChannelError> {
        loop {
            while self.out_at < self.out.len() {
                let n = self.conn.writer().write(&self.out[self.out_at..])?;
                if n == 0 {
                    break;
                }
                self.out_at += n;
            }
            if self.out_at == self.out.len() {
                self.out.clear();
                self.out_at = 0;
            } else if self.out_at >= (1 << 20) && self.out_at * 2 >= self.out.len() {
                self.out.drain(..self.out_at);
                self.out_at = 0;
            }
            if !self.conn.wants_write() {
                return Ok(());
            }
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ChannelError::Cut(e.to_string())),
            }
        }
    }

    fn read_some(&mut self) -> Result<(), ChannelError> {
        // Bounded per call, so a fast sender cannot keep one side from its other work.
        for _ in 0..16 {
            if self.clean_end || self.cut.is_some() || self.dec.pending() >= READ_LIMIT {
                return Ok(());
            }
            let eof = match self.conn.read_tls(&mut self.tcp) {
                Ok(n) => n == 0,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.cut = Some(e.to_string());
                    return Ok(());
                }
            };
            self.conn.process_new_packets().map_err(ChannelError::Tls)?;
            self.take_plaintext()?;
            if eof {
                if !self.clean_end && self.cut.is_none() {
                    self.cut = Some("it ended without its TLS close".into());
                }
                return Ok(());
            }
        }
        Ok(())
    }

    fn take_plaintext(&mut self) -> Result<(), ChannelError> {
        loop {
            // Straight into the decoder's buffer (no scratch buffer to zero and copy from).
            match self.dec.fill_from(&mut self.conn.reader()) {
                Ok(0) => {
                    self.clean_end = true;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    self.cut = Some("it ended without its TLS close".into());
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
