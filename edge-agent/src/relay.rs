//! Moving public flows into the tunnel.
//!
//! TCP: each accepted connection becomes a TCP connection to the home-agent
//! through the tunnel, opened with a flow header; bytes then go both ways,
//! half-closes included. UDP: each datagram is sent to the home-agent with
//! a datagram header; replies come back by flow id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use skerry::flow::{DatagramHeader, FlowHeader, MAX_DATAGRAM_HEADER_LEN};
use skerry::portmap::Protocol;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, trace, warn};

use crate::ports::PortShared;
use crate::udp_flows::FlowTable;

/// How long the edge waits for the home-agent to take a TCP flow.
const HOME_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UDP payload read from a public socket.
const MAX_UDP_PAYLOAD: usize = 65507;

/// What every relay needs: where home is, and the UDP flow state.
#[derive(Debug)]
pub struct RelayContext {
    /// The home-agent's TCP flow listener, through the tunnel.
    pub home_tcp: SocketAddr,
    /// The home-agent's UDP flow socket, through the tunnel.
    pub home_udp: SocketAddr,
    /// The edge's UDP socket on its tunnel address.
    pub tunnel_udp: Arc<UdpSocket>,
    pub udp_idle: Duration,
    udp_flows: Mutex<FlowTable>,
    /// Public UDP sockets by port, and whether each is an IPv6 (dual-stack) socket.
    udp_sockets: RwLock<HashMap<u16, (Arc<UdpSocket>, bool)>>,
}

impl RelayContext {
    pub fn new(
        home_tcp: SocketAddr,
        home_udp: SocketAddr,
        tunnel_udp: Arc<UdpSocket>,
        udp_idle: Duration,
    ) -> Self {
        RelayContext {
            home_tcp,
            home_udp,
            tunnel_udp,
            udp_idle,
            udp_flows: Mutex::new(FlowTable::new()),
            udp_sockets: RwLock::new(HashMap::new()),
        }
    }

    fn flows(&self) -> std::sync::MutexGuard<'_, FlowTable> {
        self.udp_flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn udp_flow_count(&self, port: u16) -> usize {
        self.flows().count(port)
    }

    pub(crate) fn add_udp_socket(&self, port: u16, socket: Arc<UdpSocket>) {
        self.udp_sockets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                port,
                (
                    socket.clone(),
                    socket.local_addr().is_ok_and(|a| a.is_ipv6()),
                ),
            );
    }

    pub(crate) fn remove_udp_socket(&self, port: u16) {
        self.udp_sockets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&port);
        self.flows().remove_port(port);
    }

    fn udp_socket(&self, port: u16) -> Option<(Arc<UdpSocket>, bool)> {
        self.udp_sockets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            .cloned()
    }
}

/// Accepts public connections on one port until `stop`.
pub async fn tcp_accept_loop(
    listener: TcpListener,
    port: Arc<PortShared>,
    ctx: Arc<RelayContext>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(port = port.port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let policy = port.policy();
        if !policy.admits(client.ip()) {
            debug!(port = port.port, %client, "refused: source not in allow list");
            continue;
        }
        let active = port.active.fetch_add(1, Ordering::AcqRel);
        if let Some(max) = policy.max_conns
            && u64::try_from(active).unwrap_or(u64::MAX) >= u64::from(max)
        {
            port.active.fetch_sub(1, Ordering::AcqRel);
            debug!(port = port.port, %client, max, "refused: port at max-conns");
            continue;
        }
        let span = info_span!("flow", port = port.port, %client);
        let port = port.clone();
        let ctx = ctx.clone();
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    r = tcp_flow(stream, client, port.port, &ctx) => r,
                    () = port.flows.cancelled() => Ok(()),
                };
                port.active.fetch_sub(1, Ordering::AcqRel);
                if let Err(e) = result {
                    debug!(error = %e, "flow ended with an error");
                }
            }
            .instrument(span),
        );
    }
}

async fn tcp_flow(
    mut client_stream: TcpStream,
    client: SocketAddr,
    public_port: u16,
    ctx: &RelayContext,
) -> std::io::Result<()> {
    client_stream.set_nodelay(true)?;
    let mut home = tokio::time::timeout(HOME_CONNECT_TIMEOUT, TcpStream::connect(ctx.home_tcp))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "home-agent did not take the flow",
            )
        })??;
    home.set_nodelay(true)?;
    let mut header = Vec::with_capacity(skerry::flow::MAX_FLOW_HEADER_LEN);
    FlowHeader {
        protocol: Protocol::Tcp,
        public_port,
        client,
    }
    .encode(&mut header);
    home.write_all(&header).await?;
    let (up, down) = skerry::relay::relay_tcp(&mut client_stream, &mut home).await?;
    trace!(up, down, "flow closed");
    Ok(())
}

/// Reads public datagrams on one port and sends them home.
pub async fn udp_receive_loop(
    socket: Arc<UdpSocket>,
    port: Arc<PortShared>,
    ctx: Arc<RelayContext>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM_HEADER_LEN + MAX_UDP_PAYLOAD];
    let mut header = Vec::with_capacity(MAX_DATAGRAM_HEADER_LEN);
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => break,
            r = socket.recv_from(&mut buf[MAX_DATAGRAM_HEADER_LEN..]) => r,
        };
        let (n, client) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!(port = port.port, error = %e, "public UDP receive failed");
                continue;
            }
        };
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let policy = port.policy();
        if !policy.admits(client.ip()) {
            trace!(port = port.port, %client, "datagram refused: source not in allow list");
            continue;
        }
        let flow_id = match ctx
            .flows()
            .inbound(port.port, client, policy.max_conns, Instant::now())
        {
            Ok(id) => id,
            Err(_) => {
                trace!(port = port.port, %client, "datagram refused: port at max-conns");
                continue;
            }
        };
        // Write the header just before the payload, avoiding a copy.
        header.clear();
        DatagramHeader {
            flow_id,
            public_port: port.port,
            client,
        }
        .encode(&mut header);
        let start = MAX_DATAGRAM_HEADER_LEN - header.len();
        buf[start..MAX_DATAGRAM_HEADER_LEN].copy_from_slice(&header);
        if let Err(e) = ctx
            .tunnel_udp
            .send_to(&buf[start..MAX_DATAGRAM_HEADER_LEN + n], ctx.home_udp)
            .await
        {
            trace!(error = %e, "datagram to home not sent");
        }
    }
}

/// Receives replies from home and sends them to their clients; expires
/// idle flows.
pub async fn udp_reply_loop(ctx: Arc<RelayContext>, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 65536];
    let mut sweep = tokio::time::interval(Duration::from_secs(1).min(ctx.udp_idle));
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                let n = ctx.flows().expire(Instant::now(), ctx.udp_idle);
                if n > 0 { trace!(expired = n, "UDP flows expired"); }
                continue;
            }
            r = ctx.tunnel_udp.recv_from(&mut buf) => r,
        };
        let (n, from) = match received {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "tunnel UDP receive failed");
                continue;
            }
        };
        if from.ip() != ctx.home_udp.ip() {
            trace!(%from, "datagram on the tunnel socket not from home; dropped");
            continue;
        }
        let (header, payload) = match DatagramHeader::decode(&buf[..n]) {
            Ok(d) => d,
            Err(e) => {
                debug!(%from, error = %e, "malformed datagram from home; dropped");
                continue;
            }
        };
        let Some(flow) = ctx.flows().outbound(header.flow_id, Instant::now()) else {
            trace!(
                flow = header.flow_id,
                "reply for an unknown or expired flow; dropped"
            );
            continue;
        };
        let Some((socket, v6)) = ctx.udp_socket(flow.public_port) else {
            continue;
        };
        // A dual-stack socket reaches IPv4 clients through mapped addresses.
        let to = match flow.client {
            SocketAddr::V4(a) if v6 => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            other => other,
        };
        if let Err(e) = socket.send_to(payload, to).await {
            trace!(client = %flow.client, error = %e, "reply not sent");
        }
    }
}
