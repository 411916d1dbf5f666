//! The peer server: an accept thread on the node's peer address, one thread per
//! connection (at most `max_connections`; more are closed at once), every read bounded by
//! a deadline (the TLS handshake and each request frame must arrive within
//! `request_timeout`; an idle connection is closed after it).
//!
//! Requests are checked one by one: only `Join` is served to a client without a verified
//! cluster certificate; every other request from one gets an error frame and nothing else.
//! The daemon supplies what the requests do through [`PeerHandler`].

use crate::channel::Channel;
use crate::timed::TimedSock;
use crate::wire::{
    read_frame, write_frame, JoinReply, JoinRequest, PeerRequest, PeerResponse, StreamRequest, WireError, MAX_REQUEST,
    MAX_RESPONSE,
};
use rustls::{Connection, ServerConfig, ServerConnection, StreamOwned};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vessel_types::api::{ApiError, ErrorCode, Request, Response};

/// The node at the other end, as its verified certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub node: String,
    /// The hex SHA-256 of its certificate (what revocation names).
    pub cert_sha256: String,
}

/// What a node does for its peers.
pub trait PeerHandler: Send + Sync + 'static {
    /// A new node asks to join (the caller has no certificate yet; the token decides).
    fn join(&self, from: SocketAddr, req: JoinRequest) -> Result<JoinReply, ApiError>;
    /// A local API request from a node of the cluster.
    fn api(&self, peer: &PeerIdentity, req: Request) -> Response;
    /// Bytes for a node of the cluster: the length if known, and the bytes.
    fn stream(&self, peer: &PeerIdentity, req: StreamRequest) -> Result<(Option<u64>, Box<dyn Read + Send>), ApiError>;
    /// Whether a node with a certificate of this cluster is still served (its certificate
    /// may have been revoked when the node was removed). Asked once per connection.
    fn allowed(&self, _peer: &PeerIdentity) -> Result<(), ApiError> {
        Ok(())
    }
    /// A two-way stream ([`StreamRequest::is_duplex`]) for a node of the cluster: checked
    /// and started here (an error is the answer), run on the channel after the answer.
    fn duplex(&self, _peer: &PeerIdentity, _req: StreamRequest) -> Result<Box<dyn DuplexSession>, ApiError> {
        Err(ApiError::new(
            ErrorCode::InvalidArgument,
            "this node serves no two-way streams",
        ))
    }
}

/// A two-way session a node runs for another (exec, console); it owns the connection.
pub trait DuplexSession: Send {
    fn run(self: Box<Self>, ch: Channel);
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// This node's name (the answer to a ping).
    pub node: String,
    pub max_connections: usize,
    pub request_timeout: Duration,
}

/// A running peer server; stopped when dropped.
pub struct PeerServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    /// Serve on `listener` until stopped.
    pub fn start(
        listener: TcpListener,
        tls: Arc<ServerConfig>,
        handler: Arc<dyn PeerHandler>,
        opts: ServerOptions,
    ) -> std::io::Result<PeerServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vessel-peer".into())
            .spawn(move || accept_loop(listener, tls, handler, opts, s))?;
        Ok(PeerServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    handler: Arc<dyn PeerHandler>,
    opts: ServerOptions,
    stop: Arc<AtomicBool>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (sock, from) = match conn.and_then(|s| Ok((s.peer_addr()?, s))) {
            Ok((from, s)) => (s, from),
            Err(e) => {
                tracing::warn!("peer accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let max = opts.max_connections;
        if active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .is_err()
        {
            tracing::warn!(%from, "peer connection refused: {max} connections are served already");
            continue;
        }
        let slot = Slot(active.clone());
        let (tls, handler, opts) = (tls.clone(), handler.clone(), opts.clone());
        let spawned = std::thread::Builder::new()
            .name("vessel-peer-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve_conn(sock, from, tls, &*handler, &opts) {
                    tracing::debug!(%from, "peer connection: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread for a peer connection: {e}");
        }
    }
}

fn denied() -> PeerResponse {
    PeerResponse::Error(ApiError::new(
        ErrorCode::PermissionDenied,
        "this call needs a node certificate of this cluster (only a join is served without one)",
    ))
}

fn serve_conn(
    tcp: TcpStream,
    from: SocketAddr,
    tls: Arc<ServerConfig>,
    handler: &dyn PeerHandler,
    opts: &ServerOptions,
) -> Result<(), WireError> {
    tcp.set_nodelay(true)?;
    tcp.set_write_timeout(Some(opts.request_timeout))?;
    let mut sock = TimedSock::new(tcp);
    sock.deadline = Some(Instant::now() + opts.request_timeout);
    let conn = ServerConnection::new(tls).map_err(|e| WireError::Io(std::io::Error::other(e)))?;
    let mut s = StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    let peer = s
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerIdentity {
            node: crate::ca::dns_names(c).into_iter().next().unwrap_or_default(),
            cert_sha256: crate::ca::fingerprint_der(c),
        });
    // A revoked certificate is served like none, with the reason.
    let refused = peer.as_ref().and_then(|p| handler.allowed(p).err());
    let peer = if refused.is_some() { None } else { peer };
    loop {
        s.sock.deadline = Some(Instant::now() + opts.request_timeout);
        let req: PeerRequest = match read_frame(&mut s, "request", MAX_REQUEST) {
            Ok(r) => r,
            Err(WireError::Closed | WireError::Io(_)) => return Ok(()),
            Err(e) => {
                let code = match e {
                    WireError::Version(_) => ErrorCode::VersionMismatch,
                    _ => ErrorCode::InvalidArgument,
                };
                let _ = write_frame(
                    &mut s,
                    &PeerResponse::Error(ApiError::new(code, e.to_string())),
                    MAX_RESPONSE,
                );
                close(&mut s);
                return Err(e);
            }
        };
        s.sock.deadline = None;
        let reply = match (req, &peer) {
            (PeerRequest::Join(j), _) => match handler.join(from, j) {
                Ok(r) => PeerResponse::Joined(r),
                Err(e) => PeerResponse::Error(e),
            },
            (_, None) => refused.clone().map_or_else(denied, PeerResponse::Error),
            (PeerRequest::Ping, Some(_)) => PeerResponse::Pong {
                node: opts.node.clone(),
            },
            (PeerRequest::Api(r), Some(p)) => PeerResponse::Api(handler.api(p, *r)),
            (PeerRequest::Stream(r), Some(p)) if r.is_duplex() => match handler.duplex(p, r) {
                Ok(session) => {
                    write_frame(&mut s, &PeerResponse::Stream { len: None }, MAX_RESPONSE)?;
                    let StreamOwned { conn, sock } = s;
                    let ch = Channel::new(Connection::Server(conn), sock.tcp)
                        .map_err(|e| WireError::Io(std::io::Error::other(e)))?;
                    session.run(ch);
                    return Ok(());
                }
                Err(e) => PeerResponse::Error(e),
            },
            (PeerRequest::Stream(r), Some(p)) => match handler.stream(p, r) {
                Ok((len, mut body)) => {
                    write_frame(&mut s, &PeerResponse::Stream { len }, MAX_RESPONSE)?;
                    std::io::copy(&mut body, &mut s)?;
                    s.flush()?;
                    close(&mut s);
                    return Ok(());
                }
                Err(e) => PeerResponse::Error(e),
            },
        };
        let reply = match write_frame(&mut s, &reply, MAX_RESPONSE) {
            Err(WireError::TooLarge { len, limit, .. }) => PeerResponse::Error(ApiError::new(
                ErrorCode::Internal,
                format!("the answer of {len} bytes is over the {limit} byte limit of the node-to-node wire"),
            )),
            r => {
                r?;
                continue;
            }
        };
        write_frame(&mut s, &reply, MAX_RESPONSE)?;
    }
}

/// End the TLS session cleanly (the reader then knows it got everything).
fn close(s: &mut StreamOwned<ServerConnection, TimedSock>) {
    s.conn.send_close_notify();
    let _ = s.conn.complete_io(&mut s.sock);
    let _ = s.sock.tcp.shutdown(std::net::Shutdown::Write);
}
