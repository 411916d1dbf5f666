//! Against a real etcd (the `etcd-server` package): the private member's life, node
//! leases, and the leader election with guarded writes.

use std::time::{Duration, Instant};
use vessel_cluster::etcd::{free_port, EtcdConfig, PrivateEtcd};
use vessel_cluster::keys::{self, NodeRecord};
use vessel_cluster::store::Store;
use vessel_cluster::ClusterError;

fn record(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        address: format!("127.0.0.1:{}", 7000),
        cpus: 2,
        memory: 4 << 30,
        disk: 50 << 30,
        labels: Default::default(),
        version: "test".into(),
        draining: false,
        since_ns: 0,
    }
}

fn etcd(dir: &std::path::Path) -> PrivateEtcd {
    let cfg = EtcdConfig::new("t1", dir.join("etcd"), free_port().unwrap(), free_port().unwrap());
    PrivateEtcd::start(cfg).expect("etcd starts (apt-get install etcd-server)")
}

async fn until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_elections_and_guarded_writes_on_a_real_etcd() {
    let d = tempfile::tempdir().unwrap();
    let e = etcd(d.path());
    let store = Store::connect(&[e.endpoint()]).await.unwrap();

    // Nodes register under leases that they keep alive.
    let r1 = store.register(&record("n1"), Duration::from_secs(2)).await.unwrap();
    let r2 = store.register(&record("n2"), Duration::from_secs(1)).await.unwrap();
    let names = |s: Store| async move {
        let mut v: Vec<String> = s.nodes().await.unwrap().into_iter().map(|n| n.name).collect();
        v.sort();
        v
    };
    assert_eq!(names(store.clone()).await, vec!["n1", "n2"]);
    // Kept alive past several TTLs.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(names(store.clone()).await, vec!["n1", "n2"]);
    assert!(*r1.alive.borrow() && *r2.alive.borrow());
    // n2 stops renewing: gone after its TTL.
    drop(r2);
    until("n2's record expires", Duration::from_secs(10), || {
        let s = store.clone();
        async move { names(s).await == vec!["n1"] }
    })
    .await;

    // n1 is leader; its guarded writes land.
    assert_eq!(store.leader().await.unwrap(), None);
    let l1 = store.campaign("n1", r1.lease).await.unwrap();
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("n1"));
    let place = |node: &str| keys::Placement {
        node: Some(node.into()),
        pending: None,
        move_to: None,
    };
    store
        .put_as_leader(&l1, &keys::ve("a", "place"), &place("n1"))
        .await
        .unwrap();
    // n3 campaigns and waits.
    let r3 = store.register(&record("n3"), Duration::from_secs(2)).await.unwrap();
    let waiting = {
        let (s, lease) = (store.clone(), r3.lease);
        tokio::spawn(async move { s.campaign("n3", lease).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "two leaders at once");
    // n1's lease ends (a lost node): n3 leads, and n1's writes are refused from then on.
    store.revoke(r1.lease).await.unwrap();
    let l3 = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("n3 becomes leader")
        .unwrap()
        .unwrap();
    assert!(l3.revision() > l1.revision());
    let e1 = store
        .put_as_leader(&l1, &keys::ve("a", "place"), &place("stale"))
        .await
        .unwrap_err();
    assert!(matches!(e1, ClusterError::NotLeader), "{e1}");
    store
        .put_as_leader(&l3, &keys::ve("a", "place"), &place("n3"))
        .await
        .unwrap();
    let got: Option<keys::Placement> = store.get(&keys::ve("a", "place")).await.unwrap();
    assert_eq!(got, Some(place("n3")), "the deposed leader's write did not land");
    drop(r1);
    drop(r3);
}

#[test]
fn the_private_etcd_is_restarted_and_keeps_its_data() {
    let d = tempfile::tempdir().unwrap();
    let mut e = etcd(d.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = keys::ve("web", "spec");
    rt.block_on(async {
        let s = Store::connect(&[e.endpoint()]).await.unwrap();
        s.put(&key, &"kept").await.unwrap();
    });
    assert!(!e.ensure_running().unwrap(), "running: nothing to do");
    // It dies (killed: only the pid this test started).
    let pid = nix::unistd::Pid::from_raw(e.pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    // Seen dead once it has exited (bounded), then started again.
    let t0 = Instant::now();
    while !e.ensure_running().unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the killed etcd was not restarted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(e.restarts, 1);
    rt.block_on(async {
        let s = Store::connect(&[e.endpoint()]).await.unwrap();
        assert_eq!(s.get::<String>(&key).await.unwrap().as_deref(), Some("kept"));
    });
}

#[test]
fn an_unreachable_etcd_is_a_clear_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let port = free_port().unwrap();
    let r = rt.block_on(async {
        let s = Store::connect(&[format!("http://127.0.0.1:{port}")]).await?;
        s.nodes().await
    });
    let e = r.expect_err("nothing listens there");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("check that etcd runs"),
        "{msg}"
    );
}

/// Regression: the scheduler's read of every VE failed past the client's 4 MiB message
/// limit (about 6,000 VEs) and the scheduler stopped placing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_larger_than_one_grpc_message_is_read_whole() {
    let d = tempfile::tempdir().unwrap();
    let e = etcd(d.path());
    let store = Store::connect(&[e.endpoint()]).await.unwrap();
    let n = 5000;
    let value = "x".repeat(1024);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..8 {
        let (store, value) = (store.clone(), value.clone());
        set.spawn(async move {
            for i in (w..n).step_by(8) {
                store.put(&keys::ve(&format!("v{i:05}"), "spec"), &value).await.unwrap();
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    // A key just past the prefix is not part of it.
    store.put("/vessel/v1/ves0", &1).await.unwrap();
    let all = store.list_raw(&keys::ves()).await.unwrap();
    assert_eq!(all.len(), n);
    assert!(all.iter().map(|kv| kv.value.len()).sum::<usize>() > 4 << 20);
    for (i, kv) in all.iter().enumerate() {
        assert_eq!(kv.key, keys::ve(&format!("v{i:05}"), "spec"));
    }
    let decoded: Vec<String> = store.list(&keys::ves()).await.unwrap();
    assert_eq!(decoded.len(), n);
}
