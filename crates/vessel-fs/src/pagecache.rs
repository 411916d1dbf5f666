//! Page cache advice for a volume's own files. Neither the log nor a file's contents need
//! the daemon's copy of their pages for long:
//!
//! - the log is written once and read back only for replay and history, so its pages can go
//!   as soon as they are synced;
//! - a file the VE writes in large pieces is cached by the VE's kernel already (FUSE keeps
//!   the pages it writes through), so the data file's pages are a second copy: writeback
//!   starts as each 8 MiB chunk is complete, and the chunk before it leaves the cache.
//!
//! Without this, a 1 GiB file written in a VE takes 3 GiB of page cache (the VE's copy, the
//! log's, the data file's), most of it dirty at once. All of it is advice: errors are
//! ignored, and durability does not depend on it (syncs and checkpoints do the same as before).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Bytes behind a segment's end whose cached pages stay after a sync: the page being
/// appended to must stay, or the next small append reads it back from disk first.
pub const LOG_KEEP: u64 = 1 << 20;

/// Writes at least this large stream: written back and dropped behind, in chunks.
pub const STREAM_WRITE: u64 = 256 << 10;

/// A stream is handled per chunk of this many bytes (two syscalls per chunk, not per
/// write): when a write completes a chunk, that chunk's writeback starts and the chunk
/// before it (written back meanwhile) leaves the cache.
pub const STREAM_CHUNK: u64 = 8 << 20;

const PAGE: u64 = 4096;

/// A byte range of a file: (offset, length).
pub type Range = (u64, u64);

/// The range (offset, length) of a segment with `len` bytes synced whose pages can go.
pub fn log_droppable(len: u64) -> Option<Range> {
    let end = len.saturating_sub(LOG_KEEP) & !(PAGE - 1);
    (end > 0).then_some((0, end))
}

/// For a write of `len` bytes at `offset`: the range to start writing back now and the
/// range to drop, when the write completes a chunk (see [`STREAM_CHUNK`]). None for a small
/// write, which may be followed by more writes to the same pages (they would be read back
/// from disk first), or one that stays inside a chunk.
pub fn stream_ranges(offset: u64, len: u64) -> Option<(Range, Option<Range>)> {
    let end = offset.checked_add(len)?;
    if len < STREAM_WRITE || end / STREAM_CHUNK == offset / STREAM_CHUNK {
        return None;
    }
    let done = end / STREAM_CHUNK * STREAM_CHUNK;
    let write = (done - STREAM_CHUNK, STREAM_CHUNK);
    let drop = (done >= 2 * STREAM_CHUNK).then(|| (done - 2 * STREAM_CHUNK, STREAM_CHUNK));
    Some((write, drop))
}

fn fadvise_dontneed(f: &File, (off, len): Range) {
    // SAFETY: advice on our own fd over a byte range; no memory is passed.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), off as i64, len as i64, libc::POSIX_FADV_DONTNEED);
    }
}

/// Drop the clean pages of a log segment synced up to `len`.
pub fn drop_synced_log(f: &File, len: u64) {
    if let Some(r) = log_droppable(len) {
        fadvise_dontneed(f, r);
    }
}

/// After `len` bytes were written at `offset` of a data file: see [`stream_ranges`].
pub fn write_behind(f: &File, offset: u64, len: u64) {
    let Some(((off, n), drop)) = stream_ranges(offset, len) else {
        return;
    };
    // SAFETY: a syscall on our own fd over a byte range; no memory is passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), off as i64, n as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
    if let Some(r) = drop {
        fadvise_dontneed(f, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_last_mebibyte_and_whole_pages_only() {
        assert_eq!(log_droppable(0), None);
        assert_eq!(log_droppable(LOG_KEEP + 100), None);
        assert_eq!(log_droppable(LOG_KEEP + PAGE + 100), Some((0, PAGE)));
        assert_eq!(log_droppable(64 << 20), Some((0, (64 << 20) - LOG_KEEP)));
    }

    #[test]
    fn small_writes_are_left_alone_large_ones_stream_behind_per_chunk() {
        let (m, c) = (1u64 << 20, STREAM_CHUNK);
        assert_eq!(stream_ranges(c - m, STREAM_WRITE - 1), None, "small");
        assert_eq!(stream_ranges(0, m), None, "inside the first chunk");
        // The write that completes the first chunk: its writeback starts, nothing to drop.
        assert_eq!(stream_ranges(c - m, m), Some(((0, c), None)));
        // Completing the second: written back, the first leaves the cache.
        assert_eq!(stream_ranges(2 * c - m, m), Some(((c, c), Some((0, c)))));
        // An unaligned write across a boundary counts too.
        assert_eq!(stream_ranges(3 * c - 100, 300 << 10), Some(((2 * c, c), Some((c, c)))));
        // Sequential 1 MiB writes: one chunk each time one completes, never twice.
        let hits: Vec<u64> = (0..64)
            .filter_map(|i| stream_ranges(i * m, m).map(|((off, _), _)| off))
            .collect();
        assert_eq!(hits, (0..8).map(|k| k * c).collect::<Vec<_>>());
        assert_eq!(stream_ranges(u64::MAX - 10, m), None);
    }
}
