//! Which decrypted packets a tunnel end hands its kernel.
//!
//! WireGuard proves who sent a packet, not what it may reach. Without a
//! filter, a compromised edge could open connections to any service on the
//! home host that listens on all addresses (sshd, a database), or, on a
//! host that forwards (Docker, Kubernetes), to the whole home network:
//! the kernel takes what the TUN gives it. Home only ever serves flows on
//! its two flow ports, so that is all it admits.

use std::net::Ipv4Addr;

use crate::flow::{TCP_FLOW_PORT, UDP_FLOW_PORT};

const ICMP: u8 = 1;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// What one end admits from its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// The edge: anything addressed to itself (home only answers the flows
    /// the edge opened).
    ToSelf,
    /// Home: TCP to the flow port, UDP to the datagram port, and ICMP
    /// (errors about the flows), addressed to itself.
    FlowPorts,
}

impl Inbound {
    /// Whether the IPv4 `packet` (its source already checked to be the
    /// peer's) may go to this end's kernel, whose tunnel address is `own`.
    /// Fragments are refused: the tunnel's MTU is the same at both ends, so
    /// none are needed, and a later fragment has no ports to check.
    pub fn admits(self, own: Ipv4Addr, packet: &[u8]) -> bool {
        let Some(header) = packet.get(..20) else {
            return false;
        };
        let header_len = usize::from(header[0] & 0x0f) * 4;
        let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0;
        let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
        if dst != own || fragment || header_len < 20 {
            return false;
        }
        match self {
            Inbound::ToSelf => true,
            Inbound::FlowPorts => {
                let port = packet
                    .get(header_len + 2..header_len + 4)
                    .map(|p| u16::from_be_bytes([p[0], p[1]]));
                match header[9] {
                    ICMP => true,
                    TCP => port == Some(TCP_FLOW_PORT),
                    UDP => port == Some(UDP_FLOW_PORT),
                    _ => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const EDGE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    fn packet(proto: u8, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&EDGE.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn home_admits_the_flow_ports_alone() {
        let home = Inbound::FlowPorts;
        assert!(home.admits(HOME, &packet(TCP, HOME, TCP_FLOW_PORT)));
        assert!(home.admits(HOME, &packet(UDP, HOME, UDP_FLOW_PORT)));
        assert!(home.admits(HOME, &packet(ICMP, HOME, 0)));
        // sshd, or the datagram port over TCP, or any other protocol.
        assert!(!home.admits(HOME, &packet(TCP, HOME, 22)));
        assert!(!home.admits(HOME, &packet(TCP, HOME, UDP_FLOW_PORT)));
        assert!(!home.admits(HOME, &packet(UDP, HOME, 53)));
        assert!(!home.admits(HOME, &packet(47, HOME, 0)));
    }

    #[test]
    fn neither_end_routes_for_the_other() {
        let lan = Ipv4Addr::new(192, 168, 1, 10);
        assert!(!Inbound::FlowPorts.admits(HOME, &packet(TCP, lan, TCP_FLOW_PORT)));
        assert!(!Inbound::ToSelf.admits(EDGE, &packet(TCP, lan, 80)));
        assert!(Inbound::ToSelf.admits(EDGE, &packet(TCP, EDGE, 40000)));
    }

    #[test]
    fn fragments_and_short_or_odd_headers_are_refused() {
        let mut first = packet(TCP, HOME, TCP_FLOW_PORT);
        first[6] = 0x20; // more fragments
        assert!(!Inbound::FlowPorts.admits(HOME, &first));
        let mut later = packet(TCP, HOME, TCP_FLOW_PORT);
        later[7] = 0x10; // an offset
        assert!(!Inbound::FlowPorts.admits(HOME, &later));
        let mut df = packet(TCP, HOME, TCP_FLOW_PORT);
        df[6] = 0x40; // don't fragment: not a fragment
        assert!(Inbound::FlowPorts.admits(HOME, &df));
        assert!(!Inbound::FlowPorts.admits(HOME, &packet(TCP, HOME, TCP_FLOW_PORT)[..19]));
        // A header that claims options the packet does not have.
        let mut long = packet(TCP, HOME, TCP_FLOW_PORT);
        long[0] = 0x4f;
        assert!(!Inbound::FlowPorts.admits(HOME, &long));
        let mut short = packet(TCP, HOME, TCP_FLOW_PORT);
        short[0] = 0x44;
        assert!(!Inbound::FlowPorts.admits(HOME, &short));
    }
}
