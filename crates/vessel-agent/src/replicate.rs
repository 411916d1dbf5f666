//! This node's part in replicating VE volumes (`vessel_repl`):
//!
//! - as a replica: a writer on another node opens a `Replicate` two-way stream to this
//!   node's peer server; [`Node::replicate_for_peer`] checks it and the session runs
//!   `vessel_repl::replica::serve` on this node's copy, at the very place the VE's volume
//!   would be if the VE ran here (`ves/<name>/volume`), so that a move or a failover to
//!   this node finds the volume in place. The copy is made on the same content-addressed
//!   template (fetched from the writer's node if this node lacks it).
//! - as a writer: [`PeerLink`] opens such a stream to a replica's node with this node's
//!   certificate and hands the replicator one end of a socket pair (`vessel_peer::bridge`
//!   carries it over the TLS connection).
//!
//! A node never serves as a replica of a VE it has as its own (it is that VE's writer, or
//! the VE's files here are not a copy to stream into).

use crate::node::{err, NResult, Node};
use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use vessel_fs::Volume;
use vessel_peer::{Channel, DuplexSession, Frame, PeerRequest, StreamRequest};
use vessel_repl::replica::{self, ReplicaHost};
use vessel_types::api::ErrorCode;
use vessel_types::Name;

/// How long a writer waits for a replica's node to take a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The replica copies this node has open (while a writer streams to them).
#[derive(Default)]
pub struct Replicas {
    open: Mutex<HashMap<String, Arc<Volume>>>,
}

impl Replicas {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Volume>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close this node's copy of `volume` once no stream uses it (before the VE itself is
    /// started here, which opens the volume alone).
    pub fn release(&self, volume: &str) {
        let mut open = self.lock();
        if open.get(volume).is_some_and(|v| Arc::strong_count(v) == 1) {
            open.remove(volume);
        }
    }

    /// Whether a writer is streaming into this node's copy of `volume` now.
    pub fn is_open(&self, volume: &str) -> bool {
        self.lock().contains_key(volume)
    }
}

/// A template layer: its content address and the name it is known by.
#[derive(Debug, Clone)]
struct Layer {
    id: String,
}

struct Host<'a> {
    node: &'a Node,
    layer: Option<Layer>,
}

impl Host<'_> {
    fn lower(&self) -> Result<Option<Arc<vessel_fs::lower::Lower>>, String> {
        let Some(l) = &self.layer else { return Ok(None) };
        let root = self.node.layout.template_rootfs(&l.id);
        vessel_fs::lower::shared(&root)
            .map(Some)
            .map_err(|e| format!("the template layer {}: {e}", root.display()))
    }
}

impl ReplicaHost for Host<'_> {
    fn open(&self, volume: &str) -> Result<Arc<Volume>, String> {
        let name = Name::parse(volume).map_err(|e| format!("volume name: {e}"))?;
        if self.node.record(&name).is_ok() {
            return Err(format!(
                "node {} has VE '{volume}' as its own: it is not a replica of it",
                self.node.node_name()
            ));
        }
        let mut open = self.node.replicas.lock();
        if let Some(v) = open.get(volume) {
            return Ok(v.clone());
        }
        let dir = self.node.layout.ve(volume).volume();
        if !dir.join("volume.json").exists() {
            Volume::create(&dir, volume, self.layer.as_ref().map(|l| l.id.as_str()))
                .map_err(|e| format!("make the copy: {e}"))?;
        }
        let v = Arc::new(Volume::open(&dir, self.lower()?).map_err(|e| format!("open the copy: {e}"))?);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
    }

    fn cut(&self, volume: &str, vol: Arc<Volume>, after: u64) -> Result<Arc<Volume>, String> {
        drop(vol);
        Err(format!(
            "this node's copy of '{volume}' has a divergent tail after seq {after}: cutting it needs the volume cut of vessel-fs, which this build lacks"
        ))
    }
}

impl Node {
    /// This node's name in the cluster (or "this node").
    pub(crate) fn node_name(&self) -> String {
        self.cluster
            .get()
            .map_or_else(|| "this node".to_string(), |m| m.name.clone())
    }

    /// A writer on node `from` streams VE `volume`'s transactions to this node's copy.
    pub(crate) fn replicate_for_peer(
        self: &Arc<Self>,
        from: &str,
        volume: &str,
        template: Option<(String, String)>,
    ) -> NResult<ReplicaSession> {
        let name = Name::parse(volume).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        if self.record(&name).is_ok() {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "node {} has VE '{volume}' as its own: it is not a replica of it",
                    self.node_name()
                ),
            ));
        }
        if let Some((tname, id)) = &template {
            if !self.layout.template_rootfs(id).exists() {
                tracing::info!(template = %tname, from, "fetching the template a replica needs");
                self.fetch_template_from(from, tname, Some(id), &mut |_, _, _| {})?;
            }
        }
        Ok(ReplicaSession {
            node: self.clone(),
            volume: volume.to_string(),
            layer: template.map(|(_, id)| Layer { id }),
        })
    }
}

/// One writer's stream into this node's copy.
pub struct ReplicaSession {
    node: Arc<Node>,
    volume: String,
    layer: Option<Layer>,
}

impl DuplexSession for ReplicaSession {
    fn run(self: Box<Self>, ch: Channel) {
        let (mine, theirs) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(volume = self.volume, "replication stream: {e}");
                return;
            }
        };
        let bridge = std::thread::spawn(move || vessel_peer::bridge::run(ch, theirs, Frame::Stdout));
        let host = Host {
            node: &self.node,
            layer: self.layer.clone(),
        };
        let r = (|| -> Result<(), String> {
            let mut r = BufReader::new(mine.try_clone().map_err(|e| e.to_string())?);
            let mut w = BufWriter::with_capacity(64 << 10, mine.try_clone().map_err(|e| e.to_string())?);
            replica::serve(&mut r, &mut w, &host).map_err(|e| e.to_string())?;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::info!(volume = self.volume, "replication stream ended: {e}");
        }
        let _ = mine.shutdown(std::net::Shutdown::Both);
        let _ = bridge.join();
        self.node.replicas.release(&self.volume);
    }
}

/// How a writer on this node reaches its replicas.
pub struct PeerLink {
    node: Weak<Node>,
    volume: String,
    template: Option<(String, String)>,
}

impl PeerLink {
    pub fn new(node: &Arc<Node>, volume: &str, template: Option<(String, String)>) -> PeerLink {
        PeerLink {
            node: Arc::downgrade(node),
            volume: volume.to_string(),
            template,
        }
    }
}

impl vessel_repl::writer::Link for PeerLink {
    fn connect(&self, to: &str) -> std::io::Result<UnixStream> {
        let node = self
            .node
            .upgrade()
            .ok_or_else(|| std::io::Error::other("the node is shutting down"))?;
        let t = node.target_of(to).map_err(|e| std::io::Error::other(e.message))?;
        let client = node
            .peer_client(&t, CONNECT_TIMEOUT)
            .map_err(|e| std::io::Error::other(e.message))?;
        let req = PeerRequest::Stream(StreamRequest::Replicate {
            volume: self.volume.clone(),
            template: self.template.as_ref().map(|(_, id)| id.clone()),
            template_name: self.template.as_ref().map(|(n, _)| n.clone()),
        });
        let ch = client
            .call_duplex(&req)
            .map_err(|e| std::io::Error::other(format!("node {to}: {e}")))?;
        let (mine, theirs) = UnixStream::pair()?;
        std::thread::Builder::new()
            .name(format!("vessel-repl-link-{to}"))
            .spawn(move || {
                if let Err(e) = vessel_peer::bridge::run(ch, theirs, Frame::Stdin) {
                    tracing::debug!("replication link: {e}");
                }
            })?;
        Ok(mine)
    }
}
