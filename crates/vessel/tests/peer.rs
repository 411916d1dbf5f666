//! Nodes join a cluster over mutual TLS (two daemons on loopback addresses, 127.0.0.1 and
//! 127.0.0.2): `cluster init` makes the CA and a join token, a second node joins with it
//! and both see each other; a used, wrong, expired or mis-pinned token and a live node's
//! name are refused; a process that is not a node gets nothing from the node port, and
//! garbage there leaves the daemon healthy; a removed node's certificate is refused.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;
use vessel_cluster::store::{Store, StoreTls};
use vessel_peer::ca::{self, CertKey, ClusterFiles};
use vessel_peer::wire::{PeerRequest, PeerResponse};
use vessel_peer::{tls, PeerClient, PeerError};
use vessel_types::api::{ErrorCode, Request, Response};

fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

/// A node with `[cluster] name`, `address` and `port` set, its daemon not started.
fn prepared(tag: &str, name: &str, ip: &str, port: u16) -> TestNode {
    let n = TestNode::prepare(&vessel_bin(), tag);
    std::fs::write(
        n.root.join("node.toml"),
        format!("version = 1\n[cluster]\nname = \"{name}\"\naddress = \"{ip}\"\nport = {port}\n"),
    )
    .unwrap();
    n
}

fn names(n: &TestNode) -> Vec<(String, String)> {
    let v = n.json(&["node", "list"]);
    let mut out: Vec<(String, String)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().into(), n["state"].as_str().unwrap().into()))
        .collect();
    out.sort();
    out
}

const T: Duration = Duration::from_secs(10);

#[test]
fn nodes_join_with_single_use_tokens_over_mutual_tls() {
    if !need_root("nodes_join_with_single_use_tokens_over_mutual_tls") {
        return;
    }
    let (pa, pb) = (free_port("127.0.0.1"), free_port("127.0.0.2"));
    let mut a = prepared("pa", "a", "127.0.0.1", pa);
    a.spawn_daemon();
    let e = a.fails(&["cluster", "token"]);
    assert!(e.contains("not initialized"), "{e}");
    // Nothing listens before init.
    assert!(
        TcpStream::connect(("127.0.0.1", pa)).is_err(),
        "the node port is open before init"
    );

    let init = a.json(&["cluster", "init"]);
    let token = init["token"].as_str().unwrap().to_string();
    let target = format!("127.0.0.1:{pa}");
    assert_eq!(init["join"], target.as_str());
    assert_eq!(
        init["command"],
        format!("vessel up --join {target} --token {token}").as_str()
    );
    let e = a.fails(&["cluster", "init"]);
    assert!(e.contains("already in an initialized cluster"), "{e}");
    let text = a.ok(&["cluster", "token", "--ttl", "10m"]);
    assert!(
        text.contains("vessel up --join") && text.contains("valid 10m"),
        "{text}"
    );

    // B joins and starts: both nodes see both.
    let mut b = prepared("pb", "b", "127.0.0.2", pb);
    b.ok(&["cluster", "join", &target, "--token", &token]);
    let bfiles = ClusterFiles::new(&b.root);
    // B reaches the cluster's etcd on A's address over TLS with its node certificate.
    let conf = std::fs::read_to_string(b.root.join("node.toml")).unwrap();
    assert!(conf.contains("etcd = [\"https://127.0.0.1:"), "{conf}");
    assert!(
        bfiles.initialized() && !bfiles.ca_key().exists(),
        "a joined node has no CA key"
    );
    b.spawn_daemon();
    let want = vec![
        ("a".to_string(), "ready".to_string()),
        ("b".to_string(), "ready".to_string()),
    ];
    wait_until("b sees a and b", Duration::from_secs(20), || names(&b) == want);
    assert_eq!(names(&a), want);

    // The same token again, also through `vessel up --join` (no daemon is started then).
    let pc = free_port("127.0.0.3");
    let c = prepared("pc", "c", "127.0.0.3", pc);
    let e = c.fails(&["cluster", "join", &target, "--token", &token]);
    assert!(e.contains("already used (by b)"), "{e}");
    let e = c.fails(&["up", "--join", &target, "--token", &token]);
    assert!(e.contains("already used"), "{e}");
    assert!(
        !c.vessel(&["status"]).status.success(),
        "a refused join started a daemon"
    );
    assert!(!ClusterFiles::new(&c.root).initialized(), "a refused join wrote files");

    // A wrong secret, a wrong pin, a malformed token.
    let fresh = a.json(&["cluster", "token"])["token"].as_str().unwrap().to_string();
    let parts: Vec<&str> = fresh.split('.').collect();
    let wrong_secret = format!("{}.{}.{}.{}", parts[0], parts[1], "0".repeat(32), parts[3]);
    let e = c.fails(&["cluster", "join", &target, "--token", &wrong_secret]);
    assert!(e.contains("wrong join token secret"), "{e}");
    let wrong_pin = format!("{}.{}.{}.{}", parts[0], parts[1], parts[2], "0".repeat(64));
    let e = c.fails(&["cluster", "join", &target, "--token", &wrong_pin]);
    assert!(e.contains("pin differs"), "{e}");
    let e = c.fails(&["cluster", "join", &target, "--token", "vessel1.nope"]);
    assert!(e.contains("malformed"), "{e}");

    // A live node's name: refused, and the token is not used up by it.
    let d = prepared("pd", "b", "127.0.0.4", free_port("127.0.0.4"));
    let e = d.fails(&["cluster", "join", &target, "--token", &fresh]);
    assert!(e.contains("a node named b is already in the cluster"), "{e}");
    let e = d.fails(&["cluster", "join", &target, "--token", &token]);
    assert!(e.contains("already used"), "a used token says so before the name: {e}");
    c.ok(&["cluster", "join", &target, "--token", &fresh]);

    // Expired.
    let short = a.json(&["cluster", "token", "--ttl", "1s"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    std::thread::sleep(Duration::from_millis(1500));
    let e = d.fails(&["cluster", "join", &target, "--token", &short]);
    assert!(e.contains("expired"), "{e}");

    // A node of the cluster gets answers from another node's port (B asks A, A asks B).
    let afiles = ClusterFiles::new(&a.root);
    let ca_pem = afiles.load_ca_cert().unwrap();
    let b_cfg = tls::client_config(&ca_pem, &bfiles.load_node().unwrap()).unwrap();
    let a_addr: SocketAddr = target.parse().unwrap();
    let mut cl = PeerClient::connect_node(a_addr, b_cfg, T).unwrap();
    assert!(matches!(
        cl.call(&PeerRequest::Api(Box::new(Request::VeList))).unwrap(),
        PeerResponse::Api(Response::Ves { .. })
    ));
    let a_cfg = tls::client_config(&ca_pem, &afiles.load_node().unwrap()).unwrap();
    let b_addr: SocketAddr = format!("127.0.0.2:{pb}").parse().unwrap();
    let mut cl = PeerClient::connect_node(b_addr, a_cfg, T).unwrap();
    assert!(matches!(cl.call(&PeerRequest::Ping).unwrap(), PeerResponse::Pong { node } if node == "b"));

    // Not a node: without a certificate, an error and nothing else; with a self-signed
    // one, not even a session.
    let anon = tls::anonymous_client_config(&ca_pem).unwrap();
    let mut cl = PeerClient::connect_node(a_addr, anon, T).unwrap();
    match cl.call(&PeerRequest::Api(Box::new(Request::VeList))) {
        Err(PeerError::Api(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
        r => panic!("VeList without a certificate: {r:?}"),
    }
    // Nor a command in a VE (the two-way exec stream).
    let mut cl = PeerClient::connect_node(a_addr, tls::anonymous_client_config(&ca_pem).unwrap(), T).unwrap();
    let exec = PeerRequest::Stream(vessel_peer::StreamRequest::Exec {
        name: "any".into(),
        argv: vec!["/bin/sh".into()],
        tty: false,
        env: vec![],
        cwd: None,
    });
    match cl.call(&exec) {
        Err(PeerError::Api(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
        r => panic!("exec without a certificate: {r:?}"),
    }
    let own = ca::make_ca("stranger").unwrap();
    let self_signed = CertKey {
        cert_pem: own.cert_pem.clone(),
        key_pem: own.key_pem.clone(),
    };
    let cfg = tls::client_config(&ca_pem, &self_signed).unwrap();
    let r =
        PeerClient::connect_node(a_addr, cfg, T).and_then(|mut c| c.call(&PeerRequest::Api(Box::new(Request::VeList))));
    assert!(
        matches!(r, Err(PeerError::Tls { .. } | PeerError::Wire { .. })),
        "{r:?}"
    );

    // Garbage on the node port: no panic, the daemon stays healthy.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0u8; 70_000][..],
        &[0x16, 3, 3, 0xff, 0xff, 1][..],
    ] {
        let mut t = TcpStream::connect(a_addr).unwrap();
        t.set_read_timeout(Some(T)).unwrap();
        let _ = t.write_all(junk);
        let mut buf = Vec::new();
        let _ = t.read_to_end(&mut buf);
    }
    a.ok(&["status"]);
    let b_cfg = tls::client_config(&ca_pem, &bfiles.load_node().unwrap()).unwrap();
    let mut cl = PeerClient::connect_node(a_addr, b_cfg, T).unwrap();
    assert!(matches!(cl.call(&PeerRequest::Ping).unwrap(), PeerResponse::Pong { node } if node == "a"));
    assert!(!a.daemon_log().contains("panicked"), "{}", a.daemon_log());

    // A restarted daemon serves its port again (the cluster is initialized on disk).
    a.stop_daemon();
    a.spawn_daemon();
    let mut cl = PeerClient::connect_node(
        a_addr,
        tls::client_config(&ca_pem, &bfiles.load_node().unwrap()).unwrap(),
        T,
    )
    .unwrap();
    assert!(matches!(
        cl.call(&PeerRequest::Ping).unwrap(),
        PeerResponse::Pong { .. }
    ));
    drop((c, d));

    // Removing a node: refused while VEs are placed on it (unless --force), then its
    // certificate is revoked: no node serves it any more, the other nodes still are.
    b.ensure_busybox();
    wait_until("b publishes its templates", Duration::from_secs(20), || {
        a.vessel(&["ve", "create", "rmv", "-t", "busybox", "--node", "b"])
            .status
            .success()
    });
    b.stop_daemon();
    wait_until("b is lost", Duration::from_secs(20), || {
        names(&a).contains(&("b".to_string(), "lost".to_string()))
    });
    let e = a.fails(&["node", "remove", "b"]);
    assert!(e.contains("node b has VEs (rmv)") && e.contains("--force"), "{e}");
    a.ok(&["node", "remove", "b", "--force"]);
    assert!(!names(&a).iter().any(|(n, _)| n == "b"), "b still listed");
    wait_until("rmv is pending", Duration::from_secs(20), || {
        a.ok(&["ve", "show", "rmv"]).contains("was removed from the cluster")
    });
    let b_cfg = tls::client_config(&ca_pem, &bfiles.load_node().unwrap()).unwrap();
    let mut cl = PeerClient::connect_node(a_addr, b_cfg, T).unwrap();
    match cl.call(&PeerRequest::Api(Box::new(Request::VeList))) {
        Err(PeerError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}");
            assert!(e.message.contains("revoked"), "{e}");
        }
        r => panic!("a removed node's certificate was served: {r:?}\n{}", a.daemon_log()),
    }
    let a_cfg = tls::client_config(&ca_pem, &afiles.load_node().unwrap()).unwrap();
    let mut cl = PeerClient::connect_node(a_addr, a_cfg, T).unwrap();
    assert!(matches!(
        cl.call(&PeerRequest::Api(Box::new(Request::VeList))).unwrap(),
        PeerResponse::Api(Response::Ves { .. })
    ));
    // ... and the control store refuses it too (the CA node keeps etcd's CRL).
    let etcd_url = conf.split('"').find(|p| p.starts_with("https://")).unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reach = |who: &ClusterFiles| {
        let n = who.load_node().unwrap();
        let t = StoreTls {
            ca_pem: ca_pem.clone(),
            cert_pem: n.cert_pem,
            key_pem: n.key_pem,
        };
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), async {
                let s = Store::connect_with(std::slice::from_ref(&etcd_url), Some(&t)).await?;
                s.nodes().await
            })
            .await
        })
        .is_ok_and(|r| r.is_ok())
    };
    wait_until("etcd refuses the removed node", Duration::from_secs(30), || {
        !reach(&bfiles)
    });
    assert!(reach(&afiles), "a node's own certificate was refused by etcd");
    a.ok(&["ve", "destroy", "rmv", "--force"]);
}
