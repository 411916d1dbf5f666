//! This node's part in replicating VE volumes (`vessel_repl`):
//!
//! - as a replica: a writer on another node opens a `Replicate` two-way stream to this
//!   node's peer server; [`Node::replicate_for_peer`] checks it and the session runs
//!   `vessel_repl::replica::serve` on this node's copy (`replicas/<name>/volume`, apart
//!   from `ves/`: a VE made here later under that name never starts from it; a writer
//!   change to this node will take it over). The copy is made on the same
//!   content-addressed template (fetched from the writer's node if this node lacks it).
//!   Copies the store no longer lists for this node are removed (`sweep_replicas`).
//! - as a writer: [`PeerLink`] opens such a stream to a replica's node with this node's
//!   certificate and hands the replicator the connection's two halves
//!   (`vessel_peer::pipe`: its sender and acknowledgement reader drive TLS themselves).
//!
//! A node never serves as a replica of a VE it has as its own (it is that VE's writer, or
//! the VE's files here are not a copy to stream into).

use crate::cluster::Member;
use crate::node::{err, NResult, Node};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::io::Write;
use std::io::{BufReader, BufWriter};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use vessel_cluster::{keys, ClusterError};
use vessel_fs::scrub::ScrubTree;
use vessel_fs::Volume;
use vessel_peer::{Channel, DuplexSession, Frame, PeerRequest, StreamRequest};
use vessel_repl::config::VolumeConfig;
use vessel_repl::replica::{self, ReplicaHost};
use vessel_repl::writer::{Master, Options, Replicator};
use vessel_types::api::ErrorCode;
use vessel_types::api::ScrubCopy;
use vessel_types::Name;
use vessel_types::VeSpec;

/// How long a writer waits for a replica's node to take a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The replica copies this node has open (while a writer streams to them).
#[derive(Default)]
pub struct Replicas {
    open: Mutex<HashMap<String, Arc<Volume>>>,
    /// The replicated volumes this node writes.
    writers: Mutex<HashMap<String, Writer>>,
}

impl Replicas {
    pub(crate) fn writers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Writer>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

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
        let dir = self.node.layout.replica_volume(volume);
        if !dir.join("volume.json").exists() {
            Volume::create(&dir, volume, self.layer.as_ref().map(|l| l.id.as_str()))
                .map_err(|e| format!("make the copy: {e}"))?;
        }
        let v = Arc::new(Volume::open(&dir, self.lower()?).map_err(|e| format!("open the copy: {e}"))?);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
    }

    fn cut(&self, volume: &str, vol: Arc<Volume>, after: u64) -> Result<Arc<Volume>, String> {
        let mut open = self.node.replicas.lock();
        open.remove(volume);
        if Arc::strong_count(&vol) > 1 {
            open.insert(volume.to_string(), vol);
            return Err(format!(
                "this node's copy of '{volume}' is in use by another stream: its divergent tail after seq {after} is cut at the next connection"
            ));
        }
        let dir = vol.dir().to_path_buf();
        drop(vol);
        let (v, cut) = Volume::cut_after(&dir, self.lower()?, after).map_err(|e| format!("cut the copy: {e}"))?;
        tracing::info!(volume, after, cut, "cut this copy's divergent tail");
        let v = Arc::new(v);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
    }

    fn install(&self, volume: &str, vol: Arc<Volume>, snapshot: &mut dyn Read) -> Result<Arc<Volume>, String> {
        let mut open = self.node.replicas.lock();
        open.remove(volume);
        if Arc::strong_count(&vol) > 1 {
            open.insert(volume.to_string(), vol);
            return Err(format!(
                "this node's copy of '{volume}' is in use by another stream: it is seeded at the next connection"
            ));
        }
        // Held while the snapshot comes: no other stream opens the copy meanwhile.
        let v = Arc::new(replica::install_copy(vol, self.lower()?, snapshot)?);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
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
        // This thread reads, applies and answers in turn: it drives the TLS connection
        // itself (no bridge thread, no socket pair).
        let (r, w, close) = vessel_peer::pipe::split(ch, Frame::Stdout);
        let host = Host {
            node: &self.node,
            layer: self.layer.clone(),
        };
        let mut r = BufReader::new(r);
        let mut w = BufWriter::with_capacity(64 << 10, w);
        if let Err(e) = replica::serve(&mut r, &mut w, &host) {
            tracing::info!(volume = self.volume, "replication stream ended: {e}");
        }
        let _ = w.flush();
        close.close();
        self.node.replicas.release(&self.volume);
    }
}

/// How a writer on this node reaches its replicas.
pub struct PeerLink {
    root: std::path::PathBuf,
    port: u16,
    m: Arc<Member>,
    volume: String,
    template: Option<(String, String)>,
}

impl PeerLink {
    pub fn new(
        root: &std::path::Path,
        port: u16,
        m: &Arc<Member>,
        volume: &str,
        template: Option<(String, String)>,
    ) -> PeerLink {
        PeerLink {
            root: root.to_path_buf(),
            port,
            m: m.clone(),
            volume: volume.to_string(),
            template,
        }
    }
}

impl vessel_repl::writer::Link for PeerLink {
    fn connect(&self, to: &str) -> std::io::Result<vessel_repl::writer::Conn> {
        let rec: Option<vessel_cluster::keys::NodeRecord> = self
            .m
            .block_on(self.m.store().get(&keys::node(to)))
            .map_err(|e| std::io::Error::other(format!("the cluster's control store: {e}")))?;
        let t = crate::forward::target(to, rec.as_ref(), self.port).map_err(std::io::Error::other)?;
        let client = crate::forward::peer_client_at(&self.root, &t, CONNECT_TIMEOUT)
            .map_err(|e| std::io::Error::other(e.message))?;
        let req = PeerRequest::Stream(StreamRequest::Replicate {
            volume: self.volume.clone(),
            template: self.template.as_ref().map(|(_, id)| id.clone()),
            template_name: self.template.as_ref().map(|(n, _)| n.clone()),
        });
        let ch = client
            .call_duplex(&req)
            .map_err(|e| std::io::Error::other(format!("node {to}: {e}")))?;
        // The sender and its acknowledgement reader drive the TLS connection themselves.
        let (r, w, close) = vessel_peer::pipe::split(ch, Frame::Stdin);
        Ok(vessel_repl::writer::Conn {
            reader: Box::new(r),
            writer: Box::new(w),
            close: Box::new(move || close.close()),
        })
    }
}

// ------------------------------------------------------------------ the writer's side

/// The store's record of a VE's volume (`VolumeConfig`: epoch, writer, copies, in-sync).
pub fn volume_key(ve: &str) -> String {
    keys::ve(ve, "volume")
}

/// How often a writer re-reads its volume's record (new copies, changed counts, a newer
/// epoch that deposes it).
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// Tries of a compare-and-swap on a volume's record that others keep changing.
const CAS_TRIES: usize = 8;

/// The configuration master in etcd: in-sync changes by compare-and-swap on the volume's
/// record, only at this writer's epoch.
pub struct EtcdMaster {
    m: Arc<Member>,
    ve: String,
}

impl EtcdMaster {
    fn change(
        &self,
        epoch: u64,
        f: impl Fn(&VolumeConfig) -> Result<Option<VolumeConfig>, String>,
    ) -> Result<bool, String> {
        let key = volume_key(&self.ve);
        for _ in 0..CAS_TRIES {
            let got: Option<(VolumeConfig, i64)> = self
                .m
                .block_on(self.m.store().get_rev(&key))
                .map_err(|e| format!("the cluster's control store: {e}"))?;
            let Some((cfg, rev)) = got else {
                return Err(format!("the volume of VE '{}' has no record in the store", self.ve));
            };
            if cfg.epoch != epoch {
                return Ok(false);
            }
            let Some(next) = f(&cfg)? else { return Ok(true) };
            if self
                .m
                .block_on(self.m.store().put_if(&key, &next, rev))
                .map_err(|e| format!("the cluster's control store: {e}"))?
            {
                return Ok(true);
            }
        }
        Err(format!("the volume record of VE '{}' changed on every try", self.ve))
    }
}

impl Master for EtcdMaster {
    fn remove_in_sync(&self, node: &str, epoch: u64, reason: &str) -> Result<bool, String> {
        tracing::info!(ve = self.ve, node, reason, "taking a replica out of the in-sync set");
        self.change(epoch, |c| {
            if !c.is_in_sync(node) {
                return Ok(None);
            }
            c.without(node).map(Some).map_err(|e| e.to_string())
        })
    }

    fn add_in_sync(&self, node: &str, epoch: u64) -> Result<bool, String> {
        self.change(epoch, |c| {
            if c.is_in_sync(node) {
                return Ok(None);
            }
            c.with_in_sync(node).map(Some).map_err(|e| e.to_string())
        })
    }
}

/// A volume this node writes, replicated.
pub(crate) struct Writer {
    pub repl: Arc<Replicator>,
    epoch: u64,
    /// Copies on nodes the cluster has lost (still listed until the grace ends).
    lost: Arc<Mutex<BTreeSet<String>>>,
}

fn peers_of(cfg: &VolumeConfig, me: &str) -> Vec<(String, bool)> {
    cfg.replicas
        .iter()
        .filter(|n| *n != me)
        .map(|n| (n.clone(), cfg.is_in_sync(n)))
        .collect()
}

impl Node {
    /// The VE's volume is mounted here to run it: take the writer's part. The first start
    /// makes the volume's record; every start is a new epoch (a writer that restarts never
    /// writes again in its old one: what it wrote last may be on replicas and not here).
    /// Without a cluster, or with one copy wanted and held, nothing more happens.
    pub(crate) fn start_writer(&self, spec: &VeSpec, template: (String, String), vol: &Arc<Volume>) -> NResult<()> {
        let Some(m) = self.cluster.get().cloned() else {
            return Ok(());
        };
        let name = spec.name.to_string();
        let key = volume_key(&name);
        let unavailable = |e: ClusterError| {
            err(
                ErrorCode::Unavailable,
                format!("VE '{name}' needs its volume's record from the cluster's control store: {e}"),
            )
        };
        let nodes = match m.block_on(crate::control::read_nodes(m.store())) {
            Ok(n) => n,
            // A VE that asks for one copy runs while the store is away (its node keeps
            // serving); one that asks for more waits for it.
            Err(e) if spec.replicas.unwrap_or(1) <= 1 => {
                tracing::warn!(
                    ve = name,
                    "starting without the volume's record (the control store does not answer: {e})"
                );
                return Ok(());
            }
            Err(e) => return Err(unavailable(e)),
        };
        // The copies the spec asks for (a create in a cluster stores its default: two with
        // 2+ nodes); a spec without (made before, or outside a cluster): one.
        let want = spec.replicas.unwrap_or(1).min(nodes.len().max(1) as u8) as usize;
        let min = spec.min_replicas_of(want as u8) as usize;
        let mut next = None;
        for _ in 0..CAS_TRIES {
            let got: Option<(VolumeConfig, i64)> = m.block_on(m.store().get_rev(&key)).map_err(unavailable)?;
            let Some((cfg, rev)) = got else {
                let first = VolumeConfig::new(&m.name, min, want);
                if m.block_on(m.store().create(&key, &first)).map_err(unavailable)? {
                    next = Some(first);
                    break;
                }
                continue;
            };
            let cfg = cfg.with_counts(min, want).unwrap_or(cfg);
            // A volume with one copy moved here whole (`ve move`): its record follows it.
            let cfg = if cfg.writer != m.name && cfg.replicas.len() <= 1 && !cfg.is_replica(&m.name) {
                VolumeConfig {
                    epoch: cfg.epoch,
                    ..VolumeConfig::new(&m.name, min, want)
                }
            } else {
                cfg
            };
            let n = cfg.with_writer(&m.name).map_err(|e| {
                err(
                    ErrorCode::Conflict,
                    format!(
                        "VE '{name}' cannot run on node {}: {e} (its writer is node {}, epoch {})",
                        m.name, cfg.writer, cfg.epoch
                    ),
                )
            })?;
            if m.block_on(m.store().put_if(&key, &n, rev)).map_err(unavailable)? {
                next = Some(n);
                break;
            }
        }
        let cfg = next.ok_or_else(|| {
            err(
                ErrorCode::Conflict,
                format!("VE '{name}': its volume's record changed on every try: try again"),
            )
        })?;
        vol.raise_epoch(cfg.epoch)
            .map_err(|e| err(ErrorCode::Conflict, format!("VE '{name}': {e}")))?;
        if cfg.want_replicas <= 1 && cfg.replicas.len() <= 1 {
            return Ok(());
        }
        let link = Arc::new(PeerLink::new(
            &self.opts.root,
            self.opts.settings.cluster.port,
            &m,
            &name,
            Some(template),
        ));
        let master = Arc::new(EtcdMaster {
            m: m.clone(),
            ve: name.clone(),
        });
        let repl = Replicator::start(
            vol,
            &m.name,
            &peers_of(&cfg, &m.name),
            cfg.min_replicas,
            link,
            master,
            Options::default(),
        );
        vol.set_acks(repl.clone());
        tracing::info!(ve = name, epoch = cfg.epoch, replicas = ?cfg.replicas, in_sync = ?cfg.in_sync, "writing the VE's volume, replicated");
        let lost = Arc::new(Mutex::new(BTreeSet::new()));
        self.replicas.writers().insert(
            name.clone(),
            Writer {
                repl: repl.clone(),
                epoch: cfg.epoch,
                lost: lost.clone(),
            },
        );
        let watch = Watch {
            m,
            ve: name,
            epoch: cfg.epoch,
            template: spec.template.to_string(),
            grace: Duration::from_secs(self.opts.settings.cluster.replica_grace_secs),
            lost,
            dropped: self.scrubs.dropped.clone(),
        };
        watch.spawn(Arc::downgrade(&repl));
        Ok(())
    }

    /// The VE's volume is about to be unmounted here: the writer's part ends.
    pub(crate) fn stop_writer(&self, name: &str) {
        let w = self.replicas.writers().remove(name);
        if let Some(w) = w {
            // The VE's processes are gone: what it wrote last goes to the in-sync copies
            // before the streams end (a writer change finds it on the new writer).
            if let Some(vol) = self.rootfs.volume(&self.layout.ve(name)) {
                if let Err(e) = vol.sync() {
                    tracing::warn!(ve = name, "the last sync before the writer stops: errno {e}");
                }
            }
            tracing::info!(ve = name, epoch = w.epoch, "no longer writing the VE's volume");
            w.repl.stop();
        }
    }

    /// The replicas of a VE this node writes, as the writer sees them.
    pub fn replica_status(&self, name: &str) -> Option<Vec<vessel_repl::writer::ReplicaStatus>> {
        self.replicas.writers().get(name).map(|w| {
            let lost = w.lost.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut st = w.repl.status();
            for r in &mut st {
                if lost.contains(&r.node) {
                    r.state = "lost".into();
                }
            }
            st
        })
    }
}

/// What the writer's watcher follows.
struct Watch {
    m: Arc<Member>,
    ve: String,
    epoch: u64,
    template: String,
    /// How long a copy's node may be lost before the copy is dropped and replaced.
    grace: Duration,
    /// The copies whose nodes are lost now (for `ve show`).
    lost: Arc<Mutex<BTreeSet<String>>>,
    /// Copies `ve scrub --repair` dropped: their nodes are not picked again until they
    /// have removed the bad copy (see `scrubbing::Dropped`).
    dropped: crate::scrubbing::Dropped,
}

impl Watch {
    /// Follow the volume's record while this node writes it: new copies (and their nodes
    /// picked here when more are wanted than listed), changed counts, copies on nodes lost
    /// longer than the grace (dropped, then replaced), a newer epoch (another node writes
    /// it now: this writer stops acknowledging anything).
    ///
    /// The writer's watcher, not the control center's leader, drops lost copies: within
    /// an epoch only the writer changes the record's copies (every change a CAS at its
    /// epoch), and it is the one that picks and seeds the replacement.
    fn spawn(self, repl: Weak<Replicator>) {
        let _ = std::thread::Builder::new()
            .name(format!("vessel-repl-watch-{}", self.ve))
            .spawn(move || {
                let mut lost_since = BTreeMap::new();
                loop {
                    std::thread::sleep(WATCH_EVERY);
                    let Some(r) = repl.upgrade() else { return };
                    if r.deposed().is_some() || r.is_stopped() {
                        return;
                    }
                    if !self.round(&r, &mut lost_since) {
                        return;
                    }
                }
            });
    }

    /// One look at the record; false once this writer is deposed.
    fn round(&self, r: &Replicator, lost_since: &mut BTreeMap<String, std::time::Instant>) -> bool {
        let (m, ve) = (&self.m, self.ve.as_str());
        let got: Result<Option<(VolumeConfig, i64)>, _> = m.block_on(m.store().get_rev(&volume_key(ve)));
        let Ok(Some((cfg, rev))) = got else { return true };
        if cfg.epoch != self.epoch {
            tracing::warn!(
                ve,
                epoch = self.epoch,
                now = cfg.epoch,
                "the volume has a newer writer: this one stops"
            );
            r.depose(format!(
                "the volume's epoch is {} now (writer {})",
                cfg.epoch, cfg.writer
            ));
            return false;
        }
        r.set_min(cfg.min_replicas);
        r.set_replicas(&peers_of(&cfg, &m.name));
        let nodes = match m.block_on(crate::control::read_nodes(m.store())) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(ve, "reading the nodes: {e}");
                return true;
            }
        };
        let now = std::time::Instant::now();
        *lost_since = vessel_control::replicas::lost_since(lost_since, &nodes, &cfg.replicas, &m.name, now);
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = lost_since.keys().cloned().collect();
        let gone = vessel_control::replicas::to_drop(lost_since, now, self.grace);
        if !gone.is_empty() {
            let mut next = cfg.clone();
            for n in &gone {
                match next.without_replica(n) {
                    Ok(c) => next = c,
                    Err(e) => tracing::warn!(ve, node = n, "dropping a lost copy: {e}"),
                }
            }
            match m.block_on(m.store().put_if(&volume_key(ve), &next, rev)) {
                Ok(true) => {
                    tracing::warn!(ve, lost = ?gone, grace_s = self.grace.as_secs(), "dropped copies on nodes lost longer than the grace: others replace them");
                    r.set_replicas(&peers_of(&next, &m.name));
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(ve, "dropping lost copies: {e}"),
            }
            // The replacement is picked on the next round, from the record as it is then.
            return true;
        }
        if cfg.replicas.len() < cfg.want_replicas {
            let nodes: Vec<_> = nodes.into_iter().filter(|n| !self.dropped.avoid(ve, &n.name)).collect();
            add_copies(m, ve, &cfg, rev, &self.template, &nodes);
        }
        true
    }
}

/// Pick nodes for the copies the record wants and lacks, and list them (by CAS): the
/// writer's senders then seed them.
fn add_copies(
    m: &Member,
    ve: &str,
    cfg: &VolumeConfig,
    rev: i64,
    template: &str,
    nodes: &[vessel_control::model::Node],
) {
    let r = m.block_on(async {
        let mut copies: BTreeMap<String, usize> = BTreeMap::new();
        for kv in m.store().list_raw(&keys::ves()).await? {
            if keys::ve_part(&kv.key).is_some_and(|(_, p)| p == "volume") {
                if let Ok(c) = keys::decode::<VolumeConfig>(&kv.key, &kv.value) {
                    for n in c.replicas {
                        *copies.entry(n).or_default() += 1;
                    }
                }
            }
        }
        let picked = vessel_control::replicas::pick(nodes, &cfg.replicas, cfg.want_replicas, template, &copies);
        let mut next = cfg.clone();
        for n in &picked {
            next = match next.with_replica(n) {
                Ok(c) => c,
                Err(_) => break,
            };
        }
        if next != *cfg {
            tracing::info!(ve, new = ?picked, "new copies of the VE's volume");
            m.store().put_if(&volume_key(ve), &next, rev).await?;
        }
        Ok::<_, ClusterError>(())
    });
    if let Err(e) = r {
        tracing::debug!(ve, "adding copies: {e}");
    }
}

// ------------------------------------------------------------------ scrub

/// Tries of a scrub while the VE keeps writing (the copies' trees at different seqs).
const SCRUB_TRIES: usize = 10;
/// The largest hash tree taken from another node (about 130 bytes per file).
const SCRUB_TREE_MAX: u64 = 512 << 20;
/// Differences listed per copy.
const SCRUB_LIST: usize = 100;

fn hash(vol: &Volume, stop: &dyn Fn() -> bool) -> Result<ScrubTree, String> {
    let mut last = String::new();
    for _ in 0..SCRUB_TRIES {
        match vessel_fs::scrub::hash_tree_or_stop(vol, &mut |_| {}, stop) {
            Ok(t) => return Ok(t),
            Err(e @ vessel_fs::scrub::ScrubError::Stopped { .. }) => return Err(e.to_string()),
            // Contents changed while they were read: again.
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

impl Node {
    /// `ve scrub`: the hash tree of the writer's copy (this node's) against every other
    /// copy's, taken on its node. Copies are compared at one seq: while the VE writes, a
    /// copy a little behind is asked again (bounded). `stop` ends the writer's hashing
    /// early (a scheduled scrub gives way to the VE stopping).
    pub fn scrub(&self, name: &Name, stop: &dyn Fn() -> bool) -> NResult<Vec<ScrubCopy>> {
        let vol = self.volume_of(name)?;
        let rec = self.record(name)?;
        let me = self.node_name();
        let others: Vec<String> = match self.cluster.get() {
            Some(m) => {
                let cfg: Option<VolumeConfig> = m
                    .block_on(m.store().get(&volume_key(name.as_str())))
                    .map_err(|e| err(ErrorCode::Unavailable, format!("the cluster's control store: {e}")))?;
                cfg.map(|c| c.replicas.into_iter().filter(|n| *n != m.name).collect())
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        let mut mine =
            hash(&vol, stop).map_err(|e| err(ErrorCode::Internal, format!("hashing this node's copy: {e}")))?;
        let mut out = vec![ScrubCopy {
            node: me,
            seq: mine.seq,
            root: mine.root_hex(),
            differences: Vec::new(),
            error: None,
        }];
        for n in others {
            let mut copy = ScrubCopy {
                node: n.clone(),
                seq: 0,
                root: String::new(),
                differences: Vec::new(),
                error: None,
            };
            for attempt in 0..SCRUB_TRIES {
                match self.scrub_tree_of(&n, name.as_str(), &rec.template_id) {
                    Ok(t) if t.seq != mine.seq && attempt + 1 < SCRUB_TRIES => {
                        // The VE wrote meanwhile (or the copy is catching up): both again.
                        std::thread::sleep(Duration::from_millis(300));
                        if let Ok(m2) = hash(&vol, stop) {
                            mine = m2;
                        }
                        copy.seq = t.seq;
                    }
                    Ok(t) => {
                        copy.seq = t.seq;
                        copy.root = t.root_hex();
                        let d = vessel_fs::scrub::compare(&mine, &t);
                        copy.differences = d.iter().take(SCRUB_LIST).map(|d| d.to_string()).collect();
                        if d.len() > SCRUB_LIST {
                            copy.differences.push(format!("... and {} more", d.len() - SCRUB_LIST));
                        }
                        break;
                    }
                    Err(e) => {
                        copy.error = Some(e);
                        break;
                    }
                }
            }
            out.push(copy);
        }
        // The writer's row shows the tree the copies were compared with.
        out[0].seq = mine.seq;
        out[0].root = mine.root_hex();
        Ok(out)
    }

    fn scrub_tree_of(&self, node: &str, volume: &str, template_id: &str) -> Result<ScrubTree, String> {
        let t = self.target_of(node).map_err(|e| e.message)?;
        let mut c = self.peer_client(&t, CONNECT_TIMEOUT).map_err(|e| e.message)?;
        // Hashing a large copy takes a while on its node.
        c.set_timeout(Duration::from_secs(300));
        let mut s = c
            .call_stream(&PeerRequest::Stream(StreamRequest::ScrubTree {
                volume: volume.to_string(),
                template: Some(template_id.to_string()),
            }))
            .map_err(|e| format!("node {node}: {e}"))?;
        let mut bytes = Vec::new();
        std::io::Read::take(&mut s, SCRUB_TREE_MAX)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("node {node}: reading its hash tree: {e}"))?;
        ScrubTree::from_bytes(&bytes).map_err(|e| format!("node {node}: its hash tree: {e}"))
    }

    /// The hash tree of this node's copy of `volume`, for the writer's `ve scrub`.
    pub(crate) fn scrub_tree_for_peer(
        &self,
        volume: &str,
        template: Option<String>,
    ) -> NResult<(Option<u64>, Box<dyn std::io::Read + Send>)> {
        let host = Host {
            node: self,
            layer: template.map(|id| Layer { id }),
        };
        let dir = self.layout.replica_volume(volume);
        if !dir.join("volume.json").exists() {
            return Err(err(
                ErrorCode::NotFound,
                format!("node {} has no copy of VE '{volume}'", self.node_name()),
            ));
        }
        let vol = host.open(volume).map_err(|e| err(ErrorCode::Conflict, e))?;
        let r = hash(&vol, &|| false);
        drop(vol);
        self.replicas.release(volume);
        let tree = r.map_err(|e| {
            err(
                ErrorCode::Internal,
                format!("hashing this node's copy of '{volume}': {e}"),
            )
        })?;
        let bytes = tree.to_bytes();
        Ok((Some(bytes.len() as u64), Box::new(std::io::Cursor::new(bytes))))
    }
}

impl Node {
    /// Remove this node's copies of volumes the store no longer lists it for (the VE was
    /// destroyed, or the copy was dropped), unless a stream has one open. Run by the
    /// reconcile loop; an unreachable store removes nothing.
    pub(crate) fn sweep_replicas(&self, m: &Member) {
        let Ok(rd) = std::fs::read_dir(self.layout.replicas()) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if self.replicas.is_open(&name) {
                continue;
            }
            let cfg: Result<Option<VolumeConfig>, _> = m.block_on(m.store().get(&volume_key(&name)));
            // A copy this node is the writer of is kept until the node has adopted it
            // as the VE's own volume (a move to this node is under way).
            let own = Name::parse(&name).is_ok_and(|n| self.record(&n).is_ok());
            let keep = match cfg {
                Ok(Some(c)) => c.is_replica(&m.name) && (c.writer != m.name || !own),
                Ok(None) => false,
                Err(_) => true,
            };
            if !keep {
                tracing::info!(ve = name, "removing this node's copy: the cluster no longer lists it");
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(ve = name, "removing a dropped copy: {err}");
                }
            }
        }
    }
}

/// The record after `ve set --replicas/--min-replicas`: the new counts and, when fewer
/// copies are wanted than listed, without the extra ones (copies out of sync first, never
/// the writer's). Pure.
pub fn with_new_counts(cfg: &VolumeConfig, min: usize, want: usize) -> Result<VolumeConfig, String> {
    let mut next = cfg.clone();
    while next.replicas.len() > want {
        let drop = next
            .replicas
            .iter()
            .rev()
            .find(|n| **n != next.writer && !next.is_in_sync(n))
            .or_else(|| next.replicas.iter().rev().find(|n| **n != next.writer))
            .cloned();
        let Some(n) = drop else { break };
        next = next.without_replica(&n).map_err(|e| e.to_string())?;
    }
    next.with_counts(min, want).map_err(|e| e.to_string())
}

impl Node {
    /// `ve set` changed the copy counts of a VE running here: put them in its volume's
    /// record (the writer's watcher then adds copies, or the dropped ones stop being fed
    /// and their nodes remove them; `min` applies from the watcher's next look).
    pub(crate) fn apply_copy_counts(&self, spec: &VeSpec) -> NResult<()> {
        let Some(m) = self.cluster.get().cloned() else {
            return Ok(());
        };
        let name = spec.name.to_string();
        let nodes = m.block_on(crate::control::read_nodes(m.store())).map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!("VE '{name}': changing its copies needs the cluster's control store: {e}"),
            )
        })?;
        let want = spec.replicas.unwrap_or(1).min(nodes.len().max(1) as u8) as usize;
        let min = spec.min_replicas_of(want as u8) as usize;
        let changed = change_record(&m, &name, "changing its copies", |cfg| {
            if cfg.min_replicas == min && cfg.want_replicas == want && cfg.replicas.len() <= want {
                return Ok(None);
            }
            with_new_counts(cfg, min, want)
                .map(Some)
                .map_err(|e| err(ErrorCode::InvalidArgument, format!("VE '{name}': {e}")))
        })?;
        if let Some(next) = changed {
            tracing::info!(ve = name, want, min, replicas = ?next.replicas, "copy counts changed");
        }
        Ok(())
    }
}

/// Change VE `ve`'s volume record by CAS (bounded tries): `f` gives the next record, or
/// `None` for no change. No record: nothing changes (the next start makes it). Returns the
/// record written, if any; `what` names the change in the store's error.
pub(crate) fn change_record(
    m: &Member,
    ve: &str,
    what: &str,
    mut f: impl FnMut(&VolumeConfig) -> NResult<Option<VolumeConfig>>,
) -> NResult<Option<VolumeConfig>> {
    let key = volume_key(ve);
    let unavailable = |e: ClusterError| {
        err(
            ErrorCode::Unavailable,
            format!("VE '{ve}': {what} needs the cluster's control store: {e}"),
        )
    };
    for _ in 0..CAS_TRIES {
        let got: Option<(VolumeConfig, i64)> = m.block_on(m.store().get_rev(&key)).map_err(unavailable)?;
        let Some((cfg, rev)) = got else { return Ok(None) };
        let Some(next) = f(&cfg)? else { return Ok(None) };
        if m.block_on(m.store().put_if(&key, &next, rev)).map_err(unavailable)? {
            return Ok(Some(next));
        }
    }
    Err(err(
        ErrorCode::Conflict,
        format!("VE '{ve}': its volume's record changed on every try: try again"),
    ))
}

#[cfg(test)]
mod count_tests {
    use super::*;

    fn cfg() -> VolumeConfig {
        let c = VolumeConfig::new("a", 2, 3);
        let c = c.with_replica("b").unwrap().with_replica("c").unwrap();
        c.with_in_sync("b").unwrap()
    }

    #[test]
    fn fewer_copies_drop_the_ones_out_of_sync_first_and_never_the_writer() {
        let c = cfg();
        assert_eq!(c.replicas, ["a", "b", "c"]);
        let n = with_new_counts(&c, 1, 2).unwrap();
        assert_eq!(n.replicas, ["a", "b"], "c was out of sync");
        assert_eq!((n.min_replicas, n.want_replicas, n.epoch), (1, 2, c.epoch));
        let n = with_new_counts(&c, 1, 1).unwrap();
        assert_eq!(n.replicas, ["a"]);
        assert_eq!(n.in_sync, ["a"]);
        // More copies wanted: the list stays (the watcher picks nodes).
        let n = with_new_counts(&c, 3, 4).unwrap();
        assert_eq!(n.replicas, c.replicas);
        assert_eq!(n.want_replicas, 4);
        // Counts the record refuses are refused.
        assert!(with_new_counts(&c, 3, 2).is_err());
    }
}
