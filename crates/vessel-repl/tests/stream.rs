//! The replication stream end to end on real volumes (in temp dirs), over socket pairs:
//! a writer's syncs return only when the in-sync replicas have the transactions durably,
//! an unreachable replica leaves the in-sync set through the master before a sync goes
//! on without it and comes back once it has caught up, a writer of an old epoch gets
//! nothing acknowledged, and too few copies make syncs fail rather than succeed.

mod common;

use common::{opts, DirHost, MemMaster};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vessel_fs::tree::ROOT;
use vessel_fs::tx::FileKind;
use vessel_fs::Volume;
use vessel_repl::replica;
use vessel_repl::writer::{Conn, Link, Replicator};

/// Socket pairs to in-process replica servers; a node can be made unreachable.
struct Pairs {
    hosts: BTreeMap<String, Arc<DirHost>>,
    down: Mutex<BTreeSet<String>>,
}

impl Link for Pairs {
    fn connect(&self, node: &str) -> std::io::Result<Conn> {
        if self.down.lock().unwrap().contains(node) {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "node down"));
        }
        let host = self.hosts.get(node).cloned().ok_or(std::io::ErrorKind::NotFound)?;
        let (a, b) = UnixStream::pair()?;
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let _ = replica::serve(&mut r, &mut w, &*host);
        });
        Conn::socket(a)
    }
}

struct Cluster {
    _tmp: tempfile::TempDir,
    writer: Arc<Volume>,
    repl: Arc<Replicator>,
    link: Arc<Pairs>,
    master: Arc<MemMaster>,
}

fn cluster(replicas: &[&str], min: usize, down: &[&str]) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let wd = tmp.path().join("a").join("web");
    Volume::create(&wd, "web", None).unwrap();
    let writer = Arc::new(Volume::open(&wd, None).unwrap());
    let hosts = replicas
        .iter()
        .map(|n| (n.to_string(), DirHost::new(&tmp.path().join(n))))
        .collect();
    let link = Arc::new(Pairs {
        hosts,
        down: Mutex::new(down.iter().map(|s| s.to_string()).collect()),
    });
    let mut set: BTreeSet<String> = replicas.iter().map(|s| s.to_string()).collect();
    set.insert("a".into());
    let master = Arc::new(MemMaster {
        rec: Mutex::new((writer.epoch(), set)),
    });
    let members: Vec<(String, bool)> = replicas.iter().map(|n| (n.to_string(), true)).collect();
    let repl = Replicator::start(&writer, "a", &members, min, link.clone(), master.clone(), opts());
    writer.set_acks(repl.clone());
    writer.set_ack_timeout(Duration::from_secs(3));
    Cluster {
        _tmp: tmp,
        writer,
        repl,
        link,
        master,
    }
}

fn write_file(v: &Volume, name: &str, data: &[u8]) {
    let a = v
        .mknod(ROOT, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0, b"")
        .unwrap();
    v.open_file(a.ino, true, false).unwrap();
    v.write(a.ino, 0, data).unwrap();
    v.release(a.ino);
}

fn content(v: &Volume, name: &str) -> Vec<u8> {
    let a = v.lookup(ROOT, name.as_bytes()).unwrap();
    v.read(a.ino, 0, a.size as u32).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    for _ in 0..400 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what}: not within {:?}", t.elapsed());
}

#[test]
fn a_sync_returns_once_every_in_sync_replica_has_it_durably() {
    let c = cluster(&["b", "c"], 2, &[]);
    for i in 0..50 {
        write_file(&c.writer, &format!("f{i}"), format!("record {i}").as_bytes());
    }
    c.writer.sync().unwrap();
    let last = c.writer.log_status().0;
    // Every replica the store counts as in sync has all of it durably (one that was slow
    // to answer may have been taken out first: then it must come back caught up).
    let in_sync = c.master.rec.lock().unwrap().1.clone();
    assert!(in_sync.len() >= 2, "{in_sync:?}");
    for n in in_sync.iter().filter(|n| *n != "a") {
        let v = c.link.hosts[n.as_str()].vol("web");
        assert!(
            v.durable_through() >= last,
            "{n} has {} of {last}: {:?}",
            v.durable_through(),
            c.repl.status()
        );
        assert_eq!(content(&v, "f49"), b"record 49");
    }
    wait_until("both replicas in sync", || c.master.rec.lock().unwrap().1.len() == 3);
    for n in ["b", "c"] {
        let v = c.link.hosts[n].vol("web");
        wait_until("caught up", || v.durable_through() >= last);
        assert_eq!(content(&v, "f49"), b"record 49");
        assert_eq!(v.log_status().0, last);
    }
    let st = c.repl.status();
    assert!(st.iter().all(|s| s.in_sync && s.acked >= last), "{st:?}");
}

#[test]
fn an_unreachable_replica_leaves_the_set_first_and_comes_back_caught_up() {
    let c = cluster(&["b", "c"], 2, &["c"]);
    write_file(&c.writer, "one", b"1");
    // The sync goes on without c only once the master has taken c out of the set.
    c.writer.sync().unwrap();
    assert!(!c.master.rec.lock().unwrap().1.contains("c"));
    for i in 0..20 {
        write_file(&c.writer, &format!("g{i}"), b"more");
    }
    c.writer.sync().unwrap();
    c.link.down.lock().unwrap().clear();
    wait_until("c back in the in-sync set", || {
        c.master.rec.lock().unwrap().1.contains("c")
    });
    let last = c.writer.log_status().0;
    let v = c.link.hosts["c"].vol("web");
    wait_until("c durable through the writer's last seq", || {
        v.durable_through() >= last
    });
    assert_eq!(content(&v, "g19"), b"more");
    assert_eq!(content(&v, "one"), b"1");
}

#[test]
fn too_few_copies_make_a_sync_fail_not_succeed() {
    let c = cluster(&["b", "c"], 3, &["c"]);
    write_file(&c.writer, "x", b"x");
    c.writer.set_ack_timeout(Duration::from_millis(800));
    assert_eq!(c.writer.sync(), Err(libc_eio()));
    assert!(!c.master.rec.lock().unwrap().1.contains("c"));
    // With the minimum lowered, the same data syncs.
    c.repl.set_min(2);
    c.writer.set_ack_timeout(Duration::from_secs(20));
    c.writer.sync().unwrap();
}

#[test]
fn a_writer_of_an_old_epoch_gets_nothing_acknowledged() {
    let c = cluster(&["b"], 2, &["b"]);
    // b promised a newer writer's epoch meanwhile, and the store moved on.
    let b = c.link.hosts["b"].vol("web");
    b.raise_epoch(c.writer.epoch() + 1).unwrap();
    c.master.rec.lock().unwrap().0 += 1;
    c.link.down.lock().unwrap().clear();
    write_file(&c.writer, "late", b"never acknowledged");
    assert_eq!(c.writer.sync(), Err(libc_eio()));
    assert!(c.repl.deposed().is_some());
    assert_eq!(b.log_status().0, 0, "nothing of the old writer reached b");
}

fn libc_eio() -> i32 {
    5
}

fn txs_of(v: &Volume, from: u64, to: u64) -> Vec<vessel_fs::Tx> {
    let mut out = Vec::new();
    v.log_reader()
        .unwrap()
        .for_each::<vessel_fs::VolumeError>(from, to, |t, _| {
            out.push(t);
            Ok(true)
        })
        .unwrap();
    out
}

#[test]
fn a_new_writers_log_wins_and_a_replicas_divergent_tail_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    // The old writer a wrote 10 files in epoch 1; b got all of them, c only the first 5.
    let ad = tmp.path().join("a").join("web");
    Volume::create(&ad, "web", None).unwrap();
    let a = Volume::open(&ad, None).unwrap();
    for i in 0..10 {
        write_file(&a, &format!("old{i}"), b"epoch 1");
    }
    let all = txs_of(&a, 1, u64::MAX);
    let hosts: BTreeMap<String, Arc<DirHost>> = ["b"]
        .iter()
        .map(|n| (n.to_string(), DirHost::new(&tmp.path().join(n))))
        .collect();
    let b = hosts["b"].vol("web");
    b.append_replicated_batch(&all).unwrap();
    let cut_at = all
        .iter()
        .find(|t| matches!(t.op, vessel_fs::Op::Create { ref name, .. } if name == b"old5"))
        .unwrap()
        .seq
        - 1;
    let cd = tmp.path().join("c").join("web");
    Volume::create(&cd, "web", None).unwrap();
    let c = Arc::new(Volume::open(&cd, None).unwrap());
    c.append_replicated_batch(&all[..cut_at as usize]).unwrap();
    drop(b);
    // c becomes the writer in epoch 2 and writes on.
    c.raise_epoch(2).unwrap();
    let link = Arc::new(Pairs {
        hosts,
        down: Mutex::new(BTreeSet::new()),
    });
    let master = Arc::new(MemMaster {
        rec: Mutex::new((2, ["b", "c"].iter().map(|s| s.to_string()).collect())),
    });
    let repl = Replicator::start(&c, "c", &[("b".into(), true)], 2, link.clone(), master.clone(), opts());
    c.set_acks(repl.clone());
    c.set_ack_timeout(Duration::from_secs(20));
    for i in 0..3 {
        write_file(&c, &format!("new{i}"), b"epoch 2");
    }
    c.sync().unwrap();
    let b = link.hosts["b"].vol("web");
    wait_until("b in sync and caught up", || {
        master.rec.lock().unwrap().1.contains("b") && b.durable_through() >= c.last_seq()
    });
    assert_eq!(b.last_seq(), c.last_seq());
    assert_eq!(content(&b, "new2"), b"epoch 2");
    assert_eq!(content(&b, "old4"), b"epoch 1");
    assert!(
        b.lookup(ROOT, b"old5").is_err(),
        "the divergent tail (old5..old9) is gone from b"
    );
    assert_eq!(b.epoch_history(), c.epoch_history());
    assert_eq!(txs_of(&b, 1, u64::MAX), txs_of(&c, 1, u64::MAX));
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn same_tree(a: &Volume, b: &Volume) {
    let ta = vessel_fs::scrub::hash_tree(a, &mut |_| {}).unwrap();
    let tb = vessel_fs::scrub::hash_tree(b, &mut |_| {}).unwrap();
    let d = vessel_fs::scrub::compare(&ta, &tb);
    assert!(d.is_empty(), "the copies differ: {:?}", &d[..d.len().min(10)]);
    assert_eq!(ta.root_hex(), tb.root_hex());
}

#[test]
fn a_replica_the_log_no_longer_reaches_is_seeded_through_the_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let wd = tmp.path().join("a").join("web");
    Volume::create(&wd, "web", None).unwrap();
    let opts_small = vessel_fs::volume::VolumeOptions { segment_bytes: 4096 };
    let writer = Arc::new(Volume::open_with(&wd, None, opts_small).unwrap());
    for i in 0..5 {
        write_file(&writer, &format!("early{i}"), b"early");
    }
    let early = txs_of(&writer, 1, u64::MAX);
    // b holds the early transactions (an old copy); c never had anything.
    let hosts: BTreeMap<String, Arc<DirHost>> = ["b", "c"]
        .iter()
        .map(|n| (n.to_string(), DirHost::new(&tmp.path().join(n))))
        .collect();
    hosts["b"].vol("web").append_replicated_batch(&early).unwrap();
    for i in 0..60 {
        write_file(&writer, &format!("f{i}"), &vec![i as u8; 3000 + i * 10]);
    }
    writer.set_retention(Some(0));
    assert!(writer.compact(now_ns() + 1_000_000_000).unwrap() > 0);
    let first = writer.first_retained_seq();
    assert!(
        first > early.len() as u64 + 1,
        "the log no longer holds what b needs (it starts at {first})"
    );
    let link = Arc::new(Pairs {
        hosts,
        down: Mutex::new(BTreeSet::new()),
    });
    let master = Arc::new(MemMaster {
        rec: Mutex::new((writer.epoch(), ["a".to_string()].into_iter().collect())),
    });
    let members = [("b".to_string(), false), ("c".to_string(), false)];
    let repl = Replicator::start(&writer, "a", &members, 3, link.clone(), master.clone(), opts());
    writer.set_acks(repl.clone());
    writer.set_ack_timeout(Duration::from_secs(20));
    wait_until("b and c seeded and in sync", || master.rec.lock().unwrap().1.len() == 3);
    // Live transactions after the seeding, and a sync that needs both copies.
    for i in 0..10 {
        write_file(&writer, &format!("live{i}"), format!("live {i}").as_bytes());
    }
    writer.sync().unwrap();
    let st = repl.status();
    assert!(st.iter().all(|s| s.in_sync && s.acked >= writer.last_seq()), "{st:?}");
    for n in ["b", "c"] {
        let v = link.hosts[n].vol("web");
        assert!(v.durable_through() >= writer.last_seq());
        assert!(v.base_meta().seq > 0, "{n} was seeded (its base is the writer's)");
        assert_eq!(v.epoch_history(), writer.epoch_history());
        assert_eq!(content(&v, "live9"), b"live 9");
        assert_eq!(content(&v, "early0"), b"early");
        assert_eq!(content(&v, "f59"), vec![59u8; 3000 + 590]);
        same_tree(&writer, &v);
    }
    repl.stop();
}
