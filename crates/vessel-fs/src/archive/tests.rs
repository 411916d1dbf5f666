//! Export and import on real volumes (no mount): sparse files, and crafted archives.

use super::*;
use crate::tx::{FileKind, Ino};
use crate::volume::Volume;
use crate::xattr::CAPS;
use std::path::{Path, PathBuf};

pub(crate) fn template(dir: &Path) -> PathBuf {
    let t = dir.join("tpl");
    std::fs::create_dir_all(t.join("etc")).unwrap();
    std::fs::create_dir_all(t.join("usr/bin")).unwrap();
    std::fs::write(t.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    std::fs::write(t.join("usr/bin/tool"), vec![7u8; 5000]).unwrap();
    t
}

pub(crate) fn volume(dir: &Path, name: &str, tpl: &Path) -> Volume {
    let d = dir.join(name);
    Volume::create(&d, name, Some("t")).unwrap();
    Volume::open(&d, Some(crate::lower::shared(tpl).unwrap())).unwrap()
}

fn file(vol: &Volume, parent: Ino, name: &str) -> Ino {
    vol.mknod(parent, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0, b"")
        .unwrap()
        .ino
}

fn ino(vol: &Volume, path: &str) -> Ino {
    vol.with_tree(|t, l| crate::view::resolve(t, l, path.as_bytes()))
        .unwrap()
}

fn caps_v2() -> Vec<u8> {
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v
}

fn caps_v3(root: u32) -> Vec<u8> {
    let mut v = 0x0300_0001u32.to_le_bytes().to_vec();
    v.extend_from_slice(&u32::MAX.to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v.extend_from_slice(&root.to_le_bytes());
    v
}

fn import_bytes(vol: &Volume, tar_bytes: &[u8]) -> std::io::Result<u64> {
    let mut ar = tar::Archive::new(tar_bytes);
    import(vol, ar.entries()?)
}

#[test]
fn sparse_files_export_small_and_import_with_their_holes() {
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let a = volume(d.path(), "a", &tpl);
    let size = 100u64 << 30;
    let big = file(&a, crate::tree::ROOT, "big");
    a.write(big, 4096, b"head").unwrap();
    a.write(big, size - 4, b"tail").unwrap();
    let dense = file(&a, crate::tree::ROOT, "dense");
    a.write(dense, 0, &vec![9u8; 300_000]).unwrap();
    a.setxattr(dense, CAPS, &caps_v2(), false, false).unwrap();
    a.setxattr(dense, b"user.note", b"kept", false, false).unwrap();
    a.setxattr(dense, b"security.selinux", b"host label", false, false)
        .unwrap();
    a.link(big, crate::tree::ROOT, b"big.link").unwrap();
    // A template file changed in place.
    let tool = ino(&a, "usr/bin/tool");
    a.open_file(tool, true, false).unwrap();
    a.write(tool, 10, b"patched").unwrap();
    a.release(tool);
    let mut out = Vec::new();
    export(&a, b"{}", &mut out).unwrap();
    assert!(
        out.len() < 2 << 20,
        "a 100 GB sparse file exports small ({} bytes)",
        out.len()
    );

    let b = volume(d.path(), "b", &tpl);
    let mut ar = tar::Archive::new(Guard::new(&out[..]));
    let (meta, entries) = read_meta(&mut ar).unwrap();
    assert_eq!(meta, b"{}");
    import(&b, entries).unwrap();
    let bi = ino(&b, "big");
    let at = b.getattr(bi).unwrap();
    assert_eq!((at.size, at.nlink), (size, 2));
    assert!(at.blocks < 1024, "holes stay holes: {} blocks", at.blocks);
    assert_eq!(b.read(bi, 4096, 4).unwrap(), b"head");
    assert_eq!(b.read(bi, size - 4, 4).unwrap(), b"tail");
    assert_eq!(b.read(bi, 1 << 30, 8).unwrap(), vec![0; 8]);
    assert_eq!(ino(&b, "big.link"), bi);
    let di = ino(&b, "dense");
    assert_eq!(b.read(di, 0, 300_001).unwrap(), vec![9u8; 300_000]);
    assert_eq!(b.getxattr(di, CAPS).unwrap(), caps_v2());
    assert_eq!(b.getxattr(di, b"user.note").unwrap(), b"kept");
    assert_eq!(
        b.getxattr(di, b"security.selinux"),
        Err(libc::ENODATA),
        "host labels stay home"
    );
    let ti = ino(&b, "usr/bin/tool");
    let mut want = vec![7u8; 5000];
    want[10..17].copy_from_slice(b"patched");
    assert_eq!(b.read(ti, 0, 6000).unwrap(), want);
}

#[test]
fn the_export_stops_at_the_first_write_error() {
    #[derive(Debug)]
    struct Failing(usize);
    impl std::io::Write for Failing {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 > 3 << 20 {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let a = volume(d.path(), "a", &tpl);
    let f = file(&a, crate::tree::ROOT, "f");
    let chunk = vec![1u8; 1 << 20];
    for k in 0..64u64 {
        a.write(f, k << 20, &chunk).unwrap();
    }
    let mut w = Failing(0);
    let e = export(&a, b"{}", &mut w).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe);
    assert!(
        w.0 < 5 << 20,
        "stopped right after the error, not after 64 MiB: {}",
        w.0
    );
    // And when asked to stop.
    let stop = std::sync::atomic::AtomicBool::new(true);
    let e = Snapshot::take(&a)
        .write(&a, b"{}", std::io::sink(), &|| {
            stop.load(std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap_err();
    assert!(e.to_string().contains("went away"), "{e}");
}

/// One layer entry as a hand-made tar (`raw_name` bypasses the tar crate's path checks).
fn crafted(
    raw_name: &[u8],
    kind: tar::EntryType,
    uid: u64,
    pax: &[(&str, &[u8])],
    link: Option<&[u8]>,
    rdev: Option<(u32, u32)>,
) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    if !pax.is_empty() {
        b.append_pax_extensions(pax.iter().copied()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o755);
    h.set_uid(uid);
    h.set_gid(0);
    h.set_size(0);
    {
        let g = h.as_gnu_mut().unwrap();
        g.name[..raw_name.len()].copy_from_slice(raw_name);
        if let Some(l) = link {
            g.linkname[..l.len()].copy_from_slice(l);
        }
    }
    if let Some((ma, mi)) = rdev {
        h.set_device_major(ma).unwrap();
        h.set_device_minor(mi).unwrap();
    }
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn crafted_archives_are_refused_with_the_entry_named() {
    use tar::EntryType as T;
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (t, p, i) in [
        (1u16, 7u16, 0u32),
        (2, 7, 70_000),
        (4, 5, 0),
        (0x10, 7, 0),
        (0x20, 0, 0),
    ] {
        acl.extend_from_slice(&t.to_le_bytes());
        acl.extend_from_slice(&p.to_le_bytes());
        acl.extend_from_slice(&i.to_le_bytes());
    }
    let host_root_caps = caps_v3(1 << 20);
    let foreign_caps = caps_v3(70_000);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "caps rooted at a host id",
            crafted(
                b"rootfs/evil",
                T::Regular,
                0,
                &[("SCHILY.xattr.security.capability", &host_root_caps)],
                None,
                None,
            ),
            "outside the VE",
        ),
        (
            "caps rooted in another range",
            crafted(
                b"rootfs/evil",
                T::Regular,
                0,
                &[("SCHILY.xattr.security.capability", &foreign_caps)],
                None,
                None,
            ),
            "outside the VE",
        ),
        (
            "v1 caps",
            crafted(
                b"rootfs/evil",
                T::Regular,
                0,
                &[(
                    "SCHILY.xattr.security.capability",
                    &[0, 0, 0, 1, 255, 255, 255, 255, 0, 0, 0, 0],
                )],
                None,
                None,
            ),
            "malformed",
        ),
        (
            "host owner",
            crafted(b"rootfs/evil", T::Regular, 70_000, &[], None, None),
            "owner 70000",
        ),
        (
            "device",
            crafted(b"rootfs/mem", T::Char, 0, &[], None, Some((1, 1))),
            "device node 1:1",
        ),
        (
            "block device",
            crafted(b"rootfs/sda", T::Block, 0, &[], None, Some((8, 0))),
            "device node 8:0",
        ),
        (
            "dot-dot",
            crafted(b"rootfs/../../etc/x", T::Regular, 0, &[], None, None),
            "`..`",
        ),
        (
            "absolute",
            crafted(b"/rootfs/x", T::Regular, 0, &[], None, None),
            "absolute",
        ),
        (
            "outside rootfs",
            crafted(b"etc/x", T::Regular, 0, &[], None, None),
            "not under rootfs",
        ),
        (
            "link out",
            crafted(b"rootfs/l", T::Link, 0, &[], Some(b"rootfs/../../etc/shadow"), None),
            "`..`",
        ),
        (
            "unknown xattr namespace",
            crafted(
                b"rootfs/x",
                T::Regular,
                0,
                &[("SCHILY.xattr.bogus.x", b"1")],
                None,
                None,
            ),
            "cannot hold",
        ),
        (
            "acl with a host id",
            crafted(
                b"rootfs/x",
                T::Regular,
                0,
                &[("SCHILY.xattr.system.posix_acl_access", &acl)],
                None,
                None,
            ),
            "70000",
        ),
        (
            "sparse map past its size",
            {
                let mut b = tar::Builder::new(Vec::new());
                b.append_pax_extensions([
                    ("GNU.sparse.major", &b"1"[..]),
                    ("GNU.sparse.minor", b"0"),
                    ("GNU.sparse.name", b"rootfs/s"),
                    ("GNU.sparse.realsize", b"10"),
                ])
                .unwrap();
                let mut map = b"1\n0\n20\n".to_vec();
                map.resize(512, 0);
                map.extend_from_slice(&[1u8; 20]);
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(T::Regular);
                h.set_size(map.len() as u64);
                h.set_mode(0o644);
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(0);
                b.append_data(&mut h, "rootfs/GNUSparseFile.0/s", &map[..]).unwrap();
                b.into_inner().unwrap()
            },
            "past the file's size",
        ),
    ];
    for (i, (what, bytes, want)) in cases.into_iter().enumerate() {
        let v = volume(d.path(), &format!("c{i}"), &tpl);
        let e = import_bytes(&v, &bytes).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(want), "{what}: {e}");
        if !what.contains("dot") && !what.contains("absolute") && !what.contains("rootfs") && !what.contains("sparse") {
            assert!(e.contains("rootfs/"), "{what}: names the entry: {e}");
        }
    }
}

#[test]
fn what_a_ve_could_make_itself_is_imported_and_mapped() {
    use tar::EntryType as T;
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let v = volume(d.path(), "ok", &tpl);
    let mut all = Vec::new();
    for part in [
        crafted(
            b"rootfs/capped",
            T::Regular,
            0,
            &[("SCHILY.xattr.security.capability", &caps_v3(0)[..])],
            None,
            None,
        ),
        crafted(
            b"rootfs/nested",
            T::Regular,
            1000,
            &[("SCHILY.xattr.security.capability", &caps_v3(1000)[..])],
            None,
            None,
        ),
        crafted(b"rootfs/wh", T::Char, 0, &[], None, Some((0, 0))),
        crafted(
            b"rootfs/labelled",
            T::Regular,
            0,
            &[("SCHILY.xattr.trusted.overlay.opaque", b"y")],
            None,
            None,
        ),
    ] {
        // Concatenate the entries (each part ends with two zero blocks: cut them).
        all.extend_from_slice(&part[..part.len() - 1024]);
    }
    all.extend_from_slice(&[0; 1024]);
    assert_eq!(import_bytes(&v, &all).unwrap(), 4);
    // Rooted at the VE's root: stored v2 (shown to the kernel rooted at the VE's root).
    let c = ino(&v, "capped");
    let mut want = caps_v3(0);
    want.truncate(20);
    want[3] = 2;
    assert_eq!(v.getxattr(c, CAPS).unwrap(), want);
    assert_eq!(v.getxattr(ino(&v, "nested"), CAPS).unwrap(), caps_v3(1000));
    assert_eq!(v.getattr(ino(&v, "wh")).unwrap().kind, FileKind::CharDev);
    assert_eq!(
        v.getxattr(ino(&v, "labelled"), b"trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );
}

#[test]
fn a_deep_tree_exports_and_imports() {
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let a = volume(d.path(), "a", &tpl);
    let mut cur = crate::tree::ROOT;
    for _ in 0..3000 {
        cur = a.mknod(cur, b"d", FileKind::Dir, 0o755, 0, 0, 0, b"").unwrap().ino;
    }
    let f = file(&a, cur, "leaf");
    a.write(f, 0, b"deep").unwrap();
    a.link(f, crate::tree::ROOT, b"top").unwrap();
    let mut out = Vec::new();
    export(&a, b"{}", &mut out).unwrap();
    let b = volume(d.path(), "b", &tpl);
    let mut ar = tar::Archive::new(Guard::new(&out[..]));
    let (_, entries) = read_meta(&mut ar).unwrap();
    assert_eq!(import(&b, entries).unwrap(), 3002);
    let top = ino(&b, "top");
    assert_eq!(b.read(top, 0, 10).unwrap(), b"deep");
    assert_eq!(b.getattr(top).unwrap().nlink, 2);
}

#[test]
fn times_of_directories_and_symlinks_survive_an_export() {
    let d = tempfile::tempdir().unwrap();
    let tpl = template(d.path());
    let a = volume(d.path(), "a", &tpl);
    let old = 1_600_000_000 * 1_000_000_000i64;
    let at = |t: i64| crate::volume::SetAttr {
        atime_ns: Some(t),
        mtime_ns: Some(t),
        ..Default::default()
    };
    let dir = a
        .mknod(crate::tree::ROOT, b"app", FileKind::Dir, 0o755, 0, 0, 0, b"")
        .unwrap()
        .ino;
    let f = file(&a, dir, "conf");
    let sym = a
        .mknod(dir, b"conf.sym", FileKind::Symlink, 0o777, 5, 6, 0, b"conf")
        .unwrap()
        .ino;
    for (i, ino) in [f, sym, dir].into_iter().enumerate() {
        a.setattr(ino, &at(old + i as i64 * 1_000_000_000)).unwrap();
    }
    // A template directory changed: /etc gets a child, then an old time.
    let etc = ino(&a, "etc");
    file(&a, etc, "added");
    a.setattr(etc, &at(old)).unwrap();
    let mut out = Vec::new();
    export(&a, b"{}", &mut out).unwrap();
    let b = volume(d.path(), "b", &tpl);
    let mut ar = tar::Archive::new(Guard::new(&out[..]));
    let (_, entries) = read_meta(&mut ar).unwrap();
    import(&b, entries).unwrap();
    let mtime = |p: &str| b.getattr(ino(&b, p)).unwrap().mtime_ns;
    assert_eq!(mtime("app/conf"), old);
    assert_eq!(mtime("app/conf.sym"), old + 1_000_000_000);
    assert_eq!(
        mtime("app"),
        old + 2_000_000_000,
        "a directory's time is set after its entries"
    );
    assert_eq!(mtime("etc"), old);
    let s = b.getattr(ino(&b, "app/conf.sym")).unwrap();
    assert_eq!((s.uid, s.gid), (5, 6));
}
