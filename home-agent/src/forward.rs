//! Forwarding flows that arrive through the tunnel to their targets.
//!
//! Only the home-agent knows targets: every flow names a public port, and
//! the current port map says where that port goes. A retargeted port sends
//! new flows to the new target; flows already open keep theirs.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use skerry::dead_peer::DeadPeer;
use skerry::flow::{
    DatagramHeader, FLOW_HEADER_WAIT, FlowHeader, MAX_DATAGRAM_HEADER_LEN, MAX_EARLY_DATA,
    MAX_FLOW_HEADER_LEN, MAX_UDP_FLOWS,
};
use skerry::portmap::{PortMap, Protocol};
use skerry::udp_batch::{self, RecvBatch};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, trace, warn};

use crate::proxy_protocol;

const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the forwarders share: the live map and what is known of the edge.
#[derive(Debug)]
pub struct Forwarding {
    map: RwLock<Arc<PortMap>>,
    /// The edge's tunnel address: the only source of flows accepted.
    pub edge_tunnel: Ipv4Addr,
    public_addrs: RwLock<Vec<IpAddr>>,
    pub udp_idle: Duration,
    /// Set on every target connection.
    pub dead_peer: DeadPeer,
    open_flows: Mutex<HashMap<(Protocol, u16), usize>>,
    /// Where a UDP flow's reply is read and sent from: one for all flows,
    /// held only between a socket's readiness and the send, so thousands
    /// of flows do not hold 64 KiB each.
    udp_reply: Mutex<Box<[u8]>>,
}

impl Forwarding {
    pub fn new(
        map: PortMap,
        edge_tunnel: Ipv4Addr,
        udp_idle: Duration,
        dead_peer: DeadPeer,
    ) -> Self {
        Forwarding {
            map: RwLock::new(Arc::new(map)),
            edge_tunnel,
            public_addrs: RwLock::new(Vec::new()),
            udp_idle,
            dead_peer,
            open_flows: Mutex::new(HashMap::new()),
            udp_reply: Mutex::new(vec![0u8; MAX_DATAGRAM_HEADER_LEN + MAX_TARGET_DATAGRAM].into()),
        }
    }

    pub fn map(&self) -> Arc<PortMap> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_map(&self, map: PortMap) {
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
    }

    pub fn set_public_addrs(&self, addrs: Vec<IpAddr>) {
        *self.public_addrs.write().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    /// Open flows per public port.
    pub fn open_flows(&self) -> HashMap<(Protocol, u16), usize> {
        self.open_flows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn count(&self, key: (Protocol, u16), delta: isize) {
        let mut m = self.open_flows.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            m.remove(&key);
        }
    }

    /// The public address a client dialed, as well as home can tell.
    fn public_dest(&self, client: SocketAddr, port: u16) -> SocketAddr {
        let v4 = client.ip().to_canonical().is_ipv4();
        self.public_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map(|a| SocketAddr::new(*a, port))
            .unwrap_or_else(|| proxy_protocol::unknown_dest(client, port))
    }
}

/// Counts a flow as open for as long as it lives.
struct FlowGuard<'a> {
    fwd: &'a Forwarding,
    key: (Protocol, u16),
}

impl<'a> FlowGuard<'a> {
    fn new(fwd: &'a Forwarding, key: (Protocol, u16)) -> Self {
        fwd.count(key, 1);
        FlowGuard { fwd, key }
    }
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.fwd.count(self.key, -1);
    }
}

/// Accepts TCP flows from the edge until `shutdown`.
pub async fn tcp_flows(listener: TcpListener, fwd: Arc<Forwarding>, shutdown: CancellationToken) {
    loop {
        let (stream, from) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting a tunnel flow failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if from.ip().to_canonical() != IpAddr::V4(fwd.edge_tunnel) {
            warn!(%from, "flow from an address other than the edge's tunnel address; closed");
            continue;
        }
        let fwd = fwd.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = tcp_flow(&stream, &fwd) => if let Err(e) = r {
                    // The edge passes the reset on to the client (a target
                    // that refused, reset or went away).
                    skerry::relay::reset_on_close(&stream);
                    debug!(error = %e, "flow ended with an error");
                },
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// One flow from the edge: a raw flow carries one connection; a framed one
/// carries connections one after another, each opened by its own header,
/// until the edge closes it. `tunnel` has TCP_NODELAY from the flow listener.
async fn tcp_flow(tunnel: &TcpStream, fwd: &Forwarding) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    loop {
        // The edge may have opened this flow ahead of the connection that
        // will use it (its flow pool), or keep it for the next one, so the
        // header can be minutes away.
        let header = tokio::time::timeout(FLOW_HEADER_WAIT, read_flow_header(tunnel, &mut pending))
            .await
            .map_err(|_| anyhow::anyhow!("no flow header within {FLOW_HEADER_WAIT:?}"))??;
        let Some(header) = header else {
            trace!("unused flow closed by the edge");
            return Ok(());
        };
        let span = debug_span!("flow", port = header.public_port, client = %header.client);
        let after = std::mem::take(&mut pending);
        pending = tcp_connection(tunnel, header, after, fwd)
            .instrument(span)
            .await?;
        if !header.framed {
            return Ok(());
        }
    }
}

/// Reads a flow header, `pending` first; leaves the bytes after it in
/// `pending`. `None` if the edge closed the flow before a header began.
async fn read_flow_header(
    tunnel: &TcpStream,
    pending: &mut Vec<u8>,
) -> anyhow::Result<Option<FlowHeader>> {
    loop {
        if let Some((header, used)) = FlowHeader::decode(pending)? {
            pending.drain(..used);
            return Ok(Some(header));
        }
        if pending.len() >= MAX_FLOW_HEADER_LEN {
            anyhow::bail!("flow header too long");
        }
        tunnel.readable().await?;
        // The header and the client's first bytes, which the edge sends
        // in one segment, are taken in one read: the target then gets the
        // request in one write. Not held across the wait, so an idle flow's
        // task keeps no buffer.
        let mut buf = [0u8; MAX_FLOW_HEADER_LEN + 2 + MAX_EARLY_DATA];
        let n = match tunnel.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 && pending.is_empty() {
            return Ok(None);
        }
        if n == 0 {
            anyhow::bail!("tunnel flow closed inside its header");
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// One connection to its target; `early` holds the tunnel bytes read past
/// its header. Returns those read past its end (framed flows only): the
/// start of the next header. An error closes the flow (with a reset),
/// which tells the edge to reset the client's connection.
async fn tcp_connection(
    tunnel: &TcpStream,
    header: FlowHeader,
    early: Vec<u8>,
    fwd: &Forwarding,
) -> anyhow::Result<Vec<u8>> {
    let map = fwd.map();
    let Some(spec) = map.lookup(Protocol::Tcp, header.public_port) else {
        anyhow::bail!("no target for this port (removed?); flow closed");
    };
    let Some(target) = spec.target_for(header.public_port) else {
        anyhow::bail!("no target for this port; flow closed");
    };
    let proxy = spec.proxy;
    drop(map);
    let _guard = FlowGuard::new(fwd, (Protocol::Tcp, header.public_port));
    let mut out = tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| anyhow::anyhow!("target {target} did not answer"))?
        .map_err(|e| anyhow::anyhow!("target {target}: {e}"))?;
    out.set_nodelay(true)?;
    // A target that is gone for good (a LAN host switched off): its own
    // clients would notice with keepalive, but theirs ends at the edge.
    fwd.dead_peer.watch(&out)?;
    if let Some(v) = proxy {
        let dest = fwd.public_dest(header.client, header.public_port);
        out.write_all(&proxy_protocol::header(
            v,
            Protocol::Tcp,
            header.client,
            dest,
        ))
        .await?;
    }
    if !header.framed {
        if !early.is_empty() {
            out.write_all(&early).await?;
        }
        let (up, down) = skerry::relay::relay_tcp(tunnel, &out).await?;
        trace!(%target, up, down, "flow closed");
        return Ok(Vec::new());
    }
    let ended =
        skerry::relay::relay_framed(&out, tunnel, early, skerry::relay::FlowSide::Home).await?;
    trace!(%target, up = ended.received, down = ended.sent, "connection closed");
    Ok(ended.after_end)
}

struct UdpFlow {
    public_port: u16,
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    proxy: Option<skerry::portmap::ProxyProtocol>,
    last_seen: Arc<AtomicU64>,
}

/// Receive buffers per `recvmmsg` on the flow socket; with GRO each holds
/// a run of up to 64 datagrams from the edge.
const UDP_RX_SLOTS: usize = 4;

/// Carries UDP datagrams between the edge and targets until `shutdown`.
///
/// The flow socket has GRO on: one `recvmmsg` takes what the edge sent in
/// a burst, each datagram behind its own header (a run may mix flows).
pub async fn udp_flows(tunnel: Arc<UdpSocket>, fwd: Arc<Forwarding>, shutdown: CancellationToken) {
    let state = match udp_batch::socket_state(&tunnel) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "the UDP flow socket refused batched I/O; UDP ports are not served");
            return;
        }
    };
    let started = Instant::now();
    let mut flows: HashMap<u32, UdpFlow> = HashMap::new();
    let mut batch = RecvBatch::<UDP_RX_SLOTS>::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1).min(fwd.udp_idle));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                let now = elapsed_ms(started);
                let idle = u64::try_from(fwd.udp_idle.as_millis()).unwrap_or(u64::MAX);
                flows.retain(|_, f| now.saturating_sub(f.last_seen.load(Ordering::Relaxed)) <= idle);
                continue;
            }
            r = batch.recv(&tunnel, &state) => if let Err(e) = r {
                debug!(error = %e, "tunnel UDP receive failed");
                continue;
            },
        }
        for (from, datagram) in batch.datagrams() {
            if from.ip().to_canonical() != IpAddr::V4(fwd.edge_tunnel) {
                trace!(%from, "datagram not from the edge's tunnel address; dropped");
                continue;
            }
            to_target(&fwd, &mut flows, datagram, from, &tunnel, started).await;
        }
    }
}

/// Sends one datagram from the edge on to its target, opening its flow
/// on the first.
async fn to_target(
    fwd: &Arc<Forwarding>,
    flows: &mut HashMap<u32, UdpFlow>,
    datagram: &[u8],
    from: SocketAddr,
    tunnel: &Arc<UdpSocket>,
    started: Instant,
) {
    let (header, payload) = match DatagramHeader::decode(datagram) {
        Ok(d) => d,
        Err(e) => {
            debug!(error = %e, "malformed datagram from the edge; dropped");
            return;
        }
    };
    let stale = flows
        .get(&header.flow_id)
        .is_some_and(|f| f.public_port != header.public_port || f.client != header.client);
    if stale {
        flows.remove(&header.flow_id);
    }
    let flow_count = flows.len();
    let flow = match flows.entry(header.flow_id) {
        Entry::Occupied(o) => o.into_mut(),
        // The edge caps its flows; this bounds home's sockets should its
        // idle time be longer than the edge's, or the edge misbehave.
        Entry::Vacant(_) if flow_count >= 2 * MAX_UDP_FLOWS => {
            debug!(
                flow = header.flow_id,
                "too many UDP flows open; datagram dropped"
            );
            return;
        }
        Entry::Vacant(v) => match open_udp_flow(fwd, header, from, tunnel.clone(), started).await {
            Some(f) => v.insert(f),
            None => return,
        },
    };
    flow.last_seen.store(elapsed_ms(started), Ordering::Relaxed);
    let sent = match flow.proxy {
        Some(v) => {
            let dest = fwd.public_dest(flow.client, flow.public_port);
            let mut d = proxy_protocol::header(v, Protocol::Udp, flow.client, dest);
            d.extend_from_slice(payload);
            flow.socket.send(&d).await
        }
        None => flow.socket.send(payload).await,
    };
    if let Err(e) = sent {
        trace!(error = %e, "datagram to target not sent");
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn open_udp_flow(
    fwd: &Arc<Forwarding>,
    header: DatagramHeader,
    edge: SocketAddr,
    tunnel: Arc<UdpSocket>,
    started: Instant,
) -> Option<UdpFlow> {
    let map = fwd.map();
    let spec = map.lookup(Protocol::Udp, header.public_port)?;
    let target = spec.target_for(header.public_port)?;
    let proxy = spec.proxy;
    drop(map);
    let bind: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot open a UDP socket toward a target");
            return None;
        }
    };
    // A target's burst of replies waits here while the tunnel catches up.
    skerry::tunnel::driver::size_socket_buffers(&socket);
    if let Err(e) = socket.connect(target).await {
        debug!(%target, error = %e, "cannot reach UDP target");
        return None;
    }
    let socket = Arc::new(socket);
    let last_seen = Arc::new(AtomicU64::new(elapsed_ms(started)));
    let flow = UdpFlow {
        public_port: header.public_port,
        client: header.client,
        socket: socket.clone(),
        proxy,
        last_seen: last_seen.clone(),
    };
    let fwd = fwd.clone();
    let span = debug_span!("udp_flow", port = header.public_port, client = %header.client, flow = header.flow_id);
    tokio::spawn(
        async move {
            let _guard = FlowGuard::new(&fwd, (Protocol::Udp, header.public_port));
            let mut h = Vec::with_capacity(MAX_DATAGRAM_HEADER_LEN);
            let idle = fwd.udp_idle;
            loop {
                // Neither readiness nor the `try_` calls count against
                // tokio's budget: a target that never stops sending must
                // not hold the agent's one thread (the tunnel's driver, the
                // relays, the keepalives).
                tokio::task::consume_budget().await;
                let now = elapsed_ms(started);
                let quiet =
                    Duration::from_millis(now.saturating_sub(last_seen.load(Ordering::Relaxed)));
                if quiet > idle {
                    break;
                }
                let wait = idle - quiet + Duration::from_millis(10);
                match tokio::time::timeout(wait, socket.readable()).await {
                    Err(_) => continue,
                    Ok(Err(e)) => {
                        trace!(error = %e, "target socket");
                        continue;
                    }
                    Ok(Ok(())) => {}
                }
                let unsent = match reply_once(&fwd, &socket, &tunnel, edge, header, &mut h) {
                    Ok(unsent) => unsent,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        // ICMP unreachable from a target that is down: keep
                        // the flow, as a client may retry.
                        trace!(error = %e, "target receive");
                        continue;
                    }
                };
                last_seen.store(elapsed_ms(started), Ordering::Relaxed);
                if let Some(datagram) = unsent
                    && let Err(e) = tunnel.send_to(&datagram, edge).await
                {
                    trace!(error = %e, "reply to edge not sent");
                }
            }
            trace!("UDP flow expired");
        }
        .instrument(span),
    );
    Some(flow)
}

/// Room for a target's reply: more than any UDP payload (an IPv6 target's
/// may exceed what the IPv4 tunnel carries), so one too large is refused
/// whole at the send to the edge instead of cut short here.
const MAX_TARGET_DATAGRAM: usize = 65_536;

/// Reads one reply from a flow's target and sends it to the edge behind
/// the flow's header, in the shared reply buffer. A send that would wait
/// returns the datagram, to be sent outside the buffer (a copy per flow
/// only while the tunnel socket is backed up, which the TUN queue makes
/// rare: it drops rather than blocks).
fn reply_once(
    fwd: &Forwarding,
    target: &UdpSocket,
    tunnel: &UdpSocket,
    edge: SocketAddr,
    header: DatagramHeader,
    h: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = fwd.udp_reply.lock().unwrap_or_else(|p| p.into_inner());
    let n = target.try_recv(&mut buf[MAX_DATAGRAM_HEADER_LEN..])?;
    h.clear();
    header.encode(h);
    let start = MAX_DATAGRAM_HEADER_LEN - h.len();
    buf[start..MAX_DATAGRAM_HEADER_LEN].copy_from_slice(h);
    let datagram = &buf[start..MAX_DATAGRAM_HEADER_LEN + n];
    match tunnel.try_send_to(datagram, edge) {
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Some(datagram.to_vec())),
        Err(e) => {
            trace!(error = %e, "reply to edge not sent");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skerry::flow::{END_OF_STREAM, FINISHED, frame_header};
    use tokio::io::AsyncReadExt;

    /// A UDP target that sends faster than home forwards must not hold the
    /// agent's one thread: its flow yields to the other tasks while its
    /// socket is still full.
    #[tokio::test] // one thread, as the agent runs
    async fn a_udp_target_that_never_pauses_lets_other_tasks_run() {
        const QUEUED: usize = 1000;
        let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fwd = forwarding(&format!("udp/9000={}", target.local_addr().unwrap()));
        let tunnel = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let edge = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        edge.set_nonblocking(true).unwrap();
        // Room for every reply, so none is lost before it is counted.
        skerry::tunnel::driver::size_socket_buffers(&edge);
        let shutdown = CancellationToken::new();
        tokio::spawn(udp_flows(tunnel.clone(), fwd, shutdown.clone()));

        // The edge's first datagram opens the flow; the target learns its socket.
        let mut first = Vec::new();
        DatagramHeader {
            flow_id: 1,
            public_port: 9000,
            client: SocketAddr::from(([198, 18, 0, 1], 5000)),
        }
        .encode(&mut first);
        edge.send_to(&first, tunnel.local_addr().unwrap()).unwrap();
        let flow = tokio::task::spawn_blocking(move || {
            target
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let (_, flow) = target
                .recv_from(&mut [0u8; 16])
                .expect("the flow's first datagram");
            (target, flow)
        });
        let (target, flow) = flow.await.unwrap();

        // Replies queue up while this task holds the thread; the flow task
        // then forwards them, and this one counts what has reached the edge
        // each time it runs.
        for _ in 0..QUEUED {
            target.send_to(b"reply", flow).unwrap();
        }
        let mut forwarded = 0;
        let mut seen_between = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while forwarded < QUEUED {
            assert!(
                Instant::now() < deadline,
                "only {forwarded} of {QUEUED} replies reached the edge"
            );
            tokio::task::yield_now().await;
            let mut buf = [0u8; 64];
            while edge.recv_from(&mut buf).is_ok() {
                forwarded += 1;
            }
            if 0 < forwarded && forwarded < QUEUED {
                seen_between.push(forwarded);
            }
        }
        shutdown.cancel();
        assert!(
            !seen_between.is_empty(),
            "the flow forwarded all {QUEUED} queued replies before any other task ran"
        );
    }

    /// A target that echoes what it got once the client has finished.
    async fn echo_target() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    if s.read_to_end(&mut got).await.is_ok() {
                        let _ = s.write_all(&got).await;
                    }
                });
            }
        });
        addr
    }

    /// Home's forwarding of one port, the edge on loopback.
    fn forwarding(spec: &str) -> Arc<Forwarding> {
        let (map, refused) = PortMap::from_specs(1, vec![spec.parse().unwrap()]);
        assert!(refused.is_empty());
        Arc::new(Forwarding::new(
            map,
            Ipv4Addr::LOCALHOST,
            Duration::from_secs(30),
            DeadPeer::default(),
        ))
    }

    /// Home's forwarding to `target` on public port 9000, and a flow to it
    /// as the edge's end and home's accepted end.
    async fn setup(target: SocketAddr) -> (Arc<Forwarding>, TcpStream, TcpStream) {
        let fwd = forwarding(&format!("tcp/9000={target}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let edge = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (home, _) = listener.accept().await.unwrap();
        (fwd, edge, home)
    }

    fn header(framed: bool, client_port: u16) -> Vec<u8> {
        let mut out = Vec::new();
        FlowHeader {
            framed,
            protocol: Protocol::Tcp,
            public_port: 9000,
            client: SocketAddr::from(([198, 18, 0, 1], client_port)),
        }
        .encode(&mut out);
        out
    }

    fn framed_request(client_port: u16, body: &[u8]) -> Vec<u8> {
        let mut out = header(true, client_port);
        out.extend_from_slice(&frame_header(body.len()).unwrap());
        out.extend_from_slice(body);
        out.extend_from_slice(&END_OF_STREAM);
        out
    }

    /// Two connections written at once, the second's header right behind
    /// the first's end: home serves them one after the other on the same
    /// flow, each answer ended and FINISHED, and stops when the edge closes.
    #[tokio::test]
    async fn a_framed_flow_serves_connections_in_turn() {
        let (fwd, mut edge, home) = setup(echo_target().await).await;
        let served = tokio::spawn({
            let fwd = fwd.clone();
            async move { tcp_flow(&home, &fwd).await }
        });
        let mut wire = framed_request(1, b"first");
        wire.extend_from_slice(&framed_request(2, b"second request"));
        edge.write_all(&wire).await.unwrap();
        for body in [&b"first"[..], b"second request"] {
            let mut expected = frame_header(body.len()).unwrap().to_vec();
            expected.extend_from_slice(body);
            expected.extend_from_slice(&END_OF_STREAM);
            expected.extend_from_slice(&FINISHED);
            let mut got = vec![0u8; expected.len()];
            tokio::time::timeout(Duration::from_secs(5), edge.read_exact(&mut got))
                .await
                .expect("home answered")
                .unwrap();
            assert_eq!(got, expected);
        }
        edge.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("home let go of the flow the edge closed")
            .unwrap()
            .expect("a clean end");
        assert!(fwd.open_flows().is_empty(), "no connection counted as open");
    }

    /// A version 1 flow (an edge of the release before framed flows):
    /// raw bytes, TCP's end of stream, one connection.
    #[tokio::test]
    async fn a_raw_flow_carries_one_connection() {
        let (fwd, mut edge, home) = setup(echo_target().await).await;
        let served = tokio::spawn(async move { tcp_flow(&home, &fwd).await });
        let mut wire = header(false, 1);
        wire.extend_from_slice(b"raw bytes");
        edge.write_all(&wire).await.unwrap();
        edge.shutdown().await.unwrap();
        let mut got = Vec::new();
        edge.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"raw bytes");
        served.await.unwrap().expect("a clean end");
    }

    /// A connection whose target is gone closes the flow: the edge drops
    /// the client's connection, and the flow is not reused.
    #[tokio::test]
    async fn an_unreachable_target_closes_the_flow() {
        // Bound but not listening, for the whole test: connects are refused
        // and no other test can take the port.
        let holder =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        holder
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        let gone = holder.local_addr().unwrap().as_socket().unwrap();
        let (fwd, mut edge, home) = setup(gone).await;
        let served = tokio::spawn(async move { tcp_flow(&home, &fwd).await });
        edge.write_all(&framed_request(1, b"hello")).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), edge.read_to_end(&mut got))
            .await
            .expect("home closed the flow");
        assert!(read.is_ok() && got.is_empty(), "{read:?} {got:?}");
        assert!(served.await.unwrap().is_err());
    }
}
