//! The node's side of the bridge filter ([`vessel_ve::netfilter`]): which ports and
//! addresses the node's VEs have, written to the bridge's nftables table whenever that set
//! changes (daemon start, create, destroy), and the table's removal when the daemon exits.

use crate::node::{err, NResult, Node};
use crate::state::NodeState;
use std::sync::Mutex;
use vessel_types::api::ErrorCode;
use vessel_ve::net;
use vessel_ve::netfilter::{self, Port};

/// Serialises writes of the table: each write reads the node state after taking it, so
/// the last write always reflects the latest state. (One daemon, one node, per process.)
static SYNC: Mutex<()> = Mutex::new(());

/// Every VE with an address gets its port's rules, running or not: a stopped VE has no
/// port, and starts and restarts then never touch the table.
pub(crate) fn ports(st: &NodeState) -> Vec<Port> {
    st.ves
        .values()
        .filter_map(|r| {
            r.spec.ip.map(|ip| Port {
                ifname: net::host_if(&st.config.bridge, r.slot),
                mac: net::ve_mac(ip.addr),
                ip: ip.addr,
            })
        })
        .collect()
}

impl Node {
    /// Write the bridge's filter table for the node's VEs as they are now.
    pub fn sync_bridge_filter(&self) -> NResult<()> {
        let _g = SYNC.lock().unwrap_or_else(|e| e.into_inner());
        let (bridge, ports) = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            (st.config.bridge.clone(), ports(&st))
        };
        netfilter::apply(&bridge, &net::host_if_prefix(&bridge), &ports, self.overlay.get())
            .map_err(|e| err(ErrorCode::Internal, format!("bridge filter of {bridge}: {e}")))
    }
}

/// Removes the bridge's filter table when dropped: the daemon holds one from the moment it
/// wrote the table, so every way out of the daemon removes it.
pub struct FilterGuard {
    pub bridge: String,
}

impl Drop for FilterGuard {
    fn drop(&mut self) {
        let _g = SYNC.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = netfilter::remove(&self.bridge) {
            tracing::warn!("remove the bridge filter: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{NodeConfig, VeRecord};
    use vessel_types::{Ipv4Cidr, Name, VeSpec, VeStatus};

    fn rec(name: &str, slot: u32, ip: Option<&str>) -> VeRecord {
        let mut spec = VeSpec::new(Name::parse(name).unwrap(), Name::parse("busybox").unwrap());
        spec.ip = ip.map(|i| Ipv4Cidr::parse(i).unwrap());
        VeRecord {
            created_unix: 0,
            ..VeRecord::new(spec, "t".into(), slot)
        }
    }

    #[test]
    fn every_ve_with_an_address_has_a_port() {
        let mut st = NodeState::new(NodeConfig {
            bridge: "br7".into(),
            subnet: Ipv4Cidr::parse("10.254.20.0/24").unwrap(),
            cgroup_parent: "vessel".into(),
        });
        let mut running = rec("a", 3, Some("10.254.20.5/24"));
        running.status = VeStatus::Running;
        for r in [running, rec("b", 4, Some("10.254.20.6/24")), rec("c", 5, None)] {
            st.ves.insert(r.spec.name.clone(), r);
        }
        let p = ports(&st);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].ifname, net::host_if("br7", 3));
        assert_eq!(p[0].ip, std::net::Ipv4Addr::new(10, 254, 20, 5));
        assert_eq!(p[0].mac.to_string(), "02:56:0a:fe:14:05");
        assert_eq!(p[1].ifname, net::host_if("br7", 4), "a stopped VE keeps its rules");
    }
}
