//! The lab's plan, pure: names (every one carries the lab's prefix), the address plan, the
//! etcd members and each node's `node.toml`. Nothing here touches the system.
//!
//! Address plan of a lab with net index X (a /16 picked free, see [`pick_net`]):
//! ```text
//! 10.X.0.0/24     the lab link: node i is 10.X.0.i on the hub bridge
//! 10.X.16.0/20    the cluster's one VE network: every node's VE bridge (inside its network
//!                 namespace) holds the gateway 10.X.16.1, and the bridges are joined by the
//!                 VXLAN overlay over the lab link (a VE keeps its address on every node)
//! ```

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Most nodes a lab has.
pub const MAX_NODES: usize = 64;
/// etcd members are odd and few.
pub const MAX_ETCD_MEMBERS: usize = 7;
/// The second octets a lab net may take: 10.160.0.0/16 ..= 10.199.0.0/16.
pub const NET_RANGE: std::ops::RangeInclusive<u8> = 160..=199;
/// etcd's ports on a node's lab address.
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("lab name '{0}' must be 1-24 lowercase letters, digits or '-' (not first or last)")]
    BadName(String),
    #[error("a lab has 1 to {MAX_NODES} nodes, not {0}")]
    BadNodes(usize),
    #[error("--etcd-members {members}: must be 1 to {max} and at most the number of nodes ({nodes}); odd numbers keep a majority")]
    BadMembers { members: usize, nodes: usize, max: usize },
    #[error("no free lab net: every 10.{}..10.{}.0.0/16 is routed on this host or used by another lab (`vessel lab status` per lab; `vessel lab down` removes one)", NET_RANGE.start(), NET_RANGE.end())]
    NoFreeNet,
    #[error("prefix '{0}' must be 'vl' and 5 lowercase hex digits")]
    BadPrefix(String),
}

/// Check a lab name: short enough for paths and cgroup names, safe in file names.
pub fn check_name(name: &str) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(PlanError::BadName(name.to_string()))
    }
}

/// The default number of etcd members: 3 when there are 3 nodes or more, else 1.
pub fn default_members(nodes: usize) -> usize {
    if nodes >= 3 {
        3
    } else {
        1
    }
}

/// A node of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// node1..nodeN: its name in the cluster too.
    pub name: String,
    /// 1-based.
    pub index: u8,
    /// Its address on the lab link (10.X.0.i).
    pub address: Ipv4Addr,
    /// The VE network (10.X.16.0/20, the same on every node: the cluster's) and its VE
    /// bridge (inside its network namespace).
    pub ve_subnet: String,
    pub ve_bridge: String,
    /// The hub end of its veth (in the hub namespace); its own end is `eth0`.
    pub hub_veth: String,
    /// Whether an etcd member runs in it (member i in node i).
    pub etcd_member: bool,
}

/// Everything `lab up` makes, decided before anything is made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// `vl` + 5 hex digits: in every interface, table and cgroup name of the lab.
    pub prefix: String,
    /// X of 10.X.0.0/16.
    pub net: u8,
    /// The hub bridge (in the hub namespace).
    pub hub_bridge: String,
    pub nodes: Vec<NodePlan>,
}

impl Plan {
    pub fn new(name: &str, prefix: &str, net: u8, nodes: usize, members: usize) -> Result<Plan, PlanError> {
        check_name(name)?;
        let p = prefix.as_bytes();
        if p.len() != 7
            || !prefix.starts_with("vl")
            || !p[2..].iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(PlanError::BadPrefix(prefix.to_string()));
        }
        if nodes == 0 || nodes > MAX_NODES {
            return Err(PlanError::BadNodes(nodes));
        }
        if members == 0 || members > MAX_ETCD_MEMBERS || members > nodes {
            return Err(PlanError::BadMembers {
                members,
                nodes,
                max: MAX_ETCD_MEMBERS,
            });
        }
        let nodes = (1..=nodes as u8)
            .map(|i| NodePlan {
                name: format!("node{i}"),
                index: i,
                address: Ipv4Addr::new(10, net, 0, i),
                ve_subnet: format!("10.{net}.16.0/20"),
                ve_bridge: format!("{prefix}v{i}"),
                hub_veth: format!("{prefix}n{i}"),
                etcd_member: (i as usize) <= members,
            })
            .collect();
        Ok(Plan {
            name: name.to_string(),
            prefix: prefix.to_string(),
            net,
            hub_bridge: format!("{prefix}h"),
            nodes,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The lab link's prefix length and net: 10.X.0.0/24.
    pub fn link_net(&self) -> String {
        format!("10.{}.0.0/24", self.net)
    }

    /// The lab's cgroup directory name, in the unified hierarchy and (as the VEs' cgroup
    /// parent) in each v1 hierarchy.
    pub fn cgroup_name(&self) -> String {
        format!("vessel-lab-{}", self.prefix)
    }

    /// A node's cgroup parent for its daemon (`VESSEL_CGROUP_PARENT`), relative.
    pub fn cgroup_parent(&self, node: &NodePlan) -> String {
        format!("{}/{}", self.cgroup_name(), node.name)
    }

    /// The partition table's name (family inet, in a node's network namespace).
    pub fn nft_table(&self) -> String {
        format!("{}_part", self.prefix)
    }

    pub fn members(&self) -> impl Iterator<Item = &NodePlan> {
        self.nodes.iter().filter(|n| n.etcd_member)
    }

    /// Every member's client URL: what each node's `[cluster] etcd` lists.
    pub fn etcd_client_urls(&self) -> Vec<String> {
        self.members()
            .map(|n| format!("http://{}:{ETCD_CLIENT_PORT}", n.address))
            .collect()
    }

    /// etcd's `--initial-cluster`.
    pub fn etcd_initial_cluster(&self) -> String {
        self.members()
            .map(|n| format!("{}=http://{}:{ETCD_PEER_PORT}", n.name, n.address))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The arguments of node `n`'s etcd member (data dir given by the caller).
    pub fn etcd_args(&self, n: &NodePlan, data_dir: &str) -> Vec<String> {
        let a = n.address;
        vec![
            format!("--name={}", n.name),
            format!("--data-dir={data_dir}"),
            format!("--listen-client-urls=http://{a}:{ETCD_CLIENT_PORT},http://127.0.0.1:{ETCD_CLIENT_PORT}"),
            format!("--advertise-client-urls=http://{a}:{ETCD_CLIENT_PORT}"),
            format!("--listen-peer-urls=http://{a}:{ETCD_PEER_PORT}"),
            format!("--initial-advertise-peer-urls=http://{a}:{ETCD_PEER_PORT}"),
            format!("--initial-cluster={}", self.etcd_initial_cluster()),
            format!("--initial-cluster-token={}", self.prefix),
            "--initial-cluster-state=new".to_string(),
            // A lab is small and local: quick elections, small snapshots.
            "--heartbeat-interval=100".to_string(),
            "--election-timeout=1000".to_string(),
            "--snapshot-count=10000".to_string(),
            "--log-level=warn".to_string(),
        ]
    }

    /// Node `n`'s `node.toml`.
    pub fn node_toml(&self, n: &NodePlan) -> String {
        let urls: Vec<String> = self.etcd_client_urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "# written by `vessel lab up` for lab {lab} ({prefix})\nversion = 1\n\n[cluster]\nname = \"{name}\"\naddress = \"{addr}\"\netcd = [{urls}]\n",
            lab = self.name,
            prefix = self.prefix,
            name = n.name,
            addr = n.address,
            urls = urls.join(", "),
        )
    }
}

/// An IPv4 route of the host: destination and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dest: Ipv4Addr,
    pub prefix: u8,
}

/// Parse `/proc/net/route` (destination and mask in host-order hex).
pub fn parse_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            Some(Route {
                // The kernel prints the network-order bytes as a native u32.
                dest: Ipv4Addr::from(dest.to_ne_bytes()),
                prefix: mask.count_ones() as u8,
            })
        })
        .collect()
}

fn overlaps(a: Ipv4Addr, ap: u8, b: Ipv4Addr, bp: u8) -> bool {
    let p = ap.min(bp);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    u32::from(a) & mask == u32::from(b) & mask
}

/// The first lab net 10.X.0.0/16 (X in [`NET_RANGE`]) that no host route overlaps (a
/// default route does not count: everything overlaps it) and no other lab uses.
pub fn pick_net(routes: &[Route], used: &[u8]) -> Result<u8, PlanError> {
    NET_RANGE
        .into_iter()
        .find(|x| {
            !used.contains(x)
                && !routes
                    .iter()
                    .filter(|r| r.prefix > 0)
                    .any(|r| overlaps(r.dest, r.prefix, Ipv4Addr::new(10, *x, 0, 0), 16))
        })
        .ok_or(PlanError::NoFreeNet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_names_carry_the_prefix_and_fit_interface_names() {
        let p = Plan::new("lab", "vl0a1b2", 170, 64, 3).unwrap();
        assert_eq!(p.hub_bridge, "vl0a1b2h");
        let last = p.nodes.last().unwrap();
        assert_eq!(last.name, "node64");
        assert_eq!(last.hub_veth, "vl0a1b2n64");
        for n in &p.nodes {
            assert!(n.hub_veth.len() <= 15 && n.ve_bridge.len() <= 15, "{n:?}");
            assert!(n.hub_veth.starts_with("vl0a1b2") && n.ve_bridge.starts_with("vl0a1b2"));
        }
        assert_eq!(p.cgroup_name(), "vessel-lab-vl0a1b2");
        assert_eq!(p.cgroup_parent(&p.nodes[1]), "vessel-lab-vl0a1b2/node2");
        assert_eq!(p.nft_table(), "vl0a1b2_part");
    }

    #[test]
    fn address_plan_and_members() {
        let p = Plan::new("t1", "vl00000", 161, 4, 3).unwrap();
        let n2 = p.node("node2").unwrap();
        assert_eq!(n2.address, Ipv4Addr::new(10, 161, 0, 2));
        assert_eq!(n2.ve_subnet, "10.161.16.0/20");
        assert!(
            p.nodes.iter().all(|n| n.ve_subnet == n2.ve_subnet),
            "one VE network per lab"
        );
        assert_eq!(p.link_net(), "10.161.0.0/24");
        let members: Vec<&str> = p.members().map(|n| n.name.as_str()).collect();
        assert_eq!(members, ["node1", "node2", "node3"]);
        assert_eq!(
            p.etcd_client_urls(),
            [
                "http://10.161.0.1:2379",
                "http://10.161.0.2:2379",
                "http://10.161.0.3:2379"
            ]
        );
        assert_eq!(
            p.etcd_initial_cluster(),
            "node1=http://10.161.0.1:2380,node2=http://10.161.0.2:2380,node3=http://10.161.0.3:2380"
        );
        let args = p.etcd_args(n2, "/d/etcd");
        assert!(args.contains(&"--name=node2".to_string()));
        assert!(args.contains(&"--listen-peer-urls=http://10.161.0.2:2380".to_string()));
        assert!(args.contains(&"--initial-cluster-token=vl00000".to_string()));
        let toml = p.node_toml(n2);
        let s = vessel_types::config::parse(&toml).expect("the generated node.toml parses");
        assert_eq!(s.cluster.name.as_deref(), Some("node2"));
        assert_eq!(s.cluster.address, Some("10.161.0.2".parse().unwrap()));
        assert_eq!(s.cluster.etcd, p.etcd_client_urls());
    }

    #[test]
    fn bad_plans_are_refused() {
        assert_eq!(
            Plan::new("Lab", "vl00000", 160, 3, 3),
            Err(PlanError::BadName("Lab".into()))
        );
        assert!(check_name("a-b-1").is_ok());
        assert!(check_name("-a").is_err() && check_name("").is_err() && check_name("a/b").is_err());
        assert!(check_name(&"a".repeat(25)).is_err());
        assert_eq!(Plan::new("l", "vl00000", 160, 0, 1), Err(PlanError::BadNodes(0)));
        assert_eq!(Plan::new("l", "vl00000", 160, 65, 1), Err(PlanError::BadNodes(65)));
        assert!(matches!(
            Plan::new("l", "vl00000", 160, 2, 3),
            Err(PlanError::BadMembers { .. })
        ));
        assert!(matches!(
            Plan::new("l", "vl00000", 160, 2, 0),
            Err(PlanError::BadMembers { .. })
        ));
        assert!(matches!(
            Plan::new("l", "xx00000", 160, 2, 1),
            Err(PlanError::BadPrefix(_))
        ));
        assert!(matches!(
            Plan::new("l", "vl0000G", 160, 2, 1),
            Err(PlanError::BadPrefix(_))
        ));
        assert_eq!(
            (
                default_members(1),
                default_members(2),
                default_members(3),
                default_members(9)
            ),
            (1, 1, 3, 3)
        );
    }

    #[test]
    fn routes_parse_and_the_picked_net_avoids_them_and_other_labs() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                    br0\t0000A00A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                    br1\t00A1A10A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let r = parse_routes(text);
        assert_eq!(
            r,
            [
                Route {
                    dest: Ipv4Addr::new(0, 0, 0, 0),
                    prefix: 0
                },
                Route {
                    dest: Ipv4Addr::new(10, 160, 0, 0),
                    prefix: 16
                },
                Route {
                    dest: Ipv4Addr::new(10, 161, 161, 0),
                    prefix: 24
                },
            ]
        );
        // 160 is routed, 161 overlaps a /24, 162 is another lab's.
        assert_eq!(pick_net(&r, &[162]), Ok(163));
        assert_eq!(pick_net(&[], &[]), Ok(160));
        let all: Vec<u8> = NET_RANGE.collect();
        assert_eq!(pick_net(&[], &all), Err(PlanError::NoFreeNet));
        // A route covering all of 10/8 leaves nothing.
        let wide = [Route {
            dest: Ipv4Addr::new(10, 0, 0, 0),
            prefix: 8,
        }];
        assert_eq!(pick_net(&wide, &[]), Err(PlanError::NoFreeNet));
    }
}
