//! Page cache advice for a volume's own files. Neither the log nor a file's contents need
//! the daemon's copy of their pages for long:
//!
//! - the log is written once and read back only for replay and history, so its pages can go
//!   as soon as they are synced;
//! - a file the VE writes in large pieces is cached by the VE's kernel already (FUSE keeps
//!   the pages it writes through), so the data file's pages are a second copy: their
//!   writeback starts right away and they leave the cache a little behind the writer.
//!
//! Without this, a 1 GiB file written in a VE takes 3 GiB of page cache (the VE's copy, the
//! log's, the data file's), most of it dirty at once. All of it is advice: errors are
//! ignored, and durability does not depend on it (syncs and checkpoints do the same as before).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Bytes behind a segment's end whose cached pages stay after a sync: the page being
/// appended to must stay, or the next small append reads it back from disk first.
pub const LOG_KEEP: u64 = 1 << 20;

/// Writes at least this large stream: written back at once and dropped behind.
pub const STREAM_WRITE: u64 = 256 << 10;

/// How far behind a streaming write its pages leave the cache (written back meanwhile).
pub const STREAM_BEHIND: u64 = 8 << 20;

const PAGE: u64 = 4096;

/// A byte range of a file: (offset, length).
pub type Range = (u64, u64);

/// The range (offset, length) of a segment with `len` bytes synced whose pages can go.
pub fn log_droppable(len: u64) -> Option<Range> {
    let end = len.saturating_sub(LOG_KEEP) & !(PAGE - 1);
    (end > 0).then_some((0, end))
}

/// For a write of `len` bytes at `offset`: the range to start writing back now (the whole
/// pages it filled) and the range to drop (the same, `STREAM_BEHIND` bytes earlier). None
/// for a small write, which may be followed by more writes to the same pages (they would
/// be read back from disk first).
pub fn stream_ranges(offset: u64, len: u64) -> Option<(Range, Option<Range>)> {
    if len < STREAM_WRITE {
        return None;
    }
    let from = offset.div_ceil(PAGE) * PAGE;
    let to = (offset + len) & !(PAGE - 1);
    if to <= from {
        return None;
    }
    let drop = (to > STREAM_BEHIND)
        .then(|| (from.saturating_sub(STREAM_BEHIND), to - STREAM_BEHIND))
        .map(|(a, b)| (a, b - a));
    Some(((from, to - from), drop))
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
    fn small_writes_are_left_alone_large_ones_stream_behind() {
        assert_eq!(stream_ranges(0, STREAM_WRITE - 1), None);
        // The first large writes: written back, nothing far enough behind to drop.
        assert_eq!(stream_ranges(0, 1 << 20), Some(((0, 1 << 20), None)));
        // Further in: the same range STREAM_BEHIND earlier is dropped.
        let m = 1u64 << 20;
        assert_eq!(
            stream_ranges(STREAM_BEHIND, m),
            Some(((STREAM_BEHIND, m), Some((0, m))))
        );
        assert_eq!(
            stream_ranges(100 * m, m),
            Some(((100 * m, m), Some((100 * m - STREAM_BEHIND, m))))
        );
        // Unaligned: only the whole pages it filled, partial pages at either end stay.
        let r = stream_ranges(100, 300 << 10).unwrap();
        assert_eq!(r.0, (PAGE, ((100 + (300 << 10)) & !(PAGE - 1)) - PAGE));
    }
}
