//! Cluster-wide network identity of VEs: one VE network per cluster, and per VE an address
//! and a uid range claimed in etcd, so that no two VEs of the cluster ever share either, and
//! a VE keeps both on whichever node it runs.
//!
//! ```text
//! /vessel/v1/network          NetworkRecord {subnet, vni}: written once, by the first node
//! /vessel/v1/ips/<ip>         Claim {ve}      \
//! /vessel/v1/uid-slots/<n>    Claim {ve}       } made together, only if all are absent
//! /vessel/v1/ve-net/<ve>      NetIdentity {ip, slot, node}  /
//! ```
//! The choice is pure ([`crate::alloc::choose`]: the lowest free address and slot given the
//! claims read); the claim is one etcd transaction that compares every key's absence, so
//! two nodes that chose the same address concurrently cannot both win: the loser reads the
//! claims again and chooses the next. A VE that already has an identity (created again on
//! another node: a move) gets it back, with its node updated. Destroying a VE cluster-wide
//! releases all three keys in one transaction.
//!
//! A node of the overlay whose configured subnet differs from the cluster's does not start
//! (the daemon says which subnet to configure): adopting the cluster's silently would leave
//! its bridge and its existing VEs on another network. A node without an overlay (no
//! cluster address: several daemons on one machine, as in tests) only gets a warning: its
//! VEs cannot reach other nodes' anyway, and addresses stay unique across the cluster.

use crate::alloc::{self, ClaimError};
use crate::cluster::Member;
use crate::node::{err, NResult, Node};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use vessel_cluster::keys::{self, Claim, NetIdentity, NetworkRecord};
use vessel_cluster::store::{Store, Write};
use vessel_cluster::ClusterError;
use vessel_types::api::ErrorCode;
use vessel_types::{Ipv4Cidr, Name, VeSpec};

/// The overlay's VXLAN network identifier (0x56 is 'V'), recorded with the network.
pub const DEFAULT_VNI: u32 = 0x56_5600;

/// Attempts at a claim that lost a race before giving up (each re-reads the claims).
const CLAIM_TRIES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Choose(#[from] ClaimError),
    #[error("VE '{ve}' holds {what} in the cluster: {hint}")]
    Held {
        ve: String,
        what: String,
        hint: &'static str,
    },
    #[error("the cluster's control store: {0}")]
    Store(#[from] ClusterError),
    #[error("claiming an address for VE '{0}' lost {CLAIM_TRIES} races with other creates: try again")]
    Busy(String),
}

impl IpamError {
    fn code(&self) -> ErrorCode {
        match self {
            IpamError::Choose(ClaimError::Ip(_)) => ErrorCode::InvalidArgument,
            IpamError::Choose(_) => ErrorCode::Exhausted,
            IpamError::Held { .. } => ErrorCode::Conflict,
            IpamError::Store(_) | IpamError::Busy(_) => ErrorCode::Unavailable,
        }
    }
}

/// The network a node with `subnet` in its config joins (pure): the cluster's, if it has one.
pub fn check_network(cluster: &NetworkRecord, subnet: &Ipv4Cidr) -> Result<(), String> {
    let mine = subnet.with_addr(subnet.network());
    let theirs = cluster.subnet.with_addr(cluster.subnet.network());
    if mine == theirs {
        Ok(())
    } else {
        Err(format!(
            "this node's VE subnet {mine} differs from the cluster's VE network {theirs} (/vessel/v1/network): \
             start the node with `--subnet {theirs}` (VESSEL_SUBNET); a VE keeps its address on every node, so \
             the cluster has one VE network"
        ))
    }
}

/// Record the cluster's VE network if there is none yet (the first node) and read it. The
/// caller checks this node's subnet against it ([`check_network`]).
pub async fn ensure_network(store: &Store, subnet: &Ipv4Cidr) -> Result<NetworkRecord, String> {
    let want = NetworkRecord {
        subnet: subnet.with_addr(subnet.network()),
        vni: DEFAULT_VNI,
    };
    let key = keys::network();
    store.create(&key, &want).await.map_err(|e| e.to_string())?;
    let have: NetworkRecord = store
        .get(&key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{key} vanished right after it was written: try again"))?;
    Ok(have)
}

/// Claims under `prefix` (`ips/` or `uid-slots/`) by their key's last part: holder, revision.
async fn claims<K: std::str::FromStr + Ord>(
    store: &Store,
    prefix: &str,
) -> Result<BTreeMap<K, (String, i64)>, ClusterError> {
    let mut out = BTreeMap::new();
    for kv in store.list_raw(prefix).await? {
        let Some(k) = kv.key.strip_prefix(prefix).and_then(|s| s.parse::<K>().ok()) else {
            continue;
        };
        let c: Claim = keys::decode(&kv.key, &kv.value)?;
        out.insert(k, (c.ve, kv.mod_revision));
    }
    Ok(out)
}

fn holders<K: Copy + Ord>(m: &BTreeMap<K, (String, i64)>) -> BTreeMap<K, String> {
    m.iter().map(|(k, (v, _))| (*k, v.clone())).collect()
}

/// Give VE `ve` on node `node` its identity: the one it has in the cluster, or a new one
/// (`want_ip`/`want_slot` if given, else the lowest free). Safe to repeat.
pub async fn claim(
    store: &Store,
    node: &str,
    subnet: &Ipv4Cidr,
    ve: &str,
    want_ip: Option<Ipv4Cidr>,
    want_slot: Option<u32>,
) -> Result<NetIdentity, IpamError> {
    let id_key = keys::ve_net(ve);
    for _ in 0..CLAIM_TRIES {
        if let Some((mut id, rev)) = store.get_rev::<NetIdentity>(&id_key).await? {
            if want_ip.is_some_and(|w| w.addr != id.ip.addr) {
                return Err(IpamError::Held {
                    ve: ve.to_string(),
                    what: format!("address {}", id.ip),
                    hint: "it keeps it on every node; leave --ip out or destroy the VE first",
                });
            }
            if want_slot.is_some_and(|s| s != id.slot) {
                return Err(IpamError::Held {
                    ve: ve.to_string(),
                    what: format!("uid range {}", id.slot),
                    hint: "another node registered it first with another range: destroy one of the two copies",
                });
            }
            if id.node == node {
                return Ok(id);
            }
            id.node = node.to_string();
            if store.put_if(&id_key, &id, rev).await? {
                return Ok(id);
            }
            continue;
        }
        let ips: BTreeMap<Ipv4Addr, (String, i64)> = claims(store, &keys::ips()).await?;
        let slots: BTreeMap<u32, (String, i64)> = claims(store, &keys::uid_slots()).await?;
        let (ip, slot) = alloc::choose(subnet, ve, want_ip, want_slot, &holders(&ips), &holders(&slots))?;
        // A claim the VE itself left (a release cut short) is taken over at its revision.
        let rev_of = |held: Option<&(String, i64)>| held.map_or(0, |(_, r)| *r);
        let id = NetIdentity {
            ip,
            slot,
            node: node.to_string(),
        };
        let claim = keys::encode(&Claim { ve: ve.to_string() });
        let expect = vec![
            (keys::ip(ip.addr), rev_of(ips.get(&ip.addr))),
            (keys::uid_slot(slot), rev_of(slots.get(&slot))),
            (id_key.clone(), 0),
        ];
        let writes = vec![
            Write::Put(keys::ip(ip.addr), claim.clone()),
            Write::Put(keys::uid_slot(slot), claim),
            Write::Put(id_key.clone(), keys::encode(&id)),
        ];
        if store.write_if(&expect, writes).await? {
            return Ok(id);
        }
        // Another create took one of them meanwhile: read again and choose again.
    }
    Err(IpamError::Busy(ve.to_string()))
}

/// The identity VE `ve` has in the cluster, if any.
pub async fn identity(store: &Store, ve: &str) -> Result<Option<NetIdentity>, ClusterError> {
    store.get(&keys::ve_net(ve)).await
}

/// Free VE `ve`'s address and uid range (it is destroyed cluster-wide). Claims another VE
/// holds are left alone.
pub async fn release(store: &Store, ve: &str) -> Result<(), ClusterError> {
    let id_key = keys::ve_net(ve);
    for _ in 0..CLAIM_TRIES {
        let Some((id, rev)) = store.get_rev::<NetIdentity>(&id_key).await? else {
            return Ok(());
        };
        let mut expect = vec![(id_key.clone(), rev)];
        let mut writes = vec![Write::Delete(id_key.clone())];
        for key in [keys::ip(id.ip.addr), keys::uid_slot(id.slot)] {
            if let Some((c, r)) = store.get_rev::<Claim>(&key).await? {
                if c.ve == ve {
                    expect.push((key.clone(), r));
                    writes.push(Write::Delete(key));
                }
            }
        }
        if store.write_if(&expect, writes).await? {
            return Ok(());
        }
    }
    Err(ClusterError::Value {
        key: id_key,
        reason: "changed by others on every try to release it".into(),
    })
}

impl Node {
    /// The identity a VE created here gets from the cluster (None without a cluster: the
    /// node allocates alone, as before there was one).
    pub(crate) fn claim_identity(&self, spec: &VeSpec) -> NResult<Option<NetIdentity>> {
        let Some(m) = self.cluster.get() else { return Ok(None) };
        let subnet = self.state.lock().unwrap_or_else(|p| p.into_inner()).config.subnet;
        m.block_on(claim(m.store(), &m.name, &subnet, spec.name.as_str(), spec.ip, None))
            .map(Some)
            .map_err(|e| err(e.code(), format!("VE '{}': {e}", spec.name)))
    }

    /// A VE's network identity in the cluster (address, uid slot, node). `ve move` creates
    /// the VE on its target with the spec it has (whose `ip` is the VE's address): the
    /// target's create finds this identity and keeps address and uid range, moving the
    /// identity's node to itself. The source then removes its copy with the local destroy
    /// (which releases nothing: only a destroy of the VE cluster-wide does).
    pub fn network_identity(&self, ve: &Name) -> NResult<Option<NetIdentity>> {
        let m = self
            .cluster
            .get()
            .ok_or_else(|| err(ErrorCode::Unavailable, "this node has not joined a cluster yet"))?;
        m.block_on(identity(m.store(), ve.as_str())).map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!("reading the network identity of VE '{ve}': {e}"),
            )
        })
    }

    /// After joining: register the addresses and uid ranges of the VEs this node already
    /// has (made before the cluster knew them: an upgraded machine, an adopted VE). A
    /// conflict (two machines gave out one address before they joined) is logged: the VE
    /// keeps running here, and the operator resolves it.
    pub fn register_identities(&self) {
        let Some(m) = self.cluster.get() else { return };
        let (subnet, ves): (Ipv4Cidr, Vec<(Name, Option<Ipv4Cidr>, u32)>) = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let v = st
                .ves
                .values()
                .map(|r| (r.spec.name.clone(), r.spec.ip, r.slot))
                .collect();
            (st.config.subnet, v)
        };
        for (name, ip, slot) in ves {
            let Some(ip) = ip else { continue };
            let r = m.block_on(claim(m.store(), &m.name, &subnet, name.as_str(), Some(ip), Some(slot)));
            if let Err(e) = r {
                tracing::error!(ve = %name, "registering the VE's address {ip} and uid range {slot} in the cluster: {e}");
            }
        }
    }
}

/// Release a destroyed VE's identity (logged on failure: the keys then stay claimed until
/// removed by hand, which wastes an address but never gives one out twice).
pub(crate) fn release_logged(m: &Member, ve: &str) {
    if let Err(e) = m.block_on(release(m.store(), ve)) {
        tracing::warn!(ve, "releasing the destroyed VE's address and uid range: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_network_per_cluster() {
        let c = NetworkRecord {
            subnet: Ipv4Cidr::parse("10.170.16.0/20").unwrap(),
            vni: DEFAULT_VNI,
        };
        assert!(check_network(&c, &Ipv4Cidr::parse("10.170.16.0/20").unwrap()).is_ok());
        // The same network written with another host address is the same network.
        assert!(check_network(&c, &Ipv4Cidr::parse("10.170.16.1/20").unwrap()).is_ok());
        let e = check_network(&c, &Ipv4Cidr::parse("10.170.1.0/24").unwrap()).unwrap_err();
        assert!(e.contains("--subnet 10.170.16.0/20"), "{e}");
        assert!(check_network(&c, &Ipv4Cidr::parse("10.170.16.0/24").unwrap()).is_err());
    }
}
