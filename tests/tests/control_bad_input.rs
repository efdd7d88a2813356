//! Hostile control clients from the internet side: each is refused, and the
//! real home-agent's session and flows carry on undisturbed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use skerry::bootstrap::DEFAULT_CONTROL_PORT;
use skerry::frame::{FRAME_VERSION, MAX_FRAME_LEN};
use skerry::pki::{EDGE_SERVER_NAME, HomePki};
use skerry::tls::{CONTROL_ALPN, crypto_provider};
use skerry_tests::agents::Pair;
use skerry_tests::{run_in, tcp_digest_client};

const TCP_TARGET: &str = "127.0.0.1:8000";

fn endpoint_with(config: rustls::ClientConfig) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).expect("client endpoint");
    let quic =
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(config)).expect("quic config");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

/// Sends `bytes` as the first thing on a control stream; returns how the
/// edge ended it (an error is what we expect).
async fn attempt(ep: &quinn::Endpoint, edge: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let conn = ep
        .connect(edge, EDGE_SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    let read = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20)).await;
    if read.is_err() {
        // Still open after 10 s: the edge took it.
        return Ok(Vec::new());
    }
    match tokio::time::timeout(Duration::from_secs(5), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Err(format!("closed by edge: {c}")),
        Ok(other) => Err(other.to_string()),
        Err(_) => Ok(Vec::new()),
    }
}

#[test]
fn hostile_control_clients_are_refused_and_the_real_session_carries_on() {
    skerry_tests::init_tracing();
    let (pair, _svc) = pair_with_digest_service();
    let other_dir = skerry_tests::scratch_dir("skerry-otherca");
    let other = HomePki::load_or_create(other_dir.path()).expect("second CA");
    let ca = pair.pki.ca_cert().clone();
    let home = pair.pki.home().clone();
    let v4 = pair.topo.edge_public_v4;
    let control = SocketAddr::from((v4, DEFAULT_CONTROL_PORT));

    run_in(&pair.topo.client, move || async move {
        // A real flow runs through all the attacks.
        let flow = tokio::spawn(tcp_digest_client(
            SocketAddr::from((v4, 9000)),
            32 << 20,
            [3; 32],
        ));

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).expect("root");
        let builder = || {
            rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("tls13")
                .with_root_certificates(roots.clone())
        };

        // 1. No client certificate.
        let mut no_cert = builder().with_no_client_auth();
        no_cert.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
        let r = attempt(&endpoint_with(no_cert), control, b"hello").await;
        assert!(
            r.is_err(),
            "a client without a certificate was served: {r:?}"
        );

        // 2. A certificate from another CA.
        let mut foreign = builder()
            .with_client_auth_cert(other.home().cert_chain.clone(), other.home().key())
            .expect("foreign cert");
        foreign.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
        let r = attempt(&endpoint_with(foreign), control, b"hello").await;
        assert!(
            r.is_err(),
            "a client with a foreign certificate was served: {r:?}"
        );

        // With a valid certificate, bad frames: each closes that connection.
        let valid = || {
            let mut c = builder()
                .with_client_auth_cert(home.cert_chain.clone(), home.key())
                .expect("home cert");
            c.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
            endpoint_with(c)
        };
        // 3. A frame announced over the maximum.
        let mut big = vec![FRAME_VERSION];
        big.extend_from_slice(&u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes());
        let r = attempt(&valid(), control, &big).await;
        assert!(
            matches!(&r, Err(e) if e.contains("closed by edge")),
            "oversized frame: {r:?}"
        );
        // 4. Garbage.
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let r = attempt(&valid(), control, &garbage).await;
        assert!(
            matches!(&r, Err(e) if e.contains("closed by edge")),
            "garbage: {r:?}"
        );
        // 5. A well-framed body that is not a message.
        let mut junk = vec![FRAME_VERSION, 0, 0, 0, 4];
        junk.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let r = attempt(&valid(), control, &junk).await;
        assert!(
            matches!(&r, Err(e) if e.contains("closed by edge")),
            "junk body: {r:?}"
        );

        flow.await
            .expect("flow task")
            .expect("the real flow carried on intact");
        // New flows still work after the attacks.
        tcp_digest_client(SocketAddr::from((v4, 9000)), 1 << 20, [4; 32])
            .await
            .expect("a new flow after the attacks");
    });
    let s = pair.status.borrow().clone();
    assert!(s.connected, "the real session dropped: {:?}", s.last_error);
    assert_eq!(s.sessions, 1, "the real home-agent had to reconnect");
}

#[test]
fn stream_ending_inside_a_frame_is_an_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[FRAME_VERSION, 0, 0, 0, 10, 1, 2])
            .await
            .unwrap();
        drop(a);
        let mut reader = skerry::control::MessageReader::new(b);
        assert!(reader.next().await.is_err());
    });
}

/// A pair serving `tcp/9000` to a digest service at home.
fn pair_with_digest_service() -> (Pair, skerry_tests::Background) {
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let svc = skerry_tests::tcp_digest_service(&pair.topo.home, TCP_TARGET.parse().unwrap());
    (pair, svc)
}

/// The real tunnel is undisturbed: a flow through the edge's public
/// address `v4` carries a MiB both ways.
async fn real_tunnel_carries_flows(v4: std::net::Ipv4Addr) {
    tcp_digest_client(SocketAddr::from((v4, 9000)), 1 << 20, [9; 32])
        .await
        .expect("the real tunnel still carries flows");
}

/// A WireGuard end with a key of its own, aimed at the edge's public key.
fn stranger(edge_key: [u8; 32]) -> boringtun::noise::Tunn {
    use boringtun::x25519::{PublicKey, StaticSecret};
    boringtun::noise::Tunn::new(
        StaticSecret::random(),
        PublicKey::from(edge_key),
        None,
        None,
        7,
        None,
    )
}

#[test]
fn wireguard_from_a_key_not_announced_is_ignored() {
    use boringtun::noise::TunnResult;
    skerry_tests::init_tracing();
    let (pair, _svc) = pair_with_digest_service();
    let edge_key = pair.edge_wireguard_key();
    let v4 = pair.topo.edge_public_v4;
    run_in(&pair.topo.client, move || async move {
        // A stranger who knows the edge's public key (it is not secret) and
        // its WireGuard port tries a handshake: the edge must not answer.
        let mut rogue = stranger(edge_key);
        let mut buf = vec![0u8; 2048];
        let TunnResult::WriteToNetwork(init) = rogue.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no handshake initiation");
        };
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        sock.send_to(init, (v4, skerry::bootstrap::DEFAULT_WIREGUARD_PORT))
            .await
            .unwrap();
        let mut reply = [0u8; 2048];
        let answered =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut reply)).await;
        assert!(
            answered.is_err(),
            "the edge answered a handshake from an unknown key"
        );
        real_tunnel_carries_flows(v4).await;
    });
}

/// Past 100 handshake initiations a second the edge answers each with a
/// cookie instead of doing the work. A cookie is owed to anyone who knows
/// the edge's public key, so answering one must not make the stranger the
/// tunnel's endpoint: the tunnel's traffic would go to them.
#[test]
fn a_flood_of_stranger_handshakes_gets_cookies_not_the_tunnel() {
    use boringtun::noise::TunnResult;
    use tokio::io::AsyncWriteExt;
    skerry_tests::init_tracing();
    let (pair, _svc) = pair_with_digest_service();
    let edge_key = pair.edge_wireguard_key();
    let v4 = pair.topo.edge_public_v4;
    run_in(&pair.topo.client, move || async move {
        // Opened before the flood: the bytes sent on it after the flood
        // cross the tunnel to wherever the edge thinks home is.
        let mut held = tokio::net::TcpStream::connect((v4, 9000)).await.unwrap();
        let mut rogue = stranger(edge_key);
        let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        let mut buf = vec![0u8; 2048];
        // Four times what the edge takes in a second without cookies.
        let flood = 4 * skerry::tunnel::driver::HANDSHAKE_RATE_LIMIT;
        for _ in 0..flood {
            let TunnResult::WriteToNetwork(init) =
                rogue.format_handshake_initiation(&mut buf, true)
            else {
                panic!("no handshake initiation");
            };
            sock.send_to(init, (v4, skerry::bootstrap::DEFAULT_WIREGUARD_PORT))
                .await
                .unwrap();
        }
        let (mut cookies, mut other) = (0, Vec::new());
        let mut reply = [0u8; 2048];
        let mut sorted = |datagram: &[u8]| match datagram.first() {
            Some(3) => cookies += 1,
            first => other.push((first.copied(), datagram.len())),
        };
        // The first answer is a cookie: from here on, the edge owes them.
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut reply))
            .await
            .expect("the edge answered none of the flood")
            .unwrap();
        sorted(&reply[..n]);
        // The first byte of a digest request: the edge carries it through
        // the tunnel; the service waits for the rest, so home sends nothing
        // back but an acknowledgement.
        held.write_all(&[7u8]).await.unwrap();
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut reply)).await
        {
            sorted(&reply[..n]);
        }
        assert!(cookies > 0, "the flood never put the edge under load");
        assert!(
            other.is_empty(),
            "the stranger received tunnel datagrams (type, length): {other:?}"
        );
        drop(held);
        real_tunnel_carries_flows(v4).await;
    });
}

/// A QUIC handshake costs the edge a signature and state for seconds: an
/// Initial from an address that has not shown it can receive answers (a
/// spoofed source) gets only a stateless Retry.
#[test]
fn an_initial_from_an_unproven_address_gets_a_retry() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let edge = SocketAddr::from((pair.topo.edge_public_v4, DEFAULT_CONTROL_PORT));
    let pki = pair.pki.clone();
    let answer = run_in(&pair.topo.client, move || async move {
        // A real client's first datagram, caught on its way: sent on from
        // another socket, it is what a spoofer would send.
        let catcher = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = catcher.local_addr().unwrap();
        let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(
            skerry::tls::quic_client_config(pki.ca_cert(), pki.home()).unwrap(),
        );
        let _connecting = ep.connect(to, EDGE_SERVER_NAME).unwrap();
        let mut initial = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), catcher.recv_from(&mut initial))
            .await
            .expect("the client sent no Initial")
            .unwrap();
        let spoofer = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        spoofer.send_to(&initial[..n], edge).await.unwrap();
        let mut answer = vec![0u8; 2048];
        let (m, _) = tokio::time::timeout(Duration::from_secs(5), spoofer.recv_from(&mut answer))
            .await
            .expect("the edge did not answer the Initial")
            .unwrap();
        answer.truncate(m);
        answer
    });
    // A long header whose type bits say Retry (QUIC v1: 0b11).
    let first = answer[0];
    assert!(first & 0x80 != 0, "not a long header: {first:#04x}");
    assert_eq!((first >> 4) & 0x03, 3, "not a Retry: {first:#04x}");
}
