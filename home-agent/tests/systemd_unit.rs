//! `deploy/systemd/home-agent@.service`, run by a real systemd: a Debian
//! system of the host's release (mmdebstrap: minbase and systemd, cached)
//! boots in a `systemd-nspawn` container whose network namespace the test
//! made, with this build's home-agent installed and the unit enabled the way
//! the README says. The agent must come up from the unit alone and serve a
//! request through an edge (a real edge-agent in a namespace of its own),
//! answer `home-agent ports` on its admin socket (also from a root login
//! shell), refuse a second agent of its name started by hand, be restarted
//! after it is killed, and stop cleanly, staying inside the sandbox the unit
//! promises (one capability, no new privileges, a system call filter that
//! denies what it says).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use home_agent::local_edge::LocalEdge;
use skerry::netns::NetNs;
use skerry::paths::EdgeName;
use skerry::pki::HomePki;
use skerry::tunnel::TunnelAddrs;

/// From the container's start to the first request served: systemd boots
/// in a second or two, the agent connects in a fraction of that.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The unit's RestartSec is 10 s.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
const PUBLIC_PORT: u16 = 8080;
const ADDED_PORT: u16 = 8081;
const GREETING: &[u8] = b"hello from home, through systemd\n";

#[test]
fn the_home_agent_unit_serves_restarts_and_stops_under_systemd() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test boots a container with systemd-nspawn and makes network namespaces: run the \
         suite as root (sudo ./scripts/test)"
    );
    for tool in [
        "systemd-nspawn",
        "systemctl",
        "nsenter",
        "mmdebstrap",
        "flock",
    ] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: run scripts/install-deps (systemd, systemd-container, mmdebstrap, util-linux)"
        );
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let base = systemd_rootfs(&root);
    let work = tempfile::Builder::new()
        .prefix("skerry-unit-")
        .tempdir()
        .expect("a scratch directory");
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("the container's root");
    run(Command::new("tar")
        .arg("-xf")
        .arg(&base)
        .arg("-C")
        .arg(&rootfs));

    let name: EdgeName = format!("unit-{}", std::process::id())
        .parse()
        .expect("a valid edge name");
    let home = NetNs::create(&format!("sku-{}", std::process::id())).expect("the home namespace");

    // What the README's install steps put in place, with this build's
    // binary and the state the agent will find in /var/lib/skerry.
    let bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin).expect("/usr/local/bin");
    std::fs::copy(env!("CARGO_BIN_EXE_home-agent"), bin.join("home-agent"))
        .expect("installing home-agent");
    let units = rootfs.join("etc/systemd/system");
    std::fs::copy(
        root.join("deploy/systemd/home-agent@.service"),
        units.join("home-agent@.service"),
    )
    .expect("installing the unit");
    let state = rootfs.join("var/lib/skerry").join(name.as_str());
    let pki = HomePki::load_or_create(&state).expect("the home's CA in the container's state dir");

    // The edge: a real edge-agent in a namespace of its own, joined to the
    // home namespace by a veth (made from a thread in the home namespace).
    let edge = {
        let name = name.clone();
        in_namespace(&home, "start-edge", move || {
            LocalEdge::start(&name, &pki, TunnelAddrs::DEFAULT)
        })
        .expect("starting the edge")
    };

    // The service at home, on the home namespace's loopback.
    let service = in_namespace(&home, "bind-service", || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
    })
    .expect("binding the service");
    let target = service.local_addr().expect("the service's address");
    std::thread::spawn(move || serve_greeting(service));

    let config = rootfs.join("etc/skerry");
    std::fs::create_dir_all(&config).expect("/etc/skerry");
    std::fs::write(
        config.join(format!("{name}.env")),
        format!("EDGE={}\n", edge.control),
    )
    .expect("the instance's environment file");
    std::fs::write(
        config.join(format!("{name}.toml")),
        format!("ports = [\"tcp/{PUBLIC_PORT}={target}\"]\n"),
    )
    .expect("the port map");
    let unit = format!("home-agent@{name}.service");
    run(Command::new("systemctl")
        .arg(format!("--root={}", rootfs.display()))
        .args(["enable", &unit]));

    let started = Instant::now();
    let container = Container::boot(&rootfs, &home, work.path());
    let public = SocketAddr::from((edge.public_v4, PUBLIC_PORT));

    // 1. Up from the unit alone: a request crosses edge and tunnel.
    wait_for(
        READY_TIMEOUT,
        || request(&home, public),
        || container.diagnostics(&unit),
    );
    eprintln!(
        "served through the unit {:.1} s after systemd-nspawn started",
        started.elapsed().as_secs_f64()
    );

    // 2. The sandbox holds: one capability, no new privileges, seccomp.
    let pid = container.main_pid(&unit);
    let status = container.exec(&["cat", &format!("/proc/{pid}/status")]);
    let status = String::from_utf8_lossy(&status.stdout);
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {key} in the agent's status:\n{status}"))
            .to_owned()
    };
    // CAP_NET_ADMIN is capability 12.
    assert_eq!(field("CapBnd:"), "0000000000001000", "bounding set");
    assert_eq!(field("CapEff:"), "0000000000001000", "effective set");
    assert_eq!(field("NoNewPrivs:"), "1");
    // The system call filter, probed: an instance of the same unit whose
    // command (a drop-in changes only that) calls chown(2), which the
    // filter denies (@privileged) and root's own file would otherwise allow.
    // Counting seccomp filters would not tell: nspawn and several other
    // settings of the unit add filters of their own.
    let probe =
        container.home_agent_probe(&rootfs, "/bin/sh -c 'touch /tmp/p && chown 0:0 /tmp/p'");
    assert_eq!(
        probe.as_str(),
        "exit-code",
        "chown(2) under the unit's filter: {}",
        container.diagnostics("home-agent@probe.service")
    );
    let denied = container.exec(&["journalctl", "--no-pager", "-u", "home-agent@probe.service"]);
    assert!(
        String::from_utf8_lossy(&denied.stdout).contains("chown: changing ownership"),
        "{}",
        String::from_utf8_lossy(&denied.stdout)
    );

    // 3. `sudo home-agent ports` (a root shell with no session variables)
    // finds the service's socket in /run/skerry and changes ports live.
    let added = container.home_agent(
        &[],
        &[
            "ports",
            "--name",
            name.as_str(),
            "add",
            &format!("tcp/{ADDED_PORT}={target}"),
        ],
    );
    assert!(
        added.status.success(),
        "ports add failed: {}\n{}",
        String::from_utf8_lossy(&added.stderr),
        container.diagnostics(&unit)
    );
    let added_public = SocketAddr::from((edge.public_v4, ADDED_PORT));
    wait_for(
        Duration::from_secs(10),
        || request(&home, added_public),
        || container.diagnostics(&unit),
    );
    // A root login shell (`sudo -i`, ssh) has XDG_RUNTIME_DIR set by
    // pam_systemd: `ports` finds the service all the same.
    let listed = container.home_agent(
        &["XDG_RUNTIME_DIR=/run/user/0"],
        &["ports", "--name", name.as_str(), "list"],
    );
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && listing.contains(&format!("tcp/{ADDED_PORT}")),
        "ports list from a login shell: {listing}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    // `sudo home-agent connect` by hand, with the service running: root's
    // state is elsewhere (~/.local/state), so the state lock does not stop
    // it; the admin socket's lock must, before it makes or dials anything.
    let second = container.home_agent(
        // From a root login shell, the harder case: its own socket would be
        // under /run/user/0, not beside the service's.
        &["HOME=/root", "XDG_RUNTIME_DIR=/run/user/0"],
        &[
            "connect",
            "--name",
            name.as_str(),
            "--edge",
            &edge.control.to_string(),
        ],
    );
    let second_err = String::from_utf8_lossy(&second.stderr);
    // It stops at once, before it dials the edge (124: `timeout` ended it)
    // or makes a state directory (a CA that a user might copy over the
    // service's).
    assert!(
        !second.status.success()
            && second.status.code() != Some(124)
            && second_err.contains("already running"),
        "a second agent by hand: {}\n{second_err}",
        second.status
    );
    assert!(
        !rootfs
            .join("root/.local/state/skerry")
            .join(name.as_str())
            .exists(),
        "the refused agent made a state directory"
    );
    wait_for(
        Duration::from_secs(10),
        || request(&home, added_public),
        || container.diagnostics(&unit),
    );
    let listed = container.home_agent(&[], &["ports", "--name", name.as_str(), "list"]);
    assert!(
        listed.status.success(),
        "the service's socket is gone after the second agent: {}",
        String::from_utf8_lossy(&listed.stderr)
    );

    // 4. Killed, it is started again, with the same state (the edge takes
    // only its CA), and serves the file's ports again.
    container.systemctl(&["kill", "--signal=SIGKILL", &unit]);
    wait_for(
        RESTART_TIMEOUT,
        || match container.main_pid(&unit) {
            p if p != 0 && p != pid => Ok(()),
            p => Err(format!("main PID {p}")),
        },
        || container.diagnostics(&unit),
    );
    wait_for(
        RESTART_TIMEOUT,
        || request(&home, public),
        || container.diagnostics(&unit),
    );

    // 5. A stop is clean: the agent exits on SIGTERM and the unit does not
    // count as failed.
    container.systemctl(&["stop", &unit]);
    let result = container.show(&unit, "Result");
    let active = container.show(&unit, "ActiveState");
    // Exited (CLD_EXITED = 1) with status 0, not killed by the signal.
    let code = container.show(&unit, "ExecMainCode");
    let status = container.show(&unit, "ExecMainStatus");
    assert_eq!(
        (
            result.as_str(),
            active.as_str(),
            code.as_str(),
            status.as_str()
        ),
        ("success", "inactive", "1", "0"),
        "{}",
        container.diagnostics(&unit)
    );
    assert!(
        request(&home, public).is_err(),
        "the public port still answered after the agent stopped"
    );
    drop(container);
    drop(edge);
}

/// A Debian system with systemd, of this host's release (the home-agent
/// built here links against its C library), as a tarball built once and
/// kept in `target/skerry-image-cache` (beside the edge image's layers).
fn systemd_rootfs(root: &Path) -> PathBuf {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |key: &str| {
        release
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
    };
    assert_eq!(
        field("ID=").as_deref(),
        Some("debian"),
        "this test builds its container with mmdebstrap from Debian's archive, of the host's \
         release: it needs a Debian host"
    );
    let suite = field("VERSION_CODENAME=").expect("no VERSION_CODENAME in /etc/os-release");
    let cache = root.join("target/skerry-image-cache");
    std::fs::create_dir_all(&cache).expect("the image cache directory");
    let tar = cache.join(format!("systemd-rootfs-{suite}-v1.tar"));
    // A finished tarball is only renamed in: no lock needed to use it (the
    // edge image's build holds the cache's lock for minutes).
    if tar.is_file() {
        return tar;
    }
    let mirror = std::env::var("SKERRY_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
    let script = r#"
        set -e
        [ -f "$1" ] && exit 0
        echo "building a Debian $3 system with systemd for the unit test (once; needs $2)" >&2
        rm -rf "$1" "$1.part"
        mmdebstrap --quiet --format=tar --variant=minbase --include=systemd,systemd-sysv \
            "$3" "$1.part" "$2" >&2
        mv "$1.part" "$1"
    "#;
    run(Command::new("flock")
        .arg(cache.join(".lock"))
        .args(["sh", "-c", script, "sh"])
        .arg(&tar)
        .arg(&mirror)
        .arg(&suite));
    tar
}

/// The booted container; dropping it shuts it down.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), as this host sees it.
    init: u32,
    console: PathBuf,
}

impl Container {
    fn boot(rootfs: &Path, netns: &NetNs, work: &Path) -> Container {
        let console = work.join("console.log");
        let log = std::fs::File::create(&console).expect("the console log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("--quiet")
            .arg(format!("--directory={}", rootfs.display()))
            .arg(format!("--machine={}", netns.name()))
            .arg(format!(
                "--network-namespace-path={}",
                netns.path().display()
            ))
            // Not registered with a host systemd (there may be none).
            .args(["--register=no", "--keep-unit", "--boot", "--console=pipe"])
            .args(["--capability=CAP_NET_ADMIN", "--bind=/dev/net/tun"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the console log"))
            .stderr(log)
            .spawn()
            .expect("starting systemd-nspawn");
        // Made at once, so that a failure below still stops nspawn.
        let mut container = Container {
            nspawn,
            init: 0,
            console,
        };
        let started = Instant::now();
        container.init = loop {
            if let Some(pid) = descendant_named(container.nspawn.id(), "systemd") {
                break pid;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no systemd in the container after 30 s:\n{}",
                std::fs::read_to_string(&container.console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        container
    }

    /// Runs a command inside the container (all its namespaces).
    fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running nsenter")
    }

    /// `home-agent ARGS…` in the container, as from a root shell with
    /// only `env` and a PATH set. At most 60 s: an agent that did start
    /// would serve until stopped.
    fn home_agent(&self, env: &[&str], args: &[&str]) -> Output {
        let mut all = vec![
            "timeout",
            "60",
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ];
        all.extend_from_slice(env);
        all.push("/usr/local/bin/home-agent");
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// Runs `command` as `home-agent@probe`: the unit as installed, with a
    /// drop-in that changes only what it runs (once). Returns the unit's
    /// Result (`success`, `exit-code` …).
    fn home_agent_probe(&self, rootfs: &Path, command: &str) -> String {
        let dropin = rootfs.join("etc/systemd/system/home-agent@probe.service.d");
        std::fs::create_dir_all(&dropin).expect("the probe's drop-in directory");
        std::fs::write(
            dropin.join("probe.conf"),
            format!(
                "[Service]\nType=oneshot\nRestart=no\nTimeoutStartSec=30s\nExecStart=\nExecStart={command}\n"
            ),
        )
        .expect("the probe's drop-in");
        std::fs::write(rootfs.join("etc/skerry/probe.env"), "EDGE=unused\n")
            .expect("the probe's environment file");
        self.systemctl(&["daemon-reload"]);
        // A failing oneshot makes `start` fail: the Result says how.
        let _ = self.exec(&["systemctl", "start", "home-agent@probe.service"]);
        self.show("home-agent@probe.service", "Result")
    }

    fn systemctl(&self, args: &[&str]) {
        let mut all = vec!["systemctl"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        assert!(
            out.status.success(),
            "systemctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn show(&self, unit: &str, property: &str) -> String {
        let out = self.exec(&["systemctl", "show", "--value", "-p", property, unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.show(unit, "MainPID").parse().unwrap_or(0)
    }

    /// The unit's state and journal, and the console, for a failure message.
    fn diagnostics(&self, unit: &str) -> String {
        let status = self.exec(&["systemctl", "status", "--no-pager", "--lines=0", unit]);
        let journal = self.exec(&["journalctl", "--no-pager", "-n", "60", "-u", unit]);
        format!(
            "--- systemctl status\n{}\n--- journal\n{}{}\n--- console\n{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&journal.stdout),
            String::from_utf8_lossy(&journal.stderr),
            std::fs::read_to_string(&self.console).unwrap_or_default()
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to shut the container down (systemd's
        // poweroff); whatever is left after that is killed.
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing the container's init ends its whole PID namespace; with
        // no host systemd to clean up, killing nspawn alone would leave it.
        if self.init != 0 {
            let init = nix::unistd::Pid::from_raw(self.init as i32);
            let _ = nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The nearest descendant of `pid` whose command is `comm`.
fn descendant_named(pid: u32, comm: &str) -> Option<u32> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID …"; COMM may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.push((child, ppid, name.to_owned()));
        }
    }
    let mut level = vec![pid];
    while !level.is_empty() {
        let next: Vec<u32> = parents
            .iter()
            .filter(|(_, ppid, _)| level.contains(ppid))
            .map(|(child, _, _)| *child)
            .collect();
        if let Some((child, _, _)) = parents
            .iter()
            .find(|(child, _, name)| next.contains(child) && name == comm)
        {
            return Some(*child);
        }
        level = next;
    }
    None
}

/// Answers every connection with the greeting.
fn serve_greeting(listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.write_all(GREETING);
    }
}

/// One connection to `addr` from the home namespace: the greeting must
/// come back whole.
fn request(home: &NetNs, addr: SocketAddr) -> Result<(), String> {
    in_namespace(home, "client", move || -> Result<(), String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        stream
            .read_to_end(&mut got)
            .map_err(|e| format!("reading from {addr}: {e}"))?;
        if got == GREETING {
            Ok(())
        } else {
            Err(format!(
                "{addr} answered {:?}",
                String::from_utf8_lossy(&got)
            ))
        }
    })
}

/// Runs `f` on a thread in `ns` and returns what it returns.
fn in_namespace<T: Send + 'static>(
    ns: &NetNs,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    ns.spawn_thread(what, f)
        .unwrap_or_else(|e| panic!("{what}: no thread: {e}"))
        .join()
        .unwrap_or_else(|_| panic!("{what}: the thread panicked"))
        .unwrap_or_else(|e| panic!("{what}: entering {}: {e}", ns.name()))
}

/// Polls `check` until it succeeds; on timeout, panics with its last error
/// and `diagnostics`.
fn wait_for(
    limit: Duration,
    mut check: impl FnMut() -> Result<(), String>,
    diagnostics: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    loop {
        let error = match check() {
            Ok(()) => return,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("not within {limit:?}: {error}\n{}", diagnostics());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs a set-up command; its failure fails the test with its output.
fn run(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
