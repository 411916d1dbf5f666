//! The node's side of the node-to-node transport (`vessel-peer`): `cluster init` (the
//! CA, this node's certificate, the listener), join tokens, admitting joining nodes, and
//! serving other nodes' calls.
//!
//! The node listens on `[cluster] address`:`port` once the cluster is initialized
//! (`ROOT/cluster/ca.crt` exists: after `cluster init` here, or after this node joined).
//! Only a node with the CA key (the one that ran `init`) admits new nodes.

use crate::cluster::Member;
use crate::node::{err, NResult, Node};
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use vessel_cluster::etcd::EtcdTls;
use vessel_cluster::keys::{self, NodeRecord};
use vessel_cluster::store::StoreTls;
use vessel_peer::ca::{self, CertKey, ClusterFiles};
use vessel_peer::token::{self, TokenError};
use vessel_peer::wire::{JoinReply, JoinRequest, StreamRequest};
use vessel_peer::{PeerHandler, PeerIdentity, PeerServer, ServerOptions};
use vessel_types::api::{ApiError, ErrorCode, JoinTokenInfo, Request, Response};
use vessel_types::config::ClusterSettings;

/// Where the private etcd's listener for other nodes is (chosen at `cluster init`).
#[derive(serde::Serialize, serde::Deserialize)]
struct EtcdListener {
    version: u32,
    port: u16,
}

fn etcd_listener_file(root: &Path) -> PathBuf {
    ClusterFiles::new(root).dir.join("etcd.json")
}

/// The private etcd's listener for other nodes, once the cluster is initialized here
/// (`ROOT/cluster/etcd.json`): on `[cluster] address`, with this node's certificate.
pub fn etcd_tls(root: &Path, s: &ClusterSettings) -> Option<EtcdTls> {
    let f = ClusterFiles::new(root);
    let l: EtcdListener = serde_json::from_slice(&std::fs::read(etcd_listener_file(root)).ok()?).ok()?;
    (l.version == 1 && f.initialized()).then(|| EtcdTls {
        addr: s.peer_address(),
        port: l.port,
        cert_file: f.node_cert(),
        key_file: f.node_key(),
        ca_file: f.ca_cert(),
    })
}

/// This node's identity for an etcd that requires client certificates.
pub fn store_tls(root: &Path) -> Option<StoreTls> {
    let f = ClusterFiles::new(root);
    let node = f.load_node().ok()?;
    Some(StoreTls {
        ca_pem: f.load_ca_cert().ok()?,
        cert_pem: node.cert_pem,
        key_pem: node.key_pem,
    })
}

pub struct Peer {
    node: Weak<Node>,
    member: Arc<Member>,
    files: ClusterFiles,
    settings: ClusterSettings,
    server: Mutex<Option<PeerServer>>,
    /// Serialises init (two inits at once must not make two CAs).
    init: Mutex<()>,
}

fn token_err(e: TokenError) -> ApiError {
    let code = match e {
        TokenError::Store(_) => ErrorCode::Unavailable,
        TokenError::Malformed => ErrorCode::InvalidArgument,
        _ => ErrorCode::PermissionDenied,
    };
    err(code, e.to_string())
}

fn ca_err(e: ca::CaError) -> ApiError {
    let code = match e {
        ca::CaError::Refused(_) => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    };
    err(code, e.to_string())
}

impl Peer {
    pub fn new(node: &Arc<Node>, member: Arc<Member>) -> Arc<Peer> {
        Arc::new(Peer {
            node: Arc::downgrade(node),
            member,
            files: ClusterFiles::new(&node.opts.root),
            settings: node.opts.settings.cluster.clone(),
            server: Mutex::new(None),
            init: Mutex::new(()),
        })
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.settings.peer_address(), self.settings.port)
    }

    /// Serve the node-to-node port if the cluster is initialized.
    pub fn start_if_initialized(self: &Arc<Self>) -> Result<(), String> {
        if !self.files.initialized() {
            return Ok(());
        }
        let l = self.bind().map_err(|e| e.message)?;
        self.serve(l).map_err(|e| e.message)
    }

    fn bind(&self) -> NResult<TcpListener> {
        TcpListener::bind(self.addr()).map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!(
                    "cannot listen on {} for other nodes: {e}; set `[cluster] address` and `port` in the node config",
                    self.addr()
                ),
            )
        })
    }

    fn serve(self: &Arc<Self>, l: TcpListener) -> NResult<()> {
        let ca_pem = self.files.load_ca_cert().map_err(ca_err)?;
        let node = self.files.load_node().map_err(ca_err)?;
        let tls =
            vessel_peer::tls::server_config(&ca_pem, &node).map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        let api = self.node.upgrade().map(|n| n.opts.settings.api).unwrap_or_default();
        let opts = ServerOptions {
            node: self.member.name.clone(),
            max_connections: api.max_connections,
            request_timeout: Duration::from_secs(api.request_timeout_secs),
        };
        let handler: Arc<dyn PeerHandler> = self.clone();
        let s = PeerServer::start(l, tls, handler, opts)
            .map_err(|e| err(ErrorCode::Internal, format!("peer server: {e}")))?;
        tracing::info!(addr = %s.addr, "serving other nodes (mutual TLS)");
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
        Ok(())
    }

    /// `vessel cluster init`: the CA, this node's certificate, the listener, a token.
    pub fn init(self: &Arc<Self>, token_ttl: Duration) -> NResult<JoinTokenInfo> {
        let _one = self.init.lock().unwrap_or_else(|p| p.into_inner());
        if self.files.initialized() {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "this node is already in an initialized cluster ({} exists): make a join token with `vessel cluster token`",
                    self.files.ca_cert().display()
                ),
            ));
        }
        // The port first: nothing is made if it cannot be served.
        let l = self.bind()?;
        let mut id = [0u8; 4];
        token::random(&mut id);
        let ca = ca::make_ca(&hex::encode(id)).map_err(ca_err)?;
        let (key_pem, csr) = ca::node_key_and_csr(&self.member.name, self.settings.peer_address()).map_err(ca_err)?;
        let cert_pem = ca::issue(&ca, &csr, &self.member.name, self.settings.peer_address()).map_err(ca_err)?;
        self.files
            .save(&ca.cert_pem, Some(&ca.key_pem), &CertKey { cert_pem, key_pem })
            .map_err(ca_err)?;
        self.serve(l)?;
        self.serve_etcd()?;
        tracing::info!(node = %self.member.name, "cluster initialized: CA made, serving other nodes");
        // The store was restarted for its new listener: the first call may meet the old
        // connection.
        let mut tries = 0;
        loop {
            match self.token(token_ttl) {
                Err(e) if e.code == ErrorCode::Unavailable && tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
                r => return r,
            }
        }
    }

    /// The private etcd (if this node runs one) also listens for other nodes.
    fn serve_etcd(&self) -> NResult<()> {
        if !self.member.private_etcd() {
            return Ok(());
        }
        let root = self.files.dir.parent().unwrap_or(Path::new("/"));
        let port = TcpListener::bind((self.settings.peer_address(), 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| {
                err(
                    ErrorCode::Unavailable,
                    format!("a port for etcd on {}: {e}", self.settings.peer_address()),
                )
            })?
            .port();
        let l = EtcdListener { version: 1, port };
        ca::write_atomic(&etcd_listener_file(root), &serde_json::to_vec(&l).expect("plain data")).map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("{}: {e}", etcd_listener_file(root).display()),
            )
        })?;
        let tls =
            etcd_tls(root, &self.settings).ok_or_else(|| err(ErrorCode::Internal, "etcd listener file unreadable"))?;
        self.member.serve_etcd_tls(tls).map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!("restarting etcd with its listener for other nodes: {e}"),
            )
        })
    }

    /// A new join token.
    pub fn token(&self, ttl: Duration) -> NResult<JoinTokenInfo> {
        if !self.files.initialized() {
            return Err(err(
                ErrorCode::Conflict,
                "the cluster is not initialized: run `vessel cluster init` on its first node",
            ));
        }
        if !self.files.ca_key().exists() {
            return Err(err(
                ErrorCode::Conflict,
                "this node cannot admit nodes (it has no CA key): make the token on the node that ran `vessel cluster init`",
            ));
        }
        let pin = ca::pin(&self.files.load_ca_cert().map_err(ca_err)?).map_err(ca_err)?;
        let t = self
            .member
            .block_on(token::create(self.member.store(), pin, ttl))
            .map_err(token_err)?;
        let join = self.addr().to_string();
        let expires = std::time::SystemTime::now() + ttl;
        Ok(JoinTokenInfo {
            command: format!("vessel up --join {join} --token {t}"),
            token: t.to_string(),
            join,
            ttl_secs: ttl.as_secs(),
            expires_unix: expires.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
    }

    fn admit(&self, from: SocketAddr, req: JoinRequest) -> NResult<JoinReply> {
        let name = vessel_types::Name::parse(&req.name)
            .map_err(|e| err(ErrorCode::InvalidArgument, format!("node name: {e}")))?;
        let ca = self.files.load_ca().map_err(ca_err)?.ok_or_else(|| {
            err(
                ErrorCode::Conflict,
                format!(
                    "node {} cannot admit nodes (it has no CA key): join through the node that ran `vessel cluster init`",
                    self.member.name
                ),
            )
        })?;
        let store = self.member.store();
        // The token first: nothing about the cluster is told to a caller without one.
        self.member
            .block_on(token::verify(store, &req.token))
            .map_err(token_err)?;
        let live: Option<NodeRecord> = self
            .member
            .block_on(store.get(&keys::node(name.as_str())))
            .map_err(|e| err(ErrorCode::Unavailable, e.to_string()))?;
        if live.is_some() || name.as_str() == self.member.name {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!(
                    "a node named {name} is already in the cluster: give the new node another name (`[cluster] name` in its node config)"
                ),
            ));
        }
        let cert_pem = ca::issue(&ca, &req.csr_pem, name.as_str(), req.address).map_err(ca_err)?;
        self.member
            .block_on(token::consume(store, &req.token, name.as_str()))
            .map_err(token_err)?;
        tracing::info!(node = %name, %from, address = %req.address, "admitted a node to the cluster");
        Ok(JoinReply {
            ca_pem: ca.cert_pem,
            cert_pem,
            etcd: self.member.etcd_for_peers(),
            by: self.member.name.clone(),
        })
    }

    fn node(&self) -> NResult<Arc<Node>> {
        self.node
            .upgrade()
            .ok_or_else(|| err(ErrorCode::Unavailable, "the node is shutting down"))
    }

    fn api_call(&self, req: Request) -> NResult<Response> {
        let node = self.node()?;
        Ok(match req {
            Request::Status => Response::Status(node.status()),
            Request::NodeList => Response::Cluster(node.cluster_view()?),
            Request::VeList => Response::Ves { ves: node.list() },
            Request::VeShow { name } => Response::Ve(Box::new(node.show(&name)?)),
            Request::TemplateList => Response::Templates {
                templates: node.template_list(),
            },
            Request::TemplateShow { name } => Response::Template(node.template_show(&name)?),
            Request::VeMove { name, to } => Response::Ve(Box::new(node.ve_move(&name, &to, &mut |_, _, _| {})?)),
            Request::VeMoveIn { name, from } => node.move_in(&name, &from)?,
            Request::VeLogs { name, tail_bytes, raw } => {
                let data = node.logs(&name, tail_bytes)?;
                if raw {
                    Response::LogBytes { data }
                } else {
                    Response::Logs {
                        text: String::from_utf8_lossy(&data).into_owned(),
                    }
                }
            }
            other => {
                let op = serde_json::to_value(&other)
                    .ok()
                    .and_then(|v| v["op"].as_str().map(str::to_string))
                    .unwrap_or_default();
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!("`{op}` is not served to other nodes yet: run it on the VE's node"),
                ));
            }
        })
    }
}

impl PeerHandler for Peer {
    fn join(&self, from: SocketAddr, req: JoinRequest) -> Result<JoinReply, ApiError> {
        self.admit(from, req)
    }

    fn api(&self, peer: &PeerIdentity, req: Request) -> Response {
        tracing::debug!(peer = %peer.node, ?req, "call from a node");
        self.api_call(req).unwrap_or_else(Response::Error)
    }

    fn stream(
        &self,
        _peer: &PeerIdentity,
        req: StreamRequest,
    ) -> Result<(Option<u64>, Box<dyn Read + Send>), ApiError> {
        match req {
            StreamRequest::Logs { name, tail_bytes } => {
                let name =
                    vessel_types::Name::parse(&name).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                let data = self.node()?.logs(&name, tail_bytes)?;
                Ok((Some(data.len() as u64), Box::new(std::io::Cursor::new(data))))
            }
            StreamRequest::Template { name, id } => self.node()?.serve_template(&name, id.as_deref()),
            StreamRequest::Volume { name } => self.node()?.serve_volume(&name, &_peer.node),
        }
    }
}
