//! Diff, history and revert on real volumes (no mount): deep trees and huge sparse files.

use super::*;
use crate::archive::tests::{template, volume};
use crate::tree::ROOT;

fn ino(vol: &Volume, path: &str) -> Ino {
    vol.with_tree(|t, l| view::resolve(t, l, path.as_bytes())).unwrap()
}

#[test]
fn revert_rebuilds_a_huge_sparse_file_without_loading_it() {
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let v = volume(d.path(), "v", &tpl);
    let size = 100u64 << 30;
    let f = v.mknod(ROOT, b"big", FileKind::File, 0o644, 0, 0, 0, b"").unwrap().ino;
    v.write(f, 0, b"one").unwrap();
    let grow = crate::volume::SetAttr {
        size: Some(size),
        ..Default::default()
    };
    v.setattr(f, &grow).unwrap();
    let (at_one, _) = v.log_status();
    v.write(f, 50 << 30, b"two").unwrap();
    v.write(f, 0, b"ONE").unwrap();
    v.setattr(
        f,
        &crate::volume::SetAttr {
            size: Some(2 * size),
            ..Default::default()
        },
    )
    .unwrap();
    let r = revert(&v, "/big", Target::Seq(at_one)).unwrap();
    assert_eq!(r.changed, vec!["/big".to_string()]);
    let a = v.getattr(f).unwrap();
    assert_eq!(a.size, size);
    assert!(a.blocks < 1024, "holes stay holes: {} blocks", a.blocks);
    assert_eq!(v.read(f, 0, 3).unwrap(), b"one");
    assert_eq!(v.read(f, 50 << 30, 3).unwrap(), vec![0; 3]);
    // Once more: nothing to change. A template file back to the template's contents.
    assert!(revert(&v, "/big", Target::Seq(at_one)).unwrap().changed.is_empty());
    let tool = ino(&v, "usr/bin/tool");
    v.open_file(tool, true, true).unwrap();
    v.write(tool, 0, b"x").unwrap();
    v.release(tool);
    assert_eq!(v.getattr(tool).unwrap().size, 1);
    revert(&v, "/usr/bin/tool", Target::Seq(0)).unwrap();
    assert_eq!(v.read(tool, 0, 6000).unwrap(), vec![7u8; 5000]);
    // Before the file existed: gone.
    revert(&v, "/big", Target::Seq(0)).unwrap();
    assert!(v.lookup(ROOT, b"big").is_err());
}

#[test]
fn a_deep_tree_gets_bounded_answers_and_reverts() {
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let v = volume(d.path(), "v", &tpl);
    let depth = 30_000;
    let mut cur = ROOT;
    for _ in 0..depth {
        cur = v.mknod(cur, b"d", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    }
    let f = v.mknod(cur, b"leaf", FileKind::File, 0o644, 0, 0, 0, b"").unwrap().ino;
    v.write(f, 0, b"x").unwrap();
    let bound = 1 << 20;
    let dl = diff(&v, "/", bound);
    assert!(!dl.entries.is_empty() && dl.omitted > 0);
    assert_eq!(dl.entries.len() as u64 + dl.omitted, depth + 1);
    let h = history(&v, "/", bound).unwrap();
    assert!(!h.entries.is_empty() && h.omitted > 0);
    assert_eq!(h.entries.len() as u64 + h.omitted, depth + 2);
    let bytes: usize = h.entries.iter().map(|e| e.path.len() + e.what.len()).sum();
    assert!(bytes <= bound, "{bytes}");
    // A path deep inside: only its own history.
    let deep = format!("/{}", vec!["d"; 29_999].join("/"));
    let h = history(&v, &deep, usize::MAX).unwrap();
    assert_eq!(
        h.entries.len(),
        4,
        "{:?}",
        h.entries.iter().map(|e| &e.what).collect::<Vec<_>>()
    );
    assert_eq!(h.omitted, 0);
    crate::archive::export(&v, b"{}", std::io::sink()).unwrap();
    let r = revert(&v, "/d", Target::Seq(0)).unwrap();
    assert_eq!(r.changed, vec!["/d".to_string()]);
    assert!(v.lookup(ROOT, b"d").is_err());
    assert_eq!(v.usage().0.inodes, 1, "only the root is left");
}
