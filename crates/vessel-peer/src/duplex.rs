//! The frames of a two-way stream (`exec`, `console` of a VE on another node), part of
//! node-to-node wire version 1.
//!
//! After a `stream` request of a two-way kind is answered with `{"reply":"stream"}`, both
//! sides write these frames inside the TLS session: a 1-byte tag, a 4-byte big-endian
//! payload length, the payload.
//!
//! | tag | frame | from | payload |
//! |---|---|---|---|
//! | 1 | `Stdin` | caller | bytes for the command's stdin (or the console) |
//! | 2 | `Stdout` | VE's node | bytes the command wrote on stdout (or the pty, the console) |
//! | 3 | `Stderr` | VE's node | bytes the command wrote on stderr |
//! | 4 | `Resize` | caller | rows u16, cols u16: the terminal's new size |
//! | 5 | `Eof` | caller | none: stdin ended |
//! | 6 | `Hangup` | caller | 1 byte, 2 or 3: nobody reads that output any more |
//! | 7 | `Exit` | VE's node | i32: the command's exit code; the last frame |
//! | 8 | `Error` | VE's node | UTF-8 message: the session failed; the last frame |
//!
//! The VE's node ends the stream with its TLS close after `Exit` or `Error` (the caller's
//! close ends a console). A connection that ends otherwise was cut, and is an error.
//! Another framing would be a new stream kind or wire version, never a change of these.
//! Decoding is pure and bounded: a payload over [`MAX_PAYLOAD`] or an unknown tag is an
//! error, never a panic or a large allocation.

/// Largest payload of one frame (data is sent in pieces of at most this).
pub const MAX_PAYLOAD: usize = 64 << 10;
const HEAD: usize = 5;

/// Which output a `Hangup` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout = 2,
    Stderr = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Stdin(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Resize { rows: u16, cols: u16 },
    Eof,
    Hangup(Output),
    Exit(i32),
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DuplexError {
    #[error("a stream frame with tag {0} (not a frame of wire version 1)")]
    Tag(u8),
    #[error("a stream frame of {0} bytes is over the {MAX_PAYLOAD} byte limit")]
    TooLarge(usize),
    #[error("a stream frame with tag {tag} has a payload of {len} bytes, which does not fit it")]
    Shape { tag: u8, len: usize },
}

impl Frame {
    fn tag(&self) -> u8 {
        match self {
            Frame::Stdin(_) => 1,
            Frame::Stdout(_) => 2,
            Frame::Stderr(_) => 3,
            Frame::Resize { .. } => 4,
            Frame::Eof => 5,
            Frame::Hangup(_) => 6,
            Frame::Exit(_) => 7,
            Frame::Error(_) => 8,
        }
    }

    /// Append this frame's bytes to `out`. Data and messages longer than [`MAX_PAYLOAD`]
    /// must be split by the caller (`Error` messages are cut to it).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (small, data): ([u8; 4], &[u8]);
        let payload: &[u8] = match self {
            Frame::Stdin(d) | Frame::Stdout(d) | Frame::Stderr(d) => {
                data = d;
                debug_assert!(data.len() <= MAX_PAYLOAD, "stream data is split by the caller");
                data
            }
            Frame::Resize { rows, cols } => {
                let [a, b] = rows.to_be_bytes();
                let [c, d] = cols.to_be_bytes();
                small = [a, b, c, d];
                &small
            }
            Frame::Eof => &[],
            Frame::Hangup(o) => {
                small = [*o as u8, 0, 0, 0];
                &small[..1]
            }
            Frame::Exit(code) => {
                small = code.to_be_bytes();
                &small
            }
            Frame::Error(m) => {
                let mut end = m.len().min(MAX_PAYLOAD);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                &m.as_bytes()[..end]
            }
        };
        out.push(self.tag());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
    }

    /// Append a data frame of kind `kind` (`Frame::Stdout` ...) holding `data` to `out`,
    /// as `kind(data.to_vec()).encode(out)` does, without the copy. `data` must fit one
    /// frame ([`MAX_PAYLOAD`]).
    pub fn encode_data(kind: fn(Vec<u8>) -> Frame, data: &[u8], out: &mut Vec<u8>) {
        debug_assert!(data.len() <= MAX_PAYLOAD, "stream data is split by the caller");
        out.push(kind(Vec::new()).tag());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    fn decode(tag: u8, p: &[u8]) -> Result<Frame, DuplexError> {
        let shape = || DuplexError::Shape { tag, len: p.len() };
        Ok(match tag {
            1 => Frame::Stdin(p.to_vec()),
            2 => Frame::Stdout(p.to_vec()),
            3 => Frame::Stderr(p.to_vec()),
            4 => match p {
                [a, b, c, d] => Frame::Resize {
                    rows: u16::from_be_bytes([*a, *b]),
                    cols: u16::from_be_bytes([*c, *d]),
                },
                _ => return Err(shape()),
            },
            5 if p.is_empty() => Frame::Eof,
            6 => match p {
                [2] => Frame::Hangup(Output::Stdout),
                [3] => Frame::Hangup(Output::Stderr),
                _ => return Err(shape()),
            },
            7 => Frame::Exit(i32::from_be_bytes(p.try_into().map_err(|_| shape())?)),
            8 => Frame::Error(String::from_utf8_lossy(p).into_owned()),
            5 => return Err(shape()),
            t => return Err(DuplexError::Tag(t)),
        })
    }
}

/// Frames out of bytes as they arrive, in any pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Received bytes are `buf[pos..end]`; `buf` beyond `end` is room already zeroed once,
    /// so reading into it costs no memset.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl Decoder {
    /// Room for `n` more bytes after `end` (frames taken are dropped from the front
    /// once they are half the buffer).
    fn room(&mut self, n: usize) {
        if self.pos > 0 && self.pos * 2 >= self.end {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.buf.len() < self.end + n {
            self.buf.resize(self.end + n, 0);
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.room(bytes.len());
        self.buf[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Read once from `r` straight into the buffer (as `push` of what it read, without
    /// the copy); returns what `read` returned.
    pub fn fill_from(&mut self, r: &mut impl std::io::Read) -> std::io::Result<usize> {
        const CHUNK: usize = 64 << 10;
        self.room(CHUNK);
        let n = r.read(&mut self.buf[self.end..self.end + CHUNK])?;
        self.end += n;
        Ok(n)
    }

    /// Bytes held that are not a whole frame yet (or frames not taken yet).
    pub fn pending(&self) -> usize {
        self.end - self.pos
    }

    /// The next whole frame, if one has arrived.
    pub fn frame(&mut self) -> Result<Option<Frame>, DuplexError> {
        let b = &self.buf[self.pos..self.end];
        if b.len() < HEAD {
            return Ok(None);
        }
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(DuplexError::TooLarge(len));
        }
        if !(1..=8).contains(&b[0]) {
            return Err(DuplexError::Tag(b[0]));
        }
        if b.len() < HEAD + len {
            return Ok(None);
        }
        let f = Frame::decode(b[0], &b[HEAD..HEAD + len])?;
        self.pos += HEAD + len;
        Ok(Some(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Stdin(b"hi\n".to_vec()),
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(Vec::new()),
            Frame::Resize { rows: 24, cols: 80 },
            Frame::Eof,
            Frame::Hangup(Output::Stdout),
            Frame::Hangup(Output::Stderr),
            Frame::Exit(-3),
            Frame::Exit(0),
            Frame::Error("no such VE".into()),
            Frame::Stdout(vec![7; MAX_PAYLOAD]),
        ]
    }

    #[test]
    fn frames_have_a_stable_shape() {
        let mut b = Vec::new();
        Frame::Exit(2).encode(&mut b);
        assert_eq!(b, [7, 0, 0, 0, 4, 0, 0, 0, 2]);
        b.clear();
        Frame::Resize { rows: 1, cols: 258 }.encode(&mut b);
        assert_eq!(b, [4, 0, 0, 0, 4, 0, 1, 1, 2]);
        b.clear();
        Frame::Eof.encode(&mut b);
        Frame::Hangup(Output::Stderr).encode(&mut b);
        Frame::Stdin(b"x".to_vec()).encode(&mut b);
        assert_eq!(b, [5, 0, 0, 0, 0, 6, 0, 0, 0, 1, 3, 1, 0, 0, 0, 1, b'x']);
    }

    #[test]
    fn data_frames_encode_the_same_without_the_copy() {
        for kind in [Frame::Stdin as fn(Vec<u8>) -> Frame, Frame::Stdout, Frame::Stderr] {
            for data in [Vec::new(), b"abc".to_vec(), vec![9u8; MAX_PAYLOAD]] {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                kind(data.clone()).encode(&mut a);
                Frame::encode_data(kind, &data, &mut b);
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn frames_round_trip_in_any_pieces() {
        let mut bytes = Vec::new();
        for f in all() {
            f.encode(&mut bytes);
        }
        for piece in [1, 2, 3, 5, 7, 4096, bytes.len()] {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            for c in bytes.chunks(piece) {
                d.push(c);
                while let Some(f) = d.frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, all(), "in pieces of {piece}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let m = "é".repeat(MAX_PAYLOAD);
        let mut b = Vec::new();
        Frame::Error(m).encode(&mut b);
        let mut d = Decoder::default();
        d.push(&b);
        match d.frame().unwrap() {
            Some(Frame::Error(s)) => assert!(s.len() <= MAX_PAYLOAD && s.chars().all(|c| c == 'é')),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn bad_frames_are_errors_before_their_payload_arrives() {
        let mut d = Decoder::default();
        d.push(&[2, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.frame(), Err(DuplexError::TooLarge(u32::MAX as usize)));
        let mut d = Decoder::default();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.frame(), Err(DuplexError::Tag(9)));
        let mut d = Decoder::default();
        d.push(&[0, 0, 0, 0, 1]);
        assert_eq!(d.frame(), Err(DuplexError::Tag(0)));
        for bad in [
            &[4u8, 0, 0, 0, 2, 0, 1][..],
            &[7, 0, 0, 0, 1, 0],
            &[5, 0, 0, 0, 1, 0],
            &[6, 0, 0, 0, 1, 1],
        ] {
            let mut d = Decoder::default();
            d.push(bad);
            assert!(matches!(d.frame(), Err(DuplexError::Shape { .. })), "{bad:?}");
        }
        // A frame that has not fully arrived is not an error.
        let mut d = Decoder::default();
        d.push(&[2, 0, 0, 1, 0, 1, 2]);
        assert_eq!(d.frame(), Ok(None));
        assert_eq!(d.pending(), 7);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for n in 0..3000usize {
            let mut d = Decoder::default();
            let mut b = Vec::new();
            for _ in 0..n % 40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(if x.is_multiple_of(3) {
                    (x >> 8) as u8 % 9
                } else {
                    (x >> 16) as u8 % 3
                });
            }
            d.push(&b);
            while let Ok(Some(_)) = d.frame() {}
        }
    }
}
