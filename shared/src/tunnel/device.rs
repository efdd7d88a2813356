//! The TUN device of one tunnel end, configured over rtnetlink.

use std::net::Ipv4Addr;

use super::addrs::prefix_mask;
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute};
use thiserror::Error;
use tun_rs::{AsyncDevice, DeviceBuilder};

/// Inner MTU: 1500 minus outer IPv6 (40) and UDP (8) headers and
/// WireGuard's 32 bytes, so tunnel packets never fragment on a 1500-byte path.
pub const DEFAULT_MTU: u16 = 1420;
/// Longer than the kernel's default of 500 for TUN, so bursts from the
/// reader side are queued rather than dropped.
const TX_QUEUE_LEN: u32 = 1000;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(
        "cannot create TUN device {name}: {source} (skerry needs CAP_NET_ADMIN and /dev/net/tun; run as root)"
    )]
    Create {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot open a netlink socket: {0}")]
    Netlink(std::io::Error),
    #[error("netlink refused to configure {name}: {reason}")]
    Configure { name: String, reason: String },
    #[error(
        "the tunnel's subnet {subnet} overlaps {other_if}'s {other}: choose other tunnel addresses \
         (--tunnel-edge, --tunnel-home, --tunnel-prefix; for an edge you run, in edge-bootstrap)"
    )]
    SubnetInUse {
        subnet: String,
        other_if: String,
        other: String,
    },
    #[error(
        "the tunnel's subnet {subnet} is routed elsewhere here ({route}): remove that route, or \
         choose other tunnel addresses (--tunnel-edge, --tunnel-home, --tunnel-prefix; for an \
         edge you run, in edge-bootstrap)"
    )]
    SubnetRouted { subnet: String, route: String },
    #[error(
        "the kernel sends the tunnel's far end {peer} by {route}, through a policy rule ahead of \
         the main table (see `ip rule`): add `ip rule add to {subnet} lookup main` with a \
         preference below that rule's, remove the route, or choose other tunnel addresses \
         (--tunnel-edge, --tunnel-home, --tunnel-prefix; for an edge you run, in edge-bootstrap)"
    )]
    PeerRoutedByRule {
        peer: Ipv4Addr,
        subnet: String,
        route: String,
    },
    #[error(
        "the kernel drops traffic to the tunnel's far end {peer} ({reason}): a prohibit, \
         unreachable or blackhole rule or route takes it (`ip route get {peer} from {own}` shows \
         which); remove it, or choose other tunnel addresses"
    )]
    PeerDropped {
        peer: Ipv4Addr,
        own: Ipv4Addr,
        reason: std::io::Error,
    },
    #[error(
        "the TUN device {name} is held by another process (an agent with the same device name: \
         edge-agent --tun-name, home-agent --name): stop it, or give this one another name"
    )]
    InUse { name: String },
}

/// `addr/prefix_len` as the network it names, for messages: `10.77.0.0/30`.
fn subnet(addr: Ipv4Addr, prefix_len: u8) -> String {
    let net = Ipv4Addr::from(u32::from(addr) & prefix_mask(prefix_len));
    format!("{net}/{prefix_len}")
}

const MAIN_TABLE: u8 = rtnetlink::packet_route::route::RouteHeader::RT_TABLE_MAIN;

/// A route of the main table for part of the address space, as the
/// tunnel's subnet is checked against it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostRoute {
    dst: Ipv4Addr,
    prefix_len: u8,
    /// `dev eth0`, `via 192.168.1.1 dev eth0`, `blackhole`: for messages.
    target: String,
}

impl std::fmt::Display for HostRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} {}", self.dst, self.prefix_len, self.target)
    }
}

/// What the host's routes leave of the tunnel's subnet. A route as narrow
/// as the subnet or narrower that overlaps it (a VPN's or a CNI's) would
/// fight the tunnel's own route for the far end's address: refused. A
/// wider one (a VPN's 10.0.0.0/8) only loses the subnet's few addresses to
/// the tunnel: returned, to be warned about. The default route is neither.
fn check_routes(
    addr: Ipv4Addr,
    prefix_len: u8,
    routes: &[HostRoute],
) -> Result<Option<&HostRoute>, DeviceError> {
    let mut wider = None;
    for route in routes.iter().filter(|r| r.prefix_len > 0) {
        let shorter = prefix_mask(prefix_len.min(route.prefix_len));
        if u32::from(addr) & shorter != u32::from(route.dst) & shorter {
            continue;
        }
        if route.prefix_len >= prefix_len {
            return Err(DeviceError::SubnetRouted {
                subnet: subnet(addr, prefix_len),
                route: route.to_string(),
            });
        }
        wider.get_or_insert(route);
    }
    Ok(wider)
}

/// A route as netlink describes it, with what the checks need.
struct ReadRoute {
    table: u32,
    kind: rtnetlink::packet_route::route::RouteType,
    oif: Option<u32>,
    route: HostRoute,
}

fn read_route(msg: &rtnetlink::packet_route::route::RouteMessage) -> ReadRoute {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
    let (mut table, mut dst, mut oif, mut gateway, mut multipath) = (
        u32::from(msg.header.table),
        Ipv4Addr::UNSPECIFIED,
        None,
        None,
        false,
    );
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::MultiPath(_) => multipath = true,
            _ => {}
        }
    }
    let kind = msg.header.kind;
    let dev = oif.map(|i| {
        nix::net::if_::if_indextoname(i)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("#{i}"))
    });
    let mut target = match (kind, gateway, dev) {
        (RouteType::Unicast, _, _) if multipath => "multipath".to_owned(),
        (RouteType::Unicast, Some(g), Some(d)) => format!("via {g} dev {d}"),
        (RouteType::Unicast, Some(g), None) => format!("via {g}"),
        (RouteType::Unicast, None, Some(d)) => format!("dev {d}"),
        (other, _, _) => format!("{other:?}").to_lowercase(),
    };
    if table != u32::from(MAIN_TABLE) {
        target.push_str(&format!(" table {table}"));
    }
    ReadRoute {
        table,
        kind,
        oif,
        route: HostRoute {
            dst,
            prefix_len: msg.header.destination_prefix_length,
            target,
        },
    }
}

/// The main table's IPv4 routes that send somewhere, other than those of
/// the device `name` (a stale one of ours).
async fn host_routes(
    handle: &rtnetlink::Handle,
    name: &str,
) -> Result<Vec<HostRoute>, rtnetlink::Error> {
    use rtnetlink::packet_route::route::RouteType;
    let own = nix::net::if_::if_nametoindex(name).ok();
    let mut dump = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut routes = Vec::new();
    while let Some(msg) = dump.try_next().await? {
        let r = read_route(&msg);
        if r.table == u32::from(MAIN_TABLE)
            && matches!(
                r.kind,
                RouteType::Unicast
                    | RouteType::BlackHole
                    | RouteType::Unreachable
                    | RouteType::Prohibit
            )
            && (r.oif.is_none() || r.oif != own)
        {
            routes.push(r.route);
        }
    }
    Ok(routes)
}

/// How the kernel routes the far end's address, all rules and tables
/// applied: a policy rule ahead of the main table (Tailscale's, a VPN's)
/// can take it whatever the main table says, and the tunnel would carry
/// nothing.
enum PeerRoute {
    ThroughTunnel,
    /// By this route instead.
    Elsewhere(ReadRoute),
    /// Nowhere: a prohibit, unreachable or blackhole rule or route.
    Dropped(std::io::Error),
}

/// Asks the kernel, as `ip route get fibmatch PEER from OWN` does.
async fn peer_route(
    handle: &rtnetlink::Handle,
    own: Ipv4Addr,
    peer: Ipv4Addr,
    index: u32,
) -> Result<PeerRoute, rtnetlink::Error> {
    use rtnetlink::packet_route::route::{RouteAttribute, RouteFlags, RouteHeader};
    // From the tunnel address, as the flow sockets send: `from` rules apply.
    let mut query = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(peer, 32)
        .source_prefix(own, 32)
        .build();
    // The route as configured (its prefix and the table it was found in),
    // not the cached result for one address: what the user can find.
    query.header.flags |= RouteFlags::FibMatch | RouteFlags::LookupTable;
    // The kernel ignores a table here (and a strict socket refuses one).
    query.header.table = RouteHeader::RT_TABLE_UNSPEC;
    query
        .attributes
        .retain(|a| !matches!(a, RouteAttribute::Table(_)));
    let msg = match handle.route().get(query).execute().try_next().await {
        Ok(Some(msg)) => msg,
        Ok(None) => return Ok(PeerRoute::ThroughTunnel),
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(
                -e.raw_code(),
                nix::libc::EACCES
                    | nix::libc::ENETUNREACH
                    | nix::libc::EHOSTUNREACH
                    | nix::libc::EINVAL
            ) =>
        {
            return Ok(PeerRoute::Dropped(e.to_io()));
        }
        Err(e) => return Err(e),
    };
    let r = read_route(&msg);
    Ok(if r.oif == Some(index) {
        PeerRoute::ThroughTunnel
    } else {
        PeerRoute::Elsewhere(r)
    })
}

/// Refuses a tunnel subnet that overlaps an address another interface here
/// already has (a second agent with the default addresses, a LAN or a VPC
/// in that range): routes would be ambiguous and the tunnel's flows would
/// fail to bind or go astray, far from the cause.
fn check_subnet_free(name: &str, addr: Ipv4Addr, prefix_len: u8) -> Result<(), DeviceError> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Ok(()); // cannot tell: the kernel will say what it refuses
    };
    for ifa in ifaddrs {
        if ifa.interface_name == name {
            continue;
        }
        let (Some(other), Some(mask)) = (
            ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()),
            ifa.netmask.as_ref().and_then(|m| m.as_sockaddr_in()),
        ) else {
            continue;
        };
        let other_len = u8::try_from(u32::from(mask.ip()).leading_ones()).unwrap_or(32);
        // Two prefixes overlap when they agree on the shorter one's bits.
        let shorter = prefix_mask(prefix_len.min(other_len));
        if u32::from(addr) & shorter == u32::from(other.ip()) & shorter {
            return Err(DeviceError::SubnetInUse {
                subnet: subnet(addr, prefix_len),
                other_if: ifa.interface_name,
                other: format!("{}/{other_len}", other.ip()),
            });
        }
    }
    Ok(())
}

/// Creates the TUN device `name` with `addr/prefix_len`, sets its MTU and
/// brings it up, and checks that the kernel sends the far end's address
/// `peer` through it. The device lives as long as the returned handle.
pub async fn create(
    name: &str,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
    prefix_len: u8,
    mtu: u16,
) -> Result<AsyncDevice, DeviceError> {
    check_subnet_free(name, addr, prefix_len)?;
    let configure = |e: rtnetlink::Error| DeviceError::Configure {
        name: name.to_owned(),
        reason: e.to_string(),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DeviceError::Netlink)?;
    let conn = tokio::spawn(conn);
    let result = async {
        match host_routes(&handle, name).await {
            Ok(routes) => {
                if let Some(wider) = check_routes(addr, prefix_len, &routes)? {
                    tracing::warn!(
                        device = name,
                        route = %wider,
                        "the tunnel's subnet lies inside a route of this host: its addresses there \
                         are out of reach from here while the tunnel is up; if anything uses them, \
                         choose other tunnel addresses"
                    );
                }
            }
            Err(e) => tracing::warn!(
                device = name,
                error = %e,
                "could not list this host's routes; the tunnel's subnet was not checked against them"
            ),
        }
        let dev = DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .tx_queue_len(TX_QUEUE_LEN)
            .offload(true)
            // Brought up below, once IPv6 addresses are off.
            .enable(false)
            .build_async()
            .map_err(|source| {
                if source.raw_os_error() == Some(nix::libc::EBUSY) {
                    DeviceError::InUse {
                        name: name.to_owned(),
                    }
                } else {
                    DeviceError::Create {
                        name: name.to_owned(),
                        source,
                    }
                }
            })?;
        let link = handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await
            .map_err(configure)?
            .ok_or_else(|| DeviceError::Configure {
                name: name.to_owned(),
                reason: "device vanished after creation".into(),
            })?;
        let index = link.header.index;
        // The tunnel carries IPv4 only. Without an IPv6 link-local address
        // the kernel sends no router solicitations or MLD reports into it,
        // each of which would be encrypted, sent and dropped at the far end.
        // Best effort: a kernel without IPv6 refuses the attribute.
        if let Err(e) = handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(index)
                    .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![
                        AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)]),
                    ]))
                    .build(),
            )
            .execute()
            .await
        {
            tracing::debug!(device = name, error = %e, "could not turn IPv6 addresses off on the TUN");
        }
        handle
            .address()
            .add(index, addr.into(), prefix_len)
            .replace()
            .execute()
            .await
            .map_err(configure)?;
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(index)
                    .mtu(u32::from(mtu))
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(configure)?;
        match peer_route(&handle, addr, peer, index).await {
            Ok(PeerRoute::ThroughTunnel) => {}
            Ok(PeerRoute::Elsewhere(r)) if r.table == u32::from(MAIN_TABLE) => {
                return Err(DeviceError::SubnetRouted {
                    subnet: subnet(addr, prefix_len),
                    route: r.route.to_string(),
                });
            }
            Ok(PeerRoute::Elsewhere(r)) => {
                return Err(DeviceError::PeerRoutedByRule {
                    peer,
                    subnet: subnet(addr, prefix_len),
                    route: r.route.to_string(),
                });
            }
            Ok(PeerRoute::Dropped(reason)) => {
                return Err(DeviceError::PeerDropped {
                    peer,
                    own: addr,
                    reason,
                });
            }
            Err(e) => tracing::warn!(
                device = name,
                error = %e,
                "could not ask the kernel how it routes the tunnel's far end"
            ),
        }
        Ok(dev)
    }
    .await;
    conn.abort();
    result
}

/// Binds a socket that talks to the tunnel's far end to the TUN device
/// `name`. Bound only to its tunnel address, a socket takes whatever
/// reaches that address: Linux delivers to a local address whatever
/// interface a packet came in on, and loose reverse-path filtering (the
/// Debian default) lets a host on a neighbouring network send "from" the
/// far end's tunnel address, whose route goes through the TUN. Bound to the
/// device, the socket takes only what came out of the tunnel, which admits
/// only what the far end's key sealed. Since Linux 5.7 a socket not yet
/// bound to a device needs no `CAP_NET_RAW` for it.
pub fn only_through<S: std::os::fd::AsFd>(socket: &S, name: &str) -> std::io::Result<()> {
    socket2::SockRef::from(socket).bind_device(Some(name.as_bytes()))
}

/// [`only_through`] for an agent's flow sockets, or a warning that says
/// what stays open (`far_end`: who could be posed as). Whether it bound.
pub fn only_through_or_warn<S: std::os::fd::AsFd>(socket: &S, name: &str, far_end: &str) -> bool {
    match only_through(socket, name) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                device = name,
                error = %e,
                "cannot bind the flow sockets to the tunnel device (Linux 5.7 and later allow it): \
                 a host on one of this host's networks could pose as {far_end} to them"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: [u8; 4], prefix_len: u8) -> HostRoute {
        HostRoute {
            dst: dst.into(),
            prefix_len,
            target: "dev wg0".to_owned(),
        }
    }

    #[test]
    fn routes_narrower_than_the_subnet_are_refused_wider_ones_reported() {
        let tunnel = Ipv4Addr::new(10, 77, 0, 1);
        let unrelated = [route([0, 0, 0, 0], 0), route([192, 168, 1, 0], 24)];
        assert_eq!(check_routes(tunnel, 30, &unrelated).unwrap(), None);
        // The same subnet, or a host route for the far end.
        for taken in [route([10, 77, 0, 0], 30), route([10, 77, 0, 2], 32)] {
            match check_routes(tunnel, 30, &[route([0, 0, 0, 0], 0), taken.clone()]) {
                Err(DeviceError::SubnetRouted { subnet, route }) => {
                    assert_eq!(subnet, "10.77.0.0/30");
                    assert_eq!(route, taken.to_string());
                }
                other => panic!("{taken} overlaps 10.77.0.0/30: {other:?}"),
            }
        }
        // Next to the subnet, not in it.
        assert_eq!(
            check_routes(tunnel, 30, &[route([10, 77, 0, 4], 30)]).unwrap(),
            None
        );
        // A VPN's 10.0.0.0/8 loses four addresses to the tunnel: told.
        let vpn = route([10, 0, 0, 0], 8);
        assert_eq!(
            check_routes(tunnel, 30, std::slice::from_ref(&vpn)).unwrap(),
            Some(&vpn)
        );
        // A wide tunnel subnet over a narrow route is refused.
        assert!(matches!(
            check_routes(tunnel, 16, &[route([10, 77, 9, 0], 24)]),
            Err(DeviceError::SubnetRouted { .. })
        ));
    }

    #[test]
    fn a_subnet_overlapping_an_address_here_is_refused() {
        // Every network namespace has 127.0.0.1/8 on lo.
        match check_subnet_free("sk-test", Ipv4Addr::new(127, 9, 9, 1), 30) {
            Err(DeviceError::SubnetInUse {
                subnet, other_if, ..
            }) => {
                assert_eq!(subnet, "127.9.9.0/30");
                assert_eq!(other_if, "lo");
            }
            other => panic!("127.9.9.1/30 overlaps lo's 127.0.0.1/8: {other:?}"),
        }
        // A wider tunnel subnet that takes in loopback is refused too.
        assert!(matches!(
            check_subnet_free("sk-test", Ipv4Addr::new(127, 0, 0, 9), 8),
            Err(DeviceError::SubnetInUse { .. })
        ));
    }
}
