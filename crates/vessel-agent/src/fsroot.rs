//! VE roots on vessel-fs: each VE's volume is served over FUSE by threads of the node
//! daemon itself (no helper process per VE). The template is the volume's shared lower
//! layer, indexed once per node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vessel_fs::fuse::{IdMap, Mounted};
use vessel_fs::volume::{Quota, Volume};
use vessel_ve::layout::VeLayout;
use vessel_ve::rootfs::{is_mount_point, RootFs, RootFsError, RootFsRequest};

/// FUSE worker threads per mounted volume.
const THREADS: usize = 4;

#[derive(Default)]
pub struct VesselFsRoot {
    mounts: Mutex<HashMap<PathBuf, Mounted>>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RootFsError + 'a {
    move |source| RootFsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn vol_err(path: &Path, e: vessel_fs::VolumeError) -> RootFsError {
    RootFsError::Io {
        what: "open volume",
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Detach whatever is mounted at `p` (e.g. the dead FUSE mount a crashed daemon left).
pub fn detach_stale(p: &Path) {
    for _ in 0..8 {
        if !is_mount_point(p) {
            break;
        }
        if nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

/// Unmount in the background and wait a bounded time: a FUSE session ends only when the
/// kernel lets go of the mount, and the daemon must never hang on it.
fn unmount_bounded(m: Mounted) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        m.unmount();
        let _ = tx.send(());
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        eprintln!("vessel: a vessel-fs mount is still busy after 10 s; it finishes in the background");
    }
}

impl VesselFsRoot {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        self.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mounted volume of a VE, if mounted by this daemon.
    pub fn volume(&self, ve: &VeLayout) -> Option<Arc<Volume>> {
        self.lock().get(&ve.rootfs()).map(|m| m.volume.clone())
    }

    /// Mount a VE's volume at `at` (e.g. for repair while the VE is stopped).
    pub fn mount_at(&self, req: &RootFsRequest, at: &Path) -> Result<Arc<Volume>, RootFsError> {
        if let Some(m) = self.lock().get(at) {
            return Ok(m.volume.clone());
        }
        detach_stale(at);
        std::fs::create_dir_all(at).map_err(io_err("create", at))?;
        let lower =
            vessel_fs::lower::shared(req.template_rootfs).map_err(io_err("index template", req.template_rootfs))?;
        let dir = req.ve.volume();
        let vol = Arc::new(Volume::open(&dir, Some(lower)).map_err(|e| vol_err(&dir, e))?);
        vol.set_quota(Quota {
            bytes: req.disk,
            inodes: req.inodes,
        });
        vol.set_retention(req.history);
        let ids = IdMap {
            base: req.uid_base,
            count: req.uid_count,
        };
        let m = vessel_fs::fuse::mount(vol.clone(), ids, at, THREADS).map_err(io_err("mount vessel-fs at", at))?;
        self.lock().insert(at.to_path_buf(), m);
        Ok(vol)
    }

    pub fn unmount_at(&self, at: &Path) {
        let m = self.lock().remove(at);
        if let Some(m) = m {
            unmount_bounded(m);
        }
        detach_stale(at);
    }
}

impl RootFs for VesselFsRoot {
    fn create(&self, req: &RootFsRequest) -> Result<(), RootFsError> {
        for d in [req.ve.rootfs(), req.ve.bundle()] {
            std::fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        let dir = req.ve.volume();
        if !dir.join("volume.json").exists() {
            Volume::create(&dir, &ve_name(req.ve), Some(req.template_id)).map_err(|e| vol_err(&dir, e))?;
        }
        Ok(())
    }

    fn mount(&self, req: &RootFsRequest) -> Result<PathBuf, RootFsError> {
        let at = req.ve.rootfs();
        self.mount_at(req, &at)?;
        Ok(at)
    }

    fn unmount(&self, ve: &VeLayout) -> Result<(), RootFsError> {
        self.unmount_at(&ve.rootfs());
        Ok(())
    }

    fn destroy(&self, ve: &VeLayout) -> Result<(), RootFsError> {
        self.unmount(ve)?;
        self.unmount_at(&ve.rescue());
        match std::fs::remove_dir_all(&ve.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &ve.dir)(e)),
            _ => Ok(()),
        }
    }

    fn is_mounted(&self, ve: &VeLayout) -> bool {
        self.lock().contains_key(&ve.rootfs())
    }

    fn set_storage(&self, ve: &VeLayout, l: &vessel_types::Limits) {
        if let Some(v) = self.volume(ve) {
            v.set_quota(Quota {
                bytes: l.disk,
                inodes: l.inodes,
            });
            v.set_retention(l.history);
        }
    }
}

fn ve_name(ve: &VeLayout) -> String {
    ve.dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `vessel __fs-serve`: serve one volume at a mount point until SIGTERM/SIGINT (tests,
/// benchmarks and debugging). Creates the volume if it does not exist.
pub fn serve(
    volume: &Path,
    template: Option<&Path>,
    at: &Path,
    uid_base: u32,
    quota: Quota,
    history_secs: Option<u64>,
    segment_bytes: Option<u64>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if !volume.join("volume.json").exists() {
        let name = volume
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Volume::create(volume, &name, template.map(|_| "local"))?;
    }
    let lower = match template {
        Some(t) => Some(vessel_fs::lower::shared(t).with_context(|| format!("index template {}", t.display()))?),
        None => None,
    };
    let mut opts = vessel_fs::volume::VolumeOptions::default();
    if let Some(b) = segment_bytes {
        opts.segment_bytes = b;
    }
    vessel_fs::fuse::keep_big_buffers_unmapped();
    let vol = Arc::new(Volume::open_with(volume, lower, opts)?);
    vol.set_quota(quota);
    vol.set_retention(history_secs);
    detach_stale(at);
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set.thread_block()?;
    let m = vessel_fs::fuse::mount(
        vol,
        IdMap {
            base: uid_base,
            count: 65536,
        },
        at,
        THREADS,
    )
    .with_context(|| format!("mount vessel-fs at {}", at.display()))?;
    println!("ready");
    let _ = set.wait();
    m.unmount();
    Ok(())
}
