//! Vessel's shared vocabulary: names, sizes, limits, VE specs and lifecycle states, and the
//! versioned request/response types of the node API. No I/O lives here: the daemon and the
//! CLI both depend on this crate, so one definition serves both ends of every call.

pub mod api;
pub mod config;
pub mod limits;
pub mod name;
pub mod net;
pub mod size;
pub mod time;
pub mod ve;

pub use limits::Limits;
pub use name::{Name, NameError};
pub use net::Ipv4Cidr;
pub use ve::{RestartPolicy, VeSpec, VeStatus};
