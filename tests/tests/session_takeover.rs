//! The newest home-agent session takes the edge over: even when several
//! arrive at once, exactly one is left, the tunnel answers its key alone,
//! and a home-agent that was taken over says why and comes back later.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use skerry::bootstrap::{DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT};
use skerry::control::{MessageReader, close_code, write_message};
use skerry::pki::EDGE_SERVER_NAME;
use skerry::protocol::HomeSession;
use skerry_tests::agents::{Pair, block_on};
use skerry_tests::{poll_until, run_in, tcp_digest_client};

const TCP_TARGET: &str = "127.0.0.1:8000";
/// Sessions that take the edge over at the same moment.
const CONTENDERS: usize = 8;

/// A control session that holds the edge's certificate-checked door open:
/// its streams are kept, since dropping them would end the session.
struct Contender {
    conn: quinn::Connection,
    _streams: Option<(quinn::SendStream, MessageReader<quinn::RecvStream>)>,
}

/// Connects and says Hello with `key`; waits for the Welcome unless the
/// edge closes first (a newer session may take over before it is sent).
async fn contend(ep: quinn::Endpoint, edge: SocketAddr, key: [u8; 32]) -> Contender {
    let conn = ep
        .connect(edge, EDGE_SERVER_NAME)
        .expect("connect")
        .await
        .expect("control connection with the home certificate");
    let streams = async {
        let (mut send, recv) = conn.open_bi().await.ok()?;
        let (_, hello) = HomeSession::start(key);
        write_message(&mut send, &hello).await.ok()?;
        let mut reader = MessageReader::new(recv);
        reader.next().await.ok()??;
        Some((send, reader))
    }
    .await;
    Contender {
        conn,
        _streams: streams,
    }
}

/// Whether the edge answers a WireGuard handshake from `secret` with a
/// handshake response (type 2), i.e. whether that key is its tunnel peer.
async fn tunnel_answers(secret: StaticSecret, edge_key: [u8; 32], edge: SocketAddr) -> bool {
    let mut tunn = Tunn::new(secret, PublicKey::from(edge_key), None, None, 11, None);
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false) else {
        panic!("no handshake initiation");
    };
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
    sock.send_to(init, edge).await.unwrap();
    let mut reply = [0u8; 2048];
    match tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut reply)).await {
        Ok(Ok((n, _))) => n > 0 && reply[0] == 2,
        _ => false,
    }
}

#[test]
fn concurrent_takeovers_leave_one_session_and_the_taken_over_home_comes_back() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let _svc = skerry_tests::tcp_digest_service(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let edge_key = pair.edge_wireguard_key();
    let sessions_before = pair.status.borrow().sessions;
    let ca = pair.pki.ca_cert().clone();
    let home = pair.pki.home().clone();
    let v4 = pair.topo.edge_public_v4;

    run_in(&pair.topo.client, move || async move {
        // The home-agent's own client configuration: these are home-agents.
        let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).expect("endpoint");
        ep.set_default_client_config(
            skerry::tls::quic_client_config(&ca, &home).expect("home's control TLS"),
        );

        // Every contender has its own WireGuard key, and all say Hello at once.
        let secrets: Vec<StaticSecret> = (0..CONTENDERS).map(|_| StaticSecret::random()).collect();
        let control = SocketAddr::from((v4, DEFAULT_CONTROL_PORT));
        let contenders = futures::future::join_all(
            secrets
                .iter()
                .map(|s| contend(ep.clone(), control, PublicKey::from(s).to_bytes())),
        )
        .await;

        // Exactly one is left; every other was closed as taken over.
        let superseded = quinn::VarInt::from_u32(close_code::SUPERSEDED);
        let still_open = || -> Vec<usize> {
            (0..CONTENDERS)
                .filter(|&i| contenders[i].conn.close_reason().is_none())
                .collect()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while still_open().len() != 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let open = still_open();
        if open.len() != 1 {
            let reasons: Vec<_> = contenders.iter().map(|c| c.conn.close_reason()).collect();
            panic!("not exactly one session left open: {reasons:?}");
        }
        for (i, c) in contenders
            .iter()
            .enumerate()
            .filter(|(i, _)| !open.contains(i))
        {
            match c.conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(a)) => {
                    assert_eq!(a.error_code, superseded, "contender {i}: {a}");
                }
                other => panic!("contender {i} was not closed as taken over: {other:?}"),
            }
        }

        // The tunnel's peer is the one left: its key alone is answered.
        let wg = SocketAddr::from((v4, DEFAULT_WIREGUARD_PORT));
        let answered =
            futures::future::join_all(secrets.into_iter().map(|s| tunnel_answers(s, edge_key, wg)))
                .await;
        let answered: Vec<usize> = (0..CONTENDERS).filter(|&i| answered[i]).collect();
        assert_eq!(
            answered, open,
            "the tunnel answers keys {answered:?}, the session left is {open:?}"
        );

        // Done: the edge is free for the real home-agent again.
        contenders[open[0]]
            .conn
            .close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"test done");
        ep.wait_idle().await;
    });

    // The real home-agent was taken over too, and says why.
    let taken_back_from = Instant::now();
    let mut status = pair.status.clone();
    let said = block_on(async move {
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| {
                s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("another home-agent took over"))
            }),
        )
        .await
        .is_ok()
    });
    assert!(
        said,
        "the taken-over home-agent's status does not say why: {:?}",
        pair.status.borrow().last_error
    );
    // It comes back after its wait, with a fresh handshake at once (the
    // edge dropped its session while it served the others, and cannot
    // start one itself), and carries flows again.
    pair.wait_reconnected(sessions_before);
    let tunnel = pair.status.borrow().tunnel_handle.clone().expect("tunnel");
    // Within 2 s: boringtun's own retry (every 5 s, and only if the home
    // happened to send data meanwhile) is not what this is about.
    poll_until(Duration::from_secs(2), || {
        match tunnel.stats().last_handshake {
            Some(t) if t > taken_back_from => Ok(()),
            other => Err(format!("no handshake since the take-back: {other:?}")),
        }
    });
    run_in(&pair.topo.client, move || async move {
        tcp_digest_client(SocketAddr::from((v4, 9000)), 1 << 20, [5; 32])
            .await
            .expect("a flow once the home-agent has the edge back");
    });
}
