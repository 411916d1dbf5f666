//! The key layout in etcd and the versioned values stored under it.
//!
//! ```text
//! /vessel/v1/members/<node>      NodeRecord, permanent: the cluster knows the node (a member
//!                                without a live record below is lost; draining is kept here)
//! /vessel/v1/nodes/<node>        NodeRecord, under the node's lease (gone when it expires)
//! /vessel/v1/ves/<ve>/spec       VeRecord: the VE's spec and its generation
//! /vessel/v1/ves/<ve>/place      Placement: the node it is assigned to (leader writes)
//! /vessel/v1/ves/<ve>/status     what its node observed
//! /vessel/v1/assigned/<node>/<ve> the leader's index of the VEs placed on each node
//! /vessel/v1/templates/<node>    the names of the templates the node has
//! /vessel/v1/election            the control center's election (etcd's election API)
//! /vessel/v1/join-tokens/<id>    a join token: its secret's hash, expiry, used (vessel-peer)
//! /vessel/v1/certs/<node>        CertRecord: the certificate the cluster CA issued to the node
//! /vessel/v1/revoked/<sha256>    Revoked: a removed node's certificate, refused by every node
//! /vessel/v1/network             the VE network of the cluster: subnet, VXLAN id (first node)
//! /vessel/v1/ips/<ip>            the VE that holds this address (created only if absent)
//! /vessel/v1/uid-slots/<n>       the VE that holds this uid range (created only if absent)
//! /vessel/v1/ve-net/<ve>         the VE's network identity: address, uid slot, its node
//! ```
//! Every value is JSON `{"v": 1, "value": ...}`; a reader refuses another version with an
//! error that names the key.

use crate::ClusterError;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub const PREFIX: &str = "/vessel/v1/";
/// Format version of every value.
pub const VALUE_VERSION: u32 = 1;

pub fn node(name: &str) -> String {
    format!("{PREFIX}nodes/{name}")
}

pub fn nodes() -> String {
    format!("{PREFIX}nodes/")
}

pub fn member(name: &str) -> String {
    format!("{PREFIX}members/{name}")
}

pub fn members() -> String {
    format!("{PREFIX}members/")
}

pub fn ve(name: &str, part: &str) -> String {
    format!("{PREFIX}ves/{name}/{part}")
}

pub fn ves() -> String {
    format!("{PREFIX}ves/")
}

/// The VE and part of a key under [`ves`] (`/vessel/v1/ves/<ve>/<part>`).
pub fn ve_part(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(PREFIX)?.strip_prefix("ves/")?.split_once('/')
}

/// The leader's index of what is placed on a node (`/vessel/v1/assigned/<node>/<ve>`), so
/// a node can watch its own VEs without hearing every change in the cluster.
pub fn assigned(node: &str, ve: &str) -> String {
    format!("{PREFIX}assigned/{node}/{ve}")
}

pub fn assigned_to(node: &str) -> String {
    format!("{PREFIX}assigned/{node}/")
}

/// The whole index: every node's assigned VEs.
pub fn assigned_all() -> String {
    format!("{PREFIX}assigned/")
}

pub fn join_token(id: &str) -> String {
    format!("{PREFIX}join-tokens/{id}")
}

/// The names of the templates a node has (`/vessel/v1/templates/<node>`).
pub fn templates(node: &str) -> String {
    format!("{PREFIX}templates/{node}")
}

/// The certificate issued to a node (`/vessel/v1/certs/<node>`), written by the issuer.
pub fn cert(node: &str) -> String {
    format!("{PREFIX}certs/{node}")
}

/// A revoked certificate, by the hex SHA-256 of its DER (`/vessel/v1/revoked/<sha256>`).
pub fn revoked(sha256: &str) -> String {
    format!("{PREFIX}revoked/{sha256}")
}

pub fn revoked_all() -> String {
    format!("{PREFIX}revoked/")
}

/// The cluster's VE network (`/vessel/v1/network`).
pub fn network() -> String {
    format!("{PREFIX}network")
}

/// The claim of a VE address (`/vessel/v1/ips/<ip>`).
pub fn ip(addr: std::net::Ipv4Addr) -> String {
    format!("{PREFIX}ips/{addr}")
}

pub fn ips() -> String {
    format!("{PREFIX}ips/")
}

/// The claim of a uid range (`/vessel/v1/uid-slots/<n>`).
pub fn uid_slot(slot: u32) -> String {
    format!("{PREFIX}uid-slots/{slot}")
}

pub fn uid_slots() -> String {
    format!("{PREFIX}uid-slots/")
}

/// A VE's network identity (`/vessel/v1/ve-net/<ve>`).
pub fn ve_net(ve: &str) -> String {
    format!("{PREFIX}ve-net/{ve}")
}

pub fn ve_nets() -> String {
    format!("{PREFIX}ve-net/")
}

/// The cluster's VE network: one subnet (the same gateway address on every node's bridge)
/// and the VXLAN id of the overlay that joins the nodes' bridges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub subnet: vessel_types::Ipv4Cidr,
    pub vni: u32,
}

/// Who holds an address or a uid slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub ve: String,
}

/// A VE's network identity: it keeps it on whichever node it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetIdentity {
    pub ip: vessel_types::Ipv4Cidr,
    pub slot: u32,
    /// The node that has the VE (where its MAC is reached over the overlay).
    pub node: String,
}

pub fn election() -> String {
    format!("{PREFIX}election")
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    value: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: Option<u32>,
}

pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        v: VALUE_VERSION,
        value: body,
    })
    .expect("plain data serializes")
}

pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    let err = |reason: String| ClusterError::Value {
        key: key.to_string(),
        reason,
    };
    let v: VersionOnly = serde_json::from_slice(bytes).map_err(|e| err(format!("not a Vessel value: {e}")))?;
    match v.v {
        Some(VALUE_VERSION) => {}
        Some(other) => {
            return Err(err(format!(
                "format version {other} (this build reads {VALUE_VERSION}): upgrade this node"
            )))
        }
        None => return Err(err("no format version".into())),
    }
    let e: Envelope<T> = serde_json::from_slice(bytes).map_err(|e| err(format!("damaged: {e}")))?;
    Ok(e.value)
}

/// A VE's desired state: its spec, what the operator wants of it, and a generation that
/// every change bumps (the node that runs it applies each generation once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VeEntry {
    pub spec: vessel_types::VeSpec,
    pub generation: u64,
    /// It should be running (applied when the generation changes: between changes the
    /// VE's own restart policy decides, so a VE that powered itself off stays off).
    pub run: bool,
    /// Destroy it: its node removes it and then its keys.
    #[serde(default)]
    pub deleted: bool,
    /// Placement rules: only this node (`--node`) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// ... only nodes with these labels (`--label k=v`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl VeEntry {
    /// A new VE's first generation, with no placement rules.
    pub fn new(spec: vessel_types::VeSpec, run: bool) -> VeEntry {
        VeEntry {
            spec,
            generation: 1,
            run,
            deleted: false,
            node: None,
            labels: Default::default(),
        }
    }
}

/// Where the leader put a VE, or why it could not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// None: pending.
    pub node: Option<String>,
    /// Why it is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// Its node is draining: the leader asks that node to move it here (`ve move`'s path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_to: Option<String>,
}

/// What the VE's node observed, after applying `generation` (or failing to).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VeObserved {
    pub node: String,
    pub generation: u64,
    pub info: vessel_types::api::VeInfo,
    /// Applying `generation` failed with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a node tells the cluster about itself (its record under its lease, and its
/// permanent member record).
pub use vessel_types::api::NodeRecord;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_version_and_other_versions_are_refused() {
        let r = NodeRecord {
            name: "n1".into(),
            address: "10.0.0.1:7070".into(),
            cpus: 4,
            memory: 8 << 30,
            disk: 100 << 30,
            labels: [("zone".to_string(), "a".to_string())].into(),
            version: "0.3.0".into(),
            draining: false,
            since_ns: 1,
        };
        let b = encode(&r);
        assert!(b.starts_with(b"{\"v\":1,"), "{}", String::from_utf8_lossy(&b));
        assert_eq!(decode::<NodeRecord>("k", &b).unwrap(), r);
        let newer = String::from_utf8(b).unwrap().replacen("\"v\":1", "\"v\":2", 1);
        let e = decode::<NodeRecord>("/vessel/v1/nodes/n1", newer.as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/vessel/v1/nodes/n1 in etcd: format version 2 (this build reads 1): upgrade this node"
        );
        assert!(decode::<NodeRecord>("k", b"{\"name\":\"x\"}").is_err());
        assert!(decode::<NodeRecord>("k", b"\xff").is_err());
    }
}

/// The certificate the cluster CA issued to a node (so that removing the node can revoke it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub node: String,
    /// Hex SHA-256 of the certificate's DER.
    pub sha256: String,
    /// Its serial number, hex (what a CRL names).
    #[serde(default)]
    pub serial: String,
    pub issued_unix: u64,
}

/// A certificate no node accepts any more: its node was removed from the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub node: String,
    pub sha256: String,
    #[serde(default)]
    pub serial: String,
    pub removed_unix: u64,
}
