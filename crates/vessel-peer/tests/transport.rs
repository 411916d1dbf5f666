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
use vessel_peer::{
    tls, Channel, DuplexSession, Event, Frame, PeerClient, PeerError, PeerHandler, PeerIdentity, PeerServer,
    ServerOptions,
};
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

    /// `exec` echoes: stdin back as stdout (upper-cased on stderr for `tty`), then at
    /// `Eof` the exit code `argv[0]`; `argv[0] == "cut"` drops the connection after one
    /// echo without a TLS close; `console` is refused like a VE that does not run.
    fn duplex(&self, _peer: &PeerIdentity, req: StreamRequest) -> Result<Box<dyn DuplexSession>, ApiError> {
        match req {
            StreamRequest::Exec { argv, .. } if argv[0] == "pipe" => Ok(Box::new(PipeEcho)),
            StreamRequest::Exec { argv, tty, .. } => Ok(Box::new(Echo {
                code: argv[0].clone(),
                tty,
            })),
            _ => Err(ApiError::new(ErrorCode::Conflict, "VE 'web' is not running")),
        }
    }
}

struct Echo {
    code: String,
    tty: bool,
}

impl DuplexSession for Echo {
    fn run(self: Box<Self>, mut ch: Channel) {
        let mut sizes = 0;
        loop {
            loop {
                match ch.event() {
                    Ok(Event::Frame(Frame::Stdin(d))) => {
                        if self.tty {
                            ch.send(&Frame::Stderr(d.to_ascii_uppercase()));
                        }
                        ch.send(&Frame::Stdout(d));
                        if self.code == "cut" {
                            let _ = ch.pump(0);
                            return;
                        }
                    }
                    Ok(Event::Frame(Frame::Resize { .. })) => sizes += 1,
                    Ok(Event::Frame(Frame::Eof)) => {
                        ch.send(&Frame::Exit(self.code.parse::<i32>().unwrap() + sizes));
                        ch.finish(T).unwrap();
                        return;
                    }
                    Ok(Event::Wait) => break,
                    r => panic!("echo: {r:?}"),
                }
            }
            let mut p = [libc::pollfd {
                fd: ch.raw_fd(),
                events: ch.events(),
                revents: 0,
            }];
            vessel_peer::channel::poll(&mut p, 10_000).unwrap();
            ch.pump(p[0].revents).unwrap();
        }
    }
}

/// `exec pipe`: bytes back through `pipe::split` halves on one thread, until the caller
/// closes.
struct PipeEcho;

impl DuplexSession for PipeEcho {
    fn run(self: Box<Self>, ch: Channel) {
        let (mut r, mut w, close) = vessel_peer::pipe::split(ch, Frame::Stdout);
        let mut buf = vec![0u8; 100_000];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if w.write_all(&buf[..n]).and_then(|_| w.flush()).is_err() {
                        break;
                    }
                }
            }
        }
        close.close();
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
        exec("0", false),
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
/// in, no certificate, another CA's or a revoked one (the CRL file) does not.
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
        crl_file: Some(d.path().join("crl.pem")),
    };
    // Nothing revoked yet; etcd reads the file at every handshake.
    std::fs::write(d.path().join("crl.pem"), ca::crl(&ca, &[], 1).unwrap()).unwrap();
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

    // b's certificate revoked (its node removed): new connections are refused; another
    // node's certificate still gets in.
    let serial = ca::serial(&b.cert_pem).unwrap();
    std::fs::write(d.path().join("crl.pem"), ca::crl(&ca, &[serial], 2).unwrap()).unwrap();
    let r = async {
        let s = Store::connect_with(std::slice::from_ref(&url), Some(&ident(&b, &ca.cert_pem))).await?;
        s.get::<u32>("/vessel/v1/x").await
    };
    let r = tokio::time::timeout(Duration::from_secs(20), r).await.expect("bounded");
    assert!(r.is_err(), "a revoked certificate: {r:?}");
    let c = node_cert(&ca, "c", "127.0.0.3");
    let s = Store::connect_with(std::slice::from_ref(&url), Some(&ident(&c, &ca.cert_pem)))
        .await
        .unwrap();
    assert_eq!(s.get::<u32>("/vessel/v1/x").await.unwrap(), Some(1));
}

fn exec(code: &str, tty: bool) -> PeerRequest {
    PeerRequest::Stream(StreamRequest::Exec {
        name: "web".into(),
        argv: vec![code.into()],
        tty,
        env: vec![],
        cwd: None,
    })
}

/// Drive a channel until `until` says stop: send `input` (then `Eof` if `eof`), collect
/// what comes back.
type Got = (Vec<u8>, Vec<u8>, Option<i32>);

fn drive(ch: &mut Channel, input: &[u8], extra: &[Frame], eof: bool) -> Result<Got, String> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    ch.send_data(Frame::Stdin, input);
    for f in extra {
        ch.send(f);
    }
    if eof {
        ch.send(&Frame::Eof);
    }
    for _ in 0..100_000 {
        loop {
            match ch.event().map_err(|e| e.to_string())? {
                Event::Frame(Frame::Stdout(d)) => out.extend(d),
                Event::Frame(Frame::Stderr(d)) => err.extend(d),
                Event::Frame(Frame::Exit(c)) => return Ok((out, err, Some(c))),
                Event::Closed => return Ok((out, err, None)),
                Event::Wait => break,
                f => return Err(format!("{f:?}")),
            }
        }
        let mut p = [libc::pollfd {
            fd: ch.raw_fd(),
            events: ch.events(),
            revents: 0,
        }];
        vessel_peer::channel::poll(&mut p, 10_000).map_err(|e| e.to_string())?;
        if p[0].revents == 0 && p[0].events & libc::POLLOUT == 0 {
            return Err("no answer in 10 s".into());
        }
        ch.pump(p[0].revents).map_err(|e| e.to_string())?;
    }
    Err("no end".into())
}

/// Two-way streams: 3 MiB each way byte-exact with the exit code after them, window sizes
/// passed, an error before the stream as the answer, a cut connection an error (not an
/// end), and nothing for a process without a node certificate (checked above).
#[test]
fn two_way_streams_carry_bytes_both_ways_and_tell_a_cut_from_an_end() {
    let (ca, a) = cluster("a", "127.0.0.1");
    let mut srv = server(&ca, &a);
    let b = node_cert(&ca, "b", "127.0.0.2");
    let mine = tls::client_config(&ca.cert_pem, &b).unwrap();
    let connect = || PeerClient::connect_node(srv.addr, mine.clone(), T).unwrap();

    let input: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut ch = connect().call_duplex(&exec("7", false)).unwrap();
    let (out, err, code) = drive(&mut ch, &input, &[], true).unwrap();
    assert_eq!((out.len(), code), (input.len(), Some(7)));
    assert!(out == input, "the echo differs");
    assert!(err.is_empty());

    let resize = [
        Frame::Resize { rows: 40, cols: 100 },
        Frame::Resize { rows: 41, cols: 100 },
    ];
    let mut ch = connect().call_duplex(&exec("1", true)).unwrap();
    let (out, err, code) = drive(&mut ch, b"ls\r", &resize, true).unwrap();
    assert_eq!((&out[..], &err[..], code), (&b"ls\r"[..], &b"LS\r"[..], Some(3)));

    match connect().call_duplex(&PeerRequest::Stream(StreamRequest::Console { name: "web".into() })) {
        Err(PeerError::Api(e)) => assert!(e.message.contains("not running"), "{e}"),
        r => panic!("{:?}", r.map(|_| ())),
    }

    let mut ch = connect().call_duplex(&exec("cut", false)).unwrap();
    let r = drive(&mut ch, b"x", &[], false);
    assert!(matches!(&r, Err(e) if e.contains("cut")), "{r:?}");
    srv.stop();
}

/// A byte stream as blocking halves over one TLS connection (what replication uses): 8 MiB
/// written from one thread come back byte-exact on another while the first still writes;
/// a close from a third thread ends a read that waits, and later reads and writes fail.
#[test]
fn pipe_halves_carry_a_stream_both_ways_and_a_close_ends_a_blocked_read() {
    let (ca, a) = cluster("a", "127.0.0.1");
    let mut srv = server(&ca, &a);
    let b = node_cert(&ca, "b", "127.0.0.2");
    let mine = tls::client_config(&ca.cert_pem, &b).unwrap();
    let ch = PeerClient::connect_node(srv.addr, mine, T)
        .unwrap()
        .call_duplex(&exec("pipe", false))
        .unwrap();
    let (mut r, mut w, close) = vessel_peer::pipe::split(ch, Frame::Stdin);
    let input: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let sent = input.clone();
    let writer = std::thread::spawn(move || {
        for piece in sent.chunks(300_001) {
            w.write_all(piece).unwrap();
        }
        w.flush().unwrap();
        w
    });
    let mut got = vec![0u8; input.len()];
    r.read_exact(&mut got).unwrap();
    assert!(got == input, "the echo differs");
    let mut w = writer.join().unwrap();

    // Nothing more comes: the read waits until another thread closes the stream.
    let t0 = std::time::Instant::now();
    let closer = close.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        closer.close();
    });
    let mut one = [0u8; 1];
    assert!(r.read(&mut one).is_err(), "a read after the close fails");
    assert!(t0.elapsed() < T, "the close ended the read ({:?})", t0.elapsed());
    t.join().unwrap();
    assert!(w.write_all(b"late").is_err(), "a write after the close fails");
    close.close();
    srv.stop();
}
