//! Send and receive bytes with file descriptors attached (`SCM_RIGHTS`) on Unix sockets.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most fds accepted on one message.
pub const MAX_FDS: usize = 4;

/// Send all of `data` on `sock`; `fds` ride on the first chunk.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut off = 0;
    let mut first = true;
    while off < data.len() || first {
        let iov = [IoSlice::new(&data[off..])];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cm: &[ControlMessage] = if first && !fds.is_empty() { &cmsg } else { &[] };
        let n = loop {
            match sendmsg::<()>(sock, &iov, cm, MsgFlags::MSG_NOSIGNAL, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r.map_err(std::io::Error::from)?,
            }
        };
        off += n;
        first = false;
        if n == 0 && off < data.len() {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// Receive up to `buf.len()` bytes; any fds that arrive are appended to `fds` (they are
/// owned, so they close if the caller drops them). Returns 0 at end of stream.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => continue,
            r => break r.map_err(std::io::Error::from)?,
        }
    };
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed this fd in our table for us.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(msg.bytes)
}
