//! PROXY protocol headers (HAProxy's spec, versions 1 and 2), so a target
//! that asks for it learns the real client address instead of the tunnel's.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use skerry::portmap::{Protocol, ProxyProtocol};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for one flow from `client` to the public `dest`.
pub fn header(
    version: ProxyProtocol,
    protocol: Protocol,
    client: SocketAddr,
    dest: SocketAddr,
) -> Vec<u8> {
    let (client, dest) = same_family(client, dest);
    match version {
        ProxyProtocol::V1 => v1(client, dest),
        ProxyProtocol::V2 => v2(protocol, client, dest),
    }
}

/// Both addresses of a header must be of one family: map IPv4 into IPv6
/// when the two differ.
fn same_family(client: SocketAddr, dest: SocketAddr) -> (SocketAddr, SocketAddr) {
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    let dest = SocketAddr::new(dest.ip().to_canonical(), dest.port());
    match (client.ip(), dest.ip()) {
        (IpAddr::V4(_), IpAddr::V6(_)) => {
            (SocketAddr::new(v6(client.ip()).into(), client.port()), dest)
        }
        (IpAddr::V6(_), IpAddr::V4(_)) => {
            (client, SocketAddr::new(v6(dest.ip()).into(), dest.port()))
        }
        _ => (client, dest),
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn v1(client: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        dest.ip(),
        client.port(),
        dest.port()
    )
    .into_bytes()
}

fn v2(protocol: Protocol, client: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let transport = match protocol {
        Protocol::Tcp => 0x1,
        Protocol::Udp => 0x2,
    };
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, PROXY command
    match (client.ip(), dest.ip()) {
        (IpAddr::V4(c), IpAddr::V4(d)) => {
            out.push(0x10 | transport);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.octets());
            out.extend_from_slice(&d.octets());
        }
        (c, d) => {
            out.push(0x20 | transport);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(c).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&dest.port().to_be_bytes());
    out
}

/// The destination to report when the edge's address is not known.
pub fn unknown_dest(client: SocketAddr, port: u16) -> SocketAddr {
    match client.ip().to_canonical() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_tcp4() {
        let h = header(
            ProxyProtocol::V1,
            Protocol::Tcp,
            "198.18.1.2:50000".parse().unwrap(),
            "203.0.113.7:443".parse().unwrap(),
        );
        assert_eq!(h, b"PROXY TCP4 198.18.1.2 203.0.113.7 50000 443\r\n");
    }

    #[test]
    fn v2_tcp4_layout() {
        let h = header(
            ProxyProtocol::V2,
            Protocol::Tcp,
            "198.18.1.2:50000".parse().unwrap(),
            "203.0.113.7:443".parse().unwrap(),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 12);
        assert_eq!(&h[16..20], &[198, 18, 1, 2]);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 50000);
        assert_eq!(h.len(), 28);
    }

    #[test]
    fn v2_mixed_families_use_v6() {
        let h = header(
            ProxyProtocol::V2,
            Protocol::Udp,
            "[2001:db8::1]:5".parse().unwrap(),
            "203.0.113.7:53".parse().unwrap(),
        );
        assert_eq!(h[13], 0x22);
        assert_eq!(h.len(), 16 + 36);
    }
}
