//! `ve move` of a replicated VE: a writer change to a node that holds an in-sync copy, no
//! copying; else the cold copy with the volume's record rewritten in the switch.
//!
//! ```text
//! S (the writer; VE stopped: its writer's last act is a sync, so every copy in sync has
//!    every transaction it committed)
//!   plan(record, S, T):  T in sync -> Adopt: record.with_writer(T) by CAS (epoch + 1;
//!                        S is deposed for good; S stays listed, in sync)
//!                        else      -> Copy: the cold move, and in its switch transaction
//!                        the record with T in S's place, writer T, epoch + 1
//! S ── api ve-adopt-copy{name, from: S} ──▶ T: waits until no stream holds its copy,
//!        renames replicas/<ve>/volume to ves/<ve>/volume, makes the VE's record (spec
//!        from the store, template from the copy, address and uid slot from the cluster's
//!        identity), held from its reconcile loop until assigned (as a cold move's)
//! S: the move's switch (spec generation, placement, network identity: one transaction)
//! T: starts it (its start is one more epoch), its writer streams to S
//! S: once T runs it: renames ves/<ve>/volume to replicas/<ve>/volume and drops the VE's
//!    record; T's writer reaches S's copy; a tail S had and T lacks (never acknowledged)
//!    is cut by the Hello/Cut handshake, and S comes back in sync
//! ```
//! Invariants: a move never loses an acknowledged write (the new writer was in sync when
//! the epoch was raised, and an in-sync copy holds every acknowledged transaction); at most
//! one writer per epoch (the record names one writer per epoch, changed by CAS only, and
//! the old writer stopped before the raise: nothing it has not sent is ever acknowledged).
//! A failure before the switch gives the writer back to S (CAS, one more epoch) and starts
//! the VE there again; T's adopted record, never assigned to it, is released by T's
//! reconcile loop (its copy then is made again from S's log).

use crate::node::{err, internal, NResult, Node};
use crate::replicate::volume_key;
use crate::state::VeRecord;
use std::time::{Duration, Instant};
use vessel_cluster::keys::{self, VeEntry};
use vessel_fs::Volume;
use vessel_repl::config::VolumeConfig;
use vessel_types::api::{ErrorCode, Response};
use vessel_types::Name;

/// How long the target waits for the old writer's stream to let go of its copy.
const RELEASE_WAIT: Duration = Duration::from_secs(15);

/// How a VE moves, by its volume's record (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MovePlan {
    /// The target has an in-sync copy: this record (writer = target, a new epoch) first,
    /// then the target takes its copy as the VE's volume.
    Adopt { next: VolumeConfig },
    /// The volume is copied whole; the switch writes this record too (if any).
    Copy { next: Option<VolumeConfig> },
}

/// The plan for moving a VE written by `me` to `to`, given its volume's record.
pub fn plan(cfg: Option<&VolumeConfig>, me: &str, to: &str) -> Result<MovePlan, String> {
    let Some(c) = cfg else {
        return Ok(MovePlan::Copy { next: None });
    };
    if c.writer != me {
        if c.replicas.len() > 1 {
            return Err(format!(
                "its volume's record names node {} as the writer (epoch {}), not this node: start the VE here first, or move it from there",
                c.writer, c.epoch
            ));
        }
        // One copy that is not this node's by the record (a record of an older move):
        // the target's start makes it its own.
        return Ok(MovePlan::Copy { next: None });
    }
    if c.replicas.len() > 1 && c.is_in_sync(to) {
        let next = c.with_writer(to).map_err(|e| e.to_string())?;
        return Ok(MovePlan::Adopt { next });
    }
    moved_whole(c, me, to).map(|next| MovePlan::Copy { next: Some(next) })
}

/// The record once `from`'s copy went whole to `to`: `to` in `from`'s place (in the copies
/// and the in-sync set), writer `to`, a new epoch. A lagging copy `to` had is replaced by
/// the whole one.
pub fn moved_whole(c: &VolumeConfig, from: &str, to: &str) -> Result<VolumeConfig, String> {
    let swap = |list: &[String]| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in list {
            let n = if n == from { to.to_string() } else { n.clone() };
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    };
    let mut next = c.clone();
    next.epoch += 1;
    next.writer = to.to_string();
    next.replicas = swap(&c.replicas);
    next.in_sync = swap(&c.in_sync);
    if !next.in_sync.iter().any(|n| n == to) {
        next.in_sync.push(to.to_string());
    }
    next.validate().map_err(|e| e.to_string())?;
    Ok(next)
}

fn store_err(e: impl std::fmt::Display) -> vessel_types::api::ApiError {
    err(ErrorCode::Unavailable, format!("the cluster's control store: {e}"))
}

impl Node {
    /// The volume's record of VE `name` and its revision.
    pub(crate) fn volume_record(
        &self,
        m: &crate::cluster::Member,
        name: &Name,
    ) -> NResult<Option<(VolumeConfig, i64)>> {
        m.block_on(m.store().get_rev(&volume_key(name.as_str())))
            .map_err(store_err)
    }

    /// The writer's part of an adopting move (S): the record's epoch raised with `to` as
    /// writer (CAS on `rev`), then `to` takes its copy. On failure the writer is given
    /// back to this node. Returns the VE's address on `to`.
    pub(crate) fn hand_over(
        &self,
        m: &crate::cluster::Member,
        name: &Name,
        to: &str,
        next: &VolumeConfig,
        rev: i64,
    ) -> NResult<Option<vessel_types::Ipv4Cidr>> {
        let ok = m
            .block_on(m.store().put_if(&volume_key(name.as_str()), next, rev))
            .map_err(store_err)?;
        if !ok {
            return Err(err(
                ErrorCode::Conflict,
                "its volume's record changed while it stopped: try again",
            ));
        }
        tracing::info!(ve = %name, to, epoch = next.epoch, "the volume's writer is node {to} now");
        let r = self.api_on(
            to,
            vessel_types::api::Request::VeAdoptCopy {
                name: name.clone(),
                from: m.name.clone(),
            },
            Duration::from_secs(120),
        );
        match r {
            Ok(Response::Moved { ip, .. }) => Ok(ip),
            Ok(other) => {
                self.take_writer_back(m, name, to);
                Err(err(ErrorCode::Internal, format!("node {to} answered {other:?}")))
            }
            Err(e) => {
                self.take_writer_back(m, name, to);
                Err(e)
            }
        }
    }

    /// A move that did not happen: this node is the writer again (a new epoch; it was in
    /// sync when it handed over and nothing was written since).
    pub(crate) fn take_writer_back(&self, m: &crate::cluster::Member, name: &Name, to: &str) {
        let key = volume_key(name.as_str());
        let r = m.block_on(async {
            let Some((c, rev)) = m.store().get_rev::<VolumeConfig>(&key).await? else {
                return Ok(false);
            };
            if c.writer != to {
                return Ok(false);
            }
            match c.with_writer(&m.name) {
                Ok(n) => m.store().put_if(&key, &n, rev).await,
                Err(_) => Ok(false),
            }
        });
        match r {
            Ok(true) => tracing::info!(ve = %name, "the move failed: this node writes the volume again"),
            Ok(false) => {
                tracing::warn!(ve = %name, "the move failed and the volume's record was not given back (its start here takes it)")
            }
            Err(e) => tracing::warn!(ve = %name, "the move failed; giving the volume's record back: {e}"),
        }
    }

    /// Node to node (T): take this node's copy of VE `name` as the VE's volume; the record
    /// names this node as the writer already (S raised the epoch). The VE's record here
    /// is held from the reconcile loop until the cluster assigns the VE here.
    pub fn adopt_copy(&self, name: &Name, from: &str) -> NResult<Response> {
        let m = self
            .cluster
            .get()
            .ok_or_else(|| err(ErrorCode::Unavailable, "this node is in no cluster"))?;
        if self.record(name).is_ok() {
            return Err(err(
                ErrorCode::AlreadyExists,
                format!("VE '{name}' already exists on node {}", m.name),
            ));
        }
        let started = Instant::now();
        let cfg = self.volume_record(m, name)?.map(|(c, _)| c);
        if cfg.as_ref().is_none_or(|c| c.writer != m.name) {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "the volume's record of VE '{name}' does not name node {} as its writer: the moving node raises the epoch first",
                    m.name
                ),
            ));
        }
        let entry: VeEntry = m
            .block_on(m.store().get(&keys::ve(name.as_str(), "spec")))
            .map_err(store_err)?
            .ok_or_else(|| err(ErrorCode::NotFound, format!("VE '{name}' has no spec in the cluster")))?;
        // The old writer stopped: its stream into the copy ends.
        let vol = self.layout.replica_volume(name.as_str());
        let until = Instant::now() + RELEASE_WAIT;
        loop {
            self.replicas.release(name.as_str());
            if !self.replicas.is_open(name.as_str()) {
                break;
            }
            if Instant::now() > until {
                return Err(err(
                    ErrorCode::Conflict,
                    format!(
                        "this node's copy of VE '{name}' is still in use by a stream after {} s",
                        RELEASE_WAIT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let meta = Volume::read_meta(&vol).map_err(|e| {
            err(
                ErrorCode::NotFound,
                format!("node {} has no usable copy of VE '{name}': {e}", m.name),
            )
        })?;
        let template_id = meta.template.ok_or_else(|| {
            err(
                ErrorCode::Conflict,
                format!("this node's copy of VE '{name}' names no template"),
            )
        })?;
        if !vessel_ve::template::is_installed(&self.layout.template(&template_id)) {
            self.fetch_template_from(
                from,
                entry.spec.template.as_str(),
                Some(&template_id),
                &mut |_, _, _| {},
            )?;
        }
        let rec = VeRecord::new(entry.spec, template_id, 0);
        let ip = self.adopt_moved(rec, &vol)?;
        let _ = std::fs::remove_dir(self.layout.replicas().join(name.as_str()));
        tracing::info!(ve = %name, from, ms = started.elapsed().as_millis() as u64, "took this node's copy as the moved VE's volume");
        Ok(Response::Moved { items: 0, bytes: 0, ip })
    }

    /// After an adopting move (S): this node's volume of VE `name` becomes its copy
    /// (`replicas/<ve>/volume`), for the new writer to stream into.
    pub(crate) fn become_copy(&self, name: &Name) -> NResult<()> {
        let own = self.layout.ve(name.as_str()).volume();
        let copy = self.layout.replica_volume(name.as_str());
        let parent = self.layout.replicas().join(name.as_str());
        if parent.exists() {
            std::fs::remove_dir_all(&parent).map_err(|e| internal("remove an old copy", e))?;
        }
        std::fs::create_dir_all(&parent).map_err(|e| internal("make the copy's dir", e))?;
        std::fs::rename(&own, &copy).map_err(|e| internal("keep the volume as a copy", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(writer: &str, replicas: &[&str], in_sync: &[&str]) -> VolumeConfig {
        VolumeConfig {
            version: 1,
            epoch: 7,
            writer: writer.into(),
            replicas: replicas.iter().map(|s| s.to_string()).collect(),
            in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
            min_replicas: 1,
            want_replicas: 2,
        }
    }

    #[test]
    fn a_move_to_an_in_sync_copy_is_a_writer_change_in_a_new_epoch() {
        let c = cfg("a", &["a", "b"], &["a", "b"]);
        let MovePlan::Adopt { next } = plan(Some(&c), "a", "b").unwrap() else {
            panic!("not an adoption")
        };
        assert_eq!((next.epoch, next.writer.as_str()), (8, "b"));
        // The old writer stays a copy, in sync: the copies stay two.
        assert_eq!(next.replicas, c.replicas);
        assert_eq!(next.in_sync, c.in_sync);
    }

    #[test]
    fn a_move_to_a_lagging_copy_or_another_node_copies_and_takes_the_writers_place() {
        // b holds a copy that is not in sync: copied whole, b in a's place.
        let c = cfg("a", &["a", "b"], &["a"]);
        let MovePlan::Copy { next: Some(n) } = plan(Some(&c), "a", "b").unwrap() else {
            panic!("not a copy")
        };
        assert_eq!((n.epoch, n.writer.as_str()), (8, "b"));
        assert_eq!(n.replicas, vec!["b".to_string()]);
        assert_eq!(n.in_sync, vec!["b".to_string()]);
        // c holds none: c in a's place, b's copy kept.
        let c = cfg("a", &["a", "b"], &["a", "b"]);
        let MovePlan::Copy { next: Some(n) } = plan(Some(&c), "a", "c").unwrap() else {
            panic!("not a copy")
        };
        assert_eq!(n.replicas, vec!["c".to_string(), "b".into()]);
        assert_eq!(n.in_sync, vec!["c".to_string(), "b".into()]);
        assert_eq!(n.validate(), Ok(()));
        // One copy: the same rewrite.
        let c = cfg("a", &["a"], &["a"]);
        let MovePlan::Copy { next: Some(n) } = plan(Some(&c), "a", "b").unwrap() else {
            panic!("not a copy")
        };
        assert_eq!((n.writer.as_str(), n.replicas.clone()), ("b", vec!["b".to_string()]));
    }

    #[test]
    fn no_record_copies_and_another_writer_refuses() {
        assert_eq!(plan(None, "a", "b"), Ok(MovePlan::Copy { next: None }));
        let e = plan(Some(&cfg("b", &["a", "b"], &["a", "b"])), "a", "c").unwrap_err();
        assert!(e.contains("node b as the writer"), "{e}");
        // One copy named for another node (an old move): copied, the start takes it.
        assert_eq!(
            plan(Some(&cfg("b", &["b"], &["b"])), "a", "c"),
            Ok(MovePlan::Copy { next: None })
        );
    }
}
