//! VE networking on one node: a Linux bridge holding the gateway address, and per VE a
//! veth pair whose inside end is `eth0` in the VE's own network namespace. Configured over
//! rtnetlink ([`crate::rtnl`]), so a VE start runs no extra processes.
//!
//! A VE's `eth0` gets a MAC derived from its address ([`ve_mac`]), so the host knows it
//! without asking the VE: the bridge filter ([`crate::netfilter`]) admits on the VE's port
//! only frames from that MAC and that address.

use crate::rtnl::Rtnl;
use std::fmt;
use std::net::Ipv4Addr;
use vessel_types::Ipv4Cidr;

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The MAC of the VE with address `ip`: `02:56` (locally administered, unicast; 0x56 is
/// 'V') followed by the four bytes of the address. Unique wherever addresses are, fixed
/// across restarts, and readable: 10.254.20.5 has 02:56:0a:fe:14:05.
pub fn ve_mac(ip: Ipv4Addr) -> Mac {
    let [a, b, c, d] = ip.octets();
    Mac([0x02, 0x56, a, b, c, d])
}

/// Host end of VE slot `slot`'s veth on `bridge`: [`host_if_prefix`] + slot, unique per
/// node bridge and slot, at most 15 bytes.
pub fn host_if(bridge: &str, slot: u32) -> String {
    format!("{}{slot}", host_if_prefix(bridge))
}

/// What every host-side VE interface of `bridge` starts with: `v`, 24 bits of the bridge
/// name's FNV-1a hash in hex, `_`.
pub fn host_if_prefix(bridge: &str) -> String {
    let h = bridge
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("v{:06x}_", h & 0xff_ffff)
}

#[derive(Debug, thiserror::Error)]
#[error("network: {context}: {source}")]
pub struct NetError {
    pub context: String,
    pub source: std::io::Error,
}

type Result<T> = std::result::Result<T, NetError>;

fn ctx<T>(context: impl Into<String>, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| NetError {
        context: context.into(),
        source,
    })
}

/// Whether a link exists in this process's network namespace. `/proc/self/net` follows
/// the caller's namespace (`/sys/class/net` follows the namespace that mounted sysfs).
pub fn link_exists(name: &str) -> bool {
    std::fs::read_to_string("/proc/self/net/dev")
        .map(|t| {
            t.lines()
                .skip(2)
                .any(|l| l.split(':').next().map(str::trim) == Some(name))
        })
        .unwrap_or(false)
}

/// Make sure the node bridge exists, is up and holds the gateway address.
pub fn ensure_bridge(bridge: &str, gateway: Ipv4Cidr) -> Result<()> {
    let mut nl = ctx("netlink socket", Rtnl::new())?;
    if ctx("look up bridge", nl.link_index(bridge))?.is_none() {
        ctx(format!("create bridge {bridge}"), nl.create_bridge(bridge))?;
        ctx(
            format!("address {gateway} on {bridge}"),
            nl.add_address(bridge, gateway),
        )?;
    }
    ctx(format!("bring up {bridge}"), nl.set_up(bridge, None))
}

pub fn delete_link(name: &str) -> Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    let mut nl = ctx("netlink socket", Rtnl::new())?;
    ctx(format!("delete {name}"), nl.delete_link(name))
}

/// Give the VE whose init is `pid` its `eth0` on `bridge` with address `ip` and MAC `mac`,
/// loopback up and a default route through `gateway`. `mtu`: both ends' MTU (None: the
/// kernel's 1500; the overlay needs less, see [`crate::vxlan::MTU`]).
pub fn attach_ve(
    host_if: &str,
    bridge: &str,
    pid: i32,
    ip: Ipv4Cidr,
    mac: Mac,
    gateway: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<()> {
    let mut host = ctx("netlink socket", Rtnl::new())?;
    let _ = host.delete_link(host_if); // a stale end from a crashed start
    ctx(
        format!("create veth {host_if}"),
        host.create_veth(host_if, "eth0", mac.0, pid, mtu),
    )?;
    let inside = (|| {
        let bridge_index =
            ctx(format!("look up bridge {bridge}"), host.link_index(bridge))?.ok_or_else(|| NetError {
                context: format!("bridge {bridge}"),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        ctx(
            format!("attach {host_if} to {bridge}"),
            host.set_up(host_if, Some(bridge_index)),
        )?;
        let mut ve = ctx("netlink socket in the VE", Rtnl::in_netns_of(pid))?;
        ctx("bring up lo", ve.set_up("lo", None))?;
        ctx(format!("address {ip} on eth0"), ve.add_address("eth0", ip))?;
        ctx("bring up eth0", ve.set_up("eth0", None))?;
        ctx(format!("default route via {gateway}"), ve.add_default_route(gateway))
    })();
    if inside.is_err() {
        let _ = host.delete_link(host_if);
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_follows_the_address() {
        let m = ve_mac(Ipv4Addr::new(10, 254, 20, 5));
        assert_eq!(m.to_string(), "02:56:0a:fe:14:05");
        assert_eq!(m.0[0] & 0x01, 0, "unicast");
        assert_eq!(m.0[0] & 0x02, 0x02, "locally administered");
        assert_ne!(m, ve_mac(Ipv4Addr::new(10, 254, 20, 6)));
    }

    #[test]
    fn host_if_names_are_stable_and_short() {
        // Names of running VEs' interfaces must not change across upgrades.
        assert_eq!(host_if_prefix("vessel0"), "vad3851_");
        assert_ne!(host_if_prefix("vessel0"), host_if_prefix("vessel1"));
        let n = host_if("vessel0", 4_000_000);
        assert!(n.len() <= 15, "{n}");
        assert!(n.starts_with(&host_if_prefix("vessel0")));
        assert_eq!(host_if("vessel0", 3), format!("{}3", host_if_prefix("vessel0")));
    }
}
