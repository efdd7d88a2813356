//! The edge image under qemu: build it with `images/build-local.sh` (cached
//! under `target/skerry-image-cache/`), boot it with software emulation
//! inside a network namespace, and stand in for the droplet metadata service
//! it reads its bootstrap from.
//!
//! ```text
//!  namespace (made by the test)                      qemu guest (the image)
//!  ──────────────────────────────                    ─────────────────────
//!  home-agent ─udp→ 127.0.0.1:7443  ══hostfwd══▶  edge-agent control :7443
//!  home-agent ─udp→ 127.0.0.1:51820 ══hostfwd══▶  edge-agent WireGuard :51820
//!  client ─tcp/udp→ 127.0.0.1:P     ══hostfwd══▶  edge-agent public port P
//!  169.254.169.254:80 on lo  ◀══ user-net NAT ══  GET /metadata/v1/user-data
//! ```
//!
//! qemu's user networking gives the guest DHCP (10.0.2.15, gateway
//! 10.0.2.2) and connects the guest's outgoing TCP from the host side: a
//! guest connection to 169.254.169.254:80, through its default route as on a
//! DHCP custom image on DigitalOcean, becomes a connection from qemu to
//! 169.254.169.254:80 in the namespace qemu runs in, where [`serve_metadata`]
//! listens. The forwarded ports keep their numbers (the home-agent dials
//! WireGuard at the control address's IP and the port the edge announced),
//! which is safe because they are bound in the test's own namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skerry::netns::NetNs;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Where the droplet metadata service answers, on every droplet.
pub const METADATA_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80);

/// The path of the user data under the metadata service.
pub const USER_DATA_PATH: &str = "/metadata/v1/user-data";

/// The Debian packages behind the tools a boot test needs, for the message.
const INSTALL_HINT: &str =
    "run scripts/install-deps (qemu-system-x86, qemu-utils, mmdebstrap, fdisk, e2fsprogs)";

/// Panics, naming the tool and how to get it, unless every program in
/// `tools` is on `PATH`. A boot test never skips silently.
pub fn require_tools(tools: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} not found on PATH: {INSTALL_HINT}",
        missing.join(", ")
    );
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_owned()
}

/// Builds the static musl edge-agent that goes into the image (`cargo build
/// --release --target x86_64-unknown-linux-musl -p edge-agent`; a no-op when
/// it is up to date, as in CI, which builds it first) and returns its path.
/// Panics with cargo's exit status if the build fails (its output is shown).
///
/// `SKERRY_MUSL_EDGE_AGENT`, when set, names a binary already built (CI sets
/// it after its own musl build): a nested cargo run from inside `cargo test`
/// sees a different environment and rebuilds the whole release profile.
pub fn build_musl_edge_agent() -> PathBuf {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    if let Some(prebuilt) = std::env::var_os("SKERRY_MUSL_EDGE_AGENT").map(PathBuf::from) {
        assert!(
            prebuilt.is_file(),
            "SKERRY_MUSL_EDGE_AGENT={} is not a file: build it with `cargo build --release --target {TARGET} -p edge-agent`",
            prebuilt.display()
        );
        return prebuilt;
    }
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "--target", TARGET, "-p", "edge-agent"])
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the musl edge-agent: {e}"));
    assert!(
        status.success(),
        "building the musl edge-agent failed ({status}); cargo's messages are above (a \
         missing {TARGET} target: run scripts/install-deps)"
    );
    root.join("target").join(TARGET).join("release/edge-agent")
}

/// A disk image of the edge, as `images/build-local.sh` left it.
#[derive(Debug)]
pub struct EdgeImage {
    /// The raw image in the cache. Boot it with `snapshot=on` so that it
    /// stays unchanged ([`Vm::boot`] does).
    pub path: PathBuf,
    /// How long the build took (near zero when both layers were cached).
    pub build_time: Duration,
}

/// Builds (or finds in the cache) the edge image with `edge_agent` in it.
/// The script's progress goes to this process's standard error.
pub fn build_edge_image(edge_agent: &Path) -> EdgeImage {
    let root = workspace_root();
    let script = root.join("images/build-local.sh");
    let started = Instant::now();
    let output = Command::new(&script)
        .arg("--edge-agent")
        .arg(edge_agent)
        .arg("--cache")
        .arg(root.join("target/skerry-image-cache"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed ({}); its messages are above",
        script.display(),
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| panic!("build-local.sh printed no image path: {stdout:?}"));
    EdgeImage {
        path,
        build_time: started.elapsed(),
    }
}

/// The protocol of a forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A port of the guest reachable at `host` in qemu's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    pub proto: Proto,
    pub host: SocketAddrV4,
    pub guest_port: u16,
}

impl Forward {
    /// `proto` port `port` on 127.0.0.1, to the same port of the guest.
    pub fn same_port(proto: Proto, port: u16) -> Forward {
        Forward {
            proto,
            host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            guest_port: port,
        }
    }

    fn hostfwd(&self) -> String {
        format!(
            "hostfwd={}:{}:{}-:{}",
            self.proto,
            self.host.ip(),
            self.host.port(),
            self.guest_port
        )
    }
}

/// How to boot the image.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub image: PathBuf,
    pub memory_mib: u32,
    /// More than one runs the vCPUs on threads of their own (MTTCG), where
    /// a guest kernel patching its own code can hang (see the edge image
    /// test).
    pub cpus: u32,
    pub forwards: Vec<Forward>,
    /// The guest's serial console (kernel, systemd and edge-agent logs).
    pub serial_log: PathBuf,
}

/// A qemu process booting the edge image inside a namespace. Dropping it
/// kills qemu (by its PID) and waits for it.
pub struct Vm {
    child: Child,
    serial_log: PathBuf,
    started: Instant,
}

impl Vm {
    /// Starts `qemu-system-x86_64` in `ns` (`ip netns exec` and `setpriv`
    /// both exec in place, so the child's PID is qemu's; qemu gets SIGKILL
    /// if the thread that started it dies first): TCG, no display, the
    /// serial console to [`VmConfig::serial_log`], no default devices (no
    /// VGA, CD-ROM or monitor), the disk copy-on-write
    /// (`snapshot=on`: the image file is never written), user networking
    /// with the forwards, and `-no-reboot`, so that a guest that panics or
    /// reboots ends qemu instead of looping.
    pub fn boot(ns: &NetNs, config: &VmConfig) -> Vm {
        let mut netdev = String::from("user,id=net0");
        for fwd in &config.forwards {
            netdev.push(',');
            netdev.push_str(&fwd.hostfwd());
        }
        let drive = format!(
            "file={},format=raw,if=virtio,snapshot=on",
            config.image.display()
        );
        let serial = format!("file:{}", config.serial_log.display());
        let qemu_log = config.serial_log.with_extension("qemu.log");
        let qemu_out = File::create(&qemu_log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", qemu_log.display()));
        let qemu_err = qemu_out
            .try_clone()
            .unwrap_or_else(|e| panic!("{}: {e}", qemu_log.display()));
        let mut cmd = Command::new("ip");
        // `setpriv --pdeathsig KILL` (util-linux): should this test process
        // die without dropping the guard, qemu dies with it instead of
        // emulating a machine forever in a namespace nobody owns.
        cmd.args(["netns", "exec", ns.name()])
            .args(["setpriv", "--pdeathsig", "KILL", "qemu-system-x86_64"])
            .args(["-accel", "tcg", "-nographic", "-nodefaults", "-no-reboot"])
            .args(["-m", &config.memory_mib.to_string()])
            .args(["-smp", &config.cpus.to_string()])
            .args(["-serial", &serial])
            .args(["-drive", &drive])
            .args(["-netdev", &netdev])
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .stdin(Stdio::null())
            .stdout(qemu_out)
            .stderr(qemu_err);
        tracing::info!(?cmd, "booting the edge image");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-system-x86_64: {e}; {INSTALL_HINT}"));
        Vm {
            child,
            serial_log: config.serial_log.clone(),
            started: Instant::now(),
        }
    }

    /// When qemu was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// qemu's exit status, if it has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read(&self.serial_log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the serial console and whatever qemu itself
    /// printed: what a failure message should show.
    pub fn diagnostics(&self, n: usize) -> String {
        let serial = self.serial();
        let lines: Vec<&str> = serial.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        let qemu =
            std::fs::read_to_string(self.serial_log.with_extension("qemu.log")).unwrap_or_default();
        format!(
            "--- serial console ({}), last {n} lines ---\n{tail}\n--- qemu ---\n{qemu}",
            self.serial_log.display()
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.exited().is_none() {
            if let Err(e) = self.child.kill() {
                tracing::warn!(pid = self.child.id(), error = %e, "cannot kill qemu");
            }
            let _ = self.child.wait();
        }
    }
}

/// Every request the metadata stand-in received: `"GET /path"`.
pub type RequestLog = Arc<Mutex<Vec<String>>>;

/// The droplet metadata service, as far as an edge uses it: answers `GET
/// /metadata/v1/user-data` with `user_data`, and a few other documented
/// paths (`/metadata/v1/id`, `/metadata/v1/hostname`), each with
/// `Content-Length` and `Connection: close`; 404 for anything else. Every
/// request line goes into `log`. Runs until dropped.
pub async fn serve_metadata(listener: TcpListener, user_data: String, log: RequestLog) {
    let user_data: Arc<str> = user_data.into();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let user_data = user_data.clone();
                let log = log.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer_metadata(stream, &user_data, &log).await {
                        tracing::warn!(%peer, error = %e, "metadata request failed");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "metadata accept failed"),
        }
    }
}

async fn answer_metadata(
    mut stream: TcpStream,
    user_data: &str,
    log: &RequestLog,
) -> io::Result<()> {
    const MAX_HEAD: usize = 16 * 1024;
    let mut head = Vec::new();
    let mut buf = [0; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request head timed out"))??;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "incomplete or oversized request head",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    log.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(format!("{method} {path}"));
    let (status, body) = match (method, path) {
        ("GET", USER_DATA_PATH) => ("200 OK", user_data),
        ("GET", "/metadata/v1/id") => ("200 OK", "424242"),
        ("GET", "/metadata/v1/hostname") => ("200 OK", "skerry-edge-test"),
        _ => ("404 Not Found", "not found\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The metadata address as a socket address, for binding.
pub fn metadata_socket_addr() -> SocketAddr {
    SocketAddr::V4(METADATA_ADDR)
}
