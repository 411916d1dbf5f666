//! Writing an export: the list of entries is taken in one go under the volume's lock (a
//! [`Snapshot`]: names, attributes, extended attributes, no contents), then contents are
//! streamed without it, a bounded chunk at a time, holes left out. A write error (the
//! reader went away) ends the export at once.

use super::{pax_sparse, OPAQUE, ROOTFS, WH};
use crate::lower::Lower;
use crate::sparse::{self, Extent};
use crate::tree::{Tree, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino};
use crate::view::{self, Attr};
use crate::volume::Volume;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// No parent item: the entry sits in `rootfs/`.
const TOP: u32 = u32::MAX;

enum What {
    Whiteout,
    Opaque,
    Node {
        ino: Ino,
        attr: Attr,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        target: Vec<u8>,
    },
}

struct Item {
    /// Index of the directory item this entry sits in (or TOP).
    parent: u32,
    name: Vec<u8>,
    what: What,
}

/// What an export writes, as of one moment: the VE's changes over its template, depth
/// first. Paths are not stored (a deep tree would make them quadratic): each item names
/// its directory's item.
pub struct Snapshot {
    items: Vec<Item>,
}

/// Write `meta` and the volume's changes relative to its template to `out`.
pub fn export<W: Write>(vol: &Volume, meta: &[u8], out: W) -> std::io::Result<W> {
    Snapshot::take(vol).write(vol, meta, out, &|| false)
}

fn lower_child(lower: Option<&Lower>, dir: Option<u64>, name: &[u8]) -> Option<u64> {
    Some(lower?.child(dir?, name)? as u64)
}

impl Snapshot {
    /// The list of entries (under the volume's lock, briefly: no contents are read).
    pub fn take(vol: &Volume) -> Snapshot {
        vol.with_tree(Self::of_tree)
    }

    fn of_tree(tree: &Tree, lower: Option<&Lower>) -> Snapshot {
        let mut items = Vec::new();
        // (directory inode, its item, its template directory, entries left)
        let Some(root) = tree.inodes.get(&ROOT) else {
            return Snapshot { items };
        };
        let mut stack = vec![(TOP, lower.map(|_| 0u64), root.entries.iter())];
        while let Some((dir_item, lower_dir, entries)) = stack.last_mut() {
            let Some((name, &t)) = entries.next() else {
                stack.pop();
                continue;
            };
            let (dir_item, lower_dir) = (*dir_item, *lower_dir);
            let lc = lower_child(lower, lower_dir, name);
            if t == WHITEOUT {
                if lc.is_some() {
                    let mut n = WH.as_bytes().to_vec();
                    n.extend_from_slice(name);
                    items.push(Item {
                        parent: dir_item,
                        name: n,
                        what: What::Whiteout,
                    });
                }
                continue;
            }
            let Some(i) = tree.inodes.get(&t) else { continue };
            let lower_is_dir = lc
                .and_then(|c| lower.and_then(|l| l.get(c)))
                .is_some_and(|e| e.kind == FileKind::Dir);
            let me = items.len() as u32;
            items.push(Item {
                parent: dir_item,
                name: name.clone(),
                what: What::Node {
                    ino: t,
                    attr: view::inode_attr(t, i),
                    xattrs: i
                        .xattrs
                        .iter()
                        .filter(|(k, _)| crate::xattr::exported(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    target: i.target.clone(),
                },
            });
            if i.kind == FileKind::Dir {
                if lower_is_dir && i.lower.is_none() {
                    items.push(Item {
                        parent: me,
                        name: OPAQUE.as_bytes().to_vec(),
                        what: What::Opaque,
                    });
                }
                let ld = if lower_is_dir && i.lower.is_some() { lc } else { None };
                stack.push((me, ld, i.entries.iter()));
            }
        }
        Snapshot { items }
    }

    /// The archive path of item `i` ("rootfs/...").
    fn path_of(&self, mut i: u32) -> Vec<u8> {
        let mut parts = Vec::new();
        while i != TOP {
            let it = &self.items[i as usize];
            parts.push(&it.name[..]);
            i = it.parent;
        }
        let mut p = ROOTFS.to_vec();
        for n in parts.iter().rev() {
            p.push(b'/');
            p.extend_from_slice(n);
        }
        p
    }

    /// Stream the archive: `meta`, then every entry, contents read now (without the
    /// volume's lock). Stops with an error as soon as a write fails or `stop` says so.
    pub fn write<W: Write>(&self, vol: &Volume, meta: &[u8], out: W, stop: &dyn Fn() -> bool) -> std::io::Result<W> {
        let mut b = tar::Builder::new(out);
        let mut h = tar::Header::new_gnu();
        h.set_size(meta.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, super::META_NAME, meta)?;
        let mut first_of: HashMap<Ino, u32> = HashMap::new();
        // The directory items above the current entry, with the length of their path.
        let mut dirs: Vec<(u32, usize)> = Vec::new();
        let mut path: Vec<u8> = ROOTFS.to_vec();
        for (idx, it) in self.items.iter().enumerate() {
            if stop() {
                return Err(std::io::Error::other("export cancelled: the client went away"));
            }
            while dirs.last().is_some_and(|(d, _)| *d != it.parent) {
                dirs.pop();
            }
            path.truncate(dirs.last().map_or(ROOTFS.len(), |(_, l)| *l));
            path.push(b'/');
            path.extend_from_slice(&it.name);
            let p = Path::new(OsStr::from_bytes(&path));
            match &it.what {
                What::Whiteout | What::Opaque => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(0);
                    b.append_data(&mut h, p, std::io::empty())?;
                }
                What::Node {
                    ino,
                    attr,
                    xattrs,
                    target,
                } => {
                    if attr.kind == FileKind::Dir {
                        dirs.push((idx as u32, path.len()));
                    }
                    self.node(
                        &mut b,
                        vol,
                        idx as u32,
                        &path,
                        *ino,
                        attr,
                        xattrs,
                        target,
                        &mut first_of,
                        stop,
                    )?;
                }
            }
        }
        b.into_inner()
    }

    #[allow(clippy::too_many_arguments)]
    fn node<W: Write>(
        &self,
        b: &mut tar::Builder<W>,
        vol: &Volume,
        idx: u32,
        path: &[u8],
        ino: Ino,
        a: &Attr,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        target: &[u8],
        first_of: &mut HashMap<Ino, u32>,
        stop: &dyn Fn() -> bool,
    ) -> std::io::Result<()> {
        let p = Path::new(OsStr::from_bytes(path));
        let mut pax: Vec<(String, Vec<u8>)> = xattrs
            .iter()
            .filter_map(|(k, v)| Some((format!("SCHILY.xattr.{}", std::str::from_utf8(k).ok()?), v.clone())))
            .collect();
        if a.kind != FileKind::Dir && a.nlink > 1 {
            if let Some(&first) = first_of.get(&ino) {
                let mut h = header(tar::EntryType::Link, a);
                let t = self.path_of(first);
                return b.append_link(&mut h, p, Path::new(OsStr::from_bytes(&t)));
            }
        }
        match a.kind {
            FileKind::Dir => {
                append_pax(b, &pax)?;
                let mut h = header(tar::EntryType::Directory, a);
                b.append_data(&mut h, p, std::io::empty())?;
            }
            FileKind::File => {
                let f = match vol.open_data(ino) {
                    Ok(f) => f,
                    // Removed since the snapshot: not part of the export any more.
                    Err(libc::ENOENT) => return Ok(()),
                    Err(e) => return Err(std::io::Error::from_raw_os_error(e)),
                };
                let extents = sparse::data_extents(&f, a.size, sparse::MAX_EXTENTS)?;
                if a.size == 0 || extents == [(0, a.size)] {
                    let mut h = header(tar::EntryType::Regular, a);
                    append_pax(b, &pax)?;
                    h.set_size(a.size);
                    let r = Runs::new(&f, vec![(0, a.size)], stop);
                    b.append_data(&mut h, p, r)?;
                } else {
                    let map = pax_sparse::encode_map(&extents, a.size);
                    let data: u64 = extents.iter().map(|e| e.1).sum();
                    pax.push((pax_sparse::MAJOR.into(), b"1".to_vec()));
                    pax.push((pax_sparse::MINOR.into(), b"0".to_vec()));
                    pax.push((pax_sparse::NAME.into(), path.to_vec()));
                    pax.push((pax_sparse::REALSIZE.into(), a.size.to_string().into_bytes()));
                    append_pax(b, &pax)?;
                    // GNU tar reads the PAX sparse format only from POSIX (ustar) headers.
                    let mut h = header_of(tar::Header::new_ustar(), tar::EntryType::Regular, a);
                    h.set_size(map.len() as u64 + data);
                    let r = (&map[..]).chain(Runs::new(&f, extents, stop));
                    b.append_data(&mut h, Path::new(OsStr::from_bytes(&sparse_name(path))), r)?;
                }
                if a.nlink > 1 {
                    first_of.insert(ino, idx);
                }
            }
            FileKind::Symlink => {
                append_pax(b, &pax)?;
                let mut h = header(tar::EntryType::Symlink, a);
                b.append_link(&mut h, p, Path::new(OsStr::from_bytes(target)))?;
                if a.nlink > 1 {
                    first_of.insert(ino, idx);
                }
            }
            k => {
                let kind = match k {
                    FileKind::Fifo => tar::EntryType::Fifo,
                    FileKind::CharDev => tar::EntryType::Char,
                    FileKind::BlockDev => tar::EntryType::Block,
                    _ => return Ok(()), // sockets are not archived (tar has no type for them)
                };
                append_pax(b, &pax)?;
                let mut h = header(kind, a);
                h.set_device_major(libc::major(a.rdev))?;
                h.set_device_minor(libc::minor(a.rdev))?;
                b.append_data(&mut h, p, std::io::empty())?;
                if a.nlink > 1 {
                    first_of.insert(ino, idx);
                }
            }
        }
        Ok(())
    }
}

fn append_pax<W: Write>(b: &mut tar::Builder<W>, pax: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    if pax.is_empty() {
        return Ok(());
    }
    b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

/// The header name of a sparse entry (readers that know the format use
/// `GNU.sparse.name`; others extract the raw map and data under this name). GNU tar uses
/// `<dir>/GNUSparseFile.<pid>/<name>`; this one stays short enough for a ustar header.
fn sparse_name(path: &[u8]) -> Vec<u8> {
    let base = &path[path.iter().rposition(|c| *c == b'/').map_or(0, |i| i + 1)..];
    let mut v = b"rootfs/GNUSparseFile.0/".to_vec();
    v.extend_from_slice(&base[..base.len().min(90)]);
    v
}

fn header(kind: tar::EntryType, a: &Attr) -> tar::Header {
    header_of(tar::Header::new_gnu(), kind, a)
}

fn header_of(mut h: tar::Header, kind: tar::EntryType, a: &Attr) -> tar::Header {
    h.set_entry_type(kind);
    h.set_mode(a.perm);
    h.set_uid(a.uid as u64);
    h.set_gid(a.gid as u64);
    h.set_mtime(a.mtime_ns.max(0) as u64 / 1_000_000_000);
    h.set_size(0);
    h
}

/// The bytes of some runs of a file, back to back, exactly as long as the runs (a file
/// that shrank meanwhile reads as zeros past its end).
struct Runs<'a> {
    f: &'a File,
    runs: Vec<Extent>,
    next: usize,
    done: u64,
    stop: &'a dyn Fn() -> bool,
}

impl<'a> Runs<'a> {
    fn new(f: &'a File, runs: Vec<Extent>, stop: &'a dyn Fn() -> bool) -> Self {
        Runs {
            f,
            runs,
            next: 0,
            done: 0,
            stop,
        }
    }
}

impl Read for Runs<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(&(o, l)) = self.runs.get(self.next) {
            if self.done == l {
                (self.next, self.done) = (self.next + 1, 0);
                continue;
            }
            if (self.stop)() {
                return Err(std::io::Error::other("export cancelled: the client went away"));
            }
            let n = (buf.len() as u64).min(l - self.done).min(sparse::CHUNK as u64) as usize;
            sparse::read_at_padded(self.f, o + self.done, &mut buf[..n])?;
            self.done += n as u64;
            return Ok(n);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_names_follow_gnu_tar() {
        assert_eq!(sparse_name(b"rootfs/a/big"), b"rootfs/GNUSparseFile.0/big");
        assert_eq!(sparse_name(&[b'x'; 300]).len(), 23 + 90);
    }

    #[test]
    fn a_deep_tree_is_listed_without_recursion_and_paths_are_rebuilt() {
        use crate::tx::{Op, Tx};
        let mut t = Tree::new(0o755, 0, 0);
        let depth = 100_000u64;
        for i in 0..depth {
            let op = Op::Create {
                parent: if i == 0 { ROOT } else { i + 1 },
                name: b"d".to_vec(),
                ino: i + 2,
                kind: FileKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                rdev: 0,
                target: vec![],
            };
            t.apply(&Tx {
                epoch: 1,
                seq: i + 1,
                time_ns: 0,
                op,
            })
            .unwrap();
        }
        let s = Snapshot::of_tree(&t, None);
        assert_eq!(s.items.len(), depth as usize);
        assert_eq!(s.path_of(2), b"rootfs/d/d/d");
        assert_eq!(s.path_of(depth as u32 - 1).len(), 6 + 2 * depth as usize);
    }
}
