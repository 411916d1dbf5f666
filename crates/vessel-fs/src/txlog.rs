//! The transaction log of one volume: segment files in a directory, each a header and a
//! run of framed, checksummed transactions with dense sequence numbers.
//!
//! ```text
//! segment file  <first_seq, 20 digits>.seg
//! header  (24)  magic "VSLTXSEG" | version u32 | first_seq u64 | crc32 of the previous 20 bytes
//! record        len u32 | crc32(body) u32 | body (see `tx`, at most MAX_RECORD bytes)
//! ```
//! The log's operations, as a replicated log needs them: [`TxLog::append`] (dense seqs,
//! epochs never going back), [`LogSync`] and [`TxLog::durable_through`] (what an fdatasync
//! made durable; many callers share one), [`TxLog::truncate_after`] (cut a divergent tail),
//! [`TxLog::drop_through`] (purge what compaction folded into the base) and [`LogReader`]
//! (streams a range without holding the log).
//!
//! Recovery after a crash: a damaged record at the very end of the last segment (a write
//! cut short: the record runs past the end of the file, or only zeros follow it) is a torn
//! tail and is cut off; the log ends at the last whole transaction. Damage anywhere else is
//! corruption and is reported with the volume, segment and offset; nothing after it is
//! applied.

use crate::tx::{Tx, TX_VERSION};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"VSLTXSEG";
const HEADER_LEN: u64 = 24;
const FRAME_LEN: u64 = 8;
/// Largest transaction body accepted.
pub const MAX_RECORD: u32 = 64 << 20;
/// The log writes zeros this far ahead of its end, so that an fsync after an append only
/// flushes data (the file's size changes once per this many bytes, not per append).
pub const ZERO_AHEAD: u64 = 4 << 20;

/// Records at least this large extend the segment themselves, without zeros ahead.
pub const LARGE_RECORD: u64 = 256 << 10;

/// Segment size after which the log starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TxLogError {
    #[error("txlog of volume '{volume}': {what} {path}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("txlog of volume '{volume}' is corrupt in {segment} at byte {offset}: {reason}; the log is intact up to seq {last_good_seq}: restore this volume from a replica or a backup")]
    Corrupt {
        volume: String,
        segment: PathBuf,
        offset: u64,
        reason: String,
        last_good_seq: u64,
    },
    #[error("txlog of volume '{volume}': expected seq {expected}, got {got}")]
    OutOfOrder { volume: String, expected: u64, got: u64 },
    #[error("txlog of volume '{volume}': epoch {got} is older than the log's epoch {current} (a fenced writer)")]
    StaleEpoch { volume: String, current: u64, got: u64 },
    #[error("txlog of volume '{volume}': transaction of {0} bytes is over the limit", volume = .1)]
    TooLarge(usize, String),
    #[error("txlog of volume '{volume}': cannot cut the log after seq {seq}: it starts at seq {first} (older transactions are compacted into the base); seed this copy from a snapshot instead")]
    Compacted { volume: String, seq: u64, first: u64 },
}

type Result<T> = std::result::Result<T, TxLogError>;

/// What opening the log found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Whole transactions in the log.
    pub records: u64,
    pub last_seq: u64,
    /// Bytes of a torn tail that were cut off (0 after a clean shutdown).
    pub truncated_bytes: u64,
}

pub struct TxLog {
    volume: String,
    dir: PathBuf,
    seg: File,
    seg_path: PathBuf,
    seg_len: u64,
    /// Bytes of the segment file (zeros past `seg_len`).
    zeroed_end: u64,
    last_seq: u64,
    last_epoch: u64,
    max_segment: u64,
    /// Every transaction up to this seq is on disk.
    durable: Arc<AtomicU64>,
    /// Each segment's first seq and the time of its first transaction (None while empty),
    /// kept as the log changes: reading them from the segments cost a whole segment
    /// per segment whose first record is large, under the volume's lock.
    starts: Vec<(u64, Option<i64>)>,
}

/// An fdatasync of the log as it is now, made without holding the log (group commit: the
/// callers of one sync share it). Older segments were synced when the log moved past them.
pub struct LogSync {
    seg: File,
    upto: u64,
    /// Bytes of the segment when the sync was made.
    len: u64,
    durable: Arc<AtomicU64>,
}

impl LogSync {
    /// Sync, then drop the segment's synced pages from the page cache (see
    /// [`crate::pagecache`]); returns the seq the log is now durable through.
    pub fn sync(self) -> std::io::Result<u64> {
        self.seg.sync_data()?;
        crate::pagecache::drop_synced_log(&self.seg, self.len);
        Ok(self.durable.fetch_max(self.upto, Ordering::AcqRel).max(self.upto))
    }
}

fn seg_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn header(first_seq: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&TX_VERSION.to_le_bytes());
    h.extend_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// The whole records of one segment, where they end, and the damage found after them:
/// (offset, reason, whether it looks like a torn tail).
struct Scan {
    txs: Vec<Tx>,
    end: u64,
    damage: Option<(u64, String, bool)>,
}

/// Check the record at `off`; `Ok((tx, next offset))` or `Err((reason, torn?))`.
fn record_at(bytes: &[u8], off: usize, expected_seq: u64) -> std::result::Result<(Tx, usize), (String, bool)> {
    let len = bytes.len();
    if off > len || len - off < FRAME_LEN as usize {
        return Err(("partial record frame".into(), true));
    }
    let rlen = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
    let body_at = off + FRAME_LEN as usize;
    // A write cut short leaves a record running to (or past) the end, or zeros (the log
    // writes zeros ahead of itself), or a partly written record followed by zeros.
    let rec_end = (body_at as u64 + rlen as u64).min(len as u64) as usize;
    let torn = body_at as u64 + rlen as u64 >= len as u64
        || bytes[off..].iter().all(|b| *b == 0)
        || bytes[rec_end..].iter().all(|b| *b == 0);
    if rlen > MAX_RECORD {
        return Err((format!("record length {rlen} over the limit"), torn));
    }
    if body_at + rlen as usize > len {
        return Err(("record runs past the end of the segment".into(), torn));
    }
    let body = &bytes[body_at..body_at + rlen as usize];
    if crc32fast::hash(body) != crc {
        return Err(("checksum mismatch".into(), torn));
    }
    let tx = Tx::decode(body).map_err(|e| (format!("undecodable transaction: {e}"), torn))?;
    if tx.seq != expected_seq {
        return Err((format!("sequence {} where {expected_seq} belongs", tx.seq), false));
    }
    Ok((tx, body_at + rlen as usize))
}

/// Whether a whole record with `seq` starts at `off` (cheap test first: the seq field).
fn whole_record_at(bytes: &[u8], off: usize, seq: u64) -> bool {
    let body_at = off + FRAME_LEN as usize;
    if body_at + 16 > bytes.len() {
        return false;
    }
    let rlen = u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes")) as usize;
    if rlen < 16 || rlen > bytes.len() - body_at {
        return false;
    }
    if u64::from_le_bytes(bytes[body_at + 8..body_at + 16].try_into().expect("8 bytes")) != seq {
        return false;
    }
    let crc = u32::from_le_bytes(bytes[off + 4..off + 8].try_into().expect("4 bytes"));
    let body = &bytes[body_at..body_at + rlen];
    crc32fast::hash(body) == crc && Tx::decode(body).is_ok_and(|t| t.seq == seq)
}

fn scan(bytes: &[u8], first_seq: u64) -> Scan {
    let mut txs = Vec::new();
    let mut off = HEADER_LEN as usize;
    while off < bytes.len() {
        match record_at(bytes, off, first_seq + txs.len() as u64) {
            Ok((tx, next)) => {
                txs.push(tx);
                off = next;
            }
            Err((reason, torn)) => {
                // A damaged record followed by the next whole one is corruption, never a
                // torn tail (a torn write is the last thing in the log).
                let next_seq = first_seq + txs.len() as u64 + 1;
                let torn = torn && !(off + 1..bytes.len()).any(|o| whole_record_at(bytes, o, next_seq));
                return Scan {
                    txs,
                    end: off as u64,
                    damage: Some((off as u64, reason, torn)),
                };
            }
        }
    }
    Scan {
        txs,
        end: off as u64,
        damage: None,
    }
}

impl TxLog {
    /// Open (or create) the log in `dir`, recovering from a torn tail. `volume` names the
    /// volume in every error.
    pub fn open(dir: &Path, volume: &str) -> Result<(TxLog, Recovery)> {
        Self::open_with(dir, volume, DEFAULT_SEGMENT_BYTES)
    }

    pub fn open_with(dir: &Path, volume: &str, max_segment: u64) -> Result<(TxLog, Recovery)> {
        let io = |what, path: &Path| io_err(volume, what, path);
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let segs = segments(dir).map_err(io("list", dir))?;
        let mut records = 0;
        let mut last_seq = 0;
        let mut last_epoch = 0;
        let mut truncated = 0;
        let mut last_end = HEADER_LEN;
        let mut starts = Vec::with_capacity(segs.len());
        for (i, (first, path)) in segs.iter().enumerate() {
            let is_last = i + 1 == segs.len();
            let bytes = std::fs::read(path).map_err(io("read", path))?;
            let corrupt = |offset: u64, reason: String, last_good_seq: u64| TxLogError::Corrupt {
                volume: volume.to_string(),
                segment: path.clone(),
                offset,
                reason,
                last_good_seq,
            };
            if bytes.len() < HEADER_LEN as usize || bytes[..HEADER_LEN as usize] != header(*first)[..] {
                if is_last && bytes.iter().all(|b| *b == 0) {
                    // A segment created but never written before the crash.
                    std::fs::write(path, header(*first)).map_err(io("rewrite", path))?;
                    starts.push((*first, None));
                    continue;
                }
                return Err(corrupt(0, "bad segment header".into(), last_seq));
            }
            if i == 0 {
                // History before the first segment may have been compacted away.
                last_seq = first.saturating_sub(1);
            } else if *first != last_seq + 1 {
                return Err(corrupt(
                    0,
                    format!("segment starts at seq {first}, the log is at {last_seq}"),
                    last_seq,
                ));
            }
            let s = scan(&bytes, *first);
            starts.push((*first, s.txs.first().map(|t| t.time_ns)));
            records += s.txs.len() as u64;
            if let Some(t) = s.txs.last() {
                last_seq = t.seq;
            }
            for t in &s.txs {
                if t.epoch < last_epoch {
                    return Err(corrupt(
                        0,
                        format!("epoch goes back from {last_epoch} to {} at seq {}", t.epoch, t.seq),
                        last_seq,
                    ));
                }
                last_epoch = t.epoch;
            }
            last_end = s.end;
            if let Some((off, reason, torn)) = s.damage {
                if !(is_last && torn) {
                    return Err(corrupt(off, reason, last_seq));
                }
                // Zeros after the last record are space written ahead: keep them.
                if !bytes[s.end as usize..].iter().all(|b| *b == 0) {
                    truncated = bytes.len() as u64 - s.end;
                    let f = OpenOptions::new().write(true).open(path).map_err(io("open", path))?;
                    f.set_len(s.end).map_err(io("truncate", path))?;
                    f.sync_all().map_err(io("fsync", path))?;
                }
            }
        }
        let seg_path = match segs.last() {
            Some((_, p)) => p.clone(),
            None => {
                let p = dir.join(seg_name(1));
                std::fs::write(&p, header(1)).map_err(io("create", &p))?;
                sync_dir(dir);
                starts.push((1, None));
                p
            }
        };
        let mut seg = OpenOptions::new()
            .write(true)
            .read(true)
            .open(&seg_path)
            .map_err(io("open", &seg_path))?;
        let zeroed_end = seg.seek(SeekFrom::End(0)).map_err(io("seek", &seg_path))?;
        let seg_len = if segs.is_empty() {
            HEADER_LEN
        } else {
            last_end.min(zeroed_end)
        };
        // What was read back may still be only in the page cache (a process crash).
        seg.sync_data().map_err(io("fsync", &seg_path))?;
        let log = TxLog {
            volume: volume.to_string(),
            dir: dir.to_path_buf(),
            seg,
            seg_path,
            seg_len,
            zeroed_end,
            last_seq,
            last_epoch,
            max_segment,
            durable: Arc::new(AtomicU64::new(last_seq)),
            starts,
        };
        Ok((
            log,
            Recovery {
                records,
                last_seq,
                truncated_bytes: truncated,
            },
        ))
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> TxLogError {
        io_err(&self.volume, what, &self.seg_path)
    }

    /// Append one transaction (not yet durable: see [`TxLog::sync`]). Its seq must follow
    /// the log's last and its epoch must not be older (fencing).
    pub fn append(&mut self, tx: &Tx) -> Result<()> {
        if tx.seq != self.last_seq + 1 {
            return Err(TxLogError::OutOfOrder {
                volume: self.volume.clone(),
                expected: self.last_seq + 1,
                got: tx.seq,
            });
        }
        if tx.epoch < self.last_epoch {
            return Err(TxLogError::StaleEpoch {
                volume: self.volume.clone(),
                current: self.last_epoch,
                got: tx.epoch,
            });
        }
        // A write's data is not copied into the record: it is written from the tx itself.
        let (head, tail) = tx.encode_split();
        let body_len = head.len() + tail.len();
        if body_len > MAX_RECORD as usize {
            return Err(TxLogError::TooLarge(body_len, self.volume.clone()));
        }
        if self.seg_len >= self.max_segment {
            self.rotate(tx.seq)?;
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(tail);
        let mut frame = Vec::with_capacity(head.len() + FRAME_LEN as usize);
        frame.extend_from_slice(&(body_len as u32).to_le_bytes());
        frame.extend_from_slice(&crc.finalize().to_le_bytes());
        frame.extend_from_slice(&head);
        let end = self.seg_len + FRAME_LEN + body_len as u64;
        if end > self.zeroed_end {
            if (body_len as u64) < LARGE_RECORD {
                // Grow the zeroed space with the segment (small logs stay small).
                let upto = end + self.seg_len.clamp(64 << 10, ZERO_AHEAD);
                let zeros = vec![0u8; (upto - self.zeroed_end) as usize];
                self.seg
                    .write_all_at(&zeros, self.zeroed_end)
                    .map_err(self.io("extend"))?;
                self.zeroed_end = upto;
            } else {
                // A large record extends the file itself: zeros ahead of it would double
                // what the log writes, for a size change its sync pays once.
                self.zeroed_end = end;
            }
        }
        // Two writes for a write's data: a crash between them leaves a record whose
        // checksum fails at the end of the log, a torn tail like any cut-short write.
        self.seg
            .write_all_at(&frame, self.seg_len)
            .and_then(|_| match tail.is_empty() {
                true => Ok(()),
                false => self.seg.write_all_at(tail, self.seg_len + frame.len() as u64),
            })
            .map_err(self.io("append to"))?;
        if self.seg_len == HEADER_LEN {
            if let Some(s) = self.starts.last_mut() {
                s.1 = Some(tx.time_ns);
            }
        }
        self.seg_len = end;
        self.last_seq = tx.seq;
        self.last_epoch = tx.epoch;
        Ok(())
    }

    /// A sync of everything appended so far, to run without holding the log.
    pub fn syncer(&self) -> Result<LogSync> {
        Ok(LogSync {
            seg: self.seg.try_clone().map_err(self.io("duplicate"))?,
            upto: self.last_seq,
            len: self.seg_len,
            durable: self.durable.clone(),
        })
    }

    /// Every transaction up to this seq is on disk.
    pub fn durable_through(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The durable point, to read without the log (it only grows, except when a tail is
    /// cut).
    pub fn durable_handle(&self) -> Arc<AtomicU64> {
        self.durable.clone()
    }

    /// Cut every transaction after `seq` (a divergent tail: a new writer's log wins), and
    /// make the cut durable; returns how many were cut. The log must still hold `seq + 1`
    /// or `seq` itself (a cut inside compacted history is refused).
    pub fn truncate_after(&mut self, seq: u64) -> Result<u64> {
        if seq >= self.last_seq {
            return Ok(0);
        }
        let segs = self.list_segments()?;
        let first = segs.first().map_or(self.last_seq + 1, |(f, _)| *f);
        if seq + 1 < first {
            return Err(TxLogError::Compacted {
                volume: self.volume.clone(),
                seq,
                first,
            });
        }
        let io = |what, path: &Path| io_err(&self.volume, what, path);
        for (f, path) in segs.iter().rev() {
            if *f > seq + 1 || (*f == seq + 1 && *f != first) {
                std::fs::remove_file(path).map_err(io("remove", path))?;
                continue;
            }
            // The segment that holds `seq + 1`: cut it where that record starts.
            let bytes = std::fs::read(path).map_err(io("read", path))?;
            let mut off = HEADER_LEN as usize;
            for s in *f..=seq {
                let (_, next) = record_at(&bytes, off, s).map_err(|(reason, _)| TxLogError::Corrupt {
                    volume: self.volume.clone(),
                    segment: path.clone(),
                    offset: off as u64,
                    reason,
                    last_good_seq: s.saturating_sub(1),
                })?;
                off = next;
            }
            let f = OpenOptions::new().write(true).open(path).map_err(io("open", path))?;
            f.set_len(off as u64).map_err(io("truncate", path))?;
            f.sync_all().map_err(io("fsync", path))?;
            break;
        }
        sync_dir(&self.dir);
        let cut = self.last_seq - seq;
        let (reopened, _) = TxLog::open_with(&self.dir, &self.volume, self.max_segment)?;
        // Handles on the durable point see the cut too.
        self.durable.store(reopened.last_seq, Ordering::Release);
        let durable = self.durable.clone();
        *self = TxLog { durable, ..reopened };
        Ok(cut)
    }

    /// Start an empty log in `dir` (which holds no segment) whose first transaction will
    /// be `first_seq` (a copy seeded from a base at `first_seq - 1`), and open it.
    pub fn create_at(dir: &Path, volume: &str, first_seq: u64) -> Result<TxLog> {
        let io = |what, path: &Path| io_err(volume, what, path);
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        if !segments(dir).map_err(io("list", dir))?.is_empty() {
            return Err(TxLogError::OutOfOrder {
                volume: volume.to_string(),
                expected: 1,
                got: first_seq,
            });
        }
        let p = dir.join(seg_name(first_seq.max(1)));
        std::fs::write(&p, header(first_seq.max(1))).map_err(io("create", &p))?;
        sync_dir(dir);
        Ok(TxLog::open(dir, volume)?.0)
    }

    /// Seq of the oldest transaction the log still holds (last_seq + 1 if none).
    pub fn first_seq(&self) -> u64 {
        segments(&self.dir)
            .ok()
            .and_then(|v| v.first().map(|(f, _)| *f))
            .unwrap_or(self.last_seq + 1)
    }

    /// The highest seq such that every segment holding only transactions up to it could
    /// be dropped (the segment being appended to never is), or None.
    pub fn droppable_through(&self, limit: u64) -> Option<u64> {
        let segs = segments(&self.dir).ok()?;
        let mut best = None;
        for w in segs.windows(2) {
            let last_in = w[1].0 - 1;
            if last_in <= limit {
                best = Some(last_in);
            }
        }
        best
    }

    /// Remove the segments whose transactions all have seq <= `seq` (not the current one).
    pub fn drop_through(&mut self, seq: u64) -> Result<u64> {
        let segs = self.list_segments()?;
        let mut freed = 0;
        for w in segs.windows(2) {
            if w[1].0 - 1 <= seq && w[0].1 != self.seg_path {
                freed += std::fs::metadata(&w[0].1).map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&w[0].1).map_err(io_err(&self.volume, "remove", &w[0].1))?;
                self.starts.retain(|(f, _)| *f != w[0].0);
            }
        }
        sync_dir(&self.dir);
        Ok(freed)
    }

    /// Bytes in all segments of the log.
    pub fn disk_bytes(&self) -> u64 {
        segments(&self.dir)
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Make every appended transaction durable.
    pub fn sync(&mut self) -> Result<()> {
        self.seg.sync_data().map_err(self.io("fsync"))?;
        self.durable.fetch_max(self.last_seq, Ordering::AcqRel);
        crate::pagecache::drop_synced_log(&self.seg, self.seg_len);
        Ok(())
    }

    fn rotate(&mut self, first_seq: u64) -> Result<()> {
        // A finished segment ends at its last record.
        self.seg.set_len(self.seg_len).map_err(self.io("trim"))?;
        self.sync()?;
        let path = self.dir.join(seg_name(first_seq));
        let mut f = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(io_err(&self.volume, "create", &path))?;
        f.write_all(&header(first_seq))
            .and_then(|_| f.sync_all())
            .map_err(io_err(&self.volume, "write", &path))?;
        sync_dir(&self.dir);
        self.seg = f;
        self.seg_path = path;
        self.seg_len = HEADER_LEN;
        self.zeroed_end = HEADER_LEN;
        self.starts.push((first_seq, None));
        Ok(())
    }

    /// For each segment, its first seq and the time of its first transaction (None for
    /// a segment with none yet).
    pub fn segment_starts(&self) -> Vec<(u64, Option<i64>)> {
        self.starts.clone()
    }

    #[cfg(test)]
    /// Every transaction with seq >= `from`, in order.
    pub fn read_from(&self, from: u64) -> Result<Vec<Tx>> {
        self.read_range(from, u64::MAX)
    }

    #[cfg(test)]
    /// Every transaction with `from <= seq <= to`, in order.
    pub fn read_range(&self, from: u64, to: u64) -> Result<Vec<Tx>> {
        let segs = self.list_segments()?;
        let mut out = Vec::new();
        for (i, (first, path)) in segs.iter().enumerate() {
            let next_first = segs.get(i + 1).map(|(f, _)| *f).unwrap_or(u64::MAX);
            if next_first <= from {
                continue;
            }
            if *first > to {
                break;
            }
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io_err(&self.volume, "read", path))?;
            let s = scan(&bytes, *first);
            let is_last = i + 1 == segs.len();
            // The end of the last segment may be torn (or zeros written ahead): its end.
            if let Some((offset, reason, _)) = s.damage.filter(|(_, _, torn)| !(is_last && *torn)) {
                return Err(TxLogError::Corrupt {
                    volume: self.volume.clone(),
                    segment: path.clone(),
                    offset,
                    reason,
                    last_good_seq: s.txs.last().map_or(first - 1, |t| t.seq),
                });
            }
            out.extend(s.txs.into_iter().filter(|t| t.seq >= from && t.seq <= to));
        }
        Ok(out)
    }
}

/// Where a record sits in the log (for reading it again with [`LogReader::read_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordPos {
    seg: u32,
    offset: u64,
}

/// The log as of one moment, read one record at a time without the log itself (so
/// without the volume's lock): the segments and the last seq when it was taken. Records
/// appended later are not read. The caller keeps compaction away meanwhile (the volume's
/// history guard), since it deletes segments.
pub struct LogReader {
    volume: String,
    segs: Vec<(u64, PathBuf)>,
    last_seq: u64,
}

impl TxLog {
    /// The log's segment files, in order.
    fn list_segments(&self) -> Result<Vec<(u64, PathBuf)>> {
        segments(&self.dir).map_err(io_err(&self.volume, "list", &self.dir))
    }

    /// A reader over every transaction appended so far.
    pub fn reader(&self) -> Result<LogReader> {
        let segs = self.list_segments()?;
        Ok(LogReader {
            volume: self.volume.clone(),
            segs,
            last_seq: self.last_seq,
        })
    }
}

impl LogReader {
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn io(&self, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TxLogError {
        io_err(&self.volume, what, path)
    }

    fn corrupt(&self, seg: usize, offset: u64, reason: String, last_good_seq: u64) -> TxLogError {
        TxLogError::Corrupt {
            volume: self.volume.clone(),
            segment: self.segs[seg].1.clone(),
            offset,
            reason,
            last_good_seq,
        }
    }

    /// Read the record at `offset` of segment `seg` (which must hold `seq`); None at a clean
    /// end of the segment.
    fn record(&self, seg: usize, r: &mut impl Read, offset: u64, seq: u64) -> Result<Option<(Tx, u64)>> {
        let mut frame = [0u8; FRAME_LEN as usize];
        let mut got = 0;
        while got < frame.len() {
            match r.read(&mut frame[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(self.corrupt(seg, offset, "partial record frame".into(), seq - 1)),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("read", &self.segs[seg].1)(e)),
            }
        }
        let len = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
        if len == 0 && crc == 0 {
            // Zeros written ahead of the end of the segment being appended to.
            return Ok(None);
        }
        if len > MAX_RECORD {
            return Err(self.corrupt(seg, offset, format!("record length {len} over the limit"), seq - 1));
        }
        let mut body = vec![0u8; len as usize];
        r.read_exact(&mut body).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                self.corrupt(seg, offset, "record runs past the end of the segment".into(), seq - 1)
            }
            _ => self.io("read", &self.segs[seg].1)(e),
        })?;
        if crc32fast::hash(&body) != crc {
            return Err(self.corrupt(seg, offset, "checksum mismatch".into(), seq - 1));
        }
        let tx = Tx::decode(&body)
            .map_err(|e| self.corrupt(seg, offset, format!("undecodable transaction: {e}"), seq - 1))?;
        if tx.seq != seq {
            return Err(self.corrupt(seg, offset, format!("sequence {} where {seq} belongs", tx.seq), seq - 1));
        }
        Ok(Some((tx, offset + FRAME_LEN + len as u64)))
    }

    /// Call `f` with every transaction with `from <= seq <= to` (and at most the reader's
    /// last seq), in order, one at a time; `f` returns false to stop.
    pub fn for_each<E: From<TxLogError>>(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(Tx, RecordPos) -> std::result::Result<bool, E>,
    ) -> std::result::Result<(), E> {
        let to = to.min(self.last_seq);
        for (i, (first, path)) in self.segs.iter().enumerate() {
            let next_first = self.segs.get(i + 1).map(|(f, _)| *f).unwrap_or(u64::MAX);
            if next_first <= from {
                continue;
            }
            if *first > to {
                break;
            }
            let file = File::open(path).map_err(self.io("open", path))?;
            let mut r = std::io::BufReader::with_capacity(1 << 20, file);
            let mut head = [0u8; HEADER_LEN as usize];
            r.read_exact(&mut head).map_err(self.io("read", path))?;
            if head[..] != header(*first)[..] {
                return Err(self
                    .corrupt(i, 0, "bad segment header".into(), first.saturating_sub(1))
                    .into());
            }
            let (mut seq, mut off) = (*first, HEADER_LEN);
            while seq <= to.min(next_first - 1) {
                let Some((tx, next)) = self.record(i, &mut r, off, seq)? else {
                    return Err(self
                        .corrupt(i, off, format!("the segment ends before seq {seq}"), seq - 1)
                        .into());
                };
                let pos = RecordPos {
                    seg: i as u32,
                    offset: off,
                };
                (seq, off) = (seq + 1, next);
                if tx.seq >= from && !f(tx, pos)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The transaction at `pos` (from an earlier [`LogReader::for_each`]).
    pub fn read_at(&self, pos: RecordPos) -> Result<Tx> {
        let (first, path) = self
            .segs
            .get(pos.seg as usize)
            .ok_or_else(|| self.corrupt(0, pos.offset, "record position out of range".into(), 0))?;
        let mut f = File::open(path).map_err(self.io("open", path))?;
        f.seek(SeekFrom::Start(pos.offset)).map_err(self.io("seek", path))?;
        let mut frame = [0u8; 16 + FRAME_LEN as usize];
        f.read_exact(&mut frame).map_err(self.io("read", path))?;
        // The seq is the second field of the body.
        let seq = u64::from_le_bytes(frame[16..24].try_into().expect("8 bytes"));
        f.seek(SeekFrom::Start(pos.offset)).map_err(self.io("seek", path))?;
        match self.record(pos.seg as usize, &mut f, pos.offset, seq.max(*first))? {
            Some((tx, _)) => Ok(tx),
            None => Err(self.corrupt(pos.seg as usize, pos.offset, "no record here".into(), seq)),
        }
    }
}

fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".seg")
                .and_then(|s| s.parse::<u64>().ok())
                .map(|f| (f, e.path()))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The error for a failed `what` on `path` of `volume`'s log.
fn io_err(volume: &str, what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TxLogError {
    let (volume, path) = (volume.to_string(), path.to_path_buf());
    move |source| TxLogError::Io {
        volume,
        what,
        path,
        source,
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tx::strategies;
    use crate::tx::Op;
    use proptest::prelude::*;

    fn tx(seq: u64, epoch: u64) -> Tx {
        Tx {
            epoch,
            seq,
            time_ns: seq as i64 * 1000,
            op: Op::Write {
                ino: 7,
                offset: seq * 10,
                data: vec![seq as u8; (seq % 50) as usize],
            },
        }
    }

    fn fill(dir: &Path, n: u64, max_segment: u64) -> Vec<Tx> {
        let (mut log, rec) = TxLog::open_with(dir, "v1", max_segment).unwrap();
        assert_eq!(
            rec,
            Recovery {
                records: 0,
                last_seq: 0,
                truncated_bytes: 0
            }
        );
        let txs: Vec<Tx> = (1..=n).map(|s| tx(s, 1 + s / 10)).collect();
        for t in &txs {
            log.append(t).unwrap();
        }
        log.sync().unwrap();
        txs
    }

    #[test]
    fn reopen_reads_everything_back_across_segments() {
        let d = tempfile::tempdir().unwrap();
        let txs = fill(d.path(), 100, 512);
        assert!(segments(d.path()).unwrap().len() > 3, "expected several segments");
        let (log, rec) = TxLog::open_with(d.path(), "v1", 512).unwrap();
        assert_eq!(
            rec,
            Recovery {
                records: 100,
                last_seq: 100,
                truncated_bytes: 0
            }
        );
        assert_eq!(log.read_from(1).unwrap(), txs);
        assert_eq!(log.read_from(42).unwrap(), txs[41..].to_vec());
        assert_eq!(log.last_epoch(), 11);
    }

    #[test]
    fn segment_starts_follow_appends_rotation_reopen_and_dropping() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = TxLog::open_with(d.path(), "v1", 512).unwrap();
        assert_eq!(log.segment_starts(), vec![(1, None)]);
        for s in 1..=100 {
            log.append(&tx(s, 1)).unwrap();
        }
        let starts = log.segment_starts();
        let firsts: Vec<u64> = segments(d.path()).unwrap().iter().map(|(f, _)| *f).collect();
        assert!(firsts.len() > 3);
        assert_eq!(starts.iter().map(|(f, _)| *f).collect::<Vec<_>>(), firsts);
        for (f, t) in &starts {
            assert_eq!(*t, Some(*f as i64 * 1000), "time of seq {f}, the segment's first");
        }
        drop(log);
        let (mut log, _) = TxLog::open_with(d.path(), "v1", 512).unwrap();
        assert_eq!(log.segment_starts(), starts);
        log.drop_through(firsts[2] - 1).unwrap();
        assert_eq!(log.segment_starts(), starts[2..].to_vec());
    }

    #[test]
    fn the_reader_streams_a_range_and_rereads_records_by_position() {
        let d = tempfile::tempdir().unwrap();
        let txs = fill(d.path(), 100, 512);
        let (mut log, _) = TxLog::open_with(d.path(), "v1", 512).unwrap();
        let r = log.reader().unwrap();
        // Appended after the reader was made: not read.
        log.append(&tx(101, 20)).unwrap();
        let mut got = Vec::new();
        r.for_each::<TxLogError>(42, u64::MAX, |t, pos| {
            got.push((t, pos));
            Ok(true)
        })
        .unwrap();
        assert_eq!(
            got.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
            txs[41..].to_vec()
        );
        for (t, pos) in &got {
            assert_eq!(&r.read_at(*pos).unwrap(), t);
        }
        let mut n = 0;
        r.for_each::<TxLogError>(1, 50, |t, _| {
            n += 1;
            Ok(t.seq < 10)
        })
        .unwrap();
        assert_eq!(n, 10, "stops when asked");
        // Damage inside the range is reported, not skipped.
        let (_, p) = segments(d.path()).unwrap()[1].clone();
        let mut b = std::fs::read(&p).unwrap();
        let k = b.len() - 3;
        b[k] ^= 0xff;
        std::fs::write(&p, b).unwrap();
        let e = r.for_each::<TxLogError>(1, 100, |_, _| Ok(true)).unwrap_err();
        assert!(matches!(e, TxLogError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn order_and_fencing_are_enforced() {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 5, DEFAULT_SEGMENT_BYTES);
        let (mut log, _) = TxLog::open(d.path(), "v1").unwrap();
        assert!(matches!(
            log.append(&tx(7, 5)),
            Err(TxLogError::OutOfOrder {
                expected: 6,
                got: 7,
                ..
            })
        ));
        assert!(matches!(
            log.append(&tx(6, 0)),
            Err(TxLogError::StaleEpoch { current: 1, got: 0, .. })
        ));
        log.append(&tx(6, 2)).unwrap();
        assert_eq!(log.last_seq(), 6);
    }

    #[test]
    fn a_torn_tail_is_cut_at_every_possible_byte() {
        let d = tempfile::tempdir().unwrap();
        let txs = fill(d.path(), 6, DEFAULT_SEGMENT_BYTES);
        let seg = segments(d.path()).unwrap()[0].1.clone();
        let full = std::fs::read(&seg).unwrap();
        // Record boundaries: after the header and after each frame.
        let mut ends = vec![HEADER_LEN as usize];
        for t in &txs {
            let last = *ends.last().unwrap();
            ends.push(last + FRAME_LEN as usize + t.encode().len());
        }
        // The records only (the file also has zeros written ahead).
        let full = full[..*ends.last().unwrap()].to_vec();
        for cut in HEADER_LEN as usize..full.len() {
            std::fs::write(&seg, &full[..cut]).unwrap();
            let (mut log, rec) = TxLog::open(d.path(), "v1").unwrap();
            let whole = ends.iter().filter(|e| **e <= cut).count() as u64 - 1;
            assert_eq!(rec.last_seq, whole, "cut at {cut}");
            assert_eq!(rec.truncated_bytes as usize, cut - ends[whole as usize]);
            assert_eq!(log.read_from(1).unwrap(), txs[..whole as usize].to_vec());
            // The log goes on from the last whole transaction.
            log.append(&tx(whole + 1, 9)).unwrap();
        }
    }

    fn big(seq: u64, len: usize) -> Tx {
        Tx {
            epoch: 1,
            seq,
            time_ns: 0,
            op: Op::Write {
                ino: 9,
                offset: seq << 20,
                data: (0..len).map(|i| (i * 7 + seq as usize) as u8).collect(),
            },
        }
    }

    #[test]
    fn large_records_write_no_zeros_ahead_and_a_cut_anywhere_keeps_a_prefix() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = TxLog::open(d.path(), "v1").unwrap();
        let txs = vec![
            tx(1, 1),
            big(2, 300 << 10),
            big(3, 1 << 20),
            tx(4, 1),
            big(5, 400 << 10),
        ];
        let seg = segments(d.path()).unwrap()[0].1.clone();
        let mut ends = vec![HEADER_LEN as usize];
        let mut before = 0;
        for t in &txs {
            log.append(t).unwrap();
            let end = ends.last().unwrap() + FRAME_LEN as usize + t.encode().len();
            ends.push(end);
            let file_len = std::fs::metadata(&seg).unwrap().len() as usize;
            if t.encode().len() as u64 >= LARGE_RECORD {
                assert_eq!(file_len, end.max(before), "no zeros after a large record");
            } else {
                assert!(file_len > end, "zeros after a small one");
            }
            before = file_len;
        }
        log.sync().unwrap();
        drop(log);
        let full = std::fs::read(&seg).unwrap()[..ends[5]].to_vec();
        // Cuts in every record: in the frame, in the head, where the data starts, inside
        // the data, one byte short.
        let mut cuts = Vec::new();
        for w in ends.windows(2) {
            for c in [w[0] + 3, w[0] + 20, w[0] + 8 + 37, (w[0] + w[1]) / 2, w[1] - 1, w[1]] {
                if c > w[0] && c <= w[1] {
                    cuts.push(c);
                }
            }
        }
        for cut in cuts {
            std::fs::write(&seg, &full[..cut]).unwrap();
            let (mut log, rec) = TxLog::open(d.path(), "v1").unwrap();
            let whole = ends.iter().filter(|e| **e <= cut).count() as u64 - 1;
            assert_eq!(rec.last_seq, whole, "cut at {cut}");
            assert_eq!(
                log.read_from(1).unwrap(),
                txs[..whole as usize].to_vec(),
                "cut at {cut}"
            );
            log.append(&big(whole + 1, 260 << 10)).unwrap();
            drop(log);
            let (log, _) = TxLog::open(d.path(), "v1").unwrap();
            assert_eq!(log.read_from(1).unwrap().len() as u64, whole + 1);
        }
    }

    #[test]
    fn a_damaged_length_before_good_records_is_corruption_not_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 5, DEFAULT_SEGMENT_BYTES);
        let seg = segments(d.path()).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&seg).unwrap();
        // The length field of the third record claims far more than the file holds.
        let mut off = HEADER_LEN as usize;
        for _ in 0..2 {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            off += FRAME_LEN as usize + len;
        }
        bytes[off..off + 4].copy_from_slice(&(60u32 << 20).to_le_bytes());
        std::fs::write(&seg, &bytes).unwrap();
        assert!(matches!(
            TxLog::open(d.path(), "v1"),
            Err(TxLogError::Corrupt { last_good_seq: 2, .. })
        ));
    }

    #[test]
    fn zeros_after_the_last_record_are_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 3, DEFAULT_SEGMENT_BYTES);
        let seg = segments(d.path()).unwrap()[0].1.clone();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0u8; 4096]).unwrap();
        let (_, rec) = TxLog::open(d.path(), "v1").unwrap();
        // Zeros are the log's own space written ahead: kept, nothing cut.
        assert_eq!((rec.last_seq, rec.truncated_bytes), (3, 0));
    }

    #[test]
    fn corruption_inside_the_log_is_reported_not_applied() {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 10, DEFAULT_SEGMENT_BYTES);
        let seg = segments(d.path()).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&seg).unwrap();
        // Flip a byte in the body of the third record.
        let at = HEADER_LEN as usize + 2 * (FRAME_LEN as usize + tx(1, 1).encode().len()) + 12;
        bytes[at] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let e = TxLog::open(d.path(), "web").err().expect("corruption must be reported");
        let msg = e.to_string();
        assert!(
            msg.contains("volume 'web'") && msg.contains("checksum mismatch") && msg.contains("up to seq 2"),
            "{msg}"
        );
        // The file was not truncated: nothing is lost while an operator looks.
        assert_eq!(std::fs::read(&seg).unwrap(), bytes);
    }

    #[test]
    fn a_damaged_older_segment_is_corruption_even_at_its_end() {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 40, 256);
        let segs = segments(d.path()).unwrap();
        let first = &segs[0].1;
        let b = std::fs::read(first).unwrap();
        std::fs::write(first, &b[..b.len() - 3]).unwrap();
        assert!(matches!(
            TxLog::open_with(d.path(), "v1", 256),
            Err(TxLogError::Corrupt { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_cut_keeps_a_prefix(ops in proptest::collection::vec(strategies::op(), 1..20), cut_frac in 0.0f64..1.0) {
            let d = tempfile::tempdir().unwrap();
            let (mut log, _) = TxLog::open(d.path(), "p").unwrap();
            let txs: Vec<Tx> = ops.into_iter().enumerate().map(|(i, op)| Tx { epoch: 1, seq: i as u64 + 1, time_ns: 0, op }).collect();
            for t in &txs { log.append(t).unwrap(); }
            log.sync().unwrap();
            drop(log);
            let seg = segments(d.path()).unwrap()[0].1.clone();
            let full = std::fs::read(&seg).unwrap();
            let cut = HEADER_LEN as usize + ((full.len() - HEADER_LEN as usize) as f64 * cut_frac) as usize;
            std::fs::write(&seg, &full[..cut]).unwrap();
            let (log, rec) = TxLog::open(d.path(), "p").unwrap();
            let got = log.read_from(1).unwrap();
            prop_assert_eq!(got.len() as u64, rec.last_seq);
            prop_assert_eq!(&got[..], &txs[..got.len()]);
        }
    }

    fn seqs(dir: &Path) -> Vec<(u64, u64)> {
        let (log, _) = TxLog::open_with(dir, "v1", 1 << 30).unwrap();
        let mut out = Vec::new();
        log.reader()
            .unwrap()
            .for_each::<TxLogError>(0, u64::MAX, |t, _| {
                out.push((t.seq, t.epoch));
                Ok(true)
            })
            .unwrap();
        out
    }

    #[test]
    fn truncate_after_cuts_a_divergent_tail_anywhere_and_appends_go_on() {
        // Segments of about 600 bytes: the cut lands inside segments, at their first
        // record, and at the very start.
        for cut in [0u64, 1, 9, 10, 11, 25, 39, 40] {
            let d = tempfile::tempdir().unwrap();
            fill(d.path(), 40, 600);
            let (mut log, _) = TxLog::open_with(d.path(), "v1", 600).unwrap();
            assert!(log.list_segments().unwrap().len() > 3);
            assert_eq!(log.truncate_after(cut).unwrap(), 40 - cut, "cut after {cut}");
            assert_eq!(log.last_seq(), cut);
            assert_eq!(log.durable_through(), cut);
            // The new writer's transactions follow, in a newer epoch.
            for s in cut + 1..=cut + 3 {
                log.append(&tx(s, 9)).unwrap();
            }
            log.syncer().unwrap().sync().unwrap();
            assert_eq!(log.durable_through(), cut + 3);
            drop(log);
            let got = seqs(d.path());
            let want: Vec<(u64, u64)> = (1..=cut)
                .map(|s| (s, 1 + s / 10))
                .chain((cut + 1..=cut + 3).map(|s| (s, 9)))
                .collect();
            assert_eq!(got, want, "cut after {cut}");
        }
    }

    #[test]
    fn truncate_after_refuses_to_cut_into_compacted_history() {
        let d = tempfile::tempdir().unwrap();
        fill(d.path(), 40, 600);
        let (mut log, _) = TxLog::open_with(d.path(), "v1", 600).unwrap();
        let through = log.droppable_through(20).unwrap();
        log.drop_through(through).unwrap();
        let first = log.first_seq();
        assert!(first > 2);
        let e = log.truncate_after(first - 2).unwrap_err();
        assert!(matches!(e, TxLogError::Compacted { .. }), "{e}");
        assert!(e.to_string().contains("snapshot"), "{e}");
        // Right at the start of what is left: everything goes.
        assert_eq!(log.truncate_after(first - 1).unwrap(), 40 - (first - 1));
        assert_eq!(log.last_seq(), first - 1);
        log.append(&tx(first, 9)).unwrap();
    }

    #[test]
    fn the_durable_point_follows_syncs_and_rotations() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, _) = TxLog::open_with(d.path(), "v1", 600).unwrap();
        assert_eq!(log.durable_through(), 0);
        log.append(&tx(1, 1)).unwrap();
        log.append(&tx(2, 1)).unwrap();
        let s = log.syncer().unwrap();
        log.append(&tx(3, 1)).unwrap();
        // A sync covers what was appended when it was made.
        assert_eq!(s.sync().unwrap(), 2);
        assert_eq!(log.durable_through(), 2);
        // Moving to a new segment syncs the old one.
        let mut n = 3;
        while log.list_segments().unwrap().len() < 2 {
            n += 1;
            log.append(&tx(n, 1)).unwrap();
        }
        assert_eq!(log.durable_through(), n - 1);
    }
}
