//! The edge's public listeners, made to match the port map the home sends.
//!
//! The table works port by port: a port in both the old and the new map
//! keeps its listener and its connections (only its policy changes, live);
//! a new port is bound before any removed port is closed; a removed port
//! stops accepting at once and its open flows drain for a grace period.
//! Each entry gets its own answer, so one bad entry never holds back the
//! others.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use skerry::dead_peer::DeadPeer;
use skerry::portmap::{PortKey, PortPolicy, Protocol, PublicPort};
use skerry::protocol::{ApplyPorts, EntryResult, EntryStatus};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::relay::{self, RelayContext};

/// Most public ports one map may open, across all entries.
pub const MAX_PUBLIC_PORTS: usize = 20_000;
/// Backlog of each public TCP listener.
const LISTEN_BACKLOG: i32 = 1024;

/// Ports the edge uses itself and never gives to a map.
#[derive(Debug, Clone, Copy)]
pub struct Reserved {
    pub control_port: u16,
    pub wireguard_port: u16,
}

impl Reserved {
    fn contains(&self, protocol: Protocol, port: u16) -> bool {
        match protocol {
            // The TCP control port is kept for the WebSocket fallback.
            Protocol::Tcp => port == self.control_port,
            Protocol::Udp => port == self.control_port || port == self.wireguard_port,
        }
    }
}

/// State shared between a port's listener and its flows.
#[derive(Debug)]
pub struct PortShared {
    pub protocol: Protocol,
    pub port: u16,
    policy: RwLock<PortPolicy>,
    /// Open TCP connections (UDP flows are counted in the flow table).
    pub active: AtomicUsize,
    /// Cancelled when the port is removed and its grace period is over.
    pub flows: CancellationToken,
}

impl PortShared {
    pub fn policy(&self) -> PortPolicy {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_policy(&self, policy: PortPolicy) {
        match self.policy.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
    }
}

#[derive(Debug)]
struct OpenPort {
    shared: Arc<PortShared>,
    /// Stops the listener (or the UDP receive loop).
    stop: CancellationToken,
}

/// A snapshot of one open port, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortStatus {
    pub protocol: Protocol,
    pub port: u16,
    pub open_flows: usize,
}

#[derive(Debug)]
pub struct PortTable {
    reserved: Reserved,
    open: BTreeMap<(Protocol, u16), OpenPort>,
    ctx: Arc<RelayContext>,
    generation: u64,
}

impl PortTable {
    pub fn new(reserved: Reserved, ctx: Arc<RelayContext>) -> Self {
        PortTable {
            reserved,
            open: BTreeMap::new(),
            ctx,
            generation: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn status(&self) -> Vec<PortStatus> {
        self.open
            .values()
            .map(|p| PortStatus {
                protocol: p.shared.protocol,
                port: p.shared.port,
                open_flows: match p.shared.protocol {
                    Protocol::Tcp => p.shared.active.load(Ordering::Relaxed),
                    Protocol::Udp => self.ctx.udp_flow_count(p.shared.port),
                },
            })
            .collect()
    }

    /// Makes the open ports match `map`; answers every entry.
    pub fn apply(&mut self, map: ApplyPorts) -> Vec<EntryResult> {
        let mut results = Vec::with_capacity(map.entries.len());
        let mut wanted: HashMap<(Protocol, u16), PortPolicy> = HashMap::new();
        let mut claimed: BTreeMap<(Protocol, u16), PortKey> = BTreeMap::new();
        let mut total = 0usize;

        for entry in &map.entries {
            let key = PortKey {
                protocol: entry.protocol,
                ports: entry.ports,
            };
            let status = self.admit(entry, &claimed, total);
            if status.is_ok() {
                let status = self.open_entry(entry);
                if status.is_ok() {
                    total += entry.ports.iter().count();
                    for port in entry.ports.iter() {
                        wanted.insert((entry.protocol, port), entry.policy.clone());
                        claimed.insert((entry.protocol, port), key);
                    }
                }
                results.push(EntryResult { key, status });
            } else {
                results.push(EntryResult { key, status });
            }
        }

        // Close what the map no longer has, after the new ports are open.
        let removed: Vec<(Protocol, u16)> = self
            .open
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        let grace = Duration::from_secs(u64::from(map.drain_grace_secs));
        for k in removed {
            if let Some(p) = self.open.remove(&k) {
                self.close(p, grace);
            }
        }
        self.generation = map.generation;
        info!(
            generation = map.generation,
            open = self.open.len(),
            refused = results.iter().filter(|r| !r.status.is_ok()).count(),
            "port map applied"
        );
        results
    }

    fn admit(
        &self,
        entry: &PublicPort,
        claimed: &BTreeMap<(Protocol, u16), PortKey>,
        total: usize,
    ) -> EntryStatus {
        if entry
            .ports
            .iter()
            .any(|p| self.reserved.contains(entry.protocol, p))
        {
            return EntryStatus::Reserved;
        }
        if let Some(other) = entry
            .ports
            .iter()
            .find_map(|p| claimed.get(&(entry.protocol, p)))
        {
            return EntryStatus::Invalid(format!("overlaps {other} in the same map"));
        }
        let n = entry.ports.iter().count();
        if total + n > MAX_PUBLIC_PORTS {
            return EntryStatus::Invalid(format!(
                "the map would open more than {MAX_PUBLIC_PORTS} public ports"
            ));
        }
        EntryStatus::Listening
    }

    /// Opens the entry's ports that are not open yet; keeps the others and
    /// updates their policy. All or nothing for the newly opened ones.
    fn open_entry(&mut self, entry: &PublicPort) -> EntryStatus {
        let mut fresh: Vec<((Protocol, u16), OpenPort)> = Vec::new();
        for port in entry.ports.iter() {
            let k = (entry.protocol, port);
            if self.open.contains_key(&k) {
                continue;
            }
            match self.bind(entry.protocol, port, entry.policy.clone()) {
                Ok(p) => fresh.push((k, p)),
                Err(status) => {
                    for (_, p) in fresh {
                        p.stop.cancel();
                        p.shared.flows.cancel();
                    }
                    return status;
                }
            }
        }
        for port in entry.ports.iter() {
            if let Some(p) = self.open.get(&(entry.protocol, port)) {
                p.shared.set_policy(entry.policy.clone());
            }
        }
        self.open.extend(fresh);
        EntryStatus::Listening
    }

    fn bind(
        &self,
        protocol: Protocol,
        port: u16,
        policy: PortPolicy,
    ) -> Result<OpenPort, EntryStatus> {
        let shared = Arc::new(PortShared {
            protocol,
            port,
            policy: RwLock::new(policy),
            active: AtomicUsize::new(0),
            flows: self.ctx.stopping.child_token(),
        });
        let stop = CancellationToken::new();
        match protocol {
            Protocol::Tcp => {
                let listener = bind_public_tcp(port, &self.ctx.dead_peer)
                    .map_err(|e| bind_status(port, &e))?;
                tokio::spawn(relay::tcp_accept_loop(
                    listener,
                    shared.clone(),
                    self.ctx.clone(),
                    stop.clone(),
                ));
            }
            Protocol::Udp => {
                let socket = Arc::new(bind_public_udp(port).map_err(|e| bind_status(port, &e))?);
                self.ctx.add_udp_socket(port, socket.clone());
                tokio::spawn(relay::udp_receive_loop(
                    socket,
                    shared.clone(),
                    self.ctx.clone(),
                    stop.clone(),
                ));
            }
        }
        Ok(OpenPort { shared, stop })
    }

    fn close(&self, p: OpenPort, grace: Duration) {
        p.stop.cancel();
        if p.shared.protocol == Protocol::Udp {
            self.ctx.remove_udp_socket(p.shared.port);
        }
        let shared = p.shared;
        info!(protocol = %shared.protocol, port = shared.port, "port closed; open flows drain");
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            shared.flows.cancel();
        });
    }

    /// Closes everything now (shutdown).
    pub fn close_all(&mut self) {
        for (_, p) in std::mem::take(&mut self.open) {
            p.stop.cancel();
            p.shared.flows.cancel();
        }
    }
}

fn bind_status(port: u16, e: &std::io::Error) -> EntryStatus {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => EntryStatus::InUse,
        std::io::ErrorKind::PermissionDenied => EntryStatus::Invalid(format!(
            "port {port}: permission denied (the edge needs CAP_NET_BIND_SERVICE)"
        )),
        _ => {
            warn!(port, error = %e, "cannot bind public port");
            EntryStatus::Invalid(format!("port {port}: {e}"))
        }
    }
}

/// A listening socket on every address of the edge, IPv6 and IPv4 (one
/// dual-stack socket; IPv4 alone where IPv6 is disabled).
pub fn bind_public_tcp(port: u16, dead_peer: &DeadPeer) -> std::io::Result<TcpListener> {
    let socket = match dual_stack(Type::STREAM, port) {
        Ok(s) => s,
        Err(e) if v6_unavailable(&e) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s
        }
        Err(e) => return Err(e),
    };
    // Accepted connections inherit it: one system call per port, not per
    // connection. Requests and answers leave at once, not after an ACK.
    socket.set_tcp_nodelay(true)?;
    // A client that vanishes without a word (see `skerry::dead_peer`).
    dead_peer.watch(&socket)?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

pub fn bind_public_udp(port: u16) -> std::io::Result<UdpSocket> {
    let socket = match dual_stack(Type::DGRAM, port) {
        Ok(s) => s,
        Err(e) if v6_unavailable(&e) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
            s.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            s
        }
        Err(e) => return Err(e),
    };
    skerry::tunnel::driver::size_socket_buffers(&socket);
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

fn dual_stack(ty: Type, port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, ty, None)?;
    s.set_only_v6(false)?;
    if ty == Type::STREAM {
        // Rebinding a port whose old connections sit in TIME_WAIT; a port
        // another program listens on still fails with "in use".
        s.set_reuse_address(true)?;
    }
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

fn v6_unavailable(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay never sets TCP_NODELAY on a public connection: it relies
    /// on the listener's being inherited.
    #[tokio::test]
    async fn public_connections_inherit_nodelay() {
        let listener = bind_public_tcp(0, &DeadPeer::default()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "accepted without TCP_NODELAY");
    }
}
