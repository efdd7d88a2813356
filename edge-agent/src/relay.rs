//! Moving public flows into the tunnel.
//!
//! TCP: each accepted connection takes a TCP flow to the home-agent through
//! the tunnel (see [`crate::flow_pool`]) and sends a flow header; bytes then
//! go both ways, half-closes included. A framed flow (home reads them)
//! goes back to the pool when its connection has ended cleanly and home
//! has said it finished it. UDP: each datagram is sent to the home-agent
//! with a datagram header; replies come back by flow id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use quinn_udp::UdpSocketState;
use skerry::dead_peer::DeadPeer;
use skerry::flow::{
    DatagramHeader, END_OF_STREAM, FlowHeader, MAX_DATAGRAM_HEADER_LEN, MAX_EARLY_DATA,
    frame_header,
};
use skerry::log_budget::LogBudget;
use skerry::portmap::Protocol;
use skerry::relay::FlowSide;
use skerry::udp_batch::{self, GSO_MAX_BYTES, RecvBatch};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, trace, warn};

use crate::flow_pool::{Flow, FlowPool};
use crate::ports::PortShared;
use crate::udp_flows::{FlowTable, MAX_FLOWS, Refused};

/// Largest UDP payload read from a public socket.
const MAX_UDP_PAYLOAD: usize = 65507;

/// Failed accepts logged in full per minute, over all ports; the rest counted.
const ACCEPT_FAILURES_LOGGED_PER_MINUTE: u32 = 5;

/// What every relay needs: where home is, and the UDP flow state.
#[derive(Debug)]
pub struct RelayContext {
    /// TCP flows to the home-agent's flow listener, through the tunnel.
    pub pool: Arc<FlowPool>,
    /// The home-agent's UDP flow socket, through the tunnel.
    pub home_udp: SocketAddr,
    /// The edge's UDP socket on its tunnel address.
    pub tunnel_udp: Arc<UdpSocket>,
    /// Batched I/O on `tunnel_udp`: a run of a client's datagrams goes home
    /// in one GSO send.
    tunnel_udp_state: UdpSocketState,
    pub udp_idle: Duration,
    /// Set on every public listener (its connections inherit it) and on
    /// every in-tunnel flow.
    pub dead_peer: DeadPeer,
    udp_flows: Mutex<FlowTable>,
    /// Public UDP sockets by port, and whether each is an IPv6 (dual-stack) socket.
    udp_sockets: RwLock<HashMap<u16, (Arc<UdpSocket>, bool)>>,
    /// Failed accepts on any public port: running out of descriptors under
    /// a flood is the whole edge's news, and worth a few lines a minute.
    accept_failures: Mutex<LogBudget>,
    /// New UDP clients refused because the flow table is full: a flood,
    /// most likely, and worth a line a minute.
    udp_table_full: Mutex<LogBudget>,
    /// The public UDP ports' receive buffers, which they take turns with.
    public_udp_rx: tokio::sync::Mutex<PublicUdpRx>,
    /// Cancelled when the edge stops: every port's flows are cut, removed
    /// ports' draining ones too (each port's token is a child of this one).
    pub(crate) stopping: CancellationToken,
    /// TCP flows that still hold their client's connection: a stopping edge
    /// waits for them to have reset it, or its runtime would drop them and
    /// the kernel would close the connections with a FIN, passing a cut-off
    /// answer off as whole.
    clients_held: TaskTracker,
}

impl RelayContext {
    pub fn new(
        home_tcp: SocketAddr,
        home_udp: SocketAddr,
        tunnel_udp: Arc<UdpSocket>,
        udp_idle: Duration,
        dead_peer: DeadPeer,
        device: Option<String>,
    ) -> std::io::Result<Self> {
        let tunnel_udp_state = udp_batch::socket_state(&tunnel_udp)?;
        Ok(RelayContext {
            pool: Arc::new(FlowPool::new(home_tcp, dead_peer, device)),
            home_udp,
            tunnel_udp,
            tunnel_udp_state,
            udp_idle,
            dead_peer,
            udp_flows: Mutex::new(FlowTable::new()),
            udp_sockets: RwLock::new(HashMap::new()),
            accept_failures: Mutex::new(LogBudget::new(
                Duration::from_secs(60),
                ACCEPT_FAILURES_LOGGED_PER_MINUTE,
            )),
            udp_table_full: Mutex::new(LogBudget::new(Duration::from_secs(60), 1)),
            public_udp_rx: tokio::sync::Mutex::new(PublicUdpRx::new()),
            stopping: CancellationToken::new(),
            clients_held: TaskTracker::new(),
        })
    }

    /// Cuts every TCP flow (each resets its client) and returns once all
    /// have let go of their client connections, or after `at_most`.
    pub async fn cut_all_flows(&self, at_most: Duration) {
        self.stopping.cancel();
        self.clients_held.close();
        if tokio::time::timeout(at_most, self.clients_held.wait())
            .await
            .is_err()
        {
            warn!(
                left = self.clients_held.len(),
                "some public connections were not reset in time; they close with the edge-agent"
            );
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
            // Stop first: a stopping edge waits only for the flows already
            // accepted (see `RelayContext::cut_all_flows`).
            biased;
            () = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                let admitted = ctx
                    .accept_failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(Instant::now());
                match admitted {
                    Some(0) => warn!(port = port.port, error = %e, "accept failed"),
                    Some(held_back) => warn!(
                        port = port.port,
                        error = %e,
                        held_back,
                        "accept failed; more did on any port since the last one logged (RUST_LOG=debug logs each)"
                    ),
                    None => debug!(port = port.port, error = %e, "accept failed"),
                }
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
        // Flows log at debug level only: no span work per connection otherwise.
        let span = debug_span!("flow", port = port.port, %client);
        let port = port.clone();
        let ctx = ctx.clone();
        let holds_client = ctx.clients_held.token();
        tokio::spawn(
            async move {
                let result = tcp_flow(&stream, client, &port, &ctx).await;
                port.active.fetch_sub(1, Ordering::AcqRel);
                // No flow to home, home gave up on the connection (its
                // target refused, reset or went away), its port is gone or
                // the edge is stopping: the client is told with a reset, as
                // a direct connection would tell it.
                if result.is_err() {
                    skerry::relay::reset_on_close(&stream);
                }
                drop(stream);
                drop(holds_client);
                match result {
                    Ok(Some(ended)) => ended.reuse(&ctx.pool).await,
                    Ok(None) => {}
                    Err(e) => debug!(error = %e, "flow ended with an error"),
                }
            }
            .instrument(span),
        );
    }
}

/// How long home may take to finish a connection whose both directions
/// have ended at the edge (a target still reading the last upload) before
/// its flow is closed instead of reused.
const FINISH_WAIT: Duration = Duration::from_secs(30);

/// A framed flow whose connection has ended at the edge; home's
/// [`FINISHED`](skerry::flow::FINISHED) is still to come (or already in
/// `after_end`).
struct EndedFlow {
    flow: Flow,
    after_end: Vec<u8>,
    open_timeout_lifted: bool,
}

impl EndedFlow {
    /// Back to the pool once home has finished the connection, else closed.
    async fn reuse(self, pool: &FlowPool) {
        let finished = tokio::time::timeout(
            FINISH_WAIT,
            skerry::relay::await_finished(&self.flow.stream, &self.after_end),
        )
        .await;
        match finished {
            Ok(Ok(())) => pool.give_back(self.flow, self.open_timeout_lifted),
            Ok(Err(e)) => debug!(error = %e, "flow closed, not reused"),
            Err(_) => {
                debug!("home did not finish a connection within {FINISH_WAIT:?}; flow closed")
            }
        }
    }
}

/// Relays one public connection until it ends or its port's flows are cut;
/// a framed flow is returned once the connection has ended, to be reused.
async fn tcp_flow(
    client_stream: &TcpStream,
    client: SocketAddr,
    port: &PortShared,
    ctx: &RelayContext,
) -> std::io::Result<Option<EndedFlow>> {
    let cut = port.flows.cancelled();
    tokio::pin!(cut);
    let cut_error = || {
        std::io::Error::other(if ctx.stopping.is_cancelled() {
            "cut: the edge-agent is stopping"
        } else {
            "cut: the port was removed and its drain grace is over"
        })
    };
    let mut flow = tokio::select! {
        r = ctx.pool.flow() => r?,
        () = &mut cut => return Err(cut_error()),
    };
    let carried = tokio::select! {
        r = carry(client_stream, client, port.port, &mut flow) => r?,
        () = &mut cut => {
            // Home resets the target on this, also when the client had
            // half-closed (a clean end would not tell it: its relay only
            // writes to the flow by then).
            skerry::relay::reset_on_close(&flow.stream);
            return Err(cut_error());
        }
    };
    Ok(carried.map(|(after_end, open_timeout_lifted)| EndedFlow {
        flow,
        after_end,
        open_timeout_lifted,
    }))
}

/// The flow header, then the relay: for a framed flow, what came after
/// home's end and whether the open timeout was lifted.
async fn carry(
    client_stream: &TcpStream,
    client: SocketAddr,
    public_port: u16,
    flow: &mut Flow,
) -> std::io::Result<Option<(Vec<u8>, bool)>> {
    // TCP_NODELAY comes from the listener (see `ports::bind_public_tcp`).
    let mut header = Vec::with_capacity(skerry::flow::MAX_FLOW_HEADER_LEN + 2 + MAX_EARLY_DATA);
    FlowHeader {
        framed: flow.framed,
        protocol: Protocol::Tcp,
        public_port,
        client,
    }
    .encode(&mut header);
    // What the client has sent (its request, usually: it follows the
    // handshake's last ACK by microseconds, before this task runs) goes in
    // the same segment as the header; framed, behind its length.
    let prefix = if flow.framed { END_OF_STREAM.len() } else { 0 };
    let at = header.len() + prefix;
    header.resize(at + MAX_EARLY_DATA, 0);
    let n = match client_stream.try_read(&mut header[at..]) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if n == 0 {
        header.truncate(at - prefix);
    } else {
        if flow.framed {
            // n ≤ MAX_EARLY_DATA, well within a frame.
            let p = frame_header(n).ok_or_else(|| std::io::Error::other("early data too long"))?;
            header[at - prefix..at].copy_from_slice(&p);
        }
        header.truncate(at + n);
    }
    flow.stream.write_all(&header).await?;
    let home = &flow.stream;
    if !flow.framed {
        let (moved, _) = crate::flow_pool::confirm_after_open_timeout(
            home,
            skerry::relay::relay_tcp(client_stream, home),
        )
        .await;
        let (up, down) = moved?;
        trace!(up, down, "flow closed");
        return Ok(None);
    }
    let (ended, lifted) = crate::flow_pool::confirm_after_open_timeout(
        home,
        skerry::relay::relay_framed(client_stream, home, Vec::new(), FlowSide::Edge),
    )
    .await;
    let ended = ended?;
    trace!(up = ended.sent, down = ended.received, "connection closed");
    Ok(Some((ended.after_end, lifted)))
}

/// Receive buffers per `recvmmsg` on a public UDP socket; with GRO each
/// holds a run of up to 64 datagrams from one client. Only the bytes
/// received are ever touched, so idle slots cost no memory.
const UDP_RX_SLOTS: usize = 16;
/// The same for replies from home on the tunnel socket.
const UDP_REPLY_SLOTS: usize = 4;
/// Header and payload of one datagram to home must fit the tunnel's MTU
/// (less IPv4 and UDP headers) for GSO; larger ones go one by one and are
/// fragmented inside the tunnel.
const GSO_SEGMENT_MAX: usize = skerry::tunnel::device::DEFAULT_MTU as usize - 28;

/// What a public UDP port needs to move what it received home: ~1.1 MiB,
/// as far as datagrams have touched it. One for all ports, which take
/// turns: the edge runs on one thread and every port sends on the same
/// tunnel socket, so a buffer per port would gain nothing and would let a
/// flood of large datagrams over a port range (RTP's 10,000) touch ~1 MiB
/// per port.
#[derive(Debug)]
struct PublicUdpRx {
    batch: RecvBatch<UDP_RX_SLOTS>,
    header: Vec<u8>,
    /// A run of datagrams, each behind its header, for one GSO send home.
    out: Vec<u8>,
}

impl PublicUdpRx {
    fn new() -> Self {
        PublicUdpRx {
            batch: RecvBatch::new(),
            header: Vec::with_capacity(MAX_DATAGRAM_HEADER_LEN),
            out: Vec::with_capacity(GSO_MAX_BYTES + MAX_UDP_PAYLOAD),
        }
    }
}

/// Reads public datagrams on one port and sends them home: a `recvmmsg`
/// gathers what is waiting (GRO hands over a client's run of datagrams in
/// one buffer), and each run goes home in one GSO send, every datagram
/// behind its own header. The port waits for its socket without the
/// receive buffers, and holds them until what it took has gone home.
pub async fn udp_receive_loop(
    socket: Arc<UdpSocket>,
    port: Arc<PortShared>,
    ctx: Arc<RelayContext>,
    stop: CancellationToken,
) {
    let state = match udp_batch::socket_state(&socket) {
        Ok(s) => s,
        Err(e) => {
            warn!(port = port.port, error = %e, "public UDP socket refused batched I/O; port not served");
            return;
        }
    };
    loop {
        // A socket that never drains (a flood the allow list refuses) must
        // not hold the agent's one thread: see `RecvBatch::recv`.
        tokio::task::consume_budget().await;
        let ready = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = socket.readable() => r,
        };
        if let Err(e) = ready {
            debug!(port = port.port, error = %e, "public UDP socket failed");
            continue;
        }
        let mut rx = ctx.public_udp_rx.lock().await;
        // Closed while it waited its turn: its socket is no longer the port's.
        if stop.is_cancelled() {
            break;
        }
        match rx.batch.try_recv(&socket, &state) {
            Ok(Some(_)) => send_received_home(&mut rx, &port, &ctx).await,
            Ok(None) => {}
            Err(e) => debug!(port = port.port, error = %e, "public UDP receive failed"),
        }
    }
}

/// Sends home what the last receive on `port` took, in GSO runs.
async fn send_received_home(rx: &mut PublicUdpRx, port: &PortShared, ctx: &RelayContext) {
    let PublicUdpRx { batch, header, out } = rx;
    out.clear();
    let mut run = Run::default();
    for i in 0..batch.len() {
        let Some((from, stride, bytes)) = batch.buffer(i) else {
            continue;
        };
        let client = SocketAddr::new(from.ip().to_canonical(), from.port());
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
            Err(Refused::PortFull) => {
                trace!(port = port.port, %client, "datagram refused: port at max-conns");
                continue;
            }
            Err(Refused::TableFull) => {
                table_full(ctx, port.port);
                continue;
            }
        };
        header.clear();
        DatagramHeader {
            flow_id,
            public_port: port.port,
            client,
        }
        .encode(header);
        let segment = header.len() + stride;
        // A run continues across receive buffers while the datagrams
        // are the same client's and the same size: GSO cuts a run
        // into equal segments, only the last may be shorter.
        let continues = run.flow == Some(flow_id) && run.segment == segment && !run.closed;
        if !continues {
            send_home(ctx, out, run.segment).await;
            out.clear();
            run = Run {
                flow: Some(flow_id),
                segment,
                closed: false,
            };
        }
        for payload in udp_batch::split(bytes, stride) {
            // One segment per send when GSO cannot carry it.
            if run.closed
                || segment > GSO_SEGMENT_MAX
                || out.len() + header.len() + payload.len() > GSO_MAX_BYTES
                || out.len() / segment >= ctx.tunnel_udp_state.max_gso_segments()
            {
                send_home(ctx, out, segment).await;
                out.clear();
                run.closed = false;
            }
            out.extend_from_slice(header);
            out.extend_from_slice(payload);
            run.closed = payload.len() < stride;
        }
    }
    send_home(ctx, out, run.segment).await;
    out.clear();
}

/// The datagrams gathered for one GSO send home.
#[derive(Default)]
struct Run {
    flow: Option<u32>,
    /// Header and payload of each datagram.
    segment: usize,
    /// The last datagram was short: nothing may follow it in this run.
    closed: bool,
}

/// A datagram from a new client, refused: [`MAX_FLOWS`] are open and home
/// has answered each.
fn table_full(ctx: &RelayContext, port: u16) {
    let admitted = ctx
        .udp_table_full
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(Instant::now());
    match admitted {
        Some(held_back) => warn!(
            port,
            held_back,
            max = MAX_FLOWS,
            "UDP datagrams from new clients refused: the edge's UDP flow table is full of flows home answers; open flows go on, new ones start as old ones go idle"
        ),
        None => trace!(port, "datagram refused: UDP flow table full"),
    }
}

/// Sends a run of datagrams to the home-agent's flow socket.
async fn send_home(ctx: &RelayContext, run: &[u8], segment: usize) {
    let sent = udp_batch::send_run(
        &ctx.tunnel_udp,
        &ctx.tunnel_udp_state,
        ctx.home_udp,
        run,
        segment,
    )
    .await;
    if let Err(e) = sent {
        trace!(error = %e, "datagrams to home not sent");
    }
}

/// Receives replies from home and sends them to their clients; expires
/// idle flows. The tunnel socket has GRO on (see [`RelayContext::new`]):
/// a buffer may hold a run of datagrams, each behind its own header.
pub async fn udp_reply_loop(ctx: Arc<RelayContext>, shutdown: CancellationToken) {
    let mut batch = RecvBatch::<UDP_REPLY_SLOTS>::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1).min(ctx.udp_idle));
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = sweep.tick() => {
                let n = ctx.flows().expire(Instant::now(), ctx.udp_idle);
                if n > 0 { trace!(expired = n, "UDP flows expired"); }
                continue;
            }
            r = batch.recv(&ctx.tunnel_udp, &ctx.tunnel_udp_state) => r,
        };
        if let Err(e) = received {
            debug!(error = %e, "tunnel UDP receive failed");
            continue;
        }
        for (from, datagram) in batch.datagrams() {
            if from.ip().to_canonical() != ctx.home_udp.ip() {
                trace!(%from, "datagram on the tunnel socket not from home; dropped");
                continue;
            }
            reply_to_client(&ctx, datagram, from).await;
        }
    }
}

async fn reply_to_client(ctx: &RelayContext, datagram: &[u8], from: SocketAddr) {
    let (header, payload) = match DatagramHeader::decode(datagram) {
        Ok(d) => d,
        Err(e) => {
            debug!(%from, error = %e, "malformed datagram from home; dropped");
            return;
        }
    };
    let Some(flow) = ctx.flows().outbound(header.flow_id, Instant::now()) else {
        trace!(
            flow = header.flow_id,
            "reply for an unknown or expired flow; dropped"
        );
        return;
    };
    let Some((socket, v6)) = ctx.udp_socket(flow.public_port) else {
        return;
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
