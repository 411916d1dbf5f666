//! The overlay between nodes: every node's VE bridge joins one L2 segment through a VXLAN
//! device (unicast only, no multicast, no learning). Which MAC is behind which node is not
//! learned from traffic but programmed from the control store: per remote node one
//! all-zeros entry (broadcast and unknown unicast, e.g. ARP requests, are copied to every
//! node: head-end replication) and per remote VE one entry `MAC -> node address` (the MAC
//! follows from the VE's address: [`crate::net::ve_mac`]).
//!
//! [`desired`], [`parse_fdb`] and [`batch`] are pure; [`ensure`] and [`apply`] run `ip` and
//! `bridge` (once at daemon start, and per change of the cluster's VEs or nodes).

use crate::net::{ve_mac, Mac};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet headers.
pub const OVERHEAD: u32 = 50;
/// MTU of the VXLAN device and of every VE's `eth0` when the overlay is on: a 1500-byte
/// underlay minus [`OVERHEAD`] (a bridge does not fragment: a larger VE frame would be lost).
pub const MTU: u32 = 1500 - OVERHEAD;

/// The node's VXLAN device for `bridge`: `x` + the bridge's 24-bit hash (see
/// [`crate::net::host_if_prefix`]), so it never matches the VE ports' prefix.
pub fn ifname(bridge: &str) -> String {
    let p = crate::net::host_if_prefix(bridge);
    format!("x{}", &p[1..p.len() - 1])
}

/// One forwarding entry of the VXLAN device: frames for `mac` go to node `dst`
/// (all-zeros MAC: every broadcast and unknown frame is copied to `dst`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
}

pub const FLOOD: Mac = Mac([0; 6]);

/// The entries a node programs (pure). `nodes`: every live node and its address; `ves`:
/// each VE's address and the node that has it. Nothing points at `me`.
pub fn desired(me: &str, nodes: &BTreeMap<String, Ipv4Addr>, ves: &[(Ipv4Addr, String)]) -> BTreeSet<Fdb> {
    let mut out = BTreeSet::new();
    for (name, addr) in nodes {
        if name != me {
            out.insert(Fdb { mac: FLOOD, dst: *addr });
        }
    }
    for (ip, node) in ves {
        if node == me {
            continue;
        }
        if let Some(addr) = nodes.get(node) {
            out.insert(Fdb {
                mac: ve_mac(*ip),
                dst: *addr,
            });
        }
    }
    out
}

fn parse_mac(s: &str) -> Option<Mac> {
    let mut b = [0u8; 6];
    let mut parts = s.split(':');
    for x in b.iter_mut() {
        *x = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(Mac(b))
}

/// The VXLAN entries in `bridge -j fdb show dev <vx>` (those with a `dst`; the bridge's own
/// entries for the port have none).
pub fn parse_fdb(json: &str) -> Result<BTreeSet<Fdb>, String> {
    let v: Vec<serde_json::Value> = serde_json::from_str(json).map_err(|e| format!("bridge -j fdb: {e}"))?;
    Ok(v.iter()
        .filter_map(|e| {
            let mac = parse_mac(e.get("mac")?.as_str()?)?;
            let dst = e.get("dst")?.as_str()?.parse().ok()?;
            Some(Fdb { mac, dst })
        })
        .collect())
}

/// `bridge -batch` lines that turn `have` into `want` on device `vx` (removals first).
pub fn batch(vx: &str, have: &BTreeSet<Fdb>, want: &BTreeSet<Fdb>) -> String {
    let mut s = String::new();
    for e in have.difference(want) {
        s.push_str(&format!("fdb del {} dev {vx} dst {} self\n", e.mac, e.dst));
    }
    for e in want.difference(have) {
        // All-zeros entries form a list (one per node); a VE's MAC has one node.
        let verb = if e.mac == FLOOD { "append" } else { "replace" };
        s.push_str(&format!("fdb {verb} {} dev {vx} dst {} self permanent\n", e.mac, e.dst));
    }
    s
}

fn tool(name: &str) -> String {
    ["/usr/sbin/", "/sbin/", "/usr/bin/"]
        .iter()
        .map(|d| format!("{d}{name}"))
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or_else(|| name.to_string())
}

/// Run `prog args` with `input` on stdin; its stdout, or an error with its stderr.
fn run(prog: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let path = tool(prog);
    let mut child = Command::new(&path)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {path}: {e}: install iproute2 (scripts/deps.sh)"))?;
    if let (Some(text), Some(mut i)) = (input, child.stdin.take()) {
        // Short input: a pipe buffer holds it; a write error shows in the status.
        let _ = i.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("wait for {path}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{prog} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Make the VXLAN device `vx` anew (id `vni`, source address `local`, no learning) and put
/// it on `bridge`. Made anew at every daemon start: its settings are then always the
/// current ones, and its entries are written from the store right after.
pub fn ensure(vx: &str, bridge: &str, vni: u32, local: Ipv4Addr) -> Result<(), String> {
    crate::net::delete_link(vx).map_err(|e| e.to_string())?;
    let (vni, local, port, mtu) = (
        vni.to_string(),
        local.to_string(),
        VXLAN_PORT.to_string(),
        MTU.to_string(),
    );
    run(
        "ip",
        &[
            "link",
            "add",
            vx,
            "mtu",
            &mtu,
            "type",
            "vxlan",
            "id",
            &vni,
            "dstport",
            &port,
            "local",
            &local,
            "nolearning",
        ],
        None,
    )?;
    let r = run("ip", &["link", "set", vx, "master", bridge, "up"], None);
    if r.is_err() {
        let _ = crate::net::delete_link(vx);
    }
    r.map(|_| ())
}

/// Bring `vx`'s entries to `want`.
pub fn apply(vx: &str, want: &BTreeSet<Fdb>) -> Result<usize, String> {
    let have = parse_fdb(&run("bridge", &["-j", "fdb", "show", "dev", vx], None)?)?;
    let script = batch(vx, &have, want);
    if script.is_empty() {
        return Ok(0);
    }
    // -force: a removal that finds nothing must not stop the additions after it.
    run("bridge", &["-force", "-batch", "-"], Some(&script))?;
    Ok(script.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_point_at_other_nodes_only() {
        let nodes: BTreeMap<String, Ipv4Addr> = [
            ("n1".to_string(), a("10.9.0.1")),
            ("n2".to_string(), a("10.9.0.2")),
            ("n3".to_string(), a("10.9.0.3")),
        ]
        .into();
        let ves = vec![
            (a("10.9.100.2"), "n1".to_string()),
            (a("10.9.100.3"), "n2".to_string()),
            (a("10.9.100.4"), "gone".to_string()),
        ];
        let d = desired("n1", &nodes, &ves);
        let want: BTreeSet<Fdb> = [
            Fdb {
                mac: FLOOD,
                dst: a("10.9.0.2"),
            },
            Fdb {
                mac: FLOOD,
                dst: a("10.9.0.3"),
            },
            Fdb {
                mac: ve_mac(a("10.9.100.3")),
                dst: a("10.9.0.2"),
            },
        ]
        .into();
        assert_eq!(d, want);
    }

    #[test]
    fn batch_removes_then_adds() {
        let have: BTreeSet<Fdb> = [
            Fdb {
                mac: FLOOD,
                dst: a("10.9.0.2"),
            },
            Fdb {
                mac: ve_mac(a("10.9.100.3")),
                dst: a("10.9.0.3"),
            },
        ]
        .into();
        let want: BTreeSet<Fdb> = [
            Fdb {
                mac: FLOOD,
                dst: a("10.9.0.2"),
            },
            Fdb {
                mac: FLOOD,
                dst: a("10.9.0.4"),
            },
            Fdb {
                mac: ve_mac(a("10.9.100.3")),
                dst: a("10.9.0.2"),
            },
        ]
        .into();
        assert_eq!(
            batch("xabc", &have, &want),
            "fdb del 02:56:0a:09:64:03 dev xabc dst 10.9.0.3 self\n\
             fdb append 00:00:00:00:00:00 dev xabc dst 10.9.0.4 self permanent\n\
             fdb replace 02:56:0a:09:64:03 dev xabc dst 10.9.0.2 self permanent\n"
        );
        assert_eq!(batch("xabc", &want, &want), "");
    }

    #[test]
    fn reads_bridge_json() {
        let j = r#"[{"mac":"1a:2b:3c:4d:5e:6f","master":"br0","state":"permanent"},
                    {"mac":"00:00:00:00:00:00","dst":"10.9.0.2","flags":["self"],"state":"permanent"},
                    {"mac":"02:56:0a:09:64:03","dst":"10.9.0.3","flags":["self"],"state":"permanent"}]"#;
        let f = parse_fdb(j).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.contains(&Fdb {
            mac: FLOOD,
            dst: a("10.9.0.2")
        }));
        assert!(parse_fdb("not json").is_err());
    }

    #[test]
    fn device_name_is_short_and_apart_from_ve_ports() {
        let n = ifname("vessel0");
        assert_eq!(n, "xad3851");
        assert!(!n.starts_with(&crate::net::host_if_prefix("vessel0")));
    }
}
