//! Transactions: one atomic change to a volume, referring to files by stable ids (never by
//! path, so a rename does not rewrite history). Format version [`TX_VERSION`]:
//!
//! ```text
//! body = epoch u64 | seq u64 | time_ns i64 | op u8 | op fields (little-endian;
//!        byte strings as u32 length + bytes; options as u8 tag + value)
//! ```
//! The log frames each body with its length and CRC (see `txlog`).

use crate::codec::{Dec, DecodeError, Enc};

/// Version of the transaction body format.
pub const TX_VERSION: u32 = 1;

/// A stable file id within a volume (an inode number that never changes or gets reused
/// while the volume lives).
pub type Ino = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
            FileKind::CharDev => 6,
            FileKind::BlockDev => 7,
        }
    }
    pub(crate) fn from_code(c: u8) -> Result<Self, DecodeError> {
        Ok(match c {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDev,
            7 => FileKind::BlockDev,
            v => {
                return Err(DecodeError::Unknown {
                    what: "file kind",
                    value: v as u64,
                })
            }
        })
    }
}

/// One mutating file-system operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new entry `name` in directory `parent`, with new id `ino` (files, dirs, nodes,
    /// symlinks; `target` only for symlinks, `rdev` only for devices).
    Create {
        parent: Ino,
        name: Vec<u8>,
        ino: Ino,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: Vec<u8>,
    },
    /// A hard link: `ino` gets the additional name `name` in `parent`.
    Link {
        ino: Ino,
        parent: Ino,
        name: Vec<u8>,
    },
    /// Remove a name (file, symlink, node or empty directory). With `whiteout` the name
    /// is left as a whiteout that hides the template's entry of that name (the name need
    /// not exist in the private tree then).
    Unlink {
        parent: Ino,
        name: Vec<u8>,
        whiteout: bool,
    },
    /// Rename, with renameat2 flags (RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2). With
    /// `whiteout` the old name is left as a whiteout (it exists in the template).
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: u32,
        whiteout: bool,
    },
    /// Copy-up: the template's entry number `lower` becomes private inode `ino` named
    /// `name` in `parent`, with the given attributes. A directory keeps showing the
    /// template directory's entries (merged); a file's contents are copied from the
    /// template (every replica holds the same content-addressed template).
    CopyUp {
        parent: Ino,
        name: Vec<u8>,
        ino: Ino,
        lower: u64,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: Vec<u8>,
        size: u64,
        mtime_ns: i64,
    },
    Write {
        ino: Ino,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        ino: Ino,
        size: u64,
    },
    /// fallocate(2) with its mode bits.
    Fallocate {
        ino: Ino,
        mode: u32,
        offset: u64,
        len: u64,
    },
    /// Attribute changes; `None` keeps the value. Times in ns since the epoch.
    SetAttr {
        ino: Ino,
        mode: Option<u64>,
        uid: Option<u64>,
        gid: Option<u64>,
        atime_ns: Option<u64>,
        mtime_ns: Option<u64>,
    },
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
}

/// A transaction: an operation with its place in the volume's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tx {
    /// Writer generation: raised each time the volume gets a new writer (fencing).
    pub epoch: u64,
    /// Position in the volume's log, dense and increasing from 1.
    pub seq: u64,
    /// Wall-clock time of the change, ns since the Unix epoch.
    pub time_ns: i64,
    pub op: Op,
}

impl Tx {
    pub fn encode(&self) -> Vec<u8> {
        let (mut head, tail) = self.encode_split();
        head.extend_from_slice(tail);
        head
    }

    /// The encoding as two parts, `head ++ tail`: the tail is a write's data (empty for
    /// other ops), so that the log can write it without copying it first.
    pub fn encode_split(&self) -> (Vec<u8>, &[u8]) {
        let mut e = Enc::default();
        e.u64(self.epoch).u64(self.seq).i64(self.time_ns);
        let mut tail: &[u8] = &[];
        match &self.op {
            Op::Create {
                parent,
                name,
                ino,
                kind,
                mode,
                uid,
                gid,
                rdev,
                target,
            } => {
                e.u8(1)
                    .u64(*parent)
                    .bytes(name)
                    .u64(*ino)
                    .u8(kind.code())
                    .u32(*mode)
                    .u32(*uid)
                    .u32(*gid)
                    .u64(*rdev)
                    .bytes(target);
            }
            Op::Link { ino, parent, name } => {
                e.u8(2).u64(*ino).u64(*parent).bytes(name);
            }
            Op::Unlink { parent, name, whiteout } => {
                e.u8(3).u64(*parent).bytes(name).u8(*whiteout as u8);
            }
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
                whiteout,
            } => {
                e.u8(4)
                    .u64(*parent)
                    .bytes(name)
                    .u64(*new_parent)
                    .bytes(new_name)
                    .u32(*flags)
                    .u8(*whiteout as u8);
            }
            Op::CopyUp {
                parent,
                name,
                ino,
                lower,
                kind,
                mode,
                uid,
                gid,
                rdev,
                target,
                size,
                mtime_ns,
            } => {
                e.u8(11)
                    .u64(*parent)
                    .bytes(name)
                    .u64(*ino)
                    .u64(*lower)
                    .u8(kind.code())
                    .u32(*mode)
                    .u32(*uid)
                    .u32(*gid)
                    .u64(*rdev)
                    .bytes(target)
                    .u64(*size)
                    .i64(*mtime_ns);
            }
            Op::Write { ino, offset, data } => {
                // `bytes(data)` without the data: its length here, the data as the tail.
                e.u8(5).u64(*ino).u64(*offset).u32(data.len() as u32);
                tail = data;
            }
            Op::Truncate { ino, size } => {
                e.u8(6).u64(*ino).u64(*size);
            }
            Op::Fallocate { ino, mode, offset, len } => {
                e.u8(7).u64(*ino).u32(*mode).u64(*offset).u64(*len);
            }
            Op::SetAttr {
                ino,
                mode,
                uid,
                gid,
                atime_ns,
                mtime_ns,
            } => {
                e.u8(8)
                    .u64(*ino)
                    .opt_u64(*mode)
                    .opt_u64(*uid)
                    .opt_u64(*gid)
                    .opt_u64(*atime_ns)
                    .opt_u64(*mtime_ns);
            }
            Op::SetXattr { ino, name, value } => {
                e.u8(9).u64(*ino).bytes(name).bytes(value);
            }
            Op::RemoveXattr { ino, name } => {
                e.u8(10).u64(*ino).bytes(name);
            }
        }
        (e.0, tail)
    }

    pub fn decode(buf: &[u8]) -> Result<Tx, DecodeError> {
        let mut d = Dec::new(buf);
        let (epoch, seq, time_ns) = (d.u64()?, d.u64()?, d.i64()?);
        let op = match d.u8()? {
            1 => Op::Create {
                parent: d.u64()?,
                name: d.bytes()?,
                ino: d.u64()?,
                kind: FileKind::from_code(d.u8()?)?,
                mode: d.u32()?,
                uid: d.u32()?,
                gid: d.u32()?,
                rdev: d.u64()?,
                target: d.bytes()?,
            },
            2 => Op::Link {
                ino: d.u64()?,
                parent: d.u64()?,
                name: d.bytes()?,
            },
            3 => Op::Unlink {
                parent: d.u64()?,
                name: d.bytes()?,
                whiteout: d.bool()?,
            },
            4 => Op::Rename {
                parent: d.u64()?,
                name: d.bytes()?,
                new_parent: d.u64()?,
                new_name: d.bytes()?,
                flags: d.u32()?,
                whiteout: d.bool()?,
            },
            5 => Op::Write {
                ino: d.u64()?,
                offset: d.u64()?,
                data: d.bytes()?,
            },
            6 => Op::Truncate {
                ino: d.u64()?,
                size: d.u64()?,
            },
            7 => Op::Fallocate {
                ino: d.u64()?,
                mode: d.u32()?,
                offset: d.u64()?,
                len: d.u64()?,
            },
            8 => Op::SetAttr {
                ino: d.u64()?,
                mode: d.opt_u64()?,
                uid: d.opt_u64()?,
                gid: d.opt_u64()?,
                atime_ns: d.opt_u64()?,
                mtime_ns: d.opt_u64()?,
            },
            9 => Op::SetXattr {
                ino: d.u64()?,
                name: d.bytes()?,
                value: d.bytes()?,
            },
            10 => Op::RemoveXattr {
                ino: d.u64()?,
                name: d.bytes()?,
            },
            11 => Op::CopyUp {
                parent: d.u64()?,
                name: d.bytes()?,
                ino: d.u64()?,
                lower: d.u64()?,
                kind: FileKind::from_code(d.u8()?)?,
                mode: d.u32()?,
                uid: d.u32()?,
                gid: d.u32()?,
                rdev: d.u64()?,
                target: d.bytes()?,
                size: d.u64()?,
                mtime_ns: d.i64()?,
            },
            v => {
                return Err(DecodeError::Unknown {
                    what: "operation",
                    value: v as u64,
                })
            }
        };
        d.finish()?;
        Ok(Tx {
            epoch,
            seq,
            time_ns,
            op,
        })
    }
}

#[cfg(test)]
pub(crate) mod strategies {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..16)
    }

    pub fn op() -> impl Strategy<Value = Op> {
        let kind = prop_oneof![
            Just(FileKind::File),
            Just(FileKind::Dir),
            Just(FileKind::Symlink),
            Just(FileKind::Fifo),
            Just(FileKind::Socket),
            Just(FileKind::CharDev),
            Just(FileKind::BlockDev)
        ];
        prop_oneof![
            (
                any::<u64>(),
                name(),
                any::<u64>(),
                kind.clone(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                name()
            )
                .prop_map(|(parent, name, ino, kind, mode, uid, gid, rdev, target)| Op::Create {
                    parent,
                    name,
                    ino,
                    kind,
                    mode,
                    uid,
                    gid,
                    rdev,
                    target
                }),
            (any::<u64>(), any::<u64>(), name()).prop_map(|(ino, parent, name)| Op::Link { ino, parent, name }),
            (any::<u64>(), name(), any::<bool>()).prop_map(|(parent, name, whiteout)| Op::Unlink {
                parent,
                name,
                whiteout
            }),
            (any::<u64>(), name(), any::<u64>(), name(), 0u32..4, any::<bool>()).prop_map(
                |(parent, name, new_parent, new_name, flags, whiteout)| Op::Rename {
                    parent,
                    name,
                    new_parent,
                    new_name,
                    flags,
                    whiteout
                }
            ),
            (
                (any::<u64>(), name(), any::<u64>(), any::<u64>(), kind.clone()),
                (
                    any::<u32>(),
                    any::<u32>(),
                    any::<u32>(),
                    any::<u64>(),
                    name(),
                    any::<u64>(),
                    any::<i64>()
                )
            )
                .prop_map(
                    |((parent, name, ino, lower, kind), (mode, uid, gid, rdev, target, size, mtime_ns))| {
                        Op::CopyUp {
                            parent,
                            name,
                            ino,
                            lower,
                            kind,
                            mode,
                            uid,
                            gid,
                            rdev,
                            target,
                            size,
                            mtime_ns,
                        }
                    }
                ),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..512)
            )
                .prop_map(|(ino, offset, data)| Op::Write { ino, offset, data }),
            (any::<u64>(), any::<u64>()).prop_map(|(ino, size)| Op::Truncate { ino, size }),
            (any::<u64>(), any::<u32>(), any::<u64>(), any::<u64>())
                .prop_map(|(ino, mode, offset, len)| Op::Fallocate { ino, mode, offset, len }),
            (
                any::<u64>(),
                any::<Option<u64>>(),
                any::<Option<u64>>(),
                any::<Option<u64>>(),
                any::<Option<u64>>(),
                any::<Option<u64>>()
            )
                .prop_map(|(ino, mode, uid, gid, atime_ns, mtime_ns)| Op::SetAttr {
                    ino,
                    mode,
                    uid,
                    gid,
                    atime_ns,
                    mtime_ns
                }),
            (any::<u64>(), name(), name()).prop_map(|(ino, name, value)| Op::SetXattr { ino, name, value }),
            (any::<u64>(), name()).prop_map(|(ino, name)| Op::RemoveXattr { ino, name }),
        ]
    }

    pub fn tx() -> impl Strategy<Value = Tx> {
        (any::<u64>(), any::<u64>(), any::<i64>(), op()).prop_map(|(epoch, seq, time_ns, op)| Tx {
            epoch,
            seq,
            time_ns,
            op,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trip(tx in strategies::tx()) {
            prop_assert_eq!(Tx::decode(&tx.encode()).unwrap(), tx);
        }

        #[test]
        fn the_split_encoding_leaves_only_written_data_as_the_tail(tx in strategies::tx()) {
            let (head, tail) = tx.encode_split();
            let data: &[u8] = match &tx.op {
                Op::Write { data, .. } => data,
                _ => &[],
            };
            prop_assert_eq!(tail, data);
            // The head alone stops where the data starts: it does not decode on its own.
            prop_assert_eq!(Tx::decode(&head).is_err(), !data.is_empty());
        }

        #[test]
        fn truncated_bodies_are_refused(tx in strategies::tx(), cut in 0usize..64) {
            let b = tx.encode();
            let cut = cut.min(b.len().saturating_sub(1));
            prop_assert!(Tx::decode(&b[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Tx::decode(&b);
        }
    }

    #[test]
    fn trailing_bytes_and_unknown_ops_are_refused() {
        let tx = Tx {
            epoch: 1,
            seq: 2,
            time_ns: 3,
            op: Op::Truncate { ino: 4, size: 5 },
        };
        let mut b = tx.encode();
        b.push(0);
        assert_eq!(Tx::decode(&b), Err(DecodeError::Trailing(1)));
        let mut b = tx.encode();
        b[24] = 200;
        assert!(matches!(
            Tx::decode(&b),
            Err(DecodeError::Unknown {
                what: "operation",
                value: 200
            })
        ));
    }
}
