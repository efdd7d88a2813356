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
    let mut driver = Driver {
        tun,
        udp,
        endpoint: match spec.endpoint {
            Endpoint::Fixed(a) => Some(a),
            Endpoint::Learned => None,
        },
        fixed: matches!(spec.endpoint, Endpoint::Fixed(_)),
        spec,
        limiter,
        tunn: None,
        peer_key: None,
        stats: TunnelStats::default(),
        stats_tx,
        last_handshake_age: None,
    };
    if let Some(key) = peer {
        driver.set_peer(PublicKey::from(key));
    }
    tokio::spawn(async move { driver.run(command_rx, shutdown).await });
    TunnelHandle { commands, stats }
}

struct Driver {
    tun: AsyncDevice,
    udp: UdpSocket,
    spec: TunnelSpec,
    endpoint: Option<SocketAddr>,
    fixed: bool,
    limiter: Arc<RateLimiter>,
    tunn: Option<Box<Tunn>>,
    peer_key: Option<PublicKey>,
    stats: TunnelStats,
    stats_tx: watch::Sender<TunnelStats>,
    last_handshake_age: Option<Duration>,
}

impl Driver {
    async fn run(&mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        let mut tun_buf = vec![0u8; MAX_PACKET];
        let mut udp_buf = vec![0u8; MAX_PACKET];
        let mut out = vec![0u8; MAX_PACKET + 32];
        let mut tick = tokio::time::interval(TIMER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u32 = 0;
        // The home side starts the handshake at once, so the tunnel is up
        // before the first flow needs it.
        self.initiate(&mut out).await;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(Command::SetPeer(key)) => {
                        self.set_peer(key);
                        self.initiate(&mut out).await;
                    }
                    None => break,
                },
                r = self.udp.recv_from(&mut udp_buf) => match r {
                    Ok((n, from)) => self.on_datagram(&udp_buf[..n], from, &mut out).await,
                    Err(e) => warn!(error = %e, "tunnel socket receive failed"),
                },
                r = self.tun.recv(&mut tun_buf) => match r {
                    Ok(n) => self.on_tun_packet(&tun_buf[..n], &mut out).await,
                    Err(e) => {
                        warn!(error = %e, "TUN read failed; stopping the tunnel");
                        break;
                    }
                },
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if ticks.is_multiple_of(4) {
                        self.limiter.reset_count();
                    }
                    self.on_timer(&mut out).await;
                }
            }
        }
        debug!("tunnel driver stopped");
    }

    fn set_peer(&mut self, key: PublicKey) {
        if self.peer_key == Some(key) {
            return;
        }
        info!(peer = %short_key(key.as_bytes()), "tunnel peer set");
        let tunn = Tunn::new(
            self.spec.private_key.clone(),
            key,
            None,
            self.spec.keepalive,
            rand::random::<u32>() >> 8,
            Some(self.limiter.clone()),
        );
        self.tunn = Some(Box::new(tunn));
        self.peer_key = Some(key);
        self.stats.peer_key = Some(*key.as_bytes());
        self.stats.last_handshake = None;
        self.last_handshake_age = None;
        if !self.fixed {
            self.endpoint = None;
        }
        self.publish();
    }

    async fn initiate(&mut self, out: &mut [u8]) {
        if !self.fixed {
            return;
        }
        let Some(tunn) = self.tunn.as_mut() else {
            return;
        };
        if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(out, false) {
            send(&self.udp, self.endpoint, p, &mut self.stats).await;
        }
    }

    async fn on_tun_packet(&mut self, packet: &[u8], out: &mut [u8]) {
        let Some(tunn) = self.tunn.as_mut() else {
            trace!("no tunnel peer yet; dropping outbound packet");
            return;
        };
        match tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(p) => {
                send(&self.udp, self.endpoint, p, &mut self.stats).await
            }
            TunnResult::Err(e) => debug!(error = ?e, "encapsulate failed"),
            _ => {}
        }
    }

    async fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr, out: &mut [u8]) {
        let Some(tunn) = self.tunn.as_mut() else {
            trace!(%from, "no tunnel peer yet; dropping datagram");
            return;
        };
        if self.fixed && Some(from) != self.endpoint {
            trace!(%from, "datagram from an address other than the edge; dropped");
            return;
        }
        let mut authenticated = false;
        match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::WriteToNetwork(p) => {
                authenticated = true;
                // Handshake responses and cookies go back where they came from.
                send(&self.udp, Some(from), p, &mut self.stats).await;
                // Flush packets queued while the handshake was under way.
                let mut flush = vec![0u8; MAX_PACKET + 32];
                while let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &[], &mut flush) {
                    send(&self.udp, Some(from), p, &mut self.stats).await;
                }
            }
            TunnResult::WriteToTunnelV4(packet, src) => {
                authenticated = true;
                if src == self.spec.peer_addr {
                    self.stats.rx_bytes += packet.len() as u64;
                    if let Err(e) = self.tun.send(packet).await {
                        debug!(error = %e, "TUN write failed");
                    }
                } else {
                    self.stats.dropped_spoofed += 1;
                    debug!(%src, "dropped tunnel packet whose inner source is not the peer's address");
                }
            }
            TunnResult::WriteToTunnelV6(_, src) => {
                authenticated = true;
                self.stats.dropped_spoofed += 1;
                debug!(src = %IpAddr::V6(src), "dropped IPv6 tunnel packet: the tunnel carries IPv4 only");
            }
            TunnResult::Done => authenticated = true,
            TunnResult::Err(WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter) => {}
            TunnResult::Err(e) => debug!(%from, error = ?e, "dropped WireGuard datagram"),
        }
        if authenticated && !self.fixed && self.endpoint != Some(from) {
            info!(endpoint = %from, "tunnel peer endpoint");
            self.endpoint = Some(from);
        }
        self.observe_handshake();
    }

    async fn on_timer(&mut self, out: &mut [u8]) {
        let Some(tunn) = self.tunn.as_mut() else {
            return;
        };
        match tunn.update_timers(out) {
            TunnResult::WriteToNetwork(p) => {
                send(&self.udp, self.endpoint, p, &mut self.stats).await
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {
                debug!("tunnel session expired; the next packet starts a handshake");
            }
            TunnResult::Err(e) => debug!(error = ?e, "tunnel timer"),
            _ => {}
        }
        self.observe_handshake();
        self.publish();
    }

    /// boringtun reports the age of the last handshake; a smaller age than
    /// before means a new one completed.
    fn observe_handshake(&mut self) {
        let Some(tunn) = self.tunn.as_ref() else {
            return;
        };
        let (age, ..) = tunn.stats();
        if let Some(age) = age {
            let newer = match self.last_handshake_age {
                None => true,
                Some(prev) => age < prev,
            };
            self.last_handshake_age = Some(age);
            if newer {
                let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                if self.stats.last_handshake.is_none() {
                    info!("tunnel handshake complete");
                }
                self.stats.last_handshake = Some(at);
                self.stats.endpoint = self.endpoint;
                self.publish();
            }
        }
    }

    fn publish(&mut self) {
        self.stats.endpoint = self.endpoint;
        let stats = self.stats.clone();
        self.stats_tx.send_if_modified(|s| {
            if *s == stats {
                false
            } else {
                *s = stats;
                true
            }
        });
    }
}

async fn send(udp: &UdpSocket, to: Option<SocketAddr>, packet: &[u8], stats: &mut TunnelStats) {
    let Some(to) = to else {
        trace!("peer endpoint not known yet; dropping outbound datagram");
        return;
    };
    match udp.send_to(packet, to).await {
        Ok(n) => stats.tx_bytes += n as u64,
        Err(e) => debug!(%to, error = %e, "tunnel send failed"),
    }
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
