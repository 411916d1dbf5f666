//! The control center as the node daemon runs it: the leader's scheduler loop, this node's
//! reconcile loop, and the cluster side of the VE requests the API serves.
//!
//! ```text
//! CLI ─▶ any node: VeEntry {spec, generation, run, deleted} ─▶ /vessel/v1/ves/<ve>/spec
//!        leader (one, elected): schedule(snapshot) ─▶ /ves/<ve>/place  (guarded by its election key)
//!        the placed node: reconcile(assigned, local) ─▶ create/update/start/stop/destroy,
//!                         then /ves/<ve>/status = VeObserved {node, generation, info, error}
//! ```
//! * A request for a VE on this node is carried out here at once (the CLI gets its result
//!   and errors as on one machine), then the new generation is written to the store; the
//!   node's VE record keeps the generation it applied, so the reconcile loop sees nothing
//!   left to do. A request for a VE on another node writes the next generation and waits
//!   for that node's status to reach it.
//! * A create writes the spec (only if the name is free in the whole cluster), waits for
//!   the leader's placement (the leader, if this node is it, places at once) and then
//!   creates here or waits for the placed node.
//! * The reconcile loop wakes at every change in the store and every 2 s. VEs a request
//!   thread is working on are left to it (`busy`).
//! * Without the store (etcd unreachable) the node's VEs keep running and local requests
//!   still work, except create and destroy (the cluster must know about those); what the
//!   node changed meanwhile is published when the store is back.

use crate::cluster::Member;
use crate::node::{err, NResult, Node};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vessel_cluster::keys::{self, Placement, VeEntry, VeObserved};
use vessel_cluster::store::{Guarded, Leadership, Store, Write};
use vessel_cluster::ClusterError;
use vessel_control::model::{Node as CNode, NodeState, Policy, Resources, Snapshot, Ve as CVe};
use vessel_control::reconcile::{reconcile, Assigned, Local, Others, Step};
use vessel_control::schedule::{schedule, Action};
use vessel_types::api::{ErrorCode, NodeRecord, VeChange, VeInfo};
use vessel_types::{Name, VeSpec, VeStatus};

/// How long a request waits for the leader to place a new VE.
const PLACE_WAIT: Duration = Duration::from_secs(10);
/// How long a request waits for another node to apply a change.
const APPLY_WAIT: Duration = Duration::from_secs(120);

/// The control layer's per-node bookkeeping.
#[derive(Default)]
pub struct ControlState {
    /// VEs a request thread is working on: the reconcile loop leaves them alone.
    busy: Mutex<BTreeSet<Name>>,
    /// What was last published as each local VE's status (to publish changes only).
    published: Mutex<HashMap<Name, String>>,
    /// The template names last published for this node.
    templates: Mutex<Option<Vec<String>>>,
    /// Imports under way (their VE's name may not be known before the archive is read):
    /// the reconcile loop adopts nothing meanwhile.
    importing: std::sync::atomic::AtomicUsize,
}

struct Importing<'a>(&'a ControlState);

impl<'a> Importing<'a> {
    fn new(c: &'a ControlState) -> Self {
        c.importing.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Importing(c)
    }
}

impl Drop for Importing<'_> {
    fn drop(&mut self) {
        self.0.importing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Everything the store holds about one VE.
#[derive(Debug, Default, Clone)]
pub struct ClusterVe {
    pub entry: Option<(VeEntry, i64)>,
    pub place: Option<(Placement, i64)>,
    pub observed: Option<VeObserved>,
}

fn unavailable(e: impl std::fmt::Display) -> vessel_types::api::ApiError {
    err(ErrorCode::Unavailable, format!("the cluster's control store: {e}"))
}

/// Every VE the store knows, by name.
pub async fn read_ves(store: &Store) -> Result<BTreeMap<String, ClusterVe>, ClusterError> {
    let mut out: BTreeMap<String, ClusterVe> = BTreeMap::new();
    for kv in store.list_raw(&keys::ves()).await? {
        let Some((ve, part)) = keys::ve_part(&kv.key) else {
            continue;
        };
        let e = out.entry(ve.to_string()).or_default();
        match part {
            "spec" => e.entry = Some((keys::decode(&kv.key, &kv.value)?, kv.mod_revision)),
            "place" => e.place = Some((keys::decode(&kv.key, &kv.value)?, kv.mod_revision)),
            "status" => e.observed = Some(keys::decode(&kv.key, &kv.value)?),
            _ => {}
        }
    }
    Ok(out)
}

/// The nodes as the scheduler sees them: members, ready or draining while their lease
/// lives, lost otherwise.
pub(crate) async fn read_nodes(store: &Store) -> Result<Vec<CNode>, ClusterError> {
    let members: Vec<NodeRecord> = store.list(&keys::members()).await?;
    let alive = store.nodes().await?;
    let mut templates: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for kv in store.list_raw(&keys::templates("")).await? {
        let names: Vec<String> = keys::decode(&kv.key, &kv.value)?;
        let node = kv.key.trim_start_matches(&keys::templates(""));
        templates.insert(node.to_string(), names.into_iter().collect());
    }
    Ok(members
        .into_iter()
        .map(|m| {
            let live = alive.iter().find(|a| a.name == m.name);
            let state = NodeState::of(live.is_some(), m.draining);
            let r = live.unwrap_or(&m);
            CNode {
                name: m.name.clone(),
                state,
                allocatable: Resources {
                    cpu_milli: u64::from(r.cpus) * 1000,
                    memory: r.memory,
                    disk: r.disk,
                },
                labels: r.labels.clone(),
                templates: Some(templates.remove(&m.name).unwrap_or_default()),
            }
        })
        .collect())
}

/// What a VE asks the scheduler for. Its caps are limits, not requests: a VE asks for the
/// memory it is guaranteed (`--memory-low`) and shares the rest; CPU and disk are shared.
fn requests(spec: &VeSpec) -> Resources {
    Resources {
        cpu_milli: 0,
        memory: spec.limits.memory_low.unwrap_or(0),
        disk: 0,
    }
}

fn snapshot(nodes: Vec<CNode>, ves: &BTreeMap<String, ClusterVe>) -> Snapshot {
    let mut s = Snapshot {
        nodes,
        ..Snapshot::default()
    };
    for (name, v) in ves {
        let Some((e, _)) = &v.entry else { continue };
        let placed = v.place.as_ref().and_then(|(p, _)| p.node.clone());
        // A deleted VE keeps its place (and its load) until its node has removed it.
        if e.deleted && placed.is_none() {
            continue;
        }
        s.ves.push(CVe {
            name: name.clone(),
            generation: e.generation,
            requests: requests(&e.spec),
            node: e.node.clone(),
            labels: e.labels.clone(),
            template: Some(e.spec.template.to_string()),
        });
        if let Some(n) = placed {
            s.placements.insert(name.clone(), n);
        }
    }
    s
}

/// One pass of the scheduler: read, decide, write what changed (each write guarded by
/// the leadership and by the placement's revision). Returns the number of writes.
pub async fn schedule_once(store: &Store, l: &Leadership) -> Result<usize, ClusterError> {
    let ves = read_ves(store).await?;
    let snap = snapshot(read_nodes(store).await?, &ves);
    let mut batch = Vec::new();
    for action in schedule(&snap, &Policy::default()) {
        let (ve, want) = match action {
            Action::Place { ve, node } => (
                ve,
                Some(Placement {
                    node: Some(node),
                    pending: None,
                    move_to: None,
                }),
            ),
            Action::Pending { ve, reason } => {
                // A VE on a draining node that fits nowhere else stays where it is.
                let stays = snap
                    .placements
                    .get(&ve)
                    .filter(|at| {
                        snap.nodes
                            .iter()
                            .any(|n| &n.name == *at && n.state == NodeState::Draining)
                    })
                    .cloned();
                (
                    ve,
                    Some(Placement {
                        node: stays,
                        pending: Some(reason),
                        move_to: None,
                    }),
                )
            }
            // Its node is draining: that node moves it (`ve move`'s path) and switches the
            // placement when the copy is whole (`transfer`).
            Action::Move { ve, from, to } => (
                ve,
                Some(Placement {
                    node: Some(from.clone()),
                    pending: Some(format!("its node {from} is draining: moving to node {to}")),
                    move_to: Some(to),
                }),
            ),
            Action::Forget { ve } => (ve, None),
            Action::Stranded { ve, node, reason } => (
                ve,
                Some(Placement {
                    node: Some(node),
                    pending: Some(reason),
                    move_to: None,
                }),
            ),
        };
        let key = keys::ve(&ve, "place");
        let (have, rev) = match ves.get(&ve).and_then(|v| v.place.clone()) {
            Some((p, r)) => (Some(p), r),
            None => (None, 0),
        };
        if have == want {
            continue;
        }
        let old = have.as_ref().and_then(|p| p.node.clone());
        let new = want.as_ref().and_then(|p| p.node.clone());
        let mut w = Vec::new();
        match &want {
            Some(p) => w.push(Write::Put(key.clone(), keys::encode(p))),
            None => w.push(Write::Delete(key.clone())),
        }
        if old != new {
            if let Some(o) = &old {
                w.push(Write::Delete(keys::assigned(o, &ve)));
            }
            if let Some(n) = &new {
                w.push(Write::Put(keys::assigned(n, &ve), keys::encode(&ve)));
            }
        }
        batch.push(Guarded {
            key,
            mod_revision: rev,
            writes: w,
        });
    }
    let writes = store.write_as_leader(l, batch).await?;
    Ok(writes)
}

/// The leader's loop: schedule at every change in the store and every 2 s, until the
/// leadership is gone (a write refused as not leader ends it).
pub async fn lead(store: Store, l: Leadership, changed: Arc<tokio::sync::Notify>) {
    loop {
        match schedule_once(&store, &l).await {
            Ok(_) => {}
            Err(ClusterError::NotLeader) => {
                tracing::warn!("no longer the control center's leader: the scheduler stops");
                return;
            }
            Err(e) => tracing::warn!("scheduler: {e}"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), changed.notified()).await;
        // Let a burst of changes settle into one pass.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------- this node's side

pub(crate) struct Busy<'a> {
    state: &'a ControlState,
    name: Name,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.state
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

pub(crate) fn busy<'a>(node: &'a Node, name: &Name) -> Busy<'a> {
    node.control
        .busy
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.clone());
    Busy {
        state: &node.control,
        name: name.clone(),
    }
}

impl Node {
    fn member_opt(&self) -> Option<&Arc<Member>> {
        self.cluster.get()
    }

    fn is_local(&self, name: &Name) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ves
            .contains_key(name)
    }

    /// A local VE as the cluster shows it.
    fn local_info(&self, name: &Name) -> NResult<VeInfo> {
        let mut i = self.show(name)?;
        if let Some(m) = self.member_opt() {
            i.node = m.name.clone();
        }
        Ok(i)
    }

    /// Publish a local VE's status (and, when the store is behind, its spec): after every
    /// change this node makes.
    fn publish(&self, m: &Member, name: &Name) {
        let Ok(rec) = self.record(name) else { return };
        let mut info = self.info(&rec);
        info.node = m.name.clone();
        let digest = digest(&info);
        let spec_key = keys::ve(name.as_str(), "spec");
        let r = m.block_on(async {
            let st = m.store();
            let have: Option<(VeEntry, i64)> = st.get_rev(&spec_key).await?;
            let behind = have.as_ref().is_none_or(|(e, _)| e.generation < rec.generation.max(1));
            if behind {
                let entry = VeEntry {
                    generation: rec.generation.max(1),
                    node: have.as_ref().and_then(|(e, _)| e.node.clone()),
                    labels: have.as_ref().map(|(e, _)| e.labels.clone()).unwrap_or_default(),
                    ..VeEntry::new(rec.spec.clone(), rec.status == VeStatus::Running)
                };
                st.put(&spec_key, &entry).await?;
                // A VE this node has is placed here (the leader would only place it anew).
                let placed_here = st
                    .create(
                        &keys::ve(name.as_str(), "place"),
                        &Placement {
                            node: Some(m.name.clone()),
                            pending: None,
                            move_to: None,
                        },
                    )
                    .await?;
                if placed_here {
                    st.put(&keys::assigned(&m.name, name.as_str()), &name.as_str()).await?;
                }
            }
            st.put(
                &keys::ve(name.as_str(), "status"),
                &VeObserved {
                    node: m.name.clone(),
                    generation: rec.generation.max(1),
                    info: info.clone(),
                    error: None,
                },
            )
            .await?;
            Ok::<_, ClusterError>(behind)
        });
        match r {
            Ok(behind) => {
                if rec.generation == 0 || behind {
                    let _ = self.update(name, |r| r.generation = r.generation.max(1));
                }
                self.control
                    .published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), digest);
            }
            Err(e) => tracing::debug!(ve = %name, "publishing to the store: {e}"),
        }
    }

    /// Write the next generation of a local VE's entry after a request changed it here.
    fn advance(&self, m: &Member, name: &Name, f: impl Fn(&mut VeEntry)) {
        let key = keys::ve(name.as_str(), "spec");
        let r = m.block_on(async {
            for _ in 0..5 {
                let Some((mut e, rev)) = m.store().get_rev::<VeEntry>(&key).await? else {
                    return Ok(None);
                };
                e.generation += 1;
                f(&mut e);
                if m.store().put_if(&key, &e, rev).await? {
                    return Ok(Some(e.generation));
                }
            }
            Ok::<_, ClusterError>(None)
        });
        match r {
            Ok(Some(g)) => {
                let _ = self.update(name, |r| r.generation = g);
            }
            Ok(None) => {}
            Err(e) => {
                // Ahead of the store now: the reconcile loop publishes this VE's state as
                // the next generation when the store is back.
                tracing::warn!(ve = %name, "the store did not take the change (published when it is back): {e}");
                let _ = self.update(name, |r| r.generation += 1);
            }
        }
        self.publish(m, name);
    }

    /// After a create here: the spec in the store gets what this node chose (the VE's
    /// address and default limits), at the same generation.
    fn publish_chosen(&self, m: &Member, name: &Name) {
        let Ok(rec) = self.record(name) else { return };
        self.advance(m, name, move |e| {
            e.generation -= 1;
            e.spec = rec.spec.clone();
        });
    }

    // ------------------------------------------------------------------ requests

    /// `ve create [--start]` from this node's API.
    pub fn cluster_create(
        &self,
        spec: VeSpec,
        start: bool,
        rules: &vessel_types::api::PlaceRules,
        progress: &mut dyn FnMut(&str, u64, u64),
    ) -> NResult<VeInfo> {
        let Some(m) = self.member_opt() else {
            return self.create_here(spec, start);
        };
        let mut spec = spec;
        if spec.replicas.is_none() {
            // Decided once, at create, and kept in the spec: nodes joining or leaving later
            // do not change a VE's copies.
            let members: Vec<NodeRecord> = m.block_on(m.store().list(&keys::members())).map_err(unavailable)?;
            spec.replicas = Some(VeSpec::default_replicas(members.len()));
        }
        spec.validate()
            .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let name = spec.name.clone();
        if self.is_local(&name) {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("VE '{name}' already exists: pick another name or destroy it first"),
            ));
        }
        self.check_template_somewhere(m, &spec)?;
        let _b = busy(self, &name);
        let entry = VeEntry {
            node: rules.node.clone(),
            labels: rules.labels.clone(),
            ..VeEntry::new(spec.clone(), start)
        };
        let spec_key = keys::ve(name.as_str(), "spec");
        let place_key = keys::ve(name.as_str(), "place");
        let created = m.block_on(m.store().create(&spec_key, &entry)).map_err(unavailable)?;
        if !created {
            let on = m
                .block_on(m.store().get::<Placement>(&place_key))
                .ok()
                .flatten()
                .and_then(|p| p.node)
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default();
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("VE '{name}' already exists{on}: pick another name or destroy it first"),
            ));
        }
        // The leader places it: at once if that is this node, else its loop sees the spec.
        progress("placing", 0, 2);
        if let Some(l) = m.leadership() {
            if let Err(e) = m.block_on(schedule_once(m.store(), &l)) {
                tracing::debug!("scheduling at create: {e}");
            }
        }
        let placed = self.wait_placed(m, &place_key);
        let forget = |why: &str| {
            crate::ipam::release_logged(m, name.as_str());
            let r = m.block_on(async {
                if let Some(n) = m.store().get::<Placement>(&place_key).await?.and_then(|p| p.node) {
                    m.store().delete(&keys::assigned(&n, name.as_str())).await?;
                }
                m.store().delete_prefix(&format!("{}{}/", keys::ves(), name)).await
            });
            if let Err(e) = r {
                tracing::warn!(ve = %name, "removing the spec of a VE that was not created ({why}): {e}");
            }
        };
        match placed {
            Some(Placement { node: Some(n), .. }) if n == m.name => {
                let r = self.create_here(spec, start);
                match r {
                    Ok(_) => {
                        let _ = self.update(&name, |r| r.generation = 1);
                        self.publish_chosen(m, &name);
                        self.local_info(&name)
                    }
                    Err(e) => {
                        forget("its create failed");
                        Err(e)
                    }
                }
            }
            Some(Placement { node: Some(n), .. }) => {
                progress(&format!("creating on node {n}"), 1, 2);
                match self.wait_applied(m, &name, 1) {
                    Ok(i) => Ok(i),
                    Err(e) if e.code == ErrorCode::Unavailable => Err(e),
                    Err(e) => {
                        forget("its create failed on its node");
                        Err(e)
                    }
                }
            }
            other => {
                let reason = other.and_then(|p| p.pending).unwrap_or_else(|| {
                    "no leader of the control center placed it yet: it is placed when one does".to_string()
                });
                Ok(pending_info(&spec, 1, &reason))
            }
        }
    }

    /// A template no node has is a mistake to say at once, not a pending VE.
    fn check_template_somewhere(&self, m: &Member, spec: &VeSpec) -> NResult<()> {
        let here = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .templates
            .contains_key(&spec.template);
        if here {
            return Ok(());
        }
        let t = spec.template.to_string();
        let somewhere = m
            .block_on(m.store().list::<Vec<String>>(&keys::templates("")))
            .map_err(unavailable)?
            .iter()
            .any(|names| names.contains(&t));
        if somewhere {
            return Ok(());
        }
        Err(err(
            ErrorCode::NotFound,
            format!(
                "template '{t}' not found: build it with `vessel template build {t}` or see `vessel template list`"
            ),
        ))
    }

    /// Create (and start) on this node; a failed start leaves nothing half-made.
    fn create_here(&self, spec: VeSpec, start: bool) -> NResult<VeInfo> {
        self.ensure_template(&spec.template)?;
        let name = spec.name.clone();
        let info = self.create(spec)?;
        if !start {
            return Ok(info);
        }
        match self.start(&name) {
            Ok(v) => Ok(v),
            Err(mut e) => {
                if self.destroy(&name, true).is_ok() {
                    e.message.push_str(" (the VE was not created)");
                }
                Err(e)
            }
        }
    }

    fn wait_placed(&self, m: &Member, key: &str) -> Option<Placement> {
        let until = Instant::now() + PLACE_WAIT;
        let mut last = None;
        let mut pause = Duration::from_millis(2);
        while Instant::now() < until {
            if let Ok(Some(p)) = m.block_on(m.store().get::<Placement>(key)) {
                if p.node.is_some() {
                    return Some(p);
                }
                last = Some(p);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        last
    }

    /// Wait until the VE's node has applied `generation` (or failed to).
    fn wait_applied(&self, m: &Member, name: &Name, generation: u64) -> NResult<VeInfo> {
        let until = Instant::now() + APPLY_WAIT;
        let key = keys::ve(name.as_str(), "status");
        let mut pause = Duration::from_millis(5);
        let spec_key = keys::ve(name.as_str(), "spec");
        while Instant::now() < until {
            if let Ok(None) = m.block_on(m.store().get::<VeEntry>(&spec_key)) {
                return Err(err(ErrorCode::NotFound, format!("VE '{name}' is gone")));
            }
            if let Ok(Some(o)) = m.block_on(m.store().get::<VeObserved>(&key)) {
                if o.generation >= generation {
                    if let Some(e) = o.error {
                        return Err(err(ErrorCode::Conflict, format!("on node {}: {e}", o.node)));
                    }
                    let mut i = o.info;
                    i.node = o.node;
                    return Ok(i);
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        Err(err(
            ErrorCode::Unavailable,
            format!(
                "VE '{name}': its node did not apply the change within {}s; `vessel ve show {name}` shows when it does",
                APPLY_WAIT.as_secs()
            ),
        ))
    }

    /// A VE this node does not have, from the store (NotFound if the cluster has none).
    fn remote(&self, m: &Member, name: &Name) -> NResult<ClusterVe> {
        let ves = m
            .block_on(async {
                let st = m.store();
                Ok::<_, ClusterError>(ClusterVe {
                    entry: st.get_rev(&keys::ve(name.as_str(), "spec")).await?,
                    place: st.get_rev(&keys::ve(name.as_str(), "place")).await?,
                    observed: st.get(&keys::ve(name.as_str(), "status")).await?,
                })
            })
            .map_err(unavailable)?;
        match &ves.entry {
            Some((e, _)) if !e.deleted => Ok(ves),
            _ => Err(err(ErrorCode::NotFound, format!("VE '{name}' not found"))),
        }
    }

    /// Change a VE on another node: write its next generation and wait for its node.
    fn change_remote(&self, m: &Member, name: &Name, f: impl Fn(&mut VeEntry) -> NResult<()>) -> NResult<VeInfo> {
        let key = keys::ve(name.as_str(), "spec");
        for _ in 0..5 {
            let v = self.remote(m, name)?;
            let (mut e, rev) = v.entry.expect("remote() returns an entry");
            let node = v.place.and_then(|(p, _)| p.node);
            e.generation += 1;
            f(&mut e)?;
            if m.block_on(m.store().put_if(&key, &e, rev)).map_err(unavailable)? {
                if node.is_none() {
                    return Ok(pending_info(&e.spec, e.generation, "not placed on a node yet"));
                }
                return self.wait_applied(m, name, e.generation);
            }
        }
        Err(err(
            ErrorCode::Conflict,
            format!("VE '{name}' is being changed by someone else: try again"),
        ))
    }

    pub fn cluster_start(&self, name: &Name) -> NResult<VeInfo> {
        self.set_running(name, true, || self.start(name))
    }

    pub fn cluster_stop(&self, name: &Name, timeout: Duration) -> NResult<VeInfo> {
        self.set_running(name, false, || self.stop(name, timeout))
    }

    /// Start or stop: here with `local`, then the next generation says so; on another
    /// node, through the next generation.
    fn set_running(&self, name: &Name, run: bool, local: impl FnOnce() -> NResult<VeInfo>) -> NResult<VeInfo> {
        match self.member_opt() {
            Some(m) if !self.is_local(name) => self.change_remote(m, name, |e| {
                e.run = run;
                Ok(())
            }),
            m => {
                let _b = busy(self, name);
                let i = local()?;
                if let Some(m) = m {
                    self.advance(m, name, |e| e.run = run);
                    return self.local_info(name);
                }
                Ok(i)
            }
        }
    }

    pub fn cluster_set(&self, name: &Name, change: &VeChange) -> NResult<VeInfo> {
        match self.member_opt() {
            Some(m) if !self.is_local(name) => {
                self.opts
                    .settings
                    .limits
                    .check_change(&change.limits)
                    .map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
                self.change_remote(m, name, |e| {
                    let new = change.apply_to(&e.spec);
                    new.validate()
                        .map_err(|x| err(ErrorCode::InvalidArgument, x.to_string()))?;
                    e.spec = new;
                    Ok(())
                })
            }
            m => {
                let _b = busy(self, name);
                let i = self.set(name, change)?;
                if let Some(m) = m {
                    let spec = i.spec.clone();
                    self.advance(m, name, move |e| e.spec = spec.clone());
                    return self.local_info(name);
                }
                Ok(i)
            }
        }
    }

    pub fn cluster_destroy(&self, name: &Name, force: bool) -> NResult<()> {
        let Some(m) = self.member_opt() else {
            return self.destroy(name, force);
        };
        if !self.is_local(name) {
            // On no node yet, or on a node removed from the cluster: nobody else would
            // remove it.
            if let Ok(v) = self.remote(m, name) {
                let gone = match v.place.as_ref().and_then(|(p, _)| p.node.as_ref()) {
                    None => true,
                    Some(n) => matches!(
                        m.block_on(m.store().get::<vessel_cluster::keys::NodeRecord>(&keys::member(n))),
                        Ok(None)
                    ),
                };
                if gone {
                    forget_keys(m, name);
                    return Ok(());
                }
            }
            let running = self
                .remote(m, name)?
                .observed
                .is_some_and(|o| o.info.status == VeStatus::Running);
            if running && !force {
                return Err(err(
                    ErrorCode::Conflict,
                    format!("VE '{name}' is running: stop it first or use --force"),
                ));
            }
            // Its node destroys it, then removes its keys: the wait ends when they are gone.
            self.change_remote(m, name, |e| {
                e.deleted = true;
                Ok(())
            })
            .map(|_| ())
            .or_else(|e| if e.code == ErrorCode::NotFound { Ok(()) } else { Err(e) })?;
            return Ok(());
        }
        let _b = busy(self, name);
        let rec = self.record(name)?;
        if rec.status == VeStatus::Running && !force {
            return Err(err(
                ErrorCode::Conflict,
                format!("VE '{name}' is running: stop it first or use --force"),
            ));
        }
        // The cluster hears first: a destroy it did not hear of would be undone (the VE
        // placed here would be created again).
        let spec_key = keys::ve(name.as_str(), "spec");
        m.block_on(async {
            if let Some((mut e, rev)) = m.store().get_rev::<VeEntry>(&spec_key).await? {
                e.generation += 1;
                e.deleted = true;
                m.store().put_if(&spec_key, &e, rev).await?;
            }
            Ok::<_, ClusterError>(())
        })
        .map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!("VE '{name}' was not destroyed: the cluster's control store does not answer ({e}); try again when it does"),
            )
        })?;
        self.destroy(name, force)?;
        forget_keys(m, name);
        self.control
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    /// `ve import`: a VE made here from an archive. The cluster hears of it once it is
    /// whole (a failed import leaves no record anywhere).
    pub fn cluster_import(&self, name: Option<Name>, start: bool, input: std::os::fd::OwnedFd) -> NResult<VeInfo> {
        let Some(m) = self.member_opt() else {
            return self.import(name, start, input);
        };
        if let Some(name) = &name {
            let known = m
                .block_on(m.store().get::<VeEntry>(&keys::ve(name.as_str(), "spec")))
                .map_err(unavailable)?;
            if known.is_some_and(|e| !e.deleted) {
                return Err(err(
                    ErrorCode::AlreadyExists,
                    format!("VE '{name}' already exists in the cluster: pick another name or destroy it first"),
                ));
            }
        }
        let _g = Importing::new(&self.control);
        let info = self.import(name, start, input)?;
        let name = info.spec.name.clone();
        let _b = busy(self, &name);
        // The name may be a destroyed VE's: its tombstone goes (it would have the new VE
        // destroyed), unless that VE is still being removed from another node.
        let old = spec_and_place(m, &name);
        let refuse = match &old {
            Ok((Some(e), place)) => {
                let there = place.as_ref().and_then(|p| p.node.clone()).filter(|n| *n != m.name);
                match (e.deleted, there) {
                    (true, None) => {
                        forget_keys(m, &name);
                        None
                    }
                    (true, Some(n)) => Some(err(
                        ErrorCode::Conflict,
                        format!("VE '{name}' is still being destroyed on node {n}: import it again when `vessel ve list` no longer shows it"),
                    )),
                    (false, _) => Some(err(
                        ErrorCode::AlreadyExists,
                        format!("VE '{name}' already exists in the cluster: pick another name (--name) or destroy it first"),
                    )),
                }
            }
            Ok((None, _)) => None,
            Err(e) => Some(e.clone()),
        };
        if let Some(why) = refuse {
            if let Err(e) = self.destroy(&name, true) {
                tracing::warn!(ve = %name, "removing the refused import: {}", e.message);
            }
            return Err(why);
        }
        self.publish(m, &name);
        self.local_info(&name)
    }

    /// Every VE of the cluster: this node's, then the others' as their nodes reported them.
    pub fn cluster_list(&self) -> Vec<VeInfo> {
        let mut out: Vec<VeInfo> = self.list();
        let Some(m) = self.member_opt() else { return out };
        for i in out.iter_mut() {
            i.node = m.name.clone();
        }
        let here: BTreeSet<String> = out.iter().map(|i| i.spec.name.to_string()).collect();
        match m.block_on(read_ves(m.store())) {
            Ok(ves) => {
                for (name, v) in ves {
                    if here.contains(&name) {
                        continue;
                    }
                    if let Some(i) = cluster_info(&v) {
                        out.push(i);
                    }
                }
            }
            Err(e) => tracing::debug!("listing the cluster's VEs: {e}"),
        }
        out.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        out
    }

    pub fn cluster_show(&self, name: &Name) -> NResult<VeInfo> {
        match self.member_opt() {
            Some(m) if !self.is_local(name) => {
                let v = self.remote(m, name)?;
                cluster_info(&v).ok_or_else(|| err(ErrorCode::NotFound, format!("VE '{name}' not found")))
            }
            _ => self.local_info(name),
        }
    }

    /// The node a VE this node does not have is placed on (`None`: here, or unknown to
    /// the cluster, so the local path answers); a pending VE is an error with its reason.
    pub fn elsewhere(&self, name: &Name) -> NResult<Option<String>> {
        if self.is_local(name) {
            return Ok(None);
        }
        let Some(m) = self.member_opt() else { return Ok(None) };
        match self.remote(m, name) {
            Ok(v) => {
                let place = v.place.map(|(p, _)| p);
                match place.as_ref().and_then(|p| p.node.clone()) {
                    Some(n) if n == m.name => Ok(None),
                    Some(n) => Ok(Some(n)),
                    None => Err(err(
                        ErrorCode::Unavailable,
                        format!(
                            "VE '{name}' is pending on no node: {}",
                            place.and_then(|p| p.pending).unwrap_or_else(|| "not placed yet".into())
                        ),
                    )),
                }
            }
            // Let the local path give its usual not-found error.
            Err(_) => Ok(None),
        }
    }

    // ------------------------------------------------------------------ reconcile loop

    /// Start this node's reconcile loop (after `recover`).
    pub fn start_reconciler(self: &Arc<Self>) {
        let Some(m) = self.member_opt().cloned() else { return };
        let node = self.clone();
        let _ = std::thread::Builder::new()
            .name("vessel-reconcile".into())
            .spawn(move || loop {
                if let Err(e) = node.reconcile_once(&m) {
                    tracing::debug!("reconcile: {e}");
                }
                let changed = m.changed_node.clone();
                m.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(2), changed.notified()).await;
                });
            });
    }

    /// Tell the cluster which templates this node has (after a build or removal, and
    /// whenever the reconcile loop sees a change).
    pub fn publish_templates(&self) {
        let Some(m) = self.member_opt() else { return };
        let names: Vec<String> = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.templates.keys().map(|n| n.to_string()).collect()
        };
        let mut last = self.control.templates.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&names) {
            return;
        }
        match m.block_on(m.store().put(&keys::templates(&m.name), &names)) {
            Ok(()) => *last = Some(names),
            Err(e) => tracing::debug!("publishing this node's templates: {e}"),
        }
    }

    fn reconcile_once(&self, m: &Member) -> Result<(), ClusterError> {
        self.publish_templates();
        self.sweep_replicas(m);
        let ves = m.block_on(read_ves(m.store()))?;
        let mut busy: BTreeSet<Name> = self.control.busy.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut assigned = Vec::new();
        let mut others = Others::default();
        for (name, v) in &ves {
            let Some((e, _)) = &v.entry else { continue };
            let node = v.place.as_ref().and_then(|(p, _)| p.node.as_deref());
            if e.deleted {
                others.deleted.insert(name.clone());
            } else if node == Some(m.name.as_str()) {
                assigned.push(Assigned {
                    name: name.clone(),
                    generation: e.generation,
                    run: e.run,
                    move_to: v.place.as_ref().and_then(|(p, _)| p.move_to.clone()),
                });
            } else {
                others.elsewhere.insert(name.clone());
            }
        }
        // VEs moving out, or received and not yet assigned here (`transfer`).
        busy.extend(self.moves().held(&|n| assigned.iter().any(|a| a.name == n)));
        let local: Vec<Local> = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.ves
                .values()
                .map(|r| Local {
                    name: r.spec.name.to_string(),
                    generation: r.generation,
                    running: r.status == VeStatus::Running,
                })
                .collect()
        };
        let ahead: BTreeSet<String> = local
            .iter()
            .filter(|l| {
                assigned
                    .iter()
                    .find(|a| a.name == l.name)
                    .is_some_and(|a| l.generation > a.generation)
            })
            .map(|l| l.name.clone())
            .collect();
        for step in reconcile(&assigned, &local, &others) {
            let ve = step_ve(&step);
            let Ok(name) = Name::parse(ve) else { continue };
            // The busy set now, not only as it was when the store was read: a request
            // may have taken the VE since.
            if busy.contains(&name)
                || self
                    .control
                    .busy
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&name)
            {
                continue;
            }
            // An import makes a VE the store may know only as the tombstone of one
            // destroyed before: nothing unassigned is touched while one runs.
            if matches!(
                step,
                Step::Adopt { .. } | Step::Stop { .. } | Step::Destroy { .. } | Step::Release { .. }
            ) && self.control.importing.load(std::sync::atomic::Ordering::SeqCst) > 0
            {
                continue;
            }
            let entry = ves.get(ve).and_then(|v| v.entry.as_ref()).map(|(e, _)| e.clone());
            let r = self.carry_out(m, &step, entry.as_ref());
            if let Err(e) = r {
                tracing::warn!(ve = %name, ?step, "reconcile: {}", e.message);
                let generation = entry.as_ref().map_or(0, |e| e.generation);
                // Tried once: the error is the answer to this generation (no retry loop).
                if matches!(step, Step::Update { .. }) {
                    let _ = self.update(&name, |r| r.generation = generation);
                }
                report_error(m, self, &name, generation, &e.message);
            }
        }
        // Changed here while the store was away: publish.
        for name in &ahead {
            if let Ok(n) = Name::parse(name) {
                if !busy.contains(&n) {
                    self.publish(m, &n);
                }
            }
        }
        // Status changes the node made by itself (exits, restarts by policy).
        let names: Vec<Name> = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.ves.keys().cloned().collect()
        };
        for name in names {
            if busy.contains(&name) {
                continue;
            }
            let Ok(rec) = self.record(&name) else { continue };
            if rec.generation == 0 {
                continue;
            }
            let mut info = self.info(&rec);
            info.node = m.name.clone();
            let d = digest(&info);
            let same = self
                .control
                .published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                == Some(&d);
            if !same {
                self.publish(m, &name);
            }
        }
        Ok(())
    }

    fn carry_out(&self, m: &Member, step: &Step, entry: Option<&VeEntry>) -> NResult<()> {
        let name = Name::parse(step_ve(step)).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        let _b = busy(self, &name);
        if matches!(step, Step::Stop { .. } | Step::Destroy { .. } | Step::Release { .. })
            && !still_unwanted(m, &name, step)?
        {
            tracing::debug!(ve = %name, ?step, "the store changed since it was read: step dropped");
            return Ok(());
        }
        match step {
            Step::Create { generation, start, .. } => {
                let e = entry.ok_or_else(|| err(ErrorCode::NotFound, "no spec"))?;
                tracing::info!(ve = %name, generation, "creating the VE the control center placed here");
                self.create_here(e.spec.clone(), *start)?;
                let _ = self.update(&name, |r| r.generation = *generation);
                self.publish_chosen(m, &name);
            }
            Step::Update { generation, run, .. } => {
                let e = entry.ok_or_else(|| err(ErrorCode::NotFound, "no spec"))?;
                let rec = self.record(&name)?;
                if e.spec != rec.spec {
                    self.set(&name, &full_change(&rec.spec, &e.spec))?;
                }
                match run {
                    Some(true) => {
                        self.start(&name)?;
                    }
                    Some(false) => {
                        self.stop(&name, Duration::from_secs(10))?;
                    }
                    None => {}
                }
                let _ = self.update(&name, |r| r.generation = *generation);
                self.publish(m, &name);
            }
            Step::Stop { .. } => {
                self.stop(&name, Duration::from_secs(10))?;
                self.publish(m, &name);
            }
            Step::Destroy { .. } => {
                tracing::info!(ve = %name, "destroying the VE as the cluster asked");
                self.destroy(&name, true)?;
                forget_keys(m, &name);
                self.control
                    .published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
            }
            Step::Release { .. } => {
                drop(_b);
                self.release(m, &name)?;
            }
            Step::Move { to, .. } => {
                drop(_b);
                self.drain_move(m, &name, to)?;
            }
            Step::Adopt { .. } => {
                tracing::info!(ve = %name, "publishing a VE the cluster did not know");
                self.publish(m, &name);
            }
        }
        Ok(())
    }
}

impl Node {
    /// Forget what was published for a VE this node no longer has (moved away).
    pub(crate) fn forget_published(&self, name: &Name) {
        self.control
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

fn step_ve(s: &Step) -> &str {
    match s {
        Step::Create { ve, .. }
        | Step::Update { ve, .. }
        | Step::Stop { ve }
        | Step::Release { ve }
        | Step::Destroy { ve }
        | Step::Adopt { ve }
        | Step::Move { ve, .. } => ve,
    }
}

/// A change that turns `old` into `new` (used to apply a spec written elsewhere).
fn full_change(old: &VeSpec, new: &VeSpec) -> VeChange {
    VeChange {
        limits: new.limits,
        hostname: new
            .hostname
            .clone()
            .or_else(|| old.hostname.as_ref().map(|_| new.name.to_string())),
        root_password_hash: new.root_password_hash.clone(),
        ssh_keys: Some(new.ssh_keys.clone()),
        env: (new.env != old.env).then(|| new.env.clone()),
        restart: Some(new.restart),
        dns: Some(new.dns.clone()),
        replicas: new.replicas,
        min_replicas: new.min_replicas,
    }
}

fn digest(i: &VeInfo) -> String {
    serde_json::json!([
        i.status,
        i.pid,
        i.last_exit,
        i.last_error,
        i.restart_pending,
        i.generation,
        i.rescue,
        i.spec
    ])
    .to_string()
}

/// A VE's spec and placement as the store holds them now.
fn spec_and_place(m: &Member, name: &Name) -> NResult<(Option<VeEntry>, Option<Placement>)> {
    m.block_on(async {
        let st = m.store();
        let e: Option<VeEntry> = st.get(&keys::ve(name.as_str(), "spec")).await?;
        let p: Option<Placement> = st.get(&keys::ve(name.as_str(), "place")).await?;
        Ok::<_, ClusterError>((e, p))
    })
    .map_err(unavailable)
}

/// Whether a step that stops or removes a VE not assigned here still holds when read
/// afresh: the snapshot it came from may predate an import or a create under the same
/// name (a destroyed VE's tombstone, replaced since).
fn still_unwanted(m: &Member, name: &Name, step: &Step) -> NResult<bool> {
    let (entry, place) = spec_and_place(m, name)?;
    let deleted = entry.as_ref().is_some_and(|e| e.deleted);
    let elsewhere = entry.is_some()
        && !deleted
        && place
            .as_ref()
            .and_then(|p| p.node.as_deref())
            .is_none_or(|n| n != m.name.as_str());
    Ok(match step {
        Step::Destroy { .. } => deleted,
        Step::Release { .. } => elsewhere,
        _ => deleted || elsewhere,
    })
}

fn forget_keys(m: &Member, name: &Name) {
    crate::ipam::release_logged(m, name.as_str());
    let r = m.block_on(async {
        let place: Option<Placement> = m.store().get(&keys::ve(name.as_str(), "place")).await?;
        if let Some(n) = place.and_then(|p| p.node) {
            m.store().delete(&keys::assigned(&n, name.as_str())).await?;
        }
        m.store().delete_prefix(&format!("{}{}/", keys::ves(), name)).await
    });
    if let Err(e) = r {
        tracing::warn!(ve = %name, "removing the destroyed VE's keys: {e}");
    }
}

fn report_error(m: &Member, node: &Node, name: &Name, generation: u64, message: &str) {
    let info = match node.record(name) {
        Ok(rec) => node.info(&rec),
        Err(_) => {
            let key = keys::ve(name.as_str(), "spec");
            match m.block_on(m.store().get::<VeEntry>(&key)) {
                Ok(Some(e)) => pending_info(&e.spec, generation, message),
                _ => return,
            }
        }
    };
    let o = VeObserved {
        node: m.name.clone(),
        generation,
        info,
        error: Some(message.to_string()),
    };
    if let Err(e) = m.block_on(m.store().put(&keys::ve(name.as_str(), "status"), &o)) {
        tracing::debug!(ve = %name, "reporting an error to the store: {e}");
    }
}

/// A VE the cluster has no node's word on yet.
fn pending_info(spec: &VeSpec, generation: u64, reason: &str) -> VeInfo {
    VeInfo {
        spec: spec.clone(),
        status: VeStatus::Pending,
        pid: None,
        uid_base: 0,
        uid_count: 0,
        template_id: String::new(),
        created_unix: 0,
        started_unix: None,
        last_exit: None,
        last_error: None,
        memory_used: None,
        restart_pending: false,
        console_lost: false,
        host_interface: String::new(),
        mac: String::new(),
        rescue: false,
        fs: None,
        replicas: Vec::new(),
        last_scrub: None,
        node: String::new(),
        pending: Some(reason.to_string()),
        generation,
    }
}

/// A VE of another node as the store shows it (None: destroyed).
fn cluster_info(v: &ClusterVe) -> Option<VeInfo> {
    let (e, _) = v.entry.as_ref()?;
    if e.deleted {
        return None;
    }
    let place = v.place.as_ref().map(|(p, _)| p);
    match (&v.observed, place.and_then(|p| p.node.clone())) {
        (Some(o), _) => {
            let mut i = o.info.clone();
            i.node = o.node.clone();
            i.pending = place.and_then(|p| p.pending.clone()).or_else(|| o.error.clone());
            Some(i)
        }
        (None, node) => {
            let reason = place.and_then(|p| p.pending.clone()).unwrap_or_else(|| match &node {
                Some(n) => format!("placed on node {n}, which has not reported it yet"),
                None => "waiting for the control center to place it".to_string(),
            });
            let mut i = pending_info(&e.spec, e.generation, &reason);
            i.node = node.unwrap_or_default();
            Some(i)
        }
    }
}
