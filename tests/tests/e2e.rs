//! End to end: a client namespace reaches a service that listens on
//! 127.0.0.1 in the home namespace, through a real edge-agent, a real
//! WireGuard tunnel and a real home-agent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::net::SocketAddr;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use skerry::dead_peer::DeadPeer;
use skerry::protocol::EntryStatus;
use skerry_tests::agents::{Pair, PairOptions, port_map};
use skerry_tests::{run_in, spawn_in, tcp_digest_client, tcp_digest_server, udp_echo_server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const TCP_TARGET: &str = "127.0.0.1:8000";
const UDP_TARGET: &str = "127.0.0.1:8001";
const PROXY_TARGET: &str = "127.0.0.1:8002";

/// A service that reads a PROXY v1 line and answers with it.
async fn proxy_line_server(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut r = BufReader::new(s);
            let mut line = String::new();
            if r.read_line(&mut line).await.is_ok() {
                let _ = r.get_mut().write_all(line.as_bytes()).await;
            }
        });
    }
}

#[test]
fn tcp_and_udp_cross_the_tunnel_intact() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[
        &format!("tcp/9000={TCP_TARGET}"),
        &format!("udp/9001={UDP_TARGET}"),
        &format!("tcp/9002={PROXY_TARGET},proxy=v1"),
    ]);
    let applied = pair.wait_applied(1);
    assert!(
        applied
            .results
            .iter()
            .all(|r| r.status == EntryStatus::Listening),
        "{applied:?}"
    );
    // Bound before the first client connects; served in the background.
    let home = &pair.topo.home;
    let tcp = skerry_tests::tcp_listener_in(home, TCP_TARGET.parse().unwrap());
    let udp = skerry_tests::udp_socket_in(home, UDP_TARGET.parse().unwrap());
    // Room for the whole GSO burst below, however late the echo runs.
    skerry::tunnel::driver::size_socket_buffers(&udp);
    let proxy = skerry_tests::tcp_listener_in(home, PROXY_TARGET.parse().unwrap());
    let _services = spawn_in(home, move || async move {
        let tcp = TcpListener::from_std(tcp).expect("tcp target");
        let udp = UdpSocket::from_std(udp).expect("udp target");
        let proxy = TcpListener::from_std(proxy).expect("proxy target");
        tokio::join!(
            tcp_digest_server(tcp),
            udp_echo_server(udp),
            proxy_line_server(proxy)
        );
    });

    let v4 = pair.topo.edge_public_v4;
    let v6 = pair.topo.edge_public_v6;
    let client_v4 = pair.topo.client_v4;
    let client_v6 = pair.topo.client_v6;
    run_in(&pair.topo.client, move || async move {
        // 8 concurrent connections, 64 MiB each way in all, half over IPv6.
        let mut flows = Vec::new();
        for i in 0..8u8 {
            let ip = if i % 2 == 0 {
                std::net::IpAddr::V4(v4)
            } else {
                std::net::IpAddr::V6(v6)
            };
            let addr = SocketAddr::new(ip, 9000);
            flows.push(tokio::spawn(async move {
                tcp_digest_client(addr, 8 << 20, [i; 32]).await
            }));
        }
        for f in flows {
            f.await
                .expect("flow task")
                .expect("TCP flow arrived intact both ways");
        }

        // UDP: datagrams of 0 to 1400 bytes from several client ports at
        // once, and a few larger than the tunnel's MTU (fragmented inside it).
        let mut senders = Vec::new();
        for k in 0..4usize {
            let dest = SocketAddr::new(if k == 3 { v6.into() } else { v4.into() }, 9001);
            senders.push(tokio::spawn(async move { udp_round_trips(dest, k).await }));
        }
        for s in senders {
            s.await.expect("udp task");
        }
        // A burst sent with GSO reaches the edge as one buffer (GRO) and
        // travels home as one: every datagram must still come back whole
        // and on its own.
        udp_gso_burst(SocketAddr::new(v4.into(), 9001)).await;

        // The client address home sees is the client namespace's, both families.
        for (edge_ip, client_ip) in [
            (
                std::net::IpAddr::from(v4),
                std::net::IpAddr::from(client_v4),
            ),
            (v6.into(), client_v6.into()),
        ] {
            let mut s = TcpStream::connect((edge_ip, 9002))
                .await
                .expect("connect proxy port");
            let mut line = String::new();
            s.read_to_string(&mut line)
                .await
                .expect("read PROXY line back");
            assert!(line.starts_with("PROXY TCP"), "{line:?}");
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                fields
                    .get(2)
                    .and_then(|a| a.parse::<std::net::IpAddr>().ok()),
                Some(client_ip),
                "{line:?}"
            );
        }
    });
}

async fn udp_round_trips(dest: SocketAddr, k: usize) {
    let bind: SocketAddr = if dest.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind).await.unwrap();
    sock.connect(dest).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let sizes: Vec<usize> = (0..60)
        .map(|i| 1 + (i * 97 + k * 13) % 1400)
        // Zero-length datagrams are some protocols' keepalives.
        .chain([0, 1, 1400, 1472, 8000])
        .collect();
    for (i, len) in sizes.into_iter().enumerate() {
        let payload: Vec<u8> = (0..len).map(|j| (j * 31 + i + k) as u8).collect();
        // UDP may drop; retry a few times before calling it lost.
        let mut ok = false;
        for _ in 0..5 {
            sock.send(&payload).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    assert_eq!(
                        &buf[..n],
                        &payload[..],
                        "datagram of {len} bytes came back changed"
                    );
                    ok = true;
                    break;
                }
                _ => continue,
            }
        }
        assert!(ok, "datagram of {len} bytes to {dest} never came back");
    }
}

/// Sends two GSO bursts of 50 datagrams of 1200 bytes; each datagram must
/// come back exactly once and unchanged. Together the bursts are more than
/// one 64 KiB super-packet holds, which is where coalescing at the TUN must
/// stop.
async fn udp_gso_burst(dest: SocketAddr) {
    use quinn_udp::{Transmit, UdpSocketState};
    const BURSTS: usize = 2;
    const COUNT: usize = 50;
    const SIZE: usize = 1200;
    let sock = UdpSocket::bind("0.0.0.0:0").await.unwrap();
    skerry::tunnel::driver::size_socket_buffers(&sock);
    let state = UdpSocketState::new((&sock).into()).unwrap();
    assert!(state.max_gso_segments() > 1, "this kernel has no UDP GSO");
    let datagram = |b: usize, i: usize| -> Vec<u8> {
        (0..SIZE).map(|j| (b * 131 + i * 7 + j) as u8).collect()
    };
    let mut expected = std::collections::HashSet::new();
    for b in 0..BURSTS {
        let burst: Vec<u8> = (0..COUNT).flat_map(|i| datagram(b, i)).collect();
        expected.extend(burst.chunks(SIZE).map(<[u8]>::to_vec));
        let transmit = Transmit {
            destination: dest,
            ecn: None,
            contents: &burst,
            segment_size: Some(SIZE),
            src_ip: None,
        };
        sock.async_io(tokio::io::Interest::WRITABLE, || {
            state.try_send((&sock).into(), &transmit)
        })
        .await
        .expect("GSO send");
    }
    assert_eq!(expected.len(), BURSTS * COUNT, "the datagrams differ");
    let mut buf = vec![0u8; 65536];
    while !expected.is_empty() {
        let n = match tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf)).await {
            Ok(r) => r.expect("receive an echo"),
            Err(_) => panic!(
                "{} of {} datagrams of the GSO bursts never came back",
                expected.len(),
                BURSTS * COUNT
            ),
        };
        assert!(
            expected.remove(&buf[..n]),
            "an echo of {n} bytes is not one of the bursts' datagrams (merged, cut or changed)"
        );
    }
}

#[test]
fn invalid_and_reserved_entries_are_refused_alone() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    // A program on the edge already holds TCP 9100.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let _squatter = spawn_in(&pair.topo.edge, move || async move {
        let l = TcpListener::bind("0.0.0.0:9100")
            .await
            .expect("squatter bind");
        held_tx.send(()).expect("signal");
        std::future::pending::<()>().await;
        drop(l);
    });
    held_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("squatter ready");
    let answer = pair.apply(port_map(
        2,
        &[
            &format!("tcp/9000={TCP_TARGET}"),
            &format!("tcp/7443={TCP_TARGET}"),
            &format!("udp/51820={UDP_TARGET}"),
            &format!("tcp/9100={TCP_TARGET}"),
            &format!("tcp/9200-9201={TCP_TARGET}"),
        ],
    ));
    let status = |key: &str| {
        answer
            .results
            .iter()
            .find(|r| r.key.to_string() == key)
            .map(|r| r.status.clone())
            .unwrap_or_else(|| panic!("no answer for {key}: {answer:?}"))
    };
    assert_eq!(status("tcp/9000"), EntryStatus::Listening);
    assert_eq!(status("tcp/7443"), EntryStatus::Reserved);
    assert_eq!(status("udp/51820"), EntryStatus::Reserved);
    assert_eq!(status("tcp/9100"), EntryStatus::InUse);
    assert_eq!(status("tcp/9200-9201"), EntryStatus::Listening);

    let _svc = skerry_tests::tcp_digest_service(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let v4 = pair.topo.edge_public_v4;
    run_in(&pair.topo.client, move || async move {
        for port in [9000, 9200] {
            tcp_digest_client(SocketAddr::from((v4, port)), 64 << 10, [7; 32])
                .await
                .unwrap_or_else(|e| panic!("port {port}: {e:#}"));
        }
    });
}

/// A packet the tunnel driver cannot take apart (here one larger than any
/// MTU it runs, after someone raised the TUN's MTU by hand) is dropped on
/// its own: the tunnel and the flows through it go on.
#[test]
fn an_unreadable_tun_packet_is_dropped_alone() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let _svc = skerry_tests::tcp_digest_service(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let v4 = pair.topo.edge_public_v4;
    let flow = move || async move {
        tcp_digest_client(SocketAddr::from((v4, 9000)), 256 << 10, [3; 32]).await
    };
    run_in(&pair.topo.client, flow).expect("a flow before");

    pair.topo
        .home
        .exec("ip", &["link", "set", "skerry-home", "mtu", "4000"])
        .expect("raising the home TUN's MTU");
    let edge_tunnel = pair.status.borrow().tunnel.edge();
    run_in(&pair.topo.home, move || async move {
        let s = UdpSocket::bind("0.0.0.0:0").await.expect("bind");
        s.send_to(&[0x5a; 3500], (edge_tunnel, 9))
            .await
            .expect("a 3500-byte datagram into the TUN");
    });
    let tunnel = pair.home_tunnel();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tunnel.stats().dropped_unreadable == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the driver never saw the oversized packet: {:?}",
            tunnel.stats()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pair.topo
        .home
        .exec("ip", &["link", "set", "skerry-home", "mtu", "1420"])
        .expect("restoring the MTU");
    run_in(&pair.topo.client, flow).expect("a flow after: the tunnel still runs");
}

/// In-tunnel flows in `state` (as `ss` names it) in `ns`, the edge's or
/// home's namespace: those to or from home's flow port.
fn in_tunnel_flows(ns: &skerry::netns::NetNs, state: &str) -> usize {
    let port = format!(":{}", skerry::flow::TCP_FLOW_PORT);
    let out = skerry_tests::ss(ns, &["-Htn", "state", state]);
    out.lines()
        .filter(|l| l.split_whitespace().any(|addr| addr.ends_with(&port)))
        .count()
}

/// Short connections one after another reuse the edge's in-tunnel flows
/// (framed flows): no handshake and no teardown inside the tunnel per
/// connection, and so no TIME_WAIT socket per connection either. The edge's
/// namespace gets 100 ephemeral ports here; 240 connections, a flow each,
/// would leave the edge's side of most of them in TIME_WAIT.
#[test]
fn short_connections_reuse_in_tunnel_flows() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    pair.topo
        .edge
        .exec(
            "sysctl",
            &["-w", "net.ipv4.ip_local_port_range=40000 40099"],
        )
        .expect("narrowing the edge's ephemeral ports");
    // Answers once the client has finished: the client's end of stream, and
    // so the edge's, comes first.
    let listener = skerry_tests::tcp_listener_in(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let _svc = spawn_in(&pair.topo.home, move || async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let _ = s.write_all(&got).await;
                }
            });
        }
    });
    pair.wait_for_pooled_flows();
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9000));
    for round in 0..3u8 {
        run_in(&pair.topo.client, move || async move {
            for i in 0..80u8 {
                let message = [round, i, 0x5a, 0xa5];
                let mut s = TcpStream::connect(public)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, connection {i}: connect: {e}"));
                s.write_all(&message).await.expect("request");
                s.shutdown().await.expect("end of request");
                let mut back = Vec::new();
                s.read_to_end(&mut back)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}, connection {i}: no reply ({e})"));
                assert_eq!(back, message, "round {round}, connection {i}");
            }
        });
    }
    let waiting = in_tunnel_flows(&pair.topo.edge, "time-wait");
    assert!(
        waiting < 10,
        "{waiting} in-tunnel flows in TIME_WAIT after 240 connections: flows are not reused"
    );
    let open = in_tunnel_flows(&pair.topo.edge, "established");
    assert!(
        open >= edge_agent::flow_pool::POOL_SIZE,
        "{open} in-tunnel flows open: the pool is not full (or ss is not read right)"
    );
    // The pool, plus what was lent when it refilled: the connection in
    // progress and the one before it, still waiting for home's FINISHED,
    // and some slack for a slow moment of the host.
    let most = edge_agent::flow_pool::POOL_SIZE + 4;
    assert!(
        open <= most,
        "{open} in-tunnel flows open after 240 sequential connections (at most {most} expected)"
    );
}

/// Reused flows with a target that speaks first and closes first (a
/// banner, an HTTP/1.0 answer), eight clients at once: every client gets
/// its own greeting whole, on flows that carried connections before, and
/// the edge opens few flows for them.
#[test]
fn reused_flows_carry_targets_that_close_first() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let listener = skerry_tests::tcp_listener_in(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let _svc = spawn_in(&pair.topo.home, move || async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        let mut n = 0u32;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            n += 1;
            tokio::spawn(async move {
                // A greeting longer than one frame's copy, then the close.
                let mut greeting = format!("hello {n}\n").into_bytes();
                greeting.resize(20_000, b'.');
                let _ = s.write_all(&greeting).await;
            });
        }
    });
    pair.wait_for_pooled_flows();
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9000));
    run_in(&pair.topo.client, move || async move {
        let clients: Vec<_> = (0..8)
            .map(|c| {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    for i in 0..25 {
                        let mut s = TcpStream::connect(public)
                            .await
                            .unwrap_or_else(|e| panic!("client {c}, connection {i}: connect: {e}"));
                        let mut got = Vec::new();
                        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
                            .await
                            .unwrap_or_else(|_| {
                                panic!("client {c}, connection {i}: no end of stream")
                            })
                            .unwrap_or_else(|e| panic!("client {c}, connection {i}: {e}"));
                        assert_eq!(
                            got.len(),
                            20_000,
                            "client {c}, connection {i}: greeting cut"
                        );
                        let line = got
                            .split(|&b| b == b'\n')
                            .next()
                            .unwrap_or_default()
                            .to_vec();
                        seen.push(String::from_utf8(line).expect("greeting text"));
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for c in clients {
            all.extend(c.await.expect("a client failed"));
        }
        all.sort();
        all.dedup();
        assert_eq!(
            all.len(),
            200,
            "each connection reached a target connection of its own"
        );
    });
    let waiting = in_tunnel_flows(&pair.topo.edge, "time-wait");
    assert!(
        waiting < 10,
        "{waiting} in-tunnel flows in TIME_WAIT after 200 connections: flows are not reused"
    );
    // Home closing flows (a target that closes first mishandled) would
    // leave them in TIME_WAIT there, and the edge would open new ones.
    let home_closed = in_tunnel_flows(&pair.topo.home, "time-wait");
    assert!(
        home_closed < 10,
        "home closed {home_closed} in-tunnel flows after 200 connections"
    );
    let open = in_tunnel_flows(&pair.topo.edge, "established");
    assert!(
        open >= edge_agent::flow_pool::POOL_SIZE,
        "{open} in-tunnel flows open: the pool is not full (or ss is not read right)"
    );
    // The pool, and per client (eight, as many as the pool) the connection
    // in progress and the one before it, still waiting for home's
    // FINISHED; some slack for a slow moment of the host.
    let most = 3 * edge_agent::flow_pool::POOL_SIZE + 4;
    assert!(
        open <= most,
        "{open} in-tunnel flows open (at most {most} expected)"
    );
}

/// A new public connection's first bytes leave the edge at once, on an
/// in-tunnel flow opened ahead of it (the edge's flow pool), instead of
/// after a handshake with home: one home round trip less before every
/// request. Shown by letting nothing come back from home at all: the
/// request still reaches the service.
#[test]
fn a_new_connection_needs_no_round_trip_to_home() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let listener = skerry_tests::tcp_listener_in(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let (got_tx, got_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let _svc = spawn_in(&pair.topo.home, move || async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        while let Ok((mut s, _)) = listener.accept().await {
            let got_tx = got_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf).await {
                    let _ = got_tx.send(buf[..n].to_vec());
                }
            });
        }
    });
    pair.wait_for_pooled_flows();
    // Nothing more from home is needed: its flow listener takes a flow when
    // the first data arrives (TCP_DEFER_ACCEPT), and that is the header.
    let wireguard = skerry::bootstrap::DEFAULT_WIREGUARD_PORT;
    // Nothing from home reaches the edge.
    skerry_tests::nft_drop(
        &pair.topo.edge,
        "skpool",
        "input",
        &format!("udp dport {wireguard}"),
    );
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9000));
    let _client = spawn_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect(public).await.expect("connect");
        s.write_all(b"first bytes").await.expect("send");
        // Held open: no answer can come back.
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let got = got_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the request never reached home: the edge waited for an answer from home first");
    assert_eq!(got, b"first bytes");
}

/// A pooled flow taken after home died without a word (before the edge's
/// control session times out) ends once home has failed to acknowledge
/// its first bytes for the open timeout, as an unanswered connect to home
/// did, instead of hanging through the kernel's 15 minutes of
/// retransmissions.
#[test]
fn a_flow_home_never_acknowledges_ends_after_the_open_timeout() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    pair.wait_for_pooled_flows();
    let wireguard = skerry::bootstrap::DEFAULT_WIREGUARD_PORT;
    // Nothing from the edge reaches home.
    skerry_tests::nft_drop(
        &pair.topo.edge,
        "skdead",
        "output",
        &format!("udp sport {wireguard}"),
    );
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9000));
    let limit = edge_agent::flow_pool::OPEN_TIMEOUT + Duration::from_secs(20);
    run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect(public).await.expect("connect");
        s.write_all(b"hello?").await.expect("send");
        let mut buf = [0u8; 16];
        let ended = tokio::time::timeout(limit, s.read(&mut buf)).await;
        assert!(
            matches!(ended, Ok(Ok(0) | Err(_))),
            "the connection should end when home never acknowledges: {ended:?}"
        );
    });
}

/// How a connection ended, seen from one end: what it read, and whether
/// the end was clean or a reset (a `TimedOut` error if it had not ended
/// within a minute).
async fn read_to_the_end(stream: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (got, Err(std::io::ErrorKind::TimedOut.into())),
            Ok(Ok(0)) => return (got, Ok(())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (got, Err(e)),
        }
    }
}

fn is_reset(end: &std::io::Result<()>) -> bool {
    matches!(end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
}

/// An abnormal end crosses the tunnel as a reset, as it would reach the
/// other end with nothing between: a target that aborts after part of its
/// answer (the client gets the part, then the reset, not a clean end that
/// passes the part off as whole), a target that refuses the connection,
/// and a client that aborts (the target sees the reset after the request).
#[test]
fn resets_cross_the_tunnel() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[
        &format!("tcp/9000={TCP_TARGET}"),
        // Nothing listens there.
        "tcp/9001=127.0.0.1:8009",
    ]);
    let listener = skerry_tests::tcp_listener_in(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<(Vec<u8>, bool)>();
    let _svc = spawn_in(&pair.topo.home, move || async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        while let Ok((s, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut line = String::new();
                if s.read_line(&mut line).await.is_err() {
                    return;
                }
                let mut s = s.into_inner();
                if line == "abort after part\n" {
                    let _ = s.write_all(b"part of an answer").await;
                    s.set_zero_linger().expect("SO_LINGER");
                    return;
                }
                // Anything else: how the client ends it.
                let (rest, end) = read_to_the_end(&mut s).await;
                let mut got = line.into_bytes();
                got.extend_from_slice(&rest);
                let _ = seen_tx.send((got, is_reset(&end)));
            });
        }
    });
    pair.wait_for_pooled_flows();
    let public = |port| SocketAddr::from((pair.topo.edge_public_v4, port));
    let (aborting, refusing) = (public(9000), public(9001));
    run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect(aborting).await.expect("connect");
        s.write_all(b"abort after part\n").await.expect("send");
        let (got, end) = read_to_the_end(&mut s).await;
        assert_eq!(got, b"part of an answer");
        assert!(is_reset(&end), "the target's abort came as {end:?}");

        let mut s = TcpStream::connect(refusing).await.expect("connect");
        s.write_all(b"hello\n").await.expect("send");
        let (got, end) = read_to_the_end(&mut s).await;
        assert!(got.is_empty());
        assert!(is_reset(&end), "the target's refusal came as {end:?}");

        let mut s = TcpStream::connect(aborting).await.expect("connect");
        s.write_all(b"a request, then an abort\n")
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.set_zero_linger().expect("SO_LINGER");
    });
    let (got, reset) = seen_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the target saw no end of the aborted connection");
    assert_eq!(got, b"a request, then an abort\n");
    assert!(
        reset,
        "the client's abort reached the target as a clean end"
    );
}

/// An edge-agent that stops resets the connections it relays, a removed
/// port's draining ones and half-closed ones too, and their targets': a
/// cut-off answer must not look whole to the client, as it would after a
/// plain close, and the target's connection must not stay open.
#[test]
fn an_edge_that_stops_resets_its_connections() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[
        &format!("tcp/9000={TCP_TARGET}"),
        &format!("tcp/9001={TCP_TARGET}"),
    ]);
    let listener = skerry_tests::tcp_listener_in(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let (target_end_tx, target_ends) = std::sync::mpsc::channel();
    let _svc = spawn_in(&pair.topo.home, move || async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        while let Ok((mut s, _)) = listener.accept().await {
            let target_end_tx = target_end_tx.clone();
            tokio::spawn(async move {
                // Part of an answer; the rest never comes, the connection stays open.
                let _ = s.write_all(b"part of an answer").await;
                let (_, end) = read_to_the_end(&mut s).await;
                // The client's half-close ends the reads cleanly; a reset
                // after it shows as the connection being gone.
                let reset = match &end {
                    Ok(()) => gone_within(&s, Duration::from_secs(60)).await,
                    end => is_reset(end),
                };
                let _ = target_end_tx.send((format!("{end:?}"), reset));
            });
        }
    });
    pair.wait_for_pooled_flows();
    let public = |port| SocketAddr::from((pair.topo.edge_public_v4, port));
    let (mapped, removed) = (public(9000), public(9001));
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            run_in(&pair.topo.client, move || async move {
                let mut a = TcpStream::connect(mapped).await.expect("connect");
                let mut b = TcpStream::connect(removed).await.expect("connect");
                let mut c = TcpStream::connect(mapped).await.expect("connect");
                let mut part = [0u8; 17];
                for s in [&mut a, &mut b, &mut c] {
                    s.read_exact(&mut part).await.expect("part of the answer");
                }
                // Said all it had to say; waits for the rest of the answer.
                c.shutdown().await.expect("half-close");
                opened_tx.send(()).expect("the test waits for this");
                (
                    read_to_the_end(&mut a).await,
                    read_to_the_end(&mut b).await,
                    read_to_the_end(&mut c).await,
                )
            })
        });
        opened_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the client's connections never got their first part");
        // Removed, so its connection drains (30 s grace) when the edge stops.
        assert!(pair.remove(&["tcp/9001"]).all_ok());
        pair.edge_stop.cancel();
        let ((a_got, a_end), (b_got, b_end), (c_got, c_end)) =
            client.join().expect("the client panicked");
        assert!(a_got.is_empty() && b_got.is_empty() && c_got.is_empty());
        assert!(
            is_reset(&a_end),
            "a mapped port's connection ended with {a_end:?}"
        );
        assert!(
            is_reset(&b_end),
            "a draining port's connection ended with {b_end:?}"
        );
        assert!(
            is_reset(&c_end),
            "a half-closed connection ended with {c_end:?}"
        );
    });
    for _ in 0..3 {
        let (end, reset) = target_ends
            .recv_timeout(Duration::from_secs(70))
            .expect("a target never reported how its connection ended");
        assert!(reset, "a target's connection was not reset (it read {end})");
    }
}

/// Whether `stream`, whose peer has half-closed, is reset within `limit`
/// (a reset connection has no peer address any more).
async fn gone_within(stream: &TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while stream.peer_addr().is_ok() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// What one end of a connection read, and how the connection ended.
type ConnectionEnd = (Vec<u8>, std::io::Result<()>);

/// Keepalive fast enough for a test: a silent peer is given up after 3 s.
const QUICK_DEAD_PEER: DeadPeer = DeadPeer {
    idle: Duration::from_secs(1),
    interval: Duration::from_secs(1),
    probes: 2,
};

/// Starts a pair whose agents give up silent peers quickly, with a target
/// that reports what it read and how its connection ended.
fn pair_with_reporting_target() -> (Pair, skerry_tests::Background, Receiver<ConnectionEnd>) {
    let pair = Pair::start_with(
        &[&format!("tcp/9000={TCP_TARGET}")],
        PairOptions {
            dead_peer: QUICK_DEAD_PEER,
            ..PairOptions::default()
        },
    );
    let listener = skerry_tests::tcp_listener_in(&pair.topo.home, TCP_TARGET.parse().unwrap());
    let (ended_tx, ended_rx) = std::sync::mpsc::channel();
    let svc = spawn_in(&pair.topo.home, move || async move {
        let listener = TcpListener::from_std(listener).expect("listener");
        while let Ok((mut s, _)) = listener.accept().await {
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                let _ = ended_tx.send(read_to_the_end(&mut s).await);
            });
        }
    });
    pair.wait_for_pooled_flows();
    (pair, svc, ended_rx)
}

/// A client that vanishes without a word (its network gone) is given up
/// once it answers no keepalive probe, and its target's connection is
/// reset, instead of both being held open for good (the target's own
/// keepalive is answered by home's kernel).
#[test]
fn a_client_that_vanishes_is_given_up_and_its_target_reset() {
    skerry_tests::init_tracing();
    let (pair, _svc, ended) = pair_with_reporting_target();
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9000));
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let _client = spawn_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect(public).await.expect("connect");
        s.write_all(b"hello\n").await.expect("send");
        let _ = sent_tx.send(());
        // Held open, and silent from now on.
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
    sent_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the client never connected");
    // The request is through before the client goes silent.
    std::thread::sleep(Duration::from_millis(300));
    for hook in ["input", "output"] {
        skerry_tests::nft_drop(&pair.topo.client, "skgone", hook, "meta l4proto tcp");
    }
    let (got, end) = ended
        .recv_timeout(Duration::from_secs(70))
        .expect("the target never reported how its connection ended");
    assert_eq!(got, b"hello\n");
    assert!(is_reset(&end), "the target's connection ended with {end:?}");
}

/// An edge that is gone for good (the tunnel silent both ways) is given up
/// at both ends, each on its own: the client and the target each see their
/// connection reset once the in-tunnel flow has answered no probe, instead
/// of an idle connection staying open for good on both sides.
#[test]
fn an_edge_gone_for_good_is_given_up_at_both_ends() {
    skerry_tests::init_tracing();
    let (pair, _svc, ended) = pair_with_reporting_target();
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9000));
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let (client_end_tx, client_end) = std::sync::mpsc::channel();
    let _client = spawn_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect(public).await.expect("connect");
        s.write_all(b"hello\n").await.expect("send");
        let _ = sent_tx.send(());
        let (got, end) = read_to_the_end(&mut s).await;
        let _ = client_end_tx.send((got, end));
    });
    sent_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the client never connected");
    // Past the edge's open timeout, which would otherwise decide when its
    // probes give up (see `edge_agent::flow_pool::open_flow`).
    std::thread::sleep(2 * edge_agent::flow_pool::OPEN_TIMEOUT + Duration::from_secs(1));
    let wireguard = skerry::bootstrap::DEFAULT_WIREGUARD_PORT;
    // Nothing crosses the tunnel any more, either way: neither end's
    // resets reach the other, so each must give up on its own.
    for (hook, matcher) in [
        ("input", format!("udp sport {wireguard}")),
        ("output", format!("udp dport {wireguard}")),
    ] {
        skerry_tests::nft_drop(&pair.topo.home, "skcut", hook, &matcher);
    }
    let (got, end) = ended
        .recv_timeout(Duration::from_secs(70))
        .expect("the target never reported how its connection ended");
    assert_eq!(got, b"hello\n");
    assert!(is_reset(&end), "the target's connection ended with {end:?}");
    let (got, end) = client_end
        .recv_timeout(Duration::from_secs(70))
        .expect("the client never reported how its connection ended");
    assert!(got.is_empty());
    assert!(is_reset(&end), "the client's connection ended with {end:?}");
}
