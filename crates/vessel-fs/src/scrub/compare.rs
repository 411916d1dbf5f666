//! Comparing two copies' hash trees: top-down, descending only where hashes differ, so
//! equal copies cost one comparison and a difference costs its depth times its breadth.
//! Pure.

use super::{Content, Entry, Meta, ScrubTree};
use crate::tx::FileKind;
use std::collections::BTreeMap;
use std::fmt;

/// Which of the two compared trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "a",
            Side::B => "b",
        })
    }
}

/// What differs at a path (a's value first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    Seq {
        a: u64,
        b: u64,
    },
    Template {
        a: Option<String>,
        b: Option<String>,
    },
    /// The path exists on one side only; `entry` says what it is there.
    OnlyOn {
        side: Side,
        entry: String,
    },
    /// Different kinds of entry (file vs directory, whiteout vs template entry, ...).
    Entry {
        a: String,
        b: String,
    },
    Ino {
        a: u64,
        b: u64,
    },
    Mode {
        a: u32,
        b: u32,
    },
    Uid {
        a: u32,
        b: u32,
    },
    Gid {
        a: u32,
        b: u32,
    },
    Rdev {
        a: u64,
        b: u64,
    },
    Size {
        a: u64,
        b: u64,
    },
    Nlink {
        a: u32,
        b: u32,
    },
    Atime {
        a: i64,
        b: i64,
    },
    Mtime {
        a: i64,
        b: i64,
    },
    Ctime {
        a: i64,
        b: i64,
    },
    Target {
        a: Vec<u8>,
        b: Vec<u8>,
    },
    Lower {
        a: Option<u64>,
        b: Option<u64>,
    },
    /// An xattr on one side only (`only_on`), or with different values (`None`).
    Xattr {
        name: Vec<u8>,
        only_on: Option<Side>,
    },
    Content {
        a: Content,
        b: Content,
    },
    /// The hashes differ and nothing above says why (a damaged tree).
    Hash,
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            What::Seq { a, b } => write!(f, "taken at seq {a} vs {b}"),
            What::Template { a, b } => write!(f, "template {a:?} vs {b:?}"),
            What::OnlyOn { side, entry } => write!(f, "only on {side} ({entry})"),
            What::Entry { a, b } => write!(f, "{a} vs {b}"),
            What::Ino { a, b } => write!(f, "inode {a} vs {b}"),
            What::Mode { a, b } => write!(f, "mode {a:04o} vs {b:04o}"),
            What::Uid { a, b } => write!(f, "uid {a} vs {b}"),
            What::Gid { a, b } => write!(f, "gid {a} vs {b}"),
            What::Rdev { a, b } => write!(f, "rdev {a:#x} vs {b:#x}"),
            What::Size { a, b } => write!(f, "size {a} vs {b}"),
            What::Nlink { a, b } => write!(f, "links {a} vs {b}"),
            What::Atime { a, b } => write!(f, "atime {a} vs {b} ns"),
            What::Mtime { a, b } => write!(f, "mtime {a} vs {b} ns"),
            What::Ctime { a, b } => write!(f, "ctime {a} vs {b} ns"),
            What::Target { a, b } => write!(f, "symlink target {:?} vs {:?}", s(a), s(b)),
            What::Lower { a, b } => write!(f, "copied up from template entry {a:?} vs {b:?}"),
            What::Xattr {
                name,
                only_on: Some(side),
            } => write!(f, "xattr {} only on {side}", s(name)),
            What::Xattr { name, only_on: None } => write!(f, "xattr {} differs", s(name)),
            What::Content { a, b } => match (a, b) {
                (Content::Missing, _) => f.write_str("data file missing on a"),
                (_, Content::Missing) => f.write_str("data file missing on b"),
                (Content::Data { len: la, .. }, Content::Data { len: lb, .. }) if la != lb => {
                    write!(f, "data file holds {la} vs {lb} bytes")
                }
                _ => f.write_str("content differs"),
            },
            What::Hash => f.write_str("hashes differ"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Path in the VE ("/" for the root).
    pub path: String,
    pub what: What,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.what)
    }
}

fn kind_name(k: FileKind) -> &'static str {
    match k {
        FileKind::File => "file",
        FileKind::Dir => "directory",
        FileKind::Symlink => "symlink",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::CharDev => "character device",
        FileKind::BlockDev => "block device",
    }
}

/// What an entry is, for people.
pub fn describe(e: &Entry) -> String {
    match e {
        Entry::Private(m) => kind_name(m.kind).to_string(),
        Entry::Whiteout => "whiteout".into(),
        Entry::Lower(i) => format!("template entry #{i}"),
        Entry::Dangling(i) => format!("entry naming missing inode {i}"),
    }
}

fn meta_diffs(a: &Meta, b: &Meta, out: &mut Vec<What>) {
    macro_rules! field {
        ($f:ident, $w:ident) => {
            if a.$f != b.$f {
                out.push(What::$w {
                    a: a.$f.clone(),
                    b: b.$f.clone(),
                });
            }
        };
    }
    field!(ino, Ino);
    field!(mode, Mode);
    field!(uid, Uid);
    field!(gid, Gid);
    field!(rdev, Rdev);
    field!(size, Size);
    field!(nlink, Nlink);
    field!(atime_ns, Atime);
    field!(mtime_ns, Mtime);
    field!(ctime_ns, Ctime);
    field!(target, Target);
    field!(lower, Lower);
    let xa: BTreeMap<_, _> = a.xattrs.iter().map(|(k, v)| (k, v)).collect();
    let xb: BTreeMap<_, _> = b.xattrs.iter().map(|(k, v)| (k, v)).collect();
    for (k, v) in &xa {
        match xb.get(k) {
            None => out.push(What::Xattr {
                name: k.to_vec(),
                only_on: Some(Side::A),
            }),
            Some(w) if w != v => out.push(What::Xattr {
                name: k.to_vec(),
                only_on: None,
            }),
            _ => {}
        }
    }
    for k in xb.keys().filter(|k| !xa.contains_key(*k)) {
        out.push(What::Xattr {
            name: k.to_vec(),
            only_on: Some(Side::B),
        });
    }
    field!(content, Content);
}

/// What differs between two entries at one path.
fn entry_diffs(a: &Entry, b: &Entry) -> Vec<What> {
    let mut out = Vec::new();
    match (a, b) {
        (Entry::Private(x), Entry::Private(y)) if x.kind == y.kind => meta_diffs(x, y, &mut out),
        (x, y) if x == y => {}
        (x, y) => out.push(What::Entry {
            a: describe(x),
            b: describe(y),
        }),
    }
    out
}

fn name(t: &ScrubTree, i: u32) -> &[u8] {
    t.nodes.get(i as usize).map(|n| n.name.as_slice()).unwrap_or_default()
}

fn is_dir(e: &Entry) -> bool {
    matches!(e, Entry::Private(m) if m.kind == FileKind::Dir)
}

fn child_path(parent: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Every difference between two trees, in path order. Subtrees with equal hashes are not
/// visited. Empty: the copies are the same.
pub fn compare(a: &ScrubTree, b: &ScrubTree) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut at = |path: &str, what: What| {
        out.push(Difference {
            path: path.to_string(),
            what,
        })
    };
    if a.seq != b.seq {
        at("/", What::Seq { a: a.seq, b: b.seq });
    }
    if a.template != b.template {
        at(
            "/",
            What::Template {
                a: a.template.clone(),
                b: b.template.clone(),
            },
        );
    }
    if a.nodes.is_empty() || b.nodes.is_empty() {
        if a.nodes.len() != b.nodes.len() {
            at("/", What::Hash);
        }
        return out;
    }
    let mut stack: Vec<(u32, u32, String)> = vec![(0, 0, "/".into())];
    while let Some((ia, ib, path)) = stack.pop() {
        let (Some(na), Some(nb)) = (a.nodes.get(ia as usize), b.nodes.get(ib as usize)) else {
            continue;
        };
        if na.hash == nb.hash {
            continue;
        }
        let mut found = false;
        for w in entry_diffs(&na.entry, &nb.entry) {
            found = true;
            at(&path, w);
        }
        if !(is_dir(&na.entry) && is_dir(&nb.entry)) {
            if !found {
                at(&path, What::Hash);
            }
            continue;
        }
        let entry = |t: &ScrubTree, i: u32| t.nodes.get(i as usize).map(|n| describe(&n.entry)).unwrap_or_default();
        let (ca, cb) = (&na.children, &nb.children);
        let (mut i, mut j) = (0, 0);
        while i < ca.len() || j < cb.len() {
            let ord = match (ca.get(i), cb.get(j)) {
                (Some(&x), Some(&y)) => name(a, x).cmp(name(b, y)),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    found = true;
                    let side = What::OnlyOn {
                        side: Side::A,
                        entry: entry(a, ca[i]),
                    };
                    at(&child_path(&path, name(a, ca[i])), side);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    found = true;
                    let side = What::OnlyOn {
                        side: Side::B,
                        entry: entry(b, cb[j]),
                    };
                    at(&child_path(&path, name(b, cb[j])), side);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let hash = |t: &ScrubTree, i: u32| t.nodes.get(i as usize).map(|n| n.hash);
                    if hash(a, ca[i]) != hash(b, cb[j]) {
                        found = true;
                        stack.push((ca[i], cb[j], child_path(&path, name(a, ca[i]))));
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        if !found {
            at(&path, What::Hash);
        }
    }
    out.sort_by(|x, y| x.path.cmp(&y.path));
    out
}
