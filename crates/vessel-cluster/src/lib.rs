//! The control store (etcd) and what Vessel keeps in it.
//!
//! - [`etcd`]: a private single-member etcd that a node starts and supervises (the one-
//!   machine default), on 127.0.0.1, data under the node root.
//! - [`keys`]: the versioned key layout (`/vessel/v1/...`) and versioned values.
//! - [`store`]: node registration under a lease kept alive, the leader election, and
//!   writes guarded by the leader's election key, so that a deposed leader's writes fail
//!   (an etcd lock alone is not a mutex: Jepsen, etcd 3.4.3).
//! - [`endpoints`] (pure): which member a request goes to, which failures move it to the
//!   next member, the timeouts, the keep-alive's timing and the election's rule; `pool`,
//!   `lease` and `election` carry them out, so that one member down, stopped or cut off
//!   changes nothing for the node.

mod election;
pub mod endpoints;
pub mod etcd;
pub mod keys;
mod lease;
mod pool;
pub mod store;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd at {endpoints}: {source}; check that etcd runs there and this node can reach it (`vessel up --etcd URL,...`)")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("no etcd member answered ({tried}); check that etcd runs there and this node can reach it (`vessel up --etcd URL,...`)")]
    Unreachable { tried: String },
    #[error("starting the private etcd: {0}")]
    Start(String),
    #[error("{key} in etcd: {reason}")]
    Value { key: String, reason: String },
    #[error("no longer the control center's leader: the write was refused")]
    NotLeader,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
