//! When a relayed connection's peer has gone silent for good.
//!
//! A relay stands between two connections, so each end's own dead-peer
//! detection stops at the relay: a target's TCP keepalive (sshd has it on)
//! is answered by home's kernel, a client's by the edge's. Without probes
//! of their own, a client that vanishes without a word (a phone leaving
//! its network, a NAT mapping gone) or an edge that is gone for good holds
//! its relay, its in-tunnel flow and the target's connection forever: a
//! game server's slot, an SSH session. So every connection a relay holds
//! (public, in-tunnel, target) probes its peer once idle, and one that
//! answers no probe is given up; the relay then resets the other side.
//! Probes are answered by the peer's kernel, so a connection that is idle
//! but alive is never cut, and an outage shorter than the whole probing
//! (a home router's reboot) is ridden out, as TCP does.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// TCP keepalive timing: the first probe after `idle` without traffic,
/// then one every `interval`; the peer is given up after `probes`
/// unanswered ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadPeer {
    pub idle: Duration,
    pub interval: Duration,
    pub probes: u32,
}

impl Default for DeadPeer {
    /// Twenty minutes of silence (ten before the first probe, then ten
    /// probes a minute apart): longer than a home router's reboot or a
    /// laptop's short sleep (an SSH session survives it, as it would with
    /// nothing between), short enough that a vanished client's slot comes
    /// back within the half hour, not after hours (the kernel's own timing,
    /// for a program that asks for keepalive without one, gives up after
    /// two hours and eleven minutes).
    fn default() -> Self {
        DeadPeer {
            idle: Duration::from_secs(600),
            interval: Duration::from_secs(60),
            probes: 10,
        }
    }
}

impl DeadPeer {
    /// Turns the probes on for `socket`. On a listener it is set once for
    /// all: accepted connections inherit it.
    pub fn watch<S: AsFd>(&self, socket: &S) -> io::Result<()> {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.interval)
            .with_retries(self.probes);
        socket2::SockRef::from(socket).set_tcp_keepalive(&keepalive)
    }

    /// How long a peer that answers nothing at all is kept (keepalive probes
    /// only while nothing is unacknowledged: with data in flight, TCP's own
    /// retransmission limit decides, about 15 minutes).
    pub fn gives_up_after(&self) -> Duration {
        self.idle + self.interval * self.probes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_probes(socket: &impl AsFd, d: DeadPeer) {
        let s = socket2::SockRef::from(socket);
        assert!(s.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(s.tcp_keepalive_time().expect("TCP_KEEPIDLE"), d.idle);
        assert_eq!(
            s.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            d.interval
        );
        assert_eq!(s.tcp_keepalive_retries().expect("TCP_KEEPCNT"), d.probes);
    }

    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_probes() {
        let d = DeadPeer {
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            probes: 4,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        d.watch(&listener).expect("keepalive on the listener");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        assert_probes(&accepted, d);
        assert!(
            !socket2::SockRef::from(&client)
                .keepalive()
                .expect("SO_KEEPALIVE")
        );
        d.watch(&client).expect("keepalive on a connection");
        assert_probes(&client, d);
        assert_eq!(d.gives_up_after(), Duration::from_secs(19));
    }
}
