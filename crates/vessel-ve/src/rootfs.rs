//! The seam between the VE runtime and whatever provides a VE's root file tree. Today:
//! overlayfs of the shared template (lower, id-mapped to the VE's uid range so the VE's
//! root owns it without a per-VE copy or chown) and the VE's private directory (upper).
//! vessel-fs replaces this with a FUSE mount behind the same trait.

use crate::layout::VeLayout;
use crate::sys;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootFsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount {what} at {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
}

type Result<T> = std::result::Result<T, RootFsError>;

/// What the runtime needs to mount a VE's root tree.
#[derive(Debug, Clone, Copy)]
pub struct RootFsRequest<'a> {
    pub ve: &'a VeLayout,
    pub template_rootfs: &'a Path,
    pub uid_base: u32,
    pub uid_count: u32,
    /// Template id (recorded in the volume).
    pub template_id: &'a str,
    /// Private-file quotas (bytes, inodes).
    pub disk: Option<u64>,
    pub inodes: Option<u64>,
    /// History retention in seconds (None: the default).
    pub history: Option<u64>,
}

/// Provides a VE's root file tree at `ve.rootfs()`.
pub trait RootFs {
    /// Create the VE's private storage (once, at VE create).
    fn create(&self, req: &RootFsRequest) -> Result<()>;
    /// Mount the tree; idempotent if already mounted.
    fn mount(&self, req: &RootFsRequest) -> Result<PathBuf>;
    /// Unmount the tree; idempotent.
    fn unmount(&self, ve: &VeLayout) -> Result<()>;
    /// Remove the private storage (at destroy; the tree must be unmounted).
    fn destroy(&self, ve: &VeLayout) -> Result<()>;
    /// Whether the tree is mounted now.
    fn is_mounted(&self, ve: &VeLayout) -> bool;
    /// Change the quotas and history retention of a mounted tree (no-op where unsupported).
    fn set_storage(&self, _ve: &VeLayout, _limits: &vessel_types::Limits) {}
}

pub struct OverlayRootFs;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootFsError + 'a {
    move |source| RootFsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// True if `path` is a mount point (its device differs from its parent's, or it is listed
/// in mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Ok(canon) = path.canonicalize() else { return false };
    let want = canon.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&*want))
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

impl RootFs for OverlayRootFs {
    fn create(&self, req: &RootFsRequest) -> Result<()> {
        for d in [
            req.ve.upper(),
            req.ve.work(),
            req.ve.rootfs(),
            req.ve.lower(),
            req.ve.bundle(),
        ] {
            std::fs::create_dir_all(&d).map_err(io("create", &d))?;
        }
        // The upper dir is the VE's `/`: owned by the VE's root.
        let up = req.ve.upper();
        chown(&up, Some(req.uid_base), Some(req.uid_base)).map_err(io("chown", &up))?;
        Ok(())
    }

    fn mount(&self, req: &RootFsRequest) -> Result<PathBuf> {
        let target = req.ve.rootfs();
        if self.is_mounted(req.ve) {
            return Ok(target);
        }
        let lower = req.ve.lower();
        std::fs::create_dir_all(&lower).map_err(io("create", &lower))?;
        let userns = sys::make_userns(req.uid_base, req.uid_count).map_err(io("user namespace for", &lower))?;
        sys::idmapped_bind(req.template_rootfs, &lower, &userns)
            .map_err(io("id-mapped mount of template at", &lower))?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            req.ve.upper().display(),
            req.ve.work().display()
        );
        let res = mount(
            Some("vessel"),
            &target,
            Some("overlay"),
            // Host-side: no setuid, no devices; the VE's view is made by the runtime helper.
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|source| RootFsError::Mount {
            what: "overlay",
            path: target.clone(),
            source,
        });
        // The overlay holds its own reference to the lower tree: detach the helper mount
        // so each VE leaves exactly one entry in the mount table.
        let _ = umount2(&lower, MntFlags::MNT_DETACH);
        res?;
        Ok(target)
    }

    fn unmount(&self, ve: &VeLayout) -> Result<()> {
        let target = ve.rootfs();
        for _ in 0..8 {
            if !self.is_mounted(ve) {
                break;
            }
            if umount2(&target, MntFlags::empty()).is_err() {
                umount2(&target, MntFlags::MNT_DETACH).map_err(|source| RootFsError::Mount {
                    what: "unmount",
                    path: target.clone(),
                    source,
                })?;
            }
        }
        let lower = ve.lower();
        while is_mount_point(&lower) {
            if umount2(&lower, MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
        Ok(())
    }

    fn destroy(&self, ve: &VeLayout) -> Result<()> {
        self.unmount(ve)?;
        match std::fs::remove_dir_all(&ve.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &ve.dir)(e)),
            _ => Ok(()),
        }
    }

    fn is_mounted(&self, ve: &VeLayout) -> bool {
        is_mount_point(&ve.rootfs())
    }
}
