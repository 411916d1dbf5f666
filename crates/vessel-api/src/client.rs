//! Blocking client of the node API, used by the CLI and the tests.

use crate::frame::{read_frame, write_frame, FrameError};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use vessel_types::api::{ApiError, Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the vessel daemon is not running (no socket at {0}): start it with `vessel up`")]
    NotRunning(String),
    #[error("cannot reach the vessel daemon at {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    /// (Not a `source`: the message already says it.)
    #[error("talking to the daemon: {0}")]
    Frame(FrameError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("unexpected reply from the daemon: {0}")]
    Unexpected(String),
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        ClientError::Frame(e)
    }
}

pub struct Client {
    sock: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        match UnixStream::connect(path) {
            Ok(sock) => Ok(Client { sock }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Err(ClientError::NotRunning(path.display().to_string()))
            }
            Err(source) => Err(ClientError::Connect {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn send(&self, req: &Request, fds: &[RawFd]) -> Result<(), ClientError> {
        match write_frame(self.sock.as_raw_fd(), req, fds) {
            Ok(()) => Ok(()),
            // The daemon may have turned the connection away with a reason (e.g. `busy`)
            // and closed it before reading: that reason is the error to show. The peer is
            // gone, so this read ends at once.
            Err(FrameError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                match read_frame::<Response>(self.sock.as_raw_fd()) {
                    Ok((Response::Error(api), _)) => Err(ClientError::Api(api)),
                    _ => Err(FrameError::Io(e).into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Next reply frame with its fds. An `Error` reply becomes `Err(ClientError::Api)`.
    pub fn recv(&self) -> Result<(Response, Vec<OwnedFd>), ClientError> {
        let (r, fds) = read_frame::<Response>(self.sock.as_raw_fd())?;
        match r {
            Response::Error(e) => Err(ClientError::Api(e)),
            r => Ok((r, fds)),
        }
    }

    /// Send `req` and return the final reply, passing each progress frame to `progress`.
    pub fn call_with_progress(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> Result<Response, ClientError> {
        self.send(req, &[])?;
        loop {
            match self.recv()?.0 {
                Response::Progress { message, done, total } => progress(&message, done, total),
                r => return Ok(r),
            }
        }
    }

    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        self.call_with_progress(req, &mut |_, _, _| {})
    }

    pub fn stream(&self) -> &UnixStream {
        &self.sock
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_types::api::ErrorCode;

    #[test]
    fn a_refusal_sent_before_closing_is_the_error_not_the_broken_pipe() {
        let (a, b) = UnixStream::pair().unwrap();
        let busy = Response::Error(ApiError::new(ErrorCode::Busy, "the vessel daemon is busy"));
        write_frame(b.as_raw_fd(), &busy, &[]).unwrap();
        drop(b);
        let c = Client { sock: a };
        match c.call(&Request::Status) {
            Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::Busy),
            r => panic!("{r:?}"),
        }
    }
}
