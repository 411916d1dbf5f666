//! A plain byte stream carried over a peer [`Channel`] as two blocking halves, a
//! [`PipeReader`] and a [`PipeWriter`], usable from two threads (replication's writer: a
//! sender and an acknowledgement reader) or from one (a replica). Nothing sits between
//! the caller and TLS: the half that reads or writes drives the connection itself, under
//! a lock it never holds while it waits for the socket. (A bridge thread with a socket
//! pair did this before: two more copies and two more thread wake-ups each way.)
//!
//! Bytes written go out as data frames of the kind given to [`split`]; data frames
//! received (of any data kind) are what reads return. The other node's TLS close (or an
//! `Eof` frame) is the end of the stream: reads return 0. [`PipeCloser::close`] ends it
//! from this side: the TLS close, then the socket shut, so a half blocked in either
//! direction returns at once.

use crate::channel::{poll, Channel, ChannelError, Event};
use crate::duplex::Frame;
use std::io::{Error, ErrorKind, Read, Write};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes queued toward the other node before a write waits for the socket.
const SEND_LIMIT: usize = 4 << 20;
/// A wait for the socket wakes this often to see whether the pipe was closed meanwhile
/// (the close also shuts the socket, which wakes it at once).
const WAKE_MS: i32 = 1000;

struct Inner {
    ch: Channel,
    /// A data frame received and not yet read whole: `inbox[at..]`.
    inbox: Vec<u8>,
    at: usize,
    /// The other side ended the stream.
    ended: bool,
    /// Why the stream failed, for every later read or write.
    failed: Option<String>,
}

struct Shared {
    inner: Mutex<Inner>,
    fd: RawFd,
    closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait (without the lock) until the socket has `events`, or a while.
    fn wait(&self, events: i16) -> std::io::Result<i16> {
        let mut p = [libc::pollfd {
            fd: self.fd,
            events,
            revents: 0,
        }];
        poll(&mut p, WAKE_MS)?;
        Ok(p[0].revents)
    }

    fn check(&self, g: &Inner) -> std::io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorKind::BrokenPipe, "the stream was closed"));
        }
        match &g.failed {
            Some(why) => Err(Error::new(ErrorKind::ConnectionAborted, why.clone())),
            None => Ok(()),
        }
    }
}

fn io(e: ChannelError) -> Error {
    match e {
        ChannelError::Io(e) => e,
        e => Error::new(ErrorKind::ConnectionAborted, e.to_string()),
    }
}

/// The receiving half.
pub struct PipeReader {
    sh: Arc<Shared>,
}

/// The sending half.
pub struct PipeWriter {
    sh: Arc<Shared>,
    kind: fn(Vec<u8>) -> Frame,
}

/// Ends the stream from this side (any thread).
#[derive(Clone)]
pub struct PipeCloser {
    sh: Arc<Shared>,
}

/// Split a channel (its request answered, the stream begun) into its two halves; what is
/// written goes out as frames of kind `kind` (`Frame::Stdin` from the caller,
/// `Frame::Stdout` from the serving node).
pub fn split(ch: Channel, kind: fn(Vec<u8>) -> Frame) -> (PipeReader, PipeWriter, PipeCloser) {
    let fd = ch.raw_fd();
    let sh = Arc::new(Shared {
        inner: Mutex::new(Inner {
            ch,
            inbox: Vec::new(),
            at: 0,
            ended: false,
            failed: None,
        }),
        fd,
        closed: AtomicBool::new(false),
    });
    (
        PipeReader { sh: sh.clone() },
        PipeWriter { sh: sh.clone(), kind },
        PipeCloser { sh },
    )
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let events = {
                let mut g = self.sh.lock();
                loop {
                    if g.at < g.inbox.len() {
                        let n = buf.len().min(g.inbox.len() - g.at);
                        buf[..n].copy_from_slice(&g.inbox[g.at..g.at + n]);
                        g.at += n;
                        return Ok(n);
                    }
                    if g.ended {
                        return Ok(0);
                    }
                    self.sh.check(&g)?;
                    match g.ch.event() {
                        Ok(Event::Frame(Frame::Stdin(d) | Frame::Stdout(d) | Frame::Stderr(d))) => {
                            g.inbox = d;
                            g.at = 0;
                        }
                        Ok(Event::Frame(Frame::Eof)) | Ok(Event::Closed) => g.ended = true,
                        Ok(Event::Frame(Frame::Error(m))) => {
                            g.failed = Some(format!("the other node: {m}"));
                        }
                        Ok(Event::Frame(_)) => {}
                        Ok(Event::Wait) => break g.ch.events(),
                        Err(e) => g.failed = Some(e.to_string()),
                    }
                }
            };
            let revents = self.sh.wait(events | libc::POLLIN)?;
            let mut g = self.sh.lock();
            self.sh.check(&g)?;
            if let Err(e) = g.ch.pump(revents) {
                g.failed = Some(e.to_string());
            }
        }
    }
}

impl PipeWriter {
    /// Move what is queued while the socket takes it; wait for it while more than `limit`
    /// bytes (or anything of TLS's own) are left.
    fn push(&self, limit: usize) -> std::io::Result<()> {
        loop {
            {
                let mut g = self.sh.lock();
                self.sh.check(&g)?;
                if let Err(e) = g.ch.pump(0) {
                    let why = e.to_string();
                    g.failed = Some(why.clone());
                    return Err(io(e));
                }
                let tls_pending = g.ch.events() & libc::POLLOUT != 0;
                if g.ch.backlog() <= limit && (limit > 0 || !tls_pending) {
                    return Ok(());
                }
            }
            self.sh.wait(libc::POLLOUT)?;
        }
    }
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut g = self.sh.lock();
            self.sh.check(&g)?;
            g.ch.send_data(self.kind, buf);
        }
        self.push(SEND_LIMIT)?;
        Ok(buf.len())
    }

    /// Returns when the socket has taken everything written.
    fn flush(&mut self) -> std::io::Result<()> {
        self.push(0)
    }
}

impl PipeCloser {
    /// The TLS close after what is queued (best effort: the socket is not waited for),
    /// then the socket shut both ways. Idempotent.
    pub fn close(&self) {
        if self.sh.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut g = self.sh.lock();
            g.ch.close_notify();
        }
        // SAFETY: the descriptor belongs to the channel, which `Shared` keeps open for as
        // long as any half exists; shutdown does not close it.
        unsafe { libc::shutdown(self.sh.fd, libc::SHUT_RDWR) };
    }
}
