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
        let mask = u32::MAX << (32 - u32::from(prefix_len));
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
}
