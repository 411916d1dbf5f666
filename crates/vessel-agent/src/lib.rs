//! The node daemon: node state on disk, the VE lifecycle, console and exit monitoring,
//! and the local API server.

pub mod alloc;
pub mod bridge_filter;
pub mod clientout;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod forward;
pub mod fsroot;
pub mod interactive;
pub mod ipam;
pub mod join;
pub mod keeper;
pub mod monitor;
pub mod move_repl;
pub mod node;
pub mod overlay;
pub mod peer;
mod peer_session;
mod repair;
pub mod replicate;
pub mod scrubbing;
pub mod server;
pub mod state;
mod templates;
pub mod transfer;

pub use node::{Node, NodeOptions};
