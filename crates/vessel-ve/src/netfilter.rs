//! Anti-spoofing on the node bridge: a VE's bridge port admits only frames from that VE's
//! own MAC and IPv4 address, so a VE root (which has `CAP_NET_ADMIN` in its own network
//! namespace) cannot take another VE's address or MAC, poison neighbour caches with
//! gratuitous ARP, or steal or cut another VE's traffic.
//!
//! One nftables table per node bridge, `table bridge vessel_<bridge>`, written as a whole by
//! [`apply`] (`nft -f -`, one transaction: no moment without rules) from what [`render`]
//! makes of the node's VEs, and deleted by [`remove`] when the daemon goes. Its base chain
//! hooks bridge `prerouting`, which sees every frame entering a bridge port *before* the
//! bridge learns its source MAC, so a dropped frame cannot move another VE's MAC in the
//! forwarding table either. Per VE port (the host end of its veth, matched by `iifname`
//! through a verdict map) a chain:
//!
//! * drops frames whose Ethernet source is not the VE's MAC ([`crate::net::ve_mac`], set on
//!   `eth0` at every start: a VE that changes its MAC only loses its own traffic);
//! * admits ARP only for Ethernet/IPv4 with the VE's MAC and address as sender (no
//!   0.0.0.0 probes: addresses are static, the node allocates them, nobody probes);
//! * admits IPv4 only from the VE's address (no 0.0.0.0 either: VEs run no DHCP client);
//! * drops everything else: IPv6 (VEs have no IPv6 address today; letting link-local
//!   traffic through would need neighbour-discovery rules of its own), VLAN tags, STP
//!   and other link-layer protocols.
//!
//! Frames *to* a VE port are not filtered: the bridge delivers to a port by destination MAC,
//! and since no VE can send with another's MAC, frames for one VE do not reach another
//! (except floods, which every port sees on any bridge). Host interfaces of this bridge's
//! VEs that the table does not know (e.g. a VE whose rules could not be written) match the
//! prefix rule and are dropped: the filter fails closed.
//!
//! With the overlay ([`crate::vxlan`]) the bridge has one more port, the VXLAN device, whose
//! frames come from other nodes' VE ports (filtered there the same way). Its chains:
//!
//! * every node's bridge holds the same gateway address (a distributed gateway: a VE's
//!   traffic leaves through its own node), so ARP for or from the gateway must not cross
//!   the overlay (else a VE could learn another node's bridge as its gateway): ARP with the
//!   gateway's address as sender or target is dropped in and out of the VXLAN port;
//! * frames from the overlay with a source MAC of one of this node's VEs are dropped (the
//!   bridge would otherwise move that VE's MAC to the overlay port);
//! * VE ports may not send to UDP port 4789: a VE could otherwise hand a node's VXLAN
//!   socket (which accepts from any source) a frame of its own making, spoofed addresses
//!   and all, that would enter the bridge behind the filter.
//!
//! A bridge-family table sees the frames of every bridge on the host; this kernel has no
//! `meta ibrname` (`NFT_BRIDGE_META`), so rules match the VE ports' names, which carry a
//! hash of this bridge's name ([`crate::net::host_if_prefix`]). Rules exist for every VE
//! of the node that has an address, running or not, so starts and restarts do not touch
//! the table; it changes when VEs are created or destroyed (and would when an address
//! changes).

use crate::net::Mac;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One VE's port on the bridge and what it may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Host end of the VE's veth.
    pub ifname: String,
    pub mac: Mac,
    pub ip: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("bridge name '{0}' cannot name an nftables table: use letters, digits, '_', '-' or '.'")]
    BadBridgeName(String),
    #[error("interface name '{0}' cannot name an nftables chain: use letters, digits and '_'")]
    BadPortName(String),
    #[error("run nft ({path}): {source}: install nftables (scripts/deps.sh)")]
    Spawn { path: String, source: std::io::Error },
    #[error("wait for nft: {0}")]
    Wait(std::io::Error),
    #[error("nft -f for table {table} failed ({status}): {stderr}")]
    Nft {
        table: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("nft for table {table} did not finish within {limit:?}; killed")]
    Timeout { table: String, limit: Duration },
}

/// The overlay's port on the bridge: the VXLAN device and the (distributed) gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPort {
    pub ifname: String,
    pub gateway: Ipv4Addr,
}

/// Name of the table that filters `bridge`'s VE ports.
pub fn table_name(bridge: &str) -> Result<String, FilterError> {
    let ok = !bridge.is_empty()
        && bridge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !ok {
        return Err(FilterError::BadBridgeName(bridge.to_string()));
    }
    Ok(format!("vessel_{bridge}"))
}

/// Interface names become chain names and quoted strings: keep them plain identifiers.
fn check_ifname(name: &str) -> Result<(), FilterError> {
    let mut b = name.bytes();
    let ok = b.next().is_some_and(|c| c.is_ascii_alphabetic()) && b.all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(FilterError::BadPortName(name.to_string()))
    }
}

/// The nft script that replaces `bridge`'s table with rules for `ports`. `port_prefix` is
/// what every VE port of this bridge is called (see the module doc: unknown ports with it
/// are dropped). Creating the table, deleting it and defining it again is one transaction.
pub fn render(
    bridge: &str,
    port_prefix: &str,
    ports: &[Port],
    overlay: Option<&OverlayPort>,
) -> Result<String, FilterError> {
    let table = table_name(bridge)?;
    check_ifname(port_prefix)?;
    for p in ports {
        check_ifname(&p.ifname)?;
    }
    if let Some(o) = overlay {
        check_ifname(&o.ifname)?;
    }
    let mut s = format!(
        "# vessel: anti-spoofing on the VE ports of bridge {bridge} (generated; replaced as a whole)\n\
         table bridge {table} {{}}\n\
         delete table bridge {table}\n\
         table bridge {table} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority -200; policy accept;\n"
    );
    if !ports.is_empty() {
        let entries: Vec<String> = ports.iter().map(|p| format!("\"{0}\" : goto {0}", p.ifname)).collect();
        s.push_str(&format!("\t\tiifname vmap {{ {} }}\n", entries.join(", ")));
    }
    if let Some(o) = overlay {
        s.push_str(&format!("\t\tiifname \"{}\" goto overlay_in\n", o.ifname));
    }
    s.push_str(&format!("\t\tiifname \"{port_prefix}*\" drop\n\t}}\n"));
    if let Some(o) = overlay {
        let (vx, gw) = (&o.ifname, o.gateway);
        s.push_str(&format!(
            "\tchain overlay_in {{\n\
             \t\tarp saddr ip {gw} drop\n\
             \t\tarp daddr ip {gw} drop\n"
        ));
        if !ports.is_empty() {
            let macs: Vec<String> = ports.iter().map(|p| p.mac.to_string()).collect();
            s.push_str(&format!("\t\tether saddr {{ {} }} drop\n", macs.join(", ")));
        }
        s.push_str(&format!(
            "\t\taccept\n\
             \t}}\n\
             \tchain postrouting {{\n\
             \t\ttype filter hook postrouting priority -200; policy accept;\n\
             \t\toifname \"{vx}\" arp saddr ip {gw} drop\n\
             \t\toifname \"{vx}\" arp daddr ip {gw} drop\n\
             \t}}\n"
        ));
    }
    let no_vxlan = if overlay.is_some() {
        format!("\t\tudp dport {} drop\n", crate::vxlan::VXLAN_PORT)
    } else {
        String::new()
    };
    for p in ports {
        let (name, mac, ip) = (&p.ifname, p.mac, p.ip);
        s.push_str(&format!(
            "\tchain {name} {{\n\
             \t\tether saddr != {mac} drop\n\
             \t\tarp htype != 1 drop\n\
             \t\tarp ptype != ip drop\n\
             \t\tarp hlen != 6 drop\n\
             \t\tarp plen != 4 drop\n\
             \t\tarp saddr ether != {mac} drop\n\
             \t\tarp saddr ip != {ip} drop\n\
             \t\tether type arp accept\n\
             \t\tip saddr != {ip} drop\n\
             {no_vxlan}\
             \t\tether type ip accept\n\
             \t\tdrop\n\
             \t}}\n"
        ));
    }
    s.push_str("}\n");
    Ok(s)
}

/// The nft script that removes `bridge`'s table if it exists.
pub fn render_remove(bridge: &str) -> Result<String, FilterError> {
    let table = table_name(bridge)?;
    Ok(format!("table bridge {table} {{}}\ndelete table bridge {table}\n"))
}

/// Replace `bridge`'s table with rules for `ports`.
pub fn apply(
    bridge: &str,
    port_prefix: &str,
    ports: &[Port],
    overlay: Option<&OverlayPort>,
) -> Result<(), FilterError> {
    run_nft(&table_name(bridge)?, &render(bridge, port_prefix, ports, overlay)?)
}

/// Remove `bridge`'s table (nothing to do if there is none).
pub fn remove(bridge: &str) -> Result<(), FilterError> {
    run_nft(&table_name(bridge)?, &render_remove(bridge)?)
}

/// Debian puts nft in /usr/sbin, which a daemon's PATH may lack.
fn nft_binary() -> PathBuf {
    ["/usr/sbin/nft", "/sbin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nft"))
}

const NFT_LIMIT: Duration = Duration::from_secs(20);

/// Feed `script` to `nft -f -`, bounded in time.
fn run_nft(table: &str, script: &str) -> Result<(), FilterError> {
    let path = nft_binary();
    let mut child = Command::new(&path)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| FilterError::Spawn {
            path: path.display().to_string(),
            source,
        })?;
    // stdin and stderr on their own threads: nft may stop reading or write a lot.
    let stdin = child.stdin.take();
    let script = script.to_string();
    let writer = std::thread::spawn(move || {
        // A write error (nft exited early) shows in its status and stderr.
        if let Some(mut i) = stdin {
            let _ = i.write_all(script.as_bytes());
        }
    });
    let stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut e = String::new();
        if let Some(mut s) = stderr {
            let _ = std::io::Read::read_to_string(&mut s, &mut e);
        }
        e
    });
    let deadline = std::time::Instant::now() + NFT_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(FilterError::Timeout {
                    table: table.to_string(),
                    limit: NFT_LIMIT,
                });
            }
            Err(e) => return Err(FilterError::Wait(e)),
        }
    };
    let _ = writer.join();
    let stderr = reader.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        Err(FilterError::Nft {
            table: table.to_string(),
            status,
            stderr: stderr.trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(slot: u32, ip: [u8; 4]) -> Port {
        let ip = Ipv4Addr::from(ip);
        Port {
            ifname: format!("vabc123_{slot}"),
            mac: crate::net::ve_mac(ip),
            ip,
        }
    }

    #[test]
    fn renders_one_chain_per_port() {
        let s = render(
            "br0",
            "vabc123_",
            &[port(1, [10, 254, 20, 2]), port(7, [10, 254, 20, 9])],
            None,
        )
        .unwrap();
        let expected = "\
# vessel: anti-spoofing on the VE ports of bridge br0 (generated; replaced as a whole)
table bridge vessel_br0 {}
delete table bridge vessel_br0
table bridge vessel_br0 {
\tchain prerouting {
\t\ttype filter hook prerouting priority -200; policy accept;
\t\tiifname vmap { \"vabc123_1\" : goto vabc123_1, \"vabc123_7\" : goto vabc123_7 }
\t\tiifname \"vabc123_*\" drop
\t}
\tchain vabc123_1 {
\t\tether saddr != 02:56:0a:fe:14:02 drop
\t\tarp htype != 1 drop
\t\tarp ptype != ip drop
\t\tarp hlen != 6 drop
\t\tarp plen != 4 drop
\t\tarp saddr ether != 02:56:0a:fe:14:02 drop
\t\tarp saddr ip != 10.254.20.2 drop
\t\tether type arp accept
\t\tip saddr != 10.254.20.2 drop
\t\tether type ip accept
\t\tdrop
\t}
\tchain vabc123_7 {
\t\tether saddr != 02:56:0a:fe:14:09 drop
";
        assert!(s.starts_with(expected), "{s}");
        assert!(s.contains("\t\tarp saddr ip != 10.254.20.9 drop\n"));
        assert!(s.contains("\t\tip saddr != 10.254.20.9 drop\n"));
        assert!(s.ends_with("\t\tdrop\n\t}\n}\n"));
        // Every port chain ends in a verdict: nothing falls through to the next port.
        assert_eq!(s.matches("\t\tdrop\n\t}").count(), 2);
    }

    #[test]
    fn no_ports_still_drops_unknown_ports() {
        let s = render("vt1", "vabc123_", &[], None).unwrap();
        assert!(!s.contains("vmap"), "{s}");
        assert!(s.contains("\t\tiifname \"vabc123_*\" drop\n"));
        assert!(s.contains("delete table bridge vessel_vt1\n"));
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(table_name("vessel0").unwrap(), "vessel_vessel0");
        assert_eq!(table_name("br-lab.1").unwrap(), "vessel_br-lab.1");
        for bad in ["", "br 0", "br\"0", "br;0", "br}0", "brü"] {
            assert!(matches!(table_name(bad), Err(FilterError::BadBridgeName(_))), "{bad:?}");
            assert!(render(bad, "v_", &[], None).is_err());
        }
        let mut p = port(1, [10, 0, 0, 2]);
        p.ifname = "x\" drop; accept".into();
        assert!(matches!(
            render("br0", "vabc123_", &[p], None),
            Err(FilterError::BadPortName(_))
        ));
        assert!(matches!(
            render("br0", "1abc", &[], None),
            Err(FilterError::BadPortName(_))
        ));
    }

    #[test]
    fn overlay_port_keeps_gateway_arp_home_and_local_macs_local() {
        let o = OverlayPort {
            ifname: "xabc123".into(),
            gateway: Ipv4Addr::new(10, 254, 20, 1),
        };
        let s = render("br0", "vabc123_", &[port(1, [10, 254, 20, 2])], Some(&o)).unwrap();
        assert!(
            s.contains("\t\tiifname \"xabc123\" goto overlay_in\n\t\tiifname \"vabc123_*\" drop\n"),
            "{s}"
        );
        assert!(
            s.contains(
                "\tchain overlay_in {\n\
             \t\tarp saddr ip 10.254.20.1 drop\n\
             \t\tarp daddr ip 10.254.20.1 drop\n\
             \t\tether saddr { 02:56:0a:fe:14:02 } drop\n\
             \t\taccept\n\t}\n"
            ),
            "{s}"
        );
        assert!(s.contains("\t\toifname \"xabc123\" arp saddr ip 10.254.20.1 drop\n"));
        assert!(s.contains("\t\toifname \"xabc123\" arp daddr ip 10.254.20.1 drop\n"));
        assert!(s.contains("\t\tip saddr != 10.254.20.2 drop\n\t\tudp dport 4789 drop\n\t\tether type ip accept\n"));
        // Without the overlay, nothing of it.
        let plain = render("br0", "vabc123_", &[port(1, [10, 254, 20, 2])], None).unwrap();
        assert!(!plain.contains("overlay") && !plain.contains("4789"), "{plain}");
    }

    #[test]
    fn remove_is_idempotent_script() {
        assert_eq!(
            render_remove("br0").unwrap(),
            "table bridge vessel_br0 {}\ndelete table bridge vessel_br0\n"
        );
    }
}
