//! GNU tar's sparse format 1.0 (PAX): the entry's PAX header says `GNU.sparse.major=1`,
//! `GNU.sparse.minor=0`, `GNU.sparse.name=<real name>`, `GNU.sparse.realsize=<size>`; its
//! data starts with the map (decimal numbers, one a line: the count, then offset and
//! length of each run of data), padded with NULs to a 512-byte block, followed by the
//! runs of data themselves. The header's own name is `<dir>/GNUSparseFile.0/<name>`, so a
//! reader without sparse support extracts the raw map and data, never a wrong file.

use crate::sparse::Extent;
use std::io::Read;

pub const MAJOR: &str = "GNU.sparse.major";
pub const MINOR: &str = "GNU.sparse.minor";
pub const NAME: &str = "GNU.sparse.name";
pub const REALSIZE: &str = "GNU.sparse.realsize";
const BLOCK: usize = 512;
/// Most runs of data accepted in one imported file (the exporter writes at most
/// `sparse::MAX_EXTENTS`).
pub const MAX_RUNS: u64 = 1 << 20;

/// The map of `extents` in a file of `realsize` bytes, padded to a whole block. As GNU tar
/// does, a file that ends in a hole gets a last, empty run at its end.
pub fn encode_map(extents: &[Extent], realsize: u64) -> Vec<u8> {
    let mut runs: Vec<Extent> = extents.to_vec();
    if runs.last().is_none_or(|(o, l)| o + l < realsize) {
        runs.push((realsize, 0));
    }
    let mut s = format!("{}\n", runs.len());
    for (o, l) in &runs {
        s.push_str(&format!("{o}\n{l}\n"));
    }
    let mut v = s.into_bytes();
    v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
    v
}

fn bad(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("sparse map: {msg}"))
}

/// Read the map at the start of a sparse entry's data; returns the runs (sorted, not
/// overlapping, inside `realsize`) and the bytes the map took.
pub fn read_map(r: &mut impl Read, realsize: u64) -> std::io::Result<(Vec<Extent>, u64)> {
    let mut numbers: Vec<u64> = Vec::new();
    let (mut cur, mut digits) = (0u64, 0usize);
    let mut used = 0u64;
    let mut block = [0u8; BLOCK];
    let done = |n: &[u64]| n.first().is_some_and(|c| n.len() as u64 == 1 + 2 * c);
    while !done(&numbers) {
        r.read_exact(&mut block).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => bad("the entry ends inside the map"),
            _ => e,
        })?;
        used += BLOCK as u64;
        for &b in &block {
            if done(&numbers) {
                if b != 0 {
                    return Err(bad("junk after the map"));
                }
                continue;
            }
            match b {
                b'0'..=b'9' => {
                    digits += 1;
                    cur = cur
                        .checked_mul(10)
                        .and_then(|c| c.checked_add((b - b'0') as u64))
                        .ok_or_else(|| bad("number too large"))?;
                }
                b'\n' if digits > 0 => {
                    if numbers.is_empty() && cur > MAX_RUNS {
                        return Err(bad("too many runs of data"));
                    }
                    numbers.push(cur);
                    (cur, digits) = (0, 0);
                }
                _ => return Err(bad("not a list of decimal numbers")),
            }
        }
    }
    let mut runs = Vec::with_capacity(numbers[0] as usize);
    let mut end = 0u64;
    for p in numbers[1..].chunks(2) {
        let (o, l) = (p[0], p[1]);
        let e = o.checked_add(l).ok_or_else(|| bad("run past the end"))?;
        if o < end || e > realsize {
            return Err(bad("runs overlap, are out of order or lie past the file's size"));
        }
        end = e;
        if l > 0 {
            runs.push((o, l));
        }
    }
    Ok((runs, used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_as_gnu_tar_writes_them() {
        let m = encode_map(&[(0, 10), (4096, 5)], 1 << 30);
        assert_eq!(m.len(), 512);
        assert!(m.starts_with(b"3\n0\n10\n4096\n5\n1073741824\n0\n\0"));
        let (runs, used) = read_map(&mut &m[..], 1 << 30).unwrap();
        assert_eq!((runs, used), (vec![(0, 10), (4096, 5)], 512));
        // Ending in data: no empty run. Many runs: more than one block.
        let many: Vec<Extent> = (0..200u64).map(|i| (i * 1_000_000_000, 7)).collect();
        let m = encode_map(&many, 199_000_000_007);
        assert!(m.len() > 512 && m.len().is_multiple_of(512));
        let (runs, used) = read_map(&mut &m[..], 199_000_000_007).unwrap();
        assert_eq!((runs, used), (many, m.len() as u64));
    }

    #[test]
    fn crafted_maps_are_refused() {
        let pad = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.resize(v.len().div_ceil(512) * 512, 0);
            v
        };
        for (map, size) in [
            ("2\n0\n10\n5\n10\n", 100u64),                 // overlapping
            ("1\n90\n20\n", 100),                          // past the size
            ("1\n0\n99999999999999999999999\n", u64::MAX), // overflow
            ("1\n0\nx\n", 100),                            // not a number
            ("1\n0\n10\nzzz", 100),                        // junk after the map
            ("99999999999\n", 100),                        // too many runs
            ("1\n\n10\n", 100),                            // empty number
        ] {
            assert!(read_map(&mut &pad(map)[..], size).is_err(), "{map:?}");
        }
        assert!(read_map(&mut &b"1\n0\n"[..], 100).is_err(), "cut short");
    }
}
