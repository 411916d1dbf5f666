//! What a seeding snapshot ([`crate::seed`]) needs from a volume: a consistent view of
//! its description, epoch, history, base and log (one hold of the lock), the base's files
//! read safely beside live writes, and the files an installed copy starts from.

use super::*;
use crate::epochs::EpochHistory;
use crate::txlog::LogReader;

/// The volume as of one moment, for a snapshot. Hold [`Volume::history_guard`] while
/// using it: compaction can then neither move the base nor drop log segments.
pub struct SeedView {
    pub meta: VolumeMeta,
    pub epoch: u64,
    pub history: EpochHistory,
    pub base: BaseMeta,
    pub reader: LogReader,
}

/// A file of the base, opened for a snapshot.
pub struct BaseFile {
    ino: Ino,
    pub file: File,
    /// The file was the live file itself (a hard link) when opened: each read checks,
    /// under the volume's lock, that it still is.
    shared: bool,
}

impl Volume {
    /// The description, promised epoch, epoch history, base and a log reader, taken under
    /// one hold of the lock (so they agree).
    pub fn seed_view(&self) -> Result<SeedView> {
        let meta = Self::read_meta(&self.dir)?;
        let st = self.lock();
        Ok(SeedView {
            meta,
            epoch: st.epoch,
            history: {
                let mut h = st.epochs.clone();
                h.cut_after(st.log.last_seq());
                h
            },
            base: st.base,
            reader: st.log.reader()?,
        })
    }

    /// The inodes with a data file in the base, in order.
    pub fn base_files(&self) -> Vec<Ino> {
        let mut v: Vec<Ino> = data_files(&self.base_dir().join("data"))
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        v.sort_unstable();
        v
    }

    /// Open the base's copy of `ino`.
    pub fn open_base_file(&self, ino: Ino) -> std::io::Result<BaseFile> {
        let st = self.lock();
        let file = self.open_base_data(ino)?;
        Ok(BaseFile {
            ino,
            file,
            shared: st.shared.contains(&ino),
        })
    }

    /// Read `buf.len()` bytes of a base file at `off` (zeros past its end). A file shared
    /// with the live copy is read under the volume's lock, where a live change cannot
    /// start: it first gives the base its own copy (`unshare`, under the lock), and then
    /// the base's copy is reopened (same contents) and read from there on.
    pub fn read_base_file(&self, f: &mut BaseFile, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if !f.shared {
            return crate::sparse::read_at_padded(&f.file, off, buf);
        }
        let st = self.lock();
        if !st.shared.contains(&f.ino) {
            f.file = self.open_base_data(f.ino)?;
            f.shared = false;
        }
        crate::sparse::read_at_padded(&f.file, off, buf)
    }
}

/// Write the small files of a copy being installed in `dir`: volume.json, epoch.json,
/// epochs.json, base/meta.json (when the base is past seq 0). Not synced here: the
/// install syncs the whole staging directory once before it renames it into place.
pub(crate) fn write_seed_meta(dir: &Path, v: &SeedMeta) -> std::io::Result<()> {
    let json = |x: &dyn erased::Json| x.bytes();
    std::fs::write(dir.join("volume.json"), json(&v.meta))?;
    let e = EpochFile {
        version: EPOCH_VERSION,
        epoch: v.epoch,
    };
    std::fs::write(dir.join("epoch.json"), json(&e))?;
    std::fs::write(dir.join(epochfile::EPOCHS_FILE), json(&v.history))?;
    if v.base.seq > 0 {
        std::fs::create_dir_all(dir.join("base"))?;
        let b = BaseMeta { pending: 0, ..v.base };
        std::fs::write(dir.join("base").join("meta.json"), json(&b))?;
    }
    Ok(())
}

mod erased {
    /// A value written as JSON.
    pub trait Json {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn bytes(&self) -> Vec<u8> {
            serde_json::to_vec_pretty(self).expect("serializable")
        }
    }
}

/// What a snapshot's header carries about the volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedMeta {
    pub meta: VolumeMeta,
    pub epoch: u64,
    pub history: EpochHistory,
    pub base: BaseMeta,
}

/// The live state of a copy being installed: the base's checkpoint and (hard links to)
/// its data files; opening the volume replays the log after the base.
pub(crate) fn seed_live_from_base(dir: &Path) -> std::io::Result<()> {
    let (data, bdata) = (dir.join("data"), dir.join("base").join("data"));
    layout_data(&data)?;
    if bdata.exists() {
        layout_data(&bdata)?;
    }
    for (ino, b) in data_files(&bdata) {
        std::fs::hard_link(&b, data.join(data_name(ino)))?;
    }
    match std::fs::read(dir.join("base").join("checkpoint")) {
        Ok(b) => std::fs::write(dir.join("checkpoint"), b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
