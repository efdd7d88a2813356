//! Test support for skerry's end-to-end tests.
//!
//! The end-to-end tests run real agents in Linux network namespaces on this
//! host, so they need root and `/dev/net/tun` ([`require_root`] says so
//! loudly; a namespace test never skips silently) and iproute2's `ip`.
//!
//! | item | what it gives a test |
//! |---|---|
//! | [`Topology`] | three namespaces, `client` ↔ `edge` ↔ `home`, with addresses and routes, torn down on drop even when the test fails |
//! | [`run_in`], [`spawn_in`] / [`Background`] | code run inside a namespace: once and blocking, or as a service that lives until its guard drops |
//! | [`tcp_listener_in`], [`udp_socket_in`] | sockets bound inside a namespace and handed back, so the address is known before anyone connects |
//! | [`tcp_digest_server`] / [`tcp_digest_client`] | a TCP check of both directions, integrity, ordering and half-close |
//! | [`udp_echo_server`] | a UDP echo |
//! | [`unique`], [`init_tracing`] | unique names for parallel tests; `RUST_LOG`-driven logs |
//! | [`agents::Pair`] | a real edge-agent and home-agent running in a topology |
//!
//! Rules these helpers follow, and tests should too: every test makes its
//! own namespaces with unique names (cargo runs tests in parallel); sockets
//! are bound first and their address handed over, never a fixed port and a
//! sleep; traffic stays on loopback or inside namespaces the test made
//! (addresses from 198.18.0.0/15 and fd00::/8).

pub mod agents;
pub mod fake_do;
pub mod qemu;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use skerry::netns::{NetNs, NetnsError, Side, Veth};
use tokio::io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

/// The prefix of every namespace a [`Topology`] makes: `skt-<pid>-<n>-<role>`.
pub const NETNS_PREFIX: &str = "skt";

/// Panics with a clear message unless this process is root and has
/// `/dev/net/tun`. Call it first in every namespace test.
pub fn require_root() {
    if let Err(e) = skerry::netns::require_root() {
        panic!("{e}");
    }
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name no other test of any live process uses: `<prefix>-<pid>-<n>`.
///
/// The pid comes second so that [`NetNs::sweep_stale`] can tell a crashed
/// run's namespaces from a live one's. Interface names are at most 15 bytes:
/// with a pid of up to 7 digits, keep `prefix` to 2 characters there.
pub fn unique(prefix: &str) -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A fresh directory under the system's temporary one, removed when the
/// handle drops: also when a test fails, while it unwinds.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("creating a scratch directory: {e}"))
}

/// Sets up `tracing` once per process: filtered by `RUST_LOG` (default:
/// warnings), written through the test harness so output shows with failures.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter =
            skerry::logging::filter_from_env(tracing_subscriber::filter::LevelFilter::WARN);
        // Another subscriber (set by the test itself) wins; that is fine.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .finish()
            .with(filter)
            .try_init();
    });
}

/// The three-namespace topology of the end-to-end tests.
///
/// ```text
///  client ── eth-edge ═══ eth-client ── edge ── eth-home ═══ eth-edge ── home
///     198.18.X.2          198.18.X.1          198.18.Y.1          198.18.Y.2
///     fd00:X:1::2         fd00:X:1::1         fd00:X:2::1         fd00:X:2::2
/// ```
///
/// - `client` is an internet user; its default route points at the edge.
/// - `edge` forwards nothing (`ip_forward=0`, IPv6 forwarding off): the only
///   way from client to home is through skerry's tunnel.
/// - `home` has a default route via the edge, so it can dial the edge's
///   addresses on either link (the home-agent dials [`Self::edge_home_side_v4`]).
///
/// X and Y come from a per-process counter and the pid, so concurrent
/// topologies differ in addresses as well as in names (each lives in its own
/// namespaces, so they could not collide anyway; distinct addresses keep logs
/// unambiguous). Interface names are the same in every topology, as above.
///
/// Dropping it deletes the veth pairs, then the namespaces, also while
/// unwinding from a failed assertion. Threads still running inside keep a
/// namespace alive (unnamed) until they end: drop [`Background`] guards first.
pub struct Topology {
    /// The internet user.
    pub client: NetNs,
    /// The edge VM.
    pub edge: NetNs,
    /// The home network, where the home-agent and the services run.
    pub home: NetNs,
    /// The edge's address on the client link: its public IPv4 address.
    pub edge_public_v4: Ipv4Addr,
    /// The edge's address on the client link: its public IPv6 address.
    pub edge_public_v6: Ipv6Addr,
    /// The edge's IPv4 address on the home link: what the home-agent dials.
    pub edge_home_side_v4: Ipv4Addr,
    /// The edge's IPv6 address on the home link.
    pub edge_home_side_v6: Ipv6Addr,
    /// The client's IPv4 address: the source the edge sees.
    pub client_v4: Ipv4Addr,
    /// The client's IPv6 address.
    pub client_v6: Ipv6Addr,
    /// Home's IPv4 address on its link to the edge.
    pub home_v4: Ipv4Addr,
    /// Home's IPv6 address on its link to the edge.
    pub home_v6: Ipv6Addr,
    /// Dropped before the namespaces (see `Drop`).
    veths: Vec<Veth>,
}

impl Topology {
    /// Builds the topology. Panics, naming the step, if anything fails (what
    /// was built so far is torn down). First deletes `skt-…` namespaces left
    /// by dead processes (once per process).
    #[allow(
        clippy::new_without_default,
        reason = "creating namespaces is no default"
    )]
    pub fn new() -> Topology {
        require_root();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            let swept = NetNs::sweep_stale(NETNS_PREFIX);
            if !swept.is_empty() {
                tracing::info!(?swept, "deleted namespaces of an earlier run");
            }
        });

        let id = unique(NETNS_PREFIX);
        // 128 pairs of /24s in 198.18.0.0/16; the pid spreads processes apart.
        let slot = (std::process::id().wrapping_mul(37))
            .wrapping_add(UNIQUE.fetch_add(1, Ordering::Relaxed))
            % 128;
        let x = u8::try_from(slot * 2).expect("slot < 128, so 2 * slot < 256");
        let y = x + 1;
        let v6 = |link: u16, host: u16| Ipv6Addr::new(0xfd00, u16::from(x), link, 0, 0, 0, 0, host);

        let ns = |role: &str| {
            let name = format!("{id}-{role}");
            NetNs::create(&name)
                .unwrap_or_else(|e| panic!("topology: creating namespace {name}: {e}"))
        };
        let client = ns("client");
        let edge = ns("edge");
        let home = ns("home");

        // From here on, a panic drops `topology`, which tears everything down.
        let mut topology = Topology {
            edge_public_v4: Ipv4Addr::new(198, 18, x, 1),
            edge_public_v6: v6(1, 1),
            edge_home_side_v4: Ipv4Addr::new(198, 18, y, 1),
            edge_home_side_v6: v6(2, 1),
            client_v4: Ipv4Addr::new(198, 18, x, 2),
            client_v6: v6(1, 2),
            home_v4: Ipv4Addr::new(198, 18, y, 2),
            home_v6: v6(2, 2),
            veths: Vec::new(),
            client,
            edge,
            home,
        };
        let t = &topology;
        let link = |a: &NetNs, a_name: &str, b: &NetNs, b_name: &str, addrs: [String; 4]| {
            let veth = Veth::create(Some(a), a_name, Some(b), b_name).unwrap_or_else(|e| {
                panic!(
                    "topology: veth {}/{a_name} <-> {}/{b_name}: {e}",
                    a.name(),
                    b.name()
                )
            });
            let [a4, a6, b4, b6] = addrs;
            for (side, cidr) in [(Side::A, a4), (Side::A, a6), (Side::B, b4), (Side::B, b6)] {
                veth.add_addr(side, &cidr)
                    .unwrap_or_else(|e| panic!("topology: address {cidr}: {e}"));
            }
            veth
        };
        let client_link = link(
            &t.client,
            "eth-edge",
            &t.edge,
            "eth-client",
            [
                format!("{}/24", t.client_v4),
                format!("{}/64", t.client_v6),
                format!("{}/24", t.edge_public_v4),
                format!("{}/64", t.edge_public_v6),
            ],
        );
        let home_link = link(
            &t.home,
            "eth-edge",
            &t.edge,
            "eth-home",
            [
                format!("{}/24", t.home_v4),
                format!("{}/64", t.home_v6),
                format!("{}/24", t.edge_home_side_v4),
                format!("{}/64", t.edge_home_side_v6),
            ],
        );
        let routes = [
            (&t.client, t.edge_public_v4.to_string(), "-4"),
            (&t.client, t.edge_public_v6.to_string(), "-6"),
            (&t.home, t.edge_home_side_v4.to_string(), "-4"),
            (&t.home, t.edge_home_side_v6.to_string(), "-6"),
        ];
        for (ns, via, family) in routes {
            ns.ip(&[family, "route", "add", "default", "via", &via])
                .unwrap_or_else(|e| panic!("topology: default route in {}: {e}", ns.name()));
        }
        topology.veths.extend([client_link, home_link]);
        tracing::debug!(
            client = topology.client.name(),
            edge = topology.edge.name(),
            home = topology.home.name(),
            "topology up"
        );
        topology
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Veths first; the namespaces go with the fields, after this.
        self.veths.clear();
    }
}

/// Runs the future `f` makes inside `ns`, on its own thread with a
/// current-thread runtime, and blocks until it is done. A panic inside is
/// re-raised here, so assertions inside work as usual.
///
/// It blocks the calling thread: from async code, call it through
/// `tokio::task::spawn_blocking` (or use a plain `#[test]`).
pub fn run_in<T, Fut>(ns: &NetNs, f: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T>,
{
    let handle = ns
        .spawn_runtime(&format!("in-{}", ns.name()), f)
        .unwrap_or_else(|e| panic!("run_in {}: cannot start a thread: {e}", ns.name()));
    match handle.join() {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => panic!("run_in {}: {e}", ns.name()),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A service running inside a namespace (see [`spawn_in`]). Dropping it
/// stops the service (its future and every task it spawned are dropped) and
/// joins its thread; a panic of the service is re-raised then, unless the
/// thread dropping it is already panicking.
pub struct Background {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), NetnsError>>>,
}

impl Background {
    /// Whether the service has ended on its own (returned or panicked).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the service and waits for its thread, like dropping the guard.
    pub fn stop(self) {}
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // Err: the service already ended; joining below is still right.
            let _ = stop.send(());
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) if std::thread::panicking() => {
                tracing::error!(service = %self.name, error = %e, "background service failed");
            }
            Ok(Err(e)) => panic!("background service {}: {e}", self.name),
            Err(_) if std::thread::panicking() => {
                tracing::error!(service = %self.name, "background service panicked");
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Starts a service inside `ns`: a thread with a current-thread runtime that
/// drives the future `f` makes until it returns or the returned guard is
/// dropped. The future need not be `Send`.
///
/// Bind the service's sockets before calling this ([`tcp_listener_in`],
/// [`udp_socket_in`]) and move them in, so the address is known and ready
/// before the first connection.
pub fn spawn_in<Fut>(ns: &NetNs, f: impl FnOnce() -> Fut + Send + 'static) -> Background
where
    Fut: Future<Output = ()> + 'static,
{
    let name = format!("bg-{}", ns.name());
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = ns
        .spawn_runtime(&name, move || async move {
            let service = f();
            tokio::select! {
                () = service => {}
                // Ok: stop requested; Err: the guard is gone. Either way, stop.
                _ = stopped => {}
            }
        })
        .unwrap_or_else(|e| panic!("spawn_in {}: cannot start a thread: {e}", ns.name()));
    Background {
        name,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// `ss` in `ns` with `args` (filters as separate words): its output.
pub fn ss(ns: &NetNs, args: &[&str]) -> String {
    let out = ns.exec("ss", args).expect("ss in a test namespace");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Calls `check` every 50 ms until it gives a value; after `limit`, fails
/// the test with what `check` last said.
pub fn poll_until<T>(limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) => assert!(
                std::time::Instant::now() < deadline,
                "not within {limit:?}: {why}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drops packets in `ns` with an nftables rule, in a table of its own
/// (`nft delete table inet TABLE` lifts it): `hook` is `input` or
/// `output`, `matcher` an nft expression such as `udp dport 51820`.
pub fn nft_drop(ns: &NetNs, table: &str, hook: &str, matcher: &str) {
    let script = format!(
        "nft add table inet {table} && nft add chain inet {table} {hook} '{{ type filter hook {hook} priority 0; }}' && nft add rule inet {table} {hook} {matcher} drop"
    );
    ns.exec("sh", &["-c", &script])
        .unwrap_or_else(|e| panic!("nft rule in {}: {matcher} drop: {e}", ns.name()));
}

/// Binds a TCP listener to `addr` inside `ns` and hands it back, in
/// non-blocking mode, ready for `tokio::net::TcpListener::from_std` on any
/// runtime. The socket stays in `ns`, whichever thread uses it.
pub fn tcp_listener_in(ns: &NetNs, addr: SocketAddr) -> std::net::TcpListener {
    in_thread(ns, "tcp-bind", move || {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .unwrap_or_else(|e| panic!("binding TCP {addr} in {}: {e}", ns.name()))
}

/// Binds a UDP socket to `addr` inside `ns` and hands it back, in
/// non-blocking mode, ready for `tokio::net::UdpSocket::from_std`.
pub fn udp_socket_in(ns: &NetNs, addr: SocketAddr) -> std::net::UdpSocket {
    in_thread(ns, "udp-bind", move || {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })
    .unwrap_or_else(|e| panic!("binding UDP {addr} in {}: {e}", ns.name()))
}

fn in_thread<T: Send + 'static>(
    ns: &NetNs,
    name: &str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let handle = ns.spawn_thread(name, f)?;
    match handle.join() {
        Ok(result) => Ok(result??),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Size of the chunks the digest helpers read, write and compare.
const DIGEST_CHUNK: usize = 64 * 1024;

/// The byte stream one side of a digest exchange sends: ChaCha (`StdRng`)
/// keyed by the seed and the direction, so the two directions differ and a
/// server that merely echoes fails the check.
fn digest_stream(seed: &[u8; 32], direction: &[u8]) -> StdRng {
    let key = Sha256::new()
        .chain_update(b"skerry digest stream ")
        .chain_update(direction)
        .chain_update(seed)
        .finalize();
    StdRng::from_seed(key.into())
}

const CLIENT_TO_SERVER: &[u8] = b"client-to-server";
const SERVER_TO_CLIENT: &[u8] = b"server-to-client";

/// [`tcp_digest_server`] on `addr` inside `ns`, listening before this
/// returns; it stops when the guard is dropped.
pub fn tcp_digest_service(ns: &NetNs, addr: SocketAddr) -> Background {
    let listener = tcp_listener_in(ns, addr);
    spawn_in(ns, move || async move {
        match TcpListener::from_std(listener) {
            Ok(l) => tcp_digest_server(l).await,
            Err(e) => tracing::warn!(%addr, error = %e, "digest service not started"),
        }
    })
}

/// The server half of the digest check; runs until dropped, serving every
/// connection concurrently (connections end with it).
///
/// Per connection: read a big-endian `u64` length L and a 32-byte seed; then,
/// concurrently, read L bytes and write L bytes generated from the seed; after
/// reading all L, write the SHA-256 of what was received and shut down the
/// write half; then wait for the client's end of stream. Errors are logged.
pub async fn tcp_digest_server(listener: TcpListener) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(async move {
                        if let Err(e) = serve_digest(stream).await {
                            tracing::warn!(%peer, error = %e, "digest connection failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "digest server accept failed"),
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_digest(mut stream: TcpStream) -> io::Result<()> {
    let len = stream.read_u64().await?;
    let mut seed = [0; 32];
    stream.read_exact(&mut seed).await?;
    let (mut rd, mut wr) = stream.split();
    let receive = async {
        let mut hasher = Sha256::new();
        let mut buf = vec![0; DIGEST_CHUNK];
        let mut left = len;
        while left > 0 {
            let want = chunk_len(left);
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("client closed with {left} of {len} bytes unsent"),
                ));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        Ok(hasher.finalize())
    };
    let send = write_stream(&mut wr, len, digest_stream(&seed, SERVER_TO_CLIENT));
    let (digest, _) = tokio::try_join!(receive, send)?;
    wr.write_all(&digest).await?;
    wr.shutdown().await?;
    // Wait for the client's half close: closing earlier could reset data it
    // has not read yet.
    let mut extra = [0; 1];
    if rd.read(&mut extra).await? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "client sent more than it announced",
        ));
    }
    Ok(())
}

/// The client half of the digest check against [`tcp_digest_server`] at
/// `addr`: sends L and the seed, streams L bytes generated from the seed
/// while reading L bytes back, then shuts down its write half. Checks that
/// the bytes received are exactly the server's stream for this seed (naming
/// the first differing offset), that the server's digest of what it received
/// equals the digest of what was sent, and that the server then closes.
pub async fn tcp_digest_client(addr: SocketAddr, len: u64, seed: [u8; 32]) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("digest client: connecting to {addr}"))?;
    let (mut rd, mut wr) = stream.split();
    let send = async {
        wr.write_u64(len).await?;
        wr.write_all(&seed).await?;
        let sent = write_stream(&mut wr, len, digest_stream(&seed, CLIENT_TO_SERVER)).await?;
        wr.shutdown().await?;
        anyhow::Ok(sent)
    };
    let receive = async {
        let mut expected = digest_stream(&seed, SERVER_TO_CLIENT);
        let mut want = vec![0; DIGEST_CHUNK];
        let mut got = vec![0; DIGEST_CHUNK];
        let mut offset = 0;
        while offset < len {
            let n = chunk_len(len - offset);
            expected.fill_bytes(&mut want[..n]);
            rd.read_exact(&mut got[..n])
                .await
                .with_context(|| format!("server stream ended at byte {offset} of {len}"))?;
            if let Some(i) = want[..n].iter().zip(&got[..n]).position(|(w, g)| w != g) {
                bail!(
                    "server stream differs at byte {} of {len}",
                    offset + i as u64
                );
            }
            offset += n as u64;
        }
        let mut digest = [0; 32];
        rd.read_exact(&mut digest)
            .await
            .context("server closed before sending its digest")?;
        let mut extra = [0; 1];
        let n = rd.read(&mut extra).await?;
        ensure!(
            n == 0,
            "server sent more after its digest instead of closing"
        );
        anyhow::Ok(digest)
    };
    let (sent, reported) = tokio::try_join!(send, receive)
        .with_context(|| format!("digest exchange with {addr}, {len} bytes"))?;
    ensure!(
        reported == sent,
        "server received different bytes than were sent (its sha256 {}, ours {})",
        hex(&reported),
        hex(&sent)
    );
    Ok(())
}

/// Echoes every datagram back to its sender, unchanged, until dropped.
/// Errors are logged and the loop goes on.
pub async fn udp_echo_server(socket: UdpSocket) {
    let mut buf = vec![0; 65_536];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buf[..n], peer).await {
                    tracing::warn!(%peer, error = %e, "udp echo send failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "udp echo receive failed"),
        }
    }
}

/// The next chunk's length when `left` bytes remain.
fn chunk_len(left: u64) -> usize {
    usize::try_from(left).map_or(DIGEST_CHUNK, |left| left.min(DIGEST_CHUNK))
}

/// Writes `len` bytes from `rng` to `wr`; returns their SHA-256.
async fn write_stream<W: AsyncWrite + Unpin>(
    wr: &mut W,
    len: u64,
    mut rng: StdRng,
) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; DIGEST_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = chunk_len(left);
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        wr.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(hasher.finalize().into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
