//! The volume core without root: epochs, the acknowledgement seam, a replica fed from a
//! writer's log, recovery after a crash at every step of a write, and compaction while
//! the volume is written.

use super::*;
use crate::ack::{AckError, Acks};
use crate::tree::ROOT;
use std::sync::Condvar;
use std::time::Duration;

pub(super) fn empty(dir: &Path, name: &str) -> Volume {
    let d = dir.join(name);
    Volume::create(&d, name, None).unwrap();
    Volume::open(&d, None).unwrap()
}

pub(super) fn file(v: &Volume, name: &str) -> Ino {
    v.mknod(ROOT, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0, b"")
        .unwrap()
        .ino
}

pub(super) fn all_txs(v: &Volume, from: u64) -> Vec<Tx> {
    let mut out = Vec::new();
    v.log_reader()
        .unwrap()
        .for_each::<VolumeError>(from, u64::MAX, |t, _| {
            out.push(t);
            Ok(true)
        })
        .unwrap();
    out
}

/// Every name, kind, size and content of a volume's tree, for comparing copies.
pub(super) fn snapshot(v: &Volume) -> Vec<(Vec<u8>, FileKind, u64, Vec<u8>)> {
    // FileKind has no order: sort by path (unique).
    let mut out = Vec::new();
    let mut stack = vec![(ROOT, Vec::new())];
    while let Some((dir, path)) = stack.pop() {
        let (_, entries) = v.readdir(dir).unwrap();
        for (name, ino, _) in entries.iter() {
            if name == b"." || name == b".." {
                continue;
            }
            let mut p = path.clone();
            p.push(b'/');
            p.extend_from_slice(name);
            let a = v.getattr(*ino).unwrap();
            let data = match a.kind {
                FileKind::File => v.read(*ino, 0, a.size as u32).unwrap(),
                FileKind::Dir => {
                    stack.push((*ino, p.clone()));
                    Vec::new()
                }
                _ => Vec::new(),
            };
            out.push((p, a.kind, a.size, data));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn the_promised_epoch_is_durable_and_only_goes_up() {
    let d = tempfile::tempdir().unwrap();
    let v = empty(d.path(), "v");
    assert_eq!(v.epoch(), 1);
    let f = file(&v, "a");
    v.raise_epoch(5).unwrap();
    v.write(f, 0, b"x").unwrap();
    let e = v.raise_epoch(4).unwrap_err();
    assert!(matches!(e, VolumeError::StaleEpoch { current: 5, got: 4, .. }), "{e}");
    v.raise_epoch(5).unwrap();
    let epochs: Vec<u64> = all_txs(&v, 1).iter().map(|t| t.epoch).collect();
    assert_eq!(epochs, vec![1, 5], "commits carry the promised epoch");
    drop(v);
    let v = Volume::open(&d.path().join("v"), None).unwrap();
    assert_eq!(v.epoch(), 5);
    // Promised but not used yet: still promised after a reopen.
    v.raise_epoch(7).unwrap();
    drop(v);
    let v = Volume::open(&d.path().join("v"), None).unwrap();
    assert_eq!(v.epoch(), 7);
    // A damaged or newer-format epoch file is a clear error, not epoch 0.
    drop(v);
    std::fs::write(d.path().join("v/epoch.json"), b"{\"version\":9,\"epoch\":3}").unwrap();
    let e = Volume::open(&d.path().join("v"), None).err().unwrap();
    assert!(e.to_string().contains("format version 9"), "{e}");
}

#[test]
fn a_replica_fed_the_writers_log_is_the_same_volume_and_refuses_old_epochs() {
    let d = tempfile::tempdir().unwrap();
    let w = empty(d.path(), "w");
    let r = empty(d.path(), "r");
    let a = file(&w, "a");
    w.write(a, 0, &vec![1u8; 10000]).unwrap();
    w.write(a, 4096, b"middle").unwrap();
    let b = file(&w, "b");
    w.write(b, 0, b"bee").unwrap();
    w.link(b, ROOT, b"b2").unwrap();
    w.rename(ROOT, b"a", ROOT, b"c", 0).unwrap();
    let sub = w.mknod(ROOT, b"sub", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    let g = w.mknod(sub, b"g", FileKind::File, 0o600, 0, 0, 0, b"").unwrap().ino;
    w.write(g, 0, b"gone soon").unwrap();
    w.setxattr(b, b"user.k", b"v", false, false).unwrap();
    w.setattr(
        b,
        &SetAttr {
            size: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    w.remove(sub, b"g", false).unwrap();
    for t in all_txs(&w, 1) {
        r.append_replicated(&t).unwrap();
    }
    assert_eq!(snapshot(&r), snapshot(&w));
    assert!(
        !r.dir().join("data").join(data_name(g)).exists(),
        "freed files are removed"
    );
    // A gap and a replay are refused; the replica is unchanged.
    let mut next = all_txs(&w, 1).pop().unwrap();
    next.seq += 2;
    assert!(r.append_replicated(&next).is_err());
    // A newer writer (epoch 3) is promised; the old one (epoch 1) is then fenced.
    w.raise_epoch(3).unwrap();
    w.write(b, 0, b"B").unwrap();
    let t = all_txs(&w, 1).pop().unwrap();
    assert_eq!(t.epoch, 3);
    r.append_replicated(&t).unwrap();
    assert_eq!(r.epoch(), 3);
    let stale = Tx {
        epoch: 1,
        seq: t.seq + 1,
        time_ns: t.time_ns,
        op: Op::Write {
            ino: b,
            offset: 0,
            data: b"old writer".to_vec(),
        },
    };
    let e = r.append_replicated(&stale).unwrap_err();
    assert!(matches!(e, VolumeError::StaleEpoch { current: 3, got: 1, .. }), "{e}");
    // Reopened, the replica is the same volume (replay uses the same apply).
    let want = snapshot(&w);
    drop(r);
    let r = Volume::open(&d.path().join("r"), None).unwrap();
    assert_eq!(snapshot(&r), want);
    assert_eq!(r.epoch(), 3);
}

/// A fake party that acknowledges what it is told to, when it is told to.
#[derive(Default)]
struct Fake {
    seen: Mutex<Vec<u64>>,
    acked: Mutex<u64>,
    cv: Condvar,
}

impl Fake {
    fn ack(&self, seq: u64) {
        *self.acked.lock().unwrap() = seq;
        self.cv.notify_all();
    }
}

impl Acks for Arc<Fake> {
    fn committed(&self, tx: &Tx) {
        self.seen.lock().unwrap().push(tx.seq);
    }

    fn wait(&self, seq: u64, timeout: Duration) -> std::result::Result<(), AckError> {
        let g = self.acked.lock().unwrap();
        let (g, _) = self.cv.wait_timeout_while(g, timeout, |a| *a < seq).unwrap();
        if *g >= seq {
            Ok(())
        } else {
            Err(AckError::Timeout {
                seq,
                waited_ms: timeout.as_millis() as u64,
                why: "fake replica dropped it".into(),
            })
        }
    }
}

#[test]
fn a_sync_waits_for_the_acknowledgements_and_fails_without_them() {
    let d = tempfile::tempdir().unwrap();
    let v = Arc::new(empty(d.path(), "v"));
    let fake = Arc::new(Fake::default());
    v.set_acks(Arc::new(fake.clone()));
    v.set_ack_timeout(Duration::from_millis(200));
    let f = file(&v, "a");
    v.write(f, 0, b"one").unwrap();
    // Every commit is handed on, in order.
    assert_eq!(*fake.seen.lock().unwrap(), vec![1, 2]);
    // Dropped acknowledgements: the sync fails (EIO) instead of answering too early; the
    // local log is durable all the same.
    assert_eq!(v.sync(), Err(libc::EIO));
    assert_eq!(v.durable_through(), 2);
    // Delayed acknowledgements: the sync answers only after they come.
    v.set_ack_timeout(Duration::from_secs(30));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = {
        let (v, done) = (v.clone(), done.clone());
        std::thread::spawn(move || {
            let r = v.sync();
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "the sync answered before its acknowledgement"
    );
    fake.ack(1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "an older acknowledgement answered the sync"
    );
    fake.ack(2);
    assert_eq!(t.join().unwrap(), Ok(()));
    // Nothing new: a sync asks for what was acknowledged already.
    assert_eq!(v.sync(), Ok(()));
}

/// The on-disk files of a volume, to put back as a crash left them.
fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir.join("txlog")).unwrap().flatten() {
        out.push((e.path(), std::fs::read(e.path()).unwrap()));
    }
    for (_, p) in data_files(&dir.join("data")) {
        let b = std::fs::read(&p).unwrap();
        out.push((p, b));
    }
    for f in ["checkpoint", "epoch.json"] {
        if let Ok(b) = std::fs::read(dir.join(f)) {
            out.push((dir.join(f), b));
        }
    }
    out
}

fn in_data(p: &Path) -> bool {
    p.ancestors().any(|a| a.ends_with("data"))
}

fn put_back(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
    for sub in ["txlog", "data"] {
        std::fs::remove_dir_all(dir.join(sub)).unwrap();
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    layout_data(&dir.join("data")).unwrap();
    let _ = std::fs::remove_file(dir.join("checkpoint"));
    for (p, b) in files {
        std::fs::write(p, b).unwrap();
    }
}

#[test]
fn recovery_after_a_crash_at_every_step_of_a_write() {
    // Steps of a write: the record reaches the log (any prefix of it may be on disk),
    // then the data file (it may or may not be), then the next checkpoint. After a crash
    // at any point, open gives the tree before or after the write, with contents that
    // match it; a synced write is always there.
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    let v = empty(d.path(), "v");
    let f = file(&v, "f");
    v.write(f, 0, &vec![b'o'; 6000]).unwrap();
    v.checkpoint().unwrap();
    let kept = file(&v, "kept");
    v.write(kept, 0, b"synced").unwrap();
    v.sync().unwrap();
    let before = snapshot(&v);
    let seg_before = files_of(&dir);
    // The write: overwrite inside and grow past the old end; and a new file.
    v.write(f, 5900, &vec![b'n'; 300]).unwrap();
    let mid1 = snapshot(&v);
    let newf = file(&v, "new");
    let mid2 = snapshot(&v);
    v.write(newf, 0, b"fresh").unwrap();
    let after = snapshot(&v);
    let boundaries = [&before, &mid1, &mid2, &after];
    let (last, _) = v.log_status();
    drop(v);
    let full = files_of(&dir);
    let seg = |files: &[(PathBuf, Vec<u8>)]| {
        files
            .iter()
            .filter(|(p, _)| p.parent().unwrap().ends_with("txlog"))
            .max_by_key(|(p, _)| p.clone())
            .cloned()
            .unwrap()
    };
    let (seg_path, seg_full) = seg(&full);
    // The log writes zeros ahead of itself: its records end at the last non-zero byte
    // (the last record before is the synced write, which ends in its data).
    let end = |b: &[u8]| b.iter().rposition(|x| *x != 0).map_or(0, |i| i + 1);
    let seg_old_len = end(&seg(&seg_before).1);
    assert!(seg_old_len < end(&seg_full));
    let data_variants: Vec<Vec<(PathBuf, Vec<u8>)>> = vec![
        // The data files as before the write, and as after it.
        seg_before.iter().filter(|(p, _)| in_data(p)).cloned().collect(),
        full.iter().filter(|(p, _)| in_data(p)).cloned().collect(),
    ];
    let ckpt: Vec<(PathBuf, Vec<u8>)> = seg_before
        .iter()
        .filter(|(p, _)| p.ends_with("checkpoint"))
        .cloned()
        .collect();
    let mut states = 0;
    // Every byte near the ends of the new records' stretch, a stride in between (each
    // state costs an open with its fsyncs).
    let new_end = end(&seg_full);
    let cuts: Vec<usize> = (seg_old_len..=new_end)
        .filter(|c| c - seg_old_len < 48 || new_end - c < 48 || (c - seg_old_len) % 11 == 0)
        .chain([seg_full.len()])
        .collect();
    for cut in cuts {
        for data in &data_variants {
            let mut files: Vec<(PathBuf, Vec<u8>)> = vec![(seg_path.clone(), seg_full[..cut].to_vec())];
            files.extend(data.iter().cloned());
            files.extend(ckpt.iter().cloned());
            put_back(&dir, &files);
            let v = Volume::open(&dir, None).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            let got = snapshot(&v);
            let (seq, _) = v.log_status();
            assert!(seq <= last);
            // The synced file is always there, whole.
            assert!(
                got.iter().any(|(p, _, _, c)| p == b"/kept" && c == b"synced"),
                "cut {cut}"
            );
            if cut == seg_full.len() {
                assert_eq!(got, after, "the whole log: the state after the write");
            } else if data.len() == data_variants[0].len() {
                // A torn log, data files as before: exactly the state at a transaction
                // boundary.
                assert!(boundaries.contains(&&got), "cut {cut}: not a transaction boundary");
            } else {
                // A torn log with the data write on disk (unsynced; the disk may keep it):
                // the tree is at a boundary, and file sizes follow the tree.
                let shape = |s: &[(Vec<u8>, FileKind, u64, Vec<u8>)]| -> Vec<(Vec<u8>, u64)> {
                    s.iter().map(|(p, _, n, _)| (p.clone(), *n)).collect()
                };
                assert!(
                    boundaries.iter().any(|b| shape(b) == shape(&got)),
                    "cut {cut}: tree not at a boundary"
                );
                for (p, kind, size, c) in &got {
                    if *kind == FileKind::File {
                        assert_eq!(c.len() as u64, *size, "{} at cut {cut}", String::from_utf8_lossy(p));
                    }
                }
            }
            // Reopening again changes nothing (recovery is idempotent).
            if states % 8 == 0 {
                drop(v);
                let v = Volume::open(&dir, None).unwrap();
                assert_eq!(snapshot(&v), got, "second open after cut {cut}");
            }
            states += 1;
        }
    }
    assert!(states > 100, "{states} crash states");
}

#[test]
fn compaction_runs_beside_writes_and_keeps_history_and_contents() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    Volume::create(&dir, "v", None).unwrap();
    let v = Arc::new(Volume::open_with(&dir, None, VolumeOptions { segment_bytes: 4096 }).unwrap());
    v.set_retention(Some(0));
    let files: Vec<Ino> = (0..20).map(|i| file(&v, &format!("f{i}"))).collect();
    for (i, f) in files.iter().enumerate() {
        v.write(*f, 0, &vec![i as u8; 3000]).unwrap();
    }
    // Writers keep changing half the files while compactions run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (v, stop, files) = (v.clone(), stop.clone(), files.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) && n < 20_000 {
                let f = files[(n % 10) as usize];
                v.write(f, (n % 7) * 100, &n.to_le_bytes()).unwrap();
                n += 1;
            }
            n
        })
    };
    let mut freed = 0;
    for _ in 0..20 {
        freed += v.compact(now_ns() + 1_000_000_000).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let n = writer.join().unwrap();
    assert!(n > 0);
    assert!(freed > 0, "compaction dropped log segments");
    let live = snapshot(&v);
    // The base's copies are the files as of the base, and the untouched half shares them.
    let base = v.base_meta();
    assert!(base.seq > 20);
    for (i, f) in files.iter().enumerate().skip(10) {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut v.open_base_data(*f).unwrap(), &mut b).unwrap();
        assert_eq!(b, vec![i as u8; 3000]);
    }
    // Reopened: the same volume.
    drop(v);
    let v = Volume::open(&dir, None).unwrap();
    assert_eq!(snapshot(&v), live);
}

#[test]
fn a_flat_data_directory_of_an_older_volume_moves_into_shards() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    let v = empty(d.path(), "v");
    let f = file(&v, "f");
    v.write(f, 0, b"old layout").unwrap();
    v.checkpoint().unwrap();
    drop(v);
    // As 0.2 left it: data/<ino:016x>, no shard directories.
    let flat = dir.join("data").join(format!("{f:016x}"));
    std::fs::rename(dir.join("data").join(data_name(f)), &flat).unwrap();
    for i in 0..DATA_SHARDS {
        std::fs::remove_dir(dir.join("data").join(shard_name(i))).unwrap();
    }
    let v = Volume::open(&dir, None).unwrap();
    assert_eq!(v.read(f, 0, 100).unwrap(), b"old layout");
    assert!(!flat.exists());
    assert!(dir.join("data").join(data_name(f)).exists());
    assert_eq!(data_files(&dir.join("data")).len(), 1);
}

#[test]
fn the_shard_directories_are_spread_over_ext4_block_groups() {
    use std::os::fd::AsRawFd;
    let d = tempfile::tempdir().unwrap();
    let _v = empty(d.path(), "v");
    let data = std::fs::File::open(d.path().join("v").join("data")).unwrap();
    // SAFETY: statfs is plain old data; all zeroes is a valid value.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs fills the struct it is given; the descriptor is open.
    let r = unsafe { libc::fstatfs(data.as_raw_fd(), &mut sfs) };
    assert_eq!(r, 0);
    if sfs.f_type != 0xEF53 {
        eprintln!("skipped: the temp dir is not on ext4 (the flag is ext4's)");
        return;
    }
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long into `flags`; the descriptor is open.
    let r = unsafe { libc::ioctl(data.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    assert_eq!(r, 0);
    assert_ne!(flags & 0x0002_0000, 0, "data/ carries the top-directory flag");
}
