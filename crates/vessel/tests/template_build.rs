//! Template builds under concurrency. Regression for the first suite run on a fresh
//! machine: two daemons sharing the build cache built `debian` at once and one failed with
//! `rename .../debian-bookworm-minbase.tar.tmp: No such file or directory`.
//!
//! Every test uses a build cache of its own, empty at the start (the machine's
//! /var/cache/vessel is not touched), so each runs debootstrap once (about a minute).
//! To make two builds meet deterministically, the test itself holds the cache entry's lock
//! (as a third builder would) until both builds say they wait, then lets go.

mod common;
use common::*;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use vessel_ve::buildcache::{CacheEntry, CacheState};
use vessel_ve::template::debian_cache_key;

const BUILD_LIMIT: Duration = Duration::from_secs(1800);
const CACHE_WAIT: &str = "waiting for another build of debian to finish";

fn cache_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vessel-test-cache-{tag}-"))
        .tempdir()
        .unwrap()
}

fn node_with_cache(tag: &str, cache: &Path) -> TestNode {
    TestNode::start_with_env(&vessel_bin(), tag, &[("VESSEL_CACHE_DIR", cache.as_os_str())])
}

fn build_cmd(node: &TestNode) -> Command {
    let mut cmd = node.command();
    cmd.args(["template", "build", "debian", "--json"]).stdin(Stdio::null());
    cmd
}

/// The template id a successful build printed.
fn built_id(node: &TestNode, o: &Output) -> String {
    assert!(
        o.status.success(),
        "template build failed ({}):\nstdout: {}\nstderr: {}\ndaemon log:\n{}",
        o.status,
        out(o),
        err(o),
        node.daemon_log()
    );
    let v: serde_json::Value = serde_json::from_str(&out(o)).expect("json output");
    v["id"].as_str().expect("template id").to_string()
}

/// The cache entry's lock, held by the test as another builder would hold it.
struct HeldLock(#[allow(dead_code)] File);

fn hold_lock(cache: &Path) -> HeldLock {
    let entry = CacheEntry::debootstrap(cache, debian_cache_key());
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(entry.lock_file())
        .unwrap();
    // SAFETY: flock on an fd we own; released when the file is dropped.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0, "the fresh cache's lock is free");
    HeldLock(f)
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Exactly one cache entry, complete by its record and matching it byte for byte; no temps.
fn assert_one_good_entry(cache: &Path) {
    assert_eq!(
        names_in(cache),
        vec![
            "debian-bookworm-minbase.json",
            "debian-bookworm-minbase.lock",
            "debian-bookworm-minbase.tar"
        ]
    );
    let entry = CacheEntry::debootstrap(cache, debian_cache_key());
    match entry.state().unwrap() {
        CacheState::Complete(rec) => assert!(entry.verify(&rec).unwrap(), "tarball matches its record"),
        s => panic!("cache entry not complete: {s:?}"),
    }
}

/// Templates in the node's store, and scratch dirs (names starting with '.').
fn store(node: &TestNode) -> (Vec<String>, Vec<String>) {
    names_in(&node.root.join("templates"))
        .into_iter()
        .partition(|n| !n.starts_with('.'))
}

/// Which builds ran debootstrap and which unpacked the cache: exactly one each.
fn assert_one_debootstrap(outputs: &[&Output]) {
    let ran = outputs
        .iter()
        .filter(|o| err(o).contains("debootstrap bookworm from"))
        .count();
    let reused = outputs
        .iter()
        .filter(|o| err(o).contains("unpacking cached debootstrap tree"))
        .count();
    assert_eq!(
        (ran, reused),
        (1, outputs.len() - 1),
        "{:#?}",
        outputs.iter().map(|o| err(o)).collect::<Vec<_>>()
    );
}

#[test]
fn two_daemons_sharing_an_empty_cache_build_debian_at_once() {
    if !need_root("two_daemons_sharing_an_empty_cache_build_debian_at_once") {
        return;
    }
    let cache = cache_dir("two");
    let a = node_with_cache("tba", cache.path());
    let b = node_with_cache("tbb", cache.path());
    let held = hold_lock(cache.path());
    let (oa, ob) = std::thread::scope(|s| {
        let ta = s.spawn(|| run_bounded(build_cmd(&a), BUILD_LIMIT));
        let tb = s.spawn(|| run_bounded(build_cmd(&b), BUILD_LIMIT));
        wait_until(
            "both daemons wait for the cache entry",
            Duration::from_secs(300),
            || a.daemon_log().contains(CACHE_WAIT) && b.daemon_log().contains(CACHE_WAIT),
        );
        drop(held);
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let (ia, ib) = (built_id(&a, &oa), built_id(&b, &ob));
    for o in [&oa, &ob] {
        assert!(err(o).contains(CACHE_WAIT), "the wait is shown: {}", err(o));
    }
    assert_one_debootstrap(&[&oa, &ob]);
    // The tree from debootstrap and the one unpacked from the cache are the same template.
    assert_eq!(ia, ib);
    assert_one_good_entry(cache.path());
    for n in [&a, &b] {
        assert_eq!(store(n), (vec![ia.clone()], vec![]));
    }
}

#[test]
fn two_builds_of_debian_in_one_daemon_take_turns() {
    if !need_root("two_builds_of_debian_in_one_daemon_take_turns") {
        return;
    }
    let cache = cache_dir("one");
    let node = node_with_cache("tbone", cache.path());
    let held = hold_lock(cache.path());
    let (o1, o2) = std::thread::scope(|s| {
        let t1 = s.spawn(|| run_bounded(build_cmd(&node), BUILD_LIMIT));
        let t2 = s.spawn(|| run_bounded(build_cmd(&node), BUILD_LIMIT));
        // One build waits for the cache entry, the other for the node's build in progress.
        wait_until("both builds wait", Duration::from_secs(300), || {
            let log = node.daemon_log();
            log.contains(CACHE_WAIT) && log.contains("waiting for the build of template 'debian' to finish")
        });
        drop(held);
        (t1.join().unwrap(), t2.join().unwrap())
    });
    let (i1, i2) = (built_id(&node, &o1), built_id(&node, &o2));
    assert_eq!(i1, i2);
    assert_one_debootstrap(&[&o1, &o2]);
    assert!(
        [&o1, &o2]
            .iter()
            .any(|o| err(o).contains("waiting for the build of template 'debian' to finish")),
        "the wait is shown"
    );
    assert_one_good_entry(cache.path());
    assert_eq!(store(&node), (vec![i1], vec![]));
    let list = node.json(&["template", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
}

/// The pid namespace of the debootstrap this node runs (its own, not ours), once it runs.
fn debootstrap_pidns(root: &Path) -> Option<String> {
    let ours = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let root = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let ns = std::fs::read_link(e.path().join("ns/pid")).ok()?;
        (cmd.contains("/debootstrap ") && cmd.contains(&root) && ns != ours).then(|| ns.to_string_lossy().into_owned())
    })
}

/// Processes in a pid namespace.
fn procs_in(pidns: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| std::fs::read_link(p.join("ns/pid")).is_ok_and(|n| n.to_string_lossy() == pidns))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_build_killed_halfway_leaves_no_cache_taken_as_good() {
    if !need_root("a_build_killed_halfway_leaves_no_cache_taken_as_good") {
        return;
    }
    let cache = cache_dir("kill");
    let mut node = node_with_cache("tbkill", cache.path());
    let cmd = build_cmd(&node);
    let first = std::thread::spawn(move || run_bounded(cmd, BUILD_LIMIT));
    let mut pidns = None;
    wait_until("debootstrap runs", Duration::from_secs(300), || {
        pidns = debootstrap_pidns(&node.root);
        pidns.is_some()
    });
    let pidns = pidns.unwrap();
    // Kill the daemon (our child) in the middle of debootstrap.
    node.kill_daemon();
    let o = first.join().unwrap();
    assert!(!o.status.success(), "the build was cut off: {}", out(&o));
    // Everything the build started died with the daemon, and left no mounts.
    wait_until("the build's processes are gone", Duration::from_secs(60), || {
        procs_in(&pidns).is_empty()
    });
    assert_eq!(node.mounts(), Vec::<String>::new());
    let entry = CacheEntry::debootstrap(cache.path(), debian_cache_key());
    let state = entry.state().unwrap();
    assert!(!matches!(state, CacheState::Complete(_)), "{state:?}");
    assert!(!entry.record().exists());
    let (templates, scratch) = store(&node);
    assert!(templates.is_empty(), "{templates:?}");
    assert_eq!(scratch.len(), 1, "the killed build's staging dir: {scratch:?}");

    // What a builder killed while writing the tarball, or between its rename and the
    // record, would leave (older Vessels used the fixed temp name).
    let junk = vec![0x55u8; 4096];
    for f in [
        "debian-bookworm-minbase.tar",
        ".debian-bookworm-minbase.tar.tmp-999999-00000000deadbeef",
        "debian-bookworm-minbase.tar.tmp",
    ] {
        std::fs::write(cache.path().join(f), &junk).unwrap();
    }

    node.spawn_daemon();
    let o = run_bounded(build_cmd(&node), BUILD_LIMIT);
    let id = built_id(&node, &o);
    assert!(err(&o).contains("not using cache"), "{}", err(&o));
    assert!(err(&o).contains("debootstrap bookworm from"), "{}", err(&o));
    assert_one_good_entry(cache.path());
    assert_ne!(std::fs::read(entry.tarball()).unwrap(), junk);
    assert_eq!(store(&node), (vec![id.clone()], vec![]));

    // And the next build takes the cache it wrote.
    let o = run_bounded(build_cmd(&node), BUILD_LIMIT);
    assert_eq!(built_id(&node, &o), id);
    assert!(err(&o).contains("unpacking cached debootstrap tree"), "{}", err(&o));
    assert_one_good_entry(cache.path());
}

#[test]
fn concurrent_busybox_builds_and_a_removal_leave_a_clean_store() {
    if !need_root("concurrent_busybox_builds_and_a_removal_leave_a_clean_store") {
        return;
    }
    let node = start("tbbb");
    let outs: Vec<Output> = std::thread::scope(|s| {
        let ts: Vec<_> = (0..3)
            .map(|_| s.spawn(|| node.vessel(&["template", "build", "busybox", "--json"])))
            .collect();
        ts.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let ids: Vec<String> = outs.iter().map(|o| built_id(&node, o)).collect();
    assert!(ids.iter().all(|i| i == &ids[0]), "{ids:?}");
    assert_eq!(store(&node), (vec![ids[0].clone()], vec![]));
    node.ok(&["template", "remove", "busybox"]);
    assert_eq!(store(&node), (vec![], vec![]));
}
