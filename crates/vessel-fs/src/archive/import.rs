//! Applying an export to a fresh volume. The archive is untrusted: every entry is held to
//! what a process inside the VE could have made (see the module above), and refused with
//! its name otherwise. Contents are written in bounded chunks; runs of zeros and the holes
//! of sparse entries stay holes.

use super::{bad, pax_sparse, OPAQUE, ROOTFS, WH};
use crate::sparse::{self, Extent};
use crate::tree::ROOT;
use crate::tx::{FileKind, Ino};
use crate::volume::{SetAttr, Volume};
use crate::xattr::{self, Source};
use std::io::Read;

/// Longest symlink target (PATH_MAX without its NUL).
const TARGET_MAX: usize = 4095;
/// Most extended attributes on one entry.
const XATTRS_MAX: usize = 1024;

fn errno(e: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

/// An entry's name for messages (shortened: a crafted one may be very long).
fn shown(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    if s.chars().count() > 200 {
        let head: String = s.chars().take(100).collect();
        let tail: String = s.chars().skip(s.chars().count() - 80).collect();
        format!("{head}...{tail}")
    } else {
        s.into_owned()
    }
}

/// The components of an entry's path below `rootfs/`, or why it is refused.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.first() == Some(&b'/') {
        return Err("absolute path (entries are relative, under rootfs/)".into());
    }
    let mut parts = path.split(|c| *c == b'/').filter(|c| !c.is_empty() && *c != b".");
    if parts.next() != Some(ROOTFS) {
        return Err("not under rootfs/".into());
    }
    let v: Vec<&[u8]> = parts.collect();
    if v.contains(&&b".."[..]) {
        return Err("path with `..` (it would leave the tree)".into());
    }
    Ok(v)
}

/// The directories of the entry before, so that a deep tree is not looked up from the
/// root for every entry: (name, inode) from the root down.
#[derive(Default)]
struct DirCache(Vec<(Vec<u8>, Ino)>);

impl DirCache {
    fn resolve(&mut self, vol: &Volume, comps: &[&[u8]]) -> Result<Ino, i32> {
        let common = self.0.iter().zip(comps).take_while(|((n, _), c)| n == *c).count();
        self.0.truncate(common);
        let mut cur = self.0.last().map_or(ROOT, |(_, i)| *i);
        for c in &comps[common..] {
            let a = vol.lookup(cur, c)?;
            if a.kind != FileKind::Dir {
                return Err(libc::ENOTDIR);
            }
            cur = a.ino;
            self.0.push((c.to_vec(), cur));
        }
        Ok(cur)
    }

    /// Something at this depth or below was removed or replaced.
    fn forget_below(&mut self, depth: usize) {
        self.0.truncate(depth);
    }
}

/// Whether the template holds a device of this kind and number at this path.
fn template_device(vol: &Volume, comps: &[&[u8]], kind: FileKind, rdev: u64) -> bool {
    let Some(low) = vol.lower() else { return false };
    let mut cur = crate::lower::LOWER_ROOT as u64;
    for c in comps {
        match low.child(cur, c) {
            Some(i) => cur = i as u64,
            None => return false,
        }
    }
    low.get(cur).is_some_and(|e| e.kind == kind && e.rdev == rdev)
}

fn kind_of(t: tar::EntryType) -> Option<FileKind> {
    Some(match t {
        tar::EntryType::Regular | tar::EntryType::Continuous => FileKind::File,
        tar::EntryType::Directory => FileKind::Dir,
        tar::EntryType::Symlink => FileKind::Symlink,
        tar::EntryType::Fifo => FileKind::Fifo,
        tar::EntryType::Char => FileKind::CharDev,
        tar::EntryType::Block => FileKind::BlockDev,
        _ => return None,
    })
}

/// Apply the layer entries of an export stream to `vol` (a fresh volume of the same
/// template). Returns the number of entries applied.
pub fn import<R: Read>(vol: &Volume, entries: tar::Entries<'_, R>) -> std::io::Result<u64> {
    let mut n = 0;
    let mut dirs = DirCache::default();
    let mut buf = vec![0u8; sparse::CHUNK];
    // A directory's times are set after its last entry: making a child would move them.
    // Kept by path: a later whiteout may remove one.
    let mut dir_times: Vec<(Vec<Vec<u8>>, i64)> = Vec::new();
    for e in entries {
        let mut e = e?;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if let Some(p) = e.pax_extensions()? {
            for x in p {
                let x = x?;
                pax.push((x.key_bytes().to_vec(), x.value_bytes().to_vec()));
            }
        }
        let get = |k: &str| pax.iter().find(|(n, _)| n == k.as_bytes()).map(|(_, v)| v.clone());
        let sparse_v = (get(pax_sparse::MAJOR), get(pax_sparse::MINOR));
        let is_sparse = match (sparse_v.0.as_deref(), sparse_v.1.as_deref()) {
            (None, None) => false,
            (Some(b"1"), Some(b"0")) => true,
            _ => {
                return Err(bad(format!(
                    "{}: unsupported GNU sparse format",
                    shown(&e.path_bytes())
                )))
            }
        };
        let raw = if is_sparse {
            get(pax_sparse::NAME).ok_or_else(|| {
                bad(format!(
                    "{}: sparse entry without GNU.sparse.name",
                    shown(&e.path_bytes())
                ))
            })?
        } else {
            e.path_bytes().into_owned()
        };
        let path = shown(&raw);
        let refuse = |why: String| bad(format!("entry {path}: {why}"));
        let comps = components(&raw).map_err(&refuse)?;
        n += 1;
        let h = e.header().clone();
        let Some((name, parent_comps)) = comps.split_last() else {
            // `rootfs/` itself: the root directory's attributes.
            if h.entry_type() != tar::EntryType::Directory {
                return Err(refuse("the root must be a directory".into()));
            }
            finish(vol, ROOT, &h, &pax, &refuse)?;
            dir_times.push((Vec::new(), entry_time(&h)?));
            continue;
        };
        let depth = parent_comps.len();
        let parent = dirs
            .resolve(vol, parent_comps)
            .map_err(|er| refuse(format!("parent directory: {}", errno(er))))?;
        if *name == OPAQUE.as_bytes() {
            let (_, kids) = vol.readdir(parent).map_err(errno)?;
            for (k, _, _) in kids {
                vol.remove_tree(parent, &k)
                    .map_err(|er| refuse(errno(er).to_string()))?;
            }
            dirs.forget_below(depth);
            continue;
        }
        if let Some(victim) = name.strip_prefix(WH.as_bytes()) {
            if victim.is_empty() || victim == b"." || victim == b".." {
                return Err(refuse("whiteout of an invalid name".into()));
            }
            vol.remove_tree(parent, victim)
                .map_err(|er| refuse(errno(er).to_string()))?;
            dirs.forget_below(depth);
            continue;
        }
        let existing = vol.lookup(parent, name).ok();
        if h.entry_type() == tar::EntryType::Link {
            let target = e
                .link_name_bytes()
                .ok_or_else(|| refuse("hard link without a target".into()))?
                .into_owned();
            let tc = components(&target).map_err(|why| refuse(format!("hard link target: {why}")))?;
            let ti = resolve(vol, &tc).map_err(|er| refuse(format!("hard link target: {}", errno(er))))?;
            if existing.is_some() {
                vol.remove_tree(parent, name)
                    .map_err(|er| refuse(errno(er).to_string()))?;
                dirs.forget_below(depth);
            }
            vol.link(ti, parent, name)
                .map_err(|er| refuse(format!("hard link: {}", errno(er))))?;
            continue;
        }
        let kind =
            kind_of(h.entry_type()).ok_or_else(|| refuse(format!("unsupported entry type {:?}", h.entry_type())))?;
        let rdev = match kind {
            FileKind::CharDev | FileKind::BlockDev => {
                libc::makedev(h.device_major()?.unwrap_or(0), h.device_minor()?.unwrap_or(0))
            }
            _ => 0,
        };
        if !xattr::node_ok(kind, rdev, template_device(vol, &comps, kind, rdev)) {
            return Err(refuse(format!(
                "device node {}:{} (a VE cannot make devices)",
                libc::major(rdev),
                libc::minor(rdev)
            )));
        }
        let (uid, gid) = (h.uid()?, h.gid()?);
        if !xattr::owner_ok(uid) || !xattr::owner_ok(gid) {
            return Err(refuse(format!(
                "owner {uid}:{gid} is outside the VE's ids 0..{}",
                xattr::VE_IDS
            )));
        }
        let target = match kind {
            FileKind::Symlink => {
                let t = e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                if t.is_empty() || t.len() > TARGET_MAX || t.contains(&0) {
                    return Err(refuse("symlink target empty, too long or with a NUL byte".into()));
                }
                t
            }
            _ => Vec::new(),
        };
        let ino = match existing {
            Some(a) if a.kind == FileKind::Dir && kind == FileKind::Dir => a.ino,
            other => {
                if other.is_some() {
                    vol.remove_tree(parent, name)
                        .map_err(|er| refuse(errno(er).to_string()))?;
                    dirs.forget_below(depth);
                }
                let mode = h.mode()? & 0o7777;
                let a = vol
                    .mknod(parent, name, kind, mode, uid as u32, gid as u32, rdev, &target)
                    .map_err(|er| refuse(errno(er).to_string()))?;
                if kind == FileKind::File {
                    vol.open_file(a.ino, true, false).map_err(errno)?;
                    let r = contents(vol, a.ino, &mut e, is_sparse, &pax, &mut buf);
                    vol.release(a.ino);
                    r.map_err(|er| refuse(er.to_string()))?;
                }
                a.ino
            }
        };
        finish(vol, ino, &h, &pax, &refuse)?;
        if kind == FileKind::Dir {
            dir_times.push((comps.iter().map(|c| c.to_vec()).collect(), entry_time(&h)?));
        }
    }
    let mut dirs = DirCache::default();
    for (path, t) in dir_times {
        let comps: Vec<&[u8]> = path.iter().map(|c| c.as_slice()).collect();
        // Gone or replaced by a later entry: nothing to set.
        let Ok(ino) = dirs.resolve(vol, &comps) else { continue };
        let attr = SetAttr {
            atime_ns: Some(t),
            mtime_ns: Some(t),
            ..Default::default()
        };
        vol.setattr(ino, &attr).map_err(errno)?;
    }
    Ok(n)
}

/// An entry's modification time in nanoseconds (tar keeps whole seconds).
fn entry_time(h: &tar::Header) -> std::io::Result<i64> {
    Ok(h.mtime()?.min(i64::MAX as u64 / 1_000_000_000) as i64 * 1_000_000_000)
}

/// Resolve a path from the root without following symlinks.
fn resolve(vol: &Volume, comps: &[&[u8]]) -> Result<Ino, i32> {
    let mut cur = ROOT;
    for c in comps {
        cur = vol.lookup(cur, c)?.ino;
    }
    Ok(cur)
}

/// Extended attributes, then mode, owner and times.
fn finish(
    vol: &Volume,
    ino: Ino,
    h: &tar::Header,
    pax: &[(Vec<u8>, Vec<u8>)],
    refuse: &dyn Fn(String) -> std::io::Error,
) -> std::io::Result<()> {
    let xattrs: Vec<_> = pax
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(b"SCHILY.xattr.")?, v)))
        .collect();
    if xattrs.len() > XATTRS_MAX {
        return Err(refuse(format!("more than {XATTRS_MAX} extended attributes")));
    }
    for (k, v) in xattrs {
        let inc = xattr::incoming(k, v, Source::Archive).map_err(|er| refuse(er.to_string()))?;
        vol.apply_xattr(ino, k, inc, false, false)
            .map_err(|er| refuse(format!("extended attribute {}: {}", shown(k), errno(er))))?;
    }
    let (uid, gid) = (h.uid()?, h.gid()?);
    if !xattr::owner_ok(uid) || !xattr::owner_ok(gid) {
        return Err(refuse(format!(
            "owner {uid}:{gid} is outside the VE's ids 0..{}",
            xattr::VE_IDS
        )));
    }
    let t = entry_time(h)?;
    // A symlink's mode is always 0777 (as lchmod does not exist); its owner and times are kept.
    let symlink = h.entry_type() == tar::EntryType::Symlink;
    let attr = SetAttr {
        mode: if symlink { None } else { Some(h.mode()? & 0o7777) },
        uid: Some(uid as u32),
        gid: Some(gid as u32),
        size: None,
        atime_ns: Some(t),
        mtime_ns: Some(t),
    };
    vol.setattr(ino, &attr).map_err(|er| refuse(errno(er).to_string()))?;
    Ok(())
}

/// Write a regular entry's contents to `ino`: the size first (a hole), then only the
/// chunks that hold data.
fn contents(
    vol: &Volume,
    ino: Ino,
    e: &mut impl Read,
    is_sparse: bool,
    pax: &[(Vec<u8>, Vec<u8>)],
    buf: &mut [u8],
) -> std::io::Result<()> {
    let (runs, size): (Vec<Extent>, u64) = if is_sparse {
        let real = pax
            .iter()
            .find(|(k, _)| k == pax_sparse::REALSIZE.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            .ok_or_else(|| bad("sparse entry without a valid GNU.sparse.realsize".into()))?;
        let (runs, _) = pax_sparse::read_map(e, real)?;
        (runs, real)
    } else {
        (Vec::new(), 0)
    };
    let set_size = |s: u64| {
        vol.setattr(
            ino,
            &SetAttr {
                size: Some(s),
                ..Default::default()
            },
        )
        .map(|_| ())
        .map_err(errno)
    };
    let write_chunk = |off: u64, b: &[u8]| -> std::io::Result<()> {
        if sparse::is_zero(b) {
            return Ok(());
        }
        vol.write(ino, off, b).map(|_| ()).map_err(errno)
    };
    if is_sparse {
        set_size(size)?;
        for (o, l) in runs {
            let mut done = 0u64;
            while done < l {
                let k = (l - done).min(buf.len() as u64) as usize;
                e.read_exact(&mut buf[..k]).map_err(|er| match er.kind() {
                    std::io::ErrorKind::UnexpectedEof => bad("the entry ends inside its data".into()),
                    _ => er,
                })?;
                write_chunk(o + done, &buf[..k])?;
                done += k as u64;
            }
        }
        // Nothing may follow the data the map describes.
        if e.read(&mut buf[..1])? != 0 {
            return Err(bad("sparse entry longer than its map says".into()));
        }
        return Ok(());
    }
    let mut off = 0u64;
    loop {
        let mut k = 0;
        while k < buf.len() {
            match e.read(&mut buf[k..])? {
                0 => break,
                r => k += r,
            }
        }
        if k == 0 {
            break;
        }
        write_chunk(off, &buf[..k])?;
        off += k as u64;
    }
    set_size(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_rootfs() {
        assert_eq!(components(b"rootfs/a/b").unwrap(), vec![&b"a"[..], b"b"]);
        assert_eq!(components(b"./rootfs//a/./b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(components(b"rootfs").unwrap().is_empty());
        for bad in [
            &b"/rootfs/a"[..],
            b"rootfs/../etc",
            b"rootfs/a/../../x",
            b"etc/passwd",
            b"rootfsx/a",
            b"",
        ] {
            assert!(components(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(shown(&[b'a'; 10_000]).len() < 300);
    }
}
