//! A running edge-agent and home-agent in a [`Topology`], driven through the
//! same library entry points the binaries use.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use home_agent::admin::{self, Controller};
use home_agent::{HomeOptions, HomeStatus};
use skerry::bootstrap::{Bootstrap, DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT};
use skerry::dead_peer::DeadPeer;
use skerry::pki::HomePki;
use skerry::portmap::{PortMap, PortSpec};
use skerry::protocol::PortsApplied;
use skerry::tunnel::{TunnelAddrs, TunnelHandle, WireguardKey};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Background, Topology, spawn_in};

/// How long a test waits for the agents to reach a state.
pub const SETTLE: Duration = Duration::from_secs(30);

/// An edge and a home-agent connected through a topology. Dropping it stops
/// both and removes everything (the topology last).
pub struct Pair {
    home: Option<Background>,
    /// The admin socket (and config follower): kept across home restarts.
    admin: Option<Background>,
    edge: Option<Background>,
    pub edge_stop: CancellationToken,
    edge_opts: edge_agent::EdgeOptions,
    pub home_stop: CancellationToken,
    home_run: HomeRun,
    pub status: watch::Receiver<HomeStatus>,
    pub map: watch::Sender<PortMap>,
    pub pki: HomePki,
    /// The home-agent's admin socket, as `home-agent ports …` uses it.
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    /// Holds `state_dir`, removed with it after the agents have stopped.
    _scratch: tempfile::TempDir,
    // Last: torn down after the agents inside it have stopped.
    pub topo: Topology,
}

/// Options that tests vary.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub udp_idle: Duration,
    pub drain_grace: Duration,
    /// Both agents' keepalive timing.
    pub dead_peer: DeadPeer,
    /// A config file the home-agent follows, as with `connect --config`.
    pub config: Option<PathBuf>,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            udp_idle: Duration::from_secs(60),
            drain_grace: Duration::from_secs(30),
            dead_peer: DeadPeer::default(),
            config: None,
        }
    }
}

/// Parses specs that a test knows to be valid.
pub fn port_map(generation: u64, specs: &[&str]) -> PortMap {
    let specs: Vec<PortSpec> = specs
        .iter()
        .map(|s| s.parse().unwrap_or_else(|e| panic!("test spec {s}: {e}")))
        .collect();
    let (map, refused) = PortMap::from_specs(generation, specs);
    assert!(refused.is_empty(), "test map refused entries: {refused:?}");
    map
}

impl Pair {
    pub fn start(specs: &[&str]) -> Pair {
        Self::start_with(specs, PairOptions::default())
    }

    pub fn start_with(specs: &[&str], opts: PairOptions) -> Pair {
        crate::require_root();
        let topo = Topology::new();
        let scratch = crate::scratch_dir("skerry-pair");
        let state_dir = scratch.path().to_owned();
        let pki = HomePki::load_or_create(&state_dir).expect("creating the test PKI");
        let key =
            WireguardKey::load_or_create(&state_dir.join("wireguard.key")).expect("WireGuard key");

        let mut edge_opts = edge_agent::EdgeOptions::new(Bootstrap::from_pki(
            &pki,
            DEFAULT_CONTROL_PORT,
            DEFAULT_WIREGUARD_PORT,
            TunnelAddrs::DEFAULT,
        ));
        edge_opts.udp_idle = opts.udp_idle;
        edge_opts.dead_peer = opts.dead_peer;
        let edge_stop = CancellationToken::new();
        let edge = start_edge(&topo, edge_opts.clone(), edge_stop.clone());

        let map = port_map(1, specs);
        let (map_tx, map_rx) = watch::channel(map);
        let (status_tx, status) = watch::channel(HomeStatus::default());
        let home_opts = HomeOptions {
            edge: std::net::SocketAddr::from((topo.edge_home_side_v4, DEFAULT_CONTROL_PORT)),
            tun_name: "skerry-home".into(),
            udp_idle: opts.udp_idle,
            drain_grace: opts.drain_grace,
            dead_peer: opts.dead_peer,
            requested_tunnel: None,
        };
        let home_stop = CancellationToken::new();
        let admin_socket = state_dir.join("admin.sock");
        let controller = Arc::new(Controller::new(
            "test".into(),
            home_opts.edge,
            map_tx.clone(),
            status.clone(),
            opts.config.clone(),
        ));
        let socket = admin_socket.clone();
        let config = opts.config.clone();
        // Its own token: it outlives home restarts, and stops when dropped.
        let token = CancellationToken::new();
        let follower_status = status_tx.clone();
        let admin = spawn_in(&topo.home, move || async move {
            if let Some(path) = config {
                let loaded = std::fs::read_to_string(&path).ok();
                tokio::spawn(home_agent::config::follow(
                    path,
                    Vec::new(),
                    loaded,
                    controller.clone(),
                    follower_status,
                    token.clone(),
                ));
            }
            let mut admin_socket =
                admin::AdminSocket::claim(socket, &[]).expect("claiming the admin socket");
            let listener = admin_socket.take_listener().expect("the admin listener");
            if let Err(e) = admin::serve(listener, controller, token).await {
                panic!("admin socket: {e:#}");
            }
        });
        let home_run = HomeRun {
            opts: home_opts,
            pki: pki.clone(),
            key,
            map: map_rx,
            status: status_tx,
        };
        let home = home_run.start(&topo, home_stop.clone());
        let pair = Pair {
            home: Some(home),
            admin: Some(admin),
            home_run,
            edge: Some(edge),
            edge_stop,
            edge_opts,
            home_stop,
            status,
            map: map_tx,
            pki,
            admin_socket,
            state_dir,
            _scratch: scratch,
            topo,
        };
        pair.wait_applied(1);
        pair
    }

    /// Blocks until the edge has answered generation `generation`.
    pub fn wait_applied(&self, generation: u64) -> PortsApplied {
        let mut rx = self.status.clone();
        block_on(async move {
            let s = tokio::time::timeout(
                SETTLE,
                rx.wait_for(|s| {
                    s.applied
                        .as_ref()
                        .is_some_and(|a| a.generation >= generation)
                }),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("the edge did not answer generation {generation} within {SETTLE:?}")
            })
            .expect("home-agent stopped");
            s.applied.clone().expect("checked above")
        })
    }

    /// Stops the edge-agent and starts a fresh one (new WireGuard key, no
    /// listeners) in the same namespace: what a droplet reboot looks like.
    pub fn restart_edge(&mut self) {
        self.edge_stop.cancel();
        drop(self.edge.take());
        self.edge_stop = CancellationToken::new();
        self.edge = Some(start_edge(
            &self.topo,
            self.edge_opts.clone(),
            self.edge_stop.clone(),
        ));
    }

    /// Stops the home-agent and starts it again from the same state (keys,
    /// port map): what a restart or an upgrade at home looks like. The
    /// admin socket stays.
    pub fn restart_home(&mut self) {
        self.home_stop.cancel();
        drop(self.home.take());
        self.home_stop = CancellationToken::new();
        self.home = Some(self.home_run.start(&self.topo, self.home_stop.clone()));
    }

    /// Blocks until the home-agent has a session newer than the
    /// `sessions`-th (after a restart of either side).
    pub fn wait_reconnected(&self, sessions: u64) {
        let mut status = self.status.clone();
        block_on(async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                status.wait_for(|s| s.connected && s.sessions > sessions),
            )
            .await
            .expect("the home-agent did not reconnect within 60 s")
            .expect("home-agent stopped");
        });
    }

    /// Blocks until the edge holds its pooled flows to home (they open in
    /// the background once the session is up).
    pub fn wait_for_pooled_flows(&self) {
        let home_flows = format!(
            "{}:{}",
            TunnelAddrs::DEFAULT.home(),
            skerry::flow::TCP_FLOW_PORT
        );
        crate::poll_until(Duration::from_secs(30), || {
            let established = crate::ss(
                &self.topo.edge,
                &["-Htn", "state", "established", "dst", &home_flows],
            );
            let open = established.lines().count();
            if open >= edge_agent::flow_pool::POOL_SIZE {
                Ok(())
            } else {
                Err(format!(
                    "the edge did not open its pooled flows to home: {open} open"
                ))
            }
        });
    }

    /// One request through the admin socket, as the CLI sends it.
    pub fn admin(&self, req: admin::Request) -> admin::Response {
        let path = self.admin_socket.clone();
        block_on(async move {
            // The socket appears once the home runtime has started.
            let deadline = tokio::time::Instant::now() + SETTLE;
            loop {
                match admin::request(&path, &req).await {
                    Ok(r) => return r,
                    Err(e) if tokio::time::Instant::now() > deadline => {
                        panic!("admin request: {e:#}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    }

    /// `home-agent ports add SPEC…`: the edge's answer per entry.
    pub fn add(&self, specs: &[&str]) -> admin::ChangeReport {
        match self.admin(admin::Request::Add {
            specs: specs.iter().map(ToString::to_string).collect(),
        }) {
            admin::Response::Changed(c) => c,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// `home-agent ports rm KEY…`.
    pub fn remove(&self, keys: &[&str]) -> admin::ChangeReport {
        match self.admin(admin::Request::Remove {
            keys: keys.iter().map(ToString::to_string).collect(),
        }) {
            admin::Response::Changed(c) => c,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    pub fn status_report(&self) -> admin::StatusReport {
        match self.admin(admin::Request::Status) {
            admin::Response::Status(s) => s,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// The edge's WireGuard public key, as the home's tunnel has it.
    /// Home's end of the tunnel, once up.
    pub fn home_tunnel(&self) -> TunnelHandle {
        self.status
            .borrow()
            .tunnel_handle
            .clone()
            .expect("the home-agent's tunnel is up")
    }

    pub fn edge_wireguard_key(&self) -> [u8; 32] {
        self.status
            .borrow()
            .tunnel_handle
            .as_ref()
            .and_then(|t| t.stats().peer_key)
            .expect("the home tunnel knows the edge's key")
    }

    /// Sends a new map and waits for the edge's answer.
    pub fn apply(&self, map: PortMap) -> PortsApplied {
        let g = map.generation();
        self.map.send_replace(map);
        self.wait_applied(g)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.home_stop.cancel();
        self.edge_stop.cancel();
        drop(self.home.take());
        drop(self.admin.take());
        drop(self.edge.take());
    }
}

/// What starts a home-agent, kept to start it again.
struct HomeRun {
    opts: HomeOptions,
    pki: HomePki,
    key: WireguardKey,
    map: watch::Receiver<PortMap>,
    status: watch::Sender<HomeStatus>,
}

impl HomeRun {
    fn start(&self, topo: &Topology, stop: CancellationToken) -> Background {
        let opts = self.opts.clone();
        let pki = self.pki.clone();
        let key = self.key.clone();
        let map = self.map.clone();
        let status = self.status.clone();
        spawn_in(&topo.home, move || async move {
            let run = || {
                home_agent::run(
                    opts.clone(),
                    &pki,
                    &key,
                    map.clone(),
                    status.clone(),
                    stop.clone(),
                )
            };
            if let Err(e) = retry_while_held("home-agent", run).await {
                panic!("home-agent failed: {e:#}");
            }
        })
    }
}

fn start_edge(
    topo: &Topology,
    mut opts: edge_agent::EdgeOptions,
    stop: CancellationToken,
) -> Background {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    opts.ready = Some(ready_tx);
    let edge = spawn_in(&topo.edge, move || async move {
        let run = || edge_agent::run(opts.clone(), stop.clone());
        if let Err(e) = retry_while_held("edge-agent", run).await {
            panic!("edge-agent failed: {e:#}");
        }
    });
    ready_rx
        .recv_timeout(SETTLE)
        .expect("the edge did not become ready");
    edge
}

/// Runs an agent, and runs it again while it fails because a port or a TUN
/// name it takes is still held, for up to [`HELD_FOR_AT_MOST`].
///
/// An agent restarted in a test starts in the same process the moment the
/// old one has stopped (a first start only meets what a test holds on
/// purpose), and the process keeps forking (`ip`, `ss`, `nft` for
/// tests running beside it). A child holds a copy of every descriptor until
/// it execs, so a socket or TUN device the old agent has just closed can
/// stay open for a moment longer. A real restart is a new process after the
/// old one has exited, and meets none of this.
async fn retry_while_held<F, Fut>(agent: &str, mut run: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = tokio::time::Instant::now() + HELD_FOR_AT_MOST;
    loop {
        match run().await {
            Err(e) if still_held(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(agent, error = %format!("{e:#}"), "what it needs is still held; starting again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            done => return done,
        }
    }
}

/// How long a forked child may hold what an agent needs before it execs.
const HELD_FOR_AT_MOST: Duration = Duration::from_secs(2);

/// A port in use, or a TUN device still attached to another descriptor.
fn still_held(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{AddrInUse, ResourceBusy};
    e.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| matches!(io.kind(), AddrInUse | ResourceBusy))
}

/// Runs a future on a fresh current-thread runtime in the calling thread's
/// namespace (the root namespace for a test thread).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    /// Binding a port held by another socket fails as the agents' binds do;
    /// the retry starts again once it is released and not otherwise.
    #[tokio::test]
    async fn an_agent_starts_again_once_what_it_needs_is_released() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("a loopback port");
        let addr = held.local_addr().expect("its address");
        let mut held = Some(held);
        let mut attempts = 0;
        let run = || {
            attempts += 1;
            if attempts == 3 {
                held = None; // what the child's exec does
            }
            async move {
                std::net::UdpSocket::bind(addr).context("binding the test port")?;
                Ok(())
            }
        };
        retry_while_held("test", run)
            .await
            .expect("started once released");
        assert_eq!(attempts, 3, "two tries while held, one after");
    }

    /// The case CI met: an edge started while its control port is held. Its
    /// first try gets as far as the TUN device and the WireGuard port, which
    /// must be let go for the next try to get them.
    #[test]
    fn an_edge_starts_once_its_control_port_is_released() {
        crate::require_root();
        crate::init_tracing();
        let topo = Topology::new();
        let scratch = crate::scratch_dir("skerry-held");
        let state_dir = scratch.path();
        let pki = HomePki::load_or_create(state_dir).expect("creating the test PKI");
        let opts = edge_agent::EdgeOptions::new(Bootstrap::from_pki(
            &pki,
            DEFAULT_CONTROL_PORT,
            DEFAULT_WIREGUARD_PORT,
            TunnelAddrs::DEFAULT,
        ));
        let held = crate::udp_socket_in(
            &topo.edge,
            std::net::SocketAddr::from(([0, 0, 0, 0], DEFAULT_CONTROL_PORT)),
        );
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let released = std::time::Instant::now();
            drop(held);
            released
        });
        let stop = CancellationToken::new();
        let edge = start_edge(&topo, opts, stop.clone());
        let ready = std::time::Instant::now();
        let released = releaser.join().expect("the releasing thread");
        assert!(
            ready > released,
            "the edge was ready before its port was free"
        );
        stop.cancel();
        edge.stop();
    }

    /// `run` also returns when the port map's sender goes away (an embedder
    /// done with it), not only at its shutdown token: its data plane must
    /// stop with it, not keep the TUN device and the flow listener.
    #[test]
    fn a_home_run_that_returns_leaves_no_data_plane_running() {
        crate::require_root();
        crate::init_tracing();
        let topo = Topology::new();
        let scratch = crate::scratch_dir("skerry-returned");
        let state_dir = scratch.path();
        let pki = HomePki::load_or_create(state_dir).expect("creating the test PKI");
        let key =
            WireguardKey::load_or_create(&state_dir.join("wireguard.key")).expect("WireGuard key");
        let edge_stop = CancellationToken::new();
        let edge = start_edge(
            &topo,
            edge_agent::EdgeOptions::new(Bootstrap::from_pki(
                &pki,
                DEFAULT_CONTROL_PORT,
                DEFAULT_WIREGUARD_PORT,
                TunnelAddrs::DEFAULT,
            )),
            edge_stop.clone(),
        );
        let (map_tx, map_rx) = watch::channel(port_map(1, &["tcp/9000=127.0.0.1:8000"]));
        let (status_tx, status) = watch::channel(HomeStatus::default());
        let opts = HomeOptions {
            edge: std::net::SocketAddr::from((topo.edge_home_side_v4, DEFAULT_CONTROL_PORT)),
            tun_name: "skerry-home".into(),
            udp_idle: Duration::from_secs(60),
            drain_grace: Duration::from_secs(30),
            dead_peer: DeadPeer::default(),
            requested_tunnel: None,
        };
        let (returned_tx, returned) = std::sync::mpsc::channel();
        // Never cancelled, and the thread's runtime lives on after `run`
        // returns, as an embedder's would.
        let never = CancellationToken::new();
        let home = spawn_in(&topo.home, move || async move {
            let r = home_agent::run(opts, &pki, &key, map_rx, status_tx, never).await;
            let _ = returned_tx.send(r.map_err(|e| format!("{e:#}")));
            std::future::pending::<()>().await;
        });
        let tun_up = || {
            let out = topo
                .home
                .exec("ip", &["-o", "link", "show"])
                .expect("ip link in the home namespace");
            String::from_utf8_lossy(&out.stdout).contains("skerry-home")
        };
        crate::poll_until(SETTLE, || {
            (status.borrow().applied.is_some() && tun_up())
                .then_some(())
                .ok_or_else(|| "the home-agent did not come up".to_string())
        });
        drop(map_tx);
        let r = returned
            .recv_timeout(SETTLE)
            .expect("run did not return once the map's sender was gone");
        assert_eq!(r, Ok(()));
        crate::poll_until(Duration::from_secs(5), || {
            (!tun_up())
                .then_some(())
                .ok_or_else(|| "the TUN device outlived run: its tasks still run".to_string())
        });
        drop(home);
        edge_stop.cancel();
        drop(edge);
    }

    #[tokio::test]
    async fn other_failures_are_not_tried_again() {
        let mut attempts = 0;
        let run = || {
            attempts += 1;
            async { Err(anyhow::anyhow!("bad bootstrap")) }
        };
        let e = retry_while_held("test", run).await.expect_err("fails");
        assert_eq!(format!("{e}"), "bad bootstrap");
        assert_eq!(attempts, 1);
    }

    #[tokio::test]
    async fn a_port_held_for_good_fails_after_the_limit() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("a loopback port");
        let addr = held.local_addr().expect("its address");
        let started = tokio::time::Instant::now();
        let run = || async move {
            std::net::UdpSocket::bind(addr).context("binding the test port")?;
            Ok(())
        };
        let e = retry_while_held("test", run).await.expect_err("still held");
        assert!(still_held(&e), "the bind's error is kept: {e:#}");
        assert!(started.elapsed() >= HELD_FOR_AT_MOST);
    }
}
