//! skerry's edge-agent: the small static program on the public VM.
//!
//! It accepts public TCP and UDP itself and carries every flow through a
//! WireGuard tunnel (boringtun on a TUN device) to the home-agent. It knows
//! public ports and their policy, never the targets behind them, and holds
//! no state that a reconnecting home-agent cannot rebuild.
//!
//! | module | owns |
//! |---|---|
//! | [`control`] | the QUIC control server and its sessions |
//! | [`ports`] | the public listeners and applying a port map to them |
//! | [`relay`] | moving public TCP and UDP flows into the tunnel |
//! | [`flow_pool`] | in-tunnel TCP flows opened ahead of the connections that use them |
//! | [`udp_flows`] | the UDP flow table (no I/O) |
//! | [`addresses`] | discovering the edge's public addresses |
//! | [`metadata`] | reading the bootstrap from the droplet metadata service |
#![forbid(unsafe_code)]

pub mod addresses;
pub mod control;
pub mod flow_pool;
pub mod home_moves;
pub mod metadata;
pub mod ports;
pub mod relay;
pub mod udp_flows;

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use skerry::bootstrap::Bootstrap;
use skerry::dead_peer::DeadPeer;
use skerry::flow::{TCP_FLOW_PORT, UDP_FLOW_PORT};
use skerry::protocol::EdgeInfo;
use skerry::tunnel::device::{self, DEFAULT_MTU};
use skerry::tunnel::{Endpoint, Inbound, TunnelSpec, WireguardKey, driver};
use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use ports::Reserved;

/// Default name of the edge's TUN device.
pub const DEFAULT_TUN_NAME: &str = "skerry0";

/// How long a stopping edge gives its TCP flows to reset their clients:
/// each needs only to be polled once.
const CUT_FLOWS_AT_MOST: Duration = Duration::from_secs(2);
/// How long a stopping edge keeps its tunnel after cutting its flows.
const TUNNEL_CARRIES_CUTS: Duration = Duration::from_millis(100);

/// Everything the edge-agent runs from.
#[derive(Debug, Clone)]
pub struct EdgeOptions {
    pub bootstrap: Bootstrap,
    pub tun_name: String,
    pub udp_idle: Duration,
    /// When a silent client or in-tunnel flow is given up.
    pub dead_peer: DeadPeer,
    /// Told once the control endpoint is bound (the local edge waits on it).
    pub ready: Option<std::sync::mpsc::SyncSender<()>>,
}

impl EdgeOptions {
    pub fn new(bootstrap: Bootstrap) -> Self {
        EdgeOptions {
            bootstrap,
            tun_name: DEFAULT_TUN_NAME.to_owned(),
            udp_idle: Duration::from_secs(60),
            dead_peer: DeadPeer::default(),
            ready: None,
        }
    }
}

/// Every TCP flow goes from the edge's tunnel address to the home's one
/// flow port, and the edge usually closes first, so its TIME_WAIT sockets
/// share one range of ports. Unless the kernel may reuse them
/// (`tcp_tw_reuse=1`, as the edge image sets), the range lasts about
/// `range / 60 s` new flows a second (470 with Linux's defaults), and
/// flows beyond that fail. A home-agent that reads framed flows reuses
/// them, so this matters for bursts beyond the flow pool and for older
/// home-agents. Says so at start rather than changing a system-wide
/// setting on someone's server.
fn check_time_wait_reuse() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => {}
        Ok(v) => tracing::warn!(
            "net.ipv4.tcp_tw_reuse is {}: this edge can open only about 470 new TCP flows a \
             second before the tunnel's ports run out (each waits 60 s in TIME_WAIT); \
             `sysctl -w net.ipv4.tcp_tw_reuse=1` (and a file in /etc/sysctl.d) lifts that, \
             as the skerry edge image does",
            v.trim()
        ),
        Err(e) => tracing::debug!(error = %e, "cannot read {PATH}"),
    }
}

/// Runs the edge until `shutdown` is cancelled.
pub async fn run(opts: EdgeOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let boot = &opts.bootstrap;
    let tunnel = boot.tunnel;
    let tls = skerry::tls::quic_server_config(
        &boot.ca_cert().context("bootstrap CA certificate")?,
        &boot.identity().context("bootstrap edge identity")?,
    )
    .context("building the control channel's TLS configuration")?;

    check_time_wait_reuse();
    // The edge's tasks stop when `run` returns, however it returns: a start
    // that fails half-way (the control port taken) must not leave the TUN
    // device and the WireGuard port held by tasks no one will stop. Not on
    // `shutdown` itself: the tunnel must outlive the flows it carries, so
    // that home learns of their cut (see the end of `run`).
    let tasks = CancellationToken::new();
    let _stop_tasks = tasks.clone().drop_guard();
    let key = WireguardKey::generate();
    let tun = device::create(
        &opts.tun_name,
        tunnel.edge(),
        tunnel.home(),
        tunnel.prefix_len(),
        DEFAULT_MTU,
    )
    .await
    .context("creating the tunnel device")?;
    let wg_socket = bind_wireguard(boot.wireguard_port)
        .with_context(|| format!("binding the WireGuard port UDP {}", boot.wireguard_port))?;
    let tunnel_handle = driver::spawn(
        tun,
        wg_socket,
        TunnelSpec {
            private_key: key.secret(),
            peer_addr: tunnel.home(),
            own_addr: tunnel.edge(),
            inbound: Inbound::ToSelf,
            endpoint: Endpoint::Learned,
            keepalive: None,
        },
        None,
        tasks.child_token(),
    )
    .context("setting up the tunnel's UDP socket")?;

    // UDP flows leave from the WireGuard port on the tunnel address: a
    // port that is reserved anyway, so no public port is taken by it.
    let flow_socket = bind_reuse_v4(SocketAddrV4::new(tunnel.edge(), boot.wireguard_port))
        .context("binding the tunnel's UDP flow socket")?;
    // Home's replies and flows come out of the tunnel only: a neighbour on
    // the cloud's network could otherwise send them "from" home's tunnel
    // address, to public clients by flow id.
    let device = device::only_through_or_warn(&flow_socket, &opts.tun_name, "home")
        .then(|| opts.tun_name.clone());
    let ctx = Arc::new(
        relay::RelayContext::new(
            SocketAddr::from((tunnel.home(), TCP_FLOW_PORT)),
            SocketAddr::from((tunnel.home(), UDP_FLOW_PORT)),
            Arc::new(flow_socket),
            opts.udp_idle,
            opts.dead_peer,
            device,
        )
        .context("setting up the tunnel's UDP flow socket")?,
    );
    let reserved = Reserved {
        control_port: boot.control_port,
        wireguard_port: boot.wireguard_port,
    };
    let pool = ctx.pool.clone();
    tokio::spawn(pool.clone().run(tasks.child_token()));
    let ports = Arc::new(Mutex::new(ports::PortTable::new(reserved, ctx.clone())));
    tokio::spawn(relay::udp_reply_loop(ctx.clone(), tasks.child_token()));

    let public_addrs = addresses::public_addrs(&opts.tun_name)
        .await
        .context("listing the edge's addresses")?;
    let endpoint = control::endpoint(
        boot.control_port,
        tls,
        boot.edge_key_pem.expose().as_bytes(),
    )
    .with_context(|| format!("binding the control port UDP {}", boot.control_port))?;
    info!(
        control_port = boot.control_port,
        wireguard_port = boot.wireguard_port,
        addrs = ?public_addrs,
        "edge-agent ready"
    );
    if let Some(ready) = &opts.ready {
        let _ = ready.try_send(());
    }
    let state = Arc::new(control::ControlState::new(
        EdgeInfo {
            wireguard_key: key.public(),
            wireguard_port: boot.wireguard_port,
            tunnel,
            public_addrs,
        },
        tunnel_handle,
        ports.clone(),
        pool,
    ));
    control::serve(endpoint, state, shutdown.clone()).await;
    ports.lock().await.close_all();
    ctx.cut_all_flows(CUT_FLOWS_AT_MOST).await;
    // The cut flows' last segments are queued on the TUN device; the tunnel
    // task sends them to home (which then resets their targets) once the
    // runtime has polled it.
    tokio::time::sleep(TUNNEL_CARRIES_CUTS).await;
    info!("edge-agent stopped");
    Ok(())
}

fn bind_wireguard(port: u16) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    driver::size_socket_buffers(&s);
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

fn bind_reuse_v4(addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    s.set_reuse_address(true)?;
    driver::size_socket_buffers(&s);
    s.bind(&SocketAddr::V4(addr).into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}
