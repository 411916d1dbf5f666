//! Hash trees of copies fed the same transactions are equal; one differing transaction,
//! or bytes changed under a volume, is reported at exactly its path; the serialized form
//! round-trips and refuses damage.

use super::*;
use crate::lower::Lower;
use crate::tree::ROOT;
use crate::tx::{Op, Tx};
use crate::view::LOWER_BASE;
use crate::volume::{data_name, SetAttr};
use std::path::Path;
use std::sync::Arc;

const TEMPLATE: &str = "sha256-test-template";

/// A small template: etc/{hostname,passwd}, usr/bin/{tool,link -> tool}, usr/share/doc/x.
fn template(dir: &Path) -> Arc<Lower> {
    let root = dir.join("template");
    for d in ["etc", "usr/bin", "usr/share/doc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/hostname"), b"tmpl\n").unwrap();
    std::fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("usr/bin/tool"), vec![7u8; 5000]).unwrap();
    std::os::unix::fs::symlink("tool", root.join("usr/bin/link")).unwrap();
    std::fs::write(root.join("usr/share/doc/x"), b"doc").unwrap();
    Arc::new(Lower::scan(&root).unwrap())
}

fn volume(dir: &Path, name: &str, lower: Option<&Arc<Lower>>) -> Volume {
    let d = dir.join(name);
    Volume::create(&d, name, lower.map(|_| TEMPLATE)).unwrap();
    Volume::open(&d, lower.cloned()).unwrap()
}

fn all_txs(v: &Volume) -> Vec<Tx> {
    let mut out = Vec::new();
    v.log_reader()
        .unwrap()
        .for_each::<VolumeError>(1, u64::MAX, |t, _| {
            out.push(t);
            Ok(true)
        })
        .unwrap();
    out
}

fn feed(r: &Volume, txs: &[Tx]) {
    for t in txs {
        r.append_replicated(t).unwrap();
    }
}

fn scrub(v: &Volume) -> ScrubTree {
    hash_tree(v, &mut |_| {}).unwrap()
}

fn lookup(v: &Volume, path: &str) -> Ino {
    v.with_tree(|t, l| crate::view::resolve(t, l, path.as_bytes())).unwrap()
}

/// A writer that used every kind of change, over a template.
fn busy_writer(dir: &Path, lower: &Arc<Lower>) -> Volume {
    let w = volume(dir, "w", Some(lower));
    let sub = w.mknod(ROOT, b"sub", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    let f = w
        .mknod(sub, b"f", FileKind::File, 0o644, 1000, 1000, 0, b"")
        .unwrap()
        .ino;
    w.write(f, 0, &vec![3u8; 300_000]).unwrap();
    w.write(f, 100, b"middle").unwrap();
    w.link(f, ROOT, b"f-link").unwrap();
    w.mknod(sub, b"sym", FileKind::Symlink, 0o777, 0, 0, 0, b"f").unwrap();
    w.mknod(sub, b"fifo", FileKind::Fifo, 0o600, 0, 0, 0, b"").unwrap();
    w.setxattr(f, b"user.k", b"v", false, false).unwrap();
    let e = w.mknod(sub, b"e", FileKind::File, 0o600, 0, 0, 0, b"").unwrap().ino;
    w.write(e, 0, b"eee").unwrap();
    w.rename(sub, b"e", ROOT, b"moved", 0).unwrap();
    // Template files: one written (copied up), one deleted (whiteout), one chmod'ed.
    let etc = lookup(&w, "/etc");
    let host = lookup(&w, "/etc/hostname");
    assert!(host >= LOWER_BASE);
    w.open_file(host, true, false).unwrap();
    w.write(host, 0, b"node").unwrap();
    w.release(host);
    w.remove(etc, b"passwd", false).unwrap();
    let tool = lookup(&w, "/usr/bin/tool");
    w.setattr(
        tool,
        &SetAttr {
            mode: Some(0o700),
            ..Default::default()
        },
    )
    .unwrap();
    w.setattr(
        f,
        &SetAttr {
            size: Some(250_000),
            ..Default::default()
        },
    )
    .unwrap();
    w
}

#[test]
fn copies_fed_the_same_transactions_have_equal_roots() {
    let d = tempfile::tempdir().unwrap();
    let lower = template(d.path());
    let w = busy_writer(d.path(), &lower);
    let r = volume(d.path(), "r", Some(&lower));
    feed(&r, &all_txs(&w));
    let (tw, tr) = (scrub(&w), scrub(&r));
    assert_eq!(tw.seq, w.log_status().0);
    assert_eq!(tw.template.as_deref(), Some(TEMPLATE));
    assert_eq!(tw.root_hash(), tr.root_hash());
    assert_eq!(compare(&tw, &tr), vec![]);
    let files: Vec<&Content> = tw
        .nodes
        .iter()
        .filter_map(|n| match &n.entry {
            Entry::Private(m) if m.kind == FileKind::File => Some(&m.content),
            _ => None,
        })
        .collect();
    assert_eq!(files.len(), 5);
    assert!(files.iter().all(|c| matches!(c, Content::Data { .. })), "{files:?}");
    // Deterministic: again on the same copy, and after a reopen (checkpoint, replay).
    assert_eq!(scrub(&w).root_hash(), tw.root_hash());
    drop(r);
    let r = Volume::open(&d.path().join("r"), Some(lower.clone())).unwrap();
    assert_eq!(scrub(&r).root_hash(), tw.root_hash());

    // The tree holds what the brief asks: private entries, whiteouts, template entries
    // by index (not descended into), hard links by inode number.
    let by_path = |t: &ScrubTree, path: &str| -> Entry {
        let mut at = 0u32;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            at = *t.nodes[at as usize]
                .children
                .iter()
                .find(|&&i| t.nodes[i as usize].name == c.as_bytes())
                .unwrap_or_else(|| panic!("{path}"));
        }
        t.nodes[at as usize].entry.clone()
    };
    assert_eq!(by_path(&tw, "/etc/passwd"), Entry::Whiteout);
    assert!(matches!(by_path(&tw, "/usr/share"), Entry::Lower(_)));
    assert!(matches!(by_path(&tw, "/usr/bin/link"), Entry::Lower(_)));
    let Entry::Private(tool) = by_path(&tw, "/usr/bin/tool") else {
        panic!()
    };
    assert_eq!((tool.mode & 0o7777, tool.lower.is_some()), (0o700, true));
    let Entry::Private(host) = by_path(&tw, "/etc/hostname") else {
        panic!()
    };
    assert_eq!(
        host.content,
        Content::Data {
            len: 5,
            sha256: Sha256::digest(b"node\n").into()
        }
    );
    let (Entry::Private(f), Entry::Private(l)) = (by_path(&tw, "/sub/f"), by_path(&tw, "/f-link")) else {
        panic!()
    };
    assert_eq!((f.ino, f.nlink, f.size), (l.ino, 2, 250_000));
    let mut want = vec![3u8; 250_000];
    want[100..106].copy_from_slice(b"middle");
    assert_eq!(
        f.content,
        Content::Data {
            len: 250_000,
            sha256: Sha256::digest(&want).into()
        }
    );

    // The serialized form gives back the same tree, hashes recomputed.
    let bytes = tw.to_bytes();
    assert_eq!(ScrubTree::from_bytes(&bytes).unwrap(), tw);
}

#[test]
fn progress_counts_every_file_and_byte() {
    let d = tempfile::tempdir().unwrap();
    let lower = template(d.path());
    let w = busy_writer(d.path(), &lower);
    let mut last = Progress::default();
    let mut calls = 0;
    let t = hash_tree(&w, &mut |p| {
        assert!(p.files >= last.files && p.bytes >= last.bytes, "{p:?} after {last:?}");
        last = p;
        calls += 1;
    })
    .unwrap();
    // sub/f (hard-linked: once), moved, etc/hostname, usr/bin/tool.
    assert_eq!((last.files, last.total_files), (4, 4));
    assert_eq!(
        (last.bytes, last.total_bytes),
        (250_000 + 3 + 5 + 5000, 250_000 + 3 + 5 + 5000)
    );
    assert!(calls >= 5);
    assert_eq!(t.files().0, 5, "two names of one file count twice in the tree");
}

/// Two replicas of a common history, then one differing transaction each (same seq, same
/// time): what compare reports.
struct Pair {
    _d: tempfile::TempDir,
    a: Volume,
    b: Volume,
    sub: Ino,
    f: Ino,
    next: u64,
}

fn pair() -> Pair {
    let d = tempfile::tempdir().unwrap();
    let w = volume(d.path(), "w", None);
    let sub = w.mknod(ROOT, b"sub", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    let f = w.mknod(sub, b"f", FileKind::File, 0o644, 0, 0, 0, b"").unwrap().ino;
    w.write(f, 0, b"hello world").unwrap();
    let e = w.mknod(sub, b"e", FileKind::File, 0o644, 0, 0, 0, b"").unwrap().ino;
    w.write(e, 0, b"other").unwrap();
    let txs = all_txs(&w);
    let (a, b) = (volume(d.path(), "a", None), volume(d.path(), "b", None));
    feed(&a, &txs);
    feed(&b, &txs);
    assert_eq!(compare(&scrub(&a), &scrub(&b)), vec![]);
    Pair {
        _d: d,
        a,
        b,
        sub,
        f,
        next: txs.len() as u64 + 1,
    }
}

fn diverge(p: &Pair, on_a: Op, on_b: Op) -> Vec<(String, What)> {
    let tx = |op| Tx {
        epoch: 1,
        seq: p.next,
        time_ns: 1_700_000_000_000_000_000,
        op,
    };
    p.a.append_replicated(&tx(on_a)).unwrap();
    p.b.append_replicated(&tx(on_b)).unwrap();
    let (ta, tb) = (scrub(&p.a), scrub(&p.b));
    assert_ne!(ta.root_hash(), tb.root_hash());
    let back = ScrubTree::from_bytes(&tb.to_bytes()).unwrap();
    let d = compare(&ta, &back);
    assert_eq!(d, compare(&ta, &tb));
    d.into_iter().map(|d| (d.path, d.what)).collect()
}

fn set_mode(ino: Ino, mode: u32) -> Op {
    Op::SetAttr {
        ino,
        mode: Some(mode as u64),
        uid: None,
        gid: None,
        atime_ns: None,
        mtime_ns: None,
    }
}

/// Renaming a file onto itself changes nothing but the times a rename sets: the other
/// side of a divergence that only removes or moves `f`.
fn touch_by_rename(sub: Ino, name: &[u8]) -> Op {
    Op::Rename {
        parent: sub,
        name: name.to_vec(),
        new_parent: sub,
        new_name: name.to_vec(),
        flags: 0,
        whiteout: false,
    }
}

#[test]
fn a_differing_write_is_reported_at_its_path() {
    let p = pair();
    let w = |data: &[u8]| Op::Write {
        ino: p.f,
        offset: 0,
        data: data.to_vec(),
    };
    let d = diverge(&p, w(b"HELLO"), w(b"hellp"));
    assert!(
        matches!(&d[..], [(path, What::Content { .. })] if path == "/sub/f"),
        "{d:?}"
    );
    let msg = Difference {
        path: d[0].0.clone(),
        what: d[0].1.clone(),
    }
    .to_string();
    assert_eq!(msg, "/sub/f: content differs");
}

#[test]
fn a_differing_chmod_is_reported_with_both_modes() {
    let p = pair();
    let mode = p.a.with_tree(|t, _| t.inodes[&p.f].mode);
    let d = diverge(&p, set_mode(p.f, 0o600), set_mode(p.f, mode));
    assert_eq!(d, vec![("/sub/f".to_string(), What::Mode { a: 0o600, b: mode })]);
    assert_eq!(What::Mode { a: 0o600, b: 0o644 }.to_string(), "mode 0600 vs 0644");
}

#[test]
fn a_differing_xattr_is_reported_by_name() {
    let p = pair();
    let x = |v: &[u8]| Op::SetXattr {
        ino: p.f,
        name: b"user.k".to_vec(),
        value: v.to_vec(),
    };
    let d = diverge(&p, x(b"1"), x(b"2"));
    assert_eq!(
        d,
        vec![(
            "/sub/f".to_string(),
            What::Xattr {
                name: b"user.k".to_vec(),
                only_on: None
            }
        )]
    );
}

#[test]
fn a_differing_rename_is_reported_at_both_names() {
    let p = pair();
    let rename = Op::Rename {
        parent: p.sub,
        name: b"f".to_vec(),
        new_parent: p.sub,
        new_name: b"g".to_vec(),
        flags: 0,
        whiteout: false,
    };
    let d = diverge(&p, rename, touch_by_rename(p.sub, b"f"));
    let file = |side| What::OnlyOn {
        side,
        entry: "file".into(),
    };
    assert_eq!(
        d,
        vec![
            ("/sub/f".to_string(), file(Side::B)),
            ("/sub/g".to_string(), file(Side::A))
        ]
    );
}

#[test]
fn a_differing_unlink_is_reported_at_its_path() {
    let p = pair();
    let unlink = Op::Unlink {
        parent: p.sub,
        name: b"f".to_vec(),
        whiteout: false,
    };
    let d = diverge(&p, unlink, touch_by_rename(p.sub, b"f"));
    assert_eq!(
        d,
        vec![(
            "/sub/f".to_string(),
            What::OnlyOn {
                side: Side::B,
                entry: "file".into()
            }
        )]
    );
}

#[test]
fn a_hard_link_on_one_copy_only_shows_as_the_new_name_and_the_link_count() {
    let p = pair();
    let link = Op::Link {
        ino: p.f,
        parent: p.sub,
        name: b"h".to_vec(),
    };
    // The other side touches the same times: a rename of `f` onto itself sets f's ctime
    // and the directory's times as a link does.
    let d = diverge(&p, link, touch_by_rename(p.sub, b"f"));
    assert_eq!(
        d,
        vec![
            ("/sub/f".to_string(), What::Nlink { a: 2, b: 1 }),
            (
                "/sub/h".to_string(),
                What::OnlyOn {
                    side: Side::A,
                    entry: "file".into()
                }
            ),
        ]
    );
}

#[test]
fn copies_at_different_seqs_say_so() {
    let p = pair();
    p.a.append_replicated(&Tx {
        epoch: 1,
        seq: p.next,
        time_ns: 5,
        op: set_mode(p.f, 0o600),
    })
    .unwrap();
    let d = compare(&scrub(&p.a), &scrub(&p.b));
    assert_eq!(
        d[0].what,
        What::Seq {
            a: p.next,
            b: p.next - 1
        }
    );
    assert!(d
        .iter()
        .any(|d| d.path == "/sub/f" && d.what == What::Mode { a: 0o600, b: 0o644 }));
}

#[test]
fn bytes_changed_under_a_volume_are_found() {
    let p = pair();
    let data = p.b.dir().join("data").join(data_name(p.f));
    let good = scrub(&p.a);
    // One flipped byte, same length.
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[4] ^= 0x20;
    std::fs::write(&data, &bytes).unwrap();
    let d = compare(&good, &scrub(&p.b));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].to_string(), "/sub/f: content differs");
    // Cut short.
    std::fs::write(&data, b"hello").unwrap();
    let d = compare(&good, &scrub(&p.b));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].to_string(), "/sub/f: data file holds 11 vs 5 bytes");
    // Gone.
    std::fs::remove_file(&data).unwrap();
    let d = compare(&good, &scrub(&p.b));
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].to_string(), "/sub/f: data file missing on b");
    // Bytes past the file's size are not part of it.
    std::fs::write(&data, b"hello worldXXXX").unwrap();
    assert_eq!(compare(&good, &scrub(&p.b)), vec![]);
}

#[test]
fn contents_changed_after_the_tree_was_taken_are_detected_from_the_log() {
    let p = pair();
    let seq = p.a.with_tree(|t, _| t.applied);
    let hashed = HashSet::from([p.f]);
    let tx = |seq, op| Tx {
        epoch: 1,
        seq,
        time_ns: 9,
        op,
    };
    // A metadata change of a hashed file, or a data change of another, is harmless.
    p.a.append_replicated(&tx(seq + 1, set_mode(p.f, 0o600))).unwrap();
    assert!(!contents_changed(&p.a, seq, seq + 1, &hashed).unwrap());
    // A write to it is not.
    let write = Op::Write {
        ino: p.f,
        offset: 0,
        data: b"x".to_vec(),
    };
    p.a.append_replicated(&tx(seq + 2, write)).unwrap();
    assert!(contents_changed(&p.a, seq, seq + 2, &hashed).unwrap());
    assert!(!contents_changed(&p.a, seq, seq + 1, &hashed).unwrap());
    // A log that does not reach the seq proves nothing.
    assert!(!contents_changed(&p.a, seq, seq + 2, &HashSet::new()).unwrap());
    assert!(contents_changed(&p.a, seq, seq + 9, &HashSet::new()).unwrap());
}

/// Changes made while contents are read (from the progress callback, which runs between
/// files without the volume's lock): a write to a hashed file or freeing one fails the
/// scrub; a metadata change leaves the tree as it was taken.
#[test]
fn a_scrub_fails_when_hashed_contents_change_under_it() {
    let p = pair();
    let seq = p.a.with_tree(|t, _| t.applied);
    let mut once = Some(());
    let t = hash_tree(&p.a, &mut |_| {
        if once.take().is_some() {
            p.a.setattr(
                p.f,
                &SetAttr {
                    mode: Some(0o600),
                    ..Default::default()
                },
            )
            .unwrap();
        }
    })
    .unwrap();
    assert_eq!(t.seq, seq);
    assert_eq!(compare(&t, &scrub(&p.b)), vec![], "the tree as of its seq");

    let mut once = Some(());
    let e = hash_tree(&p.a, &mut |_| {
        if once.take().is_some() {
            p.a.write(p.f, 0, b"J").unwrap();
        }
    })
    .unwrap_err();
    assert!(matches!(e, ScrubError::Changed { .. }), "{e}");
    assert!(e.to_string().contains("scrub again"), "{e}");

    let mut once = Some(());
    let e = hash_tree(&p.a, &mut |_| {
        if once.take().is_some() {
            p.a.remove(p.sub, b"e", false).unwrap();
        }
    })
    .unwrap_err();
    assert!(matches!(e, ScrubError::Changed { .. }), "{e}");
    hash_tree(&p.a, &mut |_| {}).unwrap();
}

#[test]
fn the_serialized_form_refuses_damage_without_panicking() {
    let p = pair();
    let t = scrub(&p.a);
    let good = t.to_bytes();
    for n in 0..good.len() {
        assert!(ScrubTree::from_bytes(&good[..n]).is_err(), "cut at {n}");
    }
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x01;
        assert!(ScrubTree::from_bytes(&b).is_err(), "flip at {i}");
    }
    // Another format version, checksummed right: named in the error.
    let mut b = good[..good.len() - 4].to_vec();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let e = ScrubTree::from_bytes(&b).unwrap_err();
    assert!(matches!(e, ScrubError::Version { got: 2 }), "{e}");
    assert!(e.to_string().contains("format version 2"), "{e}");
}

/// Re-frame a body (after the magic, before the crc) as a tree with a valid checksum.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut b = b"VSLSCRB1".to_vec();
    b.extend_from_slice(body);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn a_well_checksummed_but_inconsistent_tree_is_refused() {
    use crate::codec::Enc;
    let root = Entry::Private(Meta {
        ino: ROOT,
        kind: FileKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: 0,
        nlink: 2,
        atime_ns: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        target: Vec::new(),
        lower: None,
        xattrs: Vec::new(),
        content: Content::None,
    });
    let tree = |nodes: &[(u32, &[u8], &Entry)]| {
        let mut e = Enc::default();
        e.u32(SCRUB_VERSION).u64(1).u8(0).u32(nodes.len() as u32);
        for (p, n, en) in nodes {
            e.u32(*p).bytes(n);
            encode_entry(&mut e, en);
        }
        framed(&e.0)
    };
    let none = u32::MAX;
    let ok = tree(&[
        (none, b"", &root),
        (0, b"a", &Entry::Whiteout),
        (0, b"b", &Entry::Lower(3)),
    ]);
    assert_eq!(ScrubTree::from_bytes(&ok).unwrap().nodes.len(), 3);
    let bad: Vec<Vec<u8>> = vec![
        tree(&[]),
        tree(&[(0, b"", &root)]),
        tree(&[(none, b"", &root), (1, b"a", &Entry::Whiteout)]),
        tree(&[
            (none, b"", &root),
            (0, b"a", &Entry::Whiteout),
            (1, b"b", &Entry::Whiteout),
        ]),
        tree(&[
            (none, b"", &root),
            (0, b"b", &Entry::Whiteout),
            (0, b"a", &Entry::Whiteout),
        ]),
        tree(&[
            (none, b"", &root),
            (0, b"a", &Entry::Whiteout),
            (0, b"a", &Entry::Whiteout),
        ]),
        tree(&[(none, b"", &root), (0, b"", &Entry::Whiteout)]),
        tree(&[(none, b"", &root), (0, b"a/b", &Entry::Whiteout)]),
    ];
    for (i, b) in bad.iter().enumerate() {
        assert!(ScrubTree::from_bytes(b).is_err(), "case {i}");
    }
    let mut pending = root.clone();
    if let Entry::Private(m) = &mut pending {
        m.kind = FileKind::File;
        m.content = Content::Pending;
    }
    assert!(ScrubTree::from_bytes(&tree(&[(none, b"", &pending)])).is_err());
}

proptest::proptest! {
    #[test]
    fn random_bytes_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
        let _ = ScrubTree::from_bytes(&body);
        let _ = ScrubTree::from_bytes(&framed(&body));
    }
}
