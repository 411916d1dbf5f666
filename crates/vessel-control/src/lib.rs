//! The control center's decisions, apart from any I/O (as openraft's engine: a state
//! snapshot in, a list of actions out; the caller reads etcd, calls these, and writes the
//! actions back under its election guard).
//!
//! - [`model`]: what the decisions read: nodes (state, allocatable, labels), VE specs
//!   (requests, constraints) and where each VE is placed.
//! - [`schedule`]: the leader's scheduler: places pending VEs, moves VEs off draining
//!   nodes, keeps the rest where they are.
//! - [`replicas`]: which nodes get a volume's further copies.
//! - [`reconcile`]: one node's agent: from the VEs assigned to it and what runs there, the
//!   steps that make the node match.

pub mod model;
pub mod reconcile;
pub mod replicas;
pub mod schedule;
