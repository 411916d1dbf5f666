//! Regression tests from the escape battery against vessel-fs: root inside a VE (or a
//! crafted archive) acting as an attacker on the daemon that serves every VE's files.
//! Each test is named after the hole it closes.

mod common;
use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn daemon_alive(node: &TestNode) -> bool {
    // SAFETY: signal 0 to our own child only checks that it exists.
    node.daemon_pid()
        .is_some_and(|p| unsafe { libc::kill(p as i32, 0) } == 0)
}

/// Wait for a child we spawned, bounded; kills it on timeout.
fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a CLI command with files for stdin and stdout, bounded in time.
fn run_files(mut cmd: std::process::Command, stdin: Stdio, stdout: Stdio) -> std::process::Output {
    cmd.stdin(stdin).stdout(stdout).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut e = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = e.read_to_end(&mut s);
        s
    });
    let status = wait_bounded(&mut child, Duration::from_secs(300));
    std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: t.join().unwrap_or_default(),
    }
}

fn export_to(node: &TestNode, ve: &str, to: &Path) -> std::process::Output {
    let mut cmd = node.command();
    cmd.args(["ve", "export", ve]);
    run_files(cmd, Stdio::null(), std::fs::File::create(to).unwrap().into())
}

fn import_from(node: &TestNode, from: &Path, name: &str) -> std::process::Output {
    let mut cmd = node.command();
    cmd.args(["ve", "import", "--name", name, "--start"]);
    run_files(cmd, std::fs::File::open(from).unwrap().into(), Stdio::null())
}

#[test]
fn deep_tree_of_30000_dirs_does_not_overflow_the_daemon_stack() {
    if !need_root("deep_tree_of_30000_dirs_does_not_overflow_the_daemon_stack") {
        return;
    }
    let node = start("deep");
    node.ensure_busybox();
    node.ok(&["ve", "create", "deep", "-t", "busybox", "--start"]);
    // 30 chains of 1000 levels (each path under PATH_MAX), each moved under the next.
    let made = node.sh(
        "deep",
        "P=d; i=1; while [ $i -lt 1000 ]; do P=$P/d; i=$((i+1)); done; \
         mkdir -p /w/$P && echo leaf > /w/$P/f || exit 1; \
         k=1; while [ $k -lt 30 ]; do mkdir -p /n/$P && mv /w/d /n/$P/ && rmdir /w && mv /n /w || exit 1; \
         k=$((k+1)); done; mv /w/d /d && rmdir /w && echo made",
    );
    assert_eq!(made, "made\n");
    // Each answers (here: a bounded answer that says what it left out) ...
    let diff = node.json(&["ve", "diff", "deep"]);
    let items = diff.as_array().unwrap();
    assert!(items.iter().any(|i| i["path"] == "/d"), "{}", items[0]);
    let last = items.last().unwrap();
    assert_eq!(last["change"], "truncated", "{last}");
    assert!(last["path"].as_str().unwrap().contains("more changes not listed"));
    let hist = node.json(&["ve", "history", "deep", "/"]);
    let last = hist.as_array().unwrap().last().unwrap().clone();
    assert!(
        last["what"].as_str().unwrap().contains("more changes not listed"),
        "{last}"
    );
    let h = node.ok(&["ve", "history", "deep", "/d"]);
    assert!(h.contains("rename /w/d -> /d"), "{}", &h[..h.len().min(2000)]);
    let o = export_to(&node, "deep", Path::new("/dev/null"));
    assert!(o.status.success(), "export: {}", err(&o));
    node.ok(&["ve", "revert", "deep", "/d", "--template"]);
    // ... and the daemon is still there, serving the VE.
    assert!(daemon_alive(&node), "daemon died; log:\n{}", node.daemon_log());
    node.ok(&["status"]);
    assert_eq!(node.sh("deep", "test ! -e /d && echo gone"), "gone\n");
    assert!(node
        .json(&["ve", "diff", "deep"])
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["path"] != "/d"));
}

const G100: u64 = 100 << 30;

#[test]
fn sparse_100g_file_exports_as_sparse_and_imports_with_its_holes() {
    if !need_root("sparse_100g_file_exports_as_sparse_and_imports_with_its_holes") {
        return;
    }
    let node = start("sparse");
    node.ensure_busybox();
    // Quotas count a file's size (not its blocks): room for the 100 GB sparse file.
    node.ok(&["ve", "create", "sp", "-t", "busybox", "--disk", "1T", "--start"]);
    node.sh(
        "sp",
        &format!(
            "truncate -s {G100} /root/big && printf head | dd of=/root/big conv=notrunc 2>/dev/null && \
             printf mid | dd of=/root/big bs=1 seek={} conv=notrunc 2>/dev/null && \
             printf tail | dd of=/root/big bs=1 seek={} conv=notrunc 2>/dev/null && sync",
            G100 / 2,
            G100 - 4
        ),
    );
    let backup = node.root.join("sp.tar");
    let o = export_to(&node, "sp", &backup);
    assert!(o.status.success(), "export: {}", err(&o));
    let len = std::fs::metadata(&backup).unwrap().len();
    assert!(len < 1 << 20, "a 100 GB sparse file exports small ({len} bytes)");
    let o = import_from(&node, &backup, "sp2");
    assert!(o.status.success(), "import: {}", err(&o));
    let got = node.sh(
        "sp2",
        &format!(
            "stat -c %s /root/big; dd if=/root/big bs=4 count=1 2>/dev/null; echo; \
             dd if=/root/big bs=1 skip={} count=3 2>/dev/null; echo; \
             dd if=/root/big bs=1 skip={} count=4 2>/dev/null; echo; \
             dd if=/root/big bs=1 skip={} count=4 2>/dev/null | od -An -tx1; du -k /root/big | cut -f1",
            G100 / 2,
            G100 - 4,
            G100 / 4
        ),
    );
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(&lines[..4], [&*G100.to_string(), "head", "mid", "tail"], "{got}");
    assert_eq!(lines[4].trim(), "00 00 00 00", "a hole reads zeros: {got}");
    let kib: u64 = lines[5].trim().parse().unwrap();
    assert!(kib < 1024, "the holes came back as holes ({kib} KiB on disk)");
}

#[test]
fn export_neither_holds_the_ve_lock_nor_outlives_its_reader() {
    if !need_root("export_neither_holds_the_ve_lock_nor_outlives_its_reader") {
        return;
    }
    let node = start("expipe");
    node.ensure_busybox();
    node.ok(&["ve", "create", "ex", "-t", "busybox", "--start"]);
    // Far more than the daemon's buffer and the pipe hold.
    node.sh(
        "ex",
        "dd if=/dev/urandom of=/root/blob bs=1M count=32 2>/dev/null && sync",
    );
    let mut child = node
        .command()
        .args(["ve", "export", "ex"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = child.stdout.take().unwrap();
    let mut first = vec![0u8; 64 << 10];
    reader.read_exact(&mut first).unwrap();
    // The stream is stalled on a full pipe now. The VE's lock is free meanwhile.
    node.ok(&["ve", "diff", "ex"]);
    node.ok(&["ve", "history", "ex", "/root"]);
    // The reader goes: the export ends (with the write error), it does not stream on.
    drop(reader);
    let st = wait_bounded(&mut child, Duration::from_secs(120));
    let mut e = String::new();
    child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    assert!(!st.success(), "the export cannot have completed: {e}");
    assert!(e.contains("Broken pipe") || e.contains("broken pipe"), "{e}");
    assert!(daemon_alive(&node));
    node.ok(&["ve", "stop", "ex"]);
    node.ok(&["ve", "start", "ex"]);
    assert_eq!(node.sh("ex", "ls /root/blob"), "/root/blob\n");
}

#[test]
fn export_ends_when_the_client_dies_with_its_output_still_open() {
    if !need_root("export_ends_when_the_client_dies_with_its_output_still_open") {
        return;
    }
    let node = start("exkill");
    node.ensure_busybox();
    node.ok(&["ve", "create", "ek", "-t", "busybox", "--start"]);
    node.sh(
        "ek",
        "dd if=/dev/urandom of=/root/blob bs=1M count=96 2>/dev/null && sync",
    );
    // The output is a pipe this test holds open (as a shell pipeline or a backup tool
    // would); the CLI that asked for the export is killed.
    let (r, w) = nix::unistd::pipe().unwrap();
    let mut child = node
        .command()
        .args(["ve", "export", "ek"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = std::fs::File::from(r);
    let mut first = vec![0u8; 1 << 20];
    reader.read_exact(&mut first).unwrap();
    child.kill().unwrap();
    let _ = wait_bounded(&mut child, Duration::from_secs(30));
    // Nobody reads for a while: the daemon sees the hang-up and lets go of the output.
    std::thread::sleep(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut total = first.len();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        assert!(
            Instant::now() < deadline,
            "the export still streams after its client died"
        );
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("read: {e}"),
        }
    }
    assert!(
        total < 48 << 20,
        "the export went on after its client died: {total} bytes of ~96 MiB"
    );
    assert!(daemon_alive(&node));
    assert!(node.ok(&["ve", "list"]).contains("ek"));
}

/// The description of a real export (to put crafted entries behind).
fn export_meta(node: &TestNode, ve: &str) -> Vec<u8> {
    let p = node.root.join(format!("{ve}-meta.tar"));
    let o = export_to(node, ve, &p);
    assert!(o.status.success(), "export: {}", err(&o));
    let bytes = std::fs::read(&p).unwrap();
    let mut ar = tar::Archive::new(&bytes[..]);
    let mut e = ar.entries().unwrap().next().unwrap().unwrap();
    let mut meta = Vec::new();
    e.read_to_end(&mut meta).unwrap();
    meta
}

struct Entry<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    uid: u64,
    xattrs: Vec<(&'a str, Vec<u8>)>,
    data: Vec<u8>,
    dev: Option<(u32, u32)>,
}

impl<'a> Entry<'a> {
    fn file(name: &'a [u8]) -> Self {
        Entry {
            name,
            kind: tar::EntryType::Regular,
            uid: 0,
            xattrs: Vec::new(),
            data: Vec::new(),
            dev: None,
        }
    }
}

/// An export stream by hand: the description, then `entries` (names written raw, past the
/// tar crate's own checks).
fn crafted_tar(meta: &[u8], entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(meta.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "vessel-export.json", meta).unwrap();
    for e in entries {
        if !e.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), &v[..]))
                .collect();
            b.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(e.kind);
        h.set_mode(0o755);
        h.set_uid(e.uid);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(e.data.len() as u64);
        h.as_gnu_mut().unwrap().name[..e.name.len()].copy_from_slice(e.name);
        if let Some((ma, mi)) = e.dev {
            h.set_device_major(ma).unwrap();
            h.set_device_minor(mi).unwrap();
        }
        h.set_cksum();
        b.append(&h, &e.data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// security.capability: cap_net_raw and cap_net_bind_service, effective, v3 rooted at
/// `root` (capabilities inside this machine's bounding set, so that they would show if
/// they applied: a set beyond it makes the exec fail instead).
fn net_caps_v3(root: u32) -> Vec<u8> {
    let mut v = 0x0300_0001u32.to_le_bytes().to_vec();
    v.extend_from_slice(&((1u32 << 13) | (1 << 10)).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v.extend_from_slice(&root.to_le_bytes());
    v
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: c and n are NUL-terminated; buf is valid for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

#[test]
fn crafted_tar_cannot_give_host_capabilities_owners_or_devices() {
    if !need_root("crafted_tar_cannot_give_host_capabilities_owners_or_devices") {
        return;
    }
    let node = start("crafted");
    node.ensure_busybox();
    node.ok(&["ve", "create", "src", "-t", "busybox"]);
    let meta = export_meta(&node, "src");
    let write = |name: &str, bytes: Vec<u8>| -> PathBuf {
        let p = node.root.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (t, p, i) in [
        (1u16, 7u16, 0u32),
        (2, 7, 1 << 20),
        (4, 5, 0),
        (0x10, 7, 0),
        (0x20, 0, 0),
    ] {
        acl.extend_from_slice(&t.to_le_bytes());
        acl.extend_from_slice(&p.to_le_bytes());
        acl.extend_from_slice(&i.to_le_bytes());
    }
    let refused: Vec<(&str, Entry, &str)> = vec![
        (
            "capabilities rooted at a host id",
            Entry {
                xattrs: vec![("security.capability", net_caps_v3(1 << 20))],
                ..Entry::file(b"rootfs/root/evil")
            },
            "outside the VE",
        ),
        (
            "a host owner",
            Entry {
                uid: 100_000,
                ..Entry::file(b"rootfs/root/evil")
            },
            "owner 100000",
        ),
        (
            "a device",
            Entry {
                kind: tar::EntryType::Char,
                dev: Some((1, 1)),
                ..Entry::file(b"rootfs/root/mem")
            },
            "device node 1:1",
        ),
        (
            "a path out of the tree",
            Entry::file(b"rootfs/../../../../tmp/evil"),
            "`..`",
        ),
        ("an absolute path", Entry::file(b"/etc/evil"), "absolute"),
        (
            "an ACL naming a host id",
            Entry {
                xattrs: vec![("system.posix_acl_access", acl.clone())],
                ..Entry::file(b"rootfs/root/evil")
            },
            "outside the VE",
        ),
    ];
    for (i, (what, entry, want)) in refused.into_iter().enumerate() {
        let p = write(&format!("bad{i}.tar"), crafted_tar(&meta, &[entry]));
        let o = import_from(&node, &p, &format!("bad{i}"));
        assert!(!o.status.success(), "{what} was accepted");
        assert!(err(&o).contains(want), "{what}: {}", err(&o));
        assert!(
            !node.ok(&["ve", "list"]).contains(&format!("bad{i}")),
            "{what}: nothing is left"
        );
    }

    // v3 rooted at 0 (the VE's root, in an archive's VE-relative ids) on a copy of the
    // VE's busybox: it must be rooted at the VE's root on the host, never at host root.
    let info = node.json(&["ve", "show", "src"]);
    let tpl = node
        .root
        .join("templates")
        .join(info["template_id"].as_str().unwrap())
        .join("rootfs");
    let busybox = std::fs::read(tpl.join("bin/busybox")).unwrap();
    let p = write(
        "caps.tar",
        crafted_tar(
            &meta,
            &[Entry {
                xattrs: vec![("security.capability", net_caps_v3(0))],
                data: busybox,
                // busybox runs the applet named in argv[1] when its name starts so.
                ..Entry::file(b"rootfs/busybox-capped")
            }],
        ),
    );
    let o = import_from(&node, &p, "capped");
    assert!(o.status.success(), "import: {}", err(&o));
    let uid_base = node.json(&["ve", "show", "capped"])["uid_base"].as_u64().unwrap() as u32;
    let file = node.root.join("ves/capped/rootfs/busybox-capped");
    let cap = getxattr(&file, "security.capability").unwrap();
    assert_eq!(cap.len(), 24, "v3 as the kernel reads it");
    assert_eq!(
        u32::from_le_bytes(cap[20..24].try_into().unwrap()),
        uid_base,
        "rooted at the VE's root"
    );
    // A host user running it gets nothing (rooted at host root, as the crafted value was
    // stored before, it would get CapEff 0000000000002400 here).
    let mut dir = file.parent().unwrap().to_path_buf();
    while dir != node.root {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(&dir).unwrap().permissions().mode();
        if m & 0o001 == 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m | 0o001)).unwrap();
        }
        dir.pop();
    }
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&file)
        .args(["grep", "^CapEff", "/proc/self/status"]);
    let o = run_bounded(cmd, Duration::from_secs(60));
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o).trim(), "CapEff:\t0000000000000000", "{}", out(&o));
}
