//! Frames: a 4-byte big-endian length, then JSON `{"v": API_VERSION, "body": ...}`.

use crate::fdpass::{recv_with_fds, send_with_fds};
use serde::{de::DeserializeOwned, Serialize};
use std::os::fd::{OwnedFd, RawFd};
use vessel_types::api::{Envelope, API_VERSION, MAX_FRAME};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("peer speaks API version {0}, this side speaks {API_VERSION}: run the same vessel version for daemon and CLI (restart the daemon with `vessel down && vessel up`)")]
    Version(u32),
}

pub fn write_frame<T: Serialize>(sock: RawFd, body: &T, fds: &[RawFd]) -> Result<(), FrameError> {
    let json = serde_json::to_vec(&Envelope { v: API_VERSION, body }).map_err(|e| FrameError::Decode(e.to_string()))?;
    if json.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(json.len()));
    }
    let mut buf = Vec::with_capacity(json.len() + 4);
    buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
    buf.extend_from_slice(&json);
    send_with_fds(sock, &buf, fds)?;
    Ok(())
}

fn read_exact(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), FrameError> {
    let mut off = 0;
    while off < buf.len() {
        let n = recv_with_fds(sock, &mut buf[off..], fds)?;
        if n == 0 {
            return Err(FrameError::Closed);
        }
        off += n;
    }
    Ok(())
}

/// Read one frame and the fds that came with it.
pub fn read_frame<T: DeserializeOwned>(sock: RawFd) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    read_exact(sock, &mut len, &mut fds)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    read_exact(sock, &mut buf, &mut fds)?;
    let v: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| FrameError::Decode(e.to_string()))?;
    let ver = v.get("v").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if ver != API_VERSION {
        return Err(FrameError::Version(ver));
    }
    let env: Envelope<T> = serde_json::from_value(v).map_err(|e| FrameError::Decode(e.to_string()))?;
    Ok((env.body, fds))
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
            Err(FrameError::TooLarge(_))
        ));
        drop(a);
        assert!(matches!(read_frame::<Response>(b.as_raw_fd()), Err(FrameError::Closed)));
    }
}
