//! A file's contents as of an earlier transaction, rebuilt in a scratch file (holes kept
//! as holes), and brought back onto the live file in bounded writes: only the chunks that
//! differ are written, and ranges that are holes in the old contents are punched.

use super::{corrupt, shown};
use crate::sparse::{self, CHUNK, MAX_EXTENTS};
use crate::tree::{Tree, FALLOC_FL_KEEP_SIZE};
use crate::tx::{FileKind, Ino, Op};
use crate::txlog::{LogReader, RecordPos};
use crate::view;
use crate::volume::{SetAttr, Volume, VolumeError};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// Where the old contents of a file are.
pub(super) struct Old {
    pub file: File,
    pub size: u64,
}

fn io(vol: &Volume, what: &'static str, path: std::path::PathBuf) -> impl FnOnce(std::io::Error) -> VolumeError {
    let volume = vol.name().to_string();
    move |source| VolumeError::Io {
        volume,
        what,
        path,
        source,
    }
}

/// Zeros over `[off, off+len)` without allocating: a punched hole (or written zeros where
/// holes are not supported).
fn zero_range(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) as i32;
    // SAFETY: fallocate on an fd we own; no memory is passed.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    let zeros = vec![0u8; CHUNK];
    let mut done = 0;
    while done < len {
        let k = (len - done).min(CHUNK as u64) as usize;
        f.write_all_at(&zeros[..k], off + done)?;
        done += k as u64;
    }
    Ok(())
}

/// The effect of one transaction on the contents of a scratch copy.
fn apply_op(vol: &Volume, f: &File, op: &Op) -> Result<(), VolumeError> {
    let scratch = || vol.dir().to_path_buf();
    match op {
        Op::Create { .. } => f.set_len(0).map_err(io(vol, "rebuild a file in", scratch())),
        Op::CopyUp { lower, .. } => {
            let low = vol.lower().ok_or_else(|| corrupt(vol, "no template layer".into()))?;
            let src = low
                .open(*lower)
                .map_err(io(vol, "read template file", low.path(*lower)))?;
            let size = src
                .metadata()
                .map_err(io(vol, "read template file", low.path(*lower)))?
                .len();
            sparse::copy(&src, f, size).map_err(io(vol, "rebuild a file in", scratch()))
        }
        Op::Write { offset, data, .. } => {
            f.write_all_at(data, *offset)
                .map_err(io(vol, "rebuild a file in", scratch()))
        }
        Op::Truncate { size, .. } => f.set_len(*size).map_err(io(vol, "rebuild a file in", scratch())),
        Op::Fallocate { mode, offset, len, .. } => {
            let r = (|| {
                let cur = f.metadata()?.len();
                let end = offset.saturating_add(*len);
                let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
                if mode & (FALLOC_FL_ZERO_RANGE | FALLOC_FL_PUNCH_HOLE) != 0 {
                    // Zeros within the size (zero-range may grow it, as an allocation does).
                    if mode & FALLOC_FL_ZERO_RANGE != 0 && !keep && cur < end {
                        f.set_len(end)?;
                    }
                    let e = end.min(f.metadata()?.len());
                    return zero_range(f, *offset, e.saturating_sub(*offset));
                }
                if !keep && cur < end {
                    f.set_len(end)?;
                }
                Ok(())
            })();
            r.map_err(io(vol, "rebuild a file in", scratch()))
        }
        _ => Ok(()),
    }
}

/// The contents of file `ino` as of `seq`: the base's copy (or the template's, or
/// nothing), then the content transactions up to `seq` (positions in `index`).
pub(super) fn content_at(
    vol: &Volume,
    base: &Tree,
    reader: &LogReader,
    index: &HashMap<Ino, Vec<RecordPos>>,
    ino: Ino,
    seq: u64,
) -> Result<Old, VolumeError> {
    let positions = index.get(&ino).map(Vec::as_slice).unwrap_or(&[]);
    let in_base = seq > 0 && base.inodes.get(&ino).is_some_and(|i| i.kind == FileKind::File);
    if !in_base && positions.is_empty() {
        // Never written in the window: still the template's file.
        let (Some(idx), Some(low)) = (view::lower_idx(ino), vol.lower()) else {
            return Err(corrupt(
                vol,
                format!("the history of file {ino} does not reach back to its creation"),
            ));
        };
        let file = low.open(idx).map_err(io(vol, "read template file", low.path(idx)))?;
        let size = file
            .metadata()
            .map_err(io(vol, "read template file", low.path(idx)))?
            .len();
        return Ok(Old { file, size });
    }
    let scratch = vol
        .scratch_file()
        .map_err(io(vol, "make a scratch file in", vol.dir().to_path_buf()))?;
    let template = |scratch: &File| -> Result<(), VolumeError> {
        let (Some(idx), Some(low)) = (view::lower_idx(ino), vol.lower()) else {
            return Err(corrupt(
                vol,
                format!("the history of file {ino} does not reach back to its creation"),
            ));
        };
        let src = low.open(idx).map_err(io(vol, "read template file", low.path(idx)))?;
        let size = src
            .metadata()
            .map_err(io(vol, "read template file", low.path(idx)))?
            .len();
        sparse::copy(&src, scratch, size).map_err(io(vol, "rebuild a file in", vol.dir().to_path_buf()))
    };
    if in_base {
        let p = vol.dir().join("base");
        let b = vol
            .open_base_data(ino)
            .map_err(io(vol, "read the base of", p.clone()))?;
        let size = b.metadata().map_err(io(vol, "read the base of", p.clone()))?.len();
        sparse::copy(&b, &scratch, size).map_err(io(vol, "read the base of", p))?;
    }
    for (k, pos) in positions.iter().enumerate() {
        let tx = reader.read_at(*pos)?;
        if k == 0 && !in_base && !matches!(tx.op, Op::Create { .. } | Op::CopyUp { .. }) {
            // Changed in the window but made before it: it began as the template's file.
            template(&scratch)?;
        }
        apply_op(vol, &scratch, &tx.op)?;
    }
    let size = scratch
        .metadata()
        .map_err(io(vol, "rebuild a file in", vol.dir().to_path_buf()))?
        .len();
    Ok(Old { file: scratch, size })
}

fn op_err(vol: &Volume, what: &str, path: &str, e: i32) -> VolumeError {
    VolumeError::Op(
        format!("{what} {}: {}", shown(path), std::io::Error::from_raw_os_error(e)),
        vol.name().to_string(),
    )
}

/// The live file `ino`'s contents (a template file's own, if never copied up).
fn live_file(vol: &Volume, ino: Ino) -> Result<File, i32> {
    if vol.is_lower_file(ino) {
        vol.open_lower(ino)
    } else {
        vol.open_data(ino)
    }
}

/// Make live file `ino` hold `old`; true if anything changed.
pub(super) fn restore(vol: &Volume, ino: Ino, old: &Old, path: &str) -> Result<bool, VolumeError> {
    let cur = vol.getattr(ino).map_err(|e| op_err(vol, "read", path, e))?;
    let live = live_file(vol, ino).map_err(|e| op_err(vol, "open", path, e))?;
    let scratch = || vol.dir().to_path_buf();
    if cur.size == old.size && sparse::same(&old.file, &live, old.size).map_err(io(vol, "compare", scratch()))? {
        return Ok(false);
    }
    vol.open_file(ino, true, false)
        .map_err(|e| op_err(vol, "open", path, e))?;
    let r = (|| {
        if cur.size != old.size {
            vol.setattr(
                ino,
                &SetAttr {
                    size: Some(old.size),
                    ..Default::default()
                },
            )
            .map_err(|e| op_err(vol, "truncate", path, e))?;
        }
        // Copied up by the open: read the private copy from now on.
        let live = vol.open_data(ino).map_err(|e| op_err(vol, "open", path, e))?;
        let src = sparse::data_extents(&old.file, old.size, MAX_EXTENTS).map_err(io(vol, "read", scratch()))?;
        let dst = sparse::data_extents(&live, old.size, MAX_EXTENTS).map_err(io(vol, "read", scratch()))?;
        let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        for (o, l) in sparse::chunks(&sparse::union(&src, &dst)) {
            let (x, y) = (&mut x[..l as usize], &mut y[..l as usize]);
            sparse::read_at_padded(&old.file, o, x).map_err(io(vol, "read", scratch()))?;
            sparse::read_at_padded(&live, o, y).map_err(io(vol, "read", scratch()))?;
            if x == y {
                continue;
            }
            let res = if sparse::overlaps(&src, o, l) {
                vol.write(ino, o, x).map(|_| ())
            } else {
                vol.fallocate(ino, o, l, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            };
            res.map_err(|e| op_err(vol, "write", path, e))?;
        }
        Ok(())
    })();
    vol.release(ino);
    r.map(|()| true)
}
