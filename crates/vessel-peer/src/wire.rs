//! The node-to-node wire, inside mutual TLS.
//!
//! A connection carries requests one at a time. Each frame is a 4-byte big-endian length
//! and that many bytes of JSON `{"v": PEER_VERSION, "body": ...}` (the local API's shape).
//! A request gets exactly one response frame; then either the connection takes the next
//! request (a unary call), or, after [`PeerResponse::Stream`], it turns into raw bytes
//! from the server until its TLS close (`close_notify` tells a complete stream from a cut
//! one) — the way exports, template files and, later, volume replication travel. For the
//! two-way kinds (`exec`, `console`: [`StreamRequest::is_duplex`]) both sides then write
//! the tagged frames of [`crate::duplex`].
//!
//! Reading is bounded like the local API: a declared length over the limit is refused
//! before any of the body is read and the buffer grows only as bytes arrive. Bad bytes
//! give an error (the server answers it with an `Error` frame), never a panic.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};
use vessel_types::api::{ApiError, Request, Response};

/// Version of the node-to-node wire. A peer speaking another one is told to upgrade.
pub const PEER_VERSION: u32 = 1;
/// Largest request frame: an `Api` request is at most the local API's largest request
/// (`ve-exec`), a join's CSR is about 1 KiB.
pub const MAX_REQUEST: usize = vessel_types::api::MAX_ANY_REQUEST_FRAME + 4096;
/// Largest response frame (the local API's).
pub const MAX_RESPONSE: usize = vessel_types::api::MAX_FRAME;

/// What one node asks another.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum PeerRequest {
    /// A new node asks for its certificate (the only request served without one).
    Join(JoinRequest),
    /// Is this node there (answers with its name)?
    Ping,
    /// A local API request, run on this node for a node of the cluster.
    Api(Box<Request>),
    /// Bytes streamed back: answered with [`PeerResponse::Stream`], then raw bytes.
    Stream(StreamRequest),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// `vessel1.<id>.<secret>` (the pin part stays with the joiner).
    pub token: String,
    /// The joining node's name (its certificate's DNS name).
    pub name: String,
    /// The joining node's address (its certificate's IP address).
    pub address: std::net::IpAddr,
    /// PEM certificate request for the key made on the joining node (it never leaves it).
    pub csr_pem: String,
}

/// Streams a node serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StreamRequest {
    /// A VE's console log, as `vessel ve logs --raw` gives it.
    Logs {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail_bytes: Option<u64>,
    },
    /// A VE's files as `vessel ve export` writes them (a tar): raw bytes, complete only
    /// with the TLS close.
    Export { name: String },
    /// Run a command in a VE: two-way frames (`duplex`) after the answer.
    Exec {
        name: String,
        argv: Vec<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        env: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// Attach to a VE's console: two-way frames (`duplex`) after the answer.
    Console { name: String },
    /// A template's files as a tree stream (`vessel_ve::xfer`): the one registered under
    /// `name`, or with `id` the one with that content address.
    Template {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A stopped VE's volume as a tree stream, for its move to the calling node.
    Volume { name: String },
    /// The replication stream of a VE's volume from its writer (the caller) to this
    /// node's copy (`vessel_repl::wire`, carried by [`crate::pipe`]). `template` is the
    /// content address of the volume's template layer (the copy is made on it).
    Replicate {
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<String>,
        /// The template's name (to fetch it by, if the replica's node lacks it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template_name: Option<String>,
    },
    /// The hash tree of this node's copy of a VE's volume (`vessel_fs::scrub`, its wire
    /// form), for `ve scrub` on the writer's node.
    ScrubTree {
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<String>,
    },
}

impl StreamRequest {
    /// Both sides write after the answer (frames of `duplex`), not only the server.
    pub fn is_duplex(&self) -> bool {
        matches!(
            self,
            StreamRequest::Exec { .. } | StreamRequest::Console { .. } | StreamRequest::Replicate { .. }
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum PeerResponse {
    Error(ApiError),
    Joined(JoinReply),
    Pong {
        node: String,
    },
    Api(Response),
    /// Raw bytes follow until the TLS close; `len` when known in advance.
    Stream {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        len: Option<u64>,
    },
}

/// What a joining node gets back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    pub ca_pem: String,
    pub cert_pem: String,
    /// The cluster's etcd client URLs.
    pub etcd: Vec<String>,
    /// The node that admitted it.
    pub by: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    body: T,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("connection: {0}")]
    Io(std::io::Error),
    #[error("{what} of {len} bytes is over the {limit} byte limit")]
    TooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("peer speaks node-to-node version {0}, this node speaks {PEER_VERSION}: run the same vessel version on every node")]
    Version(u32),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        }
    }
}

pub fn encode<T: Serialize>(body: &T, limit: usize) -> Result<Vec<u8>, WireError> {
    let json = serde_json::to_vec(&Envelope { v: PEER_VERSION, body }).map_err(|e| WireError::Decode(e.to_string()))?;
    if json.len() > limit {
        return Err(WireError::TooLarge {
            what: "message",
            len: json.len(),
            limit,
        });
    }
    let mut buf = Vec::with_capacity(json.len() + 4);
    buf.extend_from_slice(&(json.len() as u32).to_be_bytes());
    buf.extend_from_slice(&json);
    Ok(buf)
}

/// Write one frame (at most `limit` bytes of JSON) and flush it.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, body: &T, limit: usize) -> Result<(), WireError> {
    w.write_all(&encode(body, limit)?)?;
    w.flush()?;
    Ok(())
}

const READ_CHUNK: usize = 64 << 10;

/// Read one frame's body bytes. `Closed` only when the peer ended before a frame began.
pub fn read_raw<R: Read>(r: &mut R, what: &'static str, limit: usize) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Decode(format!("the {what} ended inside its length"))),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(WireError::TooLarge { what, len, limit });
    }
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let old = buf.len();
        buf.resize(old + (len - old).min(READ_CHUNK), 0);
        r.read_exact(&mut buf[old..]).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                WireError::Decode(format!("the {what} ended after {old} of {len} bytes"))
            }
            _ => WireError::Io(e),
        })?;
    }
    Ok(buf)
}

/// Decode a frame body: the version first (without building the body), then the body.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T, WireError> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(default)]
        v: u32,
    }
    let h: Head = serde_json::from_slice(buf).map_err(|e| WireError::Decode(e.to_string()))?;
    if h.v != PEER_VERSION {
        return Err(WireError::Version(h.v));
    }
    let env: Envelope<T> = serde_json::from_slice(buf).map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(env.body)
}

pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R, what: &'static str, limit: usize) -> Result<T, WireError> {
    decode(&read_raw(r, what, limit)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut m = (body.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    fn read_req(bytes: &[u8]) -> Result<PeerRequest, WireError> {
        read_frame(&mut &bytes[..], "request", MAX_REQUEST)
    }

    #[test]
    fn requests_round_trip_in_their_stable_shape() {
        let req = PeerRequest::Api(Box::new(Request::VeList));
        let b = encode(&req, MAX_REQUEST).unwrap();
        assert_eq!(&b[4..], br#"{"v":1,"body":{"call":"api","op":"ve-list"}}"#);
        assert!(matches!(read_req(&b).unwrap(), PeerRequest::Api(r) if matches!(*r, Request::VeList)));
        let ping = encode(&PeerRequest::Ping, MAX_REQUEST).unwrap();
        assert_eq!(&ping[4..], br#"{"v":1,"body":{"call":"ping"}}"#);
        let s = PeerRequest::Stream(StreamRequest::Logs {
            name: "web".into(),
            tail_bytes: Some(10),
        });
        let b = encode(&s, MAX_REQUEST).unwrap();
        assert_eq!(
            &b[4..],
            br#"{"v":1,"body":{"call":"stream","kind":"logs","name":"web","tail_bytes":10}}"#
        );
        assert!(matches!(
            read_req(&b).unwrap(),
            PeerRequest::Stream(StreamRequest::Logs {
                tail_bytes: Some(10),
                ..
            })
        ));
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        // Not JSON, JSON of another shape, another version, a cut frame, a huge length.
        assert!(matches!(
            read_req(&frame(b"\xff\x00garbage")),
            Err(WireError::Decode(_))
        ));
        assert!(matches!(
            read_req(&frame(br#"{"v":1,"body":{"call":"nope"}}"#)),
            Err(WireError::Decode(_))
        ));
        assert!(matches!(read_req(&frame(br#"[1,2]"#)), Err(WireError::Decode(_))));
        assert!(matches!(
            read_req(&frame(br#"{"v":7,"body":{"call":"ping"}}"#)),
            Err(WireError::Version(7))
        ));
        assert!(matches!(
            read_req(&frame(br#"{"body":{"call":"ping"}}"#)),
            Err(WireError::Version(0))
        ));
        let mut cut = frame(br#"{"v":1,"body":{"call":"ping"}}"#);
        cut.truncate(12);
        assert!(matches!(read_req(&cut), Err(WireError::Decode(_))));
        assert!(matches!(read_req(&[0, 0]), Err(WireError::Decode(_))));
        assert!(matches!(read_req(&[]), Err(WireError::Closed)));
        match read_req(&u32::MAX.to_be_bytes()) {
            Err(WireError::TooLarge { len, limit, .. }) => assert_eq!((len, limit), (u32::MAX as usize, MAX_REQUEST)),
            r => panic!("{r:?}"),
        }
        // Random bytes of many lengths never panic.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..2000usize {
            let mut b = Vec::with_capacity(n % 64);
            for _ in 0..n % 64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(x as u8);
            }
            let _ = read_req(&b);
            let _ = read_req(&frame(&b));
        }
    }

    #[test]
    fn responses_over_the_limit_are_not_written() {
        let big = PeerResponse::Api(Response::Logs { text: "x".repeat(100) });
        assert!(matches!(encode(&big, 50), Err(WireError::TooLarge { .. })));
    }
}
