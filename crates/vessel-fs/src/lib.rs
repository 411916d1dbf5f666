//! vessel-fs: every change a VE makes to its files is a transaction, appended to its
//! volume's transaction log (txlog); the VE's private tree is the result of applying the
//! log. This crate holds, so far, the transaction format ([`tx`]) and the log ([`txlog`]).
//! The materialized tree, the FUSE frontend and replication build on these.

pub mod codec;
pub mod tree;
pub mod tx;
pub mod txlog;

pub use tree::{Tree, TreeError};
pub use tx::{FileKind, Ino, Op, Tx};
pub use txlog::{Recovery, TxLog, TxLogError};
