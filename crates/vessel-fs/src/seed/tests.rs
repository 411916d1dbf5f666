//! A seeded copy is the same volume: tree, contents, history; a damaged or cut stream
//! installs nothing.

use super::*;
use crate::history;
use crate::tree::ROOT;
use crate::tx::FileKind;
use crate::volume::{SetAttr, VolumeOptions};
use std::sync::Arc;

const OPTS: VolumeOptions = VolumeOptions { segment_bytes: 4096 };

fn file(v: &Volume, parent: Ino, name: &str) -> Ino {
    v.mknod(parent, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0, b"")
        .unwrap()
        .ino
}

/// A path with its size, contents and xattrs.
type Entry = (Vec<u8>, u64, Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// Every path with its kind, size, contents, xattrs; plus the tree's own encoding.
fn contents(v: &Volume) -> (Vec<Entry>, Vec<u8>) {
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
            let xattrs = v
                .listxattr(*ino)
                .unwrap()
                .into_iter()
                .map(|k| {
                    let val = v.getxattr(*ino, &k).unwrap();
                    (k, val)
                })
                .collect();
            out.push((p, a.size, data, xattrs));
        }
    }
    out.sort();
    (out, v.with_tree(|t, _| t.checkpoint()))
}

fn all_txs(v: &Volume, from: u64) -> Vec<Tx> {
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

/// A volume with history compacted into a base (files shared with the live copy, a
/// sparse file), then more transactions in a later epoch.
fn source(d: &Path) -> Volume {
    let dir = d.join("src");
    Volume::create(&dir, "web", None).unwrap();
    let v = Volume::open_with(&dir, None, OPTS).unwrap();
    let a = file(&v, ROOT, "a");
    v.write(a, 0, &vec![7u8; 5000]).unwrap();
    let b = file(&v, ROOT, "b");
    v.write(b, 0, b"bee").unwrap();
    v.link(b, ROOT, b"b2").unwrap();
    v.setxattr(b, b"user.k", b"v", false, false).unwrap();
    let sub = v.mknod(ROOT, b"sub", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    let sparse = file(&v, sub, "sparse");
    v.write(sparse, 0, b"head").unwrap();
    v.write(sparse, 64 << 20, b"tail").unwrap();
    v.rename(ROOT, b"a", sub, b"a", 0).unwrap();
    v.mknod(ROOT, b"ln", FileKind::Symlink, 0o777, 0, 0, 0, b"sub/a")
        .unwrap();
    let pad = file(&v, ROOT, "pad");
    for i in 0..30u64 {
        v.write(pad, i * 700, &[i as u8; 700]).unwrap();
    }
    v.set_retention(Some(0));
    assert!(v.compact(now() + 1_000_000_000).unwrap() > 0);
    assert!(v.base_meta().seq > 10, "history was compacted");
    v.raise_epoch(2).unwrap();
    v.write(b, 1, b"EE").unwrap();
    v.setattr(
        a,
        &SetAttr {
            size: Some(100),
            ..Default::default()
        },
    )
    .unwrap();
    v.remove(ROOT, b"b2", false).unwrap();
    v
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn snapshot_of(v: &Volume) -> Vec<u8> {
    let mut out = Vec::new();
    write_snapshot(v, &mut out, |_| {}).unwrap();
    out
}

/// Nothing of an install is left next to the target.
fn leftovers(d: &Path) -> Vec<String> {
    std::fs::read_dir(d)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "src")
        .collect()
}

#[test]
fn a_seeded_copy_is_the_same_volume_with_the_same_history() {
    let d = tempfile::tempdir().unwrap();
    let v = source(d.path());
    let mut reports = Vec::new();
    let mut stream = Vec::new();
    let last = write_snapshot(&v, &mut stream, |p| reports.push(*p)).unwrap();
    assert_eq!(last, v.last_seq());
    assert!(stream.len() < 1 << 20, "holes are not sent ({} bytes)", stream.len());
    let mut got_reports = Vec::new();
    let got = install_with(&d.path().join("copy"), &mut &stream[..], |p| got_reports.push(*p)).unwrap();
    assert_eq!(got_reports.last(), reports.last(), "both ends count alike");
    assert_eq!(got, last);
    assert!(reports
        .last()
        .is_some_and(|p| p.txs == last - v.base_meta().seq && p.files > 3));
    let c = Volume::open_with(&d.path().join("copy"), None, OPTS).unwrap();
    assert_eq!(contents(&c), contents(&v));
    assert_eq!(c.epoch_history(), v.epoch_history());
    assert_eq!(c.epoch(), 2);
    assert_eq!(c.base_meta(), v.base_meta());
    assert_eq!(
        (c.last_seq(), c.first_retained_seq()),
        (v.last_seq(), v.first_retained_seq())
    );
    assert_eq!(all_txs(&c, 0), all_txs(&v, 0));
    assert_eq!(
        history::history(&c, "/", 1 << 20).unwrap().entries,
        history::history(&v, "/", 1 << 20).unwrap().entries
    );
    assert_eq!(c.base_tree().unwrap().checkpoint(), v.base_tree().unwrap().checkpoint());
    // The copy goes on with the live stream.
    v.write(2, 0, b"live").unwrap_or_default();
    let next = all_txs(&v, last + 1);
    c.append_replicated_batch(&next).unwrap();
    assert_eq!(contents(&c), contents(&v));
    // A target that exists is refused.
    let e = install(&d.path().join("copy"), &mut &stream[..]).unwrap_err();
    assert!(matches!(e, SeedError::Exists(_)), "{e}");
}

#[test]
fn a_damaged_or_cut_stream_installs_nothing() {
    let d = tempfile::tempdir().unwrap();
    let v = source(d.path());
    let stream = snapshot_of(&v);
    let target = d.path().join("copy");
    // A flipped byte anywhere: the stream header, the header frame, a file, a transaction,
    // the end frame.
    let step = (stream.len() / 97).max(1);
    let mut flips = 0;
    for at in (0..stream.len()).step_by(step).chain([stream.len() - 1, 5, 20]) {
        let mut bad = stream.clone();
        bad[at] ^= 0x40;
        let e = install(&target, &mut &bad[..]).unwrap_err();
        assert!(
            matches!(e, SeedError::Damaged { .. } | SeedError::Truncated(_)),
            "byte {at}: {e}"
        );
        assert!(!target.exists() && leftovers(d.path()).is_empty(), "byte {at}");
        flips += 1;
    }
    assert!(flips > 90);
    // Cut short anywhere.
    for len in (0..stream.len()).step_by(step) {
        let e = install(&target, &mut &stream[..len]).unwrap_err();
        assert!(matches!(e, SeedError::Truncated(_)), "cut at {len}: {e}");
        assert!(!target.exists() && leftovers(d.path()).is_empty());
    }
    // Whole, it installs; nothing past the end frame is read.
    let mut more = stream.clone();
    more.extend_from_slice(b"live stream follows");
    let mut r = &more[..];
    install(&target, &mut r).unwrap();
    assert_eq!(r, b"live stream follows");
}

#[test]
fn a_snapshot_taken_while_the_volume_is_written_has_the_base_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let v = Arc::new(source(d.path()));
    let base_files = v.base_files();
    let want: Vec<Vec<u8>> = base_files
        .iter()
        .map(|i| {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut v.open_base_data(*i).unwrap(), &mut b).unwrap();
            b
        })
        .collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (v, stop, files) = (v.clone(), stop.clone(), base_files.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 5_000 {
                let f = files[(n as usize) % files.len()];
                let _ = v.write(f, 0, b"XXXXXXXX");
                n += 1;
            }
        })
    };
    let stream = snapshot_of(&v);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let target = d.path().join("copy");
    install(&target, &mut &stream[..]).unwrap();
    let c = Volume::open_with(&target, None, OPTS).unwrap();
    for (i, w) in base_files.iter().zip(&want) {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut c.open_base_data(*i).unwrap(), &mut b).unwrap();
        assert_eq!(&b, w, "base file {i}");
    }
    let last = c.last_seq();
    assert_eq!(contents(&c).0.len(), contents(&c).0.len());
    c.append_replicated_batch(&all_txs(&v, last + 1)).unwrap();
    assert_eq!(contents(&c), contents(&v));
}

#[test]
fn a_base_file_shared_with_the_live_one_is_read_as_of_the_base_after_a_live_write() {
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let v = source(d.path());
    let dir = v.dir().to_path_buf();
    let shared: Vec<Ino> = v
        .base_files()
        .into_iter()
        .filter(|i| {
            let b = std::fs::metadata(dir.join("base/data").join(data_name(*i))).unwrap();
            let l = std::fs::metadata(dir.join("data").join(data_name(*i)));
            l.is_ok_and(|l| l.ino() == b.ino())
        })
        .collect();
    assert!(!shared.is_empty(), "compaction shares unchanged files");
    for ino in shared {
        let mut f = v.open_base_file(ino).unwrap();
        let mut before = vec![0u8; 16];
        crate::sparse::read_at_padded(&f.file, 0, &mut before).unwrap();
        // The VE writes the file while the snapshot has it open.
        v.write(ino, 0, b"changed after the base").unwrap();
        let mut got = vec![0u8; 16];
        v.read_base_file(&mut f, 0, &mut got).unwrap();
        assert_eq!(got, before, "file {ino}");
    }
}

#[test]
fn upkeep_does_not_wait_for_a_snapshot_in_progress() {
    let d = tempfile::tempdir().unwrap();
    let v = Arc::new(source(d.path()));
    let f = file(&v, ROOT, "more");
    for i in 0..40u64 {
        v.write(f, i * 700, &[i as u8; 700]).unwrap();
    }
    let base = v.base_meta().seq;
    {
        // What a snapshot holds while it streams; the upkeep runs on its own thread (a
        // compaction that waited would never return: the wait is bounded only to fail
        // rather than hang).
        let _reading = v.history_guard();
        let (tx, rx) = std::sync::mpsc::channel();
        let upkeep = {
            let v = v.clone();
            std::thread::spawn(move || tx.send(v.compact(now() + 1_000_000_000).unwrap()))
        };
        let freed = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("compaction waited for the snapshot");
        assert_eq!(freed, 0, "skipped");
        upkeep.join().unwrap().unwrap();
        assert_eq!(v.base_meta().seq, base);
    }
    assert!(
        v.compact(now() + 1_000_000_000).unwrap() > 0,
        "compacts once the reader is gone"
    );
}
