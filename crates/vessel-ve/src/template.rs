//! Templates: immutable OS trees shared by every VE made from them. A template is
//! content-addressed: its id is the sha256 of its manifest, which lists every entry with
//! type, mode, owner, size and (for files) the sha256 of the content. Building the same
//! tree twice gives the same id, and a tree that no longer matches its manifest is caught.
//! Installing into the node's store is in `store`.

use crate::buildcache::{unique_suffix, CacheEntry, CacheError, CacheKey, CacheState};
pub use crate::store::{install, is_installed, is_scratch, remove_scratch, remove_template, staging_dir};
use crate::Progress;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use vessel_types::api::TemplateKind;

/// Version of the manifest and template metadata format.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("busybox not found at {0}: install the busybox-static package")]
    NoBusybox(PathBuf),
    #[error("{0} is not a static busybox (it would not run inside a VE): install busybox-static")]
    BusyboxNotStatic(PathBuf),
    #[error("debootstrap not found: install the debootstrap package")]
    NoDebootstrap,
    #[error("no Debian mirror for '{0}' in the host's apt sources (/etc/apt/sources.list*): add one or set VESSEL_DEBIAN_MIRROR")]
    NoMirror(String),
    #[error("{tool} failed ({status}): {tail}")]
    Tool {
        tool: &'static str,
        status: String,
        tail: String,
    },
    #[error("template manifest {path} is corrupt: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("build cache: {0}")]
    Cache(#[from] CacheError),
}

type Result<T> = std::result::Result<T, TemplateError>;

pub(crate) fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// The content address: sha256 over the canonical JSON of the manifest.
    pub fn id(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("manifest serializes");
        hex::encode(Sha256::digest(bytes))
    }
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// Metadata stored beside a template: what it is and how to run and stop its init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub version: u32,
    pub kind: TemplateKind,
    pub init: Vec<String>,
    /// Signal that asks the init to shut the VE down cleanly.
    pub stop_signal: i32,
    pub created_unix: u64,
    pub files: u64,
    pub bytes: u64,
}

/// Walk `root` (not following symlinks) and describe every entry, sorted by path.
pub fn scan(root: &Path) -> Result<Manifest> {
    let mut entries = Vec::new();
    walk(root, Path::new(""), &mut entries)?;
    Ok(Manifest {
        version: MANIFEST_VERSION,
        entries,
    })
}

/// The kind of an entry that is neither a directory nor a regular file (a symlink with its
/// target, a device with its number, a fifo or a socket), from its `lstat`.
pub(crate) fn set_special(e: &mut Entry, md: &std::fs::Metadata, p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let ft = md.file_type();
    if ft.is_symlink() {
        e.kind = EntryKind::Symlink;
        e.target = Some(std::fs::read_link(p)?.to_string_lossy().into_owned());
    } else if ft.is_char_device() {
        e.kind = EntryKind::Char;
        e.rdev = md.rdev();
    } else if ft.is_block_device() {
        e.kind = EntryKind::Block;
        e.rdev = md.rdev();
    } else if ft.is_fifo() {
        e.kind = EntryKind::Fifo;
    } else {
        e.kind = EntryKind::Socket;
    }
    Ok(())
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<Entry>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io("read directory", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(io("read directory", &dir))?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let p = root.join(&r);
        let md = std::fs::symlink_metadata(&p).map_err(io("stat", &p))?;
        let ft = md.file_type();
        let mut e = Entry {
            path: r.to_string_lossy().into_owned(),
            kind: EntryKind::Dir,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: 0,
            sha256: None,
            target: None,
            rdev: 0,
        };
        if ft.is_dir() {
            out.push(e);
            walk(root, &r, out)?;
            continue;
        } else if ft.is_file() {
            e.kind = EntryKind::File;
            e.size = md.len();
            e.sha256 = Some(hash_file(&p)?);
        } else {
            set_special(&mut e, &md, &p).map_err(io("read link", &p))?;
        }
        out.push(e);
    }
    Ok(())
}

fn hash_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).map_err(io("open", p))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf).map_err(io("read", p))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Compare a template tree with its manifest; returns the paths that differ.
pub fn verify(root: &Path, manifest: &Manifest) -> Result<Vec<String>> {
    let now = scan(root)?;
    let mut bad = Vec::new();
    let mut a = manifest.entries.iter().peekable();
    let mut b = now.entries.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(x), Some(y)) if x.path == y.path => {
                if x != y {
                    bad.push(x.path.clone());
                }
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x.path < y.path => {
                bad.push(x.path.clone());
                a.next();
            }
            (Some(x), None) => {
                bad.push(x.path.clone());
                a.next();
            }
            (_, Some(y)) => {
                bad.push(y.path.clone());
                b.next();
            }
        }
    }
    Ok(bad)
}

/// Fill `rootfs` (an empty directory) with a busybox system: the static busybox binary,
/// a link per applet, and the few files an init and a login need.
pub fn build_busybox(rootfs: &Path, busybox: &Path, progress: &mut Progress) -> Result<TemplateMeta> {
    if !busybox.exists() {
        return Err(TemplateError::NoBusybox(busybox.to_path_buf()));
    }
    let head = std::fs::read(busybox).map_err(io("read", busybox))?;
    if is_dynamic_elf(&head) {
        return Err(TemplateError::BusyboxNotStatic(busybox.to_path_buf()));
    }
    progress("installing busybox", 1, 3);
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "dev",
        "proc",
        "sys",
        "tmp",
        "root",
        "run",
        "var/log",
        "var/run",
        "home",
        "mnt",
    ] {
        let p = rootfs.join(d);
        std::fs::create_dir_all(&p).map_err(io("create", &p))?;
    }
    set_mode(&rootfs.join("tmp"), 0o1777)?;
    set_mode(&rootfs.join("root"), 0o700)?;
    let bb = rootfs.join("bin/busybox");
    std::fs::write(&bb, &head).map_err(io("write", &bb))?;
    set_mode(&bb, 0o755)?;
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io("run", busybox))?;
    let list = String::from_utf8_lossy(&out.stdout);
    for applet in list.lines().filter(|l| !l.is_empty() && *l != "bin/busybox") {
        let link = rootfs.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink("/bin/busybox", &link).map_err(io("link", &link))?;
        }
    }
    progress("writing system files", 2, 3);
    for (path, content, mode) in crate::osconfig::busybox_files() {
        let p = rootfs.join(path);
        std::fs::write(&p, content).map_err(io("write", &p))?;
        set_mode(&p, mode)?;
    }
    progress("busybox tree ready", 3, 3);
    Ok(TemplateMeta {
        version: MANIFEST_VERSION,
        kind: TemplateKind::Busybox,
        init: vec!["/sbin/init".into()],
        stop_signal: libc::SIGUSR2,
        created_unix: 0,
        files: 0,
        bytes: 0,
    })
}

fn is_dynamic_elf(bytes: &[u8]) -> bool {
    // A PT_INTERP program header means the binary needs a dynamic loader.
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16at(54), u16at(56));
    (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= bytes.len() && u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4])) == 3
    })
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", p))
}

/// Packages added to Debian's minimal base so the VE is a small server: a real init that
/// runs the services packages install, and the usual process and network tools.
pub const DEBIAN_INCLUDE: &str = "sysvinit-core,procps,iproute2,iputils-ping,netbase";
pub const DEBIAN_SUITE: &str = "bookworm";

/// How long a build waits for another build of the same tree before it gives up.
pub const BUILD_WAIT: Duration = Duration::from_secs(30 * 60);

/// What the cached debootstrap tree of the Debian template is made of.
pub fn debian_cache_key() -> CacheKey {
    CacheKey {
        suite: DEBIAN_SUITE.into(),
        variant: "minbase".into(),
        include: DEBIAN_INCLUDE.into(),
    }
}

/// Fill `rootfs` with Debian 12. The debootstrap result is kept as a tarball in
/// `cache_dir` so later builds on this machine take seconds instead of minutes; builds in
/// any number of daemons sharing `cache_dir` take turns on the entry (see `buildcache`).
pub fn build_debian(rootfs: &Path, mirror: &str, cache_dir: &Path, progress: &mut Progress) -> Result<TemplateMeta> {
    let entry = CacheEntry::debootstrap(cache_dir, debian_cache_key());
    let lock_file = entry.lock_file();
    let lock = entry.lock(BUILD_WAIT, &mut |holder| {
        let who = holder.map(|p| format!(", held by pid {p}")).unwrap_or_default();
        let msg = format!(
            "waiting for another build of debian to finish (at most {} min; lock {}{who})",
            BUILD_WAIT.as_secs() / 60,
            lock_file.display()
        );
        tracing::info!("{msg}");
        progress(&msg, 0, 0);
    })?;
    for t in entry.remove_stale_temps()? {
        tracing::info!("removed {} (left by a build that did not finish)", t.display());
    }
    let tarball = entry.tarball();
    let cached = match entry.state()? {
        CacheState::Missing => false,
        CacheState::Complete(rec) => {
            progress(&format!("checking cached debootstrap tree {}", tarball.display()), 1, 3);
            if entry.verify(&rec)? {
                true
            } else {
                discard(&entry, "its contents do not match its completion record", progress)?;
                false
            }
        }
        CacheState::Stale(why) => {
            discard(&entry, &why, progress)?;
            false
        }
    };
    if cached {
        progress(
            &format!("unpacking cached debootstrap tree {}", tarball.display()),
            1,
            3,
        );
        run_tool(
            "tar",
            Command::new("tar")
                .arg("-xpf")
                .arg(&tarball)
                .arg("--numeric-owner")
                .arg("-C")
                .arg(rootfs),
            progress,
        )?;
    } else {
        debootstrap(rootfs, mirror, progress)?;
        // The cache only saves time: a tree that cannot be kept is still a good template.
        if let Err(e) = store(&entry, rootfs, progress) {
            tracing::warn!("could not keep the debootstrap tree in the cache: {e}");
            progress(&format!("not cached: {e}"), 0, 0);
        }
    }
    drop(lock);
    progress("configuring Debian for a VE", 2, 3);
    for (path, content, mode) in crate::osconfig::debian_files() {
        let p = rootfs.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        }
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, content).map_err(io("write", &p))?;
        set_mode(&p, mode)?;
    }
    // Services that make no sense in a container (hardware clock, kernel modules, udev).
    for s in crate::osconfig::DEBIAN_DISABLED_SERVICES {
        let _ = Command::new("chroot")
            .arg(rootfs)
            .args(["update-rc.d", "-f", s, "remove"])
            .output();
    }
    progress("Debian tree ready", 3, 3);
    Ok(TemplateMeta {
        version: MANIFEST_VERSION,
        kind: TemplateKind::Debian,
        init: vec!["/sbin/init".into()],
        stop_signal: libc::SIGPWR,
        created_unix: 0,
        files: 0,
        bytes: 0,
    })
}

fn discard(entry: &CacheEntry, why: &str, progress: &mut Progress) -> Result<()> {
    let msg = format!(
        "not using cache {}: {why}; building it again",
        entry.tarball().display()
    );
    tracing::warn!("{msg}");
    progress(&msg, 0, 0);
    Ok(entry.discard()?)
}

/// Run debootstrap into `rootfs`. It runs in a mount and pid namespace of its own that die
/// with the daemon: a killed build leaves no processes and no mounts (proc, sys) behind.
fn debootstrap(rootfs: &Path, mirror: &str, progress: &mut Progress) -> Result<()> {
    if which("debootstrap").is_none() {
        return Err(TemplateError::NoDebootstrap);
    }
    progress(&format!("debootstrap {DEBIAN_SUITE} from {mirror}"), 0, 0);
    run_tool(
        "debootstrap",
        Command::new("unshare")
            .args(["--mount", "--pid", "--kill-child", "--", "debootstrap"])
            .arg("--variant=minbase")
            .arg(format!("--include={DEBIAN_INCLUDE}"))
            .arg(DEBIAN_SUITE)
            .arg(rootfs)
            .arg(mirror),
        progress,
    )?;
    // Drop downloaded .debs: they are not part of the OS tree.
    let _ = Command::new("sh")
        .arg("-c")
        .arg("rm -f \"$0\"/var/cache/apt/archives/*.deb")
        .arg(rootfs)
        .status();
    Ok(())
}

/// Keep a fresh debootstrap tree as the cache entry: tar into a temp file of this build's
/// own, then commit it (fsync, rename, completion record). Call it holding the entry's lock.
fn store(entry: &CacheEntry, rootfs: &Path, progress: &mut Progress) -> Result<()> {
    let suffix = unique_suffix();
    let tmp = entry.temp_for(&entry.tarball(), &suffix);
    progress(&format!("caching the tree as {}", entry.tarball().display()), 0, 0);
    let r = run_tool(
        "tar",
        Command::new("tar")
            .arg("-cpf")
            .arg(&tmp)
            .arg("--numeric-owner")
            .arg("-C")
            .arg(rootfs)
            .arg("."),
        progress,
    )
    .and_then(|()| Ok(entry.commit(&tmp, &suffix)?));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map(|_| ())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.exists()))
        .unwrap_or_else(|| {
            ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
        })
}

/// Run a build tool, forwarding each output line as progress and keeping the last lines
/// for the error message.
fn run_tool(tool: &'static str, cmd: &mut Command, progress: &mut Progress) -> Result<()> {
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    }
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; only async-signal-safe calls
    // (sigprocmask, prctl, getppid) and no allocation.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            crate::sys::unblock_all_signals()?;
            die_with_parent(parent)
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| TemplateError::Tool {
            tool,
            status: "could not start".into(),
            tail: e.to_string(),
        })?;
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut tail: Vec<String> = Vec::new();
    let mut done = 0u64;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            done += 1;
            progress(&line, done, 0);
            tail.push(line);
            if tail.len() > 8 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|e| TemplateError::Tool {
        tool,
        status: "wait".into(),
        tail: e.to_string(),
    })?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        tail.extend(
            err.lines()
                .rev()
                .take(8)
                .map(str::to_string)
                .collect::<Vec<_>>()
                .into_iter()
                .rev(),
        );
        return Err(TemplateError::Tool {
            tool,
            status: status.to_string(),
            tail: tail.join(" | "),
        });
    }
    Ok(())
}

/// In a forked child: be killed when the thread that forked it ends, so a build tool never
/// outlives a daemon that was killed. Async-signal-safe.
fn die_with_parent(parent: libc::pid_t) -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        // The parent died before the death signal was armed.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

pub fn read_meta(dir: &Path) -> Result<TemplateMeta> {
    let p = dir.join("template.json");
    let b = std::fs::read(&p).map_err(io("read", &p))?;
    let m: TemplateMeta = serde_json::from_slice(&b).map_err(|e| TemplateError::BadManifest {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    if m.version != MANIFEST_VERSION {
        return Err(TemplateError::BadManifest {
            path: p,
            reason: format!("unsupported version {}", m.version),
        });
    }
    Ok(m)
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join("manifest.json");
    let b = std::fs::read(&p).map_err(io("read", &p))?;
    serde_json::from_slice(&b).map_err(|e| TemplateError::BadManifest {
        path: p,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_content_addressed() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(d.path().join("etc/a"), b"hello").unwrap();
        std::os::unix::fs::symlink("a", d.path().join("etc/b")).unwrap();
        let m1 = scan(d.path()).unwrap();
        assert_eq!(m1.entries.len(), 3);
        assert_eq!(m1.entries[1].path, "etc/a");
        assert_eq!(m1.entries[2].target.as_deref(), Some("a"));
        assert_eq!(m1.id(), scan(d.path()).unwrap().id());
        assert!(verify(d.path(), &m1).unwrap().is_empty());
        std::fs::write(d.path().join("etc/a"), b"changed").unwrap();
        assert_ne!(m1.id(), scan(d.path()).unwrap().id());
        assert_eq!(verify(d.path(), &m1).unwrap(), vec!["etc/a".to_string()]);
    }

    #[test]
    fn detects_dynamic_elf() {
        let ls = std::fs::read("/bin/ls").unwrap();
        assert!(is_dynamic_elf(&ls));
        assert!(!is_dynamic_elf(b"#!/bin/sh\n"));
    }
}
