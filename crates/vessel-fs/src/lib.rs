//! vessel-fs: every change a VE makes to its files is a transaction, appended to its
//! volume's transaction log (txlog); the VE's private tree is the result of applying the
//! log over the read-only template.
//!
//! - [`tx`]: the transaction format; [`txlog`]: the log; [`tree`]: metadata = apply(log).
//! - [`lower`]: a template's tree, indexed once per node; [`view`]: the merged view.
//! - [`volume`]: one volume on disk (log, checkpoint, file contents, crash recovery,
//!   group commit, the epoch it promised, upkeep); [`apply`]: the one apply of a
//!   transaction to a tree and its data files (open, compaction, a replica); [`ack`]:
//!   where committed transactions go and what a sync waits for; [`fuse`]: the FUSE
//!   frontend that serves a volume.
//! - [`history`]: diff against the template, history of a path, state as of a time.
//! - [`archive`]: export and import; [`xattr`]: the rules for what a VE's files may carry
//!   (shared by the FUSE path and import); [`sparse`]: files with holes.
//! - [`seed`]: a volume's snapshot (base + log) as a stream, to seed a new replica.

pub mod ack;
pub mod apply;
pub mod archive;
pub mod codec;
pub mod epochs;
pub mod fuse;
pub mod history;
pub mod lower;
pub mod pagecache;
pub mod scrub;
pub mod seed;
pub mod sparse;
pub mod stats;
pub mod tree;
pub mod tx;
pub mod txlog;
pub mod view;
pub mod volume;
pub mod xattr;

pub use tree::{Tree, TreeError};
pub use tx::{FileKind, Ino, Op, Tx};
pub use txlog::{Recovery, TxLog, TxLogError};
pub use volume::{Volume, VolumeError};
