//! Pure allocation of per-VE resources: host uid/gid ranges and IP addresses, from the
//! set in use (a node's own VEs, or the cluster's claims in etcd: [`choose`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use vessel_types::Ipv4Cidr;

/// Host uid of VE slot 0's root. Above the ids Debian gives users and subuid ranges.
pub const UID_FIRST: u32 = 1 << 20;
/// Ids per VE: a whole 16-bit uid space, so every uid a distribution uses maps.
pub const UID_COUNT: u32 = 65536;
/// Slots that fit below u32::MAX.
pub const MAX_SLOTS: u32 = (u32::MAX - UID_FIRST) / UID_COUNT;

pub fn uid_base(slot: u32) -> u32 {
    UID_FIRST + slot * UID_COUNT
}

/// Lowest slot no existing VE holds. Ranges never overlap because slots are distinct.
pub fn alloc_slot(used: &BTreeSet<u32>) -> Option<u32> {
    (0..MAX_SLOTS).find(|s| !used.contains(s))
}

/// The gateway of a node subnet: its first host address.
pub fn gateway(subnet: &Ipv4Cidr) -> Ipv4Addr {
    subnet.host(1).unwrap_or(subnet.addr)
}

/// Lowest free host address of `subnet`, skipping the gateway.
pub fn alloc_ip(subnet: &Ipv4Cidr, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Cidr> {
    let gw = gateway(subnet);
    (2..=subnet.host_count())
        .filter_map(|n| subnet.host(n))
        .find(|ip| *ip != gw && !used.contains(ip))
        .map(|ip| subnet.with_addr(ip))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    #[error("address {ip} is outside the node subnet {subnet}: pick one inside it or leave --ip out")]
    Outside { ip: Ipv4Cidr, subnet: Ipv4Cidr },
    #[error("address {0} is the subnet's network, broadcast or gateway address")]
    Reserved(Ipv4Cidr),
    #[error("address {0} is already used by VE '{1}'")]
    InUse(Ipv4Cidr, String),
}

/// Check a user-chosen address. The prefix is normalised to the subnet's.
pub fn check_ip(subnet: &Ipv4Cidr, ip: Ipv4Cidr, used: &[(Ipv4Addr, String)]) -> Result<Ipv4Cidr, IpError> {
    if !subnet.contains(ip.addr) || ip.prefix != subnet.prefix {
        return Err(IpError::Outside { ip, subnet: *subnet });
    }
    if ip.addr == subnet.network() || ip.addr == subnet.broadcast() || ip.addr == gateway(subnet) {
        return Err(IpError::Reserved(ip));
    }
    if let Some((_, who)) = used.iter().find(|(a, _)| *a == ip.addr) {
        return Err(IpError::InUse(ip, who.clone()));
    }
    Ok(ip)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Ip(#[from] IpError),
    #[error("uid range {slot} is already held by VE '{ve}' in the cluster")]
    SlotInUse { slot: u32, ve: String },
    #[error("no free address left in the cluster's VE network {0}")]
    NoAddress(Ipv4Cidr),
    #[error("no free uid range left in the cluster")]
    NoSlot,
}

/// A VE's address and uid slot, given what the cluster's claims hold (`ips`: address to VE,
/// `slots`: slot to VE). `want_ip`: an address asked for (`--ip`) or already used by the VE
/// (a VE registered after an upgrade); `want_slot`: the slot the VE already has on its
/// node. Otherwise the lowest free of each. Claims held by `ve` itself count as free.
pub fn choose(
    subnet: &Ipv4Cidr,
    ve: &str,
    want_ip: Option<Ipv4Cidr>,
    want_slot: Option<u32>,
    ips: &BTreeMap<Ipv4Addr, String>,
    slots: &BTreeMap<u32, String>,
) -> Result<(Ipv4Cidr, u32), ClaimError> {
    let ip = match want_ip {
        Some(ip) => {
            let others: Vec<(Ipv4Addr, String)> = ips
                .iter()
                .filter(|(_, who)| who.as_str() != ve)
                .map(|(a, who)| (*a, who.clone()))
                .collect();
            check_ip(subnet, ip, &others)?
        }
        None => {
            let used: BTreeSet<Ipv4Addr> = ips.keys().copied().collect();
            alloc_ip(subnet, &used).ok_or(ClaimError::NoAddress(*subnet))?
        }
    };
    let slot = match want_slot {
        Some(s) => match slots.get(&s) {
            Some(who) if who != ve => {
                return Err(ClaimError::SlotInUse {
                    slot: s,
                    ve: who.clone(),
                })
            }
            _ => s,
        },
        None => {
            let used: BTreeSet<u32> = slots.keys().copied().collect();
            alloc_slot(&used).ok_or(ClaimError::NoSlot)?
        }
    };
    Ok((ip, slot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slots_are_lowest_free() {
        let used: BTreeSet<u32> = [0, 1, 3].into();
        assert_eq!(alloc_slot(&used), Some(2));
        assert_eq!(uid_base(0), 1 << 20);
        assert_eq!(uid_base(2) - uid_base(1), UID_COUNT);
        assert!(uid_base(MAX_SLOTS - 1).checked_add(UID_COUNT - 1).is_some());
    }

    #[test]
    fn ips_skip_gateway_and_used() {
        let s = Ipv4Cidr::parse("10.5.0.0/29").unwrap();
        assert_eq!(gateway(&s), Ipv4Addr::new(10, 5, 0, 1));
        let mut used = BTreeSet::new();
        let mut got = vec![];
        while let Some(ip) = alloc_ip(&s, &used) {
            used.insert(ip.addr);
            got.push(ip.addr.octets()[3]);
        }
        assert_eq!(got, vec![2, 3, 4, 5, 6]);
    }

    #[test]
    fn user_ip_checks() {
        let s = Ipv4Cidr::parse("10.5.0.0/24").unwrap();
        let used = vec![(Ipv4Addr::new(10, 5, 0, 7), "a".to_string())];
        assert!(check_ip(&s, Ipv4Cidr::parse("10.5.0.9/24").unwrap(), &used).is_ok());
        assert!(matches!(
            check_ip(&s, Ipv4Cidr::parse("10.5.0.7/24").unwrap(), &used),
            Err(IpError::InUse(..))
        ));
        assert!(matches!(
            check_ip(&s, Ipv4Cidr::parse("10.5.0.1/24").unwrap(), &used),
            Err(IpError::Reserved(_))
        ));
        assert!(matches!(
            check_ip(&s, Ipv4Cidr::parse("10.6.0.9/24").unwrap(), &used),
            Err(IpError::Outside { .. })
        ));
        assert!(matches!(
            check_ip(&s, Ipv4Cidr::parse("10.5.0.9/16").unwrap(), &used),
            Err(IpError::Outside { .. })
        ));
    }

    #[test]
    fn cluster_choice_takes_the_lowest_free_or_what_is_asked() {
        let s = Ipv4Cidr::parse("10.5.0.0/24").unwrap();
        let ips: BTreeMap<Ipv4Addr, String> = [
            (Ipv4Addr::new(10, 5, 0, 2), "a".to_string()),
            (Ipv4Addr::new(10, 5, 0, 3), "b".to_string()),
        ]
        .into();
        let slots: BTreeMap<u32, String> = [(0, "a".to_string()), (2, "b".to_string())].into();
        assert_eq!(
            choose(&s, "c", None, None, &ips, &slots).unwrap(),
            (Ipv4Cidr::parse("10.5.0.4/24").unwrap(), 1)
        );
        // An address held by another VE is refused, one held by the VE itself is its own.
        let b_ip = Ipv4Cidr::parse("10.5.0.3/24").unwrap();
        assert!(matches!(
            choose(&s, "c", Some(b_ip), None, &ips, &slots),
            Err(ClaimError::Ip(IpError::InUse(_, ref who))) if who == "b"
        ));
        assert_eq!(choose(&s, "b", Some(b_ip), Some(2), &ips, &slots).unwrap(), (b_ip, 2));
        assert_eq!(
            choose(&s, "c", None, Some(2), &ips, &slots),
            Err(ClaimError::SlotInUse {
                slot: 2,
                ve: "b".into()
            })
        );
        assert!(matches!(
            choose(
                &s,
                "c",
                Some(Ipv4Cidr::parse("10.6.0.3/24").unwrap()),
                None,
                &ips,
                &slots
            ),
            Err(ClaimError::Ip(IpError::Outside { .. }))
        ));
        let tiny = Ipv4Cidr::parse("10.5.0.0/30").unwrap();
        let full: BTreeMap<Ipv4Addr, String> = [(Ipv4Addr::new(10, 5, 0, 2), "a".to_string())].into();
        assert_eq!(
            choose(&tiny, "c", None, None, &full, &slots),
            Err(ClaimError::NoAddress(tiny))
        );
    }

    proptest! {
        #[test]
        fn uid_ranges_never_overlap(slots in proptest::collection::btree_set(0u32..5000, 0..50)) {
            let mut used = slots.clone();
            let s = alloc_slot(&used).unwrap();
            prop_assert!(!slots.contains(&s));
            used.insert(s);
            let ranges: Vec<(u32, u32)> = used.iter().map(|s| (uid_base(*s), uid_base(*s) + UID_COUNT - 1)).collect();
            for w in ranges.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }
    }
}
