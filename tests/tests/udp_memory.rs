//! What a UDP port range costs in memory: a game server's or an RTP
//! range's hundreds of ports, each with a flow, must not each hold buffers
//! as large as the datagrams that once crossed them. The edge's public
//! ports take turns with one set of receive buffers, and home's flows with
//! one reply buffer.
//!
//! The agents run in this test's process, so its resident memory is theirs
//! (and the test's few buffers, touched before the first measurement).
//! Keep this the file's only test: another running beside it would count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skerry_tests::agents::Pair;
use skerry_tests::{spawn_in, udp_socket_in};

const FIRST_PORT: u16 = 21_000;
const PORTS: u16 = 300;
const FIRST_TARGET: u16 = 41_000;
/// Ports crossed before the first measurement: the shared buffers, the
/// test's own and the allocator's arenas are touched by then.
const WARM_UP: u16 = 20;
/// Each port's datagram, and its echo: large, so that a buffer per port or
/// per flow would be touched ~60 kB deep.
const DATAGRAM: usize = 60_000;
/// What each further port and its flow may add, in the edge and at home
/// together: sockets, tasks and table entries (~2 KiB), not datagram
/// buffers (a buffer each came to ~115 KiB per port at the edge and ~65
/// KiB per flow at home).
const PER_PORT_KIB: u64 = 24;

/// This process's resident memory.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// Echoes every datagram on any of `targets`: a task per socket, one
/// buffer for all.
async fn echo_all(targets: Vec<UdpSocket>) {
    let buf = Arc::new(Mutex::new(vec![0u8; 65_536]));
    let mut echoes = tokio::task::JoinSet::new();
    for socket in targets {
        let socket = tokio::net::UdpSocket::from_std(socket).expect("a target socket");
        let buf = buf.clone();
        echoes.spawn(async move {
            while socket.readable().await.is_ok() {
                let mut buf = buf.lock().unwrap();
                while let Ok((n, from)) = socket.try_recv_from(&mut buf) {
                    // A lost echo is sent again by the client.
                    let _ = socket.try_send_to(&buf[..n], from);
                }
            }
        });
    }
    while echoes.join_next().await.is_some() {}
}

/// One large datagram to each public port in `ports`, each echoed back
/// whole by its target through both agents (sent again if lost).
fn cross(pair: &Pair, client: &UdpSocket, ports: Range<u16>, buf: &mut [u8]) {
    let mut datagram = vec![0u8; DATAGRAM];
    for port in ports {
        datagram[..2].copy_from_slice(&port.to_be_bytes());
        let to = SocketAddr::from((pair.topo.edge_public_v4, port));
        let echoed = (0..10).any(|_| {
            client.send_to(&datagram, to).unwrap();
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                match client.recv_from(buf) {
                    // Echoes of earlier ports' repeats are passed over.
                    Ok((n, _)) if buf[..n] == datagram[..] => return true,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("the client's socket failed: {e}"),
                }
            }
            false
        });
        assert!(
            echoed,
            "port {port}: a {DATAGRAM}-byte datagram was never echoed back through the agents"
        );
    }
}

#[test]
fn large_datagrams_on_many_ports_leave_no_buffer_behind_each() {
    skerry_tests::init_tracing();
    // A socket per port at the edge, per flow and per target at home: with
    // too few descriptors, datagrams would just not come back.
    let files = skerry::fd_limit::raise().expect("raising the open-file limit");
    assert!(
        files >= 4 * u64::from(PORTS),
        "this test needs {} open files, and the hard limit allows {files}: raise it (ulimit -Hn)",
        4 * u64::from(PORTS)
    );
    let last = FIRST_PORT + PORTS - 1;
    let pair = Pair::start(&[&format!("udp/{FIRST_PORT}-{last}=127.0.0.1:{FIRST_TARGET}")]);
    let targets = (0..PORTS)
        .map(|i| {
            udp_socket_in(
                &pair.topo.home,
                SocketAddr::from((Ipv4Addr::LOCALHOST, FIRST_TARGET + i)),
            )
        })
        .collect();
    let _echo = spawn_in(&pair.topo.home, move || echo_all(targets));
    let client = udp_socket_in(
        &pair.topo.client,
        SocketAddr::from((pair.topo.client_v4, 0)),
    );
    skerry::tunnel::driver::size_socket_buffers(&client);
    let mut buf = vec![0u8; 65_536];

    cross(&pair, &client, FIRST_PORT..FIRST_PORT + WARM_UP, &mut buf);
    let before = rss_kib();
    cross(&pair, &client, FIRST_PORT + WARM_UP..last + 1, &mut buf);
    let grown = rss_kib().saturating_sub(before);

    let ports = u64::from(PORTS - WARM_UP);
    eprintln!("the agents grew by {grown} KiB over {ports} ports");
    assert!(
        grown <= ports * PER_PORT_KIB,
        "the agents grew by {grown} KiB over {ports} ports that each carried one {DATAGRAM}-byte \
         datagram and its echo: {} KiB per port and flow, more than {PER_PORT_KIB} (a receive \
         buffer held per port or per flow?)",
        grown / ports
    );
}
