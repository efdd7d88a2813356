//! `--edge local`: a real edge-agent in a private network namespace on this
//! host, joined to it by a veth pair. No cloud account, same code path: the
//! home-agent dials it exactly as it would dial a droplet.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::thread::JoinHandle;

use anyhow::Context;
use skerry::bootstrap::{Bootstrap, DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT};
use skerry::netns::{NetNs, Side, Veth};
use skerry::paths::EdgeName;
use skerry::pki::HomePki;
use skerry::tunnel::TunnelAddrs;
use tokio_util::sync::CancellationToken;
use tracing::warn;

const EDGE_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A running local edge. Dropping it stops the edge and removes the
/// namespace and the veth pair.
pub struct LocalEdge {
    stop: CancellationToken,
    thread: Option<JoinHandle<Result<anyhow::Result<()>, skerry::netns::NetnsError>>>,
    // Field order is drop order: the link before the namespace.
    _veth: Veth,
    ns: NetNs,
    /// The edge's address on the veth: its "public" IPv4 address.
    pub public_v4: Ipv4Addr,
    pub public_v6: Ipv6Addr,
    pub control: SocketAddr,
}

impl std::fmt::Debug for LocalEdge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEdge")
            .field("namespace", &self.ns.name())
            .field("public_v4", &self.public_v4)
            .finish()
    }
}

impl LocalEdge {
    pub fn namespace(&self) -> &str {
        self.ns.name()
    }

    /// Starts an edge for `name` with a bootstrap made from `pki`.
    pub fn start(name: &EdgeName, pki: &HomePki, tunnel: TunnelAddrs) -> anyhow::Result<LocalEdge> {
        skerry::netns::require_root()?;
        let slot = slot(name.as_ref());
        let ns_name = format!("skerry-{name}");
        // The state lock is held, so a namespace of this name is a leftover
        // of an agent that died: nothing else can be using it.
        if std::path::Path::new("/run/netns").join(&ns_name).exists() {
            warn!(namespace = %ns_name, "removing a local edge namespace left by an earlier run");
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns_name])
                .status();
        }
        let ns = NetNs::create(&ns_name).context("creating the local edge's network namespace")?;
        let host_if = format!("skh{slot:05}");
        let edge_if = format!("ske{slot:05}");
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &host_if])
            .output();
        let veth =
            Veth::create(None, &host_if, Some(&ns), &edge_if).context("creating the veth pair")?;
        // 198.18.0.0/15 is reserved for benchmarks and tests: no real
        // network uses it, so it cannot collide with the user's LAN.
        // slot < 2^14, so each /30 fits in the low 16 bits of 198.19.0.0/16.
        let subnet = u32::from(Ipv4Addr::new(198, 19, 0, 0)) | (slot << 2);
        let host_v4 = Ipv4Addr::from(subnet + 1);
        let public_v4 = Ipv4Addr::from(subnet + 2);
        let host_v6: Ipv6Addr = format!("fd5e:e4a7:{slot:x}::1").parse()?;
        let public_v6: Ipv6Addr = format!("fd5e:e4a7:{slot:x}::2").parse()?;
        veth.add_addr(Side::A, &format!("{host_v4}/30"))?;
        veth.add_addr(Side::B, &format!("{public_v4}/30"))?;
        veth.add_addr(Side::A, &format!("{host_v6}/64"))?;
        veth.add_addr(Side::B, &format!("{public_v6}/64"))?;
        ns.ip(&["route", "add", "default", "via", &host_v4.to_string()])?;

        let bootstrap =
            Bootstrap::from_pki(pki, DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT, tunnel);
        let mut opts = edge_agent::EdgeOptions::new(bootstrap);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        opts.ready = Some(ready_tx);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = ns
            .spawn_runtime("local-edge", move || edge_agent::run(opts, token))
            .context("starting the local edge thread")?;
        let mut edge = LocalEdge {
            stop,
            thread: Some(thread),
            _veth: veth,
            ns,
            public_v4,
            public_v6,
            control: SocketAddr::from((public_v4, DEFAULT_CONTROL_PORT)),
        };
        // Dialing before the edge is bound costs a QUIC retransmit (1 s).
        if ready_rx.recv_timeout(EDGE_START_TIMEOUT).is_err() {
            let why = match edge.stop_inner() {
                Err(e) => format!("{e:#}"),
                Ok(()) => format!("not ready within {EDGE_START_TIMEOUT:?}"),
            };
            anyhow::bail!("the local edge did not start: {why}");
        }
        Ok(edge)
    }

    /// Whether the edge thread has stopped (it failed to start, say).
    pub fn has_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the edge and returns how it ended.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        match self.thread.take().map(|t| t.join()) {
            None => Ok(()),
            Some(Ok(Ok(r))) => r,
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(_)) => Err(anyhow::anyhow!("the local edge thread panicked")),
        }
    }
}

impl Drop for LocalEdge {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            warn!(error = %format!("{e:#}"), "local edge ended with an error");
        }
    }
}

/// A small number derived from the name, so that two local edges of
/// different names get different links and subnets.
fn slot(name: &str) -> u32 {
    crate::name_hash(name) % 16_384
}
