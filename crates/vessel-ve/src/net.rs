//! VE networking on one node: a Linux bridge holding the gateway address, and per VE a
//! veth pair whose inside end is `eth0` in the VE's own network namespace. Configured over
//! rtnetlink ([`crate::rtnl`]), so a VE start runs no extra processes.

use crate::rtnl::Rtnl;
use vessel_types::Ipv4Cidr;

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

/// Give the VE whose init is `pid` its `eth0` on `bridge` with address `ip`, loopback up
/// and a default route through `gateway`.
pub fn attach_ve(host_if: &str, bridge: &str, pid: i32, ip: Ipv4Cidr, gateway: std::net::Ipv4Addr) -> Result<()> {
    let mut host = ctx("netlink socket", Rtnl::new())?;
    let _ = host.delete_link(host_if); // a stale end from a crashed start
    ctx(format!("create veth {host_if}"), host.create_veth(host_if, "eth0", pid))?;
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
