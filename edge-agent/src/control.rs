//! The edge's control server: QUIC with mutual TLS, one session per
//! home-agent connection, the newest session wins.

use std::fmt::Display;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skerry::control::{ControlError, MessageReader, close_code, write_message};
use skerry::log_budget::LogBudget;
use skerry::protocol::{EdgeAction, EdgeInfo, EdgeSession, ProtocolError, Untold};
use skerry::tunnel::TunnelHandle;
use skerry::tunnel::driver::short_key;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::flow_pool::FlowPool;
use crate::home_moves::{Check, MoveWatch};
use crate::ports::PortTable;

/// The close reason sent with [`close_code::SUPERSEDED`], for people: the
/// home-agent acts on the code.
const SUPERSEDED_REASON: &[u8] = b"another home-agent session took over this edge";

/// How often a session looks for the home's traffic coming from a new
/// address (see [`crate::home_moves`]). Often: a flow opened in the last
/// 20 s ends when its bytes go unacknowledged for 10 s, and home's first
/// keep-alive from a new address may take 5 s to come.
const MOVE_CHECK: Duration = Duration::from_millis(250);

/// Refused handshakes logged in full per minute; the rest are counted.
const REFUSALS_LOGGED_PER_MINUTE: u32 = 5;

/// What the control server shares with each session.
#[derive(Debug)]
pub struct ControlState {
    pub info: EdgeInfo,
    pub tunnel: TunnelHandle,
    pub ports: Arc<Mutex<PortTable>>,
    /// In-tunnel flows opened ahead, good for one home-agent session.
    pub pool: Arc<FlowPool>,
    /// The established session, closed when a newer one takes over. Held
    /// through a whole take-over and a port map's apply; taken before
    /// `ports`, never after it.
    current: Mutex<Option<quinn::Connection>>,
    /// Anyone can be refused at the public control port: a cap on the
    /// warnings that costs them nothing to cause.
    refusals: std::sync::Mutex<LogBudget>,
}

impl ControlState {
    pub fn new(
        info: EdgeInfo,
        tunnel: TunnelHandle,
        ports: Arc<Mutex<PortTable>>,
        pool: Arc<FlowPool>,
    ) -> Self {
        ControlState {
            info,
            tunnel,
            ports,
            pool,
            current: Mutex::new(None),
            refusals: std::sync::Mutex::new(LogBudget::new(
                Duration::from_secs(60),
                REFUSALS_LOGGED_PER_MINUTE,
            )),
        }
    }
}

/// Binds the control endpoint on every address (dual-stack).
///
/// The stateless-reset key is derived from the edge's own secret, so a
/// restarted edge can tell a home-agent at once that its old connection is
/// gone (instead of the home waiting out the idle timeout), and no one
/// without that secret can forge such a reset.
pub fn endpoint(
    port: u16,
    config: quinn::ServerConfig,
    secret: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let reset_key = ring::hmac::sign(&derive, b"skerry quic stateless reset v1");
    let cid_key = ring::hmac::sign(&derive, b"skerry quic connection ids v1");
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key.as_ref());
    // Connection ids a restarted edge still recognises as its own, so that
    // it answers them with the reset rather than dropping them.
    let mut cid_seed = [0u8; 8];
    cid_seed.copy_from_slice(&cid_key.as_ref()[..8]);
    let cid_seed = u64::from_le_bytes(cid_seed);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_seed))
    });
    let socket = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the control endpoint"))?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket.into(), runtime)
}

/// Accepts control connections until `shutdown`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: Arc<ControlState>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        // A handshake costs the edge a signature and some state for
        // seconds, so an address that has not shown it receives answers (a
        // flood from spoofed sources) gets a stateless Retry first, as QUIC
        // provides: one more round trip for home's connect, nothing kept.
        if !incoming.remote_address_validated() {
            if let Err(e) = incoming.retry() {
                debug!(error = %e, "could not ask a control client to retry; ignoring it");
                e.into_incoming().ignore();
            }
            continue;
        }
        let remote = incoming.remote_address();
        let state = state.clone();
        tokio::spawn(
            async move { serve_connection(incoming, state).await }
                .instrument(info_span!("control", peer = %remote)),
        );
    }
    endpoint.close(
        quinn::VarInt::from_u32(close_code::SHUTDOWN),
        b"edge shutting down",
    );
}

async fn serve_connection(incoming: quinn::Incoming, state: Arc<ControlState>) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) if is_probe(&e) => {
            info!("a home-agent checked that this edge answers");
            return;
        }
        Err(e) => {
            // No client certificate, one from another CA, wrong ALPN, or a
            // handshake that never completed.
            log_refused(&state.refusals, Instant::now(), &e);
            return;
        }
    };
    let (mut send, recv) = match conn.accept_bi().await {
        Ok(s) => s,
        Err(e) if is_probe(&e) => {
            info!("a home-agent checked that this edge answers");
            return;
        }
        Err(e) => {
            warn!(reason = %e, "control connection closed before opening a stream");
            return;
        }
    };
    let mut reader = MessageReader::new(recv);
    let mut session = EdgeSession::new(state.info.clone());
    let mut moves = MoveWatch::new(conn.remote_address());
    let mut move_check = tokio::time::interval(MOVE_CHECK);
    move_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<(), ControlError> = async {
        loop {
            let msg = tokio::select! {
                msg = reader.next() => match msg? {
                    Some(msg) => msg,
                    None => break,
                },
                _ = move_check.tick() => {
                    let now = Instant::now();
                    let at = match moves.check(conn.remote_address(), state.tunnel.stats().endpoint, now) {
                        Check::Quiet => continue,
                        Check::Moved { from, to } => {
                            info!(%from, %to, "the home-agent's control traffic comes from a new address");
                            to
                        }
                        Check::Unanswered { at } => {
                            debug!(%at, "no tunnel packet from the home-agent's new address yet; asking again");
                            at
                        }
                        Check::GaveUp { at } => {
                            info!(%at, "no tunnel packet from the home-agent's new address; the tunnel follows its next one (its keepalive, within 25 s)");
                            continue;
                        }
                    };
                    let told = session.home_moved(at);
                    moves.told(told.as_ref().map(|_| ()).map_err(|&u| u), now);
                    match told {
                        Ok(told) => write_message(&mut send, &told).await?,
                        Err(Untold::NotEstablished) => {}
                        Err(Untold::OlderRelease) => info!("the home-agent's release cannot be told it moved; the tunnel follows its next packet (its keepalive, within 25 s)"),
                    }
                    continue;
                }
            };
            match session.handle(msg)? {
                EdgeAction::Established {
                    home_key,
                    version,
                    reply,
                } => {
                    info!(home_key = %short_key(&home_key), "home-agent connected");
                    // One take-over at a time, start to end: two sessions
                    // established at once must not leave the tunnel's peer,
                    // the current session and the pool's framing each set
                    // by a different one.
                    let mut current = state.current.lock().await;
                    // No flow opened to the previous home-agent may be
                    // handed out once the tunnel leads to this one.
                    state.pool.end_session();
                    if state.tunnel.set_peer(home_key).await.is_err() {
                        // The edge is stopping: nothing to put back.
                        return Err(ControlError::Io(std::io::Error::other("tunnel stopped")));
                    }
                    if let Some(old) = current.replace(conn.clone()) {
                        old.close(
                            quinn::VarInt::from_u32(close_code::SUPERSEDED),
                            SUPERSEDED_REASON,
                        );
                    }
                    state
                        .pool
                        .start_session(version >= skerry::protocol::FRAMED_FLOWS_VERSION);
                    drop(current);
                    write_message(&mut send, &reply).await?;
                }
                EdgeAction::Apply(map) => {
                    // A session that was taken over may still have port maps
                    // in flight: the newer session's map stands. Held
                    // through the apply, so no take-over slips in between.
                    let current = state.current.lock().await;
                    if !is_this(&current, &conn) {
                        return Err(ControlError::Io(std::io::Error::other(
                            "taken over by a newer session",
                        )));
                    }
                    let generation = map.generation;
                    let results = state.ports.lock().await.apply(map);
                    drop(current);
                    write_message(&mut send, &session.applied(generation, results)).await?;
                }
                EdgeAction::Reply(m) => write_message(&mut send, &m).await?,
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => info!("home-agent closed the control session"),
        Err(ControlError::Protocol(e)) => {
            warn!(reason = %e, "control session closed: protocol error");
            refuse(&mut send, &conn, &e).await;
        }
        Err(ControlError::Io(e)) => info!(reason = %e, "control session ended"),
    }
    let mut current = state.current.lock().await;
    if is_this(&current, &conn) {
        *current = None;
        state.pool.end_session();
    }
}

/// A refused handshake, logged within the budget; all of them at debug.
///
/// The reason can quote the peer (the text of its CONNECTION_CLOSE), so it
/// is escaped: a stranger does not get to write lines of the edge's log.
fn log_refused(refusals: &std::sync::Mutex<LogBudget>, now: Instant, reason: &dyn Display) {
    let reason = reason.to_string().escape_debug().to_string();
    let admitted = refusals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(now);
    match admitted {
        Some(0) => warn!(%reason, "control connection refused"),
        Some(held_back) => warn!(
            %reason,
            held_back,
            "control connection refused; more were since the last one logged \
             (RUST_LOG=debug logs each)"
        ),
        None => debug!(%reason, "control connection refused"),
    }
}

/// Whether `conn` is the current session.
fn is_this(current: &Option<quinn::Connection>, conn: &quinn::Connection) -> bool {
    current
        .as_ref()
        .is_some_and(|c| c.stable_id() == conn.stable_id())
}

/// A home-agent that has just created this edge's droplet connects once to
/// see it answer, then closes with code 0: not a failure worth a warning.
fn is_probe(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(close_code::SHUTDOWN))
}

async fn refuse(send: &mut quinn::SendStream, conn: &quinn::Connection, e: &ProtocolError) {
    let _ = write_message(send, &EdgeSession::refusal(e)).await;
    let _ = send.finish();
    let reason = e.to_string();
    let reason = reason.as_bytes();
    conn.close(
        quinn::VarInt::from_u32(close_code::PROTOCOL),
        &reason[..reason.len().min(128)],
    );
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use super::*;

    /// What the edge's log says, as text (its real formatter, no colour).
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_of_refused_handshakes_logs_a_few_warnings_and_counts_the_rest() {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        let refusals = std::sync::Mutex::new(LogBudget::new(Duration::from_secs(60), 5));
        let t0 = Instant::now();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..1000 {
                log_refused(
                    &refusals,
                    t0 + Duration::from_millis(i),
                    &"no client certificate",
                );
            }
            log_refused(
                &refusals,
                t0 + Duration::from_secs(61),
                &"forged\nWARN line",
            );
        });
        let text = String::from_utf8(log.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .expect("utf-8 log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            6,
            "five in full, then one a minute later:\n{text}"
        );
        assert!(
            lines[..5]
                .iter()
                .all(|l| l.contains("WARN") && l.contains("no client certificate"))
        );
        assert!(lines[5].contains("held_back=995"), "{}", lines[5]);
        // The peer's text stays on its line.
        assert!(lines[5].contains(r"forged\nWARN line"), "{}", lines[5]);
    }
}
