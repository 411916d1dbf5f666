//! Scrub: a hash tree (Merkle tree) over a volume as this copy holds it, and the
//! comparison of two copies' trees (`vessel ve scrub`, the replicas' convergence check).
//!
//! One node per path of the VE's visible tree, plus the whiteouts the volume keeps:
//!
//! - a private inode: kind, inode number, mode, uid, gid, size, rdev, link count, atime,
//!   mtime, ctime, symlink target, template reference (`lower`), xattrs (name and SHA-256
//!   of the value) and, for a regular file, the SHA-256 of its contents (the bytes the VE
//!   reads: `sha256sum` of the file inside the VE gives the same digest);
//! - a whiteout (a deleted template entry);
//! - a template entry never copied up: "template entry #index" only. Every node holds the
//!   same content-addressed template (its id is in the tree's header) and indexes it the
//!   same way, so the index names the entry and its contents; a template directory is not
//!   descended into.
//!
//! A node's hash is SHA-256 over its entry's canonical encoding and its children's
//! (name, hash) in name order; the root's hash names the whole state, beside the applied
//! seq it was taken at (two copies compare at the same seq).
//!
//! What is the same on every copy by design, and so hashed as is:
//! - inode numbers: every private number is chosen by the writer and carried in the
//!   transaction (`Create`/`CopyUp`), so hard links are identified by the number;
//! - all three times: mtime, ctime and atime all come from transactions (the tx time, or a
//!   `SetAttr`), reads do not move atime (no transaction), so they are replicated state.
//!   If atime ever stops being replicated, drop it here and raise [`SCRUB_VERSION`].
//!
//! Not hashed: the template's own files (shared and read-only; check them with the
//! template's id), data past a file's size (invisible), the allocation (holes read as
//! zeros either way), open-but-unlinked files (not in the tree).
//!
//! Cost: the metadata is taken under the volume's lock (a walk of the tree in memory);
//! contents are read afterwards without it, through one 1 MiB buffer. A copy that changed
//! a hashed file's contents meanwhile is detected from its log ([`ScrubError::Changed`]):
//! scrub again, or take the tree while the copy applies nothing.

use crate::codec::{DecodeError, Enc};
use crate::lower::Lower;
use crate::tree::{Tree, ROOT, WHITEOUT};
use crate::tx::{FileKind, Ino};
use crate::volume::{Volume, VolumeError};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

mod compare;
mod wire;

#[cfg(test)]
mod tests;

pub use compare::{compare, Difference, Side, What};

/// Version of the hash tree (what is hashed and how) and of its serialized form.
pub const SCRUB_VERSION: u32 = 1;
/// Bytes read from a data file at a time.
const READ_BUF: usize = 1 << 20;
/// A progress report at least this often within one large file.
const PROGRESS_BYTES: u64 = 64 << 20;

pub type Hash = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    #[error("volume '{volume}': read the contents of inode {ino}: {source}; check the volume's disk")]
    Read {
        volume: String,
        ino: Ino,
        source: std::io::Error,
    },
    #[error(
        "volume '{volume}': file contents changed while they were hashed (seq {from} to {to}); \
         scrub again, or take the tree while the copy applies nothing"
    )]
    Changed { volume: String, from: u64, to: u64 },
    #[error("volume '{volume}': the scrub was stopped (its VE stopped or moved); scrub again")]
    Stopped { volume: String },
    #[error("volume '{volume}': read its log after the scrub: {source}")]
    Log { volume: String, source: Box<VolumeError> },
    #[error("volume '{volume}': {source}")]
    Volume { volume: String, source: Box<VolumeError> },
    #[error("scrub tree is damaged: {0}; take it again on the node that sent it")]
    Decode(#[from] DecodeError),
    #[error("scrub tree has format version {got} (this build reads {SCRUB_VERSION}); scrub with nodes of one version")]
    Version { got: u32 },
    #[error("scrub tree is malformed: {0}; take it again on the node that sent it")]
    Malformed(String),
}

/// What a path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Private(Meta),
    /// A deleted template entry.
    Whiteout,
    /// A template entry as the template has it (never copied up): its index.
    Lower(u64),
    /// A directory entry that names an inode the tree does not have (a damaged tree).
    Dangling(Ino),
}

/// A private inode's replicated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub ino: Ino,
    pub kind: FileKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub target: Vec<u8>,
    /// The template entry it was copied up from.
    pub lower: Option<u64>,
    /// Name and SHA-256 of the value, by name.
    pub xattrs: Vec<(Vec<u8>, Hash)>,
    pub content: Content,
}

/// The contents of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Not a regular file.
    None,
    /// Not hashed yet (only inside [`hash_tree`]).
    Pending,
    /// The data file is missing.
    Missing,
    /// SHA-256 of the first `len` bytes of the data file; `len` < size: the data file is
    /// shorter than the file.
    Data { len: u64, sha256: Hash },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Empty for the root.
    pub name: Vec<u8>,
    pub entry: Entry,
    /// Indices of the children, in name order (directories only).
    pub children: Vec<u32>,
    pub hash: Hash,
}

/// A volume's hash tree as of `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubTree {
    /// Seq of the last transaction the tree reflects.
    pub seq: u64,
    /// The template (content-addressed id) under the volume.
    pub template: Option<String>,
    /// `nodes[0]` is the root; a parent comes before its children.
    pub nodes: Vec<Node>,
}

impl ScrubTree {
    /// The hash that names the whole state.
    pub fn root_hash(&self) -> Hash {
        self.nodes.first().map(|n| n.hash).unwrap_or_default()
    }

    pub fn root_hex(&self) -> String {
        hex(&self.root_hash())
    }

    /// Regular files and their bytes (private files only).
    pub fn files(&self) -> (u64, u64) {
        self.nodes.iter().fold((0, 0), |(f, b), n| match &n.entry {
            Entry::Private(m) if m.kind == FileKind::File => (f + 1, b + m.size),
            _ => (f, b),
        })
    }
}

/// How far a scrub got: files and bytes hashed of the totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub files: u64,
    pub bytes: u64,
    pub total_files: u64,
    pub total_bytes: u64,
}

pub fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A regular file whose contents are to be hashed: node index, inode, size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileJob {
    pub node: u32,
    pub ino: Ino,
    pub size: u64,
}

fn meta_of(ino: Ino, i: &crate::tree::Inode) -> Meta {
    Meta {
        ino,
        kind: i.kind,
        mode: i.mode,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        size: i.size,
        nlink: i.nlink,
        atime_ns: i.atime_ns,
        mtime_ns: i.mtime_ns,
        ctime_ns: i.ctime_ns,
        target: i.target.clone(),
        lower: i.lower,
        xattrs: i
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone(), Sha256::digest(v).into()))
            .collect(),
        content: if i.kind == FileKind::File {
            Content::Pending
        } else {
            Content::None
        },
    }
}

/// The tree's nodes (hashes not yet computed, contents `Pending`) and the files whose
/// contents are to be hashed. Pure: the tree and the template's index only.
pub fn skeleton(tree: &Tree, lower: Option<&Lower>) -> (Vec<Node>, Vec<FileJob>) {
    let mut nodes = Vec::new();
    let mut jobs = Vec::new();
    let root = match tree.inodes.get(&ROOT) {
        Some(i) => Entry::Private(meta_of(ROOT, i)),
        None => Entry::Dangling(ROOT),
    };
    nodes.push(Node {
        name: Vec::new(),
        entry: root,
        children: Vec::new(),
        hash: Hash::default(),
    });
    // Private directories still to expand: (node index, inode).
    let mut stack: Vec<(u32, Ino)> = vec![(0, ROOT)];
    while let Some((at, dir)) = stack.pop() {
        let Some(d) = tree.inodes.get(&dir) else { continue };
        let mut kids: BTreeMap<&[u8], Entry> = BTreeMap::new();
        for (name, &t) in &d.entries {
            let e = if t == WHITEOUT {
                Entry::Whiteout
            } else {
                match tree.inodes.get(&t) {
                    Some(i) => Entry::Private(meta_of(t, i)),
                    None => Entry::Dangling(t),
                }
            };
            kids.insert(name, e);
        }
        if let (Some(l), Some(low)) = (d.lower, lower) {
            for (name, c) in low.children(l) {
                kids.entry(name).or_insert(Entry::Lower(c as u64));
            }
        }
        let mut children = Vec::with_capacity(kids.len());
        for (name, entry) in kids {
            let idx = nodes.len() as u32;
            if let Entry::Private(m) = &entry {
                match m.kind {
                    FileKind::Dir => stack.push((idx, m.ino)),
                    FileKind::File => jobs.push(FileJob {
                        node: idx,
                        ino: m.ino,
                        size: m.size,
                    }),
                    _ => {}
                }
            }
            children.push(idx);
            nodes.push(Node {
                name: name.to_vec(),
                entry,
                children: Vec::new(),
                hash: Hash::default(),
            });
        }
        nodes[at as usize].children = children;
    }
    (nodes, jobs)
}

/// The canonical encoding of an entry (what its hash covers; also its wire form).
pub(crate) fn encode_entry(e: &mut Enc, entry: &Entry) {
    match entry {
        Entry::Private(m) => {
            e.u8(1)
                .u64(m.ino)
                .u8(m.kind.code())
                .u32(m.mode)
                .u32(m.uid)
                .u32(m.gid)
                .u64(m.rdev)
                .u64(m.size)
                .u32(m.nlink)
                .i64(m.atime_ns)
                .i64(m.mtime_ns)
                .i64(m.ctime_ns)
                .bytes(&m.target)
                .opt_u64(m.lower)
                .u32(m.xattrs.len() as u32);
            for (k, h) in &m.xattrs {
                e.bytes(k);
                e.0.extend_from_slice(h);
            }
            match m.content {
                Content::None => e.u8(0),
                Content::Pending => e.u8(1),
                Content::Missing => e.u8(2),
                Content::Data { len, sha256 } => {
                    e.u8(3).u64(len);
                    e.0.extend_from_slice(&sha256);
                    e
                }
            };
        }
        Entry::Whiteout => {
            e.u8(2);
        }
        Entry::Lower(idx) => {
            e.u8(3).u64(*idx);
        }
        Entry::Dangling(ino) => {
            e.u8(4).u64(*ino);
        }
    }
}

/// Compute every node's hash, children first (they come after their parent).
pub(crate) fn seal(nodes: &mut [Node]) {
    for i in (0..nodes.len()).rev() {
        let mut e = Enc::default();
        e.0.extend_from_slice(b"vessel-scrub-node-v1");
        encode_entry(&mut e, &nodes[i].entry);
        e.u32(nodes[i].children.len() as u32);
        for &c in &nodes[i].children {
            let c = &nodes[c as usize];
            e.bytes(&c.name);
            e.0.extend_from_slice(&c.hash);
        }
        nodes[i].hash = Sha256::digest(&e.0).into();
    }
}

/// Hash a volume's tree as it is now: metadata under the volume's lock, contents after it
/// (streamed, one 1 MiB buffer), reporting progress after every file and every 64 MiB.
pub fn hash_tree(vol: &Volume, progress: &mut dyn FnMut(Progress)) -> Result<ScrubTree, ScrubError> {
    hash_tree_or_stop(vol, progress, &|| false)
}

/// [`hash_tree`] that gives up ([`ScrubError::Stopped`]) when `stop` says so, asked before
/// each file's contents: a background scrub must not keep a volume open that its VE needs
/// again (a restart opens the volume alone).
pub fn hash_tree_or_stop(
    vol: &Volume,
    progress: &mut dyn FnMut(Progress),
    stop: &dyn Fn() -> bool,
) -> Result<ScrubTree, ScrubError> {
    let volume = vol.name().to_string();
    let vol_err = |source: VolumeError| ScrubError::Volume {
        volume: volume.clone(),
        source: Box::new(source),
    };
    let template = Volume::read_meta(vol.dir()).map_err(vol_err)?.template;
    // Held throughout: compaction must not drop the log the drift check below reads.
    let _history = vol.history_guard();
    let (seq, mut nodes, mut jobs) = vol.with_tree(|t, l| {
        let (n, j) = skeleton(t, l);
        (t.applied, n, j)
    });
    // In inode order: data files were made in that order, so mostly in disk order too
    // (fewer seeks when they are not cached).
    jobs.sort_by_key(|j| j.ino);
    // Contents once per inode (hard links share them).
    let mut done: HashMap<Ino, Content> = HashMap::new();
    let mut p = Progress::default();
    for j in &jobs {
        if done.insert(j.ino, Content::Pending).is_none() {
            p.total_files += 1;
            p.total_bytes += j.size;
        }
    }
    progress(p);
    let mut buf = vec![0u8; READ_BUF];
    for job in &jobs {
        if stop() {
            return Err(ScrubError::Stopped { volume });
        }
        if let Some(c) = done.get(&job.ino).filter(|c| **c != Content::Pending) {
            if let Entry::Private(m) = &mut nodes[job.node as usize].entry {
                m.content = *c;
            }
            continue;
        }
        let content = match vol.open_data(job.ino) {
            Ok(f) => hash_contents(f, job.size, &mut buf, &mut |n| {
                p.bytes += n;
                progress(p)
            })
            .map_err(|source| ScrubError::Read {
                volume: volume.clone(),
                ino: job.ino,
                source,
            })?,
            Err(libc::ENOENT) => Content::Missing,
            Err(e) => {
                return Err(ScrubError::Read {
                    volume,
                    ino: job.ino,
                    source: std::io::Error::from_raw_os_error(e),
                })
            }
        };
        if let Entry::Private(m) = &mut nodes[job.node as usize].entry {
            m.content = content;
        }
        done.insert(job.ino, content);
        p.files += 1;
        progress(p);
    }
    let hashed: HashSet<Ino> = done.into_keys().collect();
    // A hashed file freed meanwhile may have lost its data file before it was opened, or
    // been written as an open unlinked file (which makes no transaction).
    let (now, freed) = vol.with_tree(|t, _| (t.applied, hashed.iter().any(|i| !t.inodes.contains_key(i))));
    if now != seq {
        let changed = freed
            || contents_changed(vol, seq, now, &hashed).map_err(|source| ScrubError::Log {
                volume: volume.clone(),
                source: Box::new(source),
            })?;
        if changed {
            return Err(ScrubError::Changed {
                volume,
                from: seq,
                to: now,
            });
        }
    }
    seal(&mut nodes);
    Ok(ScrubTree { seq, template, nodes })
}

/// Whether transactions `from+1..=to` changed the contents of one of the `hashed` files
/// (or the log no longer reaches that far, which proves nothing).
fn contents_changed(vol: &Volume, from: u64, to: u64, hashed: &HashSet<Ino>) -> Result<bool, VolumeError> {
    let mut changed = false;
    let mut seen = from;
    vol.log_reader()?.for_each::<VolumeError>(from + 1, to, |tx, _| {
        seen = tx.seq;
        changed = crate::apply::data_op_ino(&tx.op).is_some_and(|i| hashed.contains(&i));
        Ok(!changed)
    })?;
    // A log that no longer reaches `to` proves nothing.
    Ok(changed || seen < to)
}

/// SHA-256 of the first `size` bytes of `f` (fewer if it is shorter), read through `buf`;
/// `read(n)` after each stretch of at least [`PROGRESS_BYTES`] and at the end.
pub fn hash_contents(
    mut f: impl Read,
    size: u64,
    buf: &mut [u8],
    read: &mut dyn FnMut(u64),
) -> std::io::Result<Content> {
    let mut h = Sha256::new();
    let (mut len, mut unreported) = (0u64, 0u64);
    while len < size {
        let want = buf.len().min((size - len).min(usize::MAX as u64) as usize);
        let n = match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        len += n as u64;
        unreported += n as u64;
        if unreported >= PROGRESS_BYTES {
            read(unreported);
            unreported = 0;
        }
    }
    if unreported > 0 {
        read(unreported);
    }
    Ok(Content::Data {
        len,
        sha256: h.finalize().into(),
    })
}
