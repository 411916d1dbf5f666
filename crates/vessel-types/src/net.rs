//! IPv4 addresses with prefix length, as used for VE addresses and the node subnet.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad address '{0}': use IPv4 with a prefix length, e.g. 10.213.0.10/16")]
pub struct CidrError(pub String);

/// An IPv4 address with a prefix length, e.g. `10.213.0.10/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let err = || CidrError(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| err())?;
        let prefix: u8 = p.parse().map_err(|_| err())?;
        if prefix > 32 {
            return Err(err());
        }
        Ok(Ipv4Cidr { addr, prefix })
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// Number of usable host addresses (excluding network and broadcast).
    pub fn host_count(&self) -> u32 {
        if self.prefix >= 31 {
            0
        } else {
            (!self.mask()).saturating_sub(1)
        }
    }

    /// The `n`-th host address (1-based) of this network.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        (n >= 1 && n <= self.host_count()).then(|| Ipv4Addr::from(u32::from(self.network()) + n))
    }

    pub fn with_addr(&self, addr: Ipv4Addr) -> Ipv4Cidr {
        Ipv4Cidr {
            addr,
            prefix: self.prefix,
        }
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = CidrError;
    fn try_from(s: String) -> Result<Self, CidrError> {
        Ipv4Cidr::parse(&s)
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> String {
        c.to_string()
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        Ipv4Cidr::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_math() {
        let c = Ipv4Cidr::parse("10.213.4.7/16").unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(10, 213, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 213, 255, 255));
        assert!(c.contains(Ipv4Addr::new(10, 213, 9, 9)));
        assert!(!c.contains(Ipv4Addr::new(10, 214, 0, 1)));
        assert_eq!(c.host(1), Some(Ipv4Addr::new(10, 213, 0, 1)));
        assert_eq!(c.host_count(), 65534);
        assert_eq!(c.host(65535), None);
        assert_eq!(c.to_string(), "10.213.4.7/16");
    }

    #[test]
    fn rejects_bad() {
        for bad in ["10.0.0.1", "10.0.0.1/33", "300.0.0.1/8", "x/8", ""] {
            assert!(Ipv4Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
