//! The VE runtime on one host: templates, a VE's root file tree, cgroup limits, network,
//! OS parameters, and starting/entering VEs with youki's libcontainer.

pub mod apt_sources;
pub mod buildcache;
pub mod cgroup;
pub mod enter;
pub mod layout;
pub mod net;
pub mod netfilter;
pub mod oci;
pub mod osconfig;
pub mod rootfs;
pub mod rtnl;
pub mod runtime;
pub mod store;
pub mod sys;
pub mod template;
pub mod vxlan;
pub mod xfer;

pub use layout::{Layout, VeLayout};

/// Progress callback for long operations: (message, done, total; total 0 = unknown).
pub type Progress<'a> = dyn FnMut(&str, u64, u64) + 'a;

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
