//! VEs on vessel-fs through the daemon: export/import (backup and recovery), quotas seen
//! inside a VE, file history in `ve show`.

mod common;
use common::*;
use std::process::Stdio;

#[test]
fn export_then_import_brings_back_every_change() {
    if !need_root("export_then_import_brings_back_every_change") {
        return;
    }
    let node = start("exp");
    node.ensure_busybox();
    node.ok(&["ve", "create", "src", "-t", "busybox", "--start"]);
    node.sh(
        "src",
        "mkdir -p /srv/app/data && echo v1 > /srv/app/conf && echo payload > /srv/app/data/blob && \
         ln /srv/app/conf /srv/app/conf.hard && ln -s conf /srv/app/conf.sym && mkfifo /srv/app/pipe && \
         chmod 0640 /srv/app/conf && chown 1000:1000 /srv/app/data/blob && \
         echo 'motd of src' > /etc/motd && rm /etc/inittab.d 2>/dev/null; rm -f /etc/shells; \
         rm -rf /usr/share/udhcpc 2>/dev/null; sync",
    );
    let want = node.sh(
        "src",
        "cd / && ls -la /srv/app /srv/app/data | grep -v ^total && cat /srv/app/conf /srv/app/data/blob /etc/motd && \
         test ! -e /etc/shells && echo no-shells && stat -c '%h %a %u' /srv/app/conf /srv/app/data/blob",
    );
    let backup = node.root.join("src.tar");
    let o = node
        .command()
        .args(["ve", "export", "src"])
        .stdout(std::fs::File::create(&backup).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(o.status.success(), "export: {}", err(&o));
    let len = std::fs::metadata(&backup).unwrap().len();
    assert!(
        len > 1024 && len < 10 << 20,
        "the export holds the changes only ({len} bytes)"
    );
    // A terminal is refused; garbage is refused with a clear message and leaves nothing.
    let junk = node.root.join("junk.tar");
    std::fs::write(&junk, b"not a tar stream at all").unwrap();
    let o = node
        .command()
        .args(["ve", "import", "--name", "junk"])
        .stdin(std::fs::File::open(&junk).unwrap())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(err(&o).starts_with("vessel: "), "{}", err(&o));
    assert!(!node.ok(&["ve", "list"]).contains("junk"));

    node.ok(&["ve", "destroy", "--force", "src"]);
    let o = node
        .command()
        .args(["ve", "import", "--start"])
        .stdin(std::fs::File::open(&backup).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "import: {}", err(&o));
    let got = node.sh(
        "src",
        "cd / && ls -la /srv/app /srv/app/data | grep -v ^total && cat /srv/app/conf /srv/app/data/blob /etc/motd && \
         test ! -e /etc/shells && echo no-shells && stat -c '%h %a %u' /srv/app/conf /srv/app/data/blob",
    );
    assert_eq!(got, want);
    // A second copy under another name runs beside it.
    let o = node
        .command()
        .args(["ve", "import", "--name", "copy", "--start"])
        .stdin(std::fs::File::open(&backup).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "import copy: {}", err(&o));
    assert_eq!(node.sh("copy", "cat /etc/motd"), "motd of src\n");
    let ip = |v: &str| {
        node.json(&["ve", "show", v])["spec"]["ip"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(ip("copy"), ip("src"));
}

#[test]
fn disk_quota_is_enospc_inside_and_show_reports_files_and_history() {
    if !need_root("disk_quota_is_enospc_inside_and_show_reports_files_and_history") {
        return;
    }
    let node = start("quota");
    node.ensure_busybox();
    node.ok(&["ve", "create", "q", "-t", "busybox", "--disk", "4M", "--start"]);
    let o = node.exec("q", "dd if=/dev/zero of=/root/fill bs=1M count=8");
    assert!(!o.status.success());
    assert!(err(&o).contains("No space left"), "{}", err(&o));
    assert_eq!(node.sh("q", "df -k / | tail -1 | awk '{print $2}'").trim(), "4096");
    node.sh("q", "rm /root/fill && echo fine > /root/after");
    assert_eq!(node.sh("q", "cat /root/after"), "fine\n");
    // Raised live.
    node.ok(&["ve", "set", "q", "--disk", "64M"]);
    node.sh("q", "dd if=/dev/zero of=/root/fill bs=1M count=8 2>/dev/null; sync");
    let v = node.json(&["ve", "show", "q"]);
    let fs = &v["fs"];
    assert!(fs["used_bytes"].as_u64().unwrap() >= 8 << 20, "{v}");
    assert!(fs["last_seq"].as_u64().unwrap() > 0);
    assert!(fs["oldest_ns"].as_i64().is_some());
    assert!(node.ok(&["ve", "show", "q"]).contains("history:"));
}
