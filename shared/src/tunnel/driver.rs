//! The one task that owns a tunnel end: the TUN device, the UDP socket and
//! boringtun's `Tunn`.
//!
//! Each turn of the loop feeds one input (a packet from the TUN, a datagram
//! from the peer, a timer tick, a command) into `Tunn` and drains what comes
//! out. Buffers are allocated once. Packets that decrypt but do not come
//! from the peer's tunnel address are dropped: boringtun does no allowed-IPs
//! filtering itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use quinn_udp::UdpSocketState;

use super::inbound::{self, Inbound};
use super::tun_buf::{GroBuf, HeadPool, OFFSET, PACKET_BUF};
use crate::udp_batch::{self, GSO_MAX_BYTES, RecvBatch};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};
use tun_rs::AsyncDevice;

/// boringtun's own device ticks its timers this often.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake messages per second accepted before cookies are demanded.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Largest datagram we read; WireGuard adds 32 bytes to an inner packet.
const MAX_PACKET: usize = 65535;
/// WireGuard's message type of a cookie reply (the first byte).
const COOKIE_REPLY: u8 = 3;
/// Keepalive from the home side keeps NAT mappings open on the way out.
pub const HOME_KEEPALIVE_SECS: u16 = 25;

/// Where the peer's datagrams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The home side dials a known edge address.
    Fixed(SocketAddr),
    /// The edge answers wherever the last authenticated datagram came from.
    Learned,
}

/// What one tunnel end needs to run.
pub struct TunnelSpec {
    pub private_key: StaticSecret,
    /// The peer's tunnel address: the only inner source accepted.
    pub peer_addr: Ipv4Addr,
    /// This end's tunnel address: the only inner destination accepted.
    pub own_addr: Ipv4Addr,
    /// What else an inner packet must be to be accepted.
    pub inbound: Inbound,
    pub endpoint: Endpoint,
    /// Sent every this many seconds when idle; `None` on the edge.
    pub keepalive: Option<u16>,
}

impl std::fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("private_key", &"[redacted]")
            .field("peer_addr", &self.peer_addr)
            .field("own_addr", &self.own_addr)
            .field("inbound", &self.inbound)
            .field("endpoint", &self.endpoint)
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

/// Counters and state published by the driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Time of the last completed handshake.
    pub last_handshake: Option<Instant>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub endpoint: Option<SocketAddr>,
    /// Decrypted packets dropped because their inner source was not the peer's.
    pub dropped_spoofed: u64,
    /// Decrypted packets from the peer to somewhere this end does not serve
    /// (see [`Inbound`]).
    pub dropped_not_admitted: u64,
    /// Packets from the TUN that could not be read (too large, bad offload
    /// header), dropped alone.
    pub dropped_unreadable: u64,
    pub peer_key: Option<[u8; 32]>,
}

#[derive(Debug)]
enum Command {
    SetPeer(PublicKey),
    Handshake,
    Keepalive,
}

/// Talks to a running tunnel driver.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    commands: mpsc::Sender<Command>,
    stats: watch::Receiver<TunnelStats>,
}

impl TunnelHandle {
    /// Accepts WireGuard from `key` only, from now on. The same key again
    /// keeps the running session; a new key drops it.
    pub async fn set_peer(&self, key: [u8; 32]) -> Result<(), TunnelStopped> {
        self.commands
            .send(Command::SetPeer(PublicKey::from(key)))
            .await
            .map_err(|_| TunnelStopped)
    }

    /// Starts a new handshake now (home side; the edge cannot, it has no
    /// endpoint until the home's datagrams give it one). For when the peer
    /// may have dropped the session while ours still looks good.
    pub async fn rehandshake(&self) -> Result<(), TunnelStopped> {
        self.commands
            .send(Command::Handshake)
            .await
            .map_err(|_| TunnelStopped)
    }

    /// Sends a keepalive now (home side): the edge sends to wherever the
    /// last authenticated packet came from, so this moves the tunnel to an
    /// address of ours that the edge has not seen a packet from yet. With
    /// no session it starts a handshake, which does the same (one already
    /// under way is left to its own retry; the keepalive then follows it).
    pub async fn send_keepalive(&self) -> Result<(), TunnelStopped> {
        self.commands
            .send(Command::Keepalive)
            .await
            .map_err(|_| TunnelStopped)
    }

    pub fn stats(&self) -> TunnelStats {
        self.stats.borrow().clone()
    }

    /// Waits for the first (or next) completed handshake.
    pub async fn handshake(&self) -> Result<Instant, TunnelStopped> {
        let mut rx = self.stats.clone();
        let seen = rx.borrow().last_handshake;
        loop {
            if let Some(t) = rx.borrow_and_update().last_handshake
                && Some(t) != seen
            {
                return Ok(t);
            }
            rx.changed().await.map_err(|_| TunnelStopped)?;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the tunnel driver has stopped")]
pub struct TunnelStopped;

/// Packets gathered from the TUN per batch.
const BATCH: usize = 128;
/// Packets one offloaded super-packet may be cut into: about 48 for TCP
/// (64 KiB in 1380-byte segments), at most 64 for UDP (the GSO limit).
/// A read needs room for this many, or tun-rs refuses the packet.
const TSO_SEGMENTS_MAX: usize = 64;

/// State shared by the send and receive pipelines and the timer.
///
/// One lock, taken once per batch and never across an `.await`: the
/// pipelines are separate tasks, and `Tunn` needs `&mut`.
struct Shared {
    tunn: Option<Box<Tunn>>,
    peer_key: Option<PublicKey>,
    endpoint: Option<SocketAddr>,
    last_handshake_age: Option<Duration>,
    stats: TunnelStats,
}

struct Context {
    tun: AsyncDevice,
    udp: UdpSocket,
    /// quinn's batched UDP I/O: GSO on send, GRO and `recvmmsg` on receive,
    /// with the fallbacks for kernels and paths that lack them.
    udp_state: UdpSocketState,
    spec: TunnelSpec,
    fixed: bool,
    limiter: Arc<RateLimiter>,
    shared: std::sync::Mutex<Shared>,
    stats_tx: watch::Sender<TunnelStats>,
}

impl Context {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts the driver on the current runtime. It runs until `shutdown`.
///
/// Fails only if the UDP socket refuses the options the batched I/O needs.
pub fn spawn(
    tun: AsyncDevice,
    udp: UdpSocket,
    spec: TunnelSpec,
    peer: Option<[u8; 32]>,
    shutdown: CancellationToken,
) -> std::io::Result<TunnelHandle> {
    let udp_state = udp_batch::socket_state(&udp)?;
    let (commands, command_rx) = mpsc::channel(8);
    let (stats_tx, stats) = watch::channel(TunnelStats::default());
    let public = PublicKey::from(&spec.private_key);
    let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
    let fixed = matches!(spec.endpoint, Endpoint::Fixed(_));
    let endpoint = match spec.endpoint {
        Endpoint::Fixed(a) => Some(a),
        Endpoint::Learned => None,
    };
    let ctx = Arc::new(Context {
        tun,
        udp,
        udp_state,
        fixed,
        limiter,
        shared: std::sync::Mutex::new(Shared {
            tunn: None,
            peer_key: None,
            endpoint,
            last_handshake_age: None,
            stats: TunnelStats::default(),
        }),
        spec,
        stats_tx,
    });
    if let Some(key) = peer {
        set_peer(&ctx, PublicKey::from(key));
    }
    tokio::spawn(send_pipeline(ctx.clone(), shutdown.clone()));
    tokio::spawn(receive_pipeline(ctx.clone(), shutdown.clone()));
    tokio::spawn(control_loop(ctx, command_rx, shutdown));
    Ok(TunnelHandle { commands, stats })
}

fn set_peer(ctx: &Context, key: PublicKey) {
    let mut sh = ctx.lock();
    if sh.peer_key == Some(key) {
        return;
    }
    info!(peer = %short_key(key.as_bytes()), "tunnel peer set");
    let tunn = Tunn::new(
        ctx.spec.private_key.clone(),
        key,
        None,
        ctx.spec.keepalive,
        rand::random::<u32>() >> 8,
        Some(ctx.limiter.clone()),
    );
    sh.tunn = Some(Box::new(tunn));
    sh.peer_key = Some(key);
    sh.stats.peer_key = Some(*key.as_bytes());
    sh.stats.last_handshake = None;
    sh.last_handshake_age = None;
    if !ctx.fixed {
        sh.endpoint = None;
    }
    publish(ctx, &mut sh);
}

/// Timers, commands and the first handshake.
async fn control_loop(
    ctx: Arc<Context>,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut out = vec![0u8; 256];
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    initiate(&ctx, &mut out, false).await;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            cmd = commands.recv() => match cmd {
                Some(Command::SetPeer(key)) => {
                    set_peer(&ctx, key);
                    initiate(&ctx, &mut out, false).await;
                }
                Some(Command::Handshake) => initiate(&ctx, &mut out, true).await,
                Some(Command::Keepalive) => keepalive(&ctx, &mut out).await,
                None => break,
            },
            _ = tick.tick() => {
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(4) {
                    ctx.limiter.reset_count();
                }
                let (to, packet) = {
                    let mut sh = ctx.lock();
                    let endpoint = sh.endpoint;
                    let result = match sh.tunn.as_mut() {
                        None => None,
                        Some(tunn) => match tunn.update_timers(&mut out) {
                            TunnResult::WriteToNetwork(p) => Some(p.len()),
                            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                                debug!("tunnel session expired; the next packet starts a handshake");
                                None
                            }
                            TunnResult::Err(e) => {
                                debug!(error = ?e, "tunnel timer");
                                None
                            }
                            _ => None,
                        },
                    };
                    observe_handshake(&ctx, &mut sh);
                    publish(&ctx, &mut sh);
                    (endpoint, result)
                };
                if let (Some(to), Some(n)) = (to, packet) {
                    send_one(&ctx, &out[..n], to).await;
                }
            }
        }
    }
    debug!("tunnel driver stopped");
}

/// Sends a handshake initiation (home side: it starts the handshake at
/// once, so the tunnel is up before the first flow needs it). `anew` starts
/// one even while another is in progress: one sent while the edge served
/// another home (taken over) went unanswered, and boringtun would send the
/// next only at its retry, 5 s on.
async fn initiate(ctx: &Context, out: &mut [u8], anew: bool) {
    if !ctx.fixed {
        return;
    }
    let (to, n) = {
        let mut sh = ctx.lock();
        let to = sh.endpoint;
        let Some(tunn) = sh.tunn.as_mut() else { return };
        match tunn.format_handshake_initiation(out, anew) {
            TunnResult::WriteToNetwork(p) => (to, p.len()),
            _ => return,
        }
    };
    if let Some(to) = to {
        send_one(ctx, &out[..n], to).await;
    }
}

/// An empty data packet (or, with no session, a handshake initiation).
async fn keepalive(ctx: &Context, out: &mut [u8]) {
    let (to, n) = {
        let mut sh = ctx.lock();
        let to = sh.endpoint;
        let Some(tunn) = sh.tunn.as_mut() else { return };
        match tunn.encapsulate(&[], out) {
            TunnResult::WriteToNetwork(p) => (to, p.len()),
            _ => return,
        }
    };
    if let Some(to) = to {
        send_one(ctx, &out[..n], to).await;
    }
}

async fn send_one(ctx: &Context, packet: &[u8], to: SocketAddr) {
    match ctx.udp.send_to(packet, to).await {
        Ok(n) => {
            let mut sh = ctx.lock();
            sh.stats.tx_bytes += n as u64;
        }
        Err(e) => debug!(%to, error = %e, "tunnel send failed"),
    }
}

/// Room for one encrypted datagram of an MTU-sized packet (1420 + 32).
const DATAGRAM_SLOT: usize = 1500;

/// TUN → encrypt → UDP. One TUN read yields a batch (TSO super-packets are
/// split into MTU packets by tun-rs), encrypted under one lock into one
/// contiguous buffer, and sent with UDP GSO: one system call for a run of
/// equal-sized datagrams instead of one each.
async fn send_pipeline(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut original = vec![0u8; OFFSET + 65535 + 64];
    // An offloaded super-packet arrives whole in `original` and is cut into
    // MTU-sized packets, so each gathered packet's buffer needs room for one
    // packet, not 64 KiB: 256 KiB for the batch instead of 8 MiB.
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; PACKET_BUF]).collect();
    let mut sizes = vec![0usize; BATCH];
    let mut out = vec![0u8; BATCH * DATAGRAM_SLOT];
    let mut lens: Vec<usize> = Vec::with_capacity(BATCH);
    let mut large = vec![0u8; MAX_PACKET + 32];
    let mut oversized: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut n = tokio::select! {
            () = shutdown.cancelled() => break,
            r = ctx.tun.recv_multiple(&mut original, &mut bufs, &mut sizes, OFFSET) => match r {
                Ok(n) => n,
                Err(e) if e.raw_os_error().is_some() => {
                    warn!(error = %e, "TUN read failed; stopping the tunnel");
                    break;
                }
                Err(e) => {
                    // tun-rs refused one packet (read, so gone): drop it alone.
                    unreadable_packet(&ctx, &e);
                    continue;
                }
            },
        };
        // Small packets (UDP flows, many flows' ACKs) come one per read:
        // take what else is queued, so they too leave in GSO runs.
        while n + TSO_SEGMENTS_MAX <= BATCH {
            match ctx
                .tun
                .try_recv_multiple(&mut original, &mut bufs[n..], &mut sizes[n..], OFFSET)
            {
                Ok(0) => break,
                Ok(m) => n += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error().is_some() => {
                    debug!(error = %e, "TUN read failed");
                    break;
                }
                Err(e) => {
                    unreadable_packet(&ctx, &e);
                    break;
                }
            }
        }
        lens.clear();
        oversized.clear();
        let to = {
            let mut sh = ctx.lock();
            let to = sh.endpoint;
            let Some(tunn) = sh.tunn.as_mut() else {
                trace!("no tunnel peer yet; dropping outbound packets");
                continue;
            };
            let mut pos = 0;
            for i in 0..n {
                let packet = &bufs[i][OFFSET..OFFSET + sizes[i]];
                // Only what is for the peer: the kernel also routes
                // broadcasts and multicast (mDNS, SSDP, IGMP) into a TUN,
                // which the peer would only drop, and count against us.
                if !inbound::addressed_to(ctx.spec.peer_addr, packet) {
                    trace!(len = packet.len(), "not for the peer; not sent");
                    continue;
                }
                // The common case writes straight into the contiguous buffer.
                let fits = packet.len() + 32 <= DATAGRAM_SLOT;
                let dst: &mut [u8] = if fits {
                    &mut out[pos..pos + DATAGRAM_SLOT]
                } else {
                    &mut large
                };
                match tunn.encapsulate(packet, dst) {
                    TunnResult::WriteToNetwork(p) if fits => {
                        lens.push(p.len());
                        pos += p.len();
                    }
                    TunnResult::WriteToNetwork(p) => oversized.push(p.to_vec()),
                    TunnResult::Err(e) => debug!(error = ?e, "encapsulate failed"),
                    _ => {}
                }
            }
            to
        };
        let Some(to) = to else {
            trace!("peer endpoint not known yet; dropping outbound datagrams");
            continue;
        };
        let mut sent = 0u64;
        let mut pos = 0;
        let mut i = 0;
        while i < lens.len() {
            // A run: equal-sized datagrams, the last of which may be shorter.
            let max_segments = ctx.udp_state.max_gso_segments();
            let seg = lens[i];
            let mut end = i + 1;
            let mut bytes = seg;
            while end < lens.len()
                && end - i < max_segments
                && bytes + lens[end] <= GSO_MAX_BYTES
                && lens[end] <= seg
            {
                bytes += lens[end];
                end += 1;
                if lens[end - 1] < seg {
                    break;
                }
            }
            let run = &out[pos..pos + bytes];
            sent += send_datagrams(&ctx, run, seg, to).await;
            pos += bytes;
            i = end;
        }
        for d in &oversized {
            sent += send_datagrams(&ctx, d, d.len(), to).await;
        }
        ctx.lock().stats.tx_bytes += sent;
    }
}

/// A packet tun-rs would not take apart (larger than a buffer, a bad
/// offload header) is dropped on its own; the tunnel goes on. The first is
/// a warning, the rest are counted (and logged at debug level).
fn unreadable_packet(ctx: &Context, error: &std::io::Error) {
    let dropped = {
        let mut sh = ctx.lock();
        sh.stats.dropped_unreadable += 1;
        sh.stats.dropped_unreadable
    };
    if dropped == 1 {
        warn!(%error, "dropped a packet from the TUN that could not be read; the tunnel goes on");
    } else {
        debug!(%error, dropped, "dropped a packet from the TUN that could not be read");
    }
}

/// Sends a run of datagrams to the peer; the bytes sent, for the stats. A
/// lost run is what a lost datagram is to the traffic inside.
async fn send_datagrams(ctx: &Context, run: &[u8], segment: usize, to: SocketAddr) -> u64 {
    match udp_batch::send_run(&ctx.udp, &ctx.udp_state, to, run, segment).await {
        Ok(()) => run.len() as u64,
        Err(e) => {
            debug!(%to, error = %e, "tunnel send failed");
            0
        }
    }
}

/// Receive buffers per `recvmmsg`. With UDP GRO each holds up to 64
/// datagrams of one flow, so a few cover a whole burst; more would only
/// add resident memory (every slot is touched whole once GRO fills it).
const RX_SLOTS: usize = 4;
/// Decrypted packets handed to the TUN in one GRO pass: one full GRO
/// receive. Each is a [`GroBuf`], small unless GRO coalesces into it.
const TUN_BATCH: usize = 64;

/// UDP → decrypt → TUN. One `recvmmsg` gathers what is waiting (with GRO,
/// runs of datagrams arrive as one buffer), decrypts it under one lock
/// straight into the TUN buffers, and writes them in one GRO-coalesced batch.
async fn receive_pipeline(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut batch = RecvBatch::<RX_SLOTS>::new();
    let heads = Arc::new(HeadPool::default());
    let mut tun_bufs: Vec<GroBuf> = (0..TUN_BATCH).map(|_| GroBuf::new(heads.clone())).collect();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    let mut scratch = vec![0u8; MAX_PACKET + 32];
    let mut gro = tun_rs::GROTable::new();
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            r = batch.recv(&ctx.udp, &ctx.udp_state) => r,
        };
        let count = match received {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "tunnel socket receive failed");
                continue;
            }
        };
        let mut next = 0;
        while next < count {
            let mut ready = 0usize;
            {
                let mut sh = ctx.lock();
                let sh = &mut *sh;
                while let Some((from, stride, bytes)) = batch.buffer(next) {
                    if ready > 0 && ready + bytes.len().div_ceil(stride) > TUN_BATCH {
                        break;
                    }
                    for datagram in bytes.chunks(stride) {
                        let Some(buf) = tun_bufs.get_mut(ready) else {
                            debug!("more datagrams in one receive than TUN buffers; dropped");
                            break;
                        };
                        if open_datagram(
                            &ctx,
                            sh,
                            datagram,
                            from,
                            buf.packet_mut(),
                            &mut scratch,
                            &mut replies,
                        ) {
                            ready += 1;
                        }
                    }
                    next += 1;
                }
                observe_handshake(&ctx, sh);
            }
            for (reply, to) in replies.drain(..) {
                send_one(&ctx, &reply, to).await;
            }
            if ready > 0
                && let Err(e) = ctx
                    .tun
                    .send_multiple(&mut gro, &mut tun_bufs[..ready], OFFSET)
                    .await
            {
                debug!(error = %e, "TUN write failed");
            }
            for buf in &mut tun_bufs[..ready] {
                buf.release();
            }
        }
    }
}

/// Decrypts one datagram. An inner packet from the peer's tunnel address
/// lands in `buf` after `OFFSET` bytes of room for the virtio header (the
/// return value says so); handshake answers go to `replies`.
fn open_datagram(
    ctx: &Context,
    sh: &mut Shared,
    datagram: &[u8],
    from: SocketAddr,
    buf: &mut Vec<u8>,
    scratch: &mut [u8],
    replies: &mut Vec<(Vec<u8>, SocketAddr)>,
) -> bool {
    if ctx.fixed && Some(from) != sh.endpoint {
        trace!(%from, "datagram from an address other than the edge; dropped");
        return false;
    }
    let Some(tunn) = sh.tunn.as_mut() else {
        trace!("no tunnel peer yet; dropping datagrams");
        return false;
    };
    // Decrypt in place of the TUN write: a plaintext is never longer than
    // its datagram, and handshake answers are shorter than 256 bytes.
    let need = OFFSET + datagram.len().max(256);
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let mut authenticated = false;
    let mut queued = false;
    match tunn.decapsulate(Some(from.ip()), datagram, &mut buf[OFFSET..]) {
        TunnResult::WriteToNetwork(p) => {
            // Under load, a handshake message is answered with a cookie
            // after a check against our public key alone: anyone who knows
            // the key gets one, so it must not move the endpoint (nor get
            // what waits to be sent).
            authenticated = !is_cookie_reply(p);
            // Handshake responses and cookies go back where they came from.
            replies.push((p.to_vec(), from));
            while authenticated
                && let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], scratch)
            {
                replies.push((p.to_vec(), from));
            }
        }
        TunnResult::WriteToTunnelV4(packet, src) => {
            authenticated = true;
            if src != ctx.spec.peer_addr {
                sh.stats.dropped_spoofed += 1;
                debug!(%src, "dropped tunnel packet whose inner source is not the peer's address");
            } else if !ctx
                .spec
                .inbound
                .admits(ctx.spec.own_addr, ctx.spec.peer_addr, packet)
            {
                sh.stats.dropped_not_admitted += 1;
                not_admitted(sh.stats.dropped_not_admitted, packet);
            } else {
                let len = packet.len();
                sh.stats.rx_bytes += len as u64;
                buf.truncate(OFFSET + len);
                queued = true;
            }
        }
        TunnResult::WriteToTunnelV6(_, src) => {
            authenticated = true;
            sh.stats.dropped_spoofed += 1;
            debug!(src = %IpAddr::V6(src), "dropped IPv6 tunnel packet: the tunnel carries IPv4 only");
        }
        // A keepalive; or a cookie sent to us, which anyone who saw our
        // handshake message could make: it proves no key.
        TunnResult::Done => authenticated = !is_cookie_reply(datagram),
        TunnResult::Err(WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter) => {}
        TunnResult::Err(e) => debug!(%from, error = ?e, "dropped WireGuard datagram"),
    }
    if authenticated && !ctx.fixed && sh.endpoint != Some(from) {
        info!(endpoint = %from, "tunnel peer endpoint");
        sh.endpoint = Some(from);
    }
    queued
}

/// The peer sent something this end does not serve: a warning the first
/// time (from a compromised or misbuilt peer, worth knowing), then debug.
fn not_admitted(dropped: u64, packet: &[u8]) {
    let dst = packet
        .get(16..20)
        .map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]));
    let proto = packet.get(9).copied();
    if dropped == 1 {
        warn!(
            ?dst,
            ?proto,
            "dropped a tunnel packet from the peer to an address or port this end does not serve"
        );
    } else {
        debug!(
            ?dst,
            ?proto,
            dropped,
            "dropped a tunnel packet from the peer that this end does not serve"
        );
    }
}

fn is_cookie_reply(datagram: &[u8]) -> bool {
    datagram.first() == Some(&COOKIE_REPLY)
}

/// boringtun reports the age of the last handshake; a smaller age than
/// before means a new one completed.
fn observe_handshake(ctx: &Context, sh: &mut Shared) {
    let Some(tunn) = sh.tunn.as_ref() else { return };
    let (age, ..) = tunn.stats();
    if let Some(age) = age {
        let newer = match sh.last_handshake_age {
            None => true,
            Some(prev) => age < prev,
        };
        sh.last_handshake_age = Some(age);
        if newer {
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            if sh.stats.last_handshake.is_none() {
                info!("tunnel handshake complete");
            }
            sh.stats.last_handshake = Some(at);
            publish(ctx, sh);
        }
    }
}

fn publish(ctx: &Context, sh: &mut Shared) {
    sh.stats.endpoint = sh.endpoint;
    let stats = sh.stats.clone();
    ctx.stats_tx.send_if_modified(|s| {
        if *s == stats {
            false
        } else {
            *s = stats;
            true
        }
    });
}

/// Socket buffer size for the WireGuard sockets: a burst at line rate must
/// not overflow the kernel default of about 200 KiB, which is where the
/// userspace tunnels we measured lost a quarter of their datagrams.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Sizes a UDP socket's buffers. The forcing options ignore
/// `net.core.rmem_max` and work with CAP_NET_ADMIN, which both agents have;
/// the plain ones, capped by the sysctl, are the fallback.
pub fn size_socket_buffers<F: std::os::fd::AsFd>(socket: &F) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

/// The first bytes of a key in base64, enough to tell keys apart in logs.
pub fn short_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    let s = base64::engine::general_purpose::STANDARD.encode(key);
    s[..8].to_owned()
}
