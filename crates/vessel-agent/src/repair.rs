//! Remote repair of a VE's files: diff against the template, history of a path, revert of
//! a path, rollback of the whole VE, rescue boot. Works on the live volume of a running VE
//! (changes are ordinary transactions) and opens the volume directly for a stopped one.

use crate::node::{err, internal, not_found, NResult, Node};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use vessel_fs::history::{self, Target};
use vessel_fs::volume::Volume;
use vessel_types::api::{DiffItem, ErrorCode, FsInfo, HistoryItem, RepairPoint, VeInfo};
use vessel_types::{Name, VeSpec, VeStatus};

/// Serialized bytes an answer's items may take (a reply frame is at most `MAX_FRAME`).
const ANSWER_FRAME_BYTES: usize = vessel_types::api::MAX_FRAME / 2;

/// Keep the items while they fit in one reply; the rest is counted.
fn fit<T: serde::Serialize>(items: impl Iterator<Item = T>, mut omitted: u64) -> (Vec<T>, u64) {
    let (mut out, mut used, mut full) = (Vec::new(), 0, false);
    for it in items {
        let n = serde_json::to_vec(&it).map_or(usize::MAX, |v| v.len() + 1);
        if full || used + n > ANSWER_FRAME_BYTES {
            full = true;
            omitted += 1;
            continue;
        }
        used += n;
        out.push(it);
    }
    (out, omitted)
}

fn cut_note(path: &str) -> String {
    format!(
        "the answer is limited to {} MiB; ask about a path below {}",
        history::ANSWER_BYTES >> 20,
        history::norm(path)
    )
}

/// The changed paths of a revert, with a last line for those left out of the answer.
fn reverted(r: history::RevertReport) -> Vec<String> {
    let (mut changed, omitted) = fit(r.changed.into_iter(), r.omitted);
    if omitted > 0 {
        changed.push(format!("... and {omitted} more paths"));
    }
    changed
}

/// Version of the description at the start of an export stream.
const EXPORT_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct ExportMeta {
    version: u32,
    spec: VeSpec,
    template_id: String,
}

impl Node {
    /// The VE's volume: the mounted one if it runs, else opened for this call (the caller
    /// holds the VE lock, so nothing mounts it meanwhile).
    pub(crate) fn volume_of(&self, name: &Name) -> NResult<Arc<Volume>> {
        let rec = self.record(name)?;
        let ve = self.layout.ve(name.as_str());
        if let Some(v) = self.rootfs.volume(&ve) {
            return Ok(v);
        }
        let tpl_root = self.layout.template_rootfs(&rec.template_id);
        let lower = vessel_fs::lower::shared(&tpl_root).map_err(|e| internal("index template", e))?;
        let v = Volume::open(&ve.volume(), Some(lower)).map_err(|e| internal("open volume", e))?;
        Ok(Arc::new(v))
    }

    pub(crate) fn fs_info(&self, name: &Name) -> Option<FsInfo> {
        let ve = self.layout.ve(name.as_str());
        let v = self.rootfs.volume(&ve)?;
        let (usage, _) = v.usage();
        let (last_seq, log_bytes) = v.log_status();
        let oldest_ns = v.oldest_point();
        Some(FsInfo {
            used_bytes: usage.bytes,
            used_inodes: usage.inodes,
            log_bytes,
            last_seq,
            oldest_ns,
            profile: Some(v.stats().snapshot()),
        })
    }

    /// What the VE changed; an answer too large for one reply ends with a `truncated` item
    /// that says how many were left out.
    pub fn diff(&self, name: &Name, path: Option<&str>) -> NResult<Vec<DiffItem>> {
        let vl = self.ve_lock(name);
        let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
        let v = self.volume_of(name)?;
        let l = history::diff(&v, path.unwrap_or("/"), history::ANSWER_BYTES);
        let items = l.entries.into_iter().map(|e| DiffItem {
            path: e.path,
            change: e.change.as_str().into(),
            kind: history::kind_name(e.kind).into(),
            size: e.size,
        });
        let (mut items, omitted) = fit(items, l.omitted);
        if omitted > 0 {
            items.push(DiffItem {
                path: format!("({omitted} more changes not listed: {})", cut_note(path.unwrap_or("/"))),
                change: "truncated".into(),
                kind: String::new(),
                size: 0,
            });
        }
        Ok(items)
    }

    /// The transactions that touched `path`; bounded like [`Node::diff`].
    pub fn history(&self, name: &Name, path: &str) -> NResult<Vec<HistoryItem>> {
        let vl = self.ve_lock(name);
        let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
        let v = self.volume_of(name)?;
        let h = history::history(&v, path, history::ANSWER_BYTES).map_err(|e| internal("read history", e))?;
        let items = h.entries.into_iter().map(|e| HistoryItem {
            seq: e.seq,
            time_ns: e.time_ns,
            path: e.path,
            what: e.what,
        });
        let (mut items, omitted) = fit(items, h.omitted);
        if omitted > 0 {
            let time_ns = items.last().map_or(0, |i| i.time_ns);
            items.push(HistoryItem {
                seq: 0,
                time_ns,
                path: "...".into(),
                what: format!("{omitted} more changes not listed: {}", cut_note(path)),
            });
        }
        Ok(items)
    }

    fn target(v: &Volume, to: RepairPoint) -> NResult<Target> {
        Ok(match to {
            RepairPoint::Template => Target::Seq(0),
            RepairPoint::Time { ns } => {
                let base = v.base_meta();
                if let Some(oldest) = v.oldest_point() {
                    if ns < oldest {
                        if base.seq == 0 {
                            // Before the VE's first change is the template's state.
                            return Ok(Target::Seq(0));
                        }
                        return Err(err(
                            ErrorCode::InvalidArgument,
                            format!(
                                "history before {} is compacted (retention {}): pick a later time or --template",
                                vessel_types::time::format_utc(oldest),
                                vessel_types::time::format_duration_secs(v.retention_secs())
                            ),
                        ));
                    }
                }
                let at = history::seq_at(v, ns).map_err(|e| internal("read history", e))?;
                Target::Seq(at.max(base.seq))
            }
        })
    }

    pub fn revert(&self, name: &Name, path: &str, to: RepairPoint) -> NResult<Vec<String>> {
        let vl = self.ve_lock(name);
        let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
        if history::norm(path) == "/" {
            return Err(err(
                ErrorCode::InvalidArgument,
                "to bring back the whole VE use `vessel ve rollback NAME --to TIME`".to_string(),
            ));
        }
        let v = self.volume_of(name)?;
        let t = Self::target(&v, to)?;
        let r = history::revert(&v, path, t).map_err(|e| err(ErrorCode::InvalidArgument, e.to_string()))?;
        v.sync()
            .map_err(|e| internal("sync", std::io::Error::from_raw_os_error(e)))?;
        Ok(reverted(r))
    }

    pub fn rollback(&self, name: &Name, to: RepairPoint) -> NResult<Vec<String>> {
        let vl = self.ve_lock(name);
        let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.record(name)?;
        let was_running = rec.status == VeStatus::Running;
        if was_running {
            self.stop_locked(&rec, Duration::from_secs(10))?;
        }
        let res = (|| {
            let v = self.volume_of(name)?;
            let t = Self::target(&v, to)?;
            let r = history::revert(&v, "/", t).map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
            v.checkpoint().map_err(|e| internal("checkpoint", e))?;
            Ok(reverted(r))
        })();
        if was_running {
            let rec = self.record(name)?;
            self.start_locked(rec)?;
        }
        res
    }

    pub fn rescue(&self, name: &Name, end: bool) -> NResult<()> {
        let vl = self.ve_lock(name);
        let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
        let rec = self.record(name)?;
        if rec.rescue != end {
            return Err(err(
                ErrorCode::Conflict,
                if end {
                    format!("VE '{name}' is not in rescue mode")
                } else {
                    format!("VE '{name}' is in rescue mode already: `vessel ve rescue --end {name}` returns to normal")
                },
            ));
        }
        if rec.status == VeStatus::Running {
            self.stop_locked(&rec, Duration::from_secs(10))?;
        }
        self.update(name, |r| r.rescue = !end)?;
        let rec = self.record(name).map_err(|_| not_found(name))?;
        self.start_locked(rec).map(|_| ())
    }

    /// Write the VE's export stream to `out`. A running VE is exported as it is while the
    /// stream is written (stop it first for one consistent point).
    pub fn export(&self, name: &Name, out: OwnedFd) -> NResult<()> {
        self.export_until(name, std::fs::File::from(out), &|| false)
    }

    /// [`Node::export`] that also ends when `gone` says the client went away (checked
    /// between chunks). The VE's lock is held only while the list of entries is taken, so
    /// `diff`, `history` or `stop` do not wait for the stream; a write error (the reader
    /// closed its end) ends the export at once.
    pub fn export_until<W: std::io::Write>(&self, name: &Name, out: W, gone: &dyn Fn() -> bool) -> NResult<()> {
        let (v, meta, snap) = {
            let vl = self.ve_lock(name);
            let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
            let rec = self.record(name)?;
            let v = self.volume_of(name)?;
            let meta = ExportMeta {
                version: EXPORT_VERSION,
                spec: rec.spec.clone(),
                template_id: rec.template_id.clone(),
            };
            let meta = serde_json::to_vec_pretty(&meta).map_err(|e| internal("describe export", e))?;
            let snap = vessel_fs::archive::Snapshot::take(&v);
            (v, meta, snap)
        };
        let w = std::io::BufWriter::with_capacity(1 << 20, out);
        let mut w = snap
            .write(&v, &meta, w, gone)
            .map_err(|e| internal("write export", e))?;
        w.flush().map_err(|e| internal("write export", e))
    }

    /// Create a VE from an export stream.
    pub fn import(&self, name: Option<Name>, start: bool, input: OwnedFd) -> NResult<VeInfo> {
        let bad = |m: String| err(ErrorCode::InvalidArgument, m);
        let r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::from(input));
        // Untrusted: no extended header may make us allocate without bound.
        let mut ar = tar::Archive::new(vessel_fs::archive::Guard::new(r));
        let (meta, entries) = vessel_fs::archive::read_meta(&mut ar).map_err(|e| bad(e.to_string()))?;
        let meta: ExportMeta =
            serde_json::from_slice(&meta).map_err(|e| bad(format!("the export's description is unreadable: {e}")))?;
        if meta.version != EXPORT_VERSION {
            return Err(bad(format!(
                "export format version {} (this vessel reads {EXPORT_VERSION}): upgrade vessel",
                meta.version
            )));
        }
        let mut spec = meta.spec;
        if let Some(n) = name {
            spec.name = n;
        }
        // The address is the node's to give; the template must be the very same tree.
        spec.ip = None;
        let tpl = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.templates
                .iter()
                .find(|(_, t)| t.id == meta.template_id)
                .map(|(n, _)| n.clone())
        };
        spec.template = tpl.ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!(
                    "template {} ('{}') is not on this node: build or import it first (`vessel template build ...`)",
                    &meta.template_id[..12.min(meta.template_id.len())],
                    spec.template
                ),
            )
        })?;
        let name = spec.name.clone();
        self.create(spec)?;
        let res = (|| {
            let vl = self.ve_lock(&name);
            let _g = vl.lock().unwrap_or_else(|p| p.into_inner());
            let v = self.volume_of(&name)?;
            vessel_fs::archive::import(&v, entries).map_err(|e| bad(format!("import: {e}")))?;
            v.checkpoint().map_err(|e| internal("checkpoint", e))
        })();
        if let Err(e) = res {
            let _ = self.destroy(&name, true);
            return Err(e);
        }
        if start {
            self.start(&name)?;
        }
        self.show(&name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_cut_to_one_reply_and_count_the_rest() {
        let big = "x".repeat(ANSWER_FRAME_BYTES / 3);
        let (kept, omitted) = fit(vec![big.clone(); 5].into_iter(), 2);
        assert_eq!((kept.len(), omitted), (2, 5));
        let (kept, omitted) = fit(vec!["a".to_string(); 3].into_iter(), 0);
        assert_eq!((kept.len(), omitted), (3, 0));
        let r = reverted(history::RevertReport {
            changed: vec!["/a".into()],
            omitted: 7,
        });
        assert_eq!(r, vec!["/a".to_string(), "... and 7 more paths".into()]);
    }
}
