//! A reader between an untrusted archive and the `tar` crate, which reads PAX extended
//! headers and GNU long names whole into memory: a crafted archive could declare one of
//! gigabytes and make the daemon (which serves every VE) allocate that much. The guard
//! follows the stream's headers as they pass and fails the read when an extension header
//! is larger than [`EXT_MAX`] (or is an old GNU sparse entry, which vessel never writes).

use std::io::Read;

/// Largest PAX header or GNU long name accepted.
pub const EXT_MAX: u64 = 16 << 20;
const BLOCK: u64 = 512;

/// See the module documentation.
pub struct Guard<R> {
    inner: R,
    pos: u64,
    /// Where the next header starts (None: past the end, or no longer followed).
    next: Option<u64>,
    header: Vec<u8>,
    /// The data of the PAX header being read (for its `size` record).
    pax: Option<(Vec<u8>, u64)>,
    /// `size` from the last PAX header: the size of the next entry.
    pax_size: Option<u64>,
}

impl<R: Read> Guard<R> {
    pub fn new(inner: R) -> Self {
        Guard {
            inner,
            pos: 0,
            next: Some(0),
            header: Vec::with_capacity(BLOCK as usize),
            pax: None,
            pax_size: None,
        }
    }
}

fn bad(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// A numeric header field: octal text, or base-256 when the top bit is set.
fn number(f: &[u8]) -> Option<u64> {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (f[0] & 0x7f) as u64;
        for b in &f[1..] {
            v = v.checked_mul(256)?.checked_add(*b as u64)?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(f).ok()?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The `size` record of PAX data, if any.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > rest.len() {
            return None;
        }
        let rec = &rest[sp + 1..len];
        if let Some(v) = rec.strip_prefix(b"size=") {
            return std::str::from_utf8(v.strip_suffix(b"\n").unwrap_or(v))
                .ok()?
                .parse()
                .ok();
        }
        rest = &rest[len..];
    }
    None
}

impl<R: Read> Guard<R> {
    /// Look at bytes `b` that sit at the stream position `self.pos`.
    fn observe(&mut self, mut b: &[u8]) -> std::io::Result<()> {
        while !b.is_empty() {
            if let Some((data, left)) = self.pax.as_mut() {
                let k = (*left).min(b.len() as u64) as usize;
                data.extend_from_slice(&b[..k]);
                *left -= k as u64;
                (b, self.pos) = (&b[k..], self.pos + k as u64);
                if *left == 0 {
                    let (data, _) = self.pax.take().expect("present");
                    self.pax_size = pax_size(&data);
                }
                continue;
            }
            let Some(next) = self.next else { return Ok(()) };
            if self.pos < next {
                let k = (next - self.pos).min(b.len() as u64) as usize;
                (b, self.pos) = (&b[k..], self.pos + k as u64);
                continue;
            }
            let k = (BLOCK as usize - self.header.len()).min(b.len());
            self.header.extend_from_slice(&b[..k]);
            (b, self.pos) = (&b[k..], self.pos + k as u64);
            if self.header.len() == BLOCK as usize {
                self.header_done()?;
            }
        }
        Ok(())
    }

    fn header_done(&mut self) -> std::io::Result<()> {
        let h = std::mem::take(&mut self.header);
        if h.iter().all(|b| *b == 0) {
            // The end of the archive (the tar crate stops at the first zero block).
            self.next = None;
            return Ok(());
        }
        let Some(size) = number(&h[124..136]) else {
            // Malformed: the tar crate refuses it; nothing more to follow.
            self.next = None;
            return Ok(());
        };
        let kind = h[156];
        let ext = matches!(kind, b'x' | b'g' | b'L' | b'K');
        if kind == b'S' {
            return Err(bad(
                "old GNU sparse entries are not supported (vessel writes PAX sparse 1.0)".into(),
            ));
        }
        if ext && size > EXT_MAX {
            return Err(bad(format!(
                "an extended header of {size} bytes (more than {EXT_MAX}): not a vessel export"
            )));
        }
        let size = if ext {
            size
        } else {
            self.pax_size.take().unwrap_or(size)
        };
        if kind == b'x' {
            self.pax = Some((Vec::with_capacity(size as usize), size));
            if size == 0 {
                self.pax = None;
                self.pax_size = None;
            }
        }
        let end = self.pos.checked_add(size.div_ceil(BLOCK) * BLOCK);
        self.next = end;
        Ok(())
    }
}

impl<R: Read> Read for Guard<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    fn read_all(bytes: &[u8], chunk: usize) -> std::io::Result<Vec<(String, Vec<u8>)>> {
        struct Chunky<'a>(&'a [u8], usize);
        impl Read for Chunky<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut ar = tar::Archive::new(Guard::new(Chunky(bytes, chunk)));
        let mut out = Vec::new();
        for e in ar.entries()? {
            let mut e = e?;
            let mut d = Vec::new();
            e.read_to_end(&mut d)?;
            out.push((String::from_utf8_lossy(&e.path_bytes()).into_owned(), d));
        }
        Ok(out)
    }

    #[test]
    fn ordinary_archives_pass_in_any_read_sizes() {
        let mut b = tar::Builder::new(Vec::new());
        entry(&mut b, "a", b"alpha");
        b.append_pax_extensions([("SCHILY.xattr.user.x", &b"1"[..]), ("size", b"3")])
            .unwrap();
        entry(&mut b, "b", b"bet");
        entry(&mut b, &"long/".repeat(100), &[7; 2000]);
        let bytes = b.into_inner().unwrap();
        for chunk in [1, 7, 512, 4096, 1 << 20] {
            let got = read_all(&bytes, chunk).unwrap();
            assert_eq!(got.len(), 3, "{chunk}");
            assert_eq!(got[1].1, b"bet");
            assert_eq!(got[2].1, vec![7; 2000]);
        }
        assert_eq!(pax_size(b"11 size=42\n"), Some(42));
        assert_eq!(number(b"0000644\0"), Some(0o644));
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
    }

    #[test]
    fn a_huge_extension_header_is_refused_before_it_is_read() {
        for kind in [
            tar::EntryType::XHeader,
            tar::EntryType::GNULongName,
            tar::EntryType::GNULongLink,
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_size(100 << 30);
            h.set_cksum();
            let mut bytes = h.as_bytes().to_vec();
            bytes.extend_from_slice(&[b'9'; 4096]);
            let e = read_all(&bytes, 1 << 20).unwrap_err();
            assert!(e.to_string().contains("extended header"), "{kind:?}: {e}");
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(0);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0; 1024]);
        assert!(read_all(&bytes, 512).is_err());
    }
}
