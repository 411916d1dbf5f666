//! What replication needs from storage: the epoch history, batched appends, cutting a
//! divergent tail (tests without root).

use super::tests::{all_txs, empty, file, snapshot};
use super::*;
use crate::epochs::EpochStart;
use crate::tree::ROOT;

fn tree_bytes(v: &Volume) -> Vec<u8> {
    v.with_tree(|t, _| t.checkpoint())
}

/// Files written, renamed, truncated, hard-linked, with xattrs and a directory.
fn prefix_workload(w: &Volume) -> Vec<Ino> {
    let a = file(w, "a");
    w.write(a, 0, &vec![1u8; 10000]).unwrap();
    w.write(a, 4096, b"middle").unwrap();
    let b = file(w, "b");
    w.write(b, 0, b"bee bee bee").unwrap();
    w.link(b, ROOT, b"b2").unwrap();
    w.rename(ROOT, b"a", ROOT, b"c", 0).unwrap();
    let sub = w.mknod(ROOT, b"sub", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    let g = w.mknod(sub, b"g", FileKind::File, 0o600, 0, 0, 0, b"").unwrap().ino;
    w.write(g, 0, b"stays").unwrap();
    w.setxattr(b, b"user.k", b"v", false, false).unwrap();
    w.setattr(
        b,
        &SetAttr {
            size: Some(5),
            ..Default::default()
        },
    )
    .unwrap();
    w.mknod(ROOT, b"ln", FileKind::Symlink, 0o777, 0, 0, 0, b"c").unwrap();
    vec![a, b, sub, g]
}

/// A tail that changes the prefix's files in place, removes, renames and adds.
fn tail_workload(w: &Volume, f: &[Ino]) {
    let (a, b, sub, g) = (f[0], f[1], f[2], f[3]);
    w.write(a, 100, b"TAIL WRITE").unwrap();
    w.write(b, 0, b"changed").unwrap();
    w.setattr(
        a,
        &SetAttr {
            size: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    w.setxattr(b, b"user.k", b"tail", false, false).unwrap();
    w.remove(ROOT, b"b2", false).unwrap();
    w.remove(sub, b"g", false).unwrap();
    let _ = g;
    w.rename(ROOT, b"c", sub, b"moved", 0).unwrap();
    let n = file(w, "new");
    w.write(n, 0, b"only in the tail").unwrap();
}

#[test]
fn the_epoch_history_is_noted_persisted_and_derived_for_older_volumes() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    let v = empty(d.path(), "v");
    let f = file(&v, "a");
    v.write(f, 0, b"1").unwrap();
    v.raise_epoch(3).unwrap();
    v.write(f, 0, b"2").unwrap();
    v.write(f, 0, b"3").unwrap();
    let want = vec![
        EpochStart { epoch: 1, first_seq: 1 },
        EpochStart { epoch: 3, first_seq: 3 },
    ];
    assert_eq!(v.epoch_history().entries, want);
    assert_eq!((v.last_seq(), v.first_retained_seq()), (4, 1));
    // A replica notes the same history from the writer's transactions.
    let r = empty(d.path(), "r");
    assert_eq!(r.append_replicated_batch(&all_txs(&v, 1)).unwrap(), 4);
    assert_eq!(r.epoch_history(), v.epoch_history());
    drop(v);
    let v = Volume::open(&dir, None).unwrap();
    assert_eq!(v.epoch_history().entries, want, "persisted");
    drop(v);
    // A volume made before epochs.json derives it from its log.
    std::fs::remove_file(dir.join(EPOCHS_FILE)).unwrap();
    let v = Volume::open(&dir, None).unwrap();
    assert_eq!(v.epoch_history().entries, want, "derived");
    assert!(dir.join(EPOCHS_FILE).exists(), "and written");
    drop(v);
    // A new epoch noted durably whose transaction never reached the log (a crash in
    // between) is forgotten at open.
    let mut h = crate::epochs::EpochHistory::new();
    h.entries = want.clone();
    h.entries.push(EpochStart { epoch: 7, first_seq: 5 });
    std::fs::write(dir.join(EPOCHS_FILE), serde_json::to_vec(&h).unwrap()).unwrap();
    let v = Volume::open(&dir, None).unwrap();
    assert_eq!(v.epoch_history().entries, want);
    // Another format version is refused with the file named.
    drop(v);
    h.version = 99;
    std::fs::write(dir.join(EPOCHS_FILE), serde_json::to_vec(&h).unwrap()).unwrap();
    let e = Volume::open(&dir, None).err().unwrap().to_string();
    assert!(e.contains("epochs.json") && e.contains("format version 99"), "{e}");
}

#[test]
fn a_derived_history_covers_the_compacted_prefix_with_the_first_retained_epoch() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("v");
    Volume::create(&dir, "v", None).unwrap();
    let v = Volume::open_with(&dir, None, VolumeOptions { segment_bytes: 4096 }).unwrap();
    v.raise_epoch(2).unwrap();
    let f = file(&v, "a");
    for i in 0..40u64 {
        v.write(f, 0, &vec![i as u8; 1000]).unwrap();
    }
    v.raise_epoch(4).unwrap();
    for i in 0..40u64 {
        v.write(f, i * 10, b"e4").unwrap();
    }
    v.set_retention(Some(0));
    assert!(v.compact(now_ns() + 1_000_000_000).unwrap() > 0);
    let base = v.base_meta().seq;
    assert!(base > 1);
    assert_eq!(v.first_retained_seq(), base + 1);
    let kept = v.epoch_history();
    assert_eq!(
        kept.entries,
        vec![
            EpochStart { epoch: 2, first_seq: 1 },
            EpochStart {
                epoch: 4,
                first_seq: 42
            }
        ]
    );
    let first_retained = all_txs(&v, base + 1)[0].epoch;
    drop(v);
    std::fs::remove_file(dir.join(EPOCHS_FILE)).unwrap();
    let v = Volume::open_with(&dir, None, VolumeOptions { segment_bytes: 4096 }).unwrap();
    let h = v.epoch_history();
    assert_eq!(
        h.entries[0],
        EpochStart {
            epoch: first_retained,
            first_seq: 1
        }
    );
    assert_eq!(h.epoch_at(42), Some(4));
    assert_eq!(h.epoch_at(v.last_seq()), Some(4));
}

#[test]
fn a_batch_is_appended_applied_and_made_durable_once() {
    let d = tempfile::tempdir().unwrap();
    let w = empty(d.path(), "w");
    let r = empty(d.path(), "r");
    let f = prefix_workload(&w);
    tail_workload(&w, &f);
    let txs = all_txs(&w, 1);
    let syncs = |v: &Volume| v.stats().snapshot().syncs;
    let before = syncs(&r);
    let mut durable = 0;
    for chunk in txs.chunks(5) {
        durable = r.append_replicated_batch(chunk).unwrap();
        assert_eq!(durable, chunk.last().unwrap().seq);
        assert_eq!(r.durable_through(), durable);
    }
    assert_eq!(
        syncs(&r) - before,
        txs.chunks(5).len() as u64,
        "one fdatasync per batch"
    );
    assert_eq!(durable, w.last_seq());
    assert_eq!(snapshot(&r), snapshot(&w));
    assert_eq!(tree_bytes(&r), tree_bytes(&w));
    // A batch with a gap is refused at the gap; nothing after it is applied.
    let mut gap = txs.last().unwrap().clone();
    gap.seq += 2;
    assert!(r.append_replicated_batch(&[gap]).is_err());
    assert_eq!(r.last_seq(), w.last_seq());
}

/// The writer's log through `seq` fed to a fresh volume: what a cut copy must equal.
fn prefix_copy(d: &Path, name: &str, txs: &[Tx], seq: u64) -> Volume {
    let p = empty(d, name);
    let prefix: Vec<Tx> = txs.iter().filter(|t| t.seq <= seq).cloned().collect();
    p.append_replicated_batch(&prefix).unwrap();
    p
}

fn assert_same(a: &Volume, b: &Volume) {
    assert_eq!(snapshot(a), snapshot(b));
    assert_eq!(tree_bytes(a), tree_bytes(b), "trees (xattrs, links, times) equal");
    assert_eq!(a.epoch_history(), b.epoch_history());
    assert_eq!(a.last_seq(), b.last_seq());
}

#[test]
fn a_cut_tail_leaves_the_volume_the_prefix_made() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("w");
    let w = empty(d.path(), "w");
    let f = prefix_workload(&w);
    let s = w.last_seq();
    w.raise_epoch(2).unwrap();
    tail_workload(&w, &f);
    let txs = all_txs(&w, 1);
    let tail = w.last_seq() - s;
    let p = prefix_copy(d.path(), "p", &txs, s);
    drop(w);
    let (w, cut) = Volume::cut_after(&dir, None, s).unwrap();
    assert_eq!(cut, tail);
    assert_same(&w, &p);
    assert!(!dir.join(CUT_FILE).exists());
    // Both take the next writer's transaction (epoch 3) alike, and reopen alike.
    w.raise_epoch(3).unwrap();
    let x = file(&w, "after");
    w.write(x, 0, b"epoch 3").unwrap();
    w.write(f[1], 1, b"E").unwrap();
    p.append_replicated_batch(&all_txs(&w, s + 1)).unwrap();
    assert_same(&w, &p);
    drop(w);
    let w = Volume::open(&dir, None).unwrap();
    assert_same(&w, &p);
    // Nothing to cut past the end.
    drop(w);
    let (_, cut) = Volume::cut_after(&dir, None, 1_000).unwrap();
    assert_eq!(cut, 0);
}

#[test]
fn a_cut_after_compaction_rebuilds_from_the_base_and_below_it_needs_a_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("w");
    let opts = VolumeOptions { segment_bytes: 4096 };
    Volume::create(&dir, "w", None).unwrap();
    let w = Volume::open_with(&dir, None, opts).unwrap();
    let f = prefix_workload(&w);
    let pad = file(&w, "pad");
    w.write(pad, 0, &[0u8; 512]).unwrap();
    let first_pad = w.last_seq();
    for i in 1..30u64 {
        w.write(pad, i * 512, &[i as u8; 512]).unwrap();
    }
    let txs_before = all_txs(&w, 1);
    w.set_retention(Some(0));
    assert!(w.compact(now_ns() + 1_000_000_000).unwrap() > 0);
    let base = w.base_meta().seq;
    assert!(base >= first_pad);
    // More prefix after the base, then a tail in epoch 2 that writes the files the base
    // shares with the live copy (hard links) in place.
    w.write(f[3], 0, b"after base").unwrap();
    let s = w.last_seq();
    w.raise_epoch(2).unwrap();
    tail_workload(&w, &f);
    w.write(pad, 0, b"tail over a shared file").unwrap();
    let mut txs = txs_before;
    txs.extend(all_txs(&w, txs.len() as u64 + 1));
    let p = prefix_copy(d.path(), "p", &txs, s);
    drop(w);
    let e = Volume::cut_after_with(&dir, None, base - 1, opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("snapshot"), "{e}");
    let (w, _) = Volume::cut_after_with(&dir, None, s, opts).unwrap();
    assert_same(&w, &p);
    // The base is untouched: its copy of `pad` is the one as of the base.
    let mut b = Vec::new();
    std::io::Read::read_to_end(&mut w.open_base_data(pad).unwrap(), &mut b).unwrap();
    assert_eq!(&b[..512], &[0u8; 512][..]);
}

#[test]
fn an_interrupted_cut_is_finished_at_the_next_open() {
    let d = tempfile::tempdir().unwrap();
    // Crash points: intent written; log cut too; live data files half removed.
    for point in 0..3 {
        let name = format!("w{point}");
        let dir = d.path().join(&name);
        let w = empty(d.path(), &name);
        let f = prefix_workload(&w);
        let s = w.last_seq();
        w.raise_epoch(2).unwrap();
        tail_workload(&w, &f);
        let txs = all_txs(&w, 1);
        let p = prefix_copy(d.path(), &format!("p{point}"), &txs, s);
        drop(w);
        let intent = serde_json::json!({"version": CUT_VERSION, "seq": s});
        std::fs::write(dir.join(CUT_FILE), intent.to_string()).unwrap();
        if point >= 1 {
            let (mut log, _) = TxLog::open(&dir.join("txlog"), &name).unwrap();
            assert!(log.truncate_after(s).unwrap() > 0);
        }
        if point >= 2 {
            for (_, p) in data_files(&dir.join("data")).into_iter().step_by(2) {
                std::fs::remove_file(p).unwrap();
            }
        }
        let w = Volume::open(&dir, None).unwrap();
        assert_same(&w, &p);
        assert!(!dir.join(CUT_FILE).exists(), "crash point {point}");
    }
}

#[test]
fn a_cut_at_every_seq_of_a_workload_leaves_that_prefix() {
    let d = tempfile::tempdir().unwrap();
    let w = empty(d.path(), "w");
    let f = prefix_workload(&w);
    w.raise_epoch(2).unwrap();
    tail_workload(&w, &f);
    let txs = all_txs(&w, 1);
    let last = w.last_seq();
    for s in 0..last {
        // A replica holding the whole log, cut back to `s`.
        let name = format!("r{s}");
        let r = empty(d.path(), &name);
        r.append_replicated_batch(&txs).unwrap();
        drop(r);
        let (r, cut) = Volume::cut_after(&d.path().join(&name), None, s).unwrap();
        assert_eq!(cut, last - s);
        let p = prefix_copy(d.path(), &format!("p{s}"), &txs, s);
        assert_same(&r, &p);
        drop((r, p));
        std::fs::remove_dir_all(d.path().join(&name)).unwrap();
        std::fs::remove_dir_all(d.path().join(format!("p{s}"))).unwrap();
    }
}
