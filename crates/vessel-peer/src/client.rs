//! The peer client: one TLS connection to another node, unary calls on it, or one
//! streamed answer that ends the connection. Every call is bounded by the timeout given
//! at connect (the handshake too); a stream's reads by the same timeout each.

use crate::channel::Channel;
use crate::timed::TimedSock;
use crate::wire::{read_frame, write_frame, PeerRequest, PeerResponse, WireError, MAX_REQUEST, MAX_RESPONSE};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, StreamOwned};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vessel_types::api::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach node {addr}: {error}; check that its daemon runs and the address and port are right")]
    Connect { addr: SocketAddr, error: std::io::Error },
    #[error("node {addr}: TLS: {error}")]
    Tls { addr: SocketAddr, error: String },
    #[error("node {addr}: {error}")]
    Wire { addr: SocketAddr, error: WireError },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("node {addr} answered unexpectedly: {what}")]
    Unexpected { addr: SocketAddr, what: String },
}

pub struct PeerClient {
    addr: SocketAddr,
    timeout: Duration,
    s: StreamOwned<ClientConnection, TimedSock>,
}

/// The TLS error behind an io error, if rustls gave one (a refused certificate).
fn tls_text(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .map(|t| t.to_string())
}

impl PeerClient {
    /// Connect and complete the handshake. `name`: what the server's certificate must
    /// name (its address for nodes).
    pub fn connect(
        addr: SocketAddr,
        name: ServerName<'static>,
        tls: Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<PeerClient, PeerError> {
        let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|error| PeerError::Connect { addr, error })?;
        let io = |error: std::io::Error| match tls_text(&error) {
            Some(t) => PeerError::Tls { addr, error: t },
            None => PeerError::Wire {
                addr,
                error: error.into(),
            },
        };
        tcp.set_nodelay(true).map_err(io)?;
        tcp.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut sock = TimedSock::new(tcp);
        sock.deadline = Some(Instant::now() + timeout);
        let conn = ClientConnection::new(tls, name).map_err(|e| PeerError::Tls {
            addr,
            error: e.to_string(),
        })?;
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(io)?;
        }
        Ok(PeerClient { addr, timeout, s })
    }

    /// A client for `addr` whose certificate names that address (node to node).
    pub fn connect_node(addr: SocketAddr, tls: Arc<ClientConfig>, timeout: Duration) -> Result<PeerClient, PeerError> {
        Self::connect(addr, ServerName::IpAddress(addr.ip().into()), tls, timeout)
    }

    fn wire(&self, error: WireError) -> PeerError {
        match &error {
            WireError::Io(e) => match tls_text(e) {
                Some(t) => PeerError::Tls {
                    addr: self.addr,
                    error: t,
                },
                None => PeerError::Wire { addr: self.addr, error },
            },
            _ => PeerError::Wire { addr: self.addr, error },
        }
    }

    fn send(&mut self, req: &PeerRequest) -> Result<PeerResponse, PeerError> {
        self.s.sock.deadline = Some(Instant::now() + self.timeout);
        write_frame(&mut self.s, req, MAX_REQUEST).map_err(|e| self.wire(e))?;
        let r = read_frame(&mut self.s, "response", MAX_RESPONSE).map_err(|e| self.wire(e))?;
        match r {
            PeerResponse::Error(e) => Err(PeerError::Api(e)),
            r => Ok(r),
        }
    }

    /// Send raw bytes inside the TLS session and read one answer frame (an `Error` frame
    /// included): for tests of how a node meets bad frames.
    #[doc(hidden)]
    pub fn raw_call(&mut self, bytes: &[u8]) -> Result<PeerResponse, PeerError> {
        use std::io::Write;
        self.s.sock.deadline = Some(Instant::now() + self.timeout);
        self.s
            .write_all(bytes)
            .and_then(|_| self.s.flush())
            .map_err(|e| self.wire(e.into()))?;
        read_frame(&mut self.s, "response", MAX_RESPONSE).map_err(|e| self.wire(e))
    }

    /// One request, one answer (an `Error` answer is `Err(PeerError::Api)`).
    pub fn call(&mut self, req: &PeerRequest) -> Result<PeerResponse, PeerError> {
        match self.send(req)? {
            PeerResponse::Stream { .. } => Err(PeerError::Unexpected {
                addr: self.addr,
                what: "a stream for a unary call".into(),
            }),
            r => Ok(r),
        }
    }

    /// A request answered with a stream of bytes; reading it gives them and ends at the
    /// server's TLS close (a connection cut before is an error, not an end).
    pub fn call_stream(mut self, req: &PeerRequest) -> Result<PeerStream, PeerError> {
        match self.send(req)? {
            PeerResponse::Stream { len } => Ok(PeerStream { len, c: self }),
            r => Err(PeerError::Unexpected {
                addr: self.addr,
                what: format!("{r:?} instead of a stream"),
            }),
        }
    }
}

impl PeerClient {
    /// The bound for each later call (and each read of a stream).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A two-way stream (`StreamRequest::Exec`, `Console`): after the answer, frames of
    /// [`crate::duplex`] both ways over the returned channel.
    pub fn call_duplex(mut self, req: &PeerRequest) -> Result<Channel, PeerError> {
        match self.send(req)? {
            PeerResponse::Stream { .. } => {
                let StreamOwned { conn, sock } = self.s;
                Channel::new(Connection::Client(conn), sock.tcp).map_err(|e| PeerError::Unexpected {
                    addr: self.addr,
                    what: e.to_string(),
                })
            }
            r => Err(PeerError::Unexpected {
                addr: self.addr,
                what: format!("{r:?} instead of a stream"),
            }),
        }
    }
}

pub struct PeerStream {
    /// The length the server announced, if it knew it.
    pub len: Option<u64>,
    c: PeerClient,
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // Each read waits at most the call's timeout.
        self.c.s.sock.deadline = Some(Instant::now() + self.c.timeout);
        self.c.s.read(buf)
    }
}
