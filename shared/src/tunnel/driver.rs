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
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};
use tun_rs::AsyncDevice;

/// boringtun's own device ticks its timers this often.
const TIMER_TICK: Duration = Duration::from_millis(250);
/// Handshake initiations per second accepted before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Largest datagram we read; WireGuard adds 32 bytes to an inner packet.
const MAX_PACKET: usize = 65535;
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
    pub endpoint: Endpoint,
    /// Sent every this many seconds when idle; `None` on the edge.
    pub keepalive: Option<u16>,
}

impl std::fmt::Debug for TunnelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelSpec")
            .field("private_key", &"[redacted]")
            .field("peer_addr", &self.peer_addr)
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
    pub peer_key: Option<[u8; 32]>,
}

#[derive(Debug)]
enum Command {
    SetPeer(PublicKey),
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

/// Packets per batch: one TUN read with TSO yields up to about 45 MTU
/// packets; the receive side gathers up to this many datagrams per wakeup.
const BATCH: usize = 64;
/// Room before each packet in a TUN buffer: the 10-byte virtio header the
/// offload path writes in front, with spare for alignment.
const OFFSET: usize = 16;
/// Capacity of each TUN write buffer: GRO coalesces segments into the
/// first buffer of a flow, up to 64 KiB, and tun-rs needs twice the offset.
const TUN_BUF_CAP: usize = 65535 + 2 * OFFSET + 64;

/// State shared by the send and receive pipelines and the timer.
///
/// One lock, taken once per batch and never across an `.await`: the
/// pipelines run on separate tasks (and cores), and `Tunn` needs `&mut`.
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
pub fn spawn(
    tun: AsyncDevice,
    udp: UdpSocket,
    spec: TunnelSpec,
    peer: Option<[u8; 32]>,
    shutdown: CancellationToken,
) -> TunnelHandle {
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
    TunnelHandle { commands, stats }
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
    initiate(&ctx, &mut out).await;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            cmd = commands.recv() => match cmd {
                Some(Command::SetPeer(key)) => {
                    set_peer(&ctx, key);
                    initiate(&ctx, &mut out).await;
                }
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

/// The home side starts the handshake at once, so the tunnel is up before
/// the first flow needs it.
async fn initiate(ctx: &Context, out: &mut [u8]) {
    if !ctx.fixed {
        return;
    }
    let (to, n) = {
        let mut sh = ctx.lock();
        let to = sh.endpoint;
        let Some(tunn) = sh.tunn.as_mut() else { return };
        match tunn.format_handshake_initiation(out, false) {
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
/// UDP GSO limits: at most 64 segments, and the whole send fits one
/// 64 KiB datagram.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;

/// TUN → encrypt → UDP. One TUN read yields a batch (TSO super-packets are
/// split into MTU packets by tun-rs), encrypted under one lock into one
/// contiguous buffer, and sent with UDP GSO: one system call for a run of
/// equal-sized datagrams instead of one each.
async fn send_pipeline(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut original = vec![0u8; OFFSET + 65535 + 64];
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; OFFSET + 65535]).collect();
    let mut sizes = vec![0usize; BATCH];
    let mut out = vec![0u8; BATCH * DATAGRAM_SLOT];
    let mut lens: Vec<usize> = Vec::with_capacity(BATCH);
    let mut large = vec![0u8; MAX_PACKET + 32];
    let mut gso = true;
    loop {
        let n = tokio::select! {
            () = shutdown.cancelled() => break,
            r = ctx.tun.recv_multiple(&mut original, &mut bufs, &mut sizes, OFFSET) => match r {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "TUN read failed; stopping the tunnel");
                    break;
                }
            },
        };
        lens.clear();
        let mut oversized: Vec<Vec<u8>> = Vec::new();
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
            let seg = lens[i];
            let mut end = i + 1;
            let mut bytes = seg;
            while end < lens.len()
                && end - i < GSO_MAX_SEGMENTS
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
            if gso && end - i > 1 {
                match send_gso(&ctx.udp, run, seg, to).await {
                    Ok(n) => sent += n as u64,
                    Err(e) if matches!(e.raw_os_error(), Some(code) if code == nix::libc::EIO || code == nix::libc::EINVAL) =>
                    {
                        info!(error = %e, "UDP GSO unavailable on this path; sending datagrams one by one");
                        gso = false;
                        continue;
                    }
                    Err(e) => debug!(%to, error = %e, "tunnel send failed"),
                }
            } else {
                let mut at = 0;
                for &len in &lens[i..end] {
                    match ctx.udp.send_to(&run[at..at + len], to).await {
                        Ok(n) => sent += n as u64,
                        Err(e) => debug!(%to, error = %e, "tunnel send failed"),
                    }
                    at += len;
                }
            }
            pos += bytes;
            i = end;
        }
        for d in &oversized {
            if let Ok(n) = ctx.udp.send_to(d, to).await {
                sent += n as u64;
            }
        }
        ctx.lock().stats.tx_bytes += sent;
    }
}

/// One `sendmsg` with `UDP_SEGMENT`: the kernel cuts `run` into datagrams
/// of `segment` bytes.
async fn send_gso(
    udp: &UdpSocket,
    run: &[u8],
    segment: usize,
    to: SocketAddr,
) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let seg = u16::try_from(segment)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let addr = SockaddrStorage::from(to);
    udp.async_io(tokio::io::Interest::WRITABLE, || {
        let iov = [std::io::IoSlice::new(run)];
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        sendmsg(udp.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr))
            .map_err(std::io::Error::from)
    })
    .await
}

/// UDP → decrypt → TUN. Gathers the datagrams that are waiting, decrypts
/// them under one lock and writes them to the TUN in one GRO-coalesced batch.
async fn receive_pipeline(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut datagrams: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; MAX_PACKET]).collect();
    let mut dgram_meta: Vec<(usize, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut tun_bufs: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(TUN_BUF_CAP))
        .collect();
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
    let mut scratch = vec![0u8; MAX_PACKET + 32];
    let mut plain = vec![0u8; MAX_PACKET + 32];
    let mut gro = tun_rs::GROTable::new();
    loop {
        dgram_meta.clear();
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            r = ctx.udp.recv_from(&mut datagrams[0]) => r,
        };
        match first {
            Ok((n, from)) => dgram_meta.push((n, from)),
            Err(e) => {
                warn!(error = %e, "tunnel socket receive failed");
                continue;
            }
        }
        // Take whatever else is already queued, without waiting.
        while dgram_meta.len() < BATCH {
            match ctx.udp.try_recv_from(&mut datagrams[dgram_meta.len()]) {
                Ok((n, from)) => dgram_meta.push((n, from)),
                Err(_) => break,
            }
        }

        let mut ready = 0usize;
        {
            let mut sh = ctx.lock();
            let sh = &mut *sh;
            let Some(tunn) = sh.tunn.as_mut() else {
                trace!("no tunnel peer yet; dropping datagrams");
                continue;
            };
            for (i, &(n, from)) in dgram_meta.iter().enumerate() {
                if ctx.fixed && Some(from) != sh.endpoint {
                    trace!(%from, "datagram from an address other than the edge; dropped");
                    continue;
                }
                let mut authenticated = false;
                match tunn.decapsulate(Some(from.ip()), &datagrams[i][..n], &mut plain) {
                    TunnResult::WriteToNetwork(p) => {
                        authenticated = true;
                        // Handshake responses and cookies go back where they came from.
                        replies.push((p.to_vec(), from));
                        while let TunnResult::WriteToNetwork(p) =
                            tunn.decapsulate(None, &[], &mut scratch)
                        {
                            replies.push((p.to_vec(), from));
                        }
                    }
                    TunnResult::WriteToTunnelV4(packet, src) => {
                        authenticated = true;
                        if src == ctx.spec.peer_addr {
                            sh.stats.rx_bytes += packet.len() as u64;
                            // Room in front for the virtio header; a copy
                            // of one MTU is cheaper than zeroing 64 KiB.
                            let buf = &mut tun_bufs[ready];
                            buf.clear();
                            buf.extend_from_slice(&[0u8; OFFSET]);
                            buf.extend_from_slice(packet);
                            ready += 1;
                        } else {
                            sh.stats.dropped_spoofed += 1;
                            debug!(%src, "dropped tunnel packet whose inner source is not the peer's address");
                        }
                    }
                    TunnResult::WriteToTunnelV6(_, src) => {
                        authenticated = true;
                        sh.stats.dropped_spoofed += 1;
                        debug!(src = %IpAddr::V6(src), "dropped IPv6 tunnel packet: the tunnel carries IPv4 only");
                    }
                    TunnResult::Done => authenticated = true,
                    TunnResult::Err(
                        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter,
                    ) => {}
                    TunnResult::Err(e) => debug!(%from, error = ?e, "dropped WireGuard datagram"),
                }
                if authenticated && !ctx.fixed && sh.endpoint != Some(from) {
                    info!(endpoint = %from, "tunnel peer endpoint");
                    sh.endpoint = Some(from);
                }
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
    }
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
