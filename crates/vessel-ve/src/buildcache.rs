//! The machine's build cache (default `/var/cache/vessel`), shared by every daemon on the
//! host. One entry per debootstrap tree:
//!
//! ```text
//! debian-bookworm-minbase.lock    flock'ed by the one builder of the entry (never removed)
//! debian-bookworm-minbase.tar     the tree (tar, numeric owners)
//! debian-bookworm-minbase.json    completion record {"version":1, what was built, size, sha256}
//! .debian-bookworm-minbase.tar.tmp-<pid>-<nonce>   a builder's own temp file
//! ```
//!
//! Builders of an entry take turns on the lock (a waiter says so, and gives up after a bound).
//! Each writes under a temp name of its own, fsyncs, renames into place, and only then writes
//! the record the same way: the record's rename is the commit point. An entry is used only
//! when its record matches what is asked for and the tarball's size and sha256; anything
//! else (no record, a cut-off tarball, other packages) is stale and rebuilt under the lock,
//! where temp files of builders that were killed are removed too.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Version of the completion record.
pub const RECORD_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another build of {what} has held {lock} for {} min{}: giving up; try again when it has finished",
        waited.as_secs() / 60,
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    LockTimeout {
        what: String,
        lock: PathBuf,
        waited: Duration,
        holder: Option<u32>,
    },
}

type Result<T> = std::result::Result<T, CacheError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What a cache entry holds: a tree made with these inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheKey {
    pub suite: String,
    pub variant: String,
    /// Packages added to the variant (debootstrap's `--include`).
    pub include: String,
}

/// The completion record, written after the tarball is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    #[serde(flatten)]
    pub key: CacheKey,
    pub size: u64,
    pub sha256: String,
}

/// What is on disk for an entry, judged from the tarball's size and the record alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// Nothing there: build it.
    Missing,
    /// Complete by its record; its contents are still to be checked against `sha256`.
    Complete(Record),
    /// Something there that must not be used: remove it and build again.
    Stale(String),
}

/// Decide whether an entry may be used. `tar_size` is the tarball's size (None: absent),
/// `record` the record file's bytes (None: absent).
pub fn judge(key: &CacheKey, tar_size: Option<u64>, record: Option<&[u8]>) -> CacheState {
    let (size, record) = match (tar_size, record) {
        (None, None) => return CacheState::Missing,
        (None, Some(_)) => return CacheState::Stale("a completion record without its tarball".into()),
        (Some(_), None) => {
            return CacheState::Stale("no completion record (a build that did not finish, or an older Vessel's)".into())
        }
        (Some(s), Some(r)) => (s, r),
    };
    let rec: Record = match serde_json::from_slice(record) {
        Ok(r) => r,
        Err(e) => return CacheState::Stale(format!("unreadable completion record: {e}")),
    };
    if rec.version != RECORD_VERSION {
        return CacheState::Stale(format!("completion record version {}", rec.version));
    }
    if &rec.key != key {
        return CacheState::Stale(format!(
            "built from other inputs ({} {} with {})",
            rec.key.suite, rec.key.variant, rec.key.include
        ));
    }
    if rec.size != size {
        return CacheState::Stale(format!("tarball has {size} bytes, its record says {}", rec.size));
    }
    CacheState::Complete(rec)
}

/// A name no other builder on this machine uses: pid and 64 random bits.
pub fn unique_suffix() -> String {
    format!("{}-{:016x}", std::process::id(), nonce())
}

fn nonce() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == b.len() as isize {
        return u64::from_ne_bytes(b);
    }
    // No entropy source: time and a counter still differ between this process's builders.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rotate_left(48)
}

/// One entry of the cache directory.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    dir: PathBuf,
    stem: String,
    key: CacheKey,
}

impl CacheEntry {
    /// The entry of a debootstrap tree: `debian-<suite>-<variant>`.
    pub fn debootstrap(dir: &Path, key: CacheKey) -> CacheEntry {
        CacheEntry {
            dir: dir.to_path_buf(),
            stem: format!("debian-{}-{}", key.suite, key.variant),
            key,
        }
    }

    pub fn key(&self) -> &CacheKey {
        &self.key
    }
    pub fn tarball(&self) -> PathBuf {
        self.dir.join(format!("{}.tar", self.stem))
    }
    pub fn record(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.stem))
    }
    pub fn lock_file(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.stem))
    }

    /// A temp name for `target` (the tarball or the record) that is this builder's alone.
    pub fn temp_for(&self, target: &Path, suffix: &str) -> PathBuf {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.dir.join(format!(".{name}.tmp-{suffix}"))
    }

    /// Whether a file name in the cache directory is a temp file of this entry (of any
    /// builder, or the one fixed temp name older Vessels used).
    pub fn is_temp(&self, name: &str) -> bool {
        let ours = [format!(".{}.tar.tmp-", self.stem), format!(".{}.json.tmp-", self.stem)];
        ours.iter()
            .any(|p| name.starts_with(p.as_str()) && name.len() > p.len())
            || name == format!("{}.tar.tmp", self.stem)
    }

    /// Take the entry's lock, waiting at most `limit`; `on_wait` is told once, with the
    /// holder's pid if known, when another builder holds it.
    pub fn lock(&self, limit: Duration, on_wait: &mut dyn FnMut(Option<u32>)) -> Result<EntryLock> {
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let path = self.lock_file();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let start = Instant::now();
        let mut told = false;
        loop {
            // SAFETY: flock on an fd we own; the lock lives as long as `file`.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => {}
                Some(libc::EINTR) => continue,
                _ => return Err(io("lock", &path)(e)),
            }
            let holder = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
            if !told {
                on_wait(holder);
                told = true;
            }
            if start.elapsed() >= limit {
                return Err(CacheError::LockTimeout {
                    what: self.stem.clone(),
                    lock: path,
                    waited: start.elapsed(),
                    holder,
                });
            }
            std::thread::sleep(Duration::from_millis(200).min(limit));
        }
        // Who holds it, for the message of those who wait (advisory only).
        let _ = file.set_len(0);
        let _ = write!(file, "{}", std::process::id());
        Ok(EntryLock { _file: file })
    }

    /// Remove the temp files of builders that did not finish. Call it holding the lock:
    /// then no builder of this entry is writing.
    pub fn remove_stale_temps(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(io("read directory", &self.dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io("read directory", &self.dir))?;
            if self.is_temp(&e.file_name().to_string_lossy()) {
                let p = e.path();
                std::fs::remove_file(&p).map_err(io("remove", &p))?;
                removed.push(p);
            }
        }
        Ok(removed)
    }

    /// The entry's state on disk (size and record only; see `verify` for the contents).
    pub fn state(&self) -> Result<CacheState> {
        let tar = self.tarball();
        let size = match std::fs::metadata(&tar) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("stat", &tar)(e)),
        };
        let rec = self.record();
        let record = match std::fs::read(&rec) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &rec)(e)),
        };
        Ok(judge(&self.key, size, record.as_deref()))
    }

    /// Whether the tarball's contents are the ones its record describes.
    pub fn verify(&self, rec: &Record) -> Result<bool> {
        let tar = self.tarball();
        let f = File::open(&tar).map_err(io("open", &tar))?;
        Ok(hash_reader(f).map_err(io("read", &tar))? == rec.sha256)
    }

    /// Remove the entry: the record first, so that a crash in between leaves a tarball
    /// without a record, which is stale.
    pub fn discard(&self) -> Result<()> {
        for p in [self.record(), self.tarball()] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &p)(e)),
            }
        }
        sync_dir(&self.dir)
    }

    /// Make a finished temp tarball the entry: fsync it, rename it into place, then write
    /// the record (temp, fsync, rename, fsync the directory). Call it holding the lock.
    pub fn commit(&self, temp_tar: &Path, suffix: &str) -> Result<Record> {
        let f = File::open(temp_tar).map_err(io("open", temp_tar))?;
        f.sync_all().map_err(io("fsync", temp_tar))?;
        let size = f.metadata().map_err(io("stat", temp_tar))?.len();
        let sha256 = hash_reader(f).map_err(io("read", temp_tar))?;
        let tar = self.tarball();
        std::fs::rename(temp_tar, &tar).map_err(io("rename", temp_tar))?;
        sync_dir(&self.dir)?;
        let rec = Record {
            version: RECORD_VERSION,
            key: self.key.clone(),
            size,
            sha256,
        };
        let path = self.record();
        let tmp = self.temp_for(&path, suffix);
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&serde_json::to_vec_pretty(&rec).expect("record serializes"))
            .map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        sync_dir(&self.dir)?;
        Ok(rec)
    }
}

/// Held while building or checking an entry; dropping it (or the process dying) unlocks.
#[derive(Debug)]
pub struct EntryLock {
    _file: File,
}

fn hash_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        CacheKey {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            include: "procps".into(),
        }
    }

    fn record(size: u64) -> Vec<u8> {
        serde_json::to_vec(&Record {
            version: RECORD_VERSION,
            key: key(),
            size,
            sha256: "ab".into(),
        })
        .unwrap()
    }

    #[test]
    fn only_an_entry_with_a_matching_record_is_complete() {
        let k = key();
        assert_eq!(judge(&k, None, None), CacheState::Missing);
        assert!(matches!(judge(&k, Some(10), None), CacheState::Stale(_)));
        assert!(matches!(judge(&k, None, Some(&record(10))), CacheState::Stale(_)));
        assert!(matches!(judge(&k, Some(10), Some(b"{\"vers")), CacheState::Stale(_)));
        // A tarball cut short (or grown) is not the one the record describes.
        assert!(matches!(judge(&k, Some(9), Some(&record(10))), CacheState::Stale(_)));
        match judge(&k, Some(10), Some(&record(10))) {
            CacheState::Complete(r) => assert_eq!((r.size, r.sha256.as_str()), (10, "ab")),
            s => panic!("{s:?}"),
        }
        let mut other = key();
        other.include = "procps,vim".into();
        assert!(matches!(
            judge(&other, Some(10), Some(&record(10))),
            CacheState::Stale(_)
        ));
        let mut v2: serde_json::Value = serde_json::from_slice(&record(10)).unwrap();
        v2["version"] = 2.into();
        assert!(matches!(
            judge(&k, Some(10), Some(&serde_json::to_vec(&v2).unwrap())),
            CacheState::Stale(_)
        ));
    }

    #[test]
    fn names_of_an_entry() {
        let e = CacheEntry::debootstrap(Path::new("/c"), key());
        assert_eq!(e.tarball(), Path::new("/c/debian-bookworm-minbase.tar"));
        assert_eq!(e.record(), Path::new("/c/debian-bookworm-minbase.json"));
        assert_eq!(e.lock_file(), Path::new("/c/debian-bookworm-minbase.lock"));
        let t = e.temp_for(&e.tarball(), "12-ab");
        assert_eq!(t, Path::new("/c/.debian-bookworm-minbase.tar.tmp-12-ab"));
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(e.is_temp(&name(&t)));
        assert!(e.is_temp(&name(&e.temp_for(&e.record(), "12-ab"))));
        assert!(e.is_temp("debian-bookworm-minbase.tar.tmp"));
        for kept in [e.tarball(), e.record(), e.lock_file()] {
            assert!(!e.is_temp(&name(&kept)), "{kept:?}");
        }
        assert!(!e.is_temp(".debian-bookworm-minbase.tar.tmp-"));
        assert!(!e.is_temp(".debian-trixie-minbase.tar.tmp-12-ab"));
        // Two builders never share a temp name.
        assert_ne!(unique_suffix(), unique_suffix());
    }

    #[test]
    fn commit_makes_a_complete_entry_and_temps_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let e = CacheEntry::debootstrap(d.path(), key());
        assert_eq!(e.state().unwrap(), CacheState::Missing);
        let _l = e
            .lock(Duration::from_secs(1), &mut |_| panic!("nobody else holds it"))
            .unwrap();
        let stale = e.temp_for(&e.tarball(), "1-dead");
        std::fs::write(&stale, b"half").unwrap();
        let sfx = unique_suffix();
        let tmp = e.temp_for(&e.tarball(), &sfx);
        assert_eq!(e.remove_stale_temps().unwrap(), vec![stale.clone()]);
        std::fs::write(&tmp, b"tree").unwrap();
        let rec = e.commit(&tmp, &sfx).unwrap();
        assert!(!tmp.exists() && !stale.exists());
        assert_eq!(e.state().unwrap(), CacheState::Complete(rec.clone()));
        assert!(e.verify(&rec).unwrap());
        // Same size, other bytes: the hash catches it.
        std::fs::write(e.tarball(), b"TREE").unwrap();
        assert!(!e.verify(&rec).unwrap());
        e.discard().unwrap();
        assert_eq!(e.state().unwrap(), CacheState::Missing);
    }

    #[test]
    fn a_second_builder_waits_and_gives_up_at_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let e = CacheEntry::debootstrap(d.path(), key());
        let held = e.lock(Duration::ZERO, &mut |_| panic!("free")).unwrap();
        let mut told = Vec::new();
        let r = e.lock(Duration::from_millis(300), &mut |h| told.push(h));
        assert_eq!(told, vec![Some(std::process::id())]);
        match r {
            Err(err @ CacheError::LockTimeout { .. }) => {
                assert!(
                    err.to_string().contains("another build of debian-bookworm-minbase"),
                    "{err}"
                )
            }
            r => panic!("{r:?}"),
        }
        drop(held);
        e.lock(Duration::ZERO, &mut |_| panic!("released")).unwrap();
    }
}
