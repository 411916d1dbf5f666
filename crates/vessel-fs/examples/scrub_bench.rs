//! What a scrub costs: the hash tree of a volume of ~30,000 small files and of one 1 GiB
//! file, with the data files' pages in the cache (warm) and dropped from it first (cold:
//! `POSIX_FADV_DONTNEED` on this volume's own data files only), medians of the runs; and
//! the serialized tree's size and a compare of two equal trees.
//!
//! `cargo run --release -p vessel-fs --example scrub_bench -- [files] [big_mib] [runs]`
//! (defaults 30000 1024 5). Everything lives in a temporary directory, removed at exit.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use vessel_fs::scrub::{self, ScrubTree};
use vessel_fs::tree::ROOT;
use vessel_fs::{FileKind, Volume};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Drop this volume's data files from the page cache (they are synced: a checkpoint ran).
fn drop_cache(dir: &Path) {
    let mut stack = vec![dir.join("data")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(f) = std::fs::File::open(&p) {
                // SAFETY: advice on an fd we own; no memory is passed.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
    }
}

fn time_scrub(v: &Volume, runs: u64, cold: bool) -> (Duration, ScrubTree) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        if cold {
            drop_cache(v.dir());
        }
        let t0 = Instant::now();
        let t = scrub::hash_tree(v, &mut |_| {}).expect("scrub");
        times.push(t0.elapsed());
        last = Some(t);
    }
    (median(times), last.expect("one run"))
}

fn main() {
    let (files, big_mib, runs) = (arg(1, 30_000), arg(2, 1024), arg(3, 5).max(1));
    let tmp = tempfile::Builder::new()
        .prefix("vessel-scrub-bench-")
        .tempdir()
        .expect("temp dir");
    println!("scrub bench: {files} small files, one {big_mib} MiB file, {runs} runs (medians)");

    // ~30,000 small files in directories of 100, 100 B to 4 KiB each.
    let dir = tmp.path().join("small");
    Volume::create(&dir, "small", None).expect("create");
    let v = Volume::open(&dir, None).expect("open");
    let t0 = Instant::now();
    let mut d = ROOT;
    let mut bytes = 0u64;
    for i in 0..files {
        if i % 100 == 0 {
            let name = format!("d{:04}", i / 100);
            d = v
                .mknod(ROOT, name.as_bytes(), FileKind::Dir, 0o755, 0, 0, 0, b"")
                .expect("mkdir")
                .ino;
        }
        let f = v
            .mknod(d, format!("f{i}").as_bytes(), FileKind::File, 0o644, 0, 0, 0, b"")
            .expect("mknod")
            .ino;
        let len = 100 + (i * 397) % 4000;
        let data: Vec<u8> = (0..len)
            .map(|j| (i as u8).wrapping_mul(31).wrapping_add(j as u8))
            .collect();
        v.write(f, 0, &data).expect("write");
        bytes += len;
    }
    v.checkpoint().expect("checkpoint");
    println!(
        "made {files} files ({:.1} MiB) in {:.1} s",
        bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    // The part that holds the volume's lock (the VE's writes wait meanwhile).
    let mut locked = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let (nodes, _) = v.with_tree(scrub::skeleton);
        locked.push(t0.elapsed());
        drop(nodes);
    }
    let locked = median(locked);
    let (warm_small, tree) = time_scrub(&v, runs, false);
    let (cold_small, _) = time_scrub(&v, runs, true);
    let t0 = Instant::now();
    let wire = tree.to_bytes();
    let back = ScrubTree::from_bytes(&wire).expect("decode");
    let codec = t0.elapsed();
    let t0 = Instant::now();
    let diffs = scrub::compare(&tree, &back);
    let cmp = t0.elapsed();
    assert!(diffs.is_empty());
    drop(v);

    // One large file, written in 1 MiB pieces of varied bytes.
    let dir = tmp.path().join("big");
    Volume::create(&dir, "big", None).expect("create");
    let v = Volume::open(&dir, None).expect("open");
    let f = v
        .mknod(ROOT, b"big", FileKind::File, 0o644, 0, 0, 0, b"")
        .expect("mknod")
        .ino;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t0 = Instant::now();
    for i in 0..big_mib {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        v.write(f, i << 20, &chunk).expect("write");
    }
    v.checkpoint().expect("checkpoint");
    println!("made one {big_mib} MiB file in {:.1} s", t0.elapsed().as_secs_f64());
    let (warm_big, _) = time_scrub(&v, runs, false);
    let (cold_big, _) = time_scrub(&v, runs, true);
    drop(v);

    // The hash alone, in memory: what the big file's scrub is bound by when cached.
    let buf = vec![0x5au8; 256 << 20];
    let t0 = Instant::now();
    let _ = <sha2::Sha256 as sha2::Digest>::digest(&buf);
    let sha_gib_s = 0.25 / t0.elapsed().as_secs_f64();

    let gib = big_mib as f64 / 1024.0;
    println!();
    println!("{:<34} {:>10} {:>10}", "", "warm", "cold");
    println!(
        "{:<34} {:>9.3}s {:>9.3}s",
        format!("hash tree, {files} small files"),
        warm_small.as_secs_f64(),
        cold_small.as_secs_f64()
    );
    println!(
        "{:<34} {:>9.3}s {:>9.3}s",
        format!("hash tree, one {big_mib} MiB file"),
        warm_big.as_secs_f64(),
        cold_big.as_secs_f64()
    );
    println!(
        "{:<34} {:>8.2}GiB/s {:>7.2}GiB/s",
        "  (throughput)",
        gib / warm_big.as_secs_f64(),
        gib / cold_big.as_secs_f64()
    );
    println!("sha256 in memory: {sha_gib_s:.2} GiB/s");
    println!(
        "volume lock held for the metadata walk of {files} files: {:.1} ms",
        locked.as_secs_f64() * 1e3
    );
    println!(
        "tree of {} nodes: {} bytes serialized ({:.0} B/node); encode+decode {:.1} ms; compare of equal trees {:.3} ms",
        tree.nodes.len(),
        wire.len(),
        wire.len() as f64 / tree.nodes.len() as f64,
        codec.as_secs_f64() * 1e3,
        cmp.as_secs_f64() * 1e3
    );
    println!(
        "scrub: {files} files {:.2} s warm / {:.2} s cold, {big_mib} MiB {:.2} s warm / {:.2} s cold",
        warm_small.as_secs_f64(),
        cold_small.as_secs_f64(),
        warm_big.as_secs_f64(),
        cold_big.as_secs_f64()
    );
}
