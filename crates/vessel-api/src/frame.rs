//! Frames: a 4-byte big-endian length, then JSON `{"v": API_VERSION, "body": ...}`.
//!
//! Reading is bounded: a declared length over the limit is refused before any of the body
//! is read, the body buffer grows only as bytes arrive, at most [`MAX_FDS`] fds ride on one
//! frame, and a reader with a deadline gives up on a peer that stalls mid-frame. The daemon
//! reads requests with [`read_request`] (per-kind limits, see `vessel_types::api`).

use crate::fdpass::{recv_with_fds, send_with_fds, MAX_FDS};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::os::fd::{OwnedFd, RawFd};
use std::time::Instant;
use vessel_types::api::{request_frame_limit, Envelope, Request, API_VERSION, MAX_ANY_REQUEST_FRAME, MAX_FRAME};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    /// (Not a `source`: the message already says it, and error chains would repeat it.)
    #[error("socket: {0}")]
    Io(std::io::Error),
    #[error("{what} of {len} bytes is over the {limit} byte limit")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("more than {MAX_FDS} file descriptors sent with one message")]
    TooManyFds,
    #[error("no complete request within the time limit ({got} bytes received): send each request at once")]
    TimedOut { got: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("peer speaks API version {0}, this side speaks {API_VERSION}: run the same vessel version for daemon and CLI (restart the daemon with `vessel down && vessel up`)")]
    Version(u32),
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        FrameError::Io(e)
    }
}

pub fn write_frame<T: Serialize>(sock: RawFd, body: &T, fds: &[RawFd]) -> Result<(), FrameError> {
    let json = serde_json::to_vec(&Envelope { v: API_VERSION, body }).map_err(|e| FrameError::Decode(e.to_string()))?;
    if json.len() > MAX_FRAME {
        return Err(FrameError::TooLarge {
            what: "message",
            len: json.len(),
            limit: MAX_FRAME,
        });
    }
    let mut buf = Vec::with_capacity(json.len() + 4);
    buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
    buf.extend_from_slice(&json);
    send_with_fds(sock, &buf, fds)?;
    Ok(())
}

/// Wait until `sock` is readable or `deadline` passes (false).
fn wait_readable(sock: RawFd, deadline: Instant) -> Result<bool, FrameError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
    }
}

/// Fill `buf` from the socket. `got` counts bytes of this frame before `buf` (for errors).
fn read_exact(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Option<Instant>,
    got: usize,
) -> Result<(), FrameError> {
    let mut off = 0;
    while off < buf.len() {
        if let Some(d) = deadline {
            if !wait_readable(sock, d)? {
                return Err(FrameError::TimedOut { got: got + off });
            }
        }
        let n = recv_with_fds(sock, &mut buf[off..], fds)?;
        if fds.len() > MAX_FDS {
            fds.clear();
            return Err(FrameError::TooManyFds);
        }
        if n == 0 {
            return Err(FrameError::Closed);
        }
        off += n;
    }
    Ok(())
}

/// Body buffers grow by at most this much per read, so a declared length costs memory only
/// as its bytes arrive.
const READ_CHUNK: usize = 64 << 10;

/// Read one frame's bytes: refuse a declared length over `limit` before reading the body.
fn read_raw(
    sock: RawFd,
    what: &'static str,
    limit: usize,
    deadline: Option<Instant>,
) -> Result<(Vec<u8>, Vec<OwnedFd>), FrameError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact(sock, &mut len, &mut fds, deadline, 0)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { what, len, limit });
    }
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let old = buf.len();
        buf.resize(old + (len - old).min(READ_CHUNK), 0);
        let end = buf.len();
        read_exact(sock, &mut buf[old..end], &mut fds, deadline, 4 + old)?;
    }
    Ok((buf, fds))
}

/// The envelope's version, read without building the body.
fn check_version(buf: &[u8]) -> Result<(), FrameError> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        v: u32,
    }
    let h: Head = serde_json::from_slice(buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    if h.v != API_VERSION {
        return Err(FrameError::Version(h.v));
    }
    Ok(())
}

fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    check_version(buf)?;
    let env: Envelope<T> = serde_json::from_slice(buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok(env.body)
}

/// Read one frame (up to [`MAX_FRAME`]) and the fds that came with it. The client reads
/// the daemon's replies with this.
pub fn read_frame<T: DeserializeOwned>(sock: RawFd) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let (buf, fds) = read_raw(sock, "message", MAX_FRAME, None)?;
    Ok((decode(&buf)?, fds))
}

/// Read one request as the daemon does: a declared length over the largest request
/// ([`MAX_ANY_REQUEST_FRAME`]) is refused unread; the op is then peeked without building
/// anything and its own limit applied before the full decode. The whole frame must
/// arrive before `deadline`.
pub fn read_request(sock: RawFd, deadline: Option<Instant>) -> Result<(Request, Vec<OwnedFd>), FrameError> {
    let (buf, fds) = read_raw(sock, "request", MAX_ANY_REQUEST_FRAME, deadline)?;
    check_version(&buf)?;
    #[derive(Deserialize)]
    struct Op {
        op: String,
    }
    #[derive(Deserialize)]
    struct Peek {
        body: Op,
    }
    let peek: Peek = serde_json::from_slice(&buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    let limit = request_frame_limit(&peek.body.op);
    if buf.len() > limit {
        return Err(FrameError::TooLarge {
            what: "request",
            len: buf.len(),
            limit,
        });
    }
    Ok((decode(&buf)?, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use vessel_types::api::{Request, Response};

    #[test]
    fn round_trip_with_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        write_frame(a.as_raw_fd(), &Request::Status, &[f.as_raw_fd()]).unwrap();
        let (r, fds): (Request, _) = read_frame(b.as_raw_fd()).unwrap();
        assert!(matches!(r, Request::Status));
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn rejects_garbage_and_versions() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(a.as_raw_fd(), &[0, 0, 0, 3, b'x', b'y', b'z'], &[]).unwrap();
        assert!(matches!(
            read_frame::<Request>(b.as_raw_fd()),
            Err(FrameError::Decode(_))
        ));
        let body = br#"{"v":99,"body":{"type":"ok"}}"#;
        let mut m = (body.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        send_with_fds(a.as_raw_fd(), &m, &[]).unwrap();
        assert!(matches!(
            read_frame::<Response>(b.as_raw_fd()),
            Err(FrameError::Version(99))
        ));
        send_with_fds(a.as_raw_fd(), &u32::MAX.to_be_bytes(), &[]).unwrap();
        assert!(matches!(
            read_frame::<Response>(b.as_raw_fd()),
            Err(FrameError::TooLarge { .. })
        ));
        drop(a);
        assert!(matches!(read_frame::<Response>(b.as_raw_fd()), Err(FrameError::Closed)));
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut m = (body.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    /// A request whose body is padded to `len` bytes with spaces (valid JSON whitespace).
    fn padded(json: &str, len: usize) -> Vec<u8> {
        let mut b = json.as_bytes().to_vec();
        b.resize(len.max(b.len()), b' ');
        frame(&b)
    }

    #[test]
    fn requests_over_the_limit_are_refused_before_the_body_is_read() {
        let (a, b) = UnixStream::pair().unwrap();
        // Announce 16 MiB and send only the header: refused at once, nothing waited for.
        send_with_fds(a.as_raw_fd(), &(16u32 << 20).to_be_bytes(), &[]).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        match read_request(b.as_raw_fd(), Some(deadline)) {
            Err(FrameError::TooLarge { len, limit, .. }) => {
                assert_eq!((len, limit), (16 << 20, MAX_ANY_REQUEST_FRAME))
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn per_kind_limits() {
        use vessel_types::api::{MAX_EXEC_FRAME, MAX_REQUEST_FRAME};
        let status = r#"{"v":1,"body":{"op":"status"}}"#;
        let exec = r#"{"v":1,"body":{"op":"ve-exec","name":"a","argv":["x"]}}"#;
        let cases = [
            (status, MAX_REQUEST_FRAME, true),
            (status, MAX_REQUEST_FRAME + 1, false),
            (exec, MAX_REQUEST_FRAME + 1, true),
            (exec, MAX_EXEC_FRAME, true),
            (exec, MAX_EXEC_FRAME + 1, false),
        ];
        for (json, len, ok) in cases {
            let (a, b) = UnixStream::pair().unwrap();
            let m = padded(json, len);
            let w = std::thread::spawn(move || send_with_fds(a.as_raw_fd(), &m, &[]));
            let r = read_request(b.as_raw_fd(), None);
            // A refused frame is not read to its end: closing lets the writer finish.
            drop(b);
            let _ = w.join().unwrap();
            match (ok, r) {
                (true, Ok(_)) => {}
                (false, Err(FrameError::TooLarge { .. })) => {}
                (ok, r) => panic!("{json} padded to {len}: want ok={ok}, got {r:?}"),
            }
        }
    }

    #[test]
    fn a_stalled_peer_times_out_with_what_it_sent() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = frame(br#"{"v":1,"body":{"op":"status"}}"#);
        send_with_fds(a.as_raw_fd(), &m[..10], &[]).unwrap();
        // The peer never sends the rest: any deadline passes with 10 bytes read.
        let soon = Instant::now() + std::time::Duration::from_millis(100);
        let r = read_request(b.as_raw_fd(), Some(soon));
        assert!(matches!(r, Err(FrameError::TimedOut { got: 10 })), "{r:?}");
        // Idle (nothing of a frame yet) is told apart by got = 0.
        let (_a2, b2) = UnixStream::pair().unwrap();
        let r = read_request(b2.as_raw_fd(), Some(Instant::now()));
        assert!(matches!(r, Err(FrameError::TimedOut { got: 0 })), "{r:?}");
    }

    #[test]
    fn too_many_fds_on_one_frame_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let m = frame(br#"{"v":1,"body":{"op":"status"}}"#);
        // Two messages of the same frame, 3 fds each.
        let fds = [f.as_raw_fd(); 3];
        send_with_fds(a.as_raw_fd(), &m[..6], &fds).unwrap();
        send_with_fds(a.as_raw_fd(), &m[6..], &fds).unwrap();
        let r = read_request(b.as_raw_fd(), None);
        assert!(matches!(r, Err(FrameError::TooManyFds)), "{r:?}");
    }

    #[test]
    fn version_is_checked_before_the_body_is_decoded() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = frame(br#"{"v":2,"body":{"op":"from-the-future","x":[1,2,3]}}"#);
        send_with_fds(a.as_raw_fd(), &m, &[]).unwrap();
        assert!(matches!(read_request(b.as_raw_fd(), None), Err(FrameError::Version(2))));
    }
}
