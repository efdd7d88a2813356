//! Live port changes on a running pair: nothing that did not change is
//! disturbed, removed ports stop at once and drain, per-port options hold.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use skerry::bootstrap::{DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT};
use skerry::tunnel::driver::HOME_KEEPALIVE_SECS;
use skerry_tests::agents::{Pair, PairOptions};
use skerry_tests::{run_in, spawn_in};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ECHO: &str = "127.0.0.1:8000";
const HELLO_NEW: &str = "127.0.0.1:8003";
const PROXY_V2: &str = "127.0.0.1:8004";

async fn echo_server(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Says who it is and closes: tells a retargeted port's new target apart.
async fn hello_server(l: TcpListener, word: &'static str) {
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.write_all(word.as_bytes()).await;
    }
}

/// Parses a PROXY v2 header and answers with the source address in it.
async fn proxy_v2_server(l: TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut h = [0u8; 16];
            if s.read_exact(&mut h).await.is_err() || &h[..12] != b"\r\n\r\n\0\r\nQUIT\n" {
                let _ = s.write_all(b"bad signature").await;
                return;
            }
            let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
            let mut body = vec![0u8; len];
            if s.read_exact(&mut body).await.is_err() {
                return;
            }
            let src: IpAddr = match h[13] >> 4 {
                1 => IpAddr::from([body[0], body[1], body[2], body[3]]),
                2 => IpAddr::from(<[u8; 16]>::try_from(&body[..16]).unwrap()),
                _ => {
                    let _ = s.write_all(b"bad family").await;
                    return;
                }
            };
            let _ = s.write_all(src.to_canonical().to_string().as_bytes()).await;
        });
    }
}

/// The home's services, listening before this returns.
fn services(pair: &Pair) -> skerry_tests::Background {
    let home = &pair.topo.home;
    let echo = skerry_tests::tcp_listener_in(home, ECHO.parse().unwrap());
    let hello = skerry_tests::tcp_listener_in(home, HELLO_NEW.parse().unwrap());
    let proxy = skerry_tests::tcp_listener_in(home, PROXY_V2.parse().unwrap());
    spawn_in(home, move || async move {
        let echo = TcpListener::from_std(echo).unwrap();
        let hello = TcpListener::from_std(hello).unwrap();
        let proxy = TcpListener::from_std(proxy).unwrap();
        tokio::join!(
            echo_server(echo),
            hello_server(hello, "new target"),
            proxy_v2_server(proxy)
        );
    })
}

/// Sends `n` bytes and checks they come back; false if the connection ended.
async fn round_trip(s: &mut TcpStream, n: usize, seed: u8) -> bool {
    let data: Vec<u8> = (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let (mut r, mut w) = s.split();
    let send = w.write_all(&data);
    let mut back = vec![0u8; n];
    let recv = r.read_exact(&mut back);
    let (a, b) = tokio::join!(send, recv);
    a.is_ok() && b.is_ok() && back == data
}

#[test]
fn a_stream_survives_add_remove_and_retarget() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={ECHO}")]);
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;

    let (to_main, from_flow) = mpsc::channel::<()>();
    let (to_flow, from_main) = mpsc::channel::<()>();
    let flow = {
        pair.topo
            .client
            .spawn_runtime("long-flow", move || async move {
                let mut s = TcpStream::connect((v4, 9000)).await.expect("connect 9000");
                assert!(round_trip(&mut s, 4 << 20, 1).await, "before the changes");
                to_main.send(()).unwrap();
                // Keep streaming while the main thread changes the map.
                let mut rounds = 0u8;
                while from_main.try_recv().is_err() {
                    rounds = rounds.wrapping_add(1);
                    assert!(
                        round_trip(&mut s, 256 << 10, rounds).await,
                        "during the changes"
                    );
                }
                assert!(round_trip(&mut s, 4 << 20, 2).await, "after the changes");
            })
            .unwrap()
    };
    from_flow
        .recv_timeout(Duration::from_secs(30))
        .expect("the long flow started");

    let added = pair.add(&[&format!("tcp/9100={ECHO}")]);
    assert!(added.all_ok(), "{added:?}");
    let removed = pair.remove(&["tcp/9100"]);
    assert!(removed.all_ok(), "{removed:?}");
    let retargeted = pair.add(&[&format!("tcp/9000={HELLO_NEW}")]);
    assert!(retargeted.all_ok(), "{retargeted:?}");
    // New flows on the retargeted port reach the new target.
    let word = run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect((v4, 9000))
            .await
            .expect("connect after retarget");
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    });
    assert_eq!(word, "new target");
    to_flow.send(()).unwrap();
    flow.join()
        .expect("long flow thread")
        .expect("long flow in its namespace");
}

#[test]
fn a_removed_port_refuses_at_once_and_drains_after_the_grace_period() {
    skerry_tests::init_tracing();
    let grace = Duration::from_secs(2);
    let pair = Pair::start_with(
        &[&format!("tcp/9000={ECHO}")],
        PairOptions {
            drain_grace: grace,
            ..PairOptions::default()
        },
    );
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;
    let (to_main, from_flow) = mpsc::channel::<()>();
    let (to_flow, from_main) = mpsc::channel::<()>();
    let held = pair
        .topo
        .client
        .spawn_runtime("held-flow", move || async move {
            let mut s = TcpStream::connect((v4, 9000)).await.expect("connect");
            assert!(round_trip(&mut s, 1024, 1).await);
            to_main.send(()).unwrap();
            from_main.recv().unwrap();
            // Within the grace period the open flow still works.
            assert!(
                round_trip(&mut s, 1024, 2).await,
                "an open flow stopped inside the grace period"
            );
            to_main.send(()).unwrap();
            // After it, the edge cuts the flow, and says so with a reset:
            // a clean end of stream would look like the service's own.
            let mut buf = [0u8; 16];
            let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
            assert!(
                matches!(&closed, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "the flow outlived the grace period, or ended without a reset: {closed:?}"
            );
        })
        .unwrap();
    from_flow.recv_timeout(Duration::from_secs(30)).unwrap();
    let removed = pair.remove(&["tcp/9000"]);
    assert!(removed.all_ok(), "{removed:?}");
    let refused = run_in(&pair.topo.client, move || async move {
        TcpStream::connect((v4, 9000)).await.is_err()
    });
    assert!(
        refused,
        "a new connection was accepted after `ports rm` returned"
    );
    to_flow.send(()).unwrap();
    from_flow.recv_timeout(Duration::from_secs(30)).unwrap();
    held.join().unwrap().unwrap();
}

#[test]
fn allow_lists_proxy_v2_and_max_conns_hold() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={ECHO}")]);
    let _svc = services(&pair);
    let t = &pair.topo;
    let (v4, v6, client_v4) = (t.edge_public_v4, t.edge_public_v6, t.client_v4);
    let report = pair.add(&[
        &format!("tcp/9001={ECHO},allow={client_v4}/32"),
        &format!("tcp/9002={ECHO},allow=203.0.113.0/24,2001:db8::/32"),
        &format!("tcp/9003={PROXY_V2},proxy=v2"),
        &format!("tcp/9004={ECHO},max-conns=2"),
    ]);
    assert!(report.all_ok(), "{report:?}");
    run_in(&pair.topo.client, move || async move {
        // Inside the list (IPv4 client) is admitted; IPv6 from outside is not.
        let mut s = TcpStream::connect((v4, 9001)).await.unwrap();
        assert!(
            round_trip(&mut s, 4096, 1).await,
            "an allowed source was refused"
        );
        for addr in [
            SocketAddr::from((v6, 9001)),
            SocketAddr::from((v4, 9002)),
            SocketAddr::from((v6, 9002)),
        ] {
            let admitted = match TcpStream::connect(addr).await {
                Err(_) => false,
                Ok(mut s) => round_trip(&mut s, 16, 1).await,
            };
            assert!(
                !admitted,
                "{addr}: a source outside the allow list got through"
            );
        }

        // PROXY v2 carries the client namespace's address.
        let mut s = TcpStream::connect((v4, 9003)).await.unwrap();
        let mut said = String::new();
        s.read_to_string(&mut said).await.unwrap();
        assert_eq!(said, client_v4.to_string());

        // max-conns=2: a third connection is refused while two are open.
        let mut a = TcpStream::connect((v4, 9004)).await.unwrap();
        let mut b = TcpStream::connect((v4, 9004)).await.unwrap();
        assert!(round_trip(&mut a, 64, 1).await && round_trip(&mut b, 64, 2).await);
        let third = match TcpStream::connect((v4, 9004)).await {
            Err(_) => false,
            Ok(mut c) => round_trip(&mut c, 16, 3).await,
        };
        assert!(!third, "a third connection got through max-conns=2");
        drop(a);
        // Once one closes, a new one is admitted.
        let mut ok = false;
        for _ in 0..50 {
            if let Ok(mut c) = TcpStream::connect((v4, 9004)).await
                && round_trip(&mut c, 16, 4).await
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ok, "max-conns did not free a slot when a connection closed");
        drop(b);
    });
}

#[test]
fn config_file_edits_apply_and_bad_edits_change_nothing() {
    skerry_tests::init_tracing();
    let dir = skerry_tests::scratch_dir("skerry-config");
    let file = dir.path().join("edge.toml");
    std::fs::write(&file, format!("ports = [\"tcp/9000={ECHO}\"]\n")).unwrap();
    let pair = Pair::start_with(
        &[&format!("tcp/9000={ECHO}")],
        PairOptions {
            config: Some(file.clone()),
            ..PairOptions::default()
        },
    );
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;

    std::fs::write(
        &file,
        format!("# two ports now\nports = [\n  \"tcp/9000={ECHO}\",\n  \"tcp/9001={ECHO}\",\n]\n"),
    )
    .unwrap();
    let status = wait_status(&pair, |s| {
        s.ports.iter().any(|p| p.key == "tcp/9001" && p.ok)
    });
    let generation = status.generation;
    assert!(run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect((v4, 9001)).await.unwrap();
        round_trip(&mut s, 1024, 1).await
    }));

    std::fs::write(
        &file,
        format!("ports = [\n  \"tcp/9000={ECHO}\",\n  \"tcp/0={ECHO}\",\n]\n"),
    )
    .unwrap();
    let status = wait_status(&pair, |s| s.config_error.is_some());
    let error = status.config_error.clone().unwrap();
    assert!(
        error.contains(":3:") && error.contains("port 0"),
        "the error names the line and the reason: {error}"
    );
    assert_eq!(
        status.generation, generation,
        "a refused file changed the map"
    );
    assert!(
        status.ports.iter().any(|p| p.key == "tcp/9001" && p.ok),
        "{status:?}"
    );
}

fn wait_status(
    pair: &Pair,
    done: impl Fn(&home_agent::admin::StatusReport) -> bool,
) -> home_agent::admin::StatusReport {
    skerry_tests::poll_until(Duration::from_secs(20), || {
        let s = pair.status_report();
        if done(&s) {
            Ok(s)
        } else {
            Err(format!("status never reached the expected state: {s:?}"))
        }
    })
}

#[test]
fn losing_the_control_channel_keeps_flows_and_the_reconnect_resends_the_map() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={ECHO}")]);
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;
    let (to_main, from_flow) = mpsc::channel::<()>();
    let (to_flow, from_main) = mpsc::channel::<()>();
    let held = pair
        .topo
        .client
        .spawn_runtime("held-flow", move || async move {
            let mut s = TcpStream::connect((v4, 9000)).await.expect("connect");
            assert!(round_trip(&mut s, 4096, 1).await);
            to_main.send(()).unwrap();
            let mut n = 0u8;
            while from_main.try_recv().is_err() {
                n = n.wrapping_add(1);
                assert!(
                    round_trip(&mut s, 4096, n).await,
                    "the data plane stopped with the control channel"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .unwrap();
    from_flow.recv_timeout(Duration::from_secs(30)).unwrap();

    // Drop every control packet at the edge: the session times out.
    skerry_tests::nft_drop(
        &pair.topo.edge,
        "skt",
        "input",
        &format!("udp dport {DEFAULT_CONTROL_PORT}"),
    );
    let mut status = pair.status.clone();
    skerry_tests::agents::block_on(async {
        tokio::time::timeout(Duration::from_secs(60), status.wait_for(|s| !s.connected))
            .await
            .expect("the home-agent never noticed the lost control channel")
            .unwrap();
    });
    // A change made meanwhile is kept and sent on reconnect.
    let pending = pair.add(&[&format!("tcp/9001={ECHO}")]);
    assert!(
        pending
            .note
            .as_deref()
            .is_some_and(|n| n.contains("not connected")),
        "{pending:?}"
    );
    pair.topo
        .edge
        .exec("nft", &["delete", "table", "inet", "skt"])
        .expect("remove nft rule");
    skerry_tests::agents::block_on(async {
        tokio::time::timeout(
            Duration::from_secs(60),
            status.wait_for(|s| s.connected && s.sessions >= 2),
        )
        .await
        .expect("the home-agent did not reconnect")
        .unwrap();
    });
    let status = wait_status(&pair, |s| {
        s.ports.iter().any(|p| p.key == "tcp/9001" && p.ok)
    });
    assert!(status.connected);
    assert!(run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect((v4, 9001)).await.unwrap();
        round_trip(&mut s, 1024, 9).await
    }));
    to_flow.send(()).unwrap();
    held.join().unwrap().unwrap();
}

/// A dynamic IP changes, a router reboots and maps anew: home's address
/// on the way to the edge changes under a running pair. Nothing restarts:
/// QUIC migrates the control session, the edge sees that and asks home for
/// a tunnel packet, so the tunnel follows at once rather than at home's
/// next keepalive, and a connection that was open goes on.
#[test]
fn home_moving_to_a_new_address_keeps_flows_and_the_session() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={ECHO}")]);
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;
    let sessions = pair.status.borrow().sessions;
    // A connection opened before the move makes one round trip per word
    // from here, and says how long it took.
    let (to_main, from_flow) = mpsc::channel::<Duration>();
    let (to_flow, from_main) = mpsc::channel::<bool>();
    let held = pair
        .topo
        .client
        .spawn_runtime("held-flow", move || async move {
            let mut s = TcpStream::connect((v4, 9000)).await.expect("connect");
            let mut n = 0u8;
            while from_main.recv() == Ok(true) {
                n = n.wrapping_add(1);
                let started = std::time::Instant::now();
                assert!(
                    round_trip(&mut s, 4096, n).await,
                    "the held connection ended"
                );
                to_main.send(started.elapsed()).unwrap();
            }
        })
        .unwrap();
    let round_trip_now = || {
        to_flow.send(true).unwrap();
        from_flow
            .recv_timeout(Duration::from_secs(60))
            .expect("a round trip on the held connection")
    };
    round_trip_now();
    // The tunnel carries IPv4 alone: no IPv6 address on either TUN, so
    // neither kernel sends a packet of its own into it (such a packet from
    // home would tell the edge the new address by chance).
    for (ns, tun) in [
        (&pair.topo.home, "skerry-home"),
        (&pair.topo.edge, edge_agent::DEFAULT_TUN_NAME),
    ] {
        let out = ns
            .exec("ip", &["-6", "-o", "addr", "show", "dev", tun])
            .unwrap();
        assert!(
            out.stdout.is_empty(),
            "{tun} has IPv6 addresses: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The move comes when the connection's in-tunnel flow is past its open
    // timeout (from then on an outage of the home link stalls it instead
    // of ending it), and a second after one of home's keepalives (every
    // 25 s, give or take a 250 ms timer tick, from when its tunnel started,
    // just before the first handshake), which would tell the edge the new
    // address too. Home has nothing unacknowledged either, so for 24 s
    // nothing of home's reaches the edge unless the edge asks for it.
    let tunnel = pair.home_tunnel();
    let keepalive = Duration::from_secs(HOME_KEEPALIVE_SECS.into());
    let flow_settled = Instant::now() + 2 * edge_agent::flow_pool::OPEN_TIMEOUT;
    let mut move_at =
        tunnel.stats().last_handshake.expect("handshake done") + keepalive + Duration::from_secs(1);
    while move_at < flow_settled {
        move_at += keepalive;
    }
    std::thread::sleep(move_at.saturating_duration_since(Instant::now()));

    let home = &pair.topo.home;
    let old = pair.topo.home_v4;
    let new = std::net::Ipv4Addr::from(u32::from(old) + 1);
    home.exec(
        "sysctl",
        &["-qw", "net.ipv4.conf.eth-edge.promote_secondaries=1"],
    )
    .expect("sysctl");
    home.ip(&["addr", "add", &format!("{new}/24"), "dev", "eth-edge"])
        .expect("add the new address");
    // Home's answer is one datagram, which can be lost: the first one is
    // (the first keepalive, 60 bytes with its headers, from the new
    // address). The edge asks again when the tunnel has not heard from
    // the new address within a second.
    skerry_tests::nft_drop(
        home,
        "skt-lost",
        "output",
        &format!(
            "ip saddr {new} udp dport {DEFAULT_WIREGUARD_PORT} udp length 40 quota 61 bytes counter"
        ),
    );
    home.ip(&["addr", "del", &format!("{old}/24"), "dev", "eth-edge"])
        .expect("remove the old address");
    // The client speaks first after the move; its bytes wait in the edge's
    // in-tunnel connection, retransmitted 0.2, 0.6, 1.4, 3.0, 6.2, 12.6 and
    // 25.4 s after they were sent, until the edge sends to the new address.
    // Asked, home answers within about 5.5 s (its control keep-alive goes
    // every 5 s, the edge looks four times a second), and asked again, a
    // second later: the bytes cross at the 12.6 s retransmission (the
    // 6.2 s one when the first answer is not lost). Left to its keepalive,
    // 24 s away, they would cross at the 25.4 s one.
    let first = round_trip_now();
    assert!(
        first < Duration::from_secs(20),
        "the first round trip after the move took {first:?}: the edge waited for home's keepalive"
    );
    let rules = home
        .exec("nft", &["list", "table", "inet", "skt-lost"])
        .expect("list the nft rule");
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("packets 1 "),
        "no keepalive of home's from its new address was dropped: {rules}"
    );
    home.exec("nft", &["delete", "table", "inet", "skt-lost"])
        .expect("remove the nft rule");
    for _ in 0..3 {
        round_trip_now();
    }

    // Port changes go through the migrated session, not a new one.
    pair.add(&[&format!("tcp/9001={ECHO}")]);
    wait_status(&pair, |s| {
        s.ports.iter().any(|p| p.key == "tcp/9001" && p.ok)
    });
    assert_eq!(
        pair.status.borrow().sessions,
        sessions,
        "the control session was re-made"
    );
    assert!(run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect((v4, 9001)).await.unwrap();
        round_trip(&mut s, 1024, 9).await
    }));
    to_flow.send(false).unwrap();
    held.join().unwrap().unwrap();
}

#[test]
fn an_edge_restart_is_rebuilt_from_home() {
    skerry_tests::init_tracing();
    let mut pair = Pair::start(&[
        &format!("tcp/9000={ECHO}"),
        &format!("tcp/9001={HELLO_NEW}"),
    ]);
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;
    let sessions = pair.status.borrow().sessions;
    pair.restart_edge();
    pair.wait_reconnected(sessions);
    let status = wait_status(&pair, |s| s.ports.iter().all(|p| p.ok));
    assert_eq!(status.ports.len(), 2);
    // The new edge has a new WireGuard key; the tunnel follows it.
    let word = run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect((v4, 9000))
            .await
            .expect("connect 9000 after restart");
        assert!(round_trip(&mut s, 1 << 20, 5).await);
        let mut s = TcpStream::connect((v4, 9001))
            .await
            .expect("connect 9001 after restart");
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    });
    assert_eq!(word, "new target");
}

/// A home-agent that restarts while the edge stays (an upgrade, a reboot
/// at home) comes back to a working edge. Nothing from home reaches the
/// edge while it stops, as when it crashes: the edge's pooled flows to the
/// old home-agent are never closed by it, and the new session must not
/// hand them out (the new home's TCP stack would reset them).
#[test]
fn a_restarted_home_gets_no_flows_meant_for_the_old_one() {
    skerry_tests::init_tracing();
    let mut pair = Pair::start(&[&format!("tcp/9000={ECHO}")]);
    let _svc = services(&pair);
    let v4 = pair.topo.edge_public_v4;
    assert!(run_in(&pair.topo.client, move || async move {
        let mut s = TcpStream::connect((v4, 9000)).await.unwrap();
        round_trip(&mut s, 1024, 1).await
    }));
    let sessions = pair.status.borrow().sessions;
    skerry_tests::nft_drop(
        &pair.topo.edge,
        "skhome",
        "input",
        &format!("udp dport {{ {DEFAULT_CONTROL_PORT}, {DEFAULT_WIREGUARD_PORT} }}"),
    );
    pair.restart_home();
    pair.topo
        .edge
        .exec("nft", &["delete", "table", "inet", "skhome"])
        .expect("remove nft rule");
    pair.wait_reconnected(sessions);
    // More connections than the edge pools, one after another: none may
    // land on a flow opened to the old home-agent.
    let n = edge_agent::flow_pool::POOL_SIZE + 4;
    run_in(&pair.topo.client, move || async move {
        for i in 0..n {
            let mut s = TcpStream::connect((v4, 9000))
                .await
                .unwrap_or_else(|e| panic!("connection {i} after the restart: {e}"));
            let seed = u8::try_from(i).unwrap_or(0);
            assert!(
                round_trip(&mut s, 1024, seed).await,
                "connection {i} after the restart failed"
            );
        }
    });
}

#[test]
fn idle_udp_flows_expire() {
    skerry_tests::init_tracing();
    let pair = Pair::start_with(
        &["udp/9005=127.0.0.1:8005"],
        PairOptions {
            udp_idle: Duration::from_secs(1),
            ..PairOptions::default()
        },
    );
    let echo = skerry_tests::udp_socket_in(&pair.topo.home, "127.0.0.1:8005".parse().unwrap());
    let _echo = spawn_in(&pair.topo.home, move || async move {
        skerry_tests::udp_echo_server(tokio::net::UdpSocket::from_std(echo).unwrap()).await;
    });
    let v4 = pair.topo.edge_public_v4;
    run_in(&pair.topo.client, move || async move {
        for k in 0..3u8 {
            let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
            s.connect((v4, 9005)).await.unwrap();
            let mut buf = [0u8; 16];
            let mut ok = false;
            for _ in 0..5 {
                s.send(&[k; 8]).await.unwrap();
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await
                {
                    ok = n == 8;
                    break;
                }
            }
            assert!(ok, "no echo from client port {k}");
        }
    });
    let flows = || {
        pair.status_report()
            .ports
            .iter()
            .find(|p| p.key == "udp/9005")
            .map_or(0, |p| p.open_flows)
    };
    assert_eq!(flows(), 3, "one flow per client address");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flows() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle UDP flows did not expire"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
