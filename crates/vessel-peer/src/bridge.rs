//! A plain local byte stream carried over a peer [`Channel`]: what one side writes into
//! its end of a socket pair comes out of the other node's socket pair. Protocols that
//! want blocking `Read`/`Write` halves on separate threads (replication: a sender and an
//! acknowledgement reader) run over it, while one thread drives the TLS connection.
//!
//! Bytes read locally go out as data frames (`out_kind`); data frames received are
//! written to the local end. The local end's EOF ends the stream with the TLS close; the
//! other node's close (or a cut) shuts the local end, so its reader sees the end.

use crate::channel::{poll, Channel, ChannelError, Event};
use crate::duplex::Frame;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Bytes queued toward the other node before the bridge stops reading its local end.
const SEND_LIMIT: usize = 4 << 20;
/// Bytes received and not yet taken by the local end before it stops taking frames.
const RECV_LIMIT: usize = 4 << 20;

/// Run the bridge until one side ends (on the calling thread).
pub fn run(mut ch: Channel, local: UnixStream, out_kind: fn(Vec<u8>) -> Frame) -> Result<(), ChannelError> {
    local.set_nonblocking(true)?;
    let mut local = local;
    // Received bytes not yet taken by the local end: `to_local[taken..]` (a cursor: no
    // move of the rest for every partial write).
    let mut to_local: Vec<u8> = Vec::new();
    let mut taken = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: ch.raw_fd(),
                events: ch.events(),
                revents: 0,
            },
            libc::pollfd {
                fd: local.as_raw_fd(),
                events: (if ch.backlog() < SEND_LIMIT { libc::POLLIN } else { 0 })
                    | (if taken == to_local.len() { 0 } else { libc::POLLOUT }),
                revents: 0,
            },
        ];
        poll(&mut fds, 1000)?;
        ch.pump(fds[0].revents)?;
        if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // What the local end has, up to the send limit, then out in large writes.
            while ch.backlog() < SEND_LIMIT {
                match local.read(&mut buf) {
                    Ok(0) => {
                        // The local side is done: the rest goes out, then the TLS close.
                        return ch.finish(Duration::from_secs(10));
                    }
                    Ok(n) => ch.send_data(out_kind, &buf[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                }
            }
            ch.pump(0)?;
        }
        while to_local.len() - taken < RECV_LIMIT {
            match ch.event() {
                Ok(Event::Frame(Frame::Stdin(d) | Frame::Stdout(d))) => {
                    if taken == to_local.len() {
                        to_local.clear();
                        taken = 0;
                    }
                    to_local.extend_from_slice(&d)
                }
                Ok(Event::Frame(Frame::Eof)) | Ok(Event::Closed) => {
                    finish_local(&mut local, &to_local[taken..]);
                    return Ok(());
                }
                Ok(Event::Frame(Frame::Error(m))) => {
                    let _ = local.shutdown(std::net::Shutdown::Both);
                    return Err(ChannelError::Cut(m));
                }
                Ok(Event::Frame(_)) => {}
                Ok(Event::Wait) => break,
                Err(e) => {
                    let _ = local.shutdown(std::net::Shutdown::Both);
                    return Err(e);
                }
            }
        }
        while taken < to_local.len() {
            match local.write(&to_local[taken..]) {
                Ok(n) => taken += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if taken == to_local.len() {
            to_local.clear();
            taken = 0;
        } else if taken >= (1 << 20) && taken * 2 >= to_local.len() {
            to_local.drain(..taken);
            taken = 0;
        }
    }
}

/// The other node ended: hand the local end what is left (bounded), then its end.
fn finish_local(local: &mut UnixStream, rest: &[u8]) {
    let _ = local.set_nonblocking(false);
    let _ = local.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = local.write_all(rest);
    let _ = local.shutdown(std::net::Shutdown::Write);
}
