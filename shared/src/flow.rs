//! The header that opens every tunneled flow.
//!
//! The edge never learns where a flow goes at home, so it tells the
//! home-agent what it knows instead: which public port the client reached,
//! over which protocol, and from which address. The home-agent maps the port
//! to a target and can hand the client address on (PROXY protocol).
//!
//! TCP: one [`FlowHeader`] at the start of the stream the edge opens to
//! `home:`[`TCP_FLOW_PORT`] through the tunnel, then the client's bytes.
//!
//! UDP: every datagram between the edge (from its WireGuard port on its
//! tunnel address, a port reserved anyway) and `home:`[`UDP_FLOW_PORT`]
//! starts with a [`DatagramHeader`] (the same fields plus the edge's flow
//! id), then the payload. Both directions carry it; the
//! edge routes replies by flow id alone and ignores the address fields, so
//! a home-agent cannot make the edge send to an address of its choosing.
//!
//! ```text
//! FlowHeader:     version(1) protocol(1) public_port(2) family(1) client_ip(4|16) client_port(2)
//! DatagramHeader: version(1) flow_id(4)  public_port(2) family(1) client_ip(4|16) client_port(2)
//! ```
//!
//! All integers big-endian. Version 1 is the only one defined.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use thiserror::Error;

use crate::portmap::Protocol;

/// Port on the home tunnel address where the edge opens TCP flows.
pub const TCP_FLOW_PORT: u16 = 7001;
/// Port on both tunnel addresses that carries UDP datagrams.
pub const UDP_FLOW_PORT: u16 = 7002;
pub const FLOW_VERSION: u8 = 1;
/// How long the home-agent waits for the header of a flow the edge has
/// opened. Long, because the edge opens flows ahead of the connections that
/// will use them (its flow pool); it replaces an unused one after
/// [`POOLED_FLOW_MAX_IDLE`], well within this.
pub const FLOW_HEADER_WAIT: Duration = Duration::from_secs(300);
/// How long the edge keeps an unused pooled flow before replacing it.
pub const POOLED_FLOW_MAX_IDLE: Duration = Duration::from_secs(120);
/// The largest encoded header (IPv6 client).
pub const MAX_FLOW_HEADER_LEN: usize = 1 + 1 + 2 + 1 + 16 + 2;
pub const MAX_DATAGRAM_HEADER_LEN: usize = 1 + 4 + 2 + 1 + 16 + 2;

const FAMILY_V4: u8 = 4;
const FAMILY_V6: u8 = 6;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Why bytes are not a flow header.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum FlowHeaderError {
    #[error("flow header version {0} is not supported")]
    Version(u8),
    #[error("unknown protocol number {0} in flow header")]
    Protocol(u8),
    #[error("unknown address family {0} in flow header")]
    Family(u8),
    #[error("public port 0 in flow header")]
    PortZero,
}

/// What the edge tells home about one TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowHeader {
    pub protocol: Protocol,
    pub public_port: u16,
    pub client: SocketAddr,
}

/// What travels before each UDP payload, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    pub flow_id: u32,
    pub public_port: u16,
    pub client: SocketAddr,
}

impl FlowHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FLOW_VERSION);
        out.push(match self.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        });
        out.extend_from_slice(&self.public_port.to_be_bytes());
        encode_addr(self.client, out);
    }

    /// Decodes a header from the start of `buf`: `Ok(None)` while more bytes
    /// are needed, else the header and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(FlowHeader, usize)>, FlowHeaderError> {
        let Some(&version) = buf.first() else {
            return Ok(None);
        };
        if version != FLOW_VERSION {
            return Err(FlowHeaderError::Version(version));
        }
        let Some(&proto) = buf.get(1) else {
            return Ok(None);
        };
        let protocol = match proto {
            PROTO_TCP => Protocol::Tcp,
            PROTO_UDP => Protocol::Udp,
            other => return Err(FlowHeaderError::Protocol(other)),
        };
        let Some(public_port) = read_u16(buf, 2) else {
            return Ok(None);
        };
        if public_port == 0 {
            return Err(FlowHeaderError::PortZero);
        }
        let Some((client, used)) = decode_addr(buf, 4)? else {
            return Ok(None);
        };
        Ok(Some((
            FlowHeader {
                protocol,
                public_port,
                client,
            },
            used,
        )))
    }
}

impl DatagramHeader {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(FLOW_VERSION);
        out.extend_from_slice(&self.flow_id.to_be_bytes());
        out.extend_from_slice(&self.public_port.to_be_bytes());
        encode_addr(self.client, out);
    }

    /// Decodes the header of one datagram, returning it and the payload.
    /// A datagram is whole or nothing, so a short one is an error here.
    pub fn decode(buf: &[u8]) -> Result<(DatagramHeader, &[u8]), DatagramError> {
        let version = *buf.first().ok_or(DatagramError::Short)?;
        if version != FLOW_VERSION {
            return Err(FlowHeaderError::Version(version).into());
        }
        let id = buf.get(1..5).ok_or(DatagramError::Short)?;
        let flow_id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let public_port = read_u16(buf, 5).ok_or(DatagramError::Short)?;
        if public_port == 0 {
            return Err(FlowHeaderError::PortZero.into());
        }
        let (client, used) = decode_addr(buf, 7)?.ok_or(DatagramError::Short)?;
        Ok((
            DatagramHeader {
                flow_id,
                public_port,
                client,
            },
            &buf[used..],
        ))
    }
}

/// Why a tunneled datagram was dropped.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum DatagramError {
    #[error("datagram shorter than its header")]
    Short,
    #[error(transparent)]
    Header(#[from] FlowHeaderError),
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn encode_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    // A v4-mapped v6 address is a v4 client seen through a dual-stack socket.
    match addr.ip().to_canonical() {
        IpAddr::V4(v4) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn decode_addr(buf: &[u8], at: usize) -> Result<Option<(SocketAddr, usize)>, FlowHeaderError> {
    let Some(&family) = buf.get(at) else {
        return Ok(None);
    };
    let ip_len = match family {
        FAMILY_V4 => 4,
        FAMILY_V6 => 16,
        other => return Err(FlowHeaderError::Family(other)),
    };
    let ip_at = at + 1;
    let Some(ip) = buf.get(ip_at..ip_at + ip_len) else {
        return Ok(None);
    };
    let ip = if ip_len == 4 {
        IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(ip);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    let Some(port) = read_u16(buf, ip_at + ip_len) else {
        return Ok(None);
    };
    Ok(Some((SocketAddr::new(ip, port), ip_at + ip_len + 2)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(o, p)| SocketAddr::new(IpAddr::from(o), p)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(o, p)| SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)).to_canonical(),
                p
            )),
        ]
    }

    #[test]
    fn v4_mapped_client_is_sent_as_v4() {
        let h = FlowHeader {
            protocol: Protocol::Tcp,
            public_port: 443,
            client: "[::ffff:198.18.1.2]:5000".parse().unwrap(),
        };
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out.len(), 1 + 1 + 2 + 1 + 4 + 2);
        let (d, used) = FlowHeader::decode(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(d.client, "198.18.1.2:5000".parse().unwrap());
    }

    #[test]
    fn incomplete_is_not_invalid() {
        let h = FlowHeader {
            protocol: Protocol::Udp,
            public_port: 53,
            client: "[2001:db8::1]:9".parse().unwrap(),
        };
        let mut out = Vec::new();
        h.encode(&mut out);
        assert_eq!(out.len(), MAX_FLOW_HEADER_LEN);
        for n in 0..out.len() {
            assert_eq!(
                FlowHeader::decode(&out[..n]),
                Ok(None),
                "prefix of {n} bytes"
            );
        }
        assert_eq!(FlowHeader::decode(&[2]), Err(FlowHeaderError::Version(2)));
        assert_eq!(
            FlowHeader::decode(&[1, 99]),
            Err(FlowHeaderError::Protocol(99))
        );
        assert_eq!(
            FlowHeader::decode(&[1, 6, 0, 0]),
            Err(FlowHeaderError::PortZero)
        );
        assert_eq!(
            FlowHeader::decode(&[1, 6, 0, 1, 5]),
            Err(FlowHeaderError::Family(5))
        );
    }

    proptest! {
        #[test]
        fn flow_header_round_trips(tcp in any::<bool>(), port in 1u16.., client in any_addr(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let h = FlowHeader { protocol: if tcp { Protocol::Tcp } else { Protocol::Udp }, public_port: port, client };
            let mut out = Vec::new();
            h.encode(&mut out);
            let n = out.len();
            out.extend_from_slice(&tail);
            prop_assert_eq!(FlowHeader::decode(&out).unwrap(), Some((h, n)));
        }

        #[test]
        fn datagram_header_round_trips(id in any::<u32>(), port in 1u16.., client in any_addr(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let h = DatagramHeader { flow_id: id, public_port: port, client };
            let mut out = Vec::new();
            h.encode(&mut out);
            out.extend_from_slice(&payload);
            let (d, p) = DatagramHeader::decode(&out).unwrap();
            prop_assert_eq!(d, h);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FlowHeader::decode(&bytes);
            let _ = DatagramHeader::decode(&bytes);
        }
    }
}
