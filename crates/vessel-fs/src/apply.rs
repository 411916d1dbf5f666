//! The one apply of a transaction: to a tree and the data files beside it.
//!
//! [`Applier`] is what a volume's open (replay after the checkpoint), compaction (moving
//! the base forward) and a replica (`Volume::append_replicated`) run; the live write path
//! applies the same [`apply_data_in`] with its open handles. History needs only the tree
//! and uses [`Tree::apply`], the metadata half of the same step.

use crate::lower::Lower;
use crate::tree::{Inode, Tree, TreeError, WHITEOUT};
use crate::tx::{FileKind, Ino, Op, Tx};
use crate::volume::data_name;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("transaction {seq} does not apply to the tree: {source}")]
    Tree { seq: u64, source: TreeError },
    #[error("transaction {seq}: file contents: {source}")]
    Data { seq: u64, source: std::io::Error },
}

/// Applies transactions, in order, to a tree and the data files in one directory.
pub struct Applier<'a> {
    data_dir: &'a Path,
    lower: Option<&'a Lower>,
    /// Inodes whose contents or existence changed: [`Applier::finish`] settles their files.
    touched: HashSet<Ino>,
}

impl<'a> Applier<'a> {
    pub fn new(data_dir: &'a Path, lower: Option<&'a Lower>) -> Self {
        Applier {
            data_dir,
            lower,
            touched: HashSet::new(),
        }
    }

    /// Apply `tx` to `tree` and to the contents. `before_change(ino)` runs before a file's
    /// contents change in place (a volume gives the base its own copy there). Returns the
    /// inodes the transaction freed.
    pub fn apply(
        &mut self,
        tree: &mut Tree,
        tx: &Tx,
        before_change: &mut dyn FnMut(Ino) -> std::io::Result<()>,
    ) -> Result<Vec<Ino>, ApplyError> {
        let freed: Vec<Ino> = freed_by(tree, &tx.op).into_iter().map(|(i, _)| i).collect();
        tree.apply(tx)
            .map_err(|source| ApplyError::Tree { seq: tx.seq, source })?;
        let data = |source| ApplyError::Data { seq: tx.seq, source };
        if let Some(i) = data_op_ino(&tx.op) {
            before_change(i).map_err(data)?;
        }
        apply_data_in(self.data_dir, self.lower, tree, &tx.op, &freed, true).map_err(data)?;
        self.touched.extend(contents_ino(&tx.op));
        self.touched.extend(freed.iter().copied());
        Ok(freed)
    }

    /// Make the touched inodes' data files match `tree`: contents past a file's size can
    /// only come from transactions that never made it into the log, so they are cut; files
    /// of inodes that are gone (or not regular files) are removed. Returns the regular
    /// files that remain (the caller syncs them before it records the tree).
    pub fn finish(self, tree: &Tree) -> std::io::Result<Vec<Ino>> {
        let mut kept = Vec::new();
        for ino in self.touched {
            let p = self.data_dir.join(data_name(ino));
            match tree.inodes.get(&ino) {
                Some(i) if i.kind == FileKind::File => {
                    match std::fs::OpenOptions::new().write(true).open(&p) {
                        Ok(f) => f.set_len(i.size)?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    }
                    kept.push(ino);
                }
                _ => match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
        }
        kept.sort_unstable();
        Ok(kept)
    }
}

/// The effect of `op` on the data files in `data_dir` (`freed`: the inodes it frees).
/// With `replay`, in-place changes (write, truncate, fallocate) are made here too, and a
/// file a later transaction removed is made again (that transaction removes it again):
/// every effect is idempotent, so a replay may start before files' current state. Without
/// it, the live write path has made them through its open handles.
pub(crate) fn apply_data_in(
    data_dir: &Path,
    lower: Option<&Lower>,
    tree: &Tree,
    op: &Op,
    freed: &[Ino],
    replay: bool,
) -> std::io::Result<()> {
    let path = |ino: Ino| data_dir.join(data_name(ino));
    {
        // In replay a file may be gone already (a later transaction freed it): recreate it;
        // the later transaction removes it again.
        let open_rw = |ino: Ino, truncate: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true)
                .write(true)
                .create(truncate || replay)
                .truncate(truncate)
                .custom_flags(libc::O_CLOEXEC);
            let p = path(ino);
            match o.open(&p) {
                // A directory without its shards yet (a new base, a test's bare directory).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && (truncate || replay) => {
                    std::fs::create_dir_all(p.parent().unwrap_or(data_dir))?;
                    o.open(&p)
                }
                r => r,
            }
        };
        match op {
            Op::Create {
                ino,
                kind: FileKind::File,
                ..
            } => {
                open_rw(*ino, true)?;
            }
            Op::CopyUp {
                ino,
                lower: idx,
                kind: FileKind::File,
                ..
            } => {
                let low = lower.ok_or_else(|| std::io::Error::other("copy-up without a template"))?;
                let mut src = low.open(*idx)?;
                let mut dst = open_rw(*ino, true)?;
                std::io::copy(&mut src, &mut dst)?;
            }
            Op::Write { ino, offset, data } if replay && tree.inodes.contains_key(ino) => {
                open_rw(*ino, false)?.write_all_at(data, *offset)?;
            }
            Op::Truncate { ino, size } if replay && tree.inodes.contains_key(ino) => {
                open_rw(*ino, false)?.set_len(*size)?;
            }
            Op::Fallocate { ino, mode, offset, len } if replay && tree.inodes.contains_key(ino) => {
                fallocate(&open_rw(*ino, false)?, *mode, *offset, *len)?;
            }
            _ => {}
        }
        for ino in freed {
            match std::fs::remove_file(path(*ino)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

pub(crate) fn fallocate(f: &File, mode: u32, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode as i32, offset as i64, len as i64) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The file whose contents `op` changes in place.
pub(crate) fn data_op_ino(op: &Op) -> Option<Ino> {
    match op {
        Op::Write { ino, .. } | Op::Truncate { ino, .. } | Op::Fallocate { ino, .. } => Some(*ino),
        _ => None,
    }
}

/// The file whose data file `op` makes or changes.
fn contents_ino(op: &Op) -> Option<Ino> {
    match op {
        Op::Create { ino, .. } | Op::CopyUp { ino, .. } => Some(*ino),
        _ => data_op_ino(op),
    }
}

/// The inode an op changes (for dirty tracking and replay bookkeeping).
pub fn op_ino(op: &Op) -> Option<Ino> {
    match op {
        Op::Create { ino, .. }
        | Op::CopyUp { ino, .. }
        | Op::Link { ino, .. }
        | Op::Write { ino, .. }
        | Op::Truncate { ino, .. }
        | Op::Fallocate { ino, .. }
        | Op::SetAttr { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. } => Some(*ino),
        Op::Unlink { .. } | Op::Rename { .. } => None,
    }
}

/// Inodes that `op` would free (their last name goes away), with their last state.
pub(crate) fn freed_by(tree: &Tree, op: &Op) -> Vec<(Ino, Inode)> {
    let victim = match op {
        Op::Unlink { parent, name, .. } => tree.lookup(*parent, name),
        Op::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
            ..
        } if flags & crate::tree::RENAME_EXCHANGE == 0 => {
            let src = tree.lookup(*parent, name);
            tree.lookup(*new_parent, new_name).filter(|d| Some(*d) != src)
        }
        _ => None,
    };
    match victim
        .filter(|v| *v != WHITEOUT)
        .and_then(|v| tree.inodes.get(&v).map(|i| (v, i)))
    {
        Some((v, i)) if i.kind == FileKind::Dir || i.nlink <= 1 => vec![(v, i.clone())],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::ROOT;

    fn tx(seq: u64, op: Op) -> Tx {
        Tx {
            epoch: 1,
            seq,
            time_ns: seq as i64,
            op,
        }
    }

    fn create(ino: Ino, name: &[u8]) -> Op {
        Op::Create {
            parent: ROOT,
            name: name.to_vec(),
            ino,
            kind: FileKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            target: Vec::new(),
        }
    }

    #[test]
    fn apply_makes_the_files_and_finish_settles_them() {
        let d = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(0o755, 0, 0);
        let mut a = Applier::new(d.path(), None);
        let mut changed = Vec::new();
        let ops = vec![
            create(2, b"a"),
            Op::Write {
                ino: 2,
                offset: 0,
                data: b"hello world".to_vec(),
            },
            Op::Truncate { ino: 2, size: 5 },
            create(3, b"b"),
            Op::Write {
                ino: 3,
                offset: 0,
                data: b"bee".to_vec(),
            },
            Op::Unlink {
                parent: ROOT,
                name: b"b".to_vec(),
                whiteout: false,
            },
        ];
        let mut freed = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            freed.extend(
                a.apply(&mut tree, &tx(i as u64 + 1, op), &mut |ino| {
                    changed.push(ino);
                    Ok(())
                })
                .unwrap(),
            );
        }
        assert_eq!(freed, vec![3]);
        assert_eq!(changed, vec![2, 2, 3], "before_change runs before in-place changes");
        // Contents past the size (a write the log never got) are cut at finish.
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(data_name(2)))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"junk"))
            .unwrap();
        assert_eq!(a.finish(&tree).unwrap(), vec![2]);
        assert_eq!(std::fs::read(d.path().join(data_name(2))).unwrap(), b"hello");
        assert!(!d.path().join(data_name(3)).exists());
        // A transaction that does not apply is an error naming it; nothing is written.
        let mut a = Applier::new(d.path(), None);
        let e = a
            .apply(&mut tree, &tx(9, create(4, b"c")), &mut |_| Ok(()))
            .unwrap_err();
        assert!(matches!(e, ApplyError::Tree { seq: 9, .. }), "{e}");
        assert!(!d.path().join(data_name(4)).exists());
    }
}
