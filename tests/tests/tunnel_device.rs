//! The TUN device as each agent makes it, in a namespace of its own: what
//! the host's routes allow, and what the device carries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use skerry::netns::NetNs;
use skerry::tunnel::device::{self, DEFAULT_MTU, DeviceError};
use skerry_tests::run_in;

const TUN: &str = "sk-route";

const OWN: Ipv4Addr = Ipv4Addr::new(10, 99, 7, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 7, 2);

/// Makes the tunnel's device in `ns` (and removes it): the error if refused.
fn create_in(ns: &NetNs) -> Result<(), DeviceError> {
    run_in(ns, || async {
        device::create(TUN, OWN, PEER, 30, DEFAULT_MTU)
            .await
            .map(drop)
    })
}

fn assert_refused(result: Result<(), DeviceError>, route: &str) {
    match result {
        Err(e @ (DeviceError::SubnetRouted { .. } | DeviceError::PeerRoutedByRule { .. })) => {
            let message = e.to_string();
            assert!(
                message.contains(route) && message.contains("--tunnel-home"),
                "the error names the route ({route}) and what to do: {message}"
            );
        }
        other => panic!("{route} takes the far end's address, yet: {other:?}"),
    }
}

/// A VPN's wide route loses a few addresses to the tunnel (made); a route
/// for the tunnel's own subnet or its far end, or a policy rule that sends
/// the far end elsewhere whatever the main table says (as Tailscale's
/// does), would fight the tunnel's (refused, naming the route). The device
/// made has no IPv6 address: nothing of the kernel's own is sent into the
/// tunnel.
#[test]
fn the_tunnel_subnet_is_checked_against_the_routes_here() {
    skerry_tests::require_root();
    skerry_tests::init_tracing();
    let ns = NetNs::create(&skerry_tests::unique("skt-route")).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    ns.ip(&["route", "add", "blackhole", "10.99.0.0/16"])
        .unwrap();
    let (addresses, second) = run_in(&ns, || async {
        let dev = device::create(TUN, OWN, PEER, 30, DEFAULT_MTU)
            .await
            .expect("a wider route does not stop the tunnel");
        let out = std::process::Command::new("ip")
            .args(["-o", "addr", "show", "dev", TUN])
            .output()
            .unwrap();
        // A second agent with the same name, while the first holds it.
        let second = device::create(TUN, OWN, PEER, 30, DEFAULT_MTU)
            .await
            .map(drop);
        drop(dev);
        (String::from_utf8_lossy(&out.stdout).into_owned(), second)
    });
    assert!(
        matches!(second, Err(DeviceError::InUse { .. })),
        "a device in use is taken for another: {second:?}"
    );
    assert!(
        addresses.contains("inet 10.99.7.1/30"),
        "the tunnel's address: {addresses}"
    );
    assert!(
        !addresses.contains("inet6"),
        "the TUN has an IPv6 address: {addresses}"
    );

    // Tailscale's rules come before the main table's (32766).
    ns.ip(&["rule", "add", "pref", "5270", "lookup", "52"])
        .unwrap();
    ns.ip(&["route", "add", "10.99.0.0/16", "dev", "lo", "table", "52"])
        .unwrap();
    let by_rule = create_in(&ns);
    assert!(
        matches!(by_rule, Err(DeviceError::PeerRoutedByRule { .. })),
        "the refusal points at the policy rule: {by_rule:?}"
    );
    assert_refused(by_rule, "dev lo table 52");
    ns.ip(&["rule", "del", "pref", "5270"]).unwrap();

    // A rule that drops what goes from the tunnel's address.
    ns.ip(&[
        "rule",
        "add",
        "pref",
        "5271",
        "from",
        "10.99.7.1",
        "prohibit",
    ])
    .unwrap();
    match create_in(&ns) {
        Err(e @ DeviceError::PeerDropped { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("ip route get 10.99.7.2 from 10.99.7.1"),
                "the error says how to find the rule: {message}"
            );
        }
        other => panic!("a prohibit rule for the tunnel's traffic, yet: {other:?}"),
    }
    ns.ip(&["rule", "del", "pref", "5271"]).unwrap();

    ns.ip(&["route", "add", "blackhole", "10.99.7.2/32"])
        .unwrap();
    assert_refused(create_in(&ns), "10.99.7.2/32 blackhole");
}
