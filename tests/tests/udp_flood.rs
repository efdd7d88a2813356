//! A flood of UDP sources on a public port: the edge's flow table is
//! bounded (`skerry::flow::MAX_UDP_FLOWS`), and a full table of flows home
//! never answered still lets a real client in, and keeps it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use skerry::flow::MAX_UDP_FLOWS;
use skerry_tests::agents::Pair;
use skerry_tests::run_in;

const UDP_TARGET: &str = "127.0.0.1:8001";

/// `count` sources: each a socket on its own port, sent from once and
/// closed (the flow lives on at the edge), in small bursts so that the
/// edge's socket buffer drops few of them.
fn flood(pair: &Pair, first_port: u16, count: usize) {
    let (client, edge) = (pair.topo.client_v4, pair.topo.edge_public_v4);
    let count = u16::try_from(count).unwrap();
    run_in(&pair.topo.client, move || async move {
        for port in first_port..first_port + count {
            let sock = UdpSocket::bind((client, port)).unwrap();
            sock.send_to(b"flood", (edge, 9001)).unwrap();
            if port % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
}

/// The real client's datagram crosses; the target answers it (and only
/// it: the flood stays unanswered). Returns the address the target saw it
/// from: home's socket for that flow.
fn real_exchange(pair: &Pair, client: &UdpSocket, target: &UdpSocket, tag: &str) -> SocketAddr {
    let public = SocketAddr::from((pair.topo.edge_public_v4, 9001));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 64];
    let mut seen = None;
    while Instant::now() < deadline {
        client.send_to(tag.as_bytes(), public).unwrap();
        // Drain the target (the flood lands there too) looking for it.
        let until = Instant::now() + Duration::from_millis(200);
        while seen.is_none() && Instant::now() < until {
            match target.recv_from(&mut buf) {
                Ok((n, from)) if &buf[..n] == tag.as_bytes() => {
                    target.send_to(b"echo", from).unwrap();
                    seen = Some(from);
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("the target's socket failed: {e}"),
            }
        }
        let Some(from) = seen else { continue };
        std::thread::sleep(Duration::from_millis(100));
        match client.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == b"echo" => return from,
            Ok((n, _)) => panic!("the client got {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // The answer was lost; answer the next copy too.
                seen = None;
            }
            Err(e) => panic!("the client's socket failed: {e}"),
        }
    }
    panic!(
        "{tag}: the real client got no answer through the flood (its flow refused, or dropped for the flood's)"
    );
}

fn open_flows_at_home(pair: &Pair) -> usize {
    pair.status_report()
        .ports
        .iter()
        .find(|p| p.key == "udp/9001")
        .map_or(0, |p| p.open_flows)
}

#[test]
fn a_flood_of_udp_sources_leaves_room_for_a_real_client() {
    skerry_tests::init_tracing();
    // Home holds a socket per flow, up to twice the edge's table.
    skerry::fd_limit::raise().expect("raising the open-file limit");
    let pair = Pair::start(&[&format!("udp/9001={UDP_TARGET}")]);
    let target = skerry_tests::udp_socket_in(&pair.topo.home, UDP_TARGET.parse().unwrap());
    skerry::tunnel::driver::size_socket_buffers(&target);
    let client = skerry_tests::udp_socket_in(
        &pair.topo.client,
        SocketAddr::from((pair.topo.client_v4, 0)),
    );

    // Both floods below the ephemeral range (32768 up), where the real
    // client's port is; a quarter more than the table holds, for datagrams
    // dropped on the way.
    flood(&pair, 20_000, MAX_UDP_FLOWS + 1000);
    let from = real_exchange(&pair, &client, &target, "real 1");
    // More flows reached home than the edge's table holds: the edge made
    // room by dropping flows home never answered.
    skerry_tests::poll_until(Duration::from_secs(10), || {
        let n = open_flows_at_home(&pair);
        if n > MAX_UDP_FLOWS {
            Ok(())
        } else {
            Err(format!("{n} flows at home, not more than {MAX_UDP_FLOWS}"))
        }
    });

    // A second flood, larger than the table: dropped oldest first, the
    // answered flow would go too; it does not.
    // (Were it dropped, its next datagram would open a flow that home, by
    // then at its own cap, refuses: no answer at all.)
    flood(&pair, 26_000, MAX_UDP_FLOWS + 1000);
    let again = real_exchange(&pair, &client, &target, "real 2");
    assert_eq!(
        again, from,
        "the real client's flow was dropped for the flood's (a new flow at home)"
    );
}
