//! `connect --tunnel-*`: the tunnel's private addresses are the user's to
//! choose for an edge the command makes, and refused with a reason where
//! they cannot apply.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const GREETING: &[u8] = b"hello over a tunnel of the user's choosing\n";

/// The agent's own state, config and runtime dirs (its CA and keys among
/// them), removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        Scratch(
            std::env::temp_dir().join(format!("skerry-tunnel-addrs-{tag}-{}", std::process::id())),
        )
    }

    fn home_agent(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_home-agent"));
        for (var, sub) in [
            ("XDG_STATE_HOME", "state"),
            ("XDG_CONFIG_HOME", "config"),
            ("XDG_RUNTIME_DIR", "run"),
        ] {
            let d = self.0.join(sub);
            std::fs::create_dir_all(&d).expect("scratch dir");
            c.env(var, d);
        }
        c
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops the agent as Ctrl-C would, so it removes its namespace and TUN
/// (also when the test fails half-way).
struct Agent(Child);

impl Agent {
    fn stop(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.0.try_wait()? {
            return Ok(status);
        }
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGINT,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.0.kill();
                return Err(std::io::Error::other(
                    "the agent did not stop within 30 s of SIGINT",
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_local_edge_uses_the_tunnel_addresses_given() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs a local edge (network namespace, TUN devices): run the suite as root (sudo ./scripts/test)"
    );
    let service = TcpListener::bind("127.0.0.1:0").expect("service");
    let target = service.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in service.incoming().flatten() {
            let _ = s.write_all(GREETING);
        }
    });
    let scratch = Scratch::new("local");
    let name = format!("ta{}", std::process::id() % 100_000);
    let namespace = format!("skerry-{name}");
    let mut child = scratch
        .home_agent()
        .args(["connect", "--edge", "local", "--name", &name])
        .args(["--tunnel-edge", "10.99.7.1", "--tunnel-home", "10.99.7.2"])
        .args(["--tunnel-prefix", "29", "-p", &format!("tcp/8080={target}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting home-agent");
    let stdout = child.stdout.take().expect("stdout");
    let mut agent = Agent(child);

    // Stop reading at the public address and close the pipe, as
    // `connect … | head` would: the agent prints more, and must go on.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("public address: ") {
                let _ = tx.send(rest.split(',').next().map(|a| a.trim().to_owned()));
                return;
            }
        }
    });
    let public: Ipv4Addr = rx
        .recv_timeout(Duration::from_secs(60))
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "no public address from the agent within 60 s (exited: {:?})",
                agent.0.try_wait()
            )
        })
        .parse()
        .expect("an IPv4 public address first");
    reader.join().expect("reader");

    // Both ends of the tunnel carry the addresses asked for.
    let edge_addrs = ip(&["-n", &namespace, "-4", "addr", "show"]);
    assert!(
        edge_addrs.contains("10.99.7.1/29"),
        "the edge's tunnel address: {edge_addrs}"
    );
    let home_addrs = ip(&["-4", "addr", "show", "dev", &format!("sk-{name}")]);
    assert!(
        home_addrs.contains("10.99.7.2/29"),
        "the home's tunnel address: {home_addrs}"
    );

    // And the service is served through them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let attempt = TcpStream::connect_timeout(&(public, 8080).into(), Duration::from_secs(2))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut got = Vec::new();
                s.read_to_end(&mut got)?;
                Ok(got)
            });
        match attempt {
            Ok(got) if got == GREETING => break got,
            other if Instant::now() > deadline => panic!("no greeting through the edge: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(got, GREETING);
    // `status` names them too.
    let out = scratch
        .home_agent()
        .args(["status", "--name", &name])
        .output()
        .expect("home-agent status");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("tunnel (10.99.7.2 ↔ 10.99.7.1/29): up"),
        "status: {shown}"
    );
    let status = agent.stop().expect("stopping the agent");
    assert!(
        status.success(),
        "the agent did not stop cleanly with its stdout closed: {status}"
    );
    let left = ip(&["netns", "list"]);
    assert!(
        !left
            .lines()
            .any(|l| l.split_whitespace().next() == Some(namespace.as_str())),
        "the local edge's namespace is left behind: {left}"
    );
    // As root, the agent also locked root's socket name (one agent per name
    // for root, whatever XDG_RUNTIME_DIR says); the lock file stays after it.
    let name: skerry::paths::EdgeName = name.parse().expect("a valid name");
    let _ = std::fs::remove_file(skerry::paths::socket_lock(
        &skerry::paths::root_socket_path(&name),
    ));
}

/// Runs `home-agent` with `args`; its exit code and stderr.
fn refused(scratch: &Scratch, args: &[&str]) -> (Option<i32>, String) {
    let out = scratch
        .home_agent()
        .args(args)
        .output()
        .expect("home-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tunnel_addresses_are_refused_where_they_cannot_apply() {
    let scratch = Scratch::new("refused");
    let connect = [
        "connect",
        "--name",
        "ta-refused",
        "-p",
        "tcp/8080=127.0.0.1:80",
    ];

    // An edge the user runs has its addresses in its bootstrap file.
    let (code, err) = refused(
        &scratch,
        &[
            &connect[..],
            &["--edge", "127.0.0.1:7443", "--tunnel-prefix", "29"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("edge-bootstrap --tunnel-"), "{err}");

    // Addresses that are not one subnet.
    let (code, err) = refused(
        &scratch,
        &[
            &connect[..],
            &["--edge", "local", "--tunnel-edge", "10.99.8.1"],
            &["--tunnel-home", "10.99.9.2"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--tunnel-edge") && err.contains("not in one /30"),
        "{err}"
    );

    // The subnet's broadcast address, which no host can have.
    let (code, err) = refused(
        &scratch,
        &[
            &connect[..],
            &["--edge", "local", "--tunnel-edge", "10.99.8.1"],
            &["--tunnel-home", "10.99.8.3"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("broadcast address"), "{err}");

    // One end without the other, and a prefix out of range: usage errors.
    let (code, err) = refused(
        &scratch,
        &[
            &connect[..],
            &["--edge", "local", "--tunnel-edge", "10.99.8.1"],
        ]
        .concat(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--tunnel-home"), "{err}");
    let (code, err) = refused(
        &scratch,
        &[&connect[..], &["--edge", "local", "--tunnel-prefix", "31"]].concat(),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("31"), "{err}");
}
