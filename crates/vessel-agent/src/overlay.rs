//! The node's side of the overlay ([`vessel_ve::vxlan`]): at daemon start the VXLAN device
//! on the node bridge (when the node has a cluster address), then a thread that keeps its
//! forwarding entries equal to what the store says: the live nodes' addresses
//! (`/vessel/v1/nodes/`) and which node has each VE (`/vessel/v1/ve-net/`). It runs at
//! every change under those prefixes (a watch) and every 2 s.

use crate::cluster::Member;
use crate::node::Node;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use vessel_cluster::keys::{self, NetIdentity, NetworkRecord};
use vessel_ve::netfilter::OverlayPort;
use vessel_ve::vxlan;

/// The address the overlay uses, if the node has one: an IPv4 `[cluster] address` that is
/// not loopback (a cluster on one machine has no overlay; IPv6 underlays are not done yet).
pub fn underlay(address: Option<IpAddr>) -> Option<Ipv4Addr> {
    match address {
        Some(IpAddr::V4(a)) if !a.is_loopback() && !a.is_unspecified() => Some(a),
        _ => None,
    }
}

impl Node {
    /// Make the VXLAN device on the node bridge and keep its entries from the store.
    /// Before any VE starts: they get the overlay's MTU.
    pub fn start_overlay(self: &Arc<Self>, m: Arc<Member>, net: &NetworkRecord, local: Ipv4Addr) -> Result<(), String> {
        let (bridge, subnet) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            (st.config.bridge.clone(), st.config.subnet)
        };
        let vx = vxlan::ifname(&bridge);
        vxlan::ensure(&vx, &bridge, net.vni, local).map_err(|e| format!("overlay device {vx} on {bridge}: {e}"))?;
        let _ = self.overlay.set(OverlayPort {
            ifname: vx.clone(),
            gateway: crate::alloc::gateway(&subnet),
        });
        tracing::info!(device = %vx, vni = net.vni, %local, "overlay joined to the node bridge");
        let changed = Arc::new(tokio::sync::Notify::new());
        m.block_on(async {
            // Detached: they run as long as the cluster runtime.
            m.store().watch_prefix(keys::nodes(), changed.clone());
            m.store().watch_prefix(keys::ve_nets(), changed.clone());
        });
        let node = self.clone();
        std::thread::Builder::new()
            .name("vessel-overlay".into())
            .spawn(move || {
                let mut last_err = String::new();
                loop {
                    match node.sync_overlay(&m, &vx) {
                        Ok(n) if n > 0 => tracing::debug!(changes = n, "overlay entries"),
                        Ok(_) => {}
                        Err(e) if e != last_err => {
                            tracing::warn!("overlay entries: {e}");
                            last_err = e;
                        }
                        Err(_) => {}
                    }
                    let c = changed.clone();
                    m.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(2), c.notified()).await;
                    });
                }
            })
            .map_err(|e| format!("overlay thread: {e}"))?;
        Ok(())
    }

    /// One pass: read the nodes and VE identities, write the difference.
    fn sync_overlay(&self, m: &Member, vx: &str) -> Result<usize, String> {
        let (nodes, ves) = m
            .block_on(async {
                let nodes = m.store().nodes().await?;
                let ids = m.store().list_raw(&keys::ve_nets()).await?;
                Ok::<_, vessel_cluster::ClusterError>((nodes, ids))
            })
            .map_err(|e| e.to_string())?;
        let nodes: BTreeMap<String, Ipv4Addr> = nodes
            .into_iter()
            .filter_map(|n| {
                let a = n
                    .address
                    .parse::<Ipv4Addr>()
                    .ok()
                    .or_else(|| n.address.parse::<std::net::SocketAddrV4>().ok().map(|s| *s.ip()))?;
                Some((n.name, a))
            })
            .collect();
        let ves: Vec<(Ipv4Addr, String)> = ves
            .iter()
            .filter_map(|kv| keys::decode::<NetIdentity>(&kv.key, &kv.value).ok())
            .map(|id| (id.ip.addr, id.node))
            .collect();
        vxlan::apply(vx, &vxlan::desired(&m.name, &nodes, &ves))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_only_with_a_real_address() {
        assert_eq!(underlay(None), None);
        assert_eq!(underlay(Some("127.0.0.1".parse().unwrap())), None);
        assert_eq!(underlay(Some("::1".parse().unwrap())), None);
        assert_eq!(
            underlay(Some("10.9.0.2".parse().unwrap())),
            Some(Ipv4Addr::new(10, 9, 0, 2))
        );
    }
}
