//! A cap on how often one kind of event that strangers can cause is logged.
//!
//! The edge's control port is public: every scanner that tries a QUIC
//! handshake there is refused, and a warning for each would let anyone fill
//! the droplet's journal. The first of a burst is worth reading in full
//! (it is also what a misconfigured home-agent looks like); the rest are
//! counted and the count goes out with the next one logged.

use std::time::{Duration, Instant};

/// At most `per_window` events logged in each `window`; the others counted.
///
/// Windows are fixed, not sliding: up to twice `per_window` can come out
/// close together around a window's end. A count held back is reported with
/// the next event logged, whenever that comes.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    per_window: u32,
    /// When the current window began; `None` before the first event.
    started: Option<Instant>,
    logged: u32,
    /// Events not logged since the last one that was.
    held_back: u64,
}

impl LogBudget {
    pub fn new(window: Duration, per_window: u32) -> Self {
        LogBudget {
            window,
            per_window,
            started: None,
            logged: 0,
            held_back: 0,
        }
    }

    /// Counts an event at `now`. `Some(n)`: log it, and say that `n` like it
    /// went unlogged before it; `None`: leave it out.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let in_window = self
            .started
            .is_some_and(|s| now.saturating_duration_since(s) < self.window);
        if !in_window {
            self.started = Some(now);
            self.logged = 0;
        }
        if self.logged >= self.per_window {
            self.held_back += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn a_burst_is_logged_up_to_the_budget_and_the_rest_counted() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(MINUTE, 3);
        let seen: Vec<_> = (0..10)
            .map(|i| b.admit(t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(&seen[..3], &[Some(0), Some(0), Some(0)]);
        assert!(seen[3..].iter().all(Option::is_none), "{seen:?}");
        // The next window: logged again, with the seven held back.
        assert_eq!(b.admit(t0 + MINUTE), Some(7));
        assert_eq!(b.admit(t0 + MINUTE), Some(0));
    }

    #[test]
    fn events_spread_out_are_all_logged() {
        let t0 = Instant::now();
        let mut b = LogBudget::new(MINUTE, 1);
        for i in 0..5 {
            assert_eq!(b.admit(t0 + MINUTE * i), Some(0));
        }
    }

    #[test]
    fn a_clock_that_goes_back_does_not_open_a_new_window() {
        let t0 = Instant::now() + MINUTE;
        let mut b = LogBudget::new(MINUTE, 1);
        assert_eq!(b.admit(t0), Some(0));
        assert_eq!(b.admit(t0 - Duration::from_secs(1)), None);
    }
}
