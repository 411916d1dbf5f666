//! Template operations of a node: build (busybox, Debian), list, show, remove.

use crate::node::{err, internal, NResult, Node};
use crate::state::TemplateRecord;
use vessel_types::api::{ErrorCode, TemplateInfo, TemplateKind};
use vessel_types::Name;
use vessel_ve::{apt_sources, template};

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
        let _g = self.template_lock.lock().unwrap_or_else(|e| e.into_inner());
        let staging = self
            .layout
            .templates()
            .join(format!(".build-{}-{}", std::process::id(), vessel_ve::now_unix()));
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
        let installed = built.and_then(|meta| template::install(&self.layout.templates(), &staging, meta, progress));
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

    /// Remove a template tree that no name and no VE refers to any more.
    fn gc_template(&self, st: &crate::state::NodeState, id: &str) {
        let used = st.templates.values().any(|t| t.id == id) || st.ves.values().any(|v| v.template_id == id);
        if !used {
            let _ = std::fs::remove_dir_all(self.layout.template(id));
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
        let _g = self.template_lock.lock().unwrap_or_else(|e| e.into_inner());
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
