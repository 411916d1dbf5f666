//! Moving things between nodes over the node-to-node transport: template fetch and the
//! cold `ve move` (which node drain uses too).
//!
//! ```text
//! template fetch  here ── stream template{name|id} ──▶ node with it: tree stream of rootfs/
//!                 header {manifest, meta, id}; every item checked against the manifest (file
//!                 sha256 computed here), manifest.id() == id, then staging → templates/<id>
//! ve move (cold)  CLI ─▶ any node ─▶ the VE's node S (forwarded as `ve-move`)
//!   S: mark moving, stop it (the unmount checkpoints the volume)
//!   S ── api ve-move-in{name, from: S} ──▶ T: (template by id if missing) ── stream volume ──▶ S
//!        T: tree stream into ves/.move-<name>-<nonce>/volume (sha256 per file), record with
//!           the same spec (name, address), its uid slot (both from its identity in the
//!           cluster's IPAM), generation 0; held back
//!           from its reconcile loop until the cluster assigns the VE to it (or 60 s pass)
//!   S: one transaction guarded by the spec's and placement's revisions: generation + 1
//!      (run as before), placement T, assigned/S → assigned/T
//!   T: its reconcile loop applies the generation (starts it if it ran)
//!   S: once T reports that generation without an error: removes its copy
//! ```
//! A failure before the switch leaves the VE on S as it was (started again if it ran);
//! T's copy, never assigned to it, is removed by T's reconcile loop (a `Release`).

use crate::cluster::Member;
use crate::node::{err, internal, NResult, Node};
use crate::state::{TemplateRecord, VeRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vessel_cluster::keys::{self, NodeRecord, Placement, VeEntry, VeObserved};
use vessel_cluster::store::Write;
use vessel_peer::wire::{PeerRequest, PeerResponse, StreamRequest};
use vessel_peer::PeerClient;
use vessel_types::api::{ApiError, ErrorCode, Request, Response, TemplateInfo};
use vessel_types::{Name, VeStatus};
use vessel_ve::template::{self, Entry, Manifest, TemplateMeta};
use vessel_ve::xfer;

/// Format version of the headers of template and volume streams.
const HEADER_VERSION: u32 = 1;
/// Connect and per-read bound of a transfer.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a move waits for the target to copy the volume.
const MOVE_IN_WAIT: Duration = Duration::from_secs(30 * 60);
/// How long the target holds a received VE back from its reconcile loop while the
/// cluster is not assigning it there.
const INCOMING_HOLD: Duration = Duration::from_secs(60);
/// How long the source waits for the target to take over after the switch.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize)]
struct TemplateHeader {
    version: u32,
    name: String,
    id: String,
    meta: TemplateMeta,
    manifest: Manifest,
}

#[derive(Serialize, Deserialize)]
struct VolumeHeader {
    version: u32,
    record: VeRecord,
}

/// A VE on its way out of (or into) this node.
struct Mark {
    outgoing: bool,
    since: Instant,
    /// Bytes of its volume sent so far (outgoing).
    sent: Arc<AtomicU64>,
}

/// This node's moves under way and the drain moves that failed (not retried in a loop).
#[derive(Default)]
pub struct Moves {
    marks: Mutex<BTreeMap<Name, Mark>>,
    failed: Mutex<BTreeMap<Name, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Unmark<'a>(&'a Moves, Name);

impl Drop for Unmark<'_> {
    fn drop(&mut self) {
        lock(&self.0.marks).remove(&self.1);
    }
}

impl Moves {
    fn mark_out(&self, name: &Name) -> NResult<(Unmark<'_>, Arc<AtomicU64>)> {
        let mut m = lock(&self.marks);
        if m.contains_key(name) {
            return Err(err(ErrorCode::Conflict, format!("VE '{name}' is being moved already")));
        }
        let sent = Arc::new(AtomicU64::new(0));
        m.insert(
            name.clone(),
            Mark {
                outgoing: true,
                since: Instant::now(),
                sent: sent.clone(),
            },
        );
        Ok((Unmark(self, name.clone()), sent))
    }

    /// VEs the reconcile loop must leave alone now: moving out, or received and not yet
    /// assigned here (for at most [`INCOMING_HOLD`]). `assigned`: VEs the cluster assigns
    /// to this node (an incoming VE assigned here is the reconcile loop's again).
    pub fn held(&self, assigned: &dyn Fn(&str) -> bool) -> Vec<Name> {
        let mut m = lock(&self.marks);
        m.retain(|n, k| k.outgoing || (!assigned(n.as_str()) && k.since.elapsed() < INCOMING_HOLD));
        m.keys().cloned().collect()
    }
}

/// What decides whether a VE's copy on this node may go: another node is its placement
/// and reported the VE's current generation without an error (pure).
pub fn copy_is_stale(
    me: &str,
    entry: &VeEntry,
    place: Option<&Placement>,
    observed: Option<&VeObserved>,
) -> Result<(), String> {
    let Some(there) = place.and_then(|p| p.node.as_deref()) else {
        return Err("the VE is placed on no node: this copy stays".into());
    };
    if there == me {
        return Err("the VE is placed on this node".into());
    }
    match observed {
        Some(o) if o.node == there && o.generation >= entry.generation && o.error.is_none() => Ok(()),
        Some(o) if o.node == there && o.error.is_some() => Err(format!(
            "node {there} has the VE but reported an error ({}): this copy stays until it runs there",
            o.error.as_deref().unwrap_or_default()
        )),
        _ => Err(format!(
            "node {there} has not reported the VE yet: this copy stays until it does"
        )),
    }
}

/// Compare a received template entry with the manifest's (pure; the reason names what differs).
fn entry_matches(want: Option<&Entry>, got: &Entry) -> Result<(), String> {
    let Some(w) = want else {
        return Err("it is not in the template's manifest".into());
    };
    if w.path != got.path {
        return Err(format!("the manifest has {} here", w.path));
    }
    if w.sha256 != got.sha256 || w.size != got.size {
        return Err(format!(
            "its content does not match the template's manifest (sha256 {}, {} bytes; the manifest says {}, {} bytes)",
            got.sha256.as_deref().unwrap_or("-"),
            got.size,
            w.sha256.as_deref().unwrap_or("-"),
            w.size
        ));
    }
    if w != got {
        return Err(format!(
            "its type, mode, owner or target does not match the template's manifest ({:?} {:o} {}:{}; the manifest says {:?} {:o} {}:{})",
            got.kind, got.mode, got.uid, got.gid, w.kind, w.mode, w.uid, w.gid
        ));
    }
    Ok(())
}

fn peer_err(node: &str, e: impl std::fmt::Display) -> ApiError {
    err(ErrorCode::Unavailable, format!("node {node}: {e}"))
}

fn xfer_err(what: &str, e: xfer::XferError) -> ApiError {
    let code = match e {
        xfer::XferError::Mismatch { .. } | xfer::XferError::Bad(_) => ErrorCode::Conflict,
        _ => ErrorCode::Unavailable,
    };
    err(code, format!("{what}: {e}"))
}

impl Node {
    fn transfer_member(&self) -> NResult<&Arc<Member>> {
        self.cluster.get().ok_or_else(|| {
            err(
                ErrorCode::Unavailable,
                "this node is in no cluster: moving and fetching need other nodes",
            )
        })
    }

    /// A client to another node of the cluster (its live record gives its address).
    fn connect_to(&self, node: &str, timeout: Duration) -> NResult<PeerClient> {
        let t = self.target_of(node)?;
        self.peer_client(&t, timeout)
    }

    /// A tree stream from `node` and its header (of our version).
    fn open_tree_stream<H: serde::de::DeserializeOwned>(
        &self,
        node: &str,
        req: StreamRequest,
        what: &str,
        version: impl Fn(&H) -> u32,
    ) -> NResult<(vessel_peer::PeerStream, H)> {
        let c = self.connect_to(node, PEER_TIMEOUT)?;
        let mut s = c.call_stream(&PeerRequest::Stream(req)).map_err(|e| match e {
            vessel_peer::PeerError::Api(e) => err(e.code, format!("node {node}: {}", e.message)),
            e => peer_err(node, e),
        })?;
        let h = xfer::read_header(&mut s).map_err(|e| xfer_err(what, e))?;
        let h: H =
            serde_json::from_slice(&h).map_err(|e| err(ErrorCode::Conflict, format!("{what}: bad header: {e}")))?;
        if version(&h) != HEADER_VERSION {
            return Err(err(
                ErrorCode::VersionMismatch,
                format!(
                    "{what}: header version {}: run the same vessel version on every node",
                    version(&h)
                ),
            ));
        }
        Ok((s, h))
    }

    pub(crate) fn api_on(&self, node: &str, req: Request, timeout: Duration) -> NResult<Response> {
        let mut c = self.connect_to(node, timeout)?;
        match c.call(&PeerRequest::Api(Box::new(req))) {
            Ok(PeerResponse::Api(Response::Error(e))) => Err(e),
            Ok(PeerResponse::Api(r)) => Ok(r),
            Ok(other) => Err(peer_err(node, format!("unexpected answer {other:?}"))),
            Err(vessel_peer::PeerError::Api(e)) => Err(e),
            Err(e) => Err(peer_err(node, e)),
        }
    }

    // ------------------------------------------------------------------ templates

    /// Serve a template's files to another node.
    pub(crate) fn serve_template(&self, name: &str, id: Option<&str>) -> NResult<(Option<u64>, Box<dyn Read + Send>)> {
        let (name, id) = match id {
            Some(id) => (name.to_string(), id.to_string()),
            None => {
                let n = Name::parse(name).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                let st = lock(&self.state);
                let t = st
                    .templates
                    .get(&n)
                    .ok_or_else(|| err(ErrorCode::NotFound, format!("template '{name}' is not on this node")))?;
                (name.to_string(), t.id.clone())
            }
        };
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(ErrorCode::InvalidArgument, format!("bad template id {id:?}")));
        }
        let dir = self.layout.template(&id);
        if !template::is_installed(&dir) {
            return Err(err(ErrorCode::NotFound, format!("template {id} is not on this node")));
        }
        let meta = template::read_meta(&dir).map_err(|e| internal("template", e))?;
        let manifest = template::read_manifest(&dir).map_err(|e| internal("template", e))?;
        let h = TemplateHeader {
            version: HEADER_VERSION,
            name,
            id,
            meta,
            manifest,
        };
        let rootfs = dir.join("rootfs");
        let items = xfer::list(&rootfs).map_err(|e| internal("list the template", e))?;
        let header = serde_json::to_vec(&h).map_err(|e| internal("template header", e))?;
        Ok((None, Box::new(xfer::TreeReader::new(&rootfs, &header, items))))
    }

    /// `vessel template fetch NAME [--from NODE]`.
    pub fn template_fetch(
        &self,
        name: &Name,
        from: Option<&str>,
        progress: &mut vessel_ve::Progress,
    ) -> NResult<TemplateInfo> {
        if lock(&self.state).templates.contains_key(name) {
            return self.template_show(name);
        }
        let m = self.transfer_member()?;
        let nodes = match from {
            Some(n) => vec![n.to_string()],
            None => self.nodes_with_template(m, name.as_str())?,
        };
        if nodes.is_empty() {
            return Err(err(
                ErrorCode::NotFound,
                format!("no other node has template '{name}': build it with `vessel template build`"),
            ));
        }
        let mut last = None;
        for n in &nodes {
            match self.fetch_template_from(n, name.as_str(), None, progress) {
                Ok(_) => {
                    self.publish_templates();
                    return self.template_show(name);
                }
                // Another node may serve it; a copy that does not verify is an answer.
                Err(e) if e.code == ErrorCode::Unavailable => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("tried at least one node"))
    }

    fn nodes_with_template(&self, m: &Member, name: &str) -> NResult<Vec<String>> {
        let kvs = m
            .block_on(m.store().list_raw(&keys::templates("")))
            .map_err(|e| err(ErrorCode::Unavailable, format!("the cluster's control store: {e}")))?;
        let mut out = Vec::new();
        for kv in kvs {
            let names: Vec<String> = keys::decode(&kv.key, &kv.value).unwrap_or_default();
            let node = kv.key.trim_start_matches(&keys::templates("")).to_string();
            if node != m.name && names.iter().any(|n| n == name) {
                out.push(node);
            }
        }
        Ok(out)
    }

    /// Make sure the template a VE of `spec` needs is here (fetched from a node that has it).
    pub(crate) fn ensure_template(&self, template: &Name) -> NResult<()> {
        if lock(&self.state).templates.contains_key(template) || self.cluster.get().is_none() {
            return Ok(());
        }
        tracing::info!(%template, "template not on this node: fetching it from a node that has it");
        self.template_fetch(template, None, &mut |_, _, _| {}).map(|_| ())
    }

    /// Fetch one template (by name, or the one with `id`) from `node`: verified, then in the
    /// store; registered under its name if that name is free here. Returns its id.
    pub(crate) fn fetch_template_from(
        &self,
        node: &str,
        name: &str,
        id: Option<&str>,
        progress: &mut vessel_ve::Progress,
    ) -> NResult<String> {
        let started = Instant::now();
        let _g = self
            .template_lock
            .acquire(
                &format!("the fetch of template '{name}'"),
                template::BUILD_WAIT,
                &mut |h, _| progress(&format!("waiting for {h}"), 0, 0),
            )
            .map_err(|(h, _)| {
                err(
                    ErrorCode::Conflict,
                    format!("{h} is still running here: try again later"),
                )
            })?;
        progress(&format!("fetching template '{name}' from node {node}"), 0, 0);
        let what = format!("template '{name}' from node {node}");
        let (mut s, h): (_, TemplateHeader) = self.open_tree_stream(
            node,
            StreamRequest::Template {
                name: name.to_string(),
                id: id.map(str::to_string),
            },
            &what,
            |h: &TemplateHeader| h.version,
        )?;
        let refused = |why: String| {
            err(
                ErrorCode::Conflict,
                format!("{what} refused: {why}; nothing was installed"),
            )
        };
        if h.manifest.id() != h.id || id.is_some_and(|want| want != h.id) {
            return Err(refused(format!(
                "its manifest's content address is {}, not the id it was sent as ({})",
                h.manifest.id(),
                id.unwrap_or(&h.id)
            )));
        }
        let store = self.layout.templates();
        let dest = self.layout.template(&h.id);
        let total = h.manifest.bytes();
        if !template::is_installed(&dest) {
            let staging = template::staging_dir(&store);
            let rootfs = staging.join("rootfs");
            let r = (|| {
                std::fs::create_dir_all(&rootfs).map_err(|e| internal("create the staging dir", e))?;
                let mut i = 0usize;
                let entries = &h.manifest.entries;
                let got = xfer::receive(
                    &mut s,
                    &rootfs,
                    &mut |e| {
                        let r = entry_matches(entries.get(i), e);
                        i += 1;
                        r
                    },
                    &mut |b| progress(&format!("fetching template '{name}' from node {node}"), b, total),
                )
                .map_err(|e| match e {
                    xfer::XferError::Mismatch { .. } => refused(e.to_string()),
                    e => xfer_err(&what, e),
                })?;
                if got.items as usize != entries.len() {
                    return Err(refused(format!(
                        "{} of the manifest's {} entries arrived",
                        got.items,
                        entries.len()
                    )));
                }
                let write = |f: &str, b: Vec<u8>| {
                    std::fs::write(staging.join(f), b).map_err(|e| internal(&format!("write {f}"), e))
                };
                write("manifest.json", serde_json::to_vec(&h.manifest).expect("serializes"))?;
                write("template.json", serde_json::to_vec_pretty(&h.meta).expect("serializes"))?;
                xfer::sync_fs(&staging).map_err(|e| internal("sync", e))?;
                template::remove_template(&store, &h.id).map_err(|e| internal("template store", e))?;
                std::fs::rename(&staging, &dest).map_err(|e| internal("install the template", e))?;
                xfer::sync_fs(&store).map_err(|e| internal("sync", e))?;
                Ok(got)
            })();
            match r {
                Ok(got) => tracing::info!(
                    template = name,
                    from = node,
                    files = got.items,
                    bytes = got.bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "template fetched and verified"
                ),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(e);
                }
            }
        }
        let tname = Name::parse(name).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let mut st = lock(&self.state);
        if let std::collections::btree_map::Entry::Vacant(v) = st.templates.entry(tname) {
            v.insert(TemplateRecord {
                id: h.id.clone(),
                kind: h.meta.kind,
            });
            self.save(&st)?;
        }
        progress(
            &format!(
                "template '{name}' fetched from node {node} and verified: {} files, {} bytes in {:.1} s",
                h.manifest.entries.len(),
                total,
                started.elapsed().as_secs_f64()
            ),
            total,
            total,
        );
        Ok(h.id)
    }

    // ------------------------------------------------------------------ volumes

    /// Serve a stopped VE's volume to the node it moves to.
    pub(crate) fn serve_volume(&self, name: &str, peer: &str) -> NResult<(Option<u64>, Box<dyn Read + Send>)> {
        let name = Name::parse(name).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let sent = match lock(&self.moves.marks).get(&name) {
            Some(k) if k.outgoing => k.sent.clone(),
            _ => {
                return Err(err(
                    ErrorCode::Conflict,
                    format!("VE '{name}' is not moving out of this node: its volume is served only during a move"),
                ))
            }
        };
        let rec = self.record(&name)?;
        let ve = self.layout.ve(name.as_str());
        if rec.status == VeStatus::Running || vessel_ve::rootfs::RootFs::is_mounted(&self.rootfs, &ve) {
            return Err(err(
                ErrorCode::Conflict,
                format!("VE '{name}' is running: its volume is not quiescent"),
            ));
        }
        let dir = ve.volume();
        let items = xfer::list(&dir).map_err(|e| internal("list the volume", e))?;
        let header = serde_json::to_vec(&VolumeHeader {
            version: HEADER_VERSION,
            record: rec,
        })
        .map_err(|e| internal("volume header", e))?;
        tracing::info!(ve = %name, to = peer, "sending the volume");
        Ok((
            None,
            Box::new(Counted {
                r: xfer::TreeReader::new(&dir, &header, items),
                n: sent,
            }),
        ))
    }

    /// Node to node: take VE `name` from node `from` (its volume, verified; a record here,
    /// stopped, generation 0, held from the reconcile loop until assigned here).
    pub fn move_in(&self, name: &Name, from: &str) -> NResult<Response> {
        let m = self.transfer_member()?;
        if lock(&self.state).ves.contains_key(name) {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("VE '{name}' already exists on node {}", m.name),
            ));
        }
        let started = Instant::now();
        let what = format!("the volume of VE '{name}' from node {from}");
        let (mut s, h): (_, VolumeHeader) = self.open_tree_stream(
            from,
            StreamRequest::Volume { name: name.to_string() },
            &what,
            |h: &VolumeHeader| h.version,
        )?;
        let rec = h.record;
        if &rec.spec.name != name {
            return Err(err(
                ErrorCode::Conflict,
                format!("{what}: it is VE '{}'", rec.spec.name),
            ));
        }
        let tid = rec.template_id.clone();
        if !template::is_installed(&self.layout.template(&tid)) {
            // The volume is read over its template's index: the very same template (by id).
            // The volume stream is dropped meanwhile (the source would not wait for it) and
            // asked for again.
            drop(s);
            self.fetch_template_from(from, rec.spec.template.as_str(), Some(&tid), &mut |_, _, _| {})?;
            return self.move_in(name, from);
        }
        let staging = self
            .layout
            .ves()
            .join(format!(".move-{name}-{}", vessel_ve::buildcache::unique_suffix()));
        let vol = staging.join("volume");
        let got = (|| {
            std::fs::create_dir_all(&vol).map_err(|e| internal("create the staging dir", e))?;
            let got = xfer::receive(&mut s, &vol, &mut |_| Ok(()), &mut |_| {}).map_err(|e| xfer_err(&what, e))?;
            xfer::sync_fs(&vol).map_err(|e| internal("sync", e))?;
            let ip = self.adopt_moved(rec.clone(), &vol)?;
            Ok::<_, ApiError>((got, ip))
        })();
        let _ = std::fs::remove_dir_all(&staging);
        let (got, ip) = got?;
        tracing::info!(
            ve = %name, from, files = got.items, bytes = got.bytes, ms = started.elapsed().as_millis() as u64,
            "received a moved VE"
        );
        Ok(Response::Moved {
            items: got.items,
            bytes: got.bytes,
            ip,
        })
    }

    /// Make the record of a VE whose volume arrived at `vol`: same spec (name, address),
    /// its uid slot (cluster identity; else one of this node's), stopped, generation 0;
    /// held from the reconcile loop.
    pub(crate) fn adopt_moved(
        &self,
        mut rec: VeRecord,
        vol: &std::path::Path,
    ) -> NResult<Option<vessel_types::Ipv4Cidr>> {
        let name = rec.spec.name.clone();
        let ve = self.layout.ve(name.as_str());
        // In a cluster the VE keeps its address and uid range: its identity in etcd (whose
        // node the switch moves here, in the same transaction as the placement).
        let claimed = self.network_identity(&name).ok().flatten();
        {
            let mut st = lock(&self.state);
            if st.ves.contains_key(&name) {
                return Err(err(
                    ErrorCode::AlreadyExists,
                    format!("VE '{name}' already exists here"),
                ));
            }
            let used: Vec<_> = st
                .ves
                .values()
                .filter_map(|v| v.spec.ip.map(|ip| (ip.addr, v.spec.name.to_string())))
                .collect();
            let slots: std::collections::BTreeSet<u32> = st.ves.values().map(|v| v.slot).collect();
            match &claimed {
                Some(id) if !slots.contains(&id.slot) && !used.iter().any(|(a, _)| *a == id.ip.addr) => {
                    rec.spec.ip = Some(id.ip);
                    rec.slot = id.slot;
                }
                _ => {
                    let ip = moved_address(&st.config.subnet, rec.spec.ip, &used)
                        .map_err(|e| err(ErrorCode::Exhausted, e))?;
                    if rec.spec.ip != Some(ip) {
                        tracing::info!(ve = %name, old = ?rec.spec.ip, new = %ip, "the moved VE's address is outside this node's subnet: it gets a new one");
                    }
                    rec.spec.ip = Some(ip);
                    rec.slot = crate::alloc::alloc_slot(&slots)
                        .ok_or_else(|| err(ErrorCode::Exhausted, "no free uid range left on this node"))?;
                }
            }
            rec.status = VeStatus::Stopped;
            rec.pid = None;
            rec.pid_start = None;
            rec.resume = false;
            rec.rescue = false;
            rec.restart_pending = false;
            rec.generation = 0;
            std::fs::create_dir_all(&ve.dir).map_err(|e| internal("create the VE dir", e))?;
            std::fs::rename(vol, ve.volume()).map_err(|e| internal("move the volume into place", e))?;
            let tpl_root = self.layout.template_rootfs(&rec.template_id);
            let req = crate::node::rootfs_request(&rec, &ve, &tpl_root);
            let made =
                vessel_ve::rootfs::RootFs::create(&self.rootfs, &req).map_err(|e| internal("create VE storage", e));
            lock(&self.moves.marks).insert(
                name.clone(),
                Mark {
                    outgoing: false,
                    since: Instant::now(),
                    sent: Default::default(),
                },
            );
            st.ves.insert(name.clone(), rec);
            let saved = made.and_then(|_| self.save(&st));
            if let Err(e) = saved {
                st.ves.remove(&name);
                let _ = self.save(&st);
                drop(st);
                let _ = std::fs::remove_dir_all(&ve.dir);
                return Err(e);
            }
        }
        if let Err(e) = self.sync_bridge_filter() {
            tracing::warn!(ve = %name, "{e}");
        }
        Ok(self.record(&name)?.spec.ip)
    }

    /// `vessel ve move NAME --to NODE` on any node: carried out by the VE's node.
    pub fn ve_move(
        &self,
        name: &Name,
        to: &str,
        progress: &mut vessel_ve::Progress,
    ) -> NResult<vessel_types::api::VeInfo> {
        let m = self.transfer_member()?;
        if lock(&self.state).ves.contains_key(name) {
            return self.move_out(m, name, to, progress);
        }
        let place: Option<Placement> = m
            .block_on(m.store().get(&keys::ve(name.as_str(), "place")))
            .map_err(|e| err(ErrorCode::Unavailable, format!("the cluster's control store: {e}")))?;
        let at = place
            .and_then(|p| p.node)
            .ok_or_else(|| err(ErrorCode::NotFound, format!("VE '{name}' is on no node")))?;
        progress(
            &format!("moving VE '{name}' from node {at} to node {to} (carried out by node {at})"),
            0,
            0,
        );
        match self.api_on(
            &at,
            Request::VeMove {
                name: name.clone(),
                to: to.to_string(),
            },
            MOVE_IN_WAIT,
        )? {
            Response::Ve(i) => Ok(*i),
            other => Err(err(ErrorCode::Internal, format!("node {at} answered {other:?}"))),
        }
    }

    /// The move as the VE's node carries it out.
    pub(crate) fn move_out(
        &self,
        m: &Member,
        name: &Name,
        to: &str,
        progress: &mut vessel_ve::Progress,
    ) -> NResult<vessel_types::api::VeInfo> {
        if to == m.name {
            return Err(err(
                ErrorCode::InvalidArgument,
                format!("VE '{name}' is on node {to} already"),
            ));
        }
        let started = Instant::now();
        let _b = crate::control::busy(self, name);
        let (_mark, sent) = self.moves.mark_out(name)?;
        // The target must be a live node before anything is stopped.
        let live: Option<NodeRecord> = m
            .block_on(m.store().get(&keys::node(to)))
            .map_err(|e| err(ErrorCode::Unavailable, format!("the cluster's control store: {e}")))?;
        if live.is_none() {
            return Err(err(
                ErrorCode::NotFound,
                format!("node {to} is not a live node of the cluster: see `vessel node list`"),
            ));
        }
        let rec = self.record(name)?;
        if rec.rescue {
            return Err(err(
                ErrorCode::Conflict,
                format!("VE '{name}' is in rescue mode: end it first"),
            ));
        }
        let was_running = rec.status == VeStatus::Running;
        if was_running {
            progress(&format!("stopping VE '{name}'"), 0, 0);
            self.stop(name, Duration::from_secs(30))?;
        }
        let vol = self.layout.ve(name.as_str()).volume();
        let total = dir_bytes(&vol);
        let restore = |e: ApiError| {
            let mut msg = format!("VE '{name}' stays on node {}: {}", m.name, e.message);
            if was_running {
                if let Err(s) = self.start(name) {
                    msg.push_str(&format!(" (and starting it again failed: {})", s.message));
                }
            }
            err(e.code, msg)
        };
        // A replicated VE: a writer change to an in-sync copy, else the copy below with
        // the volume's record rewritten in the switch (`move_repl`).
        let vcfg = match self.volume_record(m, name) {
            Ok(c) => c,
            Err(e) => return Err(restore(e)),
        };
        let plan = crate::move_repl::plan(vcfg.as_ref().map(|(c, _)| c), &m.name, to)
            .map_err(|e| restore(err(ErrorCode::Conflict, e)))?;
        let vol_rev = vcfg.as_ref().map_or(0, |(_, r)| *r);
        let (bytes, new_ip, vol_next, adopted) = match plan {
            crate::move_repl::MovePlan::Adopt { next } => {
                progress(
                    &format!("node {to} has an in-sync copy of VE '{name}': a writer change, nothing copied"),
                    0,
                    0,
                );
                match self.hand_over(m, name, to, &next, vol_rev) {
                    Ok(ip) => (0, ip, None, true),
                    Err(e) => return Err(restore(e)),
                }
            }
            crate::move_repl::MovePlan::Copy { next } => {
                let (bytes, ip) = self.copy_to(m, name, to, total, &sent, progress).map_err(restore)?;
                (bytes, ip, next, false)
            }
        };
        // A failure from here on, after a writer change: the writer comes back here first.
        let restore = |e: ApiError| {
            if adopted {
                self.take_writer_back(m, name, to);
            }
            restore(e)
        };
        if new_ip.is_some() && new_ip != rec.spec.ip {
            progress(
                &format!(
                    "its address {} is outside node {to}'s subnet: it is {} there",
                    rec.spec.ip.map(|i| i.to_string()).unwrap_or_default(),
                    new_ip.map(|i| i.to_string()).unwrap_or_default()
                ),
                bytes,
                total,
            );
        }
        // The switch: one transaction guarded by the spec's and the placement's revisions.
        let spec_key = keys::ve(name.as_str(), "spec");
        let place_key = keys::ve(name.as_str(), "place");
        let switched = m.block_on(async {
            let st = m.store();
            let Some((mut e, erev)) = st.get_rev::<VeEntry>(&spec_key).await? else {
                return Ok(None);
            };
            let prev = st.get_rev::<Placement>(&place_key).await?;
            let prev_rev = prev.as_ref().map_or(0, |(_, r)| *r);
            if prev.as_ref().and_then(|(p, _)| p.node.as_deref()) != Some(m.name.as_str()) {
                return Ok(None);
            }
            e.generation = e.generation.max(rec.generation) + 1;
            e.run = was_running;
            if new_ip.is_some() {
                e.spec.ip = new_ip;
            }
            if e.node.as_deref().is_some_and(|n| n != to) {
                e.node = Some(to.to_string());
            }
            let place = Placement {
                node: Some(to.to_string()),
                pending: None,
                move_to: None,
            };
            let mut writes = vec![
                Write::Put(spec_key.clone(), keys::encode(&e)),
                Write::Put(place_key.clone(), keys::encode(&place)),
                Write::Delete(keys::assigned(&m.name, name.as_str())),
                Write::Put(keys::assigned(to, name.as_str()), keys::encode(&name.as_str())),
            ];
            let mut guards = vec![(spec_key.clone(), erev), (place_key.clone(), prev_rev)];
            // A copied replicated volume: its record names the target in this node's place.
            if let Some(next) = &vol_next {
                let key = crate::replicate::volume_key(name.as_str());
                writes.push(Write::Put(key.clone(), keys::encode(next)));
                guards.push((key, vol_rev));
            }
            // The VE's network identity follows it (the overlay's entries point there).
            let net_key = keys::ve_net(name.as_str());
            if let Some((mut id, rev)) = st.get_rev::<keys::NetIdentity>(&net_key).await? {
                id.node = to.to_string();
                writes.push(Write::Put(net_key.clone(), keys::encode(&id)));
                guards.push((net_key, rev));
            }
            let ok = st.write_if(&guards, writes).await?;
            Ok::<_, vessel_cluster::ClusterError>(ok.then_some(e.generation))
        });
        let generation =
            match switched {
                Ok(Some(g)) => g,
                Ok(None) => return Err(restore(err(
                    ErrorCode::Conflict,
                    "its spec or placement changed during the copy (the copy on the target is removed by that node)"
                        .to_string(),
                ))),
                Err(e) => {
                    return Err(restore(err(
                        ErrorCode::Unavailable,
                        format!("the cluster's control store: {e}"),
                    )))
                }
            };
        lock(&self.moves.failed).remove(name);
        progress(
            &format!("VE '{name}' is node {to}'s now; waiting for it to take over"),
            bytes,
            total,
        );
        // The target's reconcile loop applies the generation (starting it if it ran).
        let until = Instant::now() + TAKE_OVER_WAIT;
        let status_key = keys::ve(name.as_str(), "status");
        let mut info = None;
        while Instant::now() < until {
            if let Ok(Some(o)) = m.block_on(m.store().get::<VeObserved>(&status_key)) {
                if o.node == to && o.generation >= generation {
                    info = Some(o);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let runs = |o: &VeObserved| !was_running || o.info.status == VeStatus::Running;
        match info {
            Some(o) if o.error.is_none() && runs(&o) => {
                // Confirmed: this node's copy goes (after a writer change, its volume
                // stays as a copy of the new writer's).
                if adopted {
                    if let Err(e) = self.become_copy(name) {
                        tracing::warn!(ve = %name, "keeping the moved VE's volume as a copy: {}", e.message);
                    }
                }
                if let Err(e) = self.destroy(name, true) {
                    tracing::warn!(ve = %name, "removing the moved VE's old copy: {}", e.message);
                }
                self.forget_published(name);
                let mut i = o.info;
                i.node = o.node;
                let how = if adopted {
                    "a writer change to its copy there, nothing copied (this node keeps a copy)".to_string()
                } else {
                    format!("{bytes} bytes")
                };
                // The time first: a terminal's progress line is cut at its width.
                progress(
                    &format!(
                        "moved VE '{name}' to node {to} in {:.1} s: {how}",
                        started.elapsed().as_secs_f64()
                    ),
                    bytes,
                    total,
                );
                Ok(i)
            }
            Some(o) => Err(err(
                ErrorCode::Conflict,
                format!(
                    "VE '{name}' is on node {to} now, but it is {} there: {} (this node keeps its copy until it runs there)",
                    o.info.status.as_str(),
                    o.error.or(o.info.last_error).unwrap_or_default()
                ),
            )),
            None => Err(err(
                ErrorCode::Unavailable,
                format!(
                    "VE '{name}' is on node {to} now, but that node did not report it within {} s (this node keeps its copy until it does)",
                    TAKE_OVER_WAIT.as_secs()
                ),
            )),
        }
    }

    /// The cold copy of a stopped VE's volume to `to` (the target pulls it); returns the
    /// bytes copied and the VE's address there.
    fn copy_to(
        &self,
        m: &Member,
        name: &Name,
        to: &str,
        total: u64,
        sent: &AtomicU64,
        progress: &mut vessel_ve::Progress,
    ) -> NResult<(u64, Option<vessel_types::Ipv4Cidr>)> {
        progress(&format!("copying VE '{name}' to node {to}"), 0, total);
        // The target pulls the volume; its progress is the bytes this node has sent.
        let (tx, rx) = std::sync::mpsc::channel();
        let moved = std::thread::scope(|sc| {
            sc.spawn(move || {
                let r = self.api_on(
                    to,
                    Request::VeMoveIn {
                        name: name.clone(),
                        from: m.name.clone(),
                    },
                    MOVE_IN_WAIT,
                );
                let _ = tx.send(r);
            });
            loop {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(r) => break r,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => progress(
                        &format!("copying VE '{name}' to node {to}"),
                        sent.load(Ordering::Relaxed),
                        total,
                    ),
                    Err(_) => break Err(err(ErrorCode::Internal, "the copy's thread ended without an answer")),
                }
            }
        });
        match moved? {
            Response::Moved { bytes, ip, .. } => {
                progress(
                    &format!("copied {bytes} bytes to node {to}; switching the VE over"),
                    bytes,
                    total,
                );
                Ok((bytes, ip))
            }
            other => Err(err(ErrorCode::Internal, format!("node {to} answered {other:?}"))),
        }
    }

    /// A drain move the leader asked for (`Placement.move_to`): once per target, not in a
    /// loop; a failure is reported in the VE's status.
    pub(crate) fn drain_move(&self, m: &Member, name: &Name, to: &str) -> NResult<()> {
        if lock(&self.moves.failed).get(name).is_some_and(|t| t == to) {
            return Ok(());
        }
        tracing::info!(ve = %name, to, "its node is draining: moving it");
        match self.move_out(m, name, to, &mut |_, _, _| {}) {
            Ok(_) => Ok(()),
            Err(e) => {
                lock(&self.moves.failed).insert(name.clone(), to.to_string());
                Err(e)
            }
        }
    }

    /// A copy of a VE the cluster placed on another node: removed once that node has it.
    pub(crate) fn release(&self, m: &Member, name: &Name) -> NResult<()> {
        let (entry, place, observed) = m
            .block_on(async {
                let st = m.store();
                Ok::<_, vessel_cluster::ClusterError>((
                    st.get::<VeEntry>(&keys::ve(name.as_str(), "spec")).await?,
                    st.get::<Placement>(&keys::ve(name.as_str(), "place")).await?,
                    st.get::<VeObserved>(&keys::ve(name.as_str(), "status")).await?,
                ))
            })
            .map_err(|e| err(ErrorCode::Unavailable, format!("the cluster's control store: {e}")))?;
        let entry = entry.ok_or_else(|| err(ErrorCode::NotFound, "no spec"))?;
        copy_is_stale(&m.name, &entry, place.as_ref(), observed.as_ref())
            .map_err(|why| err(ErrorCode::Conflict, why))?;
        tracing::info!(ve = %name, "removing this node's old copy: another node has the VE");
        self.destroy(name, true)?;
        self.forget_published(name);
        Ok(())
    }

    /// This node's moves, for the reconcile loop.
    pub(crate) fn moves(&self) -> &Moves {
        &self.moves
    }
}

/// The address a moved VE gets on this node (pure): its own if this node's subnet holds
/// it and no VE here has it, else the next free one (per-node subnets until cluster-wide
/// address management).
pub fn moved_address(
    subnet: &vessel_types::Ipv4Cidr,
    have: Option<vessel_types::Ipv4Cidr>,
    used: &[(std::net::Ipv4Addr, String)],
) -> Result<vessel_types::Ipv4Cidr, String> {
    if let Some(ip) = have {
        if let Ok(ip) = crate::alloc::check_ip(subnet, ip, used) {
            return Ok(ip);
        }
    }
    let used: std::collections::BTreeSet<_> = used.iter().map(|(a, _)| *a).collect();
    crate::alloc::alloc_ip(subnet, &used).ok_or_else(|| format!("no free address left in {subnet}"))
}

/// A reader that counts what went through it.
struct Counted<R> {
    r: R,
    n: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.r.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// Bytes of the regular files under `dir` (the progress total; links counted once).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    xfer::list(dir)
        .map(|items| {
            items
                .iter()
                .filter(|i| i.link.is_none() && i.entry.kind == template::EntryKind::File)
                .filter_map(|i| std::fs::metadata(dir.join(&i.entry.path)).ok())
                .map(|md| md.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64) -> VeEntry {
        let spec: vessel_types::VeSpec =
            serde_json::from_value(serde_json::json!({"name": "web", "template": "busybox"})).unwrap();
        VeEntry {
            generation,
            ..VeEntry::new(spec, true)
        }
    }

    fn place(n: &str) -> Placement {
        Placement {
            node: Some(n.into()),
            pending: None,
            move_to: None,
        }
    }

    fn seen(node: &str, generation: u64, error: Option<&str>) -> VeObserved {
        let info: vessel_types::api::VeInfo = serde_json::from_value(serde_json::json!({
            "spec": {"name": "web", "template": "busybox"}, "status": "running", "uid_base": 0,
            "uid_count": 0, "template_id": "", "created_unix": 0
        }))
        .unwrap();
        VeObserved {
            node: node.into(),
            generation,
            info,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn a_copy_goes_only_once_its_new_node_reported_the_current_generation() {
        let e = entry(5);
        // Moved to b, and b runs generation 5: the copy on a is stale.
        assert!(copy_is_stale("a", &e, Some(&place("b")), Some(&seen("b", 5, None))).is_ok());
        // b has not reported (or reported an older generation, or another node did).
        assert!(copy_is_stale("a", &e, Some(&place("b")), None).is_err());
        assert!(copy_is_stale("a", &e, Some(&place("b")), Some(&seen("b", 4, None))).is_err());
        assert!(copy_is_stale("a", &e, Some(&place("b")), Some(&seen("a", 5, None))).is_err());
        // b failed to apply it: the copy here stays.
        let r = copy_is_stale("a", &e, Some(&place("b")), Some(&seen("b", 5, Some("no room"))));
        assert!(r.unwrap_err().contains("no room"));
        // Placed here or nowhere: never removed.
        assert!(copy_is_stale("a", &e, Some(&place("a")), Some(&seen("a", 5, None))).is_err());
        assert!(copy_is_stale("a", &e, None, Some(&seen("b", 5, None))).is_err());
    }

    #[test]
    fn received_template_entries_must_equal_the_manifest() {
        let f = |sha: &str| Entry {
            path: "bin/sh".into(),
            kind: template::EntryKind::File,
            mode: 0o755,
            uid: 0,
            gid: 0,
            size: 3,
            sha256: Some(sha.into()),
            target: None,
            rdev: 0,
        };
        assert!(entry_matches(Some(&f("aa")), &f("aa")).is_ok());
        assert!(entry_matches(Some(&f("aa")), &f("bb"))
            .unwrap_err()
            .contains("content does not match"));
        let mut g = f("aa");
        g.mode = 0o4755;
        assert!(entry_matches(Some(&f("aa")), &g).unwrap_err().contains("mode"));
        assert!(entry_matches(None, &f("aa"))
            .unwrap_err()
            .contains("not in the template's manifest"));
    }

    #[test]
    fn a_moved_ve_keeps_its_address_where_the_subnet_holds_it() {
        let net: vessel_types::Ipv4Cidr = "10.1.2.0/24".parse().unwrap();
        let ip = |s: &str| -> vessel_types::Ipv4Cidr { s.parse().unwrap() };
        let used = vec![("10.1.2.2".parse().unwrap(), "a".to_string())];
        assert_eq!(
            moved_address(&net, Some(ip("10.1.2.7/24")), &used),
            Ok(ip("10.1.2.7/24"))
        );
        // Taken here, or another node's subnet: the next free address of this one.
        assert_eq!(
            moved_address(&net, Some(ip("10.1.2.2/24")), &used),
            Ok(ip("10.1.2.3/24"))
        );
        assert_eq!(
            moved_address(&net, Some(ip("10.1.1.2/24")), &used),
            Ok(ip("10.1.2.3/24"))
        );
        assert_eq!(moved_address(&net, None, &[]), Ok(ip("10.1.2.2/24")));
    }
}
