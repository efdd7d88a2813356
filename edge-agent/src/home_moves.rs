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

/// How many times one move is told, at most.
const TELLS: u8 = 3;
/// How long home has to answer before it is told again.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// Where the session last heard home from, and what it has told it.
#[derive(Debug)]
pub struct MoveWatch {
    control_at: SocketAddr,
    tells_left: u8,
    last_told: Option<Instant>,
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Nothing to do.
    Quiet,
    /// Home's control traffic comes from `to` now: tell home.
    Moved { from: SocketAddr, to: SocketAddr },
    /// Told, but the tunnel has not heard from the new address: tell again.
    Unanswered { at: SocketAddr },
}

impl MoveWatch {
    pub fn new(control_at: SocketAddr) -> Self {
        MoveWatch {
            control_at: canonical(control_at),
            tells_left: 0,
            last_told: None,
        }
    }

    /// `control_at`: where QUIC hears home from now; `tunnel_at`: where the
    /// tunnel does. The caller tells home when the answer is not
    /// [`Check::Quiet`], and reports it with [`MoveWatch::told`].
    pub fn check(
        &mut self,
        control_at: SocketAddr,
        tunnel_at: Option<SocketAddr>,
        now: Instant,
    ) -> Check {
        let control_at = canonical(control_at);
        if control_at != self.control_at {
            let from = std::mem::replace(&mut self.control_at, control_at);
            self.tells_left = TELLS;
            self.last_told = None;
            return Check::Moved {
                from,
                to: control_at,
            };
        }
        // Behind one NAT the tunnel's port differs from the control's, so
        // only the address says whether the tunnel has followed.
        let followed = tunnel_at.is_some_and(|t| t.ip().to_canonical() == control_at.ip());
        if followed {
            self.tells_left = 0;
        }
        let due = self
            .last_told
            .is_some_and(|t| now.saturating_duration_since(t) >= ANSWER_WITHIN);
        if self.tells_left > 0 && due {
            Check::Unanswered { at: control_at }
        } else {
            Check::Quiet
        }
    }

    /// Home was told (or cannot be: `sent` false, an older release).
    pub fn told(&mut self, sent: bool, now: Instant) {
        self.tells_left = if sent {
            self.tells_left.saturating_sub(1)
        } else {
            0
        };
        self.last_told = Some(now);
    }
}

/// The dual-stack socket reports IPv4 peers as mapped IPv6 addresses.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_move_is_told_until_the_tunnel_follows() {
        let t0 = Instant::now();
        let old = addr("[::ffff:198.51.100.7]:40000");
        let mut w = MoveWatch::new(old);
        let tunnel_old = Some(addr("198.51.100.7:51000"));
        assert_eq!(w.check(old, tunnel_old, t0), Check::Quiet);

        let new = addr("203.0.113.9:41000");
        assert_eq!(
            w.check(new, tunnel_old, t0),
            Check::Moved {
                from: addr("198.51.100.7:40000"),
                to: new
            }
        );
        w.told(true, t0);
        // Home has a second to answer.
        assert_eq!(
            w.check(new, tunnel_old, t0 + Duration::from_millis(500)),
            Check::Quiet
        );
        let t1 = t0 + ANSWER_WITHIN;
        assert_eq!(w.check(new, tunnel_old, t1), Check::Unanswered { at: new });
        w.told(true, t1);
        // The tunnel hears home from the new address (another port: NAT).
        let tunnel_new = Some(addr("[::ffff:203.0.113.9]:52000"));
        assert_eq!(w.check(new, tunnel_new, t1 + ANSWER_WITHIN), Check::Quiet);
        assert_eq!(
            w.check(new, tunnel_old, t1 + 5 * ANSWER_WITHIN),
            Check::Quiet
        );
    }

    #[test]
    fn a_move_is_told_three_times_at_most() {
        let t0 = Instant::now();
        let mut w = MoveWatch::new(addr("198.51.100.7:40000"));
        let new = addr("203.0.113.9:41000");
        let mut tells = 0;
        for i in 0..20 {
            let now = t0 + i * ANSWER_WITHIN / 2;
            if w.check(new, None, now) != Check::Quiet {
                tells += 1;
                w.told(true, now);
            }
        }
        assert_eq!(tells, TELLS);
        // A next move is told again.
        let later = t0 + 20 * ANSWER_WITHIN;
        assert!(matches!(
            w.check(addr("192.0.2.1:1"), None, later),
            Check::Moved { .. }
        ));
    }

    #[test]
    fn a_home_that_cannot_be_told_is_not_asked_again() {
        let t0 = Instant::now();
        let mut w = MoveWatch::new(addr("198.51.100.7:40000"));
        let new = addr("203.0.113.9:41000");
        assert!(matches!(w.check(new, None, t0), Check::Moved { .. }));
        w.told(false, t0);
        for i in 1..10 {
            assert_eq!(w.check(new, None, t0 + i * ANSWER_WITHIN), Check::Quiet);
        }
    }
}
