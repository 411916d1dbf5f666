//! A seeding snapshot: a whole copy of a volume as one stream, for a replica whose log is
//! too far behind (the writer no longer has the seq it needs) or a new replica. The
//! stream holds the volume's description, promised epoch and epoch history, its base
//! (checkpoint and data files as of base seq B, holes left out) and every log
//! transaction from B + 1 to the writer's last seq at the start; the live stream takes
//! over after that.
//!
//! ```text
//! stream   "VSLSEED1" | version u32 | crc32 of the previous 12 bytes | frame...
//! frame    kind u8 | len u32 | crc32(kind, len, body) u32 | body (at most MAX_FRAME)
//! HEADER   JSON SeedHeader (exactly once, first)
//! FILE     what u8 (0 checkpoint, 1 data) | ino u64 | size u64   then CHUNK*, FILE_END
//! CHUNK    offset u64 | bytes (within the file's size; holes are not sent)
//! FILE_END bytes sent in its chunks u64
//! TX       one transaction (the `tx` encoding), seqs dense from B + 1, after the files
//! END      last seq u64 | transactions sent u64
//! ```
//!
//! The receiver ([`install`]) writes into a staging directory next to the target, checks
//! every frame's CRC and the stream's structure (order, sizes, counts, dense seqs), and
//! renames the staging directory into place only when the stream was whole; otherwise
//! nothing is left. It replays nothing itself: the installed copy's live state is its
//! base, and opening it replays the log. The reader is never read past the END frame (a
//! connection can go on with the live stream).

use crate::tree::Tree;
use crate::tx::{Ino, Tx};
use crate::txlog::{TxLog, TxLogError, MAX_RECORD};
use crate::volume::{data_name, SeedMeta, Volume, VolumeError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"VSLSEED1";
/// Version of the seed stream.
pub const SEED_VERSION: u32 = 1;
/// Largest frame body (a transaction of the largest size, with room for its framing).
pub const MAX_FRAME: u32 = MAX_RECORD + 4096;
/// Largest header (JSON).
const MAX_HEADER: u32 = 16 << 20;

const HEADER: u8 = 1;
const FILE: u8 = 2;
const CHUNK: u8 = 3;
const FILE_END: u8 = 4;
const TX: u8 = 5;
const END: u8 = 6;

const WHAT_CHECKPOINT: u8 = 0;
const WHAT_DATA: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seed of volume '{volume}': {what} {path}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("seed: sending the snapshot: {0}; the receiver discards a partial stream, seed again")]
    Send(std::io::Error),
    #[error("seed: receiving the snapshot: {0}; nothing was installed, seed again")]
    Receive(std::io::Error),
    #[error("seed: the stream ends early ({0}); nothing was installed: the sender stopped or the connection broke, seed again")]
    Truncated(String),
    #[error("seed: the stream is damaged at byte {offset}: {reason}; nothing was installed, seed again")]
    Damaged { offset: u64, reason: String },
    #[error("seed: {0} already exists; remove the old copy (or install elsewhere and rename) first")]
    Exists(PathBuf),
    #[error("seed of volume '{volume}': {reason}")]
    Source { volume: String, reason: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Log(#[from] TxLogError),
}

pub type Result<T> = std::result::Result<T, SeedError>;

/// The first frame: the volume's description and where its base and log stand.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeedHeader {
    pub version: u32,
    pub volume: SeedMeta,
    /// The last transaction the stream carries.
    pub last_seq: u64,
}

/// How far a snapshot has come (sender or receiver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedProgress {
    pub files: u64,
    /// Bytes of file contents (holes not counted).
    pub bytes: u64,
    pub txs: u64,
    /// The last seq the stream will carry.
    pub last_seq: u64,
}

/// Transactions between two progress reports.
const TXS_PER_REPORT: u64 = 1024;

fn frame_crc(kind: u8, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(&(body.len() as u32).to_le_bytes());
    h.update(body);
    h.finalize()
}

fn stream_header() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&SEED_VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Frames out, counting bytes.
struct Out<'a, W: Write> {
    w: &'a mut W,
}

impl<W: Write> Out<'_, W> {
    fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(&(len as u32).to_le_bytes());
        for p in parts {
            h.update(p);
        }
        let mut head = [0u8; 9];
        head[0] = kind;
        head[1..5].copy_from_slice(&(len as u32).to_le_bytes());
        head[5..9].copy_from_slice(&h.finalize().to_le_bytes());
        self.w.write_all(&head).map_err(SeedError::Send)?;
        for p in parts {
            self.w.write_all(p).map_err(SeedError::Send)?;
        }
        Ok(())
    }
}

/// Write a snapshot of `vol` to `out` (see the module's doc); returns the last seq it
/// carries. The base cannot change meanwhile (the history guard keeps compaction away);
/// the VE keeps writing (only reads of base files shared with live ones take the
/// volume's lock, one chunk at a time). `progress` is called after each file and every
/// [`TXS_PER_REPORT`] transactions.
pub fn write_snapshot(vol: &Volume, out: &mut impl Write, mut progress: impl FnMut(&SeedProgress)) -> Result<u64> {
    let _history = vol.history_guard();
    let view = vol.seed_view()?;
    let name = view.meta.name.clone();
    if view.base.pending > view.base.seq {
        return Err(SeedError::Source {
            volume: name,
            reason: "a compaction is unfinished (the base is half moved); reopen the volume and seed again".into(),
        });
    }
    let last_seq = view.reader.last_seq();
    let mut p = SeedProgress {
        last_seq,
        ..Default::default()
    };
    let mut o = Out { w: out };
    o.w.write_all(&stream_header()).map_err(SeedError::Send)?;
    let header = SeedHeader {
        version: SEED_VERSION,
        volume: SeedMeta {
            meta: view.meta,
            epoch: view.epoch,
            history: view.history,
            base: view.base,
        },
        last_seq,
    };
    o.frame(HEADER, &[&serde_json::to_vec(&header).expect("serializable")])?;
    // The base's checkpoint (none while the base is the initial tree).
    let ck = vol.dir().join("base").join("checkpoint");
    match std::fs::read(&ck) {
        Ok(b) => {
            o.frame(
                FILE,
                &[&[WHAT_CHECKPOINT], &0u64.to_le_bytes(), &(b.len() as u64).to_le_bytes()],
            )?;
            for (i, c) in b.chunks(crate::sparse::CHUNK).enumerate() {
                let off = (i * crate::sparse::CHUNK) as u64;
                o.frame(CHUNK, &[&off.to_le_bytes(), c])?;
            }
            o.frame(FILE_END, &[&(b.len() as u64).to_le_bytes()])?;
            p.files += 1;
            p.bytes += b.len() as u64;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SeedError::Io {
                volume: name,
                what: "read",
                path: ck,
                source,
            })
        }
    }
    // The base's files, holes left out.
    let io = |what, ino: Ino| {
        let path = vol.dir().join("base").join("data").join(data_name(ino));
        let volume = name.clone();
        move |source| SeedError::Io {
            volume,
            what,
            path,
            source,
        }
    };
    let mut buf = vec![0u8; crate::sparse::CHUNK];
    for ino in vol.base_files() {
        let mut f = vol.open_base_file(ino).map_err(io("open", ino))?;
        let size = f.file.metadata().map_err(io("stat", ino))?.len();
        let extents =
            crate::sparse::data_extents(&f.file, size, crate::sparse::MAX_EXTENTS).map_err(io("read", ino))?;
        o.frame(FILE, &[&[WHAT_DATA], &ino.to_le_bytes(), &size.to_le_bytes()])?;
        let mut sent = 0u64;
        for (off, len) in crate::sparse::chunks(&extents) {
            let b = &mut buf[..len as usize];
            vol.read_base_file(&mut f, off, b).map_err(io("read", ino))?;
            if crate::sparse::is_zero(b) {
                continue;
            }
            o.frame(CHUNK, &[&off.to_le_bytes(), b])?;
            sent += len;
        }
        o.frame(FILE_END, &[&sent.to_le_bytes()])?;
        p.files += 1;
        p.bytes += sent;
        progress(&p);
    }
    // The log after the base.
    view.reader
        .for_each::<SeedError>(view.base.seq + 1, last_seq, |tx, _| {
            let (head, tail) = tx.encode_split();
            o.frame(TX, &[&head, tail])?;
            p.txs += 1;
            if p.txs.is_multiple_of(TXS_PER_REPORT) {
                progress(&p);
            }
            Ok(true)
        })?;
    if p.txs != last_seq - view.base.seq {
        return Err(SeedError::Source {
            volume: name,
            reason: format!(
                "the log holds {} transactions after the base at seq {}, {} expected; check the volume (`vessel ve scrub`)",
                p.txs,
                view.base.seq,
                last_seq - view.base.seq
            ),
        });
    }
    o.frame(END, &[&last_seq.to_le_bytes(), &p.txs.to_le_bytes()])?;
    o.w.flush().map_err(SeedError::Send)?;
    progress(&p);
    Ok(last_seq)
}

/// Frames in, with the offset for errors; never reads past what a frame announces.
struct In<'a, R: Read> {
    r: &'a mut R,
    offset: u64,
}

impl<R: Read> In<'_, R> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SeedError::Truncated(format!("in {what} at byte {}", self.offset)),
            _ => SeedError::Receive(e),
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn damaged(&self, reason: impl Into<String>) -> SeedError {
        SeedError::Damaged {
            offset: self.offset,
            reason: reason.into(),
        }
    }

    /// The next frame: its kind and checked body.
    fn frame(&mut self) -> Result<(u8, Vec<u8>)> {
        let at = self.offset;
        let mut head = [0u8; 9];
        self.exact(&mut head, "a frame header")?;
        let kind = head[0];
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
        let limit = if kind == HEADER { MAX_HEADER } else { MAX_FRAME };
        if !(HEADER..=END).contains(&kind) {
            return Err(SeedError::Damaged {
                offset: at,
                reason: format!("unknown frame kind {kind}"),
            });
        }
        if len > limit {
            return Err(SeedError::Damaged {
                offset: at,
                reason: format!("frame of {len} bytes is over the limit of {limit}"),
            });
        }
        let mut body = vec![0u8; len as usize];
        self.exact(&mut body, "a frame body")?;
        if frame_crc(kind, &body) != crc {
            return Err(SeedError::Damaged {
                offset: at,
                reason: "frame checksum mismatch".into(),
            });
        }
        Ok((kind, body))
    }
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A file being received.
struct Receiving {
    what: u8,
    ino: Ino,
    file: File,
    size: u64,
    got: u64,
    /// End of the last chunk (chunks come in increasing, non-overlapping order).
    end: u64,
}

/// Removes the staging directory unless the install completed.
struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Install the snapshot read from `r` as the volume in `dir` (which must not exist);
/// returns the last seq it carried. The copy is whole or absent: a cut or damaged stream
/// leaves nothing and says what went wrong. Open it with [`Volume::open`] (which replays
/// the log after the base) and go on with the live stream from the returned seq + 1.
pub fn install(dir: &Path, r: &mut impl Read) -> Result<u64> {
    install_with(dir, r, |_| {})
}

/// [`install`], calling `progress` after each file and every [`TXS_PER_REPORT`]
/// transactions.
pub fn install_with(dir: &Path, r: &mut impl Read, mut progress: impl FnMut(&SeedProgress)) -> Result<u64> {
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "volume".into());
    if dir.exists() {
        return Err(SeedError::Exists(dir.to_path_buf()));
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut staging = Staging {
        path: parent.join(format!(".{dir_name}.seed-{}-{nonce}", std::process::id())),
        keep: false,
    };
    let s = staging.path.clone();
    let io = |what: &'static str, path: &Path| {
        let (volume, path) = (dir_name.clone(), path.to_path_buf());
        move |source| SeedError::Io {
            volume,
            what,
            path,
            source,
        }
    };
    let mut input = In { r, offset: 0 };
    let mut h = [0u8; 16];
    input.exact(&mut h, "the stream header")?;
    if h[..8] != MAGIC[..] {
        return Err(input.damaged("not a vessel-fs seed stream"));
    }
    if h != stream_header() {
        let v = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        return Err(input.damaged(format!(
            "stream format version {v} (this build reads {SEED_VERSION}) or a damaged stream header"
        )));
    }
    let (kind, body) = input.frame()?;
    if kind != HEADER {
        return Err(input.damaged(format!("frame kind {kind} where the header belongs")));
    }
    let header: SeedHeader =
        serde_json::from_slice(&body).map_err(|e| input.damaged(format!("undecodable header: {e}")))?;
    if header.version != SEED_VERSION {
        return Err(input.damaged(format!(
            "header version {} (this build reads {SEED_VERSION})",
            header.version
        )));
    }
    if header.volume.meta.version != crate::volume::VOLUME_VERSION {
        return Err(input.damaged(format!(
            "volume format version {} (this build reads {})",
            header.volume.meta.version,
            crate::volume::VOLUME_VERSION
        )));
    }
    let base = header.volume.base;
    if header.last_seq < base.seq {
        return Err(input.damaged(format!(
            "the stream ends at seq {} before its base at seq {}",
            header.last_seq, base.seq
        )));
    }
    let mut p = SeedProgress {
        last_seq: header.last_seq,
        ..Default::default()
    };
    // Nothing is made before the stream's header checked out.
    std::fs::create_dir_all(&s).map_err(io("create", &s))?;
    std::fs::set_permissions(&s, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io("make root-only", &s))?;
    let bdata = s.join("base").join("data");

    crate::volume::write_seed_meta(&s, &header.volume).map_err(io("write the description in", &s))?;
    let name = header.volume.meta.name.clone();
    let mut log: Option<TxLog> = None;
    let mut cur: Option<Receiving> = None;
    let mut seen: HashSet<Ino> = HashSet::new();
    let mut checkpoint = false;
    let mut next_seq = base.seq + 1;
    loop {
        let (kind, body) = input.frame()?;
        match kind {
            FILE => {
                if cur.is_some() || log.is_some() {
                    return Err(input.damaged("a file starts inside a file or after the log"));
                }
                let (Some(&what), Some(ino), Some(size)) = (body.first(), u64_at(&body, 1), u64_at(&body, 9)) else {
                    return Err(input.damaged("short file frame"));
                };
                let path = match what {
                    WHAT_CHECKPOINT if !checkpoint => {
                        checkpoint = true;
                        s.join("base").join("checkpoint")
                    }
                    WHAT_DATA if seen.insert(ino) => bdata.join(data_name(ino)),
                    _ => return Err(input.damaged(format!("file {what}/{ino} sent twice or of an unknown kind"))),
                };
                let file = std::fs::create_dir_all(path.parent().unwrap_or(&s))
                    .and_then(|_| File::create(&path))
                    .and_then(|f| f.set_len(size).map(|_| f))
                    .map_err(io("create", &path))?;
                cur = Some(Receiving {
                    what,
                    ino,
                    file,
                    size,
                    got: 0,
                    end: 0,
                });
            }
            CHUNK => {
                let Some(f) = cur.as_mut() else {
                    return Err(input.damaged("a chunk outside a file"));
                };
                let Some(off) = u64_at(&body, 0) else {
                    return Err(input.damaged("short chunk frame"));
                };
                let data = &body[8..];
                if off < f.end || off.checked_add(data.len() as u64).is_none_or(|e| e > f.size) {
                    return Err(input.damaged(format!(
                        "chunk at {off} of {} bytes out of order or past the file's size {}",
                        data.len(),
                        f.size
                    )));
                }
                f.file
                    .write_all_at(data, off)
                    .map_err(io("write", &bdata.join(data_name(f.ino))))?;
                f.got += data.len() as u64;
                f.end = off + data.len() as u64;
            }
            FILE_END => {
                let Some(f) = cur.take() else {
                    return Err(input.damaged("a file end outside a file"));
                };
                if u64_at(&body, 0) != Some(f.got) {
                    return Err(input.damaged(format!("file {} ended after {} bytes, not as announced", f.ino, f.got)));
                }
                p.files += 1;
                p.bytes += f.got;
                if f.what == WHAT_CHECKPOINT {
                    let b = std::fs::read(s.join("base").join("checkpoint")).map_err(io("read", &s))?;
                    let t = Tree::from_checkpoint(&b)
                        .map_err(|e| input.damaged(format!("the base checkpoint is damaged: {e}")))?;
                    if t.applied != base.seq {
                        return Err(input.damaged(format!(
                            "the base checkpoint is at seq {}, the base at {}",
                            t.applied, base.seq
                        )));
                    }
                }
                progress(&p);
            }
            TX => {
                if cur.is_some() {
                    return Err(input.damaged("a transaction inside a file"));
                }
                if log.is_none() {
                    if base.seq > 0 && !checkpoint {
                        return Err(input.damaged("the base checkpoint is missing"));
                    }
                    log = Some(TxLog::create_at(&s.join("txlog"), &name, next_seq)?);
                }
                let tx = Tx::decode(&body).map_err(|e| input.damaged(format!("undecodable transaction: {e}")))?;
                if tx.epoch > header.volume.epoch {
                    return Err(input.damaged(format!(
                        "transaction {} of epoch {} is past the promised epoch {}",
                        tx.seq, tx.epoch, header.volume.epoch
                    )));
                }
                if tx.seq != next_seq || tx.seq > header.last_seq {
                    return Err(input.damaged(format!(
                        "transaction {} where {next_seq} belongs (the stream ends at {})",
                        tx.seq, header.last_seq
                    )));
                }
                log.as_mut().expect("created above").append(&tx)?;
                next_seq += 1;
                p.txs += 1;
                if p.txs.is_multiple_of(TXS_PER_REPORT) {
                    progress(&p);
                }
            }
            END => {
                if cur.is_some() {
                    return Err(input.damaged("the stream ends inside a file"));
                }
                let (last, count) = (u64_at(&body, 0), u64_at(&body, 8));
                if last != Some(header.last_seq) || last != Some(next_seq - 1) || count != Some(p.txs) {
                    return Err(input.damaged(format!(
                        "the end frame says seq {last:?} and {count:?} transactions; received {} through seq {}, announced {}",
                        p.txs,
                        next_seq - 1,
                        header.last_seq
                    )));
                }
                break;
            }
            _ => return Err(input.damaged(format!("frame kind {kind} out of place"))),
        }
    }
    if base.seq > 0 && !checkpoint {
        return Err(input.damaged("the base checkpoint is missing"));
    }
    match log.as_mut() {
        Some(l) => l.sync()?,
        None => drop(TxLog::create_at(&s.join("txlog"), &name, next_seq)?),
    }
    crate::volume::seed_live_from_base(&s).map_err(io("set up the live files in", &s))?;
    // Everything written above, durable at once; then the copy appears whole.
    let d = File::open(&s).map_err(io("open", &s))?;
    // SAFETY: syncfs on a directory fd we own; no memory is passed.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io("syncfs", &s)(std::io::Error::last_os_error()));
    }
    std::fs::rename(&s, dir).map_err(io("rename into place", dir))?;
    staging.keep = true;
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync", parent))?;
    progress(&p);
    Ok(header.last_seq)
}

#[cfg(test)]
mod tests;
