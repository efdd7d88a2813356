//! The home-agent's side of the control channel, and the data plane it
//! brings up once the edge has answered.
//!
//! The session reconnects with backoff when the control channel drops; the
//! tunnel and the forwarders stay up meanwhile, so flows keep going.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use skerry::control::{MessageReader, close_code, write_message};
use skerry::dead_peer::DeadPeer;
use skerry::flow::{TCP_FLOW_PORT, UDP_FLOW_PORT};
use skerry::pki::{EDGE_SERVER_NAME, HomePki};
use skerry::portmap::PortMap;
use skerry::protocol::{HomeEvent, HomeSession, PortsApplied, Welcome};
use skerry::tunnel::device::{self, DEFAULT_MTU};
use skerry::tunnel::driver::{self, HOME_KEEPALIVE_SECS};
use skerry::tunnel::{Endpoint, Inbound, TunnelAddrs, TunnelHandle, TunnelSpec, WireguardKey};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::forward::{self, Forwarding};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(30);
/// The wait before reconnecting after another home-agent took the edge
/// over: long enough that two agents sharing an edge by mistake do not cut
/// each other's flows off every few seconds, short enough that a restart
/// which overlapped its predecessor gets the edge back soon.
const TAKEN_OVER_WAIT: Duration = Duration::from_secs(30);

/// The edge closed this session because another home-agent session took
/// it over: a second agent configured for the same edge, or this agent's
/// own restart that overlapped.
#[derive(Debug, thiserror::Error)]
#[error(
    "another home-agent took over the edge at {edge} (if this keeps happening, two agents use it: stop one, or give it its own edge with --name)"
)]
pub struct TakenOver {
    pub edge: SocketAddr,
}

/// What the running agent knows, for the CLI and for status.
#[derive(Debug, Clone, Default)]
pub struct HomeStatus {
    pub connected: bool,
    pub edge_public_addrs: Vec<IpAddr>,
    pub tunnel: TunnelAddrs,
    /// The edge's answer to the latest map sent.
    pub applied: Option<PortsApplied>,
    pub last_error: Option<String>,
    pub sessions: u64,
    /// The tunnel, once the first session brought it up.
    pub tunnel_handle: Option<TunnelHandle>,
    /// The forwarders, once up: open flows per port.
    pub forwarding: Option<Arc<Forwarding>>,
    /// Why the last edit of the config file was refused, if it was.
    pub config_error: Option<String>,
}

/// Everything one `connect` runs from.
#[derive(Debug, Clone)]
pub struct HomeOptions {
    /// The edge's control address.
    pub edge: SocketAddr,
    pub tun_name: String,
    pub udp_idle: Duration,
    /// How long flows on a removed port may go on.
    pub drain_grace: Duration,
    /// When a silent in-tunnel flow or target connection is given up.
    pub dead_peer: DeadPeer,
    /// The tunnel addresses the user asked for, if any; the edge's own
    /// (in its Welcome) are the ones used.
    pub requested_tunnel: Option<TunnelAddrs>,
}

fn grace_secs(opts: &HomeOptions) -> u32 {
    u32::try_from(opts.drain_grace.as_secs()).unwrap_or(u32::MAX)
}

struct DataPlane {
    tunnel: TunnelHandle,
    tunnel_addrs: TunnelAddrs,
    edge_key: [u8; 32],
    fwd: Arc<Forwarding>,
}

/// Runs the control session (reconnecting) and the data plane until
/// `shutdown`. The port map comes from `map`: each change is sent as a new
/// generation.
pub async fn run(
    opts: HomeOptions,
    pki: &HomePki,
    key: &WireguardKey,
    mut map: watch::Receiver<PortMap>,
    status: watch::Sender<HomeStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = skerry::tls::quic_client_config(pki.ca_cert(), pki.home())
        .context("control channel TLS")?;
    let bind: SocketAddr = if opts.edge.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).context("opening the control channel's UDP socket")?;
    endpoint.set_default_client_config(tls);

    // The data plane's tasks hang off `running`: they stop when `run`
    // returns, for whatever reason (not only at `shutdown`: an error, or
    // the port map's sender dropped).
    let running = shutdown.child_token();
    let _stop_plane = running.clone().drop_guard();
    let mut plane: Option<DataPlane> = None;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let result = loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            r = session(&opts, &endpoint, key, &mut plane, &mut map, &status, &running) => r,
        };
        status.send_modify(|s| s.connected = false);
        match outcome {
            Ok(()) => break Ok(()),
            Err(e) if plane.is_none() && is_fatal(&e) => break Err(e),
            Err(e) => {
                if started.elapsed() > STABLE_SESSION {
                    backoff.reset();
                }
                let wait = if e.is::<TakenOver>() {
                    warn!(error = %format!("{e:#}"), retry_in = ?TAKEN_OVER_WAIT, "the edge serves another home-agent now; taking it back later");
                    TAKEN_OVER_WAIT
                } else {
                    let wait = backoff.next_delay(rand::random::<f64>());
                    warn!(error = %format!("{e:#}"), retry_in = ?wait, "control channel lost; reconnecting (the tunnel keeps carrying flows)");
                    wait
                };
                status.send_modify(|s| s.last_error = Some(format!("{e:#}")));
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    endpoint.close(
        quinn::VarInt::from_u32(close_code::SHUTDOWN),
        b"home-agent stopping",
    );
    // The data plane stops with this function (`_stop_plane`): nothing of it
    // is shown as running.
    status.send_modify(|s| {
        s.tunnel_handle = None;
        s.forwarding = None;
    });
    result
}

/// Errors that retrying will not fix.
fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<skerry::protocol::ProtocolError>()
            .is_some_and(|p| {
                matches!(
                    p,
                    skerry::protocol::ProtocolError::Version { .. }
                        | skerry::protocol::ProtocolError::Refused(_)
                )
            })
            || c.downcast_ref::<skerry::tunnel::device::DeviceError>()
                .is_some()
    })
}

async fn session(
    opts: &HomeOptions,
    endpoint: &quinn::Endpoint,
    key: &WireguardKey,
    plane: &mut Option<DataPlane>,
    map: &mut watch::Receiver<PortMap>,
    status: &watch::Sender<HomeStatus>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, async {
        endpoint
            .connect(opts.edge, EDGE_SERVER_NAME)
            .context("starting the control connection")?
            .await
            .context("control connection (is the edge running, and does it trust this home's CA?)")
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "the edge at {} did not answer within {CONNECT_TIMEOUT:?}",
            opts.edge
        )
    })??;
    match drive(opts, &conn, key, plane, map, status, shutdown).await {
        Err(_) if taken_over(&conn) => Err(TakenOver { edge: opts.edge }.into()),
        result => result,
    }
}

/// Whether the edge closed `conn` because another session took it over.
/// quinn records the close before any stream read or write fails with it.
fn taken_over(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(close_code::SUPERSEDED)
    )
}

/// One established control connection, until it ends.
async fn drive(
    opts: &HomeOptions,
    conn: &quinn::Connection,
    key: &WireguardKey,
    plane: &mut Option<DataPlane>,
    map: &mut watch::Receiver<PortMap>,
    status: &watch::Sender<HomeStatus>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (mut send, recv) = conn.open_bi().await.context("opening the control stream")?;
    let mut reader = MessageReader::new(recv);
    let (mut session, hello) = HomeSession::start(key.public());
    write_message(&mut send, &hello).await?;
    let welcome = tokio::time::timeout(CONNECT_TIMEOUT, reader.next())
        .await
        .map_err(|_| anyhow::anyhow!("the edge did not answer Hello"))??
        .context("the edge closed the control stream (a certificate it does not trust?)")?;
    let HomeEvent::Established(welcome) = session.handle(welcome)? else {
        bail!("the edge did not answer Hello with Welcome");
    };
    info!(edge = %opts.edge, addrs = ?welcome.public_addrs, "control channel up");
    let initial = map.borrow().clone();
    let fwd = ensure_plane(opts, key, plane, &welcome, initial, shutdown).await?;
    fwd.set_public_addrs(welcome.public_addrs.clone());
    status.send_modify(|s| {
        s.connected = true;
        s.edge_public_addrs = welcome.public_addrs.clone();
        s.tunnel = welcome.tunnel;
        s.sessions += 1;
        s.last_error = None;
        // Answers of an earlier session say nothing about this edge.
        s.applied = None;
        s.tunnel_handle = plane.as_ref().map(|p| p.tunnel.clone());
        s.forwarding = Some(fwd.clone());
    });

    let current = map.borrow_and_update().clone();
    fwd.set_map(current.clone());
    write_message(
        &mut send,
        &session.apply(current.generation(), current.public(), grace_secs(opts))?,
    )
    .await?;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut pings: u64 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = send.finish();
                conn.close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"home-agent stopping");
                return Ok(());
            }
            changed = map.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let next = map.borrow_and_update().clone();
                fwd.set_map(next.clone());
                write_message(&mut send, &session.apply(next.generation(), next.public(), grace_secs(opts))?).await?;
            }
            _ = ping.tick() => {
                pings += 1;
                write_message(&mut send, &skerry::protocol::Message::Ping(pings)).await?;
            }
            msg = reader.next() => {
                let Some(msg) = msg? else {
                    bail!("the edge closed the control stream");
                };
                match session.handle(msg)? {
                    HomeEvent::Applied(applied) => {
                        for r in applied.results.iter().filter(|r| !r.status.is_ok()) {
                            warn!(entry = %r.key, status = %r.status, "edge refused a port");
                        }
                        status.send_modify(|s| s.applied = Some(applied));
                    }
                    HomeEvent::Moved(seen) => {
                        info!(%seen, "the edge sees this home at a new address; sending a tunnel packet so the tunnel follows");
                        if let Some(p) = plane.as_ref() {
                            p.tunnel.send_keepalive().await?;
                        }
                    }
                    HomeEvent::Pong(_) | HomeEvent::Established(_) => {}
                }
            }
        }
    }
}

/// Brings the tunnel and forwarders up on the first Welcome; on later ones
/// only follows a change of the edge's key.
async fn ensure_plane(
    opts: &HomeOptions,
    key: &WireguardKey,
    plane: &mut Option<DataPlane>,
    welcome: &Welcome,
    map: PortMap,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Forwarding>> {
    if let Some(p) = plane {
        if p.tunnel_addrs != welcome.tunnel {
            bail!(
                "the edge now uses tunnel addresses {:?}, not {:?}: restart the home-agent",
                welcome.tunnel,
                p.tunnel_addrs
            );
        }
        if p.edge_key != welcome.wireguard_key {
            info!("the edge has a new WireGuard key (it restarted); re-keying the tunnel");
            p.tunnel.set_peer(welcome.wireguard_key).await?;
            p.edge_key = welcome.wireguard_key;
        } else {
            // Same edge, but it may have dropped our session meanwhile (it
            // served another home-agent): our session would look good to
            // us for minutes while the edge, which cannot start a handshake
            // itself, drops what we send. One round trip makes sure.
            p.tunnel.rehandshake().await?;
        }
        return Ok(p.fwd.clone());
    }
    let t = welcome.tunnel;
    if let Some(asked) = opts.requested_tunnel.filter(|asked| *asked != t) {
        warn!(
            edge = %t,
            asked = %asked,
            "the edge was made with other tunnel addresses than --tunnel-* ask for, and keeps them; \
             to change them, destroy it (home-agent destroy) and connect again"
        );
    }
    // Until the data plane is whole, a failure stops what was started of
    // it: a tunnel task left running would hold the TUN device that the
    // next attempt creates again.
    let tasks = shutdown.child_token();
    let stop_tasks = tasks.clone().drop_guard();
    let tun = device::create(
        &opts.tun_name,
        t.home(),
        t.edge(),
        t.prefix_len(),
        DEFAULT_MTU,
    )
    .await?;
    let udp = bind_tunnel_socket(opts.edge).context("binding the tunnel's UDP socket")?;
    let tunnel = driver::spawn(
        tun,
        udp,
        TunnelSpec {
            private_key: key.secret(),
            peer_addr: t.edge(),
            own_addr: t.home(),
            inbound: Inbound::FlowPorts,
            endpoint: Endpoint::Fixed(SocketAddr::new(opts.edge.ip(), welcome.wireguard_port)),
            keepalive: Some(HOME_KEEPALIVE_SECS),
        },
        Some(welcome.wireguard_key),
        tasks.child_token(),
    )
    .context("setting up the tunnel's UDP socket")?;
    let fwd = Arc::new(Forwarding::new(
        map,
        t.edge(),
        opts.udp_idle,
        opts.dead_peer,
    ));
    let tcp = TcpListener::bind((t.home(), TCP_FLOW_PORT))
        .await
        .with_context(|| format!("binding the flow listener {}:{TCP_FLOW_PORT}", t.home()))?;
    // A flow is accepted once its header is there, not a wakeup earlier.
    if let Err(e) = skerry::sockopt::defer_accept(&tcp, 1) {
        tracing::debug!(error = %e, "TCP_DEFER_ACCEPT refused on the flow listener");
    }
    // Accepted flows inherit TCP_NODELAY and the probes for an edge that is
    // gone for good (see `skerry::dead_peer`): set once here, not per flow.
    socket2::SockRef::from(&tcp)
        .set_tcp_nodelay(true)
        .context("setting TCP_NODELAY on the flow listener")?;
    opts.dead_peer
        .watch(&tcp)
        .context("setting TCP keepalive on the flow listener")?;
    let udp_flows = bind_flow_socket(SocketAddr::from((t.home(), UDP_FLOW_PORT)))
        .with_context(|| format!("binding the UDP flow socket {}:{UDP_FLOW_PORT}", t.home()))?;
    // Flows come through the tunnel only: otherwise a host on the LAN could
    // send a datagram "from" the edge's tunnel address, with a client
    // address and a PROXY header of its choosing.
    device::only_through_or_warn(&tcp, &opts.tun_name, "the edge");
    device::only_through_or_warn(&udp_flows, &opts.tun_name, "the edge");
    tokio::spawn(forward::tcp_flows(tcp, fwd.clone(), tasks.child_token()));
    tokio::spawn(forward::udp_flows(
        Arc::new(udp_flows),
        fwd.clone(),
        tasks.child_token(),
    ));
    stop_tasks.disarm();
    *plane = Some(DataPlane {
        tunnel,
        tunnel_addrs: t,
        edge_key: welcome.wireguard_key,
        fwd: fwd.clone(),
    });
    Ok(fwd)
}

/// The home end's WireGuard socket, with buffers large enough for bursts
/// at line rate (the kernel default of about 200 KiB drops them).
fn bind_tunnel_socket(edge: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let (domain, bind) = if edge.is_ipv4() {
        (Domain::IPV4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
    } else {
        (Domain::IPV6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
    };
    let s = Socket::new(domain, Type::DGRAM, None)?;
    driver::size_socket_buffers(&s);
    s.bind(&bind.into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// The home's UDP flow socket on its tunnel address, sized like the tunnel's.
fn bind_flow_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    driver::size_socket_buffers(&s);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}
