//! Files with holes: where their data is (SEEK_DATA/SEEK_HOLE), copying and comparing
//! them in bounded chunks without reading or writing the holes. A VE can make a file of
//! any apparent size for free (`truncate -s 100G`); nothing here costs memory or time in
//! proportion to that size, only to the data actually there.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Bytes moved per read or write.
pub const CHUNK: usize = 1 << 20;
/// Most data extents described for one file; more are merged (with the holes between).
pub const MAX_EXTENTS: usize = 1 << 16;

/// A run of data: (offset, length).
pub type Extent = (u64, u64);

fn lseek(f: &File, off: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Halve the number of extents by merging neighbours (the hole between becomes data).
fn merge_pairs(v: &mut Vec<Extent>) {
    let merged: Vec<Extent> = v
        .chunks(2)
        .map(|c| match c {
            [a, b] => (a.0, b.0 + b.1 - a.0),
            [a] => *a,
            _ => unreachable!("chunks of two"),
        })
        .collect();
    *v = merged;
}

/// Append an extent, joining it to the last one when they touch; keeps at most `max`.
fn push_extent(v: &mut Vec<Extent>, e: Extent, max: usize) {
    if e.1 == 0 {
        return;
    }
    if let Some(last) = v.last_mut() {
        if last.0 + last.1 >= e.0 {
            let end = (e.0 + e.1).max(last.0 + last.1);
            last.1 = end - last.0;
            return;
        }
    }
    v.push(e);
    if v.len() > max.max(2) {
        merge_pairs(v);
    }
}

/// The data extents of the first `size` bytes of `f`, sorted, at most `max` of them (past
/// that, neighbours merge). Without SEEK_DATA support the whole range is data.
pub fn data_extents(f: &File, size: u64, max: usize) -> std::io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let start = match lseek(f, off, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = lseek(f, start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if end <= start {
            // The file changed under us; take the rest as data.
            push_extent(&mut out, (start, size - start), max);
            break;
        }
        push_extent(&mut out, (start, end - start), max);
        off = end;
    }
    Ok(out)
}

/// Read `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
pub fn read_at_padded(f: &File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[n..].fill(0);
    Ok(())
}

pub fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|x| *x == 0)
}

/// Sorted union of two sorted extent lists.
pub fn union(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut all: Vec<Extent> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out = Vec::with_capacity(all.len());
    for e in all {
        push_extent(&mut out, e, usize::MAX);
    }
    out
}

/// Whether `[off, off+len)` overlaps any of the sorted `extents`.
pub fn overlaps(extents: &[Extent], off: u64, len: u64) -> bool {
    let i = extents.partition_point(|e| e.0 + e.1 <= off);
    extents.get(i).is_some_and(|e| e.0 < off + len)
}

/// Split the extents into pieces of at most `CHUNK` bytes.
pub fn chunks(extents: &[Extent]) -> impl Iterator<Item = Extent> + '_ {
    extents.iter().flat_map(|&(o, l)| {
        (0..l.div_ceil(CHUNK as u64)).map(move |k| {
            let s = o + k * CHUNK as u64;
            (s, (o + l - s).min(CHUNK as u64))
        })
    })
}

/// Make `dst` a copy of the first `size` bytes of `src`, holes kept as holes.
pub fn copy(src: &File, dst: &File, size: u64) -> std::io::Result<()> {
    dst.set_len(0)?;
    dst.set_len(size)?;
    let mut buf = vec![0u8; CHUNK];
    for (o, l) in chunks(&data_extents(src, size, MAX_EXTENTS)?) {
        let b = &mut buf[..l as usize];
        read_at_padded(src, o, b)?;
        if !is_zero(b) {
            dst.write_all_at(b, o)?;
        }
    }
    Ok(())
}

/// Whether the first `size` bytes of `a` and `b` are equal (reading only where either has
/// data).
pub fn same(a: &File, b: &File, size: u64) -> std::io::Result<bool> {
    let ea = data_extents(a, size, MAX_EXTENTS)?;
    let eb = data_extents(b, size, MAX_EXTENTS)?;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for (o, l) in chunks(&union(&ea, &eb)) {
        let (x, y) = (&mut x[..l as usize], &mut y[..l as usize]);
        read_at_padded(a, o, x)?;
        read_at_padded(b, o, y)?;
        if x != y {
            return Ok(false);
        }
    }
    Ok(true)
}

/// An unnamed temporary file next to `dir`'s contents (gone when closed).
pub fn temp_file(dir: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(0o600)
        .open(dir);
    match r {
        Ok(f) => Ok(f),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)
            ) =>
        {
            // No O_TMPFILE here: a named file, unlinked at once.
            let p = dir.join(format!(".tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .mode(0o600)
                .open(&p)?;
            std::fs::remove_file(&p)?;
            Ok(f)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_file(dir: &std::path::Path, size: u64, data: &[(u64, &[u8])]) -> File {
        let f = temp_file(dir).unwrap();
        f.set_len(size).unwrap();
        for (o, d) in data {
            f.write_all_at(d, *o).unwrap();
        }
        f
    }

    #[test]
    fn extents_merge_when_there_are_too_many() {
        let mut v = Vec::new();
        for i in 0..10u64 {
            push_extent(&mut v, (i * 100, 10), 4);
        }
        assert!(v.len() <= 4, "{v:?}");
        assert_eq!(v.first().unwrap().0, 0);
        let last = v.last().unwrap();
        assert_eq!(last.0 + last.1, 910, "covers all data: {v:?}");
        // Touching extents join.
        let mut w = Vec::new();
        push_extent(&mut w, (0, 10), 8);
        push_extent(&mut w, (10, 5), 8);
        push_extent(&mut w, (20, 0), 8);
        assert_eq!(w, vec![(0, 15)]);
        assert_eq!(
            union(&[(0, 10), (50, 10)], &[(5, 10), (100, 1)]),
            vec![(0, 15), (50, 10), (100, 1)]
        );
        assert!(overlaps(&[(10, 10), (40, 5)], 15, 1));
        assert!(overlaps(&[(10, 10), (40, 5)], 0, 11));
        assert!(!overlaps(&[(10, 10), (40, 5)], 20, 20));
        assert!(!overlaps(&[(10, 10)], 0, 10));
        let c: Vec<Extent> = chunks(&[(5, CHUNK as u64 + 3)]).collect();
        assert_eq!(c, vec![(5, CHUNK as u64), (5 + CHUNK as u64, 3)]);
    }

    #[test]
    fn a_huge_sparse_file_is_copied_and_compared_by_its_data_only() {
        let d = tempfile::tempdir().unwrap();
        let size = 100u64 << 30;
        let a = sparse_file(d.path(), size, &[(4096 * 3, b"head"), (size - 10, b"tail")]);
        let e = data_extents(&a, size, MAX_EXTENTS).unwrap();
        assert!(!e.is_empty() && e.iter().map(|x| x.1).sum::<u64>() < 1 << 20, "{e:?}");
        let b = temp_file(d.path()).unwrap();
        copy(&a, &b, size).unwrap();
        assert_eq!(b.metadata().unwrap().len(), size);
        use std::os::unix::fs::MetadataExt;
        assert!(b.metadata().unwrap().blocks() < 1024, "holes stay holes");
        assert!(same(&a, &b, size).unwrap());
        b.write_all_at(b"X", size / 2).unwrap();
        assert!(!same(&a, &b, size).unwrap());
        // Zeros written as data equal a hole.
        let c = sparse_file(
            d.path(),
            size,
            &[(4096 * 3, b"head"), (size - 10, b"tail"), (1 << 30, &[0; 4096])],
        );
        assert!(same(&a, &c, size).unwrap());
        let mut buf = [1u8; 16];
        read_at_padded(&a, size - 10, &mut buf).unwrap();
        assert_eq!(&buf, b"tail\0\0\0\0\0\0\0\0\0\0\0\0", "past the end reads zeros");
    }
}
