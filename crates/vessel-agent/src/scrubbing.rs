//! Scrubs of replicated volumes: each one's outcome is kept in the control store
//! (`/vessel/v1/ves/<ve>/scrub`, a [`ScrubReport`]) so `ve show` says when the copies were
//! last compared and what was found, and the writer's node scrubs every replicated VE it
//! writes on a schedule (`[replication] scrub_interval` in `node.toml`, a week by
//! default), one at a time.
//!
//! The schedule is decided by [`next_due`] (pure): a VE is due `interval` after its last
//! scrub, or after this node began writing it when it has none on record (a VE that was
//! just made or moved here is not hashed at once, while its copies are still filling).

use crate::node::{NResult, Node};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vessel_cluster::keys;
use vessel_types::api::{ScrubReport, SCRUB_REPORT_VERSION};
use vessel_types::Name;

/// The scrub reports this node knows, and when it began writing each replicated VE.
#[derive(Default)]
pub struct Scrubs {
    reports: Mutex<HashMap<String, ScrubReport>>,
    /// VEs whose report was read from the store (or found missing) since this node began
    /// writing them, with that time.
    seen: Mutex<HashMap<String, u64>>,
    /// When a scheduled scrub of a VE was last tried (a failed one is not retried before
    /// the next interval).
    tried: Mutex<HashMap<String, u64>>,
    pub(crate) dropped: Dropped,
}

/// How long a node whose copy `ve scrub --repair` dropped is not picked for a new copy of
/// that VE: its reconcile loop (every 2 s) removes the copy the record no longer lists
/// first, so the new copy starts empty (picked at once, the writer would catch the bad
/// copy up from where it stands and keep the damage).
pub const DROPPED_AVOID: Duration = Duration::from_secs(30);

/// Copies dropped by a repair, per (VE, node), with when.
#[derive(Default, Clone)]
pub struct Dropped(Arc<Mutex<HashMap<(String, String), std::time::Instant>>>);

impl Dropped {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), std::time::Instant>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn note(&self, ve: &str, node: &str) {
        self.lock()
            .insert((ve.to_string(), node.to_string()), std::time::Instant::now());
    }

    /// Whether `node` must not get a new copy of `ve` yet.
    pub fn avoid(&self, ve: &str, node: &str) -> bool {
        let mut d = self.lock();
        d.retain(|_, at| at.elapsed() < DROPPED_AVOID);
        d.contains_key(&(ve.to_string(), node.to_string()))
    }
}

impl Scrubs {
    fn reports(&self) -> std::sync::MutexGuard<'_, HashMap<String, ScrubReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tried(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.tried.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last scrub of `ve` this node knows of.
    pub fn last(&self, ve: &str) -> Option<ScrubReport> {
        self.reports().get(ve).cloned()
    }
}

/// A VE the writer scrubs: its name, its last scrub's time, and since when this node
/// writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub last_scrub: Option<u64>,
    pub writing_since: u64,
}

/// The VE to scrub now, if any: the one most overdue (`interval` seconds after its last
/// scrub, or after `writing_since` if it has none). `interval` 0: never.
pub fn next_due(candidates: &[Candidate], now: u64, interval: u64) -> Option<&Candidate> {
    if interval == 0 {
        return None;
    }
    candidates
        .iter()
        .map(|c| (c.last_scrub.unwrap_or(c.writing_since).saturating_add(interval), c))
        .filter(|(due, _)| *due <= now)
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)))
        .map(|(_, c)| c)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Node {
    /// `ve scrub`, and a scheduled one: compare the copies, keep the outcome in the store
    /// (a store that does not answer loses only the record, not the answer).
    /// A scheduled one gives up when the VE stops being written here (its volume must not
    /// stay open for a restart or a move).
    pub fn scrub_and_record(&self, name: &Name, scheduled: bool) -> NResult<ScrubReport> {
        let stop = || scheduled && !self.replicas.writers().contains_key(name.as_str());
        let copies = self.scrub(name, &stop)?;
        let report = ScrubReport {
            version: SCRUB_REPORT_VERSION,
            at_unix: unix_now(),
            scheduled,
            copies,
        };
        if let Some(m) = self.cluster.get() {
            if let Err(e) = m.block_on(m.store().put(&keys::ve(name.as_str(), "scrub"), &report)) {
                tracing::warn!(ve = %name, "keeping the scrub's outcome in the control store: {e}");
            }
        }
        self.scrubs.reports().insert(name.to_string(), report.clone());
        Ok(report)
    }

    /// Start the scheduled scrubs (cluster nodes; `scrub_interval` 0 turns them off).
    pub fn start_scrubber(self: &Arc<Self>) {
        let interval = self.opts.settings.replication.scrub_interval_secs;
        if interval == 0 {
            return;
        }
        // Look often enough for short intervals (tests), rarely for the usual week.
        let tick = Duration::from_secs((interval / 4).clamp(1, 60));
        let node = self.clone();
        let _ = std::thread::Builder::new()
            .name("vessel-scrub".into())
            .spawn(move || loop {
                std::thread::sleep(tick);
                node.scrub_due(interval);
            });
    }

    fn scrub_due(&self, interval: u64) {
        let Some(m) = self.cluster.get().cloned() else { return };
        let writing: Vec<String> = self.replicas.writers().keys().cloned().collect();
        let now = unix_now();
        self.scrubs.seen().retain(|ve, _| writing.contains(ve));
        self.scrubs.tried().retain(|ve, _| writing.contains(ve));
        let mut candidates = Vec::new();
        for ve in writing {
            let known = self.scrubs.seen().get(&ve).copied();
            let since = match known {
                Some(t) => t,
                None => {
                    // First look since this node began writing it: the record, if any.
                    match m.block_on(m.store().get::<ScrubReport>(&keys::ve(&ve, "scrub"))) {
                        Ok(Some(r)) => {
                            self.scrubs.reports().insert(ve.clone(), r);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(ve, "reading the last scrub: {e}");
                            continue;
                        }
                    }
                    self.scrubs.seen().insert(ve.clone(), now);
                    now
                }
            };
            let tried = self.scrubs.tried().get(&ve).copied();
            candidates.push(Candidate {
                last_scrub: self.scrubs.last(&ve).map(|r| r.at_unix).max(tried),
                name: ve,
                writing_since: since,
            });
        }
        let Some(c) = next_due(&candidates, now, interval) else {
            return;
        };
        let Ok(name) = Name::parse(&c.name) else { return };
        // A failed scrub is not tried again at every tick: the next try is an interval on.
        self.scrubs.tried().insert(c.name.clone(), now);
        match self.scrub_and_record(&name, true) {
            Ok(r) if r.bad().is_empty() => tracing::info!(ve = c.name, "scheduled scrub: {}", r.verdict()),
            Ok(r) => tracing::warn!(ve = c.name, "scheduled scrub: {}", r.verdict()),
            Err(e) => tracing::warn!(ve = c.name, "scheduled scrub failed: {}", e.message),
        }
    }
}

impl Node {
    /// `ve scrub --repair`: drop these copies from the VE's volume record (by CAS at its
    /// epoch; never the writer's). The writer's watcher then picks nodes for the missing
    /// copies and seeds them; a dropped node removes its copy.
    pub fn drop_copies(&self, name: &Name, nodes: &[&str]) -> NResult<()> {
        use crate::node::err;
        use vessel_types::api::ErrorCode;
        let Some(m) = self.cluster.get().cloned() else {
            return Ok(());
        };
        crate::replicate::change_record(&m, name.as_str(), "dropping copies", |cfg| {
            let mut next = cfg.clone();
            for n in nodes.iter().filter(|n| **n != cfg.writer && cfg.is_replica(n)) {
                next = next
                    .without_replica(n)
                    .map_err(|e| err(ErrorCode::Conflict, format!("VE '{name}': {e}")))?;
            }
            for n in nodes {
                self.scrubs.dropped.note(name.as_str(), n);
            }
            Ok((next != *cfg).then_some(next))
        })?;
        tracing::warn!(ve = %name, dropped = ?nodes, "copies dropped after a scrub found them different");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, last: Option<u64>, since: u64) -> Candidate {
        Candidate {
            name: name.into(),
            last_scrub: last,
            writing_since: since,
        }
    }

    #[test]
    fn the_most_overdue_ve_is_scrubbed_first_and_nothing_before_its_time() {
        let cs = [c("a", Some(100), 0), c("b", None, 50), c("c", Some(10), 0)];
        assert_eq!(next_due(&cs, 200, 100).map(|c| c.name.as_str()), Some("c"));
        // At 130 only c (due 110) and b (due 150? no: 150 > 130) qualify.
        assert_eq!(next_due(&cs, 130, 100).map(|c| c.name.as_str()), Some("c"));
        assert_eq!(next_due(&cs, 109, 100), None);
        // A VE without a scrub is due an interval after this node began writing it.
        let cs = [c("b", None, 50)];
        assert_eq!(next_due(&cs, 149, 100), None);
        assert_eq!(next_due(&cs, 150, 100).map(|c| c.name.as_str()), Some("b"));
    }

    #[test]
    fn interval_zero_never_scrubs_and_ties_go_by_name() {
        let cs = [c("b", Some(0), 0), c("a", Some(0), 0)];
        assert_eq!(next_due(&cs, u64::MAX, 0), None);
        assert_eq!(next_due(&cs, 10, 5).map(|c| c.name.as_str()), Some("a"));
        assert_eq!(next_due(&[], 10, 5), None);
        // No overflow for a far last scrub.
        assert_eq!(next_due(&[c("x", Some(u64::MAX), 0)], u64::MAX - 1, 7), None);
    }
}
