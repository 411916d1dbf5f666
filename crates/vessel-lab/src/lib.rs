//! `vessel lab`: a cluster of N Vessel nodes on one machine, for tests, benchmarks and
//! demos. Each node is a network namespace (a veth to the lab's hub bridge, which lives in
//! a namespace of its own: the root namespace never gets a lab address), a mount namespace
//! (slave: VE and FUSE mounts of a node stay inside it), a cgroup in the unified hierarchy
//! (`lab kill` is `cgroup.kill`: a power loss), a data dir, a VE bridge and subnet and a
//! `node.toml` naming the lab's etcd members, which run inside the first nodes.
//!
//! * [`plan`]: names, address plan, etcd arguments, `node.toml` (pure)
//! * [`nft`]: the partition ruleset (pure)
//! * [`state`]: `lab.json`, versioned, written before anything is made
//! * [`sys`]: namespaces, links, cgroups, entering a node, probes
//! * [`lab`]: the operations

pub mod lab;
pub mod nft;
pub mod plan;
pub mod state;
pub mod sys;

pub use lab::{down, Lab, LabError, LabStatus, NodeStatus, UpOptions};
pub use state::LabPaths;
