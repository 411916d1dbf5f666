//! The node's side of the node-to-node transport (`vessel-peer`): `cluster init` (the
//! CA, this node's certificate, the listener), join tokens, admitting joining nodes, and
//! serving other nodes' calls.
//!
//! The node listens on `[cluster] address`:`port` once the cluster is initialized
//! (`ROOT/cluster/ca.crt` exists: after `cluster init` here, or after this node joined).
//! Only a node with the CA key (the one that ran `init`) admits new nodes.
//!
//! Served to other nodes: status, node and VE lists, `ve show`, templates, and for VEs on
//! this node `logs`, `diff`, `history`, `revert`, `rollback`, `rescue`, `restart` (the
//! local functions), the `logs` and `export` streams, and the two-way `exec` and
//! `console` streams (`peer_session`). The calling side is `forward`.

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
use vessel_peer::{DuplexSession, PeerHandler, PeerIdentity, PeerServer, ServerOptions};
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
        crl_file: Some(crl_file(root)).filter(|p| p.exists()),
    })
}

/// The revocation list the private etcd's TLS listener checks (kept by the CA node).
fn crl_file(root: &Path) -> PathBuf {
    ClusterFiles::new(root).dir.join("crl.pem")
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
    /// Certificates found revoked (a revocation is never undone).
    revoked: Mutex<std::collections::HashSet<String>>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            revoked: Mutex::new(Default::default()),
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
        self.serve(l).map_err(|e| e.message)?;
        self.start_crl_keeper();
        // A certificate its issuer did not record (made by `vessel lab`, or before
        // records existed): recorded now, so that removing this node revokes it.
        if let Ok(own) = self.files.load_node() {
            if let (Ok(sha256), Ok(serial)) = (ca::fingerprint(&own.cert_pem), ca::serial(&own.cert_pem)) {
                let rec = keys::CertRecord {
                    node: self.member.name.clone(),
                    sha256,
                    serial: hex::encode(serial),
                    issued_unix: unix_now(),
                };
                let _ = self
                    .member
                    .block_on(self.member.store().create(&keys::cert(&self.member.name), &rec));
            }
        }
        Ok(())
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
        self.record_cert(&self.member.name, &cert_pem)?;
        self.files
            .save(&ca.cert_pem, Some(&ca.key_pem), &CertKey { cert_pem, key_pem })
            .map_err(ca_err)?;
        self.serve(l)?;
        self.serve_etcd()?;
        self.start_crl_keeper();
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
        self.write_crl(&[])?;
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
        self.record_cert(name.as_str(), &cert_pem)?;
        tracing::info!(node = %name, %from, address = %req.address, "admitted a node to the cluster");
        Ok(JoinReply {
            ca_pem: ca.cert_pem,
            cert_pem,
            etcd: self.member.etcd_for_peers(),
            by: self.member.name.clone(),
        })
    }

    /// Write the CRL naming `serials` (only the CA node can sign one).
    fn write_crl(&self, serials: &[Vec<u8>]) -> NResult<()> {
        let Some(ca) = self.files.load_ca().map_err(ca_err)? else {
            return Ok(());
        };
        let pem = ca::crl(&ca, serials, unix_now()).map_err(ca_err)?;
        let root = self.files.dir.parent().unwrap_or(Path::new("/"));
        ca::write_atomic(&crl_file(root), pem.as_bytes())
            .map_err(|e| err(ErrorCode::Internal, format!("{}: {e}", crl_file(root).display())))
    }

    /// On the CA node with the private etcd: keep the etcd's revocation list in step with
    /// `/vessel/v1/revoked/` (checked every 2 s), so that a removed node's certificate no
    /// longer opens the control store either.
    fn start_crl_keeper(self: &Arc<Self>) {
        if !self.member.private_etcd() || !self.files.ca_key().exists() {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("vessel-crl".into()).spawn(move || {
            let mut written: Option<Vec<String>> = None;
            loop {
                std::thread::sleep(Duration::from_secs(2));
                let Some(p) = me.upgrade() else { return };
                let listed = p.member.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(5),
                        p.member.store().list::<keys::Revoked>(&keys::revoked_all()),
                    )
                    .await
                });
                let Ok(Ok(revoked)) = listed else { continue };
                let mut serials: Vec<String> = revoked
                    .into_iter()
                    .map(|r| r.serial)
                    .filter(|s| !s.is_empty())
                    .collect();
                serials.sort();
                serials.dedup();
                if written.as_ref() == Some(&serials) {
                    continue;
                }
                let bytes: Vec<Vec<u8>> = serials.iter().filter_map(|s| hex::decode(s).ok()).collect();
                match p.write_crl(&bytes) {
                    Ok(()) => {
                        tracing::info!(revoked = serials.len(), "etcd's certificate revocation list written");
                        written = Some(serials);
                    }
                    Err(e) => tracing::warn!("writing etcd's certificate revocation list: {}", e.message),
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("no thread for the revocation list: {e}");
        }
    }

    /// Note which certificate `node` got, so that removing the node can revoke it.
    fn record_cert(&self, node: &str, cert_pem: &str) -> NResult<()> {
        let rec = keys::CertRecord {
            node: node.to_string(),
            sha256: ca::fingerprint(cert_pem).map_err(ca_err)?,
            serial: hex::encode(ca::serial(cert_pem).map_err(ca_err)?),
            issued_unix: unix_now(),
        };
        self.member
            .block_on(self.member.store().put(&keys::cert(node), &rec))
            .map_err(|e| {
                err(
                    ErrorCode::Unavailable,
                    format!("recording node {node}'s certificate in the control store: {e}"),
                )
            })
    }

    /// Whether the certificate `sha256` is revoked, asked of the store at every new
    /// connection (one read; connections are long-lived). While the store does not answer
    /// within 2 s, only revocations seen before count, so that node-to-node traffic
    /// outlives a control store outage.
    fn is_revoked(&self, sha256: &str) -> bool {
        if self.revoked.lock().unwrap_or_else(|p| p.into_inner()).contains(sha256) {
            return true;
        }
        let asked = self.member.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                self.member.store().get::<keys::Revoked>(&keys::revoked(sha256)),
            )
            .await
        });
        match asked {
            Ok(Ok(r)) => {
                if r.is_some() {
                    self.revoked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(sha256.to_string());
                }
                r.is_some()
            }
            Ok(Err(e)) => {
                tracing::warn!("checking a node certificate against the revocation list: {e}");
                false
            }
            Err(_) => {
                tracing::warn!(
                    "checking a node certificate against the revocation list: the control store did not answer within 2 s"
                );
                false
            }
        }
    }

    fn node(&self) -> NResult<Arc<Node>> {
        self.node
            .upgrade()
            .ok_or_else(|| err(ErrorCode::Unavailable, "the node is shutting down"))
    }

    fn api_call(&self, req: Request) -> NResult<Response> {
        let node = self.node()?;
        if let Some(r) = crate::server::ve_call(&node, &req) {
            return r;
        }
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
            Request::VeAdoptCopy { name, from } => node.adopt_copy(&name, &from)?,
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
    fn allowed(&self, peer: &PeerIdentity) -> Result<(), ApiError> {
        if self.is_revoked(&peer.cert_sha256) {
            tracing::warn!(peer = %peer.node, "refused a removed node (its certificate is revoked)");
            return Err(err(
                ErrorCode::PermissionDenied,
                format!(
                    "node {}'s certificate is revoked: the node was removed from the cluster (join again with a new token)",
                    peer.node
                ),
            ));
        }
        Ok(())
    }

    fn join(&self, from: SocketAddr, req: JoinRequest) -> Result<JoinReply, ApiError> {
        self.admit(from, req)
    }

    fn api(&self, peer: &PeerIdentity, req: Request) -> Response {
        tracing::debug!(peer = %peer.node, ?req, "call from a node");
        self.api_call(req).unwrap_or_else(Response::Error)
    }

    fn stream(&self, peer: &PeerIdentity, req: StreamRequest) -> Result<(Option<u64>, Box<dyn Read + Send>), ApiError> {
        match req {
            StreamRequest::Logs { name, tail_bytes } => {
                let name =
                    vessel_types::Name::parse(&name).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                let data = self.node()?.logs(&name, tail_bytes)?;
                Ok((Some(data.len() as u64), Box::new(std::io::Cursor::new(data))))
            }
            StreamRequest::Export { name } => {
                let name =
                    vessel_types::Name::parse(&name).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                Ok((None, crate::peer_session::export_stream(self.node()?, name)?))
            }
            StreamRequest::Template { name, id } => self.node()?.serve_template(&name, id.as_deref()),
            StreamRequest::Volume { name } => self.node()?.serve_volume(&name, &peer.node),
            StreamRequest::ScrubTree { volume, template } => self.node()?.scrub_tree_for_peer(&volume, template),
            other => Err(err(
                ErrorCode::InvalidArgument,
                format!("{other:?} is a two-way stream"),
            )),
        }
    }

    fn duplex(&self, peer: &PeerIdentity, req: StreamRequest) -> Result<Box<dyn DuplexSession>, ApiError> {
        let node = self.node()?;
        let parse = |n: &str| vessel_types::Name::parse(n).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()));
        tracing::debug!(peer = %peer.node, ?req, "two-way stream for a node");
        Ok(Box::new(match req {
            StreamRequest::Exec {
                name,
                argv,
                tty,
                env,
                cwd,
            } => node.exec_for_peer(&parse(&name)?, argv, tty, env, cwd)?,
            StreamRequest::Console { name } => node.console_for_peer(&parse(&name)?)?,
            StreamRequest::Replicate {
                volume,
                template,
                template_name,
            } => {
                return Ok(Box::new(node.replicate_for_peer(
                    &peer.node,
                    &volume,
                    template_name.zip(template),
                )?))
            }
            other => {
                return Err(err(
                    ErrorCode::InvalidArgument,
                    format!("{other:?} is not a two-way stream"),
                ))
            }
        }))
    }
}
