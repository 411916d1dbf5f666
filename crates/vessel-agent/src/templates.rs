//! Template operations of a node: build (busybox, Debian), list, show, remove.

use crate::node::{err, internal, NResult, Node};
use crate::state::TemplateRecord;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};
use vessel_types::api::{ErrorCode, TemplateInfo, TemplateKind};
use vessel_types::Name;
use vessel_ve::{apt_sources, template};

/// One template build or removal at a time on a node: they share the template store and
/// its scratch dirs. The others wait, say for what, and give up after a bound.
#[derive(Debug, Default)]
pub(crate) struct BuildLock {
    busy: Mutex<Option<(String, Instant)>>,
    freed: Condvar,
}

/// Holding the node's build lock; dropping it lets the next one in.
pub(crate) struct BuildGuard<'a>(&'a BuildLock);

impl BuildLock {
    /// Take the lock for `what`, waiting at most `limit`. `on_wait` is told once what holds
    /// it and for how long; on timeout the error says the same.
    pub(crate) fn acquire(
        &self,
        what: &str,
        limit: Duration,
        on_wait: &mut dyn FnMut(&str, Duration),
    ) -> Result<BuildGuard<'_>, (String, Duration)> {
        let start = Instant::now();
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let mut told = false;
        while let Some((holder, since)) = busy.as_ref() {
            if !told {
                on_wait(holder, since.elapsed());
                told = true;
            }
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err((holder.clone(), since.elapsed()));
            }
            busy = self.freed.wait_timeout(busy, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *busy = Some((what.to_string(), Instant::now()));
        Ok(BuildGuard(self))
    }
}

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.0.freed.notify_one();
    }
}

impl Node {
    pub fn template_build(
        &self,
        kind: TemplateKind,
        name: Option<Name>,
        progress: &mut vessel_ve::Progress,
    ) -> NResult<TemplateInfo> {
        let name = match name {
            Some(n) => n,
            None => Name::parse(match kind {
                TemplateKind::Busybox => "busybox",
                TemplateKind::Debian => "debian",
            })
            .map_err(|e| internal("template name", e))?,
        };
        let _g = self.build_lock(&format!("the build of template '{name}'"), progress)?;
        let store = self.layout.templates();
        // Nothing else builds here now (one daemon per root): scratch dirs are a killed
        // daemon's.
        match template::remove_scratch(&store) {
            Ok(gone) => gone
                .iter()
                .for_each(|p| tracing::info!("removed {} (left by a build that did not finish)", p.display())),
            Err(e) => tracing::warn!("template store: {e}"),
        }
        let staging = template::staging_dir(&store);
        let rootfs = staging.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| internal("create build dir", e))?;
        let built = match kind {
            TemplateKind::Busybox => template::build_busybox(&rootfs, &self.opts.busybox, progress),
            TemplateKind::Debian => {
                let mirror = std::env::var("VESSEL_DEBIAN_MIRROR")
                    .ok()
                    .or_else(|| apt_sources::host_mirror(std::path::Path::new("/etc/apt"), template::DEBIAN_SUITE));
                match mirror {
                    Some(m) => template::build_debian(&rootfs, &m, &self.opts.cache_dir, progress),
                    None => Err(template::TemplateError::NoMirror(template::DEBIAN_SUITE.into())),
                }
            }
        };
        let installed = built.and_then(|meta| template::install(&store, &staging, meta, progress));
        let (id, meta) = match installed {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(err(ErrorCode::Internal, format!("build template '{name}': {e}")));
            }
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let old = st
            .templates
            .insert(name.clone(), TemplateRecord { id: id.clone(), kind });
        self.save(&st)?;
        if let Some(old) = old {
            self.gc_template(&st, &old.id);
        }
        progress(
            &format!(
                "template '{name}' ready: {} files, id {}",
                meta.files,
                id.get(..12).unwrap_or(&id)
            ),
            1,
            1,
        );
        Ok(self.template_info(&st, &name, &id, kind, &meta))
    }

    /// Wait (bounded) for the node's template builds and removals to let this one in.
    fn build_lock(&self, what: &str, progress: &mut vessel_ve::Progress) -> NResult<BuildGuard<'_>> {
        self.template_lock
            .acquire(what, template::BUILD_WAIT, &mut |holder, for_| {
                let msg = format!(
                    "waiting for {holder} to finish (at most {} min; it has run for {} s)",
                    template::BUILD_WAIT.as_secs() / 60,
                    for_.as_secs()
                );
                tracing::info!("{what}: {msg}");
                progress(&msg, 0, 0);
            })
            .map_err(|(holder, for_)| {
                err(
                    ErrorCode::Conflict,
                    format!(
                        "{what}: {holder} has been running for {} min on this node: giving up; try again when it has finished",
                        for_.as_secs() / 60
                    ),
                )
            })
    }

    /// Remove a template tree that no name and no VE refers to any more.
    fn gc_template(&self, st: &crate::state::NodeState, id: &str) {
        let used = st.templates.values().any(|t| t.id == id) || st.ves.values().any(|v| v.template_id == id);
        if !used {
            if let Err(e) = template::remove_template(&self.layout.templates(), id) {
                tracing::warn!("remove unused template {id}: {e}");
            }
        }
    }

    fn template_info(
        &self,
        st: &crate::state::NodeState,
        name: &Name,
        id: &str,
        kind: TemplateKind,
        meta: &template::TemplateMeta,
    ) -> TemplateInfo {
        TemplateInfo {
            name: name.clone(),
            kind,
            id: id.to_string(),
            files: meta.files,
            bytes: meta.bytes,
            created_unix: meta.created_unix,
            used_by: st
                .ves
                .values()
                .filter(|v| v.template_id == id)
                .map(|v| v.spec.name.clone())
                .collect(),
        }
    }

    pub fn template_list(&self) -> Vec<TemplateInfo> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.templates
            .iter()
            .filter_map(|(n, t)| {
                let meta = template::read_meta(&self.layout.template(&t.id)).ok()?;
                Some(self.template_info(&st, n, &t.id, t.kind, &meta))
            })
            .collect()
    }

    pub fn template_show(&self, name: &Name) -> NResult<TemplateInfo> {
        self.template_list()
            .into_iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| {
                err(
                    ErrorCode::NotFound,
                    format!("template '{name}' not found: see `vessel template list`"),
                )
            })
    }

    pub fn template_remove(&self, name: &Name) -> NResult<()> {
        let _g = self.build_lock(&format!("the removal of template '{name}'"), &mut |_, _, _| {})?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let rec = st.templates.get(name).cloned().ok_or_else(|| {
            err(
                ErrorCode::NotFound,
                format!("template '{name}' not found: see `vessel template list`"),
            )
        })?;
        let users: Vec<String> = st
            .ves
            .values()
            .filter(|v| v.template_id == rec.id)
            .map(|v| v.spec.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(err(
                ErrorCode::Conflict,
                format!(
                    "template '{name}' is used by VE(s) {}: destroy them first",
                    users.join(", ")
                ),
            ));
        }
        st.templates.remove(name);
        self.save(&st)?;
        self.gc_template(&st, &rec.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_take_turns_and_a_waiter_gives_up_at_the_bound() {
        let lock = BuildLock::default();
        let g = lock
            .acquire("the build of template 'debian'", Duration::ZERO, &mut |_, _| {
                panic!("free")
            })
            .unwrap();
        let mut told = Vec::new();
        let r = lock.acquire("b", Duration::from_millis(50), &mut |h, _| told.push(h.to_string()));
        assert_eq!(told, vec!["the build of template 'debian'".to_string()]);
        assert_eq!(r.err().map(|e| e.0).as_deref(), Some("the build of template 'debian'"));
        // A waiter gets in when the holder lets go.
        let (told_tx, told_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                lock.acquire("c", Duration::from_secs(600), &mut |h, _| {
                    told_tx.send(h.to_string()).unwrap()
                })
                .is_ok()
            });
            let holder = told_rx.recv_timeout(Duration::from_secs(60)).expect("the waiter waits");
            assert_eq!(holder, "the build of template 'debian'");
            drop(g);
            assert!(waiter.join().unwrap());
        });
        assert!(lock.busy.lock().unwrap().is_none(), "released by the waiter's guard");
    }
}
