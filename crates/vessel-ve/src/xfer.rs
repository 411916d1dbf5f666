//! Tree streams: a directory tree as one byte stream from one node to another (a template
//! for `template fetch`, a VE's volume for `ve move`). Format version 1:
//!
//! ```text
//! stream := "VSLTREE" 0x01 | frame(header) | item* | frame(empty)
//! frame  := u32 big-endian length | that many bytes (JSON)
//! item   := frame(Item JSON: path, kind, mode, uid, gid, size, target, rdev, link)
//!           [regular file, not a link: `size` bytes | sha256 of them (32 bytes)]
//! ```
//! Items come in tree order (a directory before what it holds). `link` names an earlier
//! file of the stream the item is a hard link to (a volume's `base/` links live files).
//! The sender reads what is on disk (it never trusts its own manifest); the receiver
//! writes into a directory of its own, checks every file's bytes against the digest that
//! follows them and lets its caller check every item (a template's manifest), so a copy
//! that does not match is refused before anything is moved into place.
//!
//! Holes are not kept: a sparse file travels with its zeros (volumes' data files are dense
//! unless a VE made them sparse).

use crate::template::{Entry, EntryKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"VSLTREE\x01";
/// Largest header (a template's manifest: about 150 bytes per entry).
pub const MAX_HEADER: usize = 64 << 20;
/// Largest item frame.
pub const MAX_ITEM: usize = 64 << 10;
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum XferError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the stream: {0}")]
    Stream(std::io::Error),
    #[error("bad stream: {0}")]
    Bad(String),
    #[error("file {path}: {reason}")]
    Mismatch { path: String, reason: String },
}

type Result<T> = std::result::Result<T, XferError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> XferError + 'a {
    move |source| XferError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One entry of a tree stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    #[serde(flatten)]
    pub entry: Entry,
    /// A hard link to this earlier path of the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 4);
    v.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

/// List a tree's entries (not following symlinks) in stream order, without reading any
/// file: sizes are taken when a file is opened for sending. Hard links to a file listed
/// before become `link` items.
pub fn list(root: &Path) -> Result<Vec<Item>> {
    let mut out: Vec<(Item, Option<(u64, u64)>)> = Vec::new();
    // Work list of directories (relative), deepest taken first so a directory's entries
    // follow it; names sorted for a stable order.
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io("read directory", &dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io("read directory", &dir))?;
        names.sort();
        let mut subdirs = Vec::new();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = std::fs::symlink_metadata(&p).map_err(io("stat", &p))?;
            let ft = md.file_type();
            let mut e = Entry {
                path: r.to_string_lossy().into_owned(),
                kind: EntryKind::Dir,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: 0,
                sha256: None,
                target: None,
                rdev: 0,
            };
            let mut key = None;
            if ft.is_dir() {
                subdirs.push(r);
            } else if ft.is_file() {
                e.kind = EntryKind::File;
                if md.nlink() > 1 {
                    key = Some((md.dev(), md.ino()));
                }
            } else {
                crate::template::set_special(&mut e, &md, &p).map_err(io("read link", &p))?;
            }
            out.push((Item { entry: e, link: None }, key));
        }
        stack.extend(subdirs);
    }
    // Sorted by path components: `template::scan`'s order (depth-first, names sorted, a
    // directory before what it holds). Then the first path of each inode is sent, the
    // others link to it.
    out.sort_by(|a, b| {
        Path::new(&a.0.entry.path)
            .components()
            .cmp(Path::new(&b.0.entry.path).components())
    });
    let mut seen: HashMap<(u64, u64), String> = HashMap::new();
    Ok(out
        .into_iter()
        .map(|(mut it, key)| {
            if let Some(k) = key {
                match seen.get(&k) {
                    Some(first) => it.link = Some(first.clone()),
                    None => {
                        seen.insert(k, it.entry.path.clone());
                    }
                }
            }
            it
        })
        .collect())
}

/// The sending side: a `Read` that yields the stream of `root` with `header`, opening
/// each file only when its turn comes.
pub struct TreeReader {
    root: PathBuf,
    items: std::vec::IntoIter<Item>,
    pending: Vec<u8>,
    pos: usize,
    file: Option<(std::fs::File, u64, Sha256, String)>,
    done: bool,
    buf: Vec<u8>,
}

impl TreeReader {
    pub fn new(root: &Path, header: &[u8], items: Vec<Item>) -> TreeReader {
        let mut pending = MAGIC.to_vec();
        pending.extend_from_slice(&frame(header));
        TreeReader {
            root: root.to_path_buf(),
            items: items.into_iter(),
            pending,
            pos: 0,
            file: None,
            done: false,
            buf: Vec::new(),
        }
    }

    /// Refill `pending` with the next piece; false at the end.
    fn next_piece(&mut self) -> std::io::Result<bool> {
        self.pending.clear();
        self.pos = 0;
        if let Some((f, left, h, path)) = &mut self.file {
            if *left == 0 {
                let digest = std::mem::take(h).finalize();
                self.pending.extend_from_slice(&digest);
                self.file = None;
                return Ok(true);
            }
            let n = (*left).min(CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            f.read_exact(&mut self.buf).map_err(|e| {
                std::io::Error::new(e.kind(), format!("{path}: {e} (the file shrank while it was sent?)"))
            })?;
            h.update(&self.buf);
            *left -= n as u64;
            std::mem::swap(&mut self.pending, &mut self.buf);
            return Ok(true);
        }
        let Some(mut it) = self.items.next() else {
            if self.done {
                return Ok(false);
            }
            self.done = true;
            self.pending.extend_from_slice(&0u32.to_be_bytes());
            return Ok(true);
        };
        if it.entry.kind == EntryKind::File && it.link.is_none() {
            let p = self.root.join(&it.entry.path);
            let f = std::fs::File::open(&p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
            let len = f.metadata()?.len();
            it.entry.size = len;
            self.file = Some((f, len, Sha256::new(), it.entry.path.clone()));
        }
        let json = serde_json::to_vec(&it).map_err(std::io::Error::other)?;
        self.pending.extend_from_slice(&frame(&json));
        Ok(true)
    }
}

impl Read for TreeReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.pending.len() {
            if !self.next_piece()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.pending.len() - self.pos);
        out[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn read_frame<R: Read>(r: &mut R, limit: usize, what: &str) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(XferError::Stream)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(XferError::Bad(format!(
            "{what} of {len} bytes is over the {limit} byte limit"
        )));
    }
    let mut b = vec![0u8; len];
    r.read_exact(&mut b).map_err(XferError::Stream)?;
    Ok(b)
}

/// Read the magic and the header of a stream.
pub fn read_header<R: Read>(r: &mut R) -> Result<Vec<u8>> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m).map_err(XferError::Stream)?;
    if m[..7] != MAGIC[..7] {
        return Err(XferError::Bad("not a tree stream".into()));
    }
    if m[7] != MAGIC[7] {
        return Err(XferError::Bad(format!(
            "tree stream version {}, this node reads {}: run the same vessel version on every node",
            m[7], MAGIC[7]
        )));
    }
    read_frame(r, MAX_HEADER, "the header")
}

/// A path of the stream as a relative path of plain names (nothing else is accepted).
pub fn checked_path(p: &str) -> Result<&Path> {
    let path = Path::new(p);
    if p.is_empty() || p.len() > 4096 || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(XferError::Bad(format!("refused path {p:?}")));
    }
    Ok(path)
}

/// What a receive wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub items: u64,
    pub bytes: u64,
}

/// Write the items of a stream (after its header) under `dest` (an empty directory of
/// the caller's). Every file's bytes are checked against the digest that follows them;
/// `check` sees every item with the sha256 the receiver computed (files) and may refuse it.
/// `progress` is told the bytes so far now and then.
pub fn receive<R: Read>(
    r: &mut R,
    dest: &Path,
    check: &mut dyn FnMut(&Entry) -> std::result::Result<(), String>,
    progress: &mut dyn FnMut(u64),
) -> Result<Received> {
    let mut dirs: HashSet<String> = HashSet::new();
    let mut files: HashMap<String, Option<String>> = HashMap::new();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let mut got = Received::default();
    let mut last_told = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let b = read_frame(r, MAX_ITEM, "an item")?;
        if b.is_empty() {
            break;
        }
        let it: Item = serde_json::from_slice(&b).map_err(|e| XferError::Bad(format!("an item: {e}")))?;
        let rel = checked_path(&it.entry.path)?;
        let parent = rel
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !parent.is_empty() && !dirs.contains(&parent) {
            return Err(XferError::Bad(format!("{} comes before its directory", it.entry.path)));
        }
        let p = dest.join(rel);
        let mut e = it.entry.clone();
        match (&it.entry.kind, &it.link) {
            (EntryKind::File, Some(to)) => {
                let Some(sha) = files.get(to).cloned() else {
                    return Err(XferError::Bad(format!(
                        "{} links to {to}, which was not sent before",
                        e.path
                    )));
                };
                std::fs::hard_link(dest.join(to), &p).map_err(io("link", &p))?;
                let md = std::fs::metadata(&p).map_err(io("stat", &p))?;
                e.size = md.len();
                e.sha256 = sha;
                check(&e).map_err(|reason| XferError::Mismatch {
                    path: e.path.clone(),
                    reason,
                })?;
                got.items += 1;
                continue;
            }
            (EntryKind::File, None) => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(io("create", &p))?;
                let mut h = Sha256::new();
                let mut left = e.size;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    r.read_exact(&mut buf[..n]).map_err(XferError::Stream)?;
                    h.update(&buf[..n]);
                    f.write_all(&buf[..n]).map_err(io("write", &p))?;
                    left -= n as u64;
                    got.bytes += n as u64;
                    if got.bytes - last_told >= 8 << 20 {
                        last_told = got.bytes;
                        progress(got.bytes);
                    }
                }
                let mut digest = [0u8; 32];
                r.read_exact(&mut digest).map_err(XferError::Stream)?;
                let mine = h.finalize();
                if mine.as_slice() != digest {
                    return Err(XferError::Mismatch {
                        path: e.path.clone(),
                        reason: "its bytes do not match the sender's sha256 (damaged on the way)".into(),
                    });
                }
                e.sha256 = Some(hex::encode(mine));
                check(&e).map_err(|reason| XferError::Mismatch {
                    path: e.path.clone(),
                    reason,
                })?;
                std::os::unix::fs::fchown(&f, Some(e.uid), Some(e.gid)).map_err(io("chown", &p))?;
                f.set_permissions(std::fs::Permissions::from_mode(e.mode))
                    .map_err(io("chmod", &p))?;
                files.insert(e.path.clone(), e.sha256.clone());
            }
            (k, _) => {
                check(&e).map_err(|reason| XferError::Mismatch {
                    path: e.path.clone(),
                    reason,
                })?;
                match k {
                    EntryKind::Dir => {
                        std::fs::create_dir(&p).map_err(io("create directory", &p))?;
                        std::os::unix::fs::chown(&p, Some(e.uid), Some(e.gid)).map_err(io("chown", &p))?;
                        dirs.insert(e.path.clone());
                        dir_modes.push((p, e.mode));
                    }
                    EntryKind::Symlink => {
                        let t = e
                            .target
                            .as_deref()
                            .ok_or_else(|| XferError::Bad(format!("{}: a symlink without target", e.path)))?;
                        std::os::unix::fs::symlink(t, &p).map_err(io("symlink", &p))?;
                        std::os::unix::fs::lchown(&p, Some(e.uid), Some(e.gid)).map_err(io("chown", &p))?;
                    }
                    other => {
                        let t = match other {
                            EntryKind::Char => libc::S_IFCHR,
                            EntryKind::Block => libc::S_IFBLK,
                            EntryKind::Fifo => libc::S_IFIFO,
                            _ => libc::S_IFSOCK,
                        };
                        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
                            .map_err(|_| XferError::Bad(format!("refused path {:?}", e.path)))?;
                        // SAFETY: a NUL-terminated path inside our own staging directory.
                        let rc = unsafe { libc::mknod(c.as_ptr(), t | (e.mode & 0o777), e.rdev as libc::dev_t) };
                        if rc != 0 {
                            return Err(io("mknod", &p)(std::io::Error::last_os_error()));
                        }
                        std::os::unix::fs::chown(&p, Some(e.uid), Some(e.gid)).map_err(io("chown", &p))?;
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode))
                            .map_err(io("chmod", &p))?;
                    }
                }
            }
        }
        got.items += 1;
    }
    // Directory modes last (a read-only directory would refuse its own entries).
    for (p, mode) in dir_modes.into_iter().rev() {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", &p))?;
    }
    progress(got.bytes);
    Ok(got)
}

use std::os::unix::fs::OpenOptionsExt;

/// `syncfs` of the file system holding `dir` (a received tree is made durable at once).
pub fn sync_fs(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(io("open", dir))?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)) } != 0 {
        return Err(io("sync", dir)(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("a/b")).unwrap();
        std::fs::write(p.join("a/b/f"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(p.join("a/g"), b"hello").unwrap();
        std::fs::hard_link(p.join("a/g"), p.join("z")).unwrap();
        std::os::unix::fs::symlink("a/g", p.join("s")).unwrap();
        std::fs::set_permissions(p.join("a/b"), std::fs::Permissions::from_mode(0o555)).unwrap();
        d
    }

    fn stream(root: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        TreeReader::new(root, b"{\"h\":1}", list(root).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn a_tree_travels_whole_with_links_and_modes() {
        let src = tree();
        let bytes = stream(src.path());
        let dst = tempfile::tempdir().unwrap();
        let mut r = &bytes[..];
        assert_eq!(read_header(&mut r).unwrap(), b"{\"h\":1}");
        let mut seen = Vec::new();
        let got = receive(
            &mut r,
            dst.path(),
            &mut |e| {
                seen.push(e.path.clone());
                Ok(())
            },
            &mut |_| {},
        )
        .unwrap();
        assert!(r.is_empty());
        assert_eq!(seen, ["a", "a/b", "a/b/f", "a/g", "s", "z"]);
        assert_eq!(got.items, 6);
        assert_eq!(got.bytes, (3 << 20) + 5);
        let d = dst.path();
        assert_eq!(std::fs::read(d.join("a/b/f")).unwrap(), vec![7u8; 3 << 20]);
        assert_eq!(
            std::fs::metadata(d.join("z")).unwrap().ino(),
            std::fs::metadata(d.join("a/g")).unwrap().ino()
        );
        assert_eq!(std::fs::read_link(d.join("s")).unwrap(), Path::new("a/g"));
        assert_eq!(std::fs::metadata(d.join("a/b")).unwrap().mode() & 0o777, 0o555);
        // The receiver's list is the same as the sender's.
        let a: Vec<_> = list(src.path())
            .unwrap()
            .into_iter()
            .map(|i| (i.entry.path, i.link))
            .collect();
        let b: Vec<_> = list(d).unwrap().into_iter().map(|i| (i.entry.path, i.link)).collect();
        assert_eq!(a, b);
        std::fs::set_permissions(src.path().join("a/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d.join("a/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn damaged_bytes_and_refused_items_name_the_file() {
        let src = tree();
        std::fs::set_permissions(src.path().join("a/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut bytes = stream(src.path());
        // Flip a byte inside a/b/f's contents (the large run of 7s).
        let at = bytes.windows(64).position(|w| w.iter().all(|b| *b == 7)).unwrap() + 1000;
        bytes[at] ^= 1;
        let dst = tempfile::tempdir().unwrap();
        let mut r = &bytes[..];
        read_header(&mut r).unwrap();
        match receive(&mut r, dst.path(), &mut |_| Ok(()), &mut |_| {}) {
            Err(XferError::Mismatch { path, .. }) => assert_eq!(path, "a/b/f"),
            other => panic!("{other:?}"),
        }
        // The caller's check refuses an item: the error names it.
        let bytes = stream(src.path());
        let dst = tempfile::tempdir().unwrap();
        let mut r = &bytes[..];
        read_header(&mut r).unwrap();
        let e = receive(
            &mut r,
            dst.path(),
            &mut |e| {
                if e.path == "a/g" {
                    Err("not in the manifest".into())
                } else {
                    Ok(())
                }
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "file a/g: not in the manifest");
    }

    #[test]
    fn hostile_paths_and_cut_streams_are_refused() {
        for p in ["../x", "/etc/passwd", "a/../../x", "", "./a"] {
            assert!(checked_path(p).is_err(), "{p}");
        }
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&frame(b"{}"));
        let it = Item {
            entry: Entry {
                path: "../evil".into(),
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                sha256: None,
                target: None,
                rdev: 0,
            },
            link: None,
        };
        bad.extend_from_slice(&frame(&serde_json::to_vec(&it).unwrap()));
        let dst = tempfile::tempdir().unwrap();
        let mut r = &bad[..];
        read_header(&mut r).unwrap();
        assert!(matches!(
            receive(&mut r, dst.path(), &mut |_| Ok(()), &mut |_| {}),
            Err(XferError::Bad(_))
        ));
        // A stream cut short is an error, never a complete tree.
        let src = tree();
        std::fs::set_permissions(src.path().join("a/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bytes = stream(src.path());
        let cut = &bytes[..bytes.len() - 10];
        let dst = tempfile::tempdir().unwrap();
        let mut r = cut;
        read_header(&mut r).unwrap();
        assert!(matches!(
            receive(&mut r, dst.path(), &mut |_| Ok(()), &mut |_| {}),
            Err(XferError::Stream(_))
        ));
        assert!(read_header(&mut &b"VSLTREE\x07"[..])
            .unwrap_err()
            .to_string()
            .contains("version 7"));
    }
}
