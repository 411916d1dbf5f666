//! Export and import of a volume as a tar stream: a description (`vessel-export.json`)
//! followed by the VE's own changes as a layer over its template, in the convention of
//! OCI image layers: `rootfs/<path>` entries for what the VE added or changed, `.wh.<name>`
//! for what it deleted, `.wh..wh..opq` in a directory that hides the template's. Owners are
//! VE-relative; extended attributes travel as PAX `SCHILY.xattr.*` records; hard links as
//! tar links. Importing needs the same template on the node.

use crate::lower::Lower;
use crate::tree::{Tree, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino};
use crate::view;
use crate::volume::{SetAttr, Volume};
use std::collections::HashMap;
use std::io::{Read, Write};

pub const META_NAME: &str = "vessel-export.json";
const WH: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

fn io_err(e: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

/// Reads a private file's contents through the volume.
struct VolReader<'a> {
    vol: &'a Volume,
    ino: Ino,
    off: u64,
}

impl Read for VolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(1 << 20) as u32;
        let d = self.vol.read(self.ino, self.off, want).map_err(io_err)?;
        buf[..d.len()].copy_from_slice(&d);
        self.off += d.len() as u64;
        Ok(d.len())
    }
}

fn header(kind: tar::EntryType, a: &view::Attr) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(a.perm);
    h.set_uid(a.uid as u64);
    h.set_gid(a.gid as u64);
    h.set_mtime(a.mtime_ns.max(0) as u64 / 1_000_000_000);
    h.set_size(0);
    h
}

/// Write `meta` and the volume's changes relative to its template to `out`.
pub fn export<W: Write>(vol: &Volume, meta: &[u8], out: W) -> std::io::Result<W> {
    let mut b = tar::Builder::new(out);
    let mut h = tar::Header::new_gnu();
    h.set_size(meta.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, META_NAME, meta)?;
    // A consistent list of what to write (the tree may change while contents stream).
    let items = vol.with_tree(|tree, lower| {
        let mut v = Vec::new();
        collect(tree, lower, ROOT, "rootfs", lower.map(|_| 0), &mut v);
        v
    });
    let mut first_path: HashMap<Ino, String> = HashMap::new();
    for it in items {
        match it {
            Item::Whiteout(p) | Item::Opaque(p) => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_data(&mut h, &p, std::io::empty())?;
            }
            Item::Node(p, ino) => {
                let Ok(a) = vol.getattr(ino) else { continue };
                let xattrs: Vec<(String, Vec<u8>)> = vol
                    .listxattr(ino)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|n| {
                        let v = vol.getxattr(ino, &n).ok()?;
                        Some((format!("SCHILY.xattr.{}", String::from_utf8_lossy(&n)), v))
                    })
                    .collect();
                if !xattrs.is_empty() {
                    b.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
                }
                if a.kind != FileKind::Dir && a.nlink > 1 {
                    if let Some(first) = first_path.get(&ino) {
                        let mut h = header(tar::EntryType::Link, &a);
                        b.append_link(&mut h, &p, first)?;
                        continue;
                    }
                    first_path.insert(ino, p.clone());
                }
                match a.kind {
                    FileKind::Dir => {
                        let mut h = header(tar::EntryType::Directory, &a);
                        b.append_data(&mut h, &p, std::io::empty())?;
                    }
                    FileKind::File => {
                        let mut h = header(tar::EntryType::Regular, &a);
                        h.set_size(a.size);
                        let r = VolReader { vol, ino, off: 0 };
                        b.append_data(&mut h, &p, r.take(a.size))?;
                    }
                    FileKind::Symlink => {
                        let t = vol.readlink(ino).map_err(io_err)?;
                        let mut h = header(tar::EntryType::Symlink, &a);
                        let t = String::from_utf8_lossy(&t).into_owned();
                        b.append_link(&mut h, &p, t)?;
                    }
                    k => {
                        let kind = match k {
                            FileKind::Fifo => tar::EntryType::Fifo,
                            FileKind::CharDev => tar::EntryType::Char,
                            FileKind::BlockDev => tar::EntryType::Block,
                            _ => continue, // sockets are not archived (tar has no type for them)
                        };
                        let mut h = header(kind, &a);
                        h.set_device_major(libc::major(a.rdev) as u32)?;
                        h.set_device_minor(libc::minor(a.rdev) as u32)?;
                        b.append_data(&mut h, &p, std::io::empty())?;
                    }
                }
            }
        }
    }
    b.into_inner()
}

enum Item {
    Whiteout(String),
    Opaque(String),
    Node(String, Ino),
}

fn collect(tree: &Tree, lower: Option<&Lower>, dir: Ino, path: &str, lower_dir: Option<u64>, out: &mut Vec<Item>) {
    let Some(d) = tree.inodes.get(&dir) else { return };
    for (name, &t) in &d.entries {
        let n = String::from_utf8_lossy(name);
        let p = format!("{path}/{n}");
        let lc = match (lower_dir, lower) {
            (Some(l), Some(low)) => low.child(l, name).map(|c| c as u64),
            _ => None,
        };
        if t == WHITEOUT {
            if lc.is_some() {
                out.push(Item::Whiteout(format!("{path}/{WH}{n}")));
            }
            continue;
        }
        let Some(i) = tree.inodes.get(&t) else { continue };
        let lower_is_dir = lc
            .and_then(|c| lower.and_then(|l| l.get(c)))
            .is_some_and(|e| e.kind == FileKind::Dir);
        out.push(Item::Node(p.clone(), t));
        if i.kind == FileKind::Dir {
            if lower_is_dir && i.lower.is_none() {
                out.push(Item::Opaque(format!("{p}/{OPAQUE}")));
            }
            let ld = if lower_is_dir && i.lower.is_some() { lc } else { None };
            collect(tree, lower, t, &p, ld, out);
        }
    }
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

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Read the description at the start of an export stream.
pub fn read_meta<R: Read>(ar: &mut tar::Archive<R>) -> std::io::Result<(Vec<u8>, tar::Entries<'_, R>)> {
    let mut entries = ar.entries()?;
    let mut first = entries
        .next()
        .ok_or_else(|| bad("empty archive: not a `vessel ve export` stream".into()))??;
    if first.path_bytes().as_ref() != META_NAME.as_bytes() {
        return Err(bad(format!(
            "the archive does not start with {META_NAME}: not a `vessel ve export` stream"
        )));
    }
    let mut meta = Vec::new();
    first.read_to_end(&mut meta)?;
    Ok((meta, entries))
}

/// Apply the layer entries of an export stream to `vol` (a fresh volume of the same
/// template). Returns the number of entries applied.
pub fn import<R: Read>(vol: &Volume, entries: tar::Entries<'_, R>) -> std::io::Result<u64> {
    let mut n = 0;
    for e in entries {
        let mut e = e?;
        let raw = e.path_bytes().into_owned();
        let path = String::from_utf8_lossy(&raw).into_owned();
        let Some(rel) = path.strip_prefix("rootfs/") else {
            return Err(bad(format!("unexpected entry {path} (expected rootfs/...)")));
        };
        if rel.split('/').any(|c| c == "..") {
            return Err(bad(format!("entry {path} leaves the tree")));
        }
        let (parent_path, name) = match rel.rsplit_once('/') {
            Some((p, n)) => (p, n),
            None => ("", rel),
        };
        let parent = vol
            .with_tree(|t, l| view::resolve(t, l, parent_path.as_bytes()))
            .map_err(|er| bad(format!("{path}: parent directory: {}", io_err(er))))?;
        let mut xattrs = Vec::new();
        if let Some(p) = e.pax_extensions()? {
            for x in p {
                let x = x?;
                if let Some(k) = x.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((k.to_vec(), x.value_bytes().to_vec()));
                }
            }
        }
        n += 1;
        if name == OPAQUE {
            let (_, kids) = vol.readdir(parent).map_err(io_err)?;
            for (k, _, _) in kids {
                vol.remove_tree(parent, &k).map_err(io_err)?;
            }
            continue;
        }
        if let Some(victim) = name.strip_prefix(WH) {
            vol.remove_tree(parent, victim.as_bytes()).map_err(io_err)?;
            continue;
        }
        let h = e.header().clone();
        let attr = SetAttr {
            mode: Some(h.mode()? & 0o7777),
            uid: Some(h.uid()? as u32),
            gid: Some(h.gid()? as u32),
            size: None,
            atime_ns: Some(h.mtime()? as i64 * 1_000_000_000),
            mtime_ns: Some(h.mtime()? as i64 * 1_000_000_000),
        };
        let existing = vol.lookup(parent, name.as_bytes()).ok();
        let ino = if h.entry_type() == tar::EntryType::Link {
            let target = e
                .link_name_bytes()
                .ok_or_else(|| bad(format!("{path}: hard link without a target")))?;
            let t = String::from_utf8_lossy(&target).into_owned();
            let t = t.strip_prefix("rootfs/").unwrap_or(&t).to_string();
            let ti = vol
                .with_tree(|tr, l| view::resolve(tr, l, t.as_bytes()))
                .map_err(|er| bad(format!("{path}: link target {t}: {}", io_err(er))))?;
            if existing.is_some() {
                vol.remove_tree(parent, name.as_bytes()).map_err(io_err)?;
            }
            vol.link(ti, parent, name.as_bytes()).map_err(io_err)?;
            continue;
        } else {
            let kind = kind_of(h.entry_type())
                .ok_or_else(|| bad(format!("{path}: unsupported entry type {:?}", h.entry_type())))?;
            match existing {
                Some(a) if a.kind == FileKind::Dir && kind == FileKind::Dir => a.ino,
                other => {
                    if other.is_some() {
                        vol.remove_tree(parent, name.as_bytes()).map_err(io_err)?;
                    }
                    let target = match kind {
                        FileKind::Symlink => e.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    let rdev = match kind {
                        FileKind::CharDev | FileKind::BlockDev => {
                            libc::makedev(h.device_major()?.unwrap_or(0), h.device_minor()?.unwrap_or(0))
                        }
                        _ => 0,
                    };
                    let a = vol
                        .mknod(
                            parent,
                            name.as_bytes(),
                            kind,
                            attr.mode.unwrap_or(0o644),
                            attr.uid.unwrap_or(0),
                            attr.gid.unwrap_or(0),
                            rdev,
                            &target,
                        )
                        .map_err(|er| bad(format!("{path}: {}", io_err(er))))?;
                    if kind == FileKind::File {
                        vol.open_file(a.ino, true, true).map_err(io_err)?;
                        let mut buf = vec![0u8; 1 << 20];
                        let mut off = 0u64;
                        let res = loop {
                            match e.read(&mut buf) {
                                Ok(0) => break Ok(()),
                                Ok(k) => {
                                    if let Err(er) = vol.write(a.ino, off, &buf[..k]) {
                                        break Err(io_err(er));
                                    }
                                    off += k as u64;
                                }
                                Err(er) => break Err(er),
                            }
                        };
                        vol.release(a.ino);
                        res?;
                    }
                    a.ino
                }
            }
        };
        for (k, v) in xattrs {
            vol.setxattr(ino, &k, &v, false, false).map_err(io_err)?;
        }
        if h.entry_type() != tar::EntryType::Symlink {
            vol.setattr(ino, &attr).map_err(io_err)?;
        }
    }
    Ok(n)
}
