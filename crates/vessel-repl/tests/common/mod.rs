//! Shared by the stream and fault tests: replica copies in directories, the store's
//! record in memory, and the writer's options with short timers.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vessel_fs::Volume;
use vessel_repl::replica::{self, ReplicaHost};
use vessel_repl::writer::{Master, Options};

/// One node's replica copies: one volume directory each, kept open while streamed to.
pub struct DirHost {
    dir: PathBuf,
    pub open: Mutex<BTreeMap<String, Arc<Volume>>>,
}

impl DirHost {
    pub fn new(dir: &Path) -> Arc<DirHost> {
        std::fs::create_dir_all(dir).unwrap();
        Arc::new(DirHost {
            dir: dir.to_path_buf(),
            open: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn vol(&self, name: &str) -> Arc<Volume> {
        self.open(name).unwrap()
    }
}

impl ReplicaHost for DirHost {
    fn open(&self, volume: &str) -> Result<Arc<Volume>, String> {
        let mut open = self.open.lock().unwrap();
        if let Some(v) = open.get(volume) {
            return Ok(v.clone());
        }
        let d = self.dir.join(volume);
        if !d.join("volume.json").exists() {
            Volume::create(&d, volume, None).map_err(|e| e.to_string())?;
        }
        let v = Arc::new(Volume::open(&d, None).map_err(|e| e.to_string())?);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
    }

    fn cut(&self, volume: &str, vol: Arc<Volume>, after: u64) -> Result<Arc<Volume>, String> {
        let mut open = self.open.lock().unwrap();
        open.remove(volume);
        let dir = vol.dir().to_path_buf();
        drop(vol);
        let (v, _) = Volume::cut_after(&dir, None, after).map_err(|e| e.to_string())?;
        let v = Arc::new(v);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
    }

    fn install(&self, volume: &str, vol: Arc<Volume>, snapshot: &mut dyn std::io::Read) -> Result<Arc<Volume>, String> {
        let mut open = self.open.lock().unwrap();
        open.remove(volume);
        if Arc::strong_count(&vol) > 1 {
            open.insert(volume.to_string(), vol);
            return Err("the copy is in use".into());
        }
        let v = Arc::new(replica::install_copy(vol, None, snapshot)?);
        open.insert(volume.to_string(), v.clone());
        Ok(v)
    }
}

/// The store's record of the volume: epoch and in-sync set, changed by CAS on the epoch.
pub struct MemMaster {
    pub rec: Mutex<(u64, BTreeSet<String>)>,
}

impl MemMaster {
    pub fn in_sync(&self) -> BTreeSet<String> {
        self.rec.lock().unwrap().1.clone()
    }
}

impl Master for MemMaster {
    fn remove_in_sync(&self, node: &str, epoch: u64, _reason: &str) -> Result<bool, String> {
        let mut r = self.rec.lock().unwrap();
        if r.0 != epoch {
            return Ok(false);
        }
        r.1.remove(node);
        Ok(true)
    }

    fn add_in_sync(&self, node: &str, epoch: u64) -> Result<bool, String> {
        let mut r = self.rec.lock().unwrap();
        if r.0 != epoch {
            return Ok(false);
        }
        r.1.insert(node.to_string());
        Ok(true)
    }
}

/// Unacknowledged data for this long takes a replica out of the set in these tests.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(300);

/// The writer's options with short timers.
pub fn opts() -> Options {
    Options {
        ack_timeout: ACK_TIMEOUT,
        keepalive: Duration::from_millis(100),
        retry: Duration::from_millis(50),
        ..Options::default()
    }
}
