//! The test topology itself: who can reach whom, and that it cleans up.
//! Also the digest and echo helpers the end-to-end tests rely on.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use skerry_tests::{
    Topology, init_tracing, require_root, run_in, spawn_in, tcp_digest_client, tcp_digest_server,
    tcp_listener_in, udp_echo_server, udp_socket_in,
};

/// Bounds every exchange, so a broken topology fails instead of hanging.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a connection that must not get through is given.
const UNREACHABLE_WAIT: Duration = Duration::from_secs(2);

fn namespace_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("iproute2's `ip` runs");
    assert!(
        out.status.success(),
        "ip netns list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("namespace names are ASCII")
}

/// Connects from `from` to a listener bound inside `to` at `(ip, 0)`, and
/// returns the source address the listener saw.
fn connect_across(
    from: &skerry::netns::NetNs,
    to: &skerry::netns::NetNs,
    ip: IpAddr,
) -> SocketAddr {
    let listener = tcp_listener_in(to, SocketAddr::new(ip, 0));
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    run_in(from, move || async move {
        tokio::time::timeout(EXCHANGE_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    });
    // The handshake is complete, so the connection is queued: accept is ready.
    let (_, peer) = listener
        .accept()
        .expect("the connection from run_in is queued");
    peer
}

#[test]
fn client_reaches_the_edge_public_addresses() {
    require_root();
    init_tracing();
    let topo = Topology::new();
    let peer = connect_across(&topo.client, &topo.edge, topo.edge_public_v4.into());
    assert_eq!(
        peer.ip(),
        IpAddr::from(topo.client_v4),
        "the edge sees the client's own address"
    );
    let peer = connect_across(&topo.client, &topo.edge, topo.edge_public_v6.into());
    assert_eq!(peer.ip(), IpAddr::from(topo.client_v6));
}

#[test]
fn home_reaches_the_edge_on_both_links() {
    require_root();
    init_tracing();
    let topo = Topology::new();
    let peer = connect_across(&topo.home, &topo.edge, topo.edge_home_side_v4.into());
    assert_eq!(peer.ip(), IpAddr::from(topo.home_v4));
    let peer = connect_across(&topo.home, &topo.edge, topo.edge_home_side_v6.into());
    assert_eq!(peer.ip(), IpAddr::from(topo.home_v6));
    // Through its default route, home can also dial the edge's public side.
    let peer = connect_across(&topo.home, &topo.edge, topo.edge_public_v4.into());
    assert_eq!(peer.ip(), IpAddr::from(topo.home_v4));
    let peer = connect_across(&topo.home, &topo.edge, topo.edge_public_v6.into());
    assert_eq!(peer.ip(), IpAddr::from(topo.home_v6));
}

#[test]
fn client_cannot_reach_home_because_the_edge_does_not_forward() {
    require_root();
    init_tracing();
    let topo = Topology::new();
    let targets = [IpAddr::from(topo.home_v4), IpAddr::from(topo.home_v6)]
        .map(|ip| tcp_listener_in(&topo.home, SocketAddr::new(ip, 0)));
    let addrs = targets
        .each_ref()
        .map(|l| l.local_addr().expect("bound listener has an address"));
    let outcomes = run_in(&topo.client, move || async move {
        let attempt = |addr| async move {
            match tokio::time::timeout(UNREACHABLE_WAIT, tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(_)) => Err(format!("client connected to home at {addr}")),
                Ok(Err(e)) => Ok(format!("{addr}: {e}")),
                Err(_) => Ok(format!("{addr}: timed out")),
            }
        };
        let (v4, v6) = tokio::join!(attempt(addrs[0]), attempt(addrs[1]));
        [v4, v6]
    });
    for outcome in outcomes {
        let outcome = outcome.unwrap_or_else(|e| panic!("{e}"));
        tracing::info!(%outcome, "client to home failed, as it must");
    }
    for listener in targets {
        let err = listener
            .accept()
            .expect_err("home accepted a connection from the client");
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
    }
}

#[test]
fn digest_and_echo_services_work_across_the_client_link() {
    require_root();
    init_tracing();
    let topo = Topology::new();
    let listener = tcp_listener_in(&topo.edge, SocketAddr::new(topo.edge_public_v6.into(), 0));
    let tcp_addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let udp = udp_socket_in(&topo.edge, SocketAddr::new(topo.edge_public_v4.into(), 0));
    let udp_addr = udp.local_addr().expect("bound socket has an address");
    let services = spawn_in(&topo.edge, move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("inside a runtime");
        let udp = tokio::net::UdpSocket::from_std(udp).expect("inside a runtime");
        tokio::join!(tcp_digest_server(listener), udp_echo_server(udp));
    });
    run_in(&topo.client, move || async move {
        let digests = async {
            tokio::try_join!(
                tcp_digest_client(tcp_addr, 1 << 20, [1; 32]),
                tcp_digest_client(tcp_addr, 0, [2; 32]),
                tcp_digest_client(tcp_addr, 12_345, [3; 32]),
            )
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, digests)
            .await
            .expect("digest exchanges finish")
            .expect("digests match");

        let socket = tokio::net::UdpSocket::bind("0.0.0.0:0")
            .await
            .expect("bind UDP");
        for payload in [&b"ping"[..], &[], &[0xab; 1400]] {
            socket
                .send_to(payload, udp_addr)
                .await
                .expect("send datagram");
            let mut buf = [0; 2048];
            let (n, from) = tokio::time::timeout(EXCHANGE_TIMEOUT, socket.recv_from(&mut buf))
                .await
                .expect("echo arrives")
                .expect("receive datagram");
            assert_eq!(from, udp_addr);
            assert_eq!(&buf[..n], payload);
        }
    });
    assert!(
        !services.is_finished(),
        "the services run until their guard drops"
    );
    services.stop();
}

#[tokio::test]
async fn digest_helpers_pass_8_mib_over_loopback() {
    init_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let server = tokio::spawn(tcp_digest_server(listener));
    let seed = *b"skerry digest helpers, 8 MiB ok!";
    tokio::time::timeout(EXCHANGE_TIMEOUT, tcp_digest_client(addr, 8 << 20, seed))
        .await
        .expect("8 MiB exchange finishes")
        .expect("8 MiB exchange checks out");
    server.abort();
}

#[tokio::test]
async fn digest_client_rejects_a_server_that_only_echoes() {
    init_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let echo = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let (mut rd, mut wr) = stream.split();
        let _ = tokio::io::copy(&mut rd, &mut wr).await;
    });
    let result = tokio::time::timeout(EXCHANGE_TIMEOUT, tcp_digest_client(addr, 4096, [7; 32]))
        .await
        .expect("exchange ends");
    let err = result.expect_err("an echo is not the server's stream");
    assert!(format!("{err:#}").contains("differs at byte 0"), "{err:#}");
    echo.abort();
}

#[test]
fn dropping_the_topology_deletes_its_namespaces() {
    require_root();
    let topo = Topology::new();
    let names = [&topo.client, &topo.edge, &topo.home].map(|ns| ns.name().to_owned());
    let before = namespace_list();
    for name in &names {
        assert!(
            before
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} missing"
        );
    }
    drop(topo);
    let after = namespace_list();
    for name in &names {
        assert!(
            !after
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} survived"
        );
    }
}

#[test]
fn a_failing_test_still_tears_the_topology_down() {
    require_root();
    let result = std::panic::catch_unwind(|| {
        let topo = Topology::new();
        let names = [&topo.client, &topo.edge, &topo.home].map(|ns| ns.name().to_owned());
        std::panic::panic_any(names);
    });
    let names = *result
        .expect_err("the closure panics")
        .downcast::<[String; 3]>()
        .expect("the panic carries the names");
    for name in &names {
        let pin = std::path::Path::new("/run/netns").join(name);
        assert!(!pin.exists(), "{} survived a panic", pin.display());
    }
}
