//! The edge's public addresses, as the kernel knows them.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};

/// Global-scope addresses of every interface but the tunnel's: what a
/// client on the internet (or on the local edge's veth) dials.
pub async fn public_addrs(tunnel_if: &str) -> std::io::Result<Vec<IpAddr>> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let conn = tokio::spawn(conn);
    let to_io = |e: rtnetlink::Error| std::io::Error::other(e.to_string());
    let tunnel_index = handle
        .link()
        .get()
        .match_name(tunnel_if.to_owned())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|l| l.header.index);
    let mut addrs = Vec::new();
    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(to_io)? {
        if msg.header.scope != AddressScope::Universe || Some(msg.header.index) == tunnel_index {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Address(ip) = attr
                && !ip.is_loopback()
                && !addrs.contains(ip)
            {
                addrs.push(*ip);
            }
        }
    }
    conn.abort();
    // IPv4 first: what most users will paste into a browser or a DNS record.
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    Ok(addrs)
}
