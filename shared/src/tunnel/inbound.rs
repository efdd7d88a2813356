//! Which decrypted packets a tunnel end hands its kernel.
//!
//! WireGuard proves who sent a packet, not what it may reach. Without a
//! filter, a compromised edge could open connections to any service on the
//! home host that listens on all addresses (sshd, a database), or, on a
//! host that forwards (Docker, Kubernetes), to the whole home network:
//! the kernel takes what the TUN gives it. Home only ever serves flows on
//! its two flow ports, so that is all it admits, with the ICMP errors about
//! them.

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
    /// errors about those flows, addressed to itself.
    FlowPorts,
}

impl Inbound {
    /// Whether the IPv4 `packet` (its source already checked to be the
    /// peer's) may go to this end's kernel, whose tunnel address is `own`.
    ///
    /// A client's datagram near 1400 bytes does not fit the tunnel's MTU
    /// behind its header, so UDP arrives in fragments. The first one holds
    /// the ports and is checked; a later one cannot be delivered without
    /// it (the kernel drops datagrams whose fragments overlap), so it only
    /// needs to be TCP or UDP.
    pub fn admits(self, own: Ipv4Addr, peer: Ipv4Addr, packet: &[u8]) -> bool {
        let Some(ip) = Ipv4Header::parse(packet) else {
            return false;
        };
        if ip.dst != own {
            return false;
        }
        match self {
            Inbound::ToSelf => true,
            // The edge's kernel sends no IP options; source routing among
            // them could reach further on a host that accepts it.
            Inbound::FlowPorts if ip.len != 20 => false,
            Inbound::FlowPorts if ip.offset > 0 => matches!(ip.protocol, TCP | UDP),
            Inbound::FlowPorts => match ip.protocol {
                TCP => ip
                    .ports(packet)
                    .is_some_and(|(_, dst)| dst == TCP_FLOW_PORT),
                UDP => ip
                    .ports(packet)
                    .is_some_and(|(_, dst)| dst == UDP_FLOW_PORT),
                ICMP => !ip.more_fragments && about_our_flows(own, peer, &packet[ip.len..]),
                _ => false,
            },
        }
    }
}

/// Whether `packet` is IPv4 to `peer`: the only thing worth sending into
/// the tunnel.
pub fn addressed_to(peer: Ipv4Addr, packet: &[u8]) -> bool {
    Ipv4Header::parse(packet).is_some_and(|ip| ip.dst == peer)
}

/// An ICMP error (unreachable, time exceeded, parameter problem) about a
/// packet home sent from a flow port to the peer. Linux hands such an
/// error to the socket it quotes, whichever interface it came in on: any
/// other could end or slow a connection of home's elsewhere (a UDP socket
/// has no sequence number to guess).
fn about_our_flows(own: Ipv4Addr, peer: Ipv4Addr, icmp: &[u8]) -> bool {
    let Some(&kind) = icmp.first() else {
        return false;
    };
    if !matches!(kind, 3 | 11 | 12) {
        return false;
    }
    let Some(quoted) = icmp.get(8..) else {
        return false;
    };
    let Some(q) = Ipv4Header::parse(quoted) else {
        return false;
    };
    let from_a_flow_port = match q.protocol {
        TCP => q.ports(quoted).is_some_and(|(src, _)| src == TCP_FLOW_PORT),
        UDP => q.ports(quoted).is_some_and(|(src, _)| src == UDP_FLOW_PORT),
        _ => false,
    };
    q.src == own && q.dst == peer && from_a_flow_port
}

/// The fields of an IPv4 header the filter needs. An ICMP error quotes a
/// header and at least 8 bytes after it, so a quoted header parses too.
struct Ipv4Header {
    len: usize,
    protocol: u8,
    /// In 8-byte units; 0 in an unfragmented packet and a first fragment.
    offset: u16,
    more_fragments: bool,
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

impl Ipv4Header {
    fn parse(packet: &[u8]) -> Option<Self> {
        let h = packet.get(..20)?;
        let len = usize::from(h[0] & 0x0f) * 4;
        if h[0] >> 4 != 4 || len < 20 || packet.len() < len {
            return None;
        }
        Some(Ipv4Header {
            len,
            protocol: h[9],
            offset: u16::from_be_bytes([h[6], h[7]]) & 0x1fff,
            more_fragments: h[6] & 0x20 != 0,
            src: Ipv4Addr::new(h[12], h[13], h[14], h[15]),
            dst: Ipv4Addr::new(h[16], h[17], h[18], h[19]),
        })
    }

    /// Source and destination ports of the TCP or UDP header after it.
    fn ports(&self, packet: &[u8]) -> Option<(u16, u16)> {
        let p = packet.get(self.len..self.len + 4)?;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const EDGE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

    fn ip(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn packet(proto: u8, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        ip(proto, EDGE, dst, 40000, dport)
    }

    /// An ICMP error from the edge to home quoting `quoted`.
    fn icmp(kind: u8, quoted: &[u8]) -> Vec<u8> {
        let mut p = packet(ICMP, HOME, 0);
        p.truncate(20);
        p.extend_from_slice(&[kind, 3, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&quoted[..28]);
        p
    }

    #[test]
    fn home_admits_the_flow_ports_alone() {
        let home = Inbound::FlowPorts;
        assert!(home.admits(HOME, EDGE, &packet(TCP, HOME, TCP_FLOW_PORT)));
        assert!(home.admits(HOME, EDGE, &packet(UDP, HOME, UDP_FLOW_PORT)));
        // sshd, or the datagram port over TCP, or any other protocol.
        assert!(!home.admits(HOME, EDGE, &packet(TCP, HOME, 22)));
        assert!(!home.admits(HOME, EDGE, &packet(TCP, HOME, UDP_FLOW_PORT)));
        assert!(!home.admits(HOME, EDGE, &packet(UDP, HOME, 53)));
        assert!(!home.admits(HOME, EDGE, &packet(47, HOME, 0)));
    }

    #[test]
    fn home_admits_icmp_errors_about_its_flows_alone() {
        let home = Inbound::FlowPorts;
        // What home sent: a UDP datagram from its datagram port, a TCP
        // segment from its flow port, to the edge.
        let udp_sent = ip(UDP, HOME, EDGE, UDP_FLOW_PORT, 51820);
        let tcp_sent = ip(TCP, HOME, EDGE, TCP_FLOW_PORT, 40000);
        assert!(home.admits(HOME, EDGE, &icmp(3, &udp_sent)));
        assert!(home.admits(HOME, EDGE, &icmp(3, &tcp_sent)));
        assert!(home.admits(HOME, EDGE, &icmp(11, &tcp_sent)));
        // About a socket of home's that is not a flow's (its DNS lookups,
        // its targets), or not an error at all.
        let dns = ip(UDP, HOME, Ipv4Addr::new(192, 168, 1, 1), 41000, 53);
        assert!(!home.admits(HOME, EDGE, &icmp(3, &dns)));
        let other_port = ip(UDP, HOME, EDGE, 41000, 51820);
        assert!(!home.admits(HOME, EDGE, &icmp(3, &other_port)));
        assert!(!home.admits(HOME, EDGE, &icmp(8, &udp_sent)));
        assert!(!home.admits(HOME, EDGE, &icmp(5, &udp_sent)));
        // Too short to quote anything.
        assert!(!home.admits(HOME, EDGE, &icmp(3, &udp_sent)[..30]));
    }

    #[test]
    fn only_what_is_for_the_peer_is_sent() {
        assert!(addressed_to(
            EDGE,
            &ip(TCP, HOME, EDGE, TCP_FLOW_PORT, 40000)
        ));
        let mdns = ip(UDP, HOME, Ipv4Addr::new(224, 0, 0, 251), 5353, 5353);
        assert!(!addressed_to(EDGE, &mdns));
        let broadcast = ip(UDP, HOME, Ipv4Addr::new(10, 77, 0, 3), 137, 137);
        assert!(!addressed_to(EDGE, &broadcast));
        let mut v6 = ip(UDP, HOME, EDGE, 1, 1);
        v6[0] = 0x60;
        assert!(!addressed_to(EDGE, &v6));
    }

    #[test]
    fn neither_end_routes_for_the_other() {
        let lan = Ipv4Addr::new(192, 168, 1, 10);
        assert!(!Inbound::FlowPorts.admits(HOME, EDGE, &packet(TCP, lan, TCP_FLOW_PORT)));
        assert!(!Inbound::ToSelf.admits(EDGE, HOME, &packet(TCP, lan, 80)));
        assert!(Inbound::ToSelf.admits(EDGE, HOME, &packet(TCP, EDGE, 40000)));
    }

    #[test]
    fn fragments_are_checked_by_their_first() {
        let home = Inbound::FlowPorts;
        let mut first = packet(UDP, HOME, UDP_FLOW_PORT);
        first[6] = 0x20; // more fragments
        assert!(home.admits(HOME, EDGE, &first));
        let mut elsewhere = packet(UDP, HOME, 53);
        elsewhere[6] = 0x20;
        assert!(!home.admits(HOME, EDGE, &elsewhere));
        let mut later = packet(UDP, HOME, 0);
        later[7] = 0xb9; // an offset, no ports
        assert!(home.admits(HOME, EDGE, &later));
        let mut gre = packet(47, HOME, 0);
        gre[7] = 0xb9;
        assert!(!home.admits(HOME, EDGE, &gre));
        let mut icmp_first = icmp(3, &ip(UDP, HOME, EDGE, UDP_FLOW_PORT, 51820));
        icmp_first[6] = 0x20;
        assert!(!home.admits(HOME, EDGE, &icmp_first));
        let mut elsewhere_later = packet(UDP, Ipv4Addr::new(192, 168, 1, 10), 0);
        elsewhere_later[7] = 0xb9;
        assert!(!home.admits(HOME, EDGE, &elsewhere_later));
    }

    #[test]
    fn home_refuses_ip_options() {
        let mut with_options = packet(TCP, HOME, TCP_FLOW_PORT);
        with_options[0] = 0x46;
        with_options.splice(20..20, [0x83, 3, 4, 0]); // loose source route
        assert!(!Inbound::FlowPorts.admits(HOME, EDGE, &with_options));
        assert!(Inbound::ToSelf.admits(HOME, EDGE, &with_options));
    }

    #[test]
    fn short_or_odd_headers_are_refused() {
        let mut df = packet(TCP, HOME, TCP_FLOW_PORT);
        df[6] = 0x40; // don't fragment: not a fragment
        assert!(Inbound::FlowPorts.admits(HOME, EDGE, &df));
        assert!(!Inbound::FlowPorts.admits(HOME, EDGE, &packet(TCP, HOME, TCP_FLOW_PORT)[..19]));
        // A header that claims options the packet does not have.
        let mut long = packet(TCP, HOME, TCP_FLOW_PORT);
        long[0] = 0x4f;
        assert!(!Inbound::FlowPorts.admits(HOME, EDGE, &long));
        let mut short = packet(TCP, HOME, TCP_FLOW_PORT);
        short[0] = 0x44;
        assert!(!Inbound::FlowPorts.admits(HOME, EDGE, &short));
    }
}
