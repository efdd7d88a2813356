//! Noticing that the home-agent moved, without I/O.
//!
//! The tunnel sends to wherever home's last authenticated packet came from;
//! QUIC follows a move by itself, within one of home's keep-alives. So the
//! control session, looking often at where its traffic comes from, is the
//! first to know, and tells home, which answers with a tunnel packet from
//! there. The answer is one datagram and may be lost: home is told again,
//! a few times, until the tunnel has heard from the new address.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use skerry::protocol::Untold;

/// How many times one move is told, at most.
const TELLS: u8 = 3;
/// How long home has to answer before it is told again.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Where the session last heard home from, and a move not yet followed.
#[derive(Debug)]
pub struct MoveWatch {
    control_at: SocketAddr,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    /// The tunnel's endpoint when the move was seen: a router that maps
    /// anew may keep the address and change only the ports, so the tunnel
    /// has followed when its endpoint is at the new address and is not
    /// this one.
    stale: Option<SocketAddr>,
    tells: u8,
    last_told: Option<Instant>,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do.
    Quiet,
    /// Home's control traffic comes from `to` now: tell home.
    Moved { from: SocketAddr, to: SocketAddr },
    /// Not told yet, or told without the tunnel hearing from the new
    /// address since: tell again.
    Unanswered { at: SocketAddr },
    /// Told as often as it is worth: the tunnel follows home's next packet
    /// of its own (its keepalive).
    GaveUp { at: SocketAddr },
}

impl MoveWatch {
    pub fn new(control_at: SocketAddr) -> Self {
        MoveWatch {
            control_at: canonical(control_at),
            pending: None,
        }
    }

    /// `control_at`: where QUIC hears home from now; `tunnel_at`: where the
    /// tunnel does. When the answer is `Moved` or `Unanswered`, the caller
    /// tries to tell home and reports how that went with [`MoveWatch::told`].
    pub fn check(
        &mut self,
        control_at: SocketAddr,
        tunnel_at: Option<SocketAddr>,
        now: Instant,
    ) -> Check {
        let control_at = canonical(control_at);
        let tunnel_at = tunnel_at.map(canonical);
        if control_at != self.control_at {
            let from = std::mem::replace(&mut self.control_at, control_at);
            self.pending = Some(Pending {
                stale: tunnel_at,
                tells: 0,
                last_told: None,
            });
            return Check::Moved {
                from,
                to: control_at,
            };
        }
        let Some(p) = &self.pending else {
            return Check::Quiet;
        };
        // Behind one NAT the tunnel's port differs from the control's, so
        // the address says where the tunnel is.
        let followed = tunnel_at.is_some_and(|t| t.ip() == control_at.ip() && Some(t) != p.stale);
        let waiting = p
            .last_told
            .is_some_and(|t| now.saturating_duration_since(t) < ANSWER_WITHIN);
        if followed {
            self.pending = None;
            Check::Quiet
        } else if waiting {
            Check::Quiet
        } else if p.tells >= TELLS {
            self.pending = None;
            Check::GaveUp { at: control_at }
        } else {
            Check::Unanswered { at: control_at }
        }
    }

    /// How telling home went: `Ok` sent; `NotEstablished` is tried again at
    /// the next check; `OlderRelease` ends it.
    pub fn told(&mut self, outcome: Result<(), Untold>, now: Instant) {
        match outcome {
            Ok(()) => {
                if let Some(p) = &mut self.pending {
                    p.tells += 1;
                    p.last_told = Some(now);
                }
            }
            Err(Untold::NotEstablished) => {}
            Err(Untold::OlderRelease) => self.pending = None,
        }
    }
}

/// The dual-stack sockets report IPv4 peers as mapped IPv6 addresses.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Runs checks every quarter second from `t0` for `secs`, telling home
    /// each time it is asked for (`Ok`), with the tunnel at `tunnel_at`;
    /// what the checks said, but `Quiet`.
    fn run(
        w: &mut MoveWatch,
        control_at: SocketAddr,
        tunnel_at: Option<SocketAddr>,
        t0: Instant,
        secs: u32,
    ) -> Vec<Check> {
        let mut said = Vec::new();
        for i in 0..secs * 4 {
            let now = t0 + i * Duration::from_millis(250);
            match w.check(control_at, tunnel_at, now) {
                Check::Quiet => {}
                c @ (Check::Moved { .. } | Check::Unanswered { .. }) => {
                    w.told(Ok(()), now);
                    said.push(c);
                }
                c => said.push(c),
            }
        }
        said
    }

    #[test]
    fn a_move_is_told_until_the_tunnel_follows() {
        let t0 = Instant::now();
        let old = addr("[::ffff:198.51.100.7]:40000");
        let mut w = MoveWatch::new(old);
        let tunnel_old = Some(addr("[::ffff:198.51.100.7]:51000"));
        assert_eq!(w.check(old, tunnel_old, t0), Check::Quiet);

        let new = addr("203.0.113.9:41000");
        assert_eq!(
            w.check(new, tunnel_old, t0),
            Check::Moved {
                from: addr("198.51.100.7:40000"),
                to: new
            }
        );
        w.told(Ok(()), t0);
        // Home has a second to answer.
        assert_eq!(
            w.check(new, tunnel_old, t0 + Duration::from_millis(500)),
            Check::Quiet
        );
        let t1 = t0 + ANSWER_WITHIN;
        assert_eq!(w.check(new, tunnel_old, t1), Check::Unanswered { at: new });
        w.told(Ok(()), t1);
        // The tunnel hears home from the new address (another port: NAT).
        let tunnel_new = Some(addr("[::ffff:203.0.113.9]:52000"));
        assert!(run(&mut w, new, tunnel_new, t1 + ANSWER_WITHIN, 10).is_empty());
    }

    #[test]
    fn a_move_is_told_three_times_then_left_to_the_keepalive() {
        let t0 = Instant::now();
        let mut w = MoveWatch::new(addr("198.51.100.7:40000"));
        let new = addr("203.0.113.9:41000");
        let said = run(&mut w, new, None, t0, 10);
        assert!(matches!(said[0], Check::Moved { .. }), "{said:?}");
        assert_eq!(
            said[1..],
            [
                Check::Unanswered { at: new },
                Check::Unanswered { at: new },
                Check::GaveUp { at: new }
            ]
        );
        // A next move is told again.
        let later = t0 + Duration::from_secs(20);
        assert!(matches!(
            w.check(addr("192.0.2.1:1"), None, later),
            Check::Moved { .. }
        ));
    }

    /// A router that maps anew after a reboot may keep its address: only
    /// the ports change, and the tunnel's old endpoint is at the same
    /// address as the control's new one. It has followed only once its
    /// endpoint changes.
    #[test]
    fn a_move_of_ports_alone_is_told_until_the_tunnel_endpoint_changes() {
        let t0 = Instant::now();
        let mut w = MoveWatch::new(addr("198.51.100.7:40000"));
        let tunnel_old = Some(addr("198.51.100.7:51000"));
        let new = addr("198.51.100.7:40001");
        let said = run(&mut w, new, tunnel_old, t0, 2);
        assert_eq!(said.len(), 2, "told, and again: {said:?}");
        let t1 = t0 + Duration::from_secs(2);
        assert!(run(&mut w, new, Some(addr("198.51.100.7:51001")), t1, 10).is_empty());
    }

    #[test]
    fn a_move_before_the_session_is_up_is_told_once_it_is() {
        let t0 = Instant::now();
        let mut w = MoveWatch::new(addr("198.51.100.7:40000"));
        let new = addr("203.0.113.9:41000");
        assert!(matches!(w.check(new, None, t0), Check::Moved { .. }));
        w.told(Err(Untold::NotEstablished), t0);
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(w.check(new, None, t1), Check::Unanswered { at: new });
    }

    #[test]
    fn a_home_that_cannot_read_it_is_not_asked_again() {
        let t0 = Instant::now();
        let mut w = MoveWatch::new(addr("198.51.100.7:40000"));
        let new = addr("203.0.113.9:41000");
        assert!(matches!(w.check(new, None, t0), Check::Moved { .. }));
        w.told(Err(Untold::OlderRelease), t0);
        for i in 1..10 {
            assert_eq!(w.check(new, None, t0 + i * ANSWER_WITHIN), Check::Quiet);
        }
    }

    /// Back where it was: told once more, and the tunnel, still there (or
    /// back there), follows.
    #[test]
    fn a_move_back_is_a_move() {
        let t0 = Instant::now();
        let old = addr("198.51.100.7:40000");
        let mut w = MoveWatch::new(old);
        let new = addr("203.0.113.9:41000");
        let tunnel_old = Some(addr("198.51.100.7:51000"));
        assert!(matches!(w.check(new, tunnel_old, t0), Check::Moved { .. }));
        w.told(Ok(()), t0);
        // It moves back before the tunnel followed.
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(
            w.check(old, tunnel_old, t1),
            Check::Moved { from: new, to: old }
        );
        w.told(Ok(()), t1);
        // Home answers from where it is: the same endpoint as before.
        let said = run(&mut w, old, tunnel_old, t1 + ANSWER_WITHIN, 10);
        assert!(
            said.len() <= 3,
            "a few tells at most, since the endpoint does not change: {said:?}"
        );
    }
}
