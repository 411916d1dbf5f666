//! The transport for real: join tokens in a real etcd (two joiners racing for one token),
//! and a real TLS server on 127.0.0.1 with a small handler: unary calls, a streamed
//! answer, a join through the CA pin, and what a process that is not a node gets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;
use vessel_cluster::etcd::{free_port, EtcdConfig, PrivateEtcd};
use vessel_cluster::store::Store;
use vessel_peer::ca::{self, CertKey};
use vessel_peer::token::{self, Token, TokenError};
use vessel_peer::wire::{JoinReply, JoinRequest, PeerRequest, PeerResponse, StreamRequest};
use vessel_peer::{tls, PeerClient, PeerError, PeerHandler, PeerIdentity, PeerServer, ServerOptions};
use vessel_types::api::{ApiError, ErrorCode, Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_admits_one_joiner_even_when_two_race() {
    let d = tempfile::tempdir().unwrap();
    let cfg = EtcdConfig::new("t1", d.path().join("etcd"), free_port().unwrap(), free_port().unwrap());
    let e = PrivateEtcd::start(cfg).expect("etcd starts (apt-get install etcd-server)");
    let store = Store::connect(&[e.endpoint()]).await.unwrap();
    let pin = [9u8; 32];

    let t = token::create(&store, pin, Duration::from_secs(60)).await.unwrap();
    let wire = t.wire();
    token::verify(&store, &wire).await.unwrap();
    token::consume(&store, &wire, "b").await.unwrap();
    assert_eq!(
        token::consume(&store, &wire, "c").await,
        Err(TokenError::Used(Some("b".into())))
    );
    // Wrong secret, unknown id, expired.
    let wrong = Token {
        secret: "0".repeat(32),
        ..Token::generate(pin)
    };
    assert_eq!(
        token::consume(&store, &wrong.wire(), "c").await,
        Err(TokenError::Unknown)
    );
    let t2 = token::create(&store, pin, Duration::from_secs(60)).await.unwrap();
    let bad = Token {
        secret: "0".repeat(32),
        ..t2.clone()
    };
    assert_eq!(
        token::consume(&store, &bad.wire(), "c").await,
        Err(TokenError::WrongSecret)
    );
    let short = token::create(&store, pin, Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        token::consume(&store, &short.wire(), "c").await,
        Err(TokenError::Expired)
    );
    assert_eq!(
        token::consume(&store, "vessel1.x", "c").await,
        Err(TokenError::Malformed)
    );

    // Races: for each token two joiners at once; exactly one wins every time.
    for i in 0..20 {
        let t = token::create(&store, pin, Duration::from_secs(60)).await.unwrap();
        let (s1, s2, w1, w2) = (store.clone(), store.clone(), t.wire(), t.wire());
        let a = tokio::spawn(async move { token::consume(&s1, &w1, "x").await });
        let b = tokio::spawn(async move { token::consume(&s2, &w2, "y").await });
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        let wins = [&a, &b].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "race {i}: {a:?} {b:?}");
        for r in [a, b] {
            if let Err(e) = r {
                assert!(matches!(e, TokenError::Used(_)), "race {i}: {e}");
            }
        }
    }
}

/// A node's files made in memory: the CA and one node certificate.
fn cluster(name: &str, ip: &str) -> (CertKey, CertKey) {
    let ca = ca::make_ca("test").unwrap();
    (ca.clone(), node_cert(&ca, name, ip))
}

fn node_cert(ca: &CertKey, name: &str, ip: &str) -> CertKey {
    let (key_pem, csr) = ca::node_key_and_csr(name, ip.parse().unwrap()).unwrap();
    CertKey {
        cert_pem: ca::issue(ca, &csr, name, ip.parse().unwrap()).unwrap(),
        key_pem,
    }
}

struct TestHandler {
    ca: CertKey,
}

impl PeerHandler for TestHandler {
    fn join(&self, _from: SocketAddr, req: JoinRequest) -> Result<JoinReply, ApiError> {
        if req.token != "vessel1.00000000.0123456789abcdef0123456789abcdef" {
            return Err(ApiError::new(ErrorCode::PermissionDenied, "wrong join token secret"));
        }
        let cert_pem = ca::issue(&self.ca, &req.csr_pem, &req.name, req.address)
            .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))?;
        Ok(JoinReply {
            ca_pem: self.ca.cert_pem.clone(),
            cert_pem,
            etcd: vec!["http://127.0.0.1:1".into()],
            by: "a".into(),
        })
    }

    fn api(&self, peer: &PeerIdentity, req: Request) -> Response {
        match req {
            Request::VeList => Response::Logs {
                text: format!("secret list for {}", peer.node),
            },
            _ => Response::Error(ApiError::new(ErrorCode::InvalidArgument, "not here")),
        }
    }

    fn stream(
        &self,
        _peer: &PeerIdentity,
        req: StreamRequest,
    ) -> Result<(Option<u64>, Box<dyn Read + Send>), ApiError> {
        let StreamRequest::Logs { tail_bytes, .. } = req else {
            return Err(ApiError::new(ErrorCode::InvalidArgument, "not served by this test"));
        };
        let n = tail_bytes.unwrap_or(0) as usize;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        Ok((Some(n as u64), Box::new(std::io::Cursor::new(data))))
    }
}

fn server(ca: &CertKey, node: &CertKey) -> PeerServer {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = tls::server_config(&ca.cert_pem, node).unwrap();
    let opts = ServerOptions {
        node: "a".into(),
        max_connections: 8,
        request_timeout: Duration::from_secs(5),
    };
    PeerServer::start(l, cfg, Arc::new(TestHandler { ca: ca.clone() }), opts).unwrap()
}

const T: Duration = Duration::from_secs(10);

#[test]
fn nodes_call_and_stream_and_strangers_get_nothing() {
    let (ca, a) = cluster("a", "127.0.0.1");
    let mut srv = server(&ca, &a);
    let addr = srv.addr;

    // A node of the cluster: unary calls on one connection, then a stream.
    let b = node_cert(&ca, "b", "127.0.0.2");
    let mine = tls::client_config(&ca.cert_pem, &b).unwrap();
    let mut c = PeerClient::connect_node(addr, mine.clone(), T).unwrap();
    assert!(matches!(c.call(&PeerRequest::Ping).unwrap(), PeerResponse::Pong { node } if node == "a"));
    match c.call(&PeerRequest::Api(Box::new(Request::VeList))).unwrap() {
        PeerResponse::Api(Response::Logs { text }) => assert_eq!(text, "secret list for b"),
        r => panic!("{r:?}"),
    }
    let n = 3 << 20;
    let mut s = c
        .call_stream(&PeerRequest::Stream(StreamRequest::Logs {
            name: "web".into(),
            tail_bytes: Some(n),
        }))
        .unwrap();
    assert_eq!(s.len, Some(n));
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len() as u64, n);
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    // No certificate: the TLS session is allowed (for a join), every other call refused.
    let anon = tls::anonymous_client_config(&ca.cert_pem).unwrap();
    let mut c = PeerClient::connect_node(addr, anon, T).unwrap();
    for req in [
        PeerRequest::Api(Box::new(Request::VeList)),
        PeerRequest::Ping,
        PeerRequest::Stream(StreamRequest::Logs {
            name: "web".into(),
            tail_bytes: Some(10),
        }),
    ] {
        match c.call(&req) {
            Err(PeerError::Api(e)) => assert_eq!(e.code, ErrorCode::PermissionDenied, "{e}"),
            r => panic!("{req:?} without a certificate: {r:?}"),
        }
    }

    // A certificate of another CA (self-signed, or another cluster's): no session at all.
    let (other_ca, other) = cluster("b", "127.0.0.2");
    let stranger = tls::client_config(&ca.cert_pem, &other).unwrap();
    let r = PeerClient::connect_node(addr, stranger, T)
        .and_then(|mut c| c.call(&PeerRequest::Api(Box::new(Request::VeList))));
    assert!(
        matches!(r, Err(PeerError::Tls { .. } | PeerError::Wire { .. })),
        "{r:?}"
    );
    let self_signed = CertKey {
        cert_pem: other_ca.cert_pem.clone(),
        key_pem: other_ca.key_pem.clone(),
    };
    let stranger = tls::client_config(&ca.cert_pem, &self_signed).unwrap();
    let r = PeerClient::connect_node(addr, stranger, T)
        .and_then(|mut c| c.call(&PeerRequest::Api(Box::new(Request::VeList))));
    assert!(
        matches!(r, Err(PeerError::Tls { .. } | PeerError::Wire { .. })),
        "{r:?}"
    );

    // Garbage: before TLS, and inside it. The server lives on.
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0xff; 300][..],
        &[0x16, 3, 1, 0xff, 0xff][..],
    ] {
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_read_timeout(Some(T)).unwrap();
        let _ = t.write_all(junk);
        let mut buf = Vec::new();
        let _ = t.read_to_end(&mut buf);
    }
    let mut c = PeerClient::connect_node(addr, mine.clone(), T).unwrap();
    {
        // Raw bytes through the TLS session: a length and not JSON.
        let mut junk = 5u32.to_be_bytes().to_vec();
        junk.extend_from_slice(b"\x00\x01{[}");
        match call_raw(&mut c, &junk) {
            PeerResponse::Error(e) => assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}"),
            r => panic!("{r:?}"),
        }
    }
    let mut c = PeerClient::connect_node(addr, mine.clone(), T).unwrap();
    assert!(matches!(c.call(&PeerRequest::Ping).unwrap(), PeerResponse::Pong { .. }));

    // A joiner trusts the server through the pin only.
    let pin = ca::pin(&ca.cert_pem).unwrap();
    let join = |pin: [u8; 32], token: &str| {
        let (key, csr) = ca::node_key_and_csr("c", "127.0.0.3".parse().unwrap()).unwrap();
        let mut c = PeerClient::connect_node(addr, tls::join_client_config(pin).unwrap(), T)?;
        let r = c.call(&PeerRequest::Join(JoinRequest {
            token: token.into(),
            name: "c".into(),
            address: "127.0.0.3".parse().unwrap(),
            csr_pem: csr,
        }))?;
        Ok::<_, PeerError>((r, key))
    };
    let good = "vessel1.00000000.0123456789abcdef0123456789abcdef";
    let (r, key) = join(pin, good).unwrap();
    let PeerResponse::Joined(reply) = r else {
        panic!("{r:?}")
    };
    // The new certificate works as a node's.
    let c_node = CertKey {
        cert_pem: reply.cert_pem,
        key_pem: key,
    };
    let cfg = tls::client_config(&reply.ca_pem, &c_node).unwrap();
    let mut c = PeerClient::connect_node(addr, cfg, T).unwrap();
    assert!(matches!(c.call(&PeerRequest::Ping).unwrap(), PeerResponse::Pong { .. }));
    // Another pin: refused before anything is sent.
    let e = join([0; 32], good).unwrap_err();
    assert!(e.to_string().contains("pin differs"), "{e}");
    let e = join(pin, "vessel1.00000000.ffffffffffffffffffffffffffffffff").unwrap_err();
    assert!(e.to_string().contains("wrong join token secret"), "{e}");
    srv.stop();
}

fn call_raw(c: &mut PeerClient, bytes: &[u8]) -> PeerResponse {
    c.raw_call(bytes).unwrap()
}

/// The private etcd's listener for other nodes: a node certificate of the cluster gets
/// in, no certificate or another CA's does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_serves_other_nodes_only_with_a_cluster_certificate() {
    use vessel_cluster::etcd::EtcdTls;
    use vessel_cluster::store::StoreTls;
    let d = tempfile::tempdir().unwrap();
    let (ca, a) = cluster("a", "127.0.0.1");
    let files = ca::ClusterFiles::new(d.path());
    files.save(&ca.cert_pem, Some(&ca.key_pem), &a).unwrap();
    let mut cfg = EtcdConfig::new("a", d.path().join("etcd"), free_port().unwrap(), free_port().unwrap());
    let tls = EtcdTls {
        addr: "127.0.0.1".parse().unwrap(),
        port: free_port().unwrap(),
        cert_file: files.node_cert(),
        key_file: files.node_key(),
        ca_file: files.ca_cert(),
    };
    let url = tls.url();
    cfg.tls = Some(tls);
    let _e = PrivateEtcd::start(cfg).expect("etcd starts");
    let b = node_cert(&ca, "b", "127.0.0.2");
    let ident = |n: &CertKey, ca_pem: &str| StoreTls {
        ca_pem: ca_pem.to_string(),
        cert_pem: n.cert_pem.clone(),
        key_pem: n.key_pem.clone(),
    };
    let s = Store::connect_with(std::slice::from_ref(&url), Some(&ident(&b, &ca.cert_pem)))
        .await
        .unwrap();
    s.put("/vessel/v1/x", &1u32).await.unwrap();
    assert_eq!(s.get::<u32>("/vessel/v1/x").await.unwrap(), Some(1));

    // An empty identity (the client cannot present one) and a certificate of another CA.
    let anon = StoreTls {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    let (_, other) = cluster("b", "127.0.0.2");
    for (what, t) in [
        ("an empty identity", anon),
        ("another CA's", ident(&other, &ca.cert_pem)),
    ] {
        let r = async {
            let s = Store::connect_with(std::slice::from_ref(&url), Some(&t)).await?;
            s.get::<u32>("/vessel/v1/x").await
        };
        let r = tokio::time::timeout(Duration::from_secs(20), r).await.expect("bounded");
        assert!(r.is_err(), "{what}: {r:?}");
    }
}
