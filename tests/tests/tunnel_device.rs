//! The TUN device as each agent makes it, in a namespace of its own: what
//! the host's routes allow, and what the device carries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use skerry::netns::NetNs;
use skerry::tunnel::device::{self, DEFAULT_MTU, DeviceError};
use skerry_tests::run_in;

const TUN: &str = "sk-route";

/// A VPN's wide route loses a few addresses to the tunnel (made, with a
/// warning); a route for the tunnel's own subnet, or its far end, would
/// fight the tunnel's (refused, naming the route). The device made has no
/// IPv6 address: nothing of the kernel's own is sent into the tunnel.
#[test]
fn the_tunnel_subnet_is_checked_against_the_routes_here() {
    skerry_tests::init_tracing();
    let ns = NetNs::create(&skerry_tests::unique("skt-route")).unwrap();
    ns.ip(&["route", "add", "blackhole", "10.99.0.0/16"])
        .unwrap();
    let addresses = run_in(&ns, || async {
        let dev = device::create(TUN, Ipv4Addr::new(10, 99, 7, 1), 30, DEFAULT_MTU)
            .await
            .expect("a wider route does not stop the tunnel");
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "dev", TUN])
            .output()
            .unwrap();
        drop(dev);
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    assert!(
        addresses.contains("inet 10.99.7.1/30"),
        "the tunnel's address: {addresses}"
    );
    assert!(
        !addresses.contains("inet6"),
        "the TUN has an IPv6 address: {addresses}"
    );

    ns.ip(&["route", "add", "blackhole", "10.99.7.2/32"])
        .unwrap();
    let refused = run_in(&ns, || async {
        device::create(TUN, Ipv4Addr::new(10, 99, 7, 1), 30, DEFAULT_MTU)
            .await
            .map(drop)
    });
    match refused {
        Err(e @ DeviceError::SubnetRouted { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("10.99.7.2/32 blackhole") && message.contains("--tunnel-home"),
                "the error names the route and what to do: {message}"
            );
        }
        other => panic!("a route for the far end's address was not refused: {other:?}"),
    }
}
