//! 200 add/remove cycles leave no listener, socket or file descriptor
//! behind. Its own test binary, so the descriptor count is this test's.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use skerry_tests::agents::Pair;

fn listeners(pair: &Pair) -> Vec<String> {
    let mut lines: Vec<String> = skerry_tests::ss(&pair.topo.edge, &["-Htuln"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Waits until home's flow listener has accepted every pooled flow: as
/// many established as the edge pools, none waiting in the accept queue.
fn home_accepted_pooled_flows(pair: &Pair) {
    let sport = format!(":{}", skerry::flow::TCP_FLOW_PORT);
    let home = &pair.topo.home;
    skerry_tests::poll_until(Duration::from_secs(30), || {
        let ss =
            |state: &str| skerry_tests::ss(home, &["-Htn", "state", state, "sport", "=", &sport]);
        let established = ss("established").lines().count();
        let queued: usize = ss("listening")
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<usize>().ok())
            .sum();
        if established >= edge_agent::flow_pool::POOL_SIZE && queued == 0 {
            Ok(())
        } else {
            Err(format!(
                "home holds {established} pooled flows, {queued} not yet accepted"
            ))
        }
    });
}

#[test]
fn two_hundred_add_remove_cycles_leave_nothing_behind() {
    skerry_tests::init_tracing();
    let pair = Pair::start(&["tcp/9000=127.0.0.1:8000"]);
    // One cycle first, so lazily created things (sockets of the admin
    // client, runtime internals) exist before counting.
    assert!(
        pair.add(&["tcp/9100=127.0.0.1:8000", "udp/9101=127.0.0.1:8001"])
            .all_ok()
    );
    assert!(pair.remove(&["tcp/9100", "udp/9101"]).all_ok());
    // The edge's pooled flows to home are descriptors of this process too,
    // at both ends: count once they are all open, and home has accepted
    // them (TCP_DEFER_ACCEPT holds them back for a second or more).
    pair.wait_for_pooled_flows();
    home_accepted_pooled_flows(&pair);
    let before_listeners = listeners(&pair);
    let before_fds = open_fds();

    for i in 0..200 {
        let added = pair.add(&[
            "tcp/9100=127.0.0.1:8000",
            "udp/9101=127.0.0.1:8001",
            "tcp/9200-9203=127.0.0.1:8000",
        ]);
        assert!(added.all_ok(), "cycle {i}: {added:?}");
        let removed = pair.remove(&["tcp/9100", "udp/9101", "tcp/9200-9203"]);
        assert!(removed.all_ok(), "cycle {i}: {removed:?}");
    }

    // Closing is asynchronous (listener tasks see their cancellation on the
    // next poll): wait for the counts to settle, then compare exactly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (l, f) = (listeners(&pair), open_fds());
        if l == before_listeners && f <= before_fds {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after 200 cycles:\nlisteners before {before_listeners:?}\nlisteners after  {l:?}\nfds before {before_fds}, after {f}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        before_listeners.iter().any(|l| l.contains(":9000")),
        "{before_listeners:?}"
    );
}
