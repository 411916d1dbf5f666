//! The replication stream between a volume's writer and one replica: frames over any
//! reliable byte stream (the cluster's mutual-TLS peer connection; a socket pair in tests).
//!
//! ```text
//! frame   := len:u32le kind:u8 crc:u32le payload[len]     crc = CRC-32 of kind ++ payload
//! writer  -> Hello {version, volume, epoch, writer, history, last_seq}
//! replica -> State {version, epoch, last_seq, history} | Refuse {reason}
//! writer  -> Cut {after}                       (divergent tail: replica answers State)
//! writer  -> Txs {commit, txs...}              (pipelined; count 0 = keep-alive)
//! writer  -> Flush {through}                   (a sync waits: make it durable)
//! writer  -> Seed {version, total}             (the replica needs a seq the writer's log
//!            SeedData {bytes}...                no longer holds: a `vessel_fs::seed`
//!            SeedEnd {bytes}                    snapshot in pieces; replica answers State)
//! replica -> Ack {received, durable}           (after each batch; durable after a flush,
//!                                               or an idle moment)
//! either  -> Refuse {reason}                   (then closes)
//! ```
//!
//! Control frames are JSON with a `version`; `Txs` and `Ack` are binary (the transactions
//! in their log encoding). A frame whose CRC does not match, whose length is over the
//! limit or whose kind is unknown ends the stream with an error: nothing of it is applied.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use vessel_fs::epochs::EpochHistory;
use vessel_fs::tx::Tx;

/// Version of the stream's control frames.
pub const WIRE_VERSION: u32 = 1;
/// The largest frame accepted (a batch is cut well below it).
pub const MAX_FRAME: u32 = 64 << 20;
/// A writer cuts a batch of transactions at about this many bytes.
pub const BATCH_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the replication stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the replication stream ended")]
    Closed,
    #[error("a replication frame is damaged ({0}): dropped, the stream restarts")]
    Corrupt(String),
    #[error("the other side speaks replication version {got}, this node {WIRE_VERSION}: upgrade the older node")]
    Version { got: u32 },
    #[error("the other side refused: {0}")]
    Refused(String),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub volume: String,
    pub epoch: u64,
    pub writer: String,
    pub history: EpochHistory,
    pub last_seq: u64,
    /// The first seq the writer's log still holds (older ones need a snapshot).
    pub first_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The epoch this copy has promised (after taking the Hello's).
    pub epoch: u64,
    pub last_seq: u64,
    pub history: EpochHistory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Refuse {
    version: u32,
    reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seed {
    version: u32,
    total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Cut {
    version: u32,
    after: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Hello(Hello),
    State(State),
    Refuse(String),
    Cut {
        after: u64,
    },
    /// Transactions in their log encoding, and the writer's commit point (every
    /// transaction through it is on every in-sync copy).
    Txs {
        commit: u64,
        txs: Vec<Tx>,
    },
    /// `received`: the last seq appended (liveness); `durable`: on disk (what a sync
    /// counts).
    Ack {
        received: u64,
        durable: u64,
    },
    /// Make everything through `through` durable and say so.
    Flush {
        through: u64,
    },
    /// A seeding snapshot follows (about `total` bytes, for progress): `SeedData` pieces
    /// of a `vessel_fs::seed` stream, then `SeedEnd`.
    Seed {
        total: u64,
    },
    SeedData(Vec<u8>),
    /// The snapshot's end: `bytes` is the sum of its pieces.
    SeedEnd {
        bytes: u64,
    },
}

const K_HELLO: u8 = 1;
const K_STATE: u8 = 2;
const K_REFUSE: u8 = 3;
const K_CUT: u8 = 4;
const K_TXS: u8 = 5;
const K_ACK: u8 = 6;
const K_FLUSH: u8 = 7;
const K_SEED: u8 = 8;
const K_SEED_DATA: u8 = 9;
const K_SEED_END: u8 = 10;

/// A snapshot is sent in pieces of this size.
pub const SEED_PIECE: usize = 1 << 20;

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializable")
}

/// Write one frame with the given kind and payload parts (no copy of the parts).
fn write_raw(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> Result<(), WireError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_FRAME as usize {
        return Err(WireError::Corrupt(format!("a frame of {len} bytes is over the limit")));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    for p in parts {
        h.update(p);
    }
    let mut head = [0u8; 9];
    head[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    head[4] = kind;
    head[5..9].copy_from_slice(&h.finalize().to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// The payload of a `Txs` frame: commit, count, then each transaction with its length.
/// `encoded` are transactions as [`Tx::encode`] gives them.
pub fn write_txs(w: &mut impl Write, commit: u64, encoded: &[&[u8]]) -> Result<(), WireError> {
    let mut head = Vec::with_capacity(12 + 4 * encoded.len());
    head.extend_from_slice(&commit.to_le_bytes());
    head.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
    let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + 2 * encoded.len());
    let lens: Vec<[u8; 4]> = encoded.iter().map(|e| (e.len() as u32).to_le_bytes()).collect();
    parts.push(&head);
    for (e, l) in encoded.iter().zip(&lens) {
        parts.push(l);
        parts.push(e);
    }
    write_raw(w, K_TXS, &parts)
}

pub fn write(w: &mut impl Write, f: &Frame) -> Result<(), WireError> {
    match f {
        Frame::Hello(h) => write_raw(w, K_HELLO, &[&json(h)]),
        Frame::State(s) => write_raw(w, K_STATE, &[&json(s)]),
        Frame::Refuse(reason) => write_raw(
            w,
            K_REFUSE,
            &[&json(&Refuse {
                version: WIRE_VERSION,
                reason: reason.clone(),
            })],
        ),
        Frame::Cut { after } => write_raw(
            w,
            K_CUT,
            &[&json(&Cut {
                version: WIRE_VERSION,
                after: *after,
            })],
        ),
        Frame::Txs { commit, txs } => {
            let enc: Vec<Vec<u8>> = txs.iter().map(|t| t.encode()).collect();
            let refs: Vec<&[u8]> = enc.iter().map(|e| e.as_slice()).collect();
            write_txs(w, *commit, &refs)
        }
        Frame::Ack { received, durable } => write_raw(w, K_ACK, &[&received.to_le_bytes(), &durable.to_le_bytes()]),
        Frame::Flush { through } => write_raw(w, K_FLUSH, &[&through.to_le_bytes()]),
        Frame::Seed { total } => write_raw(
            w,
            K_SEED,
            &[&json(&Seed {
                version: WIRE_VERSION,
                total: *total,
            })],
        ),
        Frame::SeedData(d) => write_raw(w, K_SEED_DATA, &[d]),
        Frame::SeedEnd { bytes } => write_raw(w, K_SEED_END, &[&bytes.to_le_bytes()]),
    }
}

fn fill(r: &mut impl Read, buf: &mut [u8], at_start: bool) -> Result<bool, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_start => return Ok(false),
            Ok(0) => return Err(WireError::Corrupt("the stream ends inside a frame".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn control<T: for<'de> Deserialize<'de>>(what: &str, p: &[u8]) -> Result<T, WireError> {
    #[derive(Deserialize)]
    struct V {
        version: u32,
    }
    let v: V = serde_json::from_slice(p).map_err(|e| WireError::Corrupt(format!("{what}: {e}")))?;
    if v.version != WIRE_VERSION {
        return Err(WireError::Version { got: v.version });
    }
    serde_json::from_slice(p).map_err(|e| WireError::Corrupt(format!("{what}: {e}")))
}

fn u64_at(p: &[u8], at: usize) -> Result<u64, WireError> {
    p.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| WireError::Corrupt("short frame".into()))
}

fn u32_at(p: &[u8], at: usize) -> Result<u32, WireError> {
    p.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| WireError::Corrupt("short frame".into()))
}

/// Read one frame; `Closed` at a clean end of the stream (between frames).
pub fn read(r: &mut impl Read) -> Result<Frame, WireError> {
    read_with(r, &mut Vec::new())
}

/// [`read`] into `p`, a buffer kept across frames: a stream of multi-megabyte batches
/// does not allocate, zero and fault in a fresh buffer for each.
pub fn read_with(r: &mut impl Read, p: &mut Vec<u8>) -> Result<Frame, WireError> {
    let mut head = [0u8; 9];
    if !fill(r, &mut head, true)? {
        return Err(WireError::Closed);
    }
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
    let kind = head[4];
    let crc = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(WireError::Corrupt(format!("frame length {len} over the limit")));
    }
    if p.capacity() > 4 * BATCH_BYTES && (len as usize) <= BATCH_BYTES {
        // Not kept at the size of one exceptional frame.
        *p = Vec::new();
    }
    // Zeroed only where it grows past the last frame.
    p.resize(len as usize, 0);
    fill(r, p, false)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(p);
    if h.finalize() != crc {
        return Err(WireError::Corrupt(format!(
            "checksum mismatch in a frame of kind {kind}"
        )));
    }
    Ok(match kind {
        K_HELLO => Frame::Hello(control("hello", p)?),
        K_STATE => Frame::State(control("state", p)?),
        K_REFUSE => Frame::Refuse(control::<Refuse>("refuse", p)?.reason),
        K_CUT => Frame::Cut {
            after: control::<Cut>("cut", p)?.after,
        },
        K_TXS => {
            let commit = u64_at(p, 0)?;
            let n = u32_at(p, 8)? as usize;
            let mut at = 12;
            let mut txs = Vec::with_capacity(n.min(1 << 16));
            for _ in 0..n {
                let l = u32_at(p, at)? as usize;
                at += 4;
                let b = p
                    .get(at..at + l)
                    .ok_or_else(|| WireError::Corrupt("a transaction runs past its frame".into()))?;
                txs.push(Tx::decode(b).map_err(|e| WireError::Corrupt(format!("undecodable transaction: {e}")))?);
                at += l;
            }
            if at != p.len() {
                return Err(WireError::Corrupt("bytes after the last transaction".into()));
            }
            Frame::Txs { commit, txs }
        }
        K_ACK if p.len() == 16 => Frame::Ack {
            received: u64_at(p, 0)?,
            durable: u64_at(p, 8)?,
        },
        K_FLUSH if p.len() == 8 => Frame::Flush { through: u64_at(p, 0)? },
        K_SEED => Frame::Seed {
            total: control::<Seed>("seed", p)?.total,
        },
        K_SEED_DATA => Frame::SeedData(std::mem::take(p)),
        K_SEED_END if p.len() == 8 => Frame::SeedEnd { bytes: u64_at(p, 0)? },
        K_ACK | K_FLUSH | K_SEED_END => {
            return Err(WireError::Corrupt(format!(
                "a frame of kind {kind} with {} bytes",
                p.len()
            )))
        }
        k => return Err(WireError::Corrupt(format!("unknown frame kind {k}"))),
    })
}

/// A snapshot written into the stream: `SeedData` frames of [`SEED_PIECE`] bytes, then
/// (by [`SeedOut::finish`]) `SeedEnd`. `piece` is called after each piece with the bytes
/// so far.
pub struct SeedOut<'a, W: Write> {
    w: &'a mut W,
    buf: Vec<u8>,
    bytes: u64,
    piece: &'a mut dyn FnMut(u64),
}

impl<'a, W: Write> SeedOut<'a, W> {
    /// Send the `Seed` frame; the snapshot's bytes go into the returned writer.
    pub fn start(w: &'a mut W, total: u64, piece: &'a mut dyn FnMut(u64)) -> Result<Self, WireError> {
        write(w, &Frame::Seed { total })?;
        Ok(SeedOut {
            w,
            buf: Vec::with_capacity(SEED_PIECE),
            bytes: 0,
            piece,
        })
    }

    fn send_piece(&mut self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            write_raw(self.w, K_SEED_DATA, &[&self.buf])?;
            self.bytes += self.buf.len() as u64;
            self.buf.clear();
            (self.piece)(self.bytes);
        }
        Ok(())
    }

    /// The last piece and `SeedEnd`, flushed.
    pub fn finish(mut self) -> Result<u64, WireError> {
        self.send_piece()?;
        write(self.w, &Frame::SeedEnd { bytes: self.bytes })?;
        self.w.flush()?;
        Ok(self.bytes)
    }
}

impl<W: Write> Write for SeedOut<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = b.len().min(SEED_PIECE - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() >= SEED_PIECE {
            self.send_piece().map_err(std::io::Error::other)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Pieces go out full; the end flushes.
        Ok(())
    }
}

/// The snapshot's bytes out of `SeedData` frames, read after a `Seed` frame; the end of
/// the snapshot (`SeedEnd`, its byte count checked) reads as the end of the stream. Any
/// other frame, or a damaged one, is an error (the snapshot is then not installed).
pub struct SeedIn<'a, R: Read> {
    r: &'a mut R,
    buf: Vec<u8>,
    at: usize,
    bytes: u64,
    done: bool,
}

impl<'a, R: Read> SeedIn<'a, R> {
    pub fn new(r: &'a mut R) -> Self {
        SeedIn {
            r,
            buf: Vec::new(),
            at: 0,
            bytes: 0,
            done: false,
        }
    }

    /// Read through the `SeedEnd` frame (the receiver may stop at its own end).
    pub fn finish(&mut self) -> std::io::Result<u64> {
        let mut sink = [0u8; 64 << 10];
        while self.read(&mut sink)? > 0 {}
        Ok(self.bytes)
    }
}

impl<R: Read> Read for SeedIn<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        while self.at == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match read(self.r) {
                Ok(Frame::SeedData(d)) => {
                    self.bytes += d.len() as u64;
                    self.buf = d;
                    self.at = 0;
                }
                Ok(Frame::SeedEnd { bytes }) if bytes == self.bytes => self.done = true,
                Ok(Frame::SeedEnd { bytes }) => {
                    return Err(bad(format!(
                        "the snapshot ends after {} bytes, its end says {bytes}",
                        self.bytes
                    )))
                }
                Ok(other) => return Err(bad(format!("{other:?} inside a snapshot"))),
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_fs::tx::Op;

    fn tx(seq: u64) -> Tx {
        Tx {
            epoch: 2,
            seq,
            time_ns: 7,
            op: Op::Write {
                ino: 5,
                offset: seq * 10,
                data: vec![seq as u8; 100],
            },
        }
    }

    #[test]
    fn every_frame_reads_back() {
        let frames = vec![
            Frame::Hello(Hello {
                version: WIRE_VERSION,
                volume: "web".into(),
                epoch: 3,
                writer: "a".into(),
                history: EpochHistory::new(),
                last_seq: 9,
                first_seq: 1,
            }),
            Frame::State(State {
                version: WIRE_VERSION,
                epoch: 3,
                last_seq: 4,
                history: EpochHistory::new(),
            }),
            Frame::Refuse("stale epoch".into()),
            Frame::Cut { after: 4 },
            Frame::Txs {
                commit: 3,
                txs: vec![tx(5), tx(6)],
            },
            Frame::Txs { commit: 6, txs: vec![] },
            Frame::Ack {
                received: 7,
                durable: 6,
            },
            Frame::Flush { through: 7 },
            Frame::Seed { total: 1 << 30 },
            Frame::SeedData(vec![1, 2, 3]),
            Frame::SeedEnd { bytes: 3 },
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write(&mut buf, f).unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(&read(&mut r).unwrap(), f);
        }
        assert!(matches!(read(&mut r), Err(WireError::Closed)));
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused_never_decoded() {
        let mut buf = Vec::new();
        write(
            &mut buf,
            &Frame::Txs {
                commit: 1,
                txs: vec![tx(1), tx(2)],
            },
        )
        .unwrap();
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            match read(&mut &b[..]) {
                Err(WireError::Corrupt(_)) => {}
                other => panic!("byte {i} flipped: {other:?}"),
            }
        }
    }

    #[test]
    fn a_snapshot_goes_in_pieces_and_reads_back_to_its_end_only() {
        let data: Vec<u8> = (0..(SEED_PIECE * 2 + 77)).map(|i| (i % 251) as u8).collect();
        let mut buf = Vec::new();
        let mut pieces = Vec::new();
        let mut note = |b: u64| pieces.push(b);
        let mut o = SeedOut::start(&mut buf, data.len() as u64, &mut note).unwrap();
        o.write_all(&data).unwrap();
        assert_eq!(o.finish().unwrap(), data.len() as u64);
        assert_eq!(
            pieces,
            vec![SEED_PIECE as u64, 2 * SEED_PIECE as u64, data.len() as u64]
        );
        write(&mut buf, &Frame::Flush { through: 9 }).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read(&mut r).unwrap(),
            Frame::Seed {
                total: data.len() as u64
            }
        );
        let mut got = Vec::new();
        let mut s = SeedIn::new(&mut r);
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
        assert_eq!(s.finish().unwrap(), data.len() as u64);
        // The frame after the snapshot is left for the stream.
        assert_eq!(read(&mut r).unwrap(), Frame::Flush { through: 9 });
        // A wrong count at the end, or another frame inside, is an error.
        let mut bad = Vec::new();
        write(&mut bad, &Frame::SeedData(vec![1, 2])).unwrap();
        write(&mut bad, &Frame::SeedEnd { bytes: 3 }).unwrap();
        assert!(SeedIn::new(&mut &bad[..]).read_to_end(&mut Vec::new()).is_err());
        let mut bad = Vec::new();
        write(&mut bad, &Frame::SeedData(vec![1, 2])).unwrap();
        write(&mut bad, &Frame::Flush { through: 1 }).unwrap();
        assert!(SeedIn::new(&mut &bad[..]).read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn a_cut_stream_is_an_error_and_a_newer_version_is_named() {
        let mut buf = Vec::new();
        write(
            &mut buf,
            &Frame::Ack {
                received: 1,
                durable: 1,
            },
        )
        .unwrap();
        assert!(matches!(read(&mut &buf[..buf.len() - 1]), Err(WireError::Corrupt(_))));
        let mut buf = Vec::new();
        write_raw(&mut buf, K_CUT, &[br#"{"version":9,"after":1}"#]).unwrap();
        assert!(matches!(read(&mut &buf[..]), Err(WireError::Version { got: 9 })));
    }
}
