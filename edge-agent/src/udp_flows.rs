//! The edge's table of UDP flows, without I/O.
//!
//! A flow is one client address on one public port. The edge gives it an id
//! that travels with every datagram through the tunnel; replies from home
//! name only that id, so the edge alone decides where a reply goes. Flows
//! expire after an idle period.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub public_port: u16,
    pub client: SocketAddr,
    last_seen: Instant,
    /// Home has sent a datagram back on it.
    answered: bool,
}

/// Flows open at once on all ports, at most. A flow costs little here, but
/// a socket and a task at home, and anyone can open one with a datagram
/// from a new source port (or a spoofed source): without a cap a flood
/// would fill both machines' memory. Each client address playing or
/// resolving at once is one flow, so this is far above what a home serves.
/// When it is reached, a new client takes the place of the oldest flow
/// that home never answered (as conntrack drops an unreplied entry early):
/// a flood of spoofed sources fills the table with such flows, and would
/// otherwise keep every new client out.
pub const MAX_FLOWS: usize = skerry::flow::MAX_UDP_FLOWS;

/// Why a new flow was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The port's `max-conns` cap is reached.
    PortFull,
    /// [`MAX_FLOWS`] are open, and home has answered every one.
    TableFull,
}

#[derive(Debug, Default)]
pub struct FlowTable {
    by_client: HashMap<(u16, SocketAddr), u32>,
    by_id: HashMap<u32, Flow>,
    per_port: HashMap<u16, usize>,
    /// Flows home has not answered, oldest first (and flows since answered
    /// or gone, skipped when met and pruned at each expiry).
    unanswered: VecDeque<u32>,
    next_id: u32,
}

impl FlowTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The flow of a datagram from `client` to `public_port`, opened if new.
    pub fn inbound(
        &mut self,
        public_port: u16,
        client: SocketAddr,
        max: Option<u32>,
        now: Instant,
    ) -> Result<u32, Refused> {
        if let Some(&id) = self.by_client.get(&(public_port, client)) {
            if let Some(f) = self.by_id.get_mut(&id) {
                f.last_seen = now;
            }
            return Ok(id);
        }
        let open = self.per_port.get(&public_port).copied().unwrap_or(0);
        // A port at its cap makes room as the table does: otherwise a few
        // spoofed sources a minute would keep every new client of a
        // `max-conns` port out.
        if let Some(max) = max
            && u64::try_from(open).unwrap_or(u64::MAX) >= u64::from(max)
            && !self.drop_oldest_unanswered(Some(public_port))
        {
            return Err(Refused::PortFull);
        }
        if self.by_id.len() >= MAX_FLOWS && !self.drop_oldest_unanswered(None) {
            return Err(Refused::TableFull);
        }
        let id = self.fresh_id();
        self.by_client.insert((public_port, client), id);
        self.by_id.insert(
            id,
            Flow {
                public_port,
                client,
                last_seen: now,
                answered: false,
            },
        );
        self.unanswered.push_back(id);
        *self.per_port.entry(public_port).or_default() += 1;
        Ok(id)
    }

    /// Where a reply for flow `id` goes; a reply keeps the flow alive.
    pub fn outbound(&mut self, id: u32, now: Instant) -> Option<Flow> {
        let f = self.by_id.get_mut(&id)?;
        f.last_seen = now;
        f.answered = true;
        Some(*f)
    }

    /// Removes flows idle for longer than `idle`; returns how many.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> usize {
        let dead: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last_seen) > idle)
            .map(|(&id, _)| id)
            .collect();
        for id in &dead {
            self.remove(*id);
        }
        let by_id = &self.by_id;
        self.unanswered
            .retain(|id| by_id.get(id).is_some_and(|f| !f.answered));
        dead.len()
    }

    /// Makes room by dropping the oldest flow home never answered (of
    /// `port`, if given); false when home has answered every such flow.
    fn drop_oldest_unanswered(&mut self, port: Option<u16>) -> bool {
        let unanswered = |f: &Flow| !f.answered && port.is_none_or(|p| f.public_port == p);
        let Some(i) = self
            .unanswered
            .iter()
            .position(|id| self.by_id.get(id).is_some_and(unanswered))
        else {
            return false;
        };
        // Whatever came before it is answered or gone (or of another port,
        // and stays).
        let id = self.unanswered[i];
        if port.is_none() {
            self.unanswered.drain(..=i);
        } else {
            self.unanswered.remove(i);
        }
        self.remove(id);
        true
    }

    /// Drops every flow of a public port (the port was removed).
    pub fn remove_port(&mut self, public_port: u16) {
        let ids: Vec<u32> = self
            .by_id
            .iter()
            .filter(|(_, f)| f.public_port == public_port)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.remove(id);
        }
    }

    pub fn count(&self, public_port: u16) -> usize {
        self.per_port.get(&public_port).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn remove(&mut self, id: u32) {
        if let Some(f) = self.by_id.remove(&id) {
            self.by_client.remove(&(f.public_port, f.client));
            if let Some(n) = self.per_port.get_mut(&f.public_port) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_port.remove(&f.public_port);
                }
            }
        }
    }

    fn fresh_id(&mut self) -> u32 {
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if !self.by_id.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], p))
    }

    #[test]
    fn same_client_same_flow_until_idle() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        let a = t.inbound(53, addr(1000), None, t0).unwrap();
        let b = t.inbound(53, addr(1001), None, t0).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.inbound(53, addr(1000), None, t0), Ok(a));
        assert_eq!(
            t.outbound(a, t0 + Duration::from_secs(50)).unwrap().client,
            addr(1000)
        );
        assert_eq!(
            t.expire(t0 + Duration::from_secs(61), Duration::from_secs(60)),
            1
        );
        assert!(t.outbound(b, t0).is_none());
        assert!(t.outbound(a, t0).is_some());
    }

    fn spoofed(i: usize) -> SocketAddr {
        let i = u32::try_from(i).unwrap();
        SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 4444))
    }

    /// A flood of spoofed sources (which home never answers) fills the
    /// table; a new client still gets in, in the place of the oldest of
    /// them, and an answered flow is never the one dropped.
    #[test]
    fn a_flood_of_new_sources_makes_room_for_real_clients() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        let player = t.inbound(27015, addr(1), None, t0).unwrap();
        t.outbound(player, t0).unwrap();
        for i in 0..MAX_FLOWS * 3 {
            t.inbound(27015, spoofed(i), None, t0).unwrap();
        }
        assert_eq!(t.len(), MAX_FLOWS);
        let late = t.inbound(53, addr(2), None, t0).unwrap();
        assert_eq!(t.len(), MAX_FLOWS);
        assert_eq!(t.outbound(player, t0).unwrap().client, addr(1));
        assert_eq!(t.outbound(late, t0).unwrap().client, addr(2));
        // The oldest of the flood went first.
        assert!(!t.by_client.contains_key(&(27015, spoofed(0))));
        assert!(
            t.by_client
                .contains_key(&(27015, spoofed(MAX_FLOWS * 3 - 1)))
        );
    }

    /// Only when home has answered every flow is a new client refused; the
    /// flows already open go on, and room comes back as flows idle out.
    #[test]
    fn a_table_of_answered_flows_refuses_until_one_idles_out() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        for i in 0..MAX_FLOWS {
            let id = t.inbound(27015, spoofed(i), None, t0).unwrap();
            t.outbound(id, t0 + Duration::from_secs(30)).unwrap();
        }
        let first = t.inbound(27015, spoofed(0), None, t0).unwrap();
        t.outbound(first, t0).unwrap();
        assert_eq!(t.inbound(53, addr(2), None, t0), Err(Refused::TableFull));
        t.expire(t0 + Duration::from_secs(61), Duration::from_secs(60));
        assert_eq!(t.len(), MAX_FLOWS - 1);
        assert!(t.unanswered.is_empty());
        assert!(
            t.inbound(53, addr(2), None, t0 + Duration::from_secs(61))
                .is_ok()
        );
    }

    #[test]
    fn cap_per_port() {
        let now = Instant::now();
        let mut t = FlowTable::new();
        let a = t.inbound(53, addr(1), Some(2), now).unwrap();
        let b = t.inbound(53, addr(2), Some(2), now).unwrap();
        t.outbound(a, now).unwrap();
        t.outbound(b, now).unwrap();
        assert_eq!(t.inbound(53, addr(3), Some(2), now), Err(Refused::PortFull));
        assert!(t.inbound(54, addr(3), Some(2), now).is_ok());
        t.remove_port(53);
        assert_eq!(t.count(53), 0);
        assert_eq!(t.len(), 1);
    }

    /// A `max-conns` port full of flows home never answered (spoofed
    /// sources) still lets a new client in, in place of the oldest of them;
    /// answered flows, and other ports' unanswered ones, stay.
    #[test]
    fn a_port_at_its_cap_drops_its_oldest_unanswered_flow() {
        let now = Instant::now();
        let mut t = FlowTable::new();
        let other = t.inbound(54, addr(9), None, now).unwrap();
        let player = t.inbound(27015, addr(1), Some(3), now).unwrap();
        t.outbound(player, now).unwrap();
        for i in 0..100 {
            t.inbound(27015, spoofed(i), Some(3), now).unwrap();
        }
        assert_eq!(t.count(27015), 3);
        let newcomer = t.inbound(27015, addr(2), Some(3), now).unwrap();
        t.outbound(newcomer, now).unwrap();
        assert_eq!(t.count(27015), 3);
        assert!(t.outbound(player, now).is_some(), "the answered flow stays");
        assert!(
            t.outbound(other, now).is_some(),
            "another port's flow stays"
        );
        // Now two answered and one spoofed: one more makes room, a next
        // one finds only answered flows.
        let third = t.inbound(27015, addr(3), Some(3), now).unwrap();
        t.outbound(third, now).unwrap();
        assert_eq!(
            t.inbound(27015, addr(4), Some(3), now),
            Err(Refused::PortFull)
        );
    }
}
