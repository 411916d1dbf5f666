//! The serialized form of a [`ScrubTree`], for sending it to another node:
//!
//! ```text
//! "VSLSCRB1" | version u32 | seq u64 | template (flag u8, bytes) | nodes u32
//!   | per node, parent first: parent u32 (root: u32::MAX) | name bytes | entry
//!   | crc32 of everything before
//! ```
//!
//! Entries are in their canonical encoding (`encode_entry`, what the hash covers). Node
//! hashes are not sent: the receiver recomputes them, so a tree is only ever compared by
//! hashes of what it states.

use super::{encode_entry, seal, Content, Entry, Hash, Meta, Node, ScrubError, ScrubTree, SCRUB_VERSION};
use crate::codec::{Dec, DecodeError, Enc};
use crate::tx::FileKind;

const MAGIC: &[u8; 8] = b"VSLSCRB1";
const NO_PARENT: u32 = u32::MAX;
/// Fewest bytes a node takes (parent, name length, entry tag), to bound allocation.
const MIN_NODE_BYTES: usize = 9;

impl ScrubTree {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut parent = vec![NO_PARENT; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &c in &n.children {
                if let Some(p) = parent.get_mut(c as usize) {
                    *p = i as u32;
                }
            }
        }
        let mut e = Enc::default();
        e.0.extend_from_slice(MAGIC);
        e.u32(SCRUB_VERSION).u64(self.seq);
        match &self.template {
            Some(t) => e.u8(1).bytes(t.as_bytes()),
            None => e.u8(0),
        };
        e.u32(self.nodes.len() as u32);
        for (n, p) in self.nodes.iter().zip(parent) {
            e.u32(p).bytes(&n.name);
            encode_entry(&mut e, &n.entry);
        }
        let crc = crc32fast::hash(&e.0);
        e.u32(crc);
        e.0
    }

    /// Decode and check a tree another node sent (never panics on bad bytes).
    pub fn from_bytes(b: &[u8]) -> Result<ScrubTree, ScrubError> {
        let bad = |s: String| ScrubError::Malformed(s);
        if b.len() < MAGIC.len() + 8 || &b[..MAGIC.len()] != MAGIC {
            return Err(bad("it does not start with the scrub tree's magic".into()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(bad("checksum mismatch".into()));
        }
        let mut d = Dec::new(&body[MAGIC.len()..]);
        let version = d.u32()?;
        if version != SCRUB_VERSION {
            return Err(ScrubError::Version { got: version });
        }
        let seq = d.u64()?;
        let template = match d.u8()? {
            0 => None,
            1 => Some(String::from_utf8(d.bytes()?).map_err(|_| bad("template id is not UTF-8".into()))?),
            v => {
                return Err(DecodeError::Unknown {
                    what: "template flag",
                    value: v as u64,
                }
                .into())
            }
        };
        let count = d.u32()? as usize;
        if count == 0 {
            return Err(bad("no root".into()));
        }
        let mut nodes: Vec<Node> = Vec::with_capacity(count.min(body.len() / MIN_NODE_BYTES));
        for i in 0..count {
            let parent = d.u32()?;
            let name = d.bytes()?;
            let entry = decode_entry(&mut d)?;
            if i == 0 {
                if parent != NO_PARENT || !name.is_empty() {
                    return Err(bad("the first node is not the root".into()));
                }
            } else {
                let p = nodes
                    .get(parent as usize)
                    .ok_or_else(|| bad(format!("node {i} names parent {parent}, which does not come before it")))?;
                if !matches!(&p.entry, Entry::Private(m) if m.kind == FileKind::Dir) {
                    return Err(bad(format!("node {i} sits in node {parent}, which is not a directory")));
                }
                if name.is_empty() || name.contains(&b'/') {
                    return Err(bad(format!("node {i} has an invalid name")));
                }
                if let Some(&last) = p.children.last() {
                    if nodes[last as usize].name >= name {
                        return Err(bad(format!("node {i}: names of a directory out of order or repeated")));
                    }
                }
                nodes[parent as usize].children.push(i as u32);
            }
            nodes.push(Node {
                name,
                entry,
                children: Vec::new(),
                hash: Hash::default(),
            });
        }
        d.finish()?;
        seal(&mut nodes);
        Ok(ScrubTree { seq, template, nodes })
    }
}

fn hash(d: &mut Dec) -> Result<Hash, DecodeError> {
    let mut h = Hash::default();
    for c in h.chunks_mut(8) {
        c.copy_from_slice(&d.u64()?.to_le_bytes());
    }
    Ok(h)
}

fn decode_entry(d: &mut Dec) -> Result<Entry, ScrubError> {
    Ok(match d.u8()? {
        1 => {
            let (ino, kind) = (d.u64()?, FileKind::from_code(d.u8()?)?);
            let (mode, uid, gid, rdev, size, nlink) = (d.u32()?, d.u32()?, d.u32()?, d.u64()?, d.u64()?, d.u32()?);
            let (atime_ns, mtime_ns, ctime_ns) = (d.i64()?, d.i64()?, d.i64()?);
            let (target, lower) = (d.bytes()?, d.opt_u64()?);
            let n = d.u32()?;
            let mut xattrs = Vec::new();
            for _ in 0..n {
                xattrs.push((d.bytes()?, hash(d)?));
            }
            let content = match d.u8()? {
                0 => Content::None,
                2 => Content::Missing,
                3 => Content::Data {
                    len: d.u64()?,
                    sha256: hash(d)?,
                },
                1 => return Err(ScrubError::Malformed(format!("inode {ino}: contents were not hashed"))),
                v => {
                    return Err(DecodeError::Unknown {
                        what: "content tag",
                        value: v as u64,
                    }
                    .into())
                }
            };
            Entry::Private(Meta {
                ino,
                kind,
                mode,
                uid,
                gid,
                rdev,
                size,
                nlink,
                atime_ns,
                mtime_ns,
                ctime_ns,
                target,
                lower,
                xattrs,
                content,
            })
        }
        2 => Entry::Whiteout,
        3 => Entry::Lower(d.u64()?),
        4 => Entry::Dangling(d.u64()?),
        v => {
            return Err(DecodeError::Unknown {
                what: "entry tag",
                value: v as u64,
            }
            .into())
        }
    })
}
