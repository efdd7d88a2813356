//! The tunnel's private addresses.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Addresses of the two tunnel ends, inside one small private prefix.
///
/// Flows from the edge reach the home-agent at `home`; nothing else is
/// routed through the tunnel, so the prefix can be as small as a /30.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTunnelAddrs", into = "RawTunnelAddrs")]
pub struct TunnelAddrs {
    edge: Ipv4Addr,
    home: Ipv4Addr,
    prefix_len: u8,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnelAddrs {
    edge: Ipv4Addr,
    home: Ipv4Addr,
    prefix_len: u8,
}

/// Why a pair of tunnel addresses cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TunnelAddrsError {
    #[error("tunnel prefix length {0} is not between 8 and 30")]
    Prefix(u8),
    #[error("tunnel addresses {edge} and {home} are not in one /{prefix_len}")]
    NotInPrefix {
        edge: Ipv4Addr,
        home: Ipv4Addr,
        prefix_len: u8,
    },
    #[error("the edge and home tunnel addresses are both {0}")]
    Same(Ipv4Addr),
    #[error("tunnel address {addr} cannot be a host's address: {why}")]
    Unusable { addr: Ipv4Addr, why: &'static str },
}

impl TunnelAddrs {
    pub const DEFAULT: TunnelAddrs = TunnelAddrs {
        edge: Ipv4Addr::new(10, 77, 0, 1),
        home: Ipv4Addr::new(10, 77, 0, 2),
        prefix_len: 30,
    };

    pub fn new(edge: Ipv4Addr, home: Ipv4Addr, prefix_len: u8) -> Result<Self, TunnelAddrsError> {
        if !(8..=30).contains(&prefix_len) {
            return Err(TunnelAddrsError::Prefix(prefix_len));
        }
        if edge == home {
            return Err(TunnelAddrsError::Same(edge));
        }
        let mask = prefix_mask(prefix_len);
        for addr in [edge, home] {
            if let Some(why) = unusable(addr, mask) {
                return Err(TunnelAddrsError::Unusable { addr, why });
            }
        }
        if u32::from(edge) & mask != u32::from(home) & mask {
            return Err(TunnelAddrsError::NotInPrefix {
                edge,
                home,
                prefix_len,
            });
        }
        Ok(TunnelAddrs {
            edge,
            home,
            prefix_len,
        })
    }

    pub fn edge(&self) -> Ipv4Addr {
        self.edge
    }

    pub fn home(&self) -> Ipv4Addr {
        self.home
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }
}

/// The netmask of a `len`-bit prefix, as a number (0 for /0).
pub fn prefix_mask(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

/// Why `addr` cannot be one end of a point-to-point subnet with `mask`:
/// the kernel would drop it, route it elsewhere or take it for the
/// subnet's broadcast, and the tunnel would come up carrying nothing.
fn unusable(addr: Ipv4Addr, mask: u32) -> Option<&'static str> {
    let host = u32::from(addr) & !mask;
    if addr.is_loopback() {
        Some("it is a loopback address (127.0.0.0/8)")
    } else if addr.is_multicast() {
        Some("it is a multicast address (224.0.0.0/4)")
    } else if addr.octets()[0] == 0 {
        Some("0.0.0.0/8 is not routed")
    } else if addr.octets()[0] >= 240 {
        Some("240.0.0.0/4 is reserved")
    } else if host == 0 {
        Some("it is the subnet's network address (the host part is all zeros)")
    } else if host == !mask {
        Some("it is the subnet's broadcast address (the host part is all ones)")
    } else {
        None
    }
}

/// As the home sees it: `home ↔ edge/prefix`.
impl std::fmt::Display for TunnelAddrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ↔ {}/{}", self.home, self.edge, self.prefix_len)
    }
}

impl Default for TunnelAddrs {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<RawTunnelAddrs> for TunnelAddrs {
    type Error = TunnelAddrsError;

    fn try_from(raw: RawTunnelAddrs) -> Result<Self, Self::Error> {
        TunnelAddrs::new(raw.edge, raw.home, raw.prefix_len)
    }
}

impl From<TunnelAddrs> for RawTunnelAddrs {
    fn from(a: TunnelAddrs) -> Self {
        RawTunnelAddrs {
            edge: a.edge,
            home: a.home,
            prefix_len: a.prefix_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        let d = TunnelAddrs::DEFAULT;
        assert_eq!(TunnelAddrs::new(d.edge(), d.home(), d.prefix_len()), Ok(d));
    }

    #[test]
    fn refuses_addresses_outside_prefix() {
        let err = TunnelAddrs::new(Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 1, 2), 30);
        assert!(matches!(err, Err(TunnelAddrsError::NotInPrefix { .. })));
        assert_eq!(
            TunnelAddrs::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 1), 24),
            Err(TunnelAddrsError::Same(Ipv4Addr::new(10, 0, 0, 1)))
        );
        assert_eq!(
            TunnelAddrs::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 31),
            Err(TunnelAddrsError::Prefix(31))
        );
    }

    #[test]
    fn refuses_addresses_no_host_can_have() {
        let unusable = |edge: [u8; 4], home: [u8; 4], prefix| {
            matches!(
                TunnelAddrs::new(edge.into(), home.into(), prefix),
                Err(TunnelAddrsError::Unusable { .. })
            )
        };
        assert!(unusable([127, 0, 0, 1], [127, 0, 0, 2], 30), "loopback");
        assert!(unusable([224, 0, 0, 1], [224, 0, 0, 2], 30), "multicast");
        assert!(unusable([0, 0, 0, 1], [0, 0, 0, 2], 30), "0/8");
        assert!(unusable([240, 0, 0, 1], [240, 0, 0, 2], 30), "240/4");
        assert!(
            unusable([10, 77, 0, 0], [10, 77, 0, 1], 30),
            "network address"
        );
        assert!(
            unusable([10, 77, 0, 1], [10, 77, 0, 3], 30),
            "broadcast address"
        );
        assert!(
            unusable([10, 1, 0, 0], [10, 1, 0, 1], 16),
            "network address of a /16"
        );
        // Ordinary ends of small and large subnets are fine, the
        // benchmark's and the tests' among them.
        assert!(TunnelAddrs::new([10, 77, 0, 1].into(), [10, 77, 0, 2].into(), 30).is_ok());
        assert!(TunnelAddrs::new([198, 18, 3, 1].into(), [198, 18, 3, 2].into(), 30).is_ok());
        assert!(TunnelAddrs::new([10, 99, 7, 1].into(), [10, 99, 7, 6].into(), 29).is_ok());
        assert!(TunnelAddrs::new([10, 1, 0, 255].into(), [10, 1, 1, 0].into(), 16).is_ok());
    }
}
