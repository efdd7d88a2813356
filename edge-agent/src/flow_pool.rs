//! In-tunnel TCP flows opened before the public connections that will use
//! them.
//!
//! Without a pool, a new public connection waits one round trip to home
//! (the in-tunnel handshake) before its first bytes can leave the edge:
//! over a home link that is 20–50 ms on every new connection, on top of
//! the one that carries the request. With a pooled flow the header and the
//! client's first bytes leave at once.
//!
//! [`PoolState`] decides (no I/O): how many flows to open, which to hand
//! out, which have waited too long, when to retry after failures, which
//! flows to keep when they come back. The [`FlowPool`] shell opens the
//! sockets.
//!
//! With a home-agent that reads framed flows (control protocol version 2)
//! a flow comes back to the pool when its connection has ended cleanly
//! both ways and home has said it finished it, and carries the next
//! connection: the handshake and teardown
//! inside the tunnel are paid once per flow, not once per connection. The
//! most recently returned flow is handed out first, so flows beyond what
//! the load needs sit unused and age out.
//!
//! A pooled flow is only good for the home-agent session it was opened in:
//! a restarted home-agent has no socket for it, so home's kernel would
//! reset it. So the pool starts empty with each session and is emptied
//! when the session ends; flows then open on demand, as without a pool.
//! A home-agent that dies without a word is noticed only when its session
//! times out; a flow taken meanwhile gives up as a connect to home would,
//! since home must acknowledge a flow's first bytes within
//! [`OPEN_TIMEOUT`] (see [`confirm_after_open_timeout`]).

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skerry::dead_peer::DeadPeer;
use skerry::flow::POOLED_FLOW_MAX_IDLE;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace};

/// Flows kept open ahead: a browser opens six connections at once.
pub const POOL_SIZE: usize = 8;
/// How long opening an in-tunnel flow may take, and home's acknowledgement
/// of its first bytes.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Framed flows kept idle at most, as a multiple of the pool's size (see
/// [`PoolState::cap`]): flows that come back or open beyond this are closed.
const MAX_POOLED_PER_SIZE: usize = 8;
/// First wait after a flow could not be opened; doubles up to
/// [`RETRY_MAX`] while home does not answer.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// A session's pool: which flows are idle, which are being opened.
#[derive(Debug)]
pub struct PoolState<T> {
    /// The current session's number; `None` while no home-agent session is
    /// established (flows open on demand then).
    session: Option<u64>,
    last_session: u64,
    /// Oldest first.
    idle: VecDeque<(T, Instant)>,
    opening: usize,
    retry_at: Option<Instant>,
    retry_wait: Duration,
    size: usize,
    max_idle: Duration,
    /// Whether this session's home reads framed flows.
    framed: bool,
}

impl<T> PoolState<T> {
    pub fn new(size: usize, max_idle: Duration) -> Self {
        PoolState {
            session: None,
            last_session: 0,
            idle: VecDeque::new(),
            opening: 0,
            retry_at: None,
            retry_wait: RETRY_MIN,
            size,
            max_idle,
            framed: false,
        }
    }

    /// A new home-agent session: what was pooled before is returned, to be
    /// closed. `framed`: home reads framed flows, which can be reused.
    pub fn start_session(&mut self, framed: bool) -> Vec<T> {
        self.last_session += 1;
        self.session = Some(self.last_session);
        self.framed = framed;
        // Opens still under way belong to the old session: not counted.
        self.opening = 0;
        self.retry_at = None;
        self.retry_wait = RETRY_MIN;
        self.idle.drain(..).map(|(t, _)| t).collect()
    }

    /// The session ended: the pooled flows are returned, to be closed.
    pub fn end_session(&mut self) -> Vec<T> {
        self.session = None;
        self.opening = 0;
        self.idle.drain(..).map(|(t, _)| t).collect()
    }

    /// How many flows to start opening now, for which session. Counts them
    /// as opening.
    pub fn to_open(&mut self, now: Instant) -> Option<(u64, usize)> {
        let session = self.session?;
        if let Some(at) = self.retry_at {
            if now < at {
                return None;
            }
            self.retry_at = None;
        }
        let n = self.size.saturating_sub(self.idle.len() + self.opening);
        if n == 0 {
            return None;
        }
        self.opening += n;
        Some((session, n))
    }

    /// A flow opened for `session`. Handed back if that session is over,
    /// or the pool is full.
    pub fn opened(&mut self, session: u64, flow: T, now: Instant) -> Option<T> {
        if self.session != Some(session) {
            return Some(flow);
        }
        self.opening = self.opening.saturating_sub(1);
        self.retry_wait = RETRY_MIN;
        if self.idle.len() < self.cap() {
            self.idle.push_back((flow, now));
            None
        } else {
            Some(flow)
        }
    }

    /// Idle flows kept at most. Raw flows are not reused, so `size` of
    /// them is enough; framed ones come back, and closing one that comes
    /// back (or one just opened) while the load still needs it would only
    /// mean opening another: up to [`MAX_POOLED_PER_SIZE`] times `size`
    /// stay, and those the load stops needing age out.
    fn cap(&self) -> usize {
        if self.framed {
            MAX_POOLED_PER_SIZE * self.size
        } else {
            self.size
        }
    }

    /// Opening a flow for `session` failed: no new attempts until a growing
    /// wait passes. A failure from an ended session says nothing of this one.
    pub fn failed(&mut self, session: u64, now: Instant) {
        if self.session != Some(session) {
            return;
        }
        self.opening = self.opening.saturating_sub(1);
        if self.retry_at.is_none_or(|t| t <= now) {
            self.retry_at = Some(now + self.retry_wait);
            self.retry_wait = (self.retry_wait * 2).min(RETRY_MAX);
        }
    }

    /// The most recently pooled flow, with the session it belongs to and
    /// whether it is framed: the older ones are left to age out when the
    /// load does not need them.
    pub fn take(&mut self) -> Option<(T, Option<u64>, bool)> {
        self.idle
            .pop_back()
            .map(|(t, _)| (t, self.session, self.framed))
    }

    /// The session a flow opened now would belong to, and whether it would
    /// be framed: an on-demand flow can be reused as a pooled one.
    pub fn current(&self) -> (Option<u64>, bool) {
        (self.session, self.session.is_some() && self.framed)
    }

    /// A framed flow whose connection home has finished, for the next one.
    /// Handed back, to be closed, if its session is over or the pool is
    /// full.
    pub fn returned(&mut self, session: u64, flow: T, now: Instant) -> Option<T> {
        if self.session != Some(session) || !self.framed || self.idle.len() >= self.cap() {
            return Some(flow);
        }
        self.idle.push_back((flow, now));
        None
    }

    /// Idle flows older than the limit, to be closed (and replaced).
    pub fn expire(&mut self, now: Instant) -> Vec<T> {
        let mut old = Vec::new();
        while self
            .idle
            .front()
            .is_some_and(|(_, since)| now.duration_since(*since) >= self.max_idle)
        {
            if let Some((t, _)) = self.idle.pop_front() {
                old.push(t);
            }
        }
        old
    }

    /// When the pool next needs attention without being told: the oldest
    /// flow ages out, or a retry is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let expiry = self.idle.front().map(|(_, since)| *since + self.max_idle);
        let retry = self.retry_at.filter(|_| self.session.is_some());
        match (expiry, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn idle(&self) -> usize {
        self.idle.len()
    }
}

/// The pool of in-tunnel flows to the home-agent's flow port.
#[derive(Debug)]
pub struct FlowPool {
    home: SocketAddr,
    dead_peer: DeadPeer,
    /// The TUN device the flows are bound to (see
    /// [`skerry::tunnel::device::only_through`]); none where binding failed.
    device: Option<String>,
    state: Mutex<PoolState<TcpStream>>,
    changed: Notify,
}

impl FlowPool {
    pub fn new(home: SocketAddr, dead_peer: DeadPeer, device: Option<String>) -> Self {
        Self::with_size(home, dead_peer, device, POOL_SIZE, POOLED_FLOW_MAX_IDLE)
    }

    pub fn with_size(
        home: SocketAddr,
        dead_peer: DeadPeer,
        device: Option<String>,
        size: usize,
        max_idle: Duration,
    ) -> Self {
        FlowPool {
            home,
            dead_peer,
            device,
            state: Mutex::new(PoolState::new(size, max_idle)),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState<TcpStream>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A home-agent session was established: fill the pool for it.
    /// `framed`: home reads framed flows (see [`PoolState::start_session`]).
    pub fn start_session(&self, framed: bool) {
        let old = self.state().start_session(framed);
        drop(old);
        self.changed.notify_one();
    }

    /// The home-agent session ended: close the pooled flows.
    pub fn end_session(&self) {
        let old = self.state().end_session();
        drop(old);
        self.changed.notify_one();
    }

    pub fn idle(&self) -> usize {
        self.state().idle()
    }

    /// A flow to home: a pooled one if one is still open, else a new one.
    pub async fn flow(&self) -> std::io::Result<Flow> {
        loop {
            let Some((stream, session, framed)) = self.state().take() else {
                break;
            };
            self.changed.notify_one();
            if still_open(&stream) {
                return Ok(Flow {
                    stream,
                    session,
                    framed,
                });
            }
            debug!("a pooled flow was closed by home; opening another");
        }
        let (session, framed) = self.state().current();
        let stream = tokio::time::timeout(
            OPEN_TIMEOUT,
            open_flow(self.home, self.dead_peer, self.device.as_deref()),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "home-agent did not take the flow",
            )
        })??;
        Ok(Flow {
            stream,
            session,
            framed,
        })
    }

    /// A framed flow whose connection home has finished, so that it waits
    /// for the next header on it. `open_timeout_lifted`: its relay ran
    /// long enough to lift the open timeout, which is set again, so that a
    /// home that has gone fails the next connection as a new flow would.
    pub fn give_back(&self, flow: Flow, open_timeout_lifted: bool) {
        let Some(session) = flow.session.filter(|_| flow.framed) else {
            return;
        };
        if open_timeout_lifted
            && let Err(e) =
                socket2::SockRef::from(&flow.stream).set_tcp_user_timeout(Some(OPEN_TIMEOUT))
        {
            debug!(error = %e, "could not set a flow's open timeout again; closing it");
            return;
        }
        let unused = self.state().returned(session, flow.stream, Instant::now());
        drop(unused);
        self.changed.notify_one();
    }

    /// Keeps the pool filled until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let now = Instant::now();
            let (expired, open, deadline) = {
                let mut st = self.state();
                let expired = st.expire(now);
                let open = st.to_open(now);
                (expired, open, st.next_deadline())
            };
            if !expired.is_empty() {
                trace!(n = expired.len(), "pooled flows aged out; replacing them");
            }
            drop(expired);
            if let Some((session, n)) = open {
                for _ in 0..n {
                    tokio::spawn(self.clone().open_one(session));
                }
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.changed.notified() => {}
                () = sleep => {}
            }
        }
        let old = self.state().end_session();
        drop(old);
    }

    async fn open_one(self: Arc<Self>, session: u64) {
        let result = tokio::time::timeout(
            OPEN_TIMEOUT,
            open_flow(self.home, self.dead_peer, self.device.as_deref()),
        )
        .await;
        let now = Instant::now();
        match result {
            Ok(Ok(flow)) => {
                let unused = self.state().opened(session, flow, now);
                drop(unused);
            }
            Ok(Err(e)) => {
                debug!(error = %e, "could not open a pooled flow to home");
                self.state().failed(session, now);
            }
            Err(_) => {
                debug!("home did not take a pooled flow in time");
                self.state().failed(session, now);
            }
        }
        self.changed.notify_one();
    }
}

/// A flow to home, lent to one connection.
#[derive(Debug)]
pub struct Flow {
    pub stream: TcpStream,
    /// The session it was opened in, if any.
    session: Option<u64>,
    /// Home reads framed flows: send a version 2 header and frames, and
    /// give the flow back after a clean end.
    pub framed: bool,
}

/// Opens a flow to home's flow port through the tunnel.
async fn open_flow(
    home: SocketAddr,
    dead_peer: DeadPeer,
    device: Option<&str>,
) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(device) = device {
        skerry::tunnel::device::only_through(&socket, device)?;
    }
    // A home that is gone for good (its machine, or its link, for longer
    // than the probing) gives its flows up, pooled or carrying a
    // connection; a restarted one answers the first probe with a reset.
    // While the open timeout below is set (pooled, or just taken), it also
    // decides when the probes give up: the flow ends one interval after the
    // first unanswered probe, as the open timeout is shorter than the
    // probing.
    dead_peer.watch(&socket)?;
    // The handshake's last ACK rides on the flow header when that follows
    // within 200 ms (a pooled flow acknowledges on its own after that).
    skerry::sockopt::defer_accept(&socket, 1)?;
    // Until confirm_after_open_timeout: a home that does not acknowledge
    // within this fails the flow, as an unanswered connect would.
    socket2::SockRef::from(&socket).set_tcp_user_timeout(Some(OPEN_TIMEOUT))?;
    let flow = socket.connect(home).await?;
    flow.set_nodelay(true)?;
    Ok(flow)
}

/// Runs a flow's relay; once the kernel has had time to act on the open
/// timeout (home had [`OPEN_TIMEOUT`] to acknowledge the flow's first
/// bytes; the check runs at a retransmission, so it is given as long
/// again), lifts it, so that later a long outage of the home link stalls
/// the flow instead of ending it, as TCP does by default. Also says
/// whether it was lifted.
pub async fn confirm_after_open_timeout<F>(flow: &TcpStream, relay: F) -> (F::Output, bool)
where
    F: std::future::Future,
{
    tokio::pin!(relay);
    tokio::select! {
        out = &mut relay => (out, false),
        () = tokio::time::sleep(2 * OPEN_TIMEOUT) => {
            if let Err(e) = socket2::SockRef::from(flow).set_tcp_user_timeout(None) {
                debug!(error = %e, "could not lift a flow's open timeout; it ends after 10 s without acknowledgements");
            }
            (relay.await, true)
        }
    }
}

/// Home sends nothing on a flow before its header (nor, on a framed flow,
/// after the FINISHED that the edge waited for), so anything to read (the end of the
/// stream, an error) means home has closed it.
fn still_open(flow: &TcpStream) -> bool {
    let mut byte = [MaybeUninit::<u8>::uninit()];
    matches!(
        socket2::SockRef::from(flow).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: usize = 3;

    fn state() -> PoolState<u32> {
        PoolState::new(SIZE, Duration::from_secs(60))
    }

    #[test]
    fn nothing_is_opened_before_a_session() {
        let mut st = state();
        assert_eq!(st.to_open(Instant::now()), None);
        assert_eq!(st.next_deadline(), None);
    }

    #[test]
    fn a_session_fills_the_pool_once() {
        let now = Instant::now();
        let mut st = state();
        st.start_session(true);
        assert_eq!(st.to_open(now), Some((1, 3)));
        // Being opened counts: no second round.
        assert_eq!(st.to_open(now), None);
        assert_eq!(st.opened(1, 10, now), None);
        assert_eq!(st.opened(1, 11, now), None);
        assert_eq!(st.take(), Some((11, Some(1), true)), "the newest first");
        assert_eq!(st.to_open(now), Some((1, 1)));
    }

    #[test]
    fn flows_of_an_ended_session_are_handed_back() {
        let now = Instant::now();
        let mut st = state();
        st.start_session(true);
        let (first, _) = st.to_open(now).unwrap();
        st.opened(first, 1, now);
        assert_eq!(st.start_session(true), vec![1]);
        // Still opening for the first session when the second started.
        assert_eq!(st.opened(first, 2, now), Some(2));
        assert_eq!(st.take(), None);
        st.opened(2, 3, now);
        assert_eq!(st.end_session(), vec![3]);
        assert_eq!(st.opened(2, 4, now), Some(4));
        assert_eq!(st.to_open(now), None);
        // An old session's failure neither delays nor counts in a new one.
        st.start_session(true);
        assert_eq!(st.to_open(now), Some((3, 3)));
        st.failed(2, now);
        assert_eq!(st.next_deadline(), None);
        assert_eq!(st.to_open(now), None, "still three opening");
    }

    /// Framed flows come back after their connection and are handed out
    /// again; not to another session, not beyond the cap, not unframed.
    #[test]
    fn returned_flows_are_reused_within_their_session() {
        let t0 = Instant::now();
        let mut st = state();
        st.start_session(true);
        st.to_open(t0);
        st.opened(1, 1, t0);
        assert_eq!(st.take(), Some((1, Some(1), true)));
        assert_eq!(st.current(), (Some(1), true));
        assert_eq!(st.returned(1, 1, t0), None);
        assert_eq!(st.take(), Some((1, Some(1), true)), "the same flow again");
        for f in 0..MAX_POOLED_PER_SIZE * SIZE {
            assert_eq!(st.returned(1, u32::try_from(f).unwrap(), t0), None);
        }
        assert_eq!(st.returned(1, 99, t0), Some(99), "beyond the cap");
        st.start_session(true);
        assert_eq!(st.returned(1, 5, t0), Some(5), "from an ended session");
        st.start_session(false);
        assert_eq!(st.current(), (Some(3), false));
        assert_eq!(st.returned(3, 6, t0), Some(6), "home reads only raw flows");
        st.end_session();
        assert_eq!(st.current(), (None, false));
    }

    /// Under load, flows opened to refill the pool arrive after the ones
    /// in use have come back: kept, not closed at once (with raw flows,
    /// only `size` are kept).
    #[test]
    fn refills_that_arrive_late_are_kept_when_flows_come_back() {
        let t0 = Instant::now();
        let mut st = state();
        st.start_session(true);
        let (s, n) = st.to_open(t0).unwrap();
        for f in 0..n {
            st.opened(s, u32::try_from(f).unwrap(), t0);
        }
        let lent: Vec<u32> = (0..SIZE)
            .filter_map(|_| st.take())
            .map(|(f, ..)| f)
            .collect();
        let (_, refill) = st.to_open(t0).unwrap();
        assert_eq!(refill, SIZE, "all were lent: a full refill");
        for f in lent {
            assert_eq!(st.returned(s, f, t0), None);
        }
        assert_eq!(st.opened(s, 100, t0), None, "a late refill is kept");
        assert_eq!(st.idle(), SIZE + 1);
        while st.idle() < MAX_POOLED_PER_SIZE * SIZE {
            assert_eq!(st.returned(s, 7, t0), None);
        }
        st.opening = 1;
        assert_eq!(st.opened(s, 102, t0), Some(102), "beyond the cap");
        st.start_session(false);
        let (s, n) = st.to_open(t0).unwrap();
        for f in 0..n {
            assert_eq!(st.opened(s, u32::try_from(f).unwrap(), t0), None);
        }
        assert_eq!(st.opened(s, 101, t0), Some(101), "raw flows: size of them");
    }

    /// Flows the load no longer needs sit at the front and age out;
    /// the ones in use keep coming back to the back.
    #[test]
    fn surplus_flows_age_out_while_others_are_reused() {
        let t0 = Instant::now();
        let mut st = state();
        st.start_session(true);
        st.to_open(t0);
        for f in 1..=3 {
            st.opened(1, f, t0);
        }
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_secs(10);
            let (f, ..) = st.take().unwrap();
            assert_eq!(f, 3, "the newest flow is reused");
            st.returned(1, f, t);
        }
        assert_eq!(st.expire(t0 + Duration::from_secs(60)), vec![1, 2]);
        assert_eq!(st.idle(), 1);
    }

    #[test]
    fn old_flows_age_out_oldest_first() {
        let t0 = Instant::now();
        let mut st = state();
        st.start_session(true);
        st.to_open(t0);
        st.opened(1, 1, t0);
        st.opened(1, 2, t0 + Duration::from_secs(30));
        assert_eq!(st.next_deadline(), Some(t0 + Duration::from_secs(60)));
        assert!(st.expire(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(st.expire(t0 + Duration::from_secs(60)), vec![1]);
        assert_eq!(st.next_deadline(), Some(t0 + Duration::from_secs(90)));
        assert_eq!(st.take().map(|(f, ..)| f), Some(2));
    }

    #[test]
    fn failures_back_off_and_a_success_resets_the_wait() {
        let t0 = Instant::now();
        let mut st = state();
        st.start_session(true);
        assert_eq!(st.to_open(t0), Some((1, 3)));
        // Three attempts fail together: one wait, not three.
        st.failed(1, t0);
        st.failed(1, t0);
        st.failed(1, t0);
        assert_eq!(st.next_deadline(), Some(t0 + RETRY_MIN));
        assert_eq!(st.to_open(t0 + RETRY_MIN / 2), None);
        let t1 = t0 + RETRY_MIN;
        assert_eq!(st.to_open(t1), Some((1, 3)));
        st.failed(1, t1);
        assert_eq!(st.next_deadline(), Some(t1 + 2 * RETRY_MIN));
        st.opened(1, 7, t1);
        st.failed(1, t1 + 2 * RETRY_MIN);
        assert_eq!(
            st.retry_at,
            Some(t1 + 2 * RETRY_MIN + RETRY_MIN),
            "a flow that opened resets the wait"
        );
    }

    #[test]
    fn the_wait_stops_growing() {
        let mut t = Instant::now();
        let mut st = state();
        st.start_session(true);
        for _ in 0..20 {
            st.to_open(t);
            st.failed(1, t);
            t = st.next_deadline().unwrap();
        }
        assert_eq!(st.retry_wait, RETRY_MAX);
    }

    /// Real sockets on loopback: a pooled flow is handed out, one that the
    /// far end closed is skipped, a new session closes the old flows. The
    /// flows are bound to a device (loopback's here, the TUN on the edge),
    /// which leaves their connects working.
    #[tokio::test]
    async fn the_pool_hands_out_open_flows_and_closes_old_ones() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let home = listener.local_addr().unwrap();
        let pool = Arc::new(FlowPool::with_size(
            home,
            DeadPeer::default(),
            Some("lo".to_owned()),
            2,
            Duration::from_secs(60),
        ));
        let stop = CancellationToken::new();
        tokio::spawn(pool.clone().run(stop.clone()));
        pool.start_session(false);
        let (mut a, _) = listener.accept().await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        while pool.idle() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // "Home" closes one of them; the other is handed out.
        drop(b);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Flow {
            stream: mut flow,
            framed,
            ..
        } = pool.flow().await.unwrap();
        assert!(!framed, "the session did not agree on framed flows");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        flow.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello", "the open flow was handed out");
        // The pool refills; a new session closes what it held. Which flow
        // was handed out depends on which connect finished last: if it was
        // `a`, the closed `b` still counts as pooled (found closed when
        // taken, or aged out), and one flow refills, not two.
        let (mut c, _) = listener.accept().await.unwrap();
        while pool.idle() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pool.start_session(false);
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut got))
            .await
            .expect("the old session's flow was not closed")
            .unwrap();
        assert_eq!(n, 0);
        stop.cancel();
    }
}
