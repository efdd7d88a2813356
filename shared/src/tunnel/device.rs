//! The TUN device of one tunnel end, configured over rtnetlink.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
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
}

/// Creates the TUN device `name` with `addr/prefix_len`, sets its MTU and
/// brings it up. The device lives as long as the returned handle.
pub async fn create(
    name: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
    mtu: u16,
) -> Result<AsyncDevice, DeviceError> {
    let dev = DeviceBuilder::new()
        .name(name)
        .mtu(mtu)
        .tx_queue_len(TX_QUEUE_LEN)
        .offload(true)
        .build_async()
        .map_err(|source| DeviceError::Create {
            name: name.to_owned(),
            source,
        })?;
    let configure = |e: rtnetlink::Error| DeviceError::Configure {
        name: name.to_owned(),
        reason: e.to_string(),
    };
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DeviceError::Netlink)?;
    let conn = tokio::spawn(conn);
    let result = async {
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
        Ok(())
    }
    .await;
    conn.abort();
    result.map(|()| dev)
}
