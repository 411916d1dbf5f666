//! vessel-repl: a VE's volume on N nodes. Primary-backup with the control store as
//! configuration master (as PacificA, Elasticsearch, Ceph): per volume the store holds
//! the epoch, the writer, the in-sync set and the minimum number of copies; the writer
//! streams transactions to the replicas; a sync is acknowledged only when every in-sync
//! replica has the covering transactions durably; a replica that does not answer is taken
//! out of the in-sync set by a compare-and-swap before any sync is acknowledged without it.
//!
//! - Pure decisions (no I/O, unit-tested on their decided actions): [`config`] (the
//!   volume's record in the store), [`decide`] (in-sync set, when a sync may be
//!   acknowledged), [`diverge`] (where a replica's log leaves the writer's), [`catchup`]
//!   (log tail or snapshot).
//! - The protocol: [`wire`] (framed, versioned, CRC-checked), [`writer`] (the volume's
//!   [`vessel_fs::ack::Acks`]: senders, acknowledgements, removal), [`replica`] (applies
//!   a stream to its own copy).

pub mod catchup;
pub mod config;
pub mod decide;
pub mod diverge;
pub mod replica;
pub mod wire;
pub mod writer;
