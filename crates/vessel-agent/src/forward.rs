//! The calling side of a VE request for a VE on another node: find the VE's node (its
//! placement, then its live record for the address; the port is `[cluster] port`),
//! connect with this node's certificate, and carry the request there.
//!
//! * Unary (`logs`, `diff`, `history`, `revert`, `rollback`, `rescue`, `restart`): one
//!   `api` call; the answer is the client's answer.
//! * `export`: a `stream`; the tar is copied to the client's fd as it arrives and is
//!   complete only with the other node's TLS close (a cut stream is an error).
//! * `exec`, `console`: a two-way stream (`vessel_peer::duplex` frames). Without a tty
//!   the client's three fds are relayed (stdin read here, `Eof` at its end; outputs
//!   written here, `Hangup` when their reader is gone); with `-t` this node makes a pty,
//!   hands its master to the client as a local exec does, relays its slave (raw mode) and
//!   sends the client's window size when it changes (checked every 200 ms). A console
//!   gets one end of a socket pair; closing it (detach) ends the stream.
//!
//! Every wait is bounded: connect and handshake 5 s, unary calls by their kind, a
//! stream's reads 60 s each (export) or TCP keep-alive (exec, console, which may idle).

use crate::clientout::ClientOut;
use crate::node::{err, internal, NResult, Node};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vessel_api::frame::write_frame;
use vessel_cluster::keys;
use vessel_peer::ca::ClusterFiles;
use vessel_peer::channel::poll;
use vessel_peer::duplex::{Output, MAX_PAYLOAD};
use vessel_peer::{Channel, Event, Frame, PeerClient, PeerError, PeerRequest, PeerResponse, StreamRequest};
use vessel_types::api::{ErrorCode, NodeRecord, Request, Response};
use vessel_types::Name;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Each read of an export waits at most this.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Stop reading the client's input while this much waits for the other node.
const IN_LIMIT: usize = 256 << 10;

/// A VE's node, as this node reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node: String,
    pub addr: SocketAddr,
}

/// Where node `node` listens for other nodes, from its live record (`None`: no record,
/// its lease expired). `address` is an IP (the port is the cluster's), or IP:port.
pub fn target(node: &str, record: Option<&NodeRecord>, port: u16) -> Result<Target, String> {
    let r = record.ok_or_else(|| {
        format!("node {node} is lost (its record in the cluster expired: the daemon is down or cut off)")
    })?;
    let addr = match (r.address.parse::<SocketAddr>(), r.address.parse::<IpAddr>()) {
        (Ok(a), _) => a,
        (_, Ok(ip)) => SocketAddr::new(ip, port),
        _ => {
            return Err(format!(
                "node {node} has no address other nodes can reach ({:?}): set `[cluster] address` in its node config",
                r.address
            ))
        }
    };
    if addr.ip().is_unspecified() {
        return Err(format!(
            "node {node} records the address {addr}, which no node can reach"
        ));
    }
    Ok(Target {
        node: node.to_string(),
        addr,
    })
}

/// How long a forwarded unary call may take.
pub fn call_timeout(req: &Request) -> Duration {
    match req {
        Request::VeRestart { timeout_secs, .. } => Duration::from_secs(timeout_secs.saturating_add(120)),
        Request::VeRevert { .. } | Request::VeRollback { .. } | Request::VeRescue { .. } => Duration::from_secs(600),
        _ => Duration::from_secs(300),
    }
}

fn unreachable(t: &Target, e: impl std::fmt::Display) -> vessel_types::api::ApiError {
    err(
        ErrorCode::Unavailable,
        format!("node {} ({}) does not answer: {e}", t.node, t.addr),
    )
}

fn peer_err(t: &Target, e: PeerError) -> vessel_types::api::ApiError {
    match e {
        PeerError::Api(e) => e,
        e => unreachable(t, e),
    }
}

/// A client to node `t` with the certificate of the node whose root is `root`;
/// `timeout` bounds the connect and handshake (and, for `PeerClient`, each read and
/// write after).
pub(crate) fn peer_client_at(root: &std::path::Path, t: &Target, timeout: Duration) -> NResult<PeerClient> {
    let files = ClusterFiles::new(root);
    if !files.initialized() {
        return Err(err(
            ErrorCode::Unavailable,
            format!(
                "VE is on node {}, and this node has no node-to-node transport (no cluster certificate): run the command on node {}",
                t.node, t.node
            ),
        ));
    }
    let ca = files
        .load_ca_cert()
        .map_err(|e| internal("the cluster CA certificate", e))?;
    let me = files.load_node().map_err(|e| internal("this node's certificate", e))?;
    let tls = vessel_peer::tls::client_config(&ca, &me).map_err(|e| internal("TLS", e))?;
    PeerClient::connect_node(t.addr, tls, timeout).map_err(|e| unreachable(t, e))
}

impl Node {
    /// Where VE `name`, placed on `node`, is reached.
    pub fn target_of(&self, node: &str) -> NResult<Target> {
        let m = self
            .cluster
            .get()
            .ok_or_else(|| err(ErrorCode::Unavailable, "this node is not in a cluster"))?;
        let rec: Option<NodeRecord> = m
            .block_on(m.store().get(&keys::node(node)))
            .map_err(|e| err(ErrorCode::Unavailable, format!("the cluster's control store: {e}")))?;
        target(node, rec.as_ref(), self.opts.settings.cluster.port).map_err(|e| err(ErrorCode::Unavailable, e))
    }

    fn connect_peer(&self, t: &Target) -> NResult<PeerClient> {
        self.peer_client(t, CONNECT_TIMEOUT)
    }

    /// A client to node `t` with this node's certificate; `timeout` bounds the connect
    /// and handshake (and, for `PeerClient`, each read and write after).
    pub(crate) fn peer_client(&self, t: &Target, timeout: Duration) -> NResult<PeerClient> {
        peer_client_at(&self.opts.root, t, timeout)
    }

    /// Carry a request for a VE on node `to` there; answers as the local dispatch does
    /// (`None`: the reply was written already).
    pub fn forward(&self, conn: &UnixStream, to: &str, req: Request, fds: Vec<OwnedFd>) -> NResult<Option<Response>> {
        let t = self.target_of(to)?;
        tracing::debug!(node = %t.node, addr = %t.addr, "forwarding a VE request");
        match req {
            Request::VeExec {
                name,
                argv,
                tty,
                env,
                cwd,
            } => {
                self.forward_exec(conn, &t, name, argv, tty, env, cwd, fds)?;
                Ok(None)
            }
            Request::VeConsole { name } => {
                self.forward_console(conn, &t, &name)?;
                Ok(None)
            }
            Request::VeExport { name } => {
                let fd = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| err(ErrorCode::InvalidArgument, "export needs the output as an fd"))?;
                self.forward_export(conn, &t, &name, fd)?;
                Ok(Some(Response::Ok))
            }
            req => self.forward_call(&t, req).map(Some),
        }
    }

    fn forward_call(&self, t: &Target, req: Request) -> NResult<Response> {
        let mut c = self.connect_peer(t)?;
        c.set_timeout(call_timeout(&req));
        match c.call(&PeerRequest::Api(Box::new(req))) {
            Ok(PeerResponse::Api(Response::Error(e))) => Err(e),
            Ok(PeerResponse::Api(r)) => Ok(r),
            Ok(r) => Err(internal(
                &format!("node {}", t.node),
                format!("unexpected answer {r:?}"),
            )),
            Err(e) => Err(peer_err(t, e)),
        }
    }

    fn forward_export(&self, conn: &UnixStream, t: &Target, name: &Name, fd: OwnedFd) -> NResult<()> {
        let mut c = self.connect_peer(t)?;
        c.set_timeout(STREAM_READ_TIMEOUT);
        let mut s = c
            .call_stream(&PeerRequest::Stream(StreamRequest::Export { name: name.to_string() }))
            .map_err(|e| peer_err(t, e))?;
        let mut out = ClientOut::new(fd, conn.as_raw_fd());
        let mut buf = vec![0u8; 256 << 10];
        let mut total: u64 = 0;
        loop {
            let n = s.read(&mut buf).map_err(|e| {
                err(
                    ErrorCode::Unavailable,
                    format!(
                        "the export of VE '{name}' from node {} ({}) was cut after {total} bytes ({e}): the output is incomplete; export again",
                        t.node, t.addr
                    ),
                )
            })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| internal("export output", e))?;
            total += n as u64;
        }
        out.flush().map_err(|e| internal("export output", e))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_exec(
        &self,
        conn: &UnixStream,
        t: &Target,
        name: Name,
        argv: Vec<String>,
        tty: bool,
        env: Vec<String>,
        cwd: Option<String>,
        fds: Vec<OwnedFd>,
    ) -> NResult<()> {
        let stdio = crate::interactive::exec_stdio(tty, fds)?;
        let req = PeerRequest::Stream(StreamRequest::Exec {
            name: name.to_string(),
            argv,
            tty,
            env,
            cwd,
        });
        let mut ch = self.connect_peer(t)?.call_duplex(&req).map_err(|e| peer_err(t, e))?;
        let end = match stdio {
            Some([i, o, e]) => {
                write_frame(conn.as_raw_fd(), &Response::ExecStarted, &[]).map_err(|e| internal("exec", e))?;
                let mut l = Local::new(
                    Some(i.as_raw_fd()),
                    o.as_raw_fd(),
                    Some(e.as_raw_fd()),
                    conn.as_raw_fd(),
                );
                l.relay(&mut ch)
            }
            None => {
                let pty = nix::pty::openpty(None, None).map_err(|e| internal("a terminal for exec", e))?;
                raw_mode(&pty.slave).map_err(|e| internal("a terminal for exec", e))?;
                crate::peer_session::nonblocking(pty.slave.as_raw_fd())
                    .map_err(|e| internal("a terminal for exec", e))?;
                write_frame(conn.as_raw_fd(), &Response::ExecStarted, &[pty.master.as_raw_fd()])
                    .map_err(|e| internal("exec", e))?;
                drop(pty.master);
                let s = pty.slave.as_raw_fd();
                let mut l = Local::new(Some(s), s, None, conn.as_raw_fd());
                l.pty = Some(s);
                let r = l.relay(&mut ch);
                // The client's relay ends when the slave closes, then it reads `Exit`.
                drop(pty.slave);
                r
            }
        };
        let code = match end {
            End::Exit(code) => code,
            End::Error(m) => {
                return Err(err(
                    ErrorCode::Internal,
                    format!("exec in VE '{name}' on node {}: {m}", t.node),
                ))
            }
            End::Closed => {
                return Err(err(
                    ErrorCode::Unavailable,
                    format!("node {} ended the exec in VE '{name}' without its exit code", t.node),
                ))
            }
            End::ClientGone => return Ok(()),
            End::Cut(why) => {
                return Err(err(
                    ErrorCode::Unavailable,
                    format!(
                        "the exec in VE '{name}' on node {} ({}) was cut ({why}): its output may be incomplete and its exit code is unknown",
                        t.node, t.addr
                    ),
                ))
            }
        };
        let _ = ch.finish(Duration::from_secs(5));
        let _ = write_frame(conn.as_raw_fd(), &Response::Exit { code }, &[]);
        Ok(())
    }

    fn forward_console(&self, conn: &UnixStream, t: &Target, name: &Name) -> NResult<()> {
        let req = PeerRequest::Stream(StreamRequest::Console { name: name.to_string() });
        let mut ch = self.connect_peer(t)?.call_duplex(&req).map_err(|e| peer_err(t, e))?;
        let (client_end, ours) = UnixStream::pair().map_err(|e| internal("console", e))?;
        ours.set_nonblocking(true).map_err(|e| internal("console", e))?;
        write_frame(conn.as_raw_fd(), &Response::ConsoleAttached, &[client_end.as_raw_fd()])
            .map_err(|e| internal("console", e))?;
        drop(client_end);
        let mut l = Local::new(Some(ours.as_raw_fd()), ours.as_raw_fd(), None, conn.as_raw_fd());
        l.console = true;
        match l.relay(&mut ch) {
            End::ClientGone => {
                // A detach: end the stream cleanly.
                let _ = ch.finish(Duration::from_secs(5));
            }
            End::Cut(why) => tracing::info!(ve = %name, node = %t.node, "console stream cut: {why}"),
            _ => {}
        }
        Ok(())
    }
}

fn raw_mode(fd: &OwnedFd) -> nix::Result<()> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let mut t = tcgetattr(fd)?;
    cfmakeraw(&mut t);
    tcsetattr(fd, SetArg::TCSANOW, &t)
}

fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes one winsize into a live local.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) == 0).then_some((ws.ws_row, ws.ws_col))
    }
}

/// How a relay ended.
#[derive(Debug)]
enum End {
    Exit(i32),
    Error(String),
    /// The other node closed without an exit (a console's end).
    Closed,
    /// The client hung up (or detached its console).
    ClientGone,
    Cut(String),
}

/// The client's side of a relay (fds borrowed from their owners for its duration).
struct Local {
    /// Read and sent as `Stdin` until it ends.
    input: Option<RawFd>,
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
    /// The client's API connection: its hang-up ends the relay.
    conn: RawFd,
    /// The local pty's slave, whose size is sent on change.
    pty: Option<RawFd>,
    /// The input's end is a detach, not an `Eof`.
    console: bool,
    size: (u16, u16),
}

enum Wrote {
    Done,
    /// Nobody reads that output any more.
    Pipe,
    ClientGone,
}

impl Local {
    fn new(input: Option<RawFd>, stdout: RawFd, stderr: Option<RawFd>, conn: RawFd) -> Local {
        Local {
            input,
            stdout: Some(stdout),
            stderr,
            conn,
            pty: None,
            console: false,
            size: (0, 0),
        }
    }

    /// Write all of `data` to the client's fd, waiting for it to take bytes (or for the
    /// client to hang up) without setting anything on the client's own file description.
    fn write_out(&self, fd: RawFd, mut data: &[u8]) -> Wrote {
        while !data.is_empty() {
            // SAFETY: `data` is a live buffer of that length; the fd is open for the relay.
            let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                data = &data[n as usize..];
                continue;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => {}
                std::io::ErrorKind::WouldBlock => {
                    let mut p = [
                        libc::pollfd {
                            fd,
                            events: libc::POLLOUT,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: self.conn,
                            events: libc::POLLRDHUP,
                            revents: 0,
                        },
                    ];
                    if poll(&mut p, -1).is_err() || p[1].revents != 0 {
                        return Wrote::ClientGone;
                    }
                }
                _ => return Wrote::Pipe,
            }
        }
        Wrote::Done
    }

    fn relay(&mut self, ch: &mut Channel) -> End {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            loop {
                let ev = match ch.event() {
                    Ok(ev) => ev,
                    Err(e) => return End::Cut(e.to_string()),
                };
                let (fd, which, data) = match ev {
                    Event::Frame(Frame::Stdout(d)) => (self.stdout, Output::Stdout, d),
                    Event::Frame(Frame::Stderr(d)) => (self.stderr, Output::Stderr, d),
                    Event::Frame(Frame::Exit(code)) => return End::Exit(code),
                    Event::Frame(Frame::Error(m)) => return End::Error(m),
                    Event::Frame(f) => return End::Cut(format!("the other node sent {f:?}")),
                    Event::Closed => return End::Closed,
                    Event::Wait => break,
                };
                let Some(fd) = fd else { continue };
                match self.write_out(fd, &data) {
                    Wrote::Done => {}
                    Wrote::ClientGone => return End::ClientGone,
                    Wrote::Pipe if self.console || self.pty.is_some() => return End::ClientGone,
                    Wrote::Pipe => {
                        match which {
                            Output::Stdout => self.stdout = None,
                            Output::Stderr => self.stderr = None,
                        }
                        ch.send(&Frame::Hangup(which));
                    }
                }
            }
            if let Some(s) = self.pty {
                if let Some(size) = winsize(s).filter(|z| *z != self.size && *z != (0, 0)) {
                    self.size = size;
                    ch.send(&Frame::Resize {
                        rows: size.0,
                        cols: size.1,
                    });
                }
            }
            let mut fds = vec![
                libc::pollfd {
                    fd: ch.raw_fd(),
                    events: ch.events(),
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.conn,
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            if let (Some(i), true) = (self.input, ch.backlog() < IN_LIMIT) {
                fds.push(libc::pollfd {
                    fd: i,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            let timeout = if self.pty.is_some() { 200 } else { -1 };
            if let Err(e) = poll(&mut fds, timeout) {
                return End::Cut(format!("poll: {e}"));
            }
            if let Err(e) = ch.pump(fds[0].revents) {
                return End::Cut(e.to_string());
            }
            if fds[1].revents != 0 {
                return End::ClientGone;
            }
            if fds.len() > 2 && fds[2].revents != 0 {
                // SAFETY: `buf` is a live buffer of that length; the fd is open for the relay.
                let n = unsafe { libc::read(fds[2].fd, buf.as_mut_ptr().cast(), buf.len()) };
                let e = std::io::Error::last_os_error().kind();
                if n > 0 {
                    ch.send_data(Frame::Stdin, &buf[..n as usize]);
                } else if n < 0 && matches!(e, std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) {
                } else if self.console || self.pty.is_some() {
                    // A detach, or the client closed its terminal.
                    return End::ClientGone;
                } else {
                    self.input = None;
                    ch.send(&Frame::Eof);
                }
            }
            if let Err(e) = ch.pump(0) {
                return End::Cut(e.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(address: &str) -> NodeRecord {
        NodeRecord {
            name: "node2".into(),
            address: address.into(),
            cpus: 1,
            memory: 1,
            disk: 1,
            labels: Default::default(),
            version: "0".into(),
            draining: false,
            since_ns: 0,
        }
    }

    #[test]
    fn a_nodes_address_comes_from_its_live_record() {
        assert_eq!(
            target("node2", Some(&rec("10.160.0.2")), 7150).unwrap().addr,
            "10.160.0.2:7150".parse().unwrap()
        );
        assert_eq!(
            target("node2", Some(&rec("10.160.0.2:7777")), 7150).unwrap().addr,
            "10.160.0.2:7777".parse().unwrap()
        );
        assert_eq!(
            target("node2", Some(&rec("::1")), 7150).unwrap().addr,
            "[::1]:7150".parse().unwrap()
        );
        let lost = target("node2", None, 7150).unwrap_err();
        assert!(lost.contains("node node2 is lost"), "{lost}");
        for bad in ["", "node2.example", "0.0.0.0"] {
            let e = target("node2", Some(&rec(bad)), 7150).unwrap_err();
            assert!(e.contains("node node2"), "{bad}: {e}");
        }
    }

    #[test]
    fn restarts_wait_longer_than_their_stop_timeout() {
        let name = Name::parse("web").unwrap();
        let r = Request::VeRestart {
            name: name.clone(),
            timeout_secs: 600,
        };
        assert!(call_timeout(&r) > Duration::from_secs(600));
        assert!(call_timeout(&Request::VeDiff { name, path: None }) >= Duration::from_secs(60));
    }
}
