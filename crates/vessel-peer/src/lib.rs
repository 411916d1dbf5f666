//! Node-to-node transport: mutual TLS between the nodes of a cluster.
//!
//! - [`ca`]: the cluster CA (made at `vessel cluster init`), node keys and certificate
//!   requests, issuing node certificates, the files under `ROOT/cluster/`.
//! - [`token`]: single-use, expiring join tokens that carry the CA's pin; their records
//!   in etcd and the one-transaction consume.
//! - [`tls`]: rustls configurations (TLS 1.3, `ring`): the node server (client
//!   certificates verified against the cluster CA; none allowed at the TLS layer only for
//!   a join), the node client, the joiner's pinned client.
//! - [`wire`]: versioned frames: a request, then a framed response or a raw byte stream.
//! - [`duplex`], [`channel`]: the tagged frames of a two-way stream (exec, console) and
//!   one connection carrying them both ways from one `poll` loop; [`pipe`]: a plain byte
//!   stream over such a connection as blocking read and write halves (replication).
//! - [`server`], [`client`]: blocking (thread per connection, like the local API server;
//!   the daemon is thread-based and a stream is plain `Read`/`Write`), every read bounded.

pub mod ca;
pub mod channel;
pub mod client;
pub mod duplex;
pub mod pipe;
pub mod server;
mod timed;
pub mod tls;
pub mod token;
pub mod wire;

pub use channel::{Channel, ChannelError, Event};
pub use client::{PeerClient, PeerError, PeerStream};
pub use duplex::Frame;
pub use server::{DuplexSession, PeerHandler, PeerIdentity, PeerServer, ServerOptions};
pub use wire::{JoinReply, JoinRequest, PeerRequest, PeerResponse, StreamRequest};

/// The node-to-node port when `[cluster] port` does not say.
pub const DEFAULT_PORT: u16 = 7150;
