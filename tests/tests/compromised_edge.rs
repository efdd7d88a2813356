//! What a compromised edge can reach at home: the flows it is there to
//! carry, nothing else; it learns nothing about the home network. And the
//! tunnel's far end cannot be impersonated from either end's own network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use skerry::tunnel::TunnelAddrs;
use skerry_tests::agents::Pair;
use skerry_tests::{run_in, tcp_digest_client};

const TCP_TARGET: &str = "127.0.0.1:8000";

#[test]
fn a_compromised_edge_reaches_no_other_service_at_home() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&[&format!("tcp/9000={TCP_TARGET}")]);
    let _svc = skerry_tests::tcp_digest_service(&pair.topo.home, TCP_TARGET.parse().unwrap());
    // Services listening on all of home's addresses, as sshd or a database
    // would be; the tunnel's address is one of them.
    let home = &pair.topo.home;
    let sshd = skerry_tests::tcp_listener_in(home, "0.0.0.0:2222".parse().unwrap());
    let dns = skerry_tests::udp_socket_in(home, "0.0.0.0:2223".parse().unwrap());
    let home_in_tunnel = TunnelAddrs::DEFAULT.home();

    // Root on the edge speaks to home's tunnel address directly.
    let connected = run_in(&pair.topo.edge, move || async move {
        let udp = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        udp.send_to(b"who is there", (home_in_tunnel, 2223))
            .await
            .unwrap();
        // Unanswered, not refused: the SYN and its retransmissions vanish
        // at home's end of the tunnel.
        tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect((home_in_tunnel, 2222)),
        )
        .await
    });
    assert!(
        connected.is_err(),
        "the edge's connection to a service of home's was answered: {connected:?}"
    );
    let mut buf = [0u8; 64];
    match dns.recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a datagram from the edge reached a service of home's: {other:?}"),
    }
    assert!(
        sshd.accept().is_err(),
        "a connection from the edge waits at home"
    );
    let tunnel = pair.home_tunnel();
    skerry_tests::poll_until(Duration::from_secs(5), || {
        // The datagram, the SYN and at least one of its retransmissions.
        if tunnel.stats().dropped_not_admitted >= 3 {
            Ok(())
        } else {
            Err("home counted no refused tunnel packet".to_string())
        }
    });

    // What the edge is there for still works.
    let v4 = pair.topo.edge_public_v4;
    run_in(&pair.topo.client, move || async move {
        tcp_digest_client(SocketAddr::from((v4, 9000)), 1 << 20, [3; 32])
            .await
            .expect("a flow through the edge");
    });
}

/// A host on home's network (a guest's phone, an IoT device) cannot pose as
/// the edge: a datagram "from" the edge's tunnel address to home's flow
/// port, arriving over the LAN rather than the tunnel, reaches no target.
/// Loose reverse-path filtering, Debian's default, would let it in.
#[test]
fn a_host_on_the_home_network_cannot_pose_as_the_edge() {
    use skerry::flow::{DatagramHeader, UDP_FLOW_PORT};
    use skerry::netns::{NetNs, Side, Veth};
    skerry_tests::init_tracing();
    const UDP_TARGET: &str = "127.0.0.1:8001";
    let pair = Pair::start(&[&format!("udp/9001={UDP_TARGET}")]);
    let home = &pair.topo.home;
    let target = skerry_tests::udp_socket_in(home, UDP_TARGET.parse().unwrap());
    let tunnel = TunnelAddrs::DEFAULT;

    let lan = NetNs::create(&skerry_tests::unique("skt-lan")).unwrap();
    let wire = Veth::create(Some(&lan), "eth-home", Some(home), "eth-lan").unwrap();
    wire.add_addr(Side::A, "192.168.77.2/24").unwrap();
    wire.add_addr(Side::B, "192.168.77.1/24").unwrap();
    home.exec(
        "sysctl",
        &[
            "-qw",
            "net.ipv4.conf.all.rp_filter=2",
            "net.ipv4.conf.eth-lan.rp_filter=2",
        ],
    )
    .unwrap();
    // The edge's tunnel address, on the LAN host; home's, routed via home.
    lan.ip(&["addr", "add", &format!("{}/32", tunnel.edge()), "dev", "lo"])
        .unwrap();
    lan.ip(&[
        "route",
        "add",
        &format!("{}/32", tunnel.home()),
        "via",
        "192.168.77.1",
    ])
    .unwrap();
    let (edge_in_tunnel, home_in_tunnel) = (tunnel.edge(), tunnel.home());
    run_in(&lan, move || async move {
        let mut datagram = Vec::new();
        DatagramHeader {
            flow_id: 7,
            public_port: 9001,
            client: "203.0.113.9:4000".parse().unwrap(),
        }
        .encode(&mut datagram);
        datagram.extend_from_slice(b"posing as the edge");
        let sock = tokio::net::UdpSocket::bind((edge_in_tunnel, 0))
            .await
            .unwrap();
        for _ in 0..3 {
            sock.send_to(&datagram, (home_in_tunnel, UDP_FLOW_PORT))
                .await
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let mut buf = [0u8; 256];
    match target.recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("a datagram from the LAN reached home's target: {other:?}"),
    }
    drop(wire);
}

/// A neighbour of the edge on its public network (another droplet on the
/// cloud's LAN, say) sends a UDP flow reply "from" home's tunnel address,
/// with the flow ids the edge hands out in order. With loose reverse-path
/// filtering (Debian's default) the edge's kernel takes it: the route back
/// to that address exists, through the TUN. Unless the edge's tunnel
/// sockets are bound to the TUN device, the public client gets the
/// neighbour's payload as if home had sent it.
#[test]
fn a_neighbour_of_the_edge_cannot_pose_as_home() {
    use skerry::bootstrap::DEFAULT_WIREGUARD_PORT;
    use skerry::flow::{DatagramHeader, UDP_FLOW_PORT};
    skerry_tests::init_tracing();
    const UDP_TARGET: &str = "127.0.0.1:8001";
    let pair = Pair::start(&[&format!("udp/9001={UDP_TARGET}")]);
    let topo = &pair.topo;
    // Home's target takes datagrams and never answers: whatever reaches
    // the client comes from someone else.
    let target = skerry_tests::udp_socket_in(&topo.home, UDP_TARGET.parse().unwrap());
    let client = skerry_tests::udp_socket_in(&topo.client, SocketAddr::from((topo.client_v4, 0)));
    let public = SocketAddr::from((topo.edge_public_v4, 9001));
    let mut buf = [0u8; 256];
    skerry_tests::poll_until(Duration::from_secs(10), || {
        client
            .send_to(b"hello", public)
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(100));
        match target.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == b"hello" => Ok(()),
            other => Err(format!(
                "the client's datagram has not reached home: {other:?}"
            )),
        }
    });

    topo.edge
        .exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.conf.all.rp_filter=2",
                "net.ipv4.conf.eth-client.rp_filter=2",
            ],
        )
        .unwrap();
    let tunnel = TunnelAddrs::DEFAULT;
    let neighbour = &topo.client;
    neighbour
        .ip(&["addr", "add", &format!("{}/32", tunnel.home()), "dev", "lo"])
        .unwrap();
    neighbour
        .ip(&[
            "route",
            "add",
            &format!("{}/32", tunnel.edge()),
            "via",
            &topo.edge_public_v4.to_string(),
        ])
        .unwrap();
    let (edge_in_tunnel, home_in_tunnel) = (tunnel.edge(), tunnel.home());
    let client_addr = client.local_addr().unwrap();
    run_in(neighbour, move || async move {
        let sock = tokio::net::UdpSocket::bind((home_in_tunnel, UDP_FLOW_PORT))
            .await
            .unwrap();
        for flow_id in 0..64 {
            let mut datagram = Vec::new();
            DatagramHeader {
                flow_id,
                public_port: 9001,
                client: client_addr,
            }
            .encode(&mut datagram);
            datagram.extend_from_slice(b"posing as home");
            sock.send_to(&datagram, (edge_in_tunnel, DEFAULT_WIREGUARD_PORT))
                .await
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    match client.recv_from(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Ok((n, from)) => panic!(
            "the public client got {:?} from {from}, sent by the edge's neighbour",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("the client's socket failed: {e}"),
    }

    // The in-tunnel TCP flows too (a spoofed segment would need their
    // sequence numbers, which no test here can guess): `ss` shows a socket
    // bound to a device as address%device.
    pair.wait_for_pooled_flows();
    let tun = format!("%{}", edge_agent::DEFAULT_TUN_NAME);
    let flows = skerry_tests::ss(
        &topo.edge,
        &[
            "-Htn",
            "state",
            "established",
            "dst",
            &home_in_tunnel.to_string(),
        ],
    );
    assert!(
        flows.lines().count() > 0 && flows.lines().all(|l| l.contains(&tun)),
        "the edge's in-tunnel TCP flows are not all bound to {tun}:\n{flows}"
    );
}
