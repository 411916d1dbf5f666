//! Where a node keeps its files. Everything lives under one root directory (default
//! `/var/lib/vessel`), so a test can run a whole node inside a temporary directory.
//!
//! ```text
//! ROOT/state.json                 node state (versioned, see vessel-agent)
//! ROOT/templates/<id>/rootfs      immutable template tree, content address <id>
//! ROOT/templates/<id>/manifest.json
//! ROOT/ves/<name>/upper, work     the VE's private tree (overlay upper and work dirs)
//! ROOT/ves/<name>/rootfs          mount point of the VE's root file tree
//! ROOT/ves/<name>/bundle          OCI bundle (config.json) given to libcontainer
//! ROOT/ves/<name>/console.log     what the VE's init wrote to its console
//! ROOT/run/                       libcontainer state (one dir per running VE)
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }
    pub fn template(&self, id: &str) -> PathBuf {
        self.templates().join(id)
    }
    pub fn template_rootfs(&self, id: &str) -> PathBuf {
        self.template(id).join("rootfs")
    }
    pub fn ves(&self) -> PathBuf {
        self.root.join("ves")
    }
    pub fn ve(&self, name: &str) -> VeLayout {
        VeLayout {
            dir: self.ves().join(name),
        }
    }
    /// Copies of other nodes' VE volumes this node keeps as a replica, one directory per
    /// VE (`replicas/<name>/volume`); apart from `ves/` so that a VE made here later under
    /// the same name never starts from another VE's copy.
    pub fn replicas(&self) -> PathBuf {
        self.root.join("replicas")
    }
    pub fn replica_volume(&self, name: &str) -> PathBuf {
        self.replicas().join(name).join("volume")
    }
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("daemon.pid")
    }
}

#[derive(Debug, Clone)]
pub struct VeLayout {
    pub dir: PathBuf,
}

impl VeLayout {
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    pub fn lower(&self) -> PathBuf {
        self.dir.join("lower")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    /// The VE's vessel-fs volume (txlog, checkpoint, private file contents).
    pub fn volume(&self) -> PathBuf {
        self.dir.join("volume")
    }
    /// Root tree of rescue mode (pristine template; the VE's tree at /mnt/ve).
    pub fn rescue(&self) -> PathBuf {
        self.dir.join("rescue")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}
