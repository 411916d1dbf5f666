//! `vessel-bench fs`: vessel-fs against the host's ext4 and fuse-overlayfs, side by side,
//! alternating, medians. Each workload runs through the file system's mount point: for
//! vessel-fs that is the FUSE mount a VE's root is (served by `vessel __fs-serve`, the
//! same code the daemon runs for VEs); namespaces add nothing to file operations.
//!
//! 1. untar of ~30,000 small files (/usr/share/doc, man and perl, or a generated tree of
//!    the same shape) then making it durable (syncfs + fsync of the directory);
//! 2. 4 KiB write + fdatasync, IOPS;
//! 3. 1 GiB sequential write + fsync, then a cold read (page cache of the file and of
//!    its backing file dropped with fadvise);
//! 4. page cache used when 50 volumes of one template each read the same 50 MB of
//!    template files.
//!
//! Then (unless `--in-ve 0`) the in-VE part of `fsve.rs` with the same tarball, and a
//! summary: vessel-fs against ext4 in a VE, and from the host as a second row. Last line:
//! `vessel-fs in a VE: untar x{r} ext4, fsync x{r} ext4, seqwrite x{r} ext4, seqread x{r} ext4`.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vessel_testkit::{run_bounded, FsServer};

use crate::{arg, median};

/// A fuse-overlayfs mount of the template with its own upper dir on ext4.
struct Ovl {
    upper: PathBuf,
    mnt: PathBuf,
}

impl Ovl {
    fn mount(base: &Path, tpl: &Path, tag: &str) -> Ovl {
        let d = base.join(format!("ovl-{tag}"));
        for s in ["upper", "work", "mnt"] {
            fs::create_dir_all(d.join(s)).unwrap();
        }
        let mut c = Command::new("fuse-overlayfs");
        c.arg("-o").arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            tpl.display(),
            d.join("upper").display(),
            d.join("work").display()
        ));
        c.arg(d.join("mnt"));
        let o = run_bounded(c, Duration::from_secs(30));
        assert!(
            o.status.success(),
            "fuse-overlayfs (install it: apt-get install fuse-overlayfs): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ovl {
            upper: d.join("upper"),
            mnt: d.join("mnt"),
        }
    }
}

impl Drop for Ovl {
    fn drop(&mut self) {
        let c = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated path of a mount this benchmark made.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Finds the host file holding a file's contents (to drop its page cache too).
type Backing = Box<dyn Fn(&Path) -> Option<PathBuf>>;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn drop_cache(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        // SAFETY: plain syscalls on our fd.
        unsafe {
            libc::fdatasync(f.as_raw_fd());
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

fn durable(dir: &Path) {
    let d = fs::File::open(dir).unwrap();
    // SAFETY: plain syscalls on our fd.
    unsafe {
        libc::syncfs(d.as_raw_fd());
        libc::fsync(d.as_raw_fd());
    }
}

/// The tarball: /usr/share/{doc,man,perl} when the host has ~30k files there, else a
/// generated tree of 30,000 small files.
pub(crate) fn tarball(base: &Path) -> (PathBuf, usize) {
    let tar = base.join("src.tar");
    let parts: Vec<&str> = ["usr/share/doc", "usr/share/man", "usr/share/perl"]
        .into_iter()
        .filter(|p| Path::new("/").join(p).exists())
        .collect();
    let count = |p: &str| walkdir_count(&Path::new("/").join(p));
    let files: usize = parts.iter().map(|p| count(p)).sum();
    if files >= 25_000 {
        let mut c = Command::new("tar");
        c.arg("-cf").arg(&tar).arg("-C").arg("/").args(&parts);
        run_bounded(c, Duration::from_secs(600));
        return (tar, files);
    }
    let g = base.join("gen");
    for d in 0..300 {
        let dir = g.join(format!("pkg{d:03}/doc"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..100 {
            fs::write(dir.join(format!("file{f:03}.txt")), vec![b'x'; 200 + (f * 97 % 8000)]).unwrap();
        }
    }
    let mut c = Command::new("tar");
    c.arg("-cf").arg(&tar).arg("-C").arg(&g).arg(".");
    run_bounded(c, Duration::from_secs(600));
    let _ = fs::remove_dir_all(&g);
    (tar, 30_000 + 600)
}

fn walkdir_count(p: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                n += 1;
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    n
}

fn untar(root: &Path, tar: &Path, run: usize) -> f64 {
    let target = root.join(format!("untar{run}"));
    fs::create_dir_all(&target).unwrap();
    let t = Instant::now();
    let mut c = Command::new("tar");
    c.arg("-C").arg(&target).arg("-xf").arg(tar);
    let o = run_bounded(c, Duration::from_secs(900));
    assert!(o.status.success(), "tar: {}", String::from_utf8_lossy(&o.stderr));
    durable(&target);
    let s = t.elapsed().as_secs_f64();
    let _ = fs::remove_dir_all(&target);
    s
}

fn fsync_iops(root: &Path, n: usize) -> f64 {
    let p = root.join("fsync-test");
    let iops = fsync_file(&p, n);
    let _ = fs::remove_file(&p);
    iops
}

/// 4 KiB write + fdatasync, `n` times, into `p`: IOPS.
pub(crate) fn fsync_file(p: &Path, n: usize) -> f64 {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(p)
        .unwrap();
    let buf = vec![0x5au8; 4096];
    let t = Instant::now();
    for i in 0..n {
        f.write_all_at(&buf, (i * 4096) as u64).unwrap();
        f.sync_data().unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// `mib` MiB of 1 MiB writes into `p`, then fsync: MB/s.
pub(crate) fn seq_write(p: &Path, mib: usize) -> f64 {
    let chunk = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::create(p).unwrap();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    mib as f64 / t.elapsed().as_secs_f64()
}

/// All of `p` in 1 MiB reads: MB/s (drop its cache first for a cold read).
pub(crate) fn seq_read(p: &Path) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut f = fs::File::open(p).unwrap();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    (total >> 20) as f64 / t.elapsed().as_secs_f64()
}

/// (write MB/s, cold read MB/s) of a `mib` MiB file; `backing` finds the file that holds
/// the contents on the host (to drop its cache too).
fn seq(root: &Path, mib: usize, backing: &dyn Fn(&Path) -> Option<PathBuf>) -> (f64, f64) {
    let p = root.join("seq-test");
    let w = seq_write(&p, mib);
    drop_cache(&p);
    if let Some(b) = backing(&p) {
        drop_cache(&b);
    }
    let r = seq_read(&p);
    let _ = fs::remove_file(&p);
    (w, r)
}

fn cached_kib() -> i64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Cached:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn read_all(dir: &Path, files: usize) {
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..files {
        let mut f = fs::File::open(dir.join(format!("shared/lib{i:02}.so"))).unwrap();
        while f.read(&mut buf).unwrap() > 0 {}
    }
}

pub fn run(bin: &Path) {
    let runs = arg("--runs", 7).max(3);
    let seq_mib = arg("--seq-mib", 1024);
    let n_mounts = arg("--mounts", 50);
    let base = Dir(PathBuf::from(format!("/var/tmp/vessel-fsbench-{}", std::process::id())));
    fs::create_dir_all(&base.0).unwrap();
    let base = &base;
    // The template: 50 MB of "shared libraries" plus a few small files.
    let tpl = base.0.join("tpl");
    fs::create_dir_all(tpl.join("shared")).unwrap();
    fs::create_dir_all(tpl.join("etc")).unwrap();
    fs::write(tpl.join("etc/hostname"), "tpl\n").unwrap();
    let shared_files = 50;
    for i in 0..shared_files {
        let data: Vec<u8> = (0..1 << 20).map(|k: usize| (k * 31 + i * 7) as u8).collect();
        fs::write(tpl.join(format!("shared/lib{i:02}.so")), data).unwrap();
    }
    let (tar, files) = tarball(&base.0);
    eprintln!(
        "untar source: {files} entries, {} MB",
        fs::metadata(&tar).unwrap().len() >> 20
    );

    let ext4 = base.0.join("ext4");
    fs::create_dir_all(&ext4).unwrap();
    let mut vfs = FsServer::new(bin, "bench", Some(&tpl));
    vfs.start(&[]).expect("vessel __fs-serve");
    let ovl = Ovl::mount(&base.0, &tpl, "main");
    let vol = vfs.vol.clone();
    let upper = ovl.upper.clone();
    let roots: [(&str, PathBuf, Backing); 3] = [
        ("ext4", ext4.clone(), Box::new(|_: &Path| None)),
        (
            "vessel-fs",
            vfs.mnt.clone(),
            Box::new(move |p: &Path| {
                let ino = fs::metadata(p).ok()?.ino();
                Some(vol.join("data").join(vessel_fs::volume::data_name(ino)))
            }),
        ),
        (
            "fuse-overlayfs",
            ovl.mnt.clone(),
            Box::new(move |p: &Path| Some(upper.join(p.file_name()?))),
        ),
    ];

    // Warm up each once (page cache of the tarball, first allocations).
    for (_, r, _) in &roots {
        untar(r, &tar, 999);
    }
    let mut un: [Vec<f64>; 3] = Default::default();
    let mut io: [Vec<f64>; 3] = Default::default();
    let mut sw: [Vec<f64>; 3] = Default::default();
    let mut sr: [Vec<f64>; 3] = Default::default();
    for run in 0..runs {
        // Alternate the order between runs.
        let order: Vec<usize> = if run % 2 == 0 { vec![0, 1, 2] } else { vec![2, 1, 0] };
        for &i in &order {
            un[i].push(untar(&roots[i].1, &tar, run));
            io[i].push(fsync_iops(&roots[i].1, 1000));
        }
        if run < runs.min(5) {
            for &i in &order {
                let (w, r) = seq(&roots[i].1, seq_mib, &*roots[i].2);
                sw[i].push(w);
                sr[i].push(r);
            }
        }
        eprintln!(
            "run {run}: untar {:.2}/{:.2}/{:.2} s, fsync {:.0}/{:.0}/{:.0} IOPS (ext4/vessel-fs/fuse-overlayfs)",
            un[0][run], un[1][run], un[2][run], io[0][run], io[1][run], io[2][run]
        );
    }
    let m = |v: &mut Vec<f64>| median(v);
    let (u, i, w, r): (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) = (
        un.iter_mut().map(m).collect(),
        io.iter_mut().map(m).collect(),
        sw.iter_mut().map(m).collect(),
        sr.iter_mut().map(m).collect(),
    );

    // Cold sequential read of template files: passthrough on vessel-fs.
    let mut tr: [Vec<f64>; 3] = Default::default();
    for _ in 0..3 {
        for (k, root) in [&tpl, &vfs.mnt, &ovl.mnt].iter().enumerate() {
            for f in 0..shared_files {
                drop_cache(&root.join(format!("shared/lib{f:02}.so")));
                drop_cache(&tpl.join(format!("shared/lib{f:02}.so")));
            }
            let t = Instant::now();
            read_all(root, shared_files);
            tr[k].push(shared_files as f64 / t.elapsed().as_secs_f64());
        }
    }
    let t: Vec<f64> = tr.iter_mut().map(m).collect();

    // Page cache: N volumes of one template each read the same 50 MB.
    let mut mem = [0f64; 3];
    {
        let mut servers = Vec::new();
        for k in 0..n_mounts {
            let mut s = FsServer::new(bin, &format!("m{k}"), Some(&tpl));
            s.start(&[]).expect("vessel __fs-serve");
            servers.push(s);
        }
        let ovls: Vec<Ovl> = (0..n_mounts)
            .map(|k| Ovl::mount(&base.0, &tpl, &format!("m{k}")))
            .collect();
        let measure = |dirs: &[PathBuf]| -> f64 {
            for f in 0..shared_files {
                drop_cache(&tpl.join(format!("shared/lib{f:02}.so")));
            }
            std::thread::sleep(Duration::from_millis(300));
            let before = cached_kib();
            for d in dirs {
                read_all(d, shared_files);
            }
            (cached_kib() - before) as f64 / 1024.0
        };
        let ext4_dirs: Vec<PathBuf> = (0..n_mounts).map(|_| tpl.clone()).collect();
        let vfs_dirs: Vec<PathBuf> = servers.iter().map(|s| s.mnt.clone()).collect();
        let ovl_dirs: Vec<PathBuf> = ovls.iter().map(|o| o.mnt.clone()).collect();
        // The machine's page cache moves for other reasons too: medians of three.
        for (k, dirs) in [&ext4_dirs, &vfs_dirs, &ovl_dirs].into_iter().enumerate() {
            let mut v: Vec<f64> = (0..3).map(|_| measure(dirs)).collect();
            mem[k] = median(&mut v);
        }
    }
    drop(ovl);
    drop(vfs);

    println!("vessel-fs benchmark ({runs} runs, medians; seq {seq_mib} MiB, {n_mounts} volumes for memory)");
    println!(
        "{:<34} {:>12} {:>12} {:>15}",
        "workload", "ext4", "vessel-fs", "fuse-overlayfs"
    );
    let row = |name: &str, v: &[f64], unit: &str| {
        println!(
            "{:<34} {:>12} {:>12} {:>15}",
            name,
            format!("{:.2}{unit}", v[0]),
            format!("{:.2}{unit}", v[1]),
            format!("{:.2}{unit}", v[2])
        );
    };
    row(&format!("untar {files} files + sync (s)"), &u, "");
    row("4 KiB write+fdatasync (IOPS)", &i, "");
    row(&format!("{seq_mib} MiB seq write+fsync (MB/s)"), &w, "");
    row(&format!("{seq_mib} MiB cold seq read (MB/s)"), &r, "");
    row("template 50 MB cold read (MB/s)", &t, "");
    row(&format!("page cache, {n_mounts} x 50 MB (MiB)"), &mem, "");
    println!(
        "ratios vs ext4: untar x{:.2} (fuse-overlayfs x{:.2}), fsync x{:.2}, seq write x{:.2}, seq read x{:.2}, template read x{:.2}",
        u[1] / u[0],
        u[2] / u[0],
        i[1] / i[0],
        w[1] / w[0],
        r[1] / r[0],
        t[1] / t[0]
    );
    println!(
        "vessel-fs: untar x{:.2} ext4, fsync x{:.2} ext4, seqread x{:.2} ext4",
        u[1] / u[0],
        i[1] / i[0],
        r[1] / r[0]
    );
    if arg("--in-ve", 1) == 0 {
        return;
    }
    // The same workloads inside real VEs, as a customer feels them (the rows above go
    // through the mount from the host).
    println!();
    let ve = crate::fsve::run(bin, &tar, files);
    let host = crate::fsve::Ratios {
        untar: u[1] / u[0],
        fsync: i[1] / i[0],
        seqwrite: w[1] / w[0],
        seqread: r[1] / r[0],
    };
    println!();
    println!(
        "{:<34} {:>8} {:>8} {:>9} {:>8}",
        "vessel-fs / ext4", "untar", "fsync", "seqwrite", "seqread"
    );
    for (name, x) in [("in a VE", ve), ("from the host, through the mount", host)] {
        println!(
            "{name:<34} {:>8} {:>8} {:>9} {:>8}",
            format!("x{:.2}", x.untar),
            format!("x{:.2}", x.fsync),
            format!("x{:.2}", x.seqwrite),
            format!("x{:.2}", x.seqread)
        );
    }
    println!("{}", ve.line());
}
