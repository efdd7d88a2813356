//! Linux network namespaces: the embedded local edge of
//! `home-agent connect --edge local`, and the end-to-end tests.
//!
//! What it does:
//! - [`NetNs`] creates a named namespace (`ip netns add`, pinned at
//!   `/run/netns/NAME`), brings `lo` up, turns IPv6 duplicate address
//!   detection off and forwarding off, and deletes it again on drop.
//! - [`NetNs::spawn_thread`] / [`NetNs::spawn_runtime`] run code on a fresh OS
//!   thread that has entered the namespace with `setns(2)`. Every socket, TUN
//!   device and netlink socket that thread creates belongs to the namespace,
//!   and keeps belonging to it when its fd is handed to another thread.
//! - [`Veth`] makes a veth pair between two namespaces (or one namespace and
//!   the namespace of this process), and deletes it on drop.
//!
//! What it does not do: own processes. Threads and child processes started in
//! a namespace are the caller's to stop; dropping a [`NetNs`] removes its pin,
//! and the kernel frees the namespace once nothing inside holds it.
//!
//! Requirements: root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN` for `setns`), see
//! [`require_root`], and iproute2's `ip` on `PATH`: links, addresses and the
//! namespaces themselves are set up by running `ip`.

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::Mutex;
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Where `ip netns add` pins namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";
/// Longest namespace name [`NetNs::create`] accepts.
pub const MAX_NETNS_NAME_LEN: usize = 32;
/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;
/// The device the kernel needs to create TUN interfaces.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Serialises `ip netns add` within this process: the first call of a boot
/// turns `/run/netns` into a shared mount, and concurrent first calls would
/// stack bind mounts on it.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Why a namespace operation failed. Messages name the command that ran and
/// quote its standard error.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Not root, or no TUN device.
    #[error(
        "skerry's local edge and tests need root (CAP_NET_ADMIN) and /dev/net/tun; run with sudo ({detail})"
    )]
    NotPrivileged {
        /// What exactly is missing.
        detail: String,
    },
    /// A namespace name outside `[A-Za-z0-9_-]{1,32}`.
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An interface name the kernel would refuse.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidIfName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An address that is not `ADDRESS/PREFIX`.
    #[error("invalid interface address {cidr:?}: {reason}")]
    InvalidCidr {
        /// The address as given.
        cidr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// [`NetNs::create`] refuses to adopt a namespace it did not create.
    #[error(
        "network namespace {name} already exists (left over from an earlier run?); \
         if nothing uses it any more, remove it with `ip netns del {name}`"
    )]
    AlreadyExists {
        /// The namespace's name.
        name: String,
    },
    /// A command could not be started at all (for `ip`: is iproute2 installed?).
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// Opening `/run/netns/NAME` or `setns(2)` failed.
    #[error("could not enter network namespace {name} ({}): {source}", path.display())]
    Enter {
        /// The namespace's name.
        name: String,
        /// Its pin.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing a sysctl inside the namespace failed.
    #[error("could not set {key}={value} in network namespace {name}: {source}")]
    Sysctl {
        /// The namespace's name.
        name: String,
        /// The key, dotted (`net.ipv4.ip_forward`).
        key: &'static str,
        /// The value written.
        value: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The tokio runtime of [`NetNs::spawn_runtime`] could not be built.
    #[error("could not start a tokio runtime in network namespace {name}: {source}")]
    Runtime {
        /// The namespace's name.
        name: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The thread that set the namespace up panicked.
    #[error("the setup thread of network namespace {name} panicked")]
    SetupPanicked {
        /// The namespace's name.
        name: String,
    },
}

/// Checks that this process can create namespaces, veths and TUN devices:
/// effective uid 0 and `/dev/net/tun` present.
pub fn require_root() -> Result<(), NetnsError> {
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(NetnsError::NotPrivileged {
            detail: format!("effective uid is {euid}"),
        });
    }
    if !Path::new(TUN_DEVICE).exists() {
        return Err(NetnsError::NotPrivileged {
            detail: format!("{TUN_DEVICE} does not exist"),
        });
    }
    Ok(())
}

/// A named network namespace this process created (`ip netns add`).
///
/// Dropping it deletes the namespace's pin (`ip netns del`); failures are
/// logged, never panicked on. Threads and processes started inside are the
/// caller's: the kernel frees the namespace when the last of them is gone.
pub struct NetNs {
    name: String,
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("NetNs").field(&self.name).finish()
    }
}

impl NetNs {
    /// Creates the namespace `name` (at most 32 characters of
    /// `[A-Za-z0-9_-]`), brings `lo` up, turns IPv6 duplicate address
    /// detection off (`accept_dad=0` for `all` and `default`, so addresses are
    /// usable at once) and sets `net.ipv4.ip_forward=0` and IPv6 forwarding
    /// off explicitly.
    ///
    /// Refuses a name that already exists: it may belong to someone else.
    pub fn create(name: &str) -> Result<NetNs, NetnsError> {
        validate_netns_name(name)?;
        let path = netns_path(name);
        let already = || NetnsError::AlreadyExists {
            name: name.to_owned(),
        };
        if path.exists() {
            return Err(already());
        }
        {
            // The guard protects no data, so a poisoned lock is still usable.
            let _serial = NETNS_ADD
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match run("ip", &["netns", "add", name]) {
                Ok(_) => {}
                Err(NetnsError::Command { stderr, .. }) if stderr.contains("File exists") => {
                    return Err(already());
                }
                Err(e) => return Err(e),
            }
        }
        // From here on, dropping `ns` deletes the namespace again.
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.spawn_thread("netns-setup", write_namespace_sysctls)
            .map_err(|source| NetnsError::Enter {
                name: ns.name.clone(),
                path: ns.path(),
                source,
            })?
            .join()
            .map_err(|_| NetnsError::SetupPanicked {
                name: ns.name.clone(),
            })??
            .map_err(|(key, value, source)| NetnsError::Sysctl {
                name: ns.name.clone(),
                key,
                value,
                source,
            })?;
        tracing::debug!(netns = %ns.name, "created network namespace");
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's pin: `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// Runs `f` on a new OS thread named `name` that has entered this
    /// namespace (`setns(2)` on `/run/netns/NAME`). Everything that thread
    /// creates (sockets, TUN devices, netlink sockets) lives in the namespace.
    ///
    /// The outer error is a failure to start the thread; the inner one, a
    /// failure to enter the namespace (then `f` does not run). A panic in `f`
    /// comes back as the `Err` of [`JoinHandle::join`].
    pub fn spawn_thread<F, T>(
        &self,
        name: &str,
        f: F,
    ) -> io::Result<JoinHandle<Result<T, NetnsError>>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns_name = self.name.clone();
        let path = self.path();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                enter(&ns_name, &path)?;
                Ok(f())
            })
    }

    /// Like [`NetNs::spawn_thread`], and runs the future `f` makes on a
    /// current-thread tokio runtime (all drivers enabled) on that thread. The
    /// future need not be `Send`; its output comes back through the handle.
    /// The runtime, and every task the future spawned, ends with the future.
    pub fn spawn_runtime<F, Fut, T>(
        &self,
        name: &str,
        f: F,
    ) -> io::Result<JoinHandle<Result<T, NetnsError>>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let ns_name = self.name.clone();
        let path = self.path();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                enter(&ns_name, &path)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| NetnsError::Runtime {
                        name: ns_name,
                        source,
                    })?;
                Ok(runtime.block_on(f()))
            })
    }

    /// Runs `program args…` inside the namespace (`ip netns exec`), waits for
    /// it and returns its output. A non-zero exit is an error that quotes its
    /// standard error. (`ip netns exec` also bind-mounts `/etc/netns/NAME/*`
    /// over `/etc` for that program.)
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `ip -n NAME args…`; a failure quotes `ip`'s standard error.
    pub fn ip(&self, args: &[&str]) -> Result<(), NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).map(drop)
    }

    /// Deletes the namespaces left by runs that crashed: those named
    /// `<prefix>-<pid>-…` (or `<prefix><pid>-…` when `prefix` ends in `-`)
    /// whose creator `pid` is no longer alive. Names that do not have this
    /// shape are never touched. Returns the names it deleted; failures are
    /// logged.
    pub fn sweep_stale(prefix: &str) -> Vec<String> {
        let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(dir = NETNS_RUN_DIR, error = %e, "cannot list network namespaces");
                return Vec::new();
            }
        };
        let mut swept = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(pid) = creator_pid(prefix, &name) else {
                continue;
            };
            if pid == std::process::id() || pid_alive(pid) {
                continue;
            }
            match run("ip", &["netns", "del", &name]) {
                Ok(_) => {
                    tracing::info!(netns = %name, pid, "deleted stale network namespace");
                    swept.push(name);
                }
                // Another sweeper got there first.
                Err(_) if !netns_path(&name).exists() => {}
                Err(e) => {
                    tracing::warn!(netns = %name, error = %e, "cannot delete stale network namespace");
                }
            }
        }
        swept
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match run("ip", &["netns", "del", &self.name]) {
            Ok(_) => tracing::debug!(netns = %self.name, "deleted network namespace"),
            Err(e) => {
                tracing::warn!(netns = %self.name, error = %e, "cannot delete network namespace");
            }
        }
    }
}

/// One end of a [`Veth`] pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end named `a_name`.
    A,
    /// The end named `b_name`.
    B,
}

/// One end of a veth pair: its interface name and its namespace (`None`: the
/// namespace of this process).
#[derive(Debug, Clone)]
struct VethEnd {
    netns: Option<String>,
    ifname: String,
}

impl VethEnd {
    fn ip_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut full = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.netns {
            full.extend(["-n", ns.as_str()]);
        }
        full.extend_from_slice(args);
        full
    }

    /// Deletes this end (and so the pair). `Ok(false)` if it was not there.
    fn delete(&self) -> Result<bool, NetnsError> {
        if let Some(ns) = &self.netns
            && !netns_path(ns).exists()
        {
            // The namespace is gone, and the kernel destroyed the pair with it.
            return Ok(false);
        }
        match run("ip", &self.ip_args(&["link", "del", &self.ifname])) {
            Ok(_) => Ok(true),
            Err(NetnsError::Command { stderr, .. }) if stderr.contains("Cannot find device") => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

/// A veth pair: end A in namespace `a` (or in this process's namespace when
/// `None`), end B in `b`; both ends up. Dropping it deletes the pair if it
/// still exists, logging failures.
#[derive(Debug)]
pub struct Veth {
    a: VethEnd,
    b: VethEnd,
}

impl Veth {
    /// Creates the pair `a_name` (in `a`) ↔ `b_name` (in `b`) and sets both
    /// ends up. Interface names are at most 15 bytes; each end is created
    /// directly in its namespace, so names only need to be unique there.
    pub fn create(
        a: Option<&NetNs>,
        a_name: &str,
        b: Option<&NetNs>,
        b_name: &str,
    ) -> Result<Veth, NetnsError> {
        validate_ifname(a_name)?;
        validate_ifname(b_name)?;
        let mut args = vec!["link", "add", "name", a_name];
        if let Some(a) = a {
            args.extend(["netns", a.name()]);
        }
        args.extend(["type", "veth", "peer", "name", b_name]);
        if let Some(b) = b {
            args.extend(["netns", b.name()]);
        }
        run("ip", &args)?;
        let veth = Veth {
            a: VethEnd {
                netns: a.map(|ns| ns.name().to_owned()),
                ifname: a_name.to_owned(),
            },
            b: VethEnd {
                netns: b.map(|ns| ns.name().to_owned()),
                ifname: b_name.to_owned(),
            },
        };
        for end in [&veth.a, &veth.b] {
            run("ip", &end.ip_args(&["link", "set", &end.ifname, "up"]))?;
        }
        tracing::debug!(a = %a_name, b = %b_name, "created veth pair");
        Ok(veth)
    }

    /// The interface name of one end.
    pub fn ifname(&self, side: Side) -> &str {
        &self.end(side).ifname
    }

    /// Adds `cidr` (`198.18.0.1/24`, `fd00::1/64`) to one end. IPv6
    /// addresses are added with `nodad`, so they are usable at once.
    pub fn add_addr(&self, side: Side, cidr: &str) -> Result<(), NetnsError> {
        let addr = parse_cidr(cidr)?;
        let end = self.end(side);
        let mut args = vec!["addr", "add", cidr, "dev", end.ifname.as_str()];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        run("ip", &end.ip_args(&args)).map(drop)
    }

    fn end(&self, side: Side) -> &VethEnd {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end removes both; B matters only if A was moved away.
        let result = match self.a.delete() {
            Ok(false) => self.b.delete().map(drop),
            other => other.map(drop),
        };
        if let Err(e) = result {
            tracing::warn!(a = %self.a.ifname, b = %self.b.ifname, error = %e, "cannot delete veth pair");
        }
    }
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn validate_netns_name(name: &str) -> Result<(), NetnsError> {
    let invalid = |reason| NetnsError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_NETNS_NAME_LEN {
        return Err(invalid("longer than 32 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid("only A-Z, a-z, 0-9, '_' and '-' are allowed"));
    }
    Ok(())
}

fn validate_ifname(name: &str) -> Result<(), NetnsError> {
    let invalid = |reason| NetnsError::InvalidIfName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(invalid("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("reserved"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(invalid("only A-Z, a-z, 0-9, '_', '.' and '-' are allowed"));
    }
    Ok(())
}

fn parse_cidr(cidr: &str) -> Result<IpAddr, NetnsError> {
    let invalid = |reason| NetnsError::InvalidCidr {
        cidr: cidr.to_owned(),
        reason,
    };
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or_else(|| invalid("expected ADDRESS/PREFIX"))?;
    let addr: IpAddr = addr.parse().map_err(|_| invalid("not an IP address"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| invalid("prefix is not a number"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(invalid("prefix too long for the address family"));
    }
    Ok(addr)
}

/// The creator pid encoded in `name` by the `<prefix>-<pid>-…` convention.
fn creator_pid(prefix: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let rest = if prefix.ends_with('-') {
        rest
    } else {
        rest.strip_prefix('-')?
    };
    let (pid, tail) = match rest.split_once('-') {
        Some((pid, tail)) => (pid, Some(tail)),
        None => (rest, None),
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || tail == Some("") {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks for existence; EPERM means it exists but is not ours.
    !matches!(kill(Pid::from_raw(raw), None), Err(Errno::ESRCH))
}

/// Moves the calling thread into the namespace pinned at `path`.
fn enter(name: &str, path: &Path) -> Result<(), NetnsError> {
    let err = |source| NetnsError::Enter {
        name: name.to_owned(),
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| err(e.into()))
}

/// The sysctls every namespace gets, written through `/proc/sys` by a thread
/// inside it (`/proc/sys/net` shows the writing thread's namespace).
const NAMESPACE_SYSCTLS: [(&str, &str, bool); 6] = [
    // (key, value, IPv6-only)
    ("net.ipv4.ip_forward", "0", false),
    // What the edge image sets (images/sysctl.d): the edge's flows all go
    // from one address to one port, and their TIME_WAIT ports must be reused.
    ("net.ipv4.tcp_tw_reuse", "1", false),
    ("net.ipv6.conf.all.forwarding", "0", true),
    ("net.ipv6.conf.all.accept_dad", "0", true),
    ("net.ipv6.conf.default.accept_dad", "0", true),
    ("net.ipv6.conf.default.forwarding", "0", true),
];

fn write_namespace_sysctls() -> Result<(), (&'static str, &'static str, io::Error)> {
    let ipv6 = Path::new("/proc/sys/net/ipv6").exists();
    if !ipv6 {
        tracing::debug!("IPv6 is disabled in this kernel; skipping IPv6 sysctls");
    }
    for (key, value, ipv6_only) in NAMESPACE_SYSCTLS {
        if ipv6_only && !ipv6 {
            continue;
        }
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| (key, value, e))?;
    }
    Ok(())
}

/// Runs `program args…`, returning its output if it exits with 0.
fn run(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    let command = || {
        std::iter::once(program)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: command(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(NetnsError::Command {
            command: command(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A name no other test (in this process or another) uses.
    fn unique(tag: &str) -> String {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("sktest-{}-{n}-{tag}", std::process::id())
    }

    fn root() {
        if let Err(e) = require_root() {
            panic!("{e}");
        }
    }

    /// Interface names as the calling thread's namespace sees them.
    fn interfaces() -> Vec<String> {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let mut names: Vec<String> = dev
            .lines()
            .skip(2)
            .filter_map(|line| line.split(':').next())
            .map(|name| name.trim().to_owned())
            .collect();
        names.sort();
        names
    }

    fn sysctl_in(ns: &NetNs, key: &str) -> String {
        let out = ns.exec("sysctl", &["-n", key]).unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn names_are_validated_before_anything_runs() {
        for bad in ["", "a/b", "a b", "..", "x".repeat(33).as_str(), "é"] {
            let err = NetNs::create(bad).unwrap_err();
            assert!(
                matches!(err, NetnsError::InvalidName { .. }),
                "{bad:?}: {err}"
            );
        }
        assert!(validate_netns_name(&"x".repeat(32)).is_ok());
        assert!(validate_ifname("fifteen-bytes-x").is_ok());
        for bad in ["", "sixteen-bytes-xx", "a/b", "a:b", "."] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        let err = Veth::create(None, "sixteen-bytes-xx", None, "ok").unwrap_err();
        assert!(matches!(err, NetnsError::InvalidIfName { .. }), "{err}");
    }

    #[test]
    fn cidrs_are_parsed() {
        assert!(parse_cidr("198.18.0.1/24").unwrap().is_ipv4());
        assert!(parse_cidr("fd00::1/64").unwrap().is_ipv6());
        for bad in [
            "198.18.0.1",
            "198.18.0.1/33",
            "fd00::1/129",
            "x/24",
            "1.2.3.4/",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn creator_pids_follow_the_naming_convention() {
        assert_eq!(creator_pid("skt", "skt-123-0-edge"), Some(123));
        assert_eq!(creator_pid("skt-", "skt-123-0-edge"), Some(123));
        assert_eq!(creator_pid("skt", "skt-123"), Some(123));
        assert_eq!(creator_pid("skt", "sktest-123-0"), None);
        assert_eq!(creator_pid("skt", "skt-12a-0"), None);
        assert_eq!(creator_pid("skt", "skt--0"), None);
        assert_eq!(creator_pid("skt", "skt-123-"), None);
        assert_eq!(creator_pid("skt", "other-123-0"), None);
    }

    #[test]
    fn require_root_names_what_is_needed() {
        let msg = NetnsError::NotPrivileged {
            detail: "effective uid is 1000".into(),
        }
        .to_string();
        assert!(
            msg.contains("need root (CAP_NET_ADMIN) and /dev/net/tun; run with sudo"),
            "{msg}"
        );
    }

    #[test]
    fn create_sets_up_and_drop_removes() {
        root();
        let name = unique("life");
        let ns = NetNs::create(&name).unwrap();
        assert_eq!(ns.name(), name);
        assert_eq!(ns.path(), Path::new("/run/netns").join(&name));
        assert!(ns.path().exists());
        assert_eq!(sysctl_in(&ns, "net.ipv4.ip_forward"), "0");
        assert_eq!(sysctl_in(&ns, "net.ipv4.tcp_tw_reuse"), "1");
        assert_eq!(sysctl_in(&ns, "net.ipv6.conf.all.accept_dad"), "0");
        assert_eq!(sysctl_in(&ns, "net.ipv6.conf.default.accept_dad"), "0");

        let err = NetNs::create(&name).unwrap_err();
        assert!(matches!(err, NetnsError::AlreadyExists { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("ip netns del {name}")),
            "{err}"
        );
        // The refused second create must not have deleted the first.
        assert!(ns.path().exists());

        let path = ns.path();
        drop(ns);
        assert!(!path.exists(), "{} still exists after drop", path.display());
    }

    #[test]
    fn a_thread_inside_sees_only_loopback() {
        root();
        let ns = NetNs::create(&unique("lo")).unwrap();
        let (inside, listener) = ns
            .spawn_thread("lo-check", || {
                // `lo` is up: loopback works inside.
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (mut server, _) = listener.accept().unwrap();
                client.write_all(b"ping").unwrap();
                let mut buf = [0; 4];
                server.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"ping");
                (interfaces(), listener)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(inside, ["lo"]);
        // The listener stays in the namespace although its fd is now here: a
        // connection to its port from this thread (outside) never reaches it.
        let _ = TcpStream::connect_timeout(&listener.local_addr().unwrap(), Duration::from_secs(1));
        listener.set_nonblocking(true).unwrap();
        let err = listener.accept().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }

    #[test]
    fn entering_a_deleted_namespace_is_an_error() {
        root();
        let ns = NetNs::create(&unique("gone")).unwrap();
        run("ip", &["netns", "del", ns.name()]).unwrap();
        let err = ns
            .spawn_thread("gone", || ())
            .unwrap()
            .join()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, NetnsError::Enter { .. }), "{err}");
        let err = ns.ip(&["link"]).unwrap_err();
        assert!(
            err.to_string().contains(&format!("ip -n {}", ns.name())),
            "{err}"
        );
    }

    #[test]
    fn exec_reports_stderr() {
        root();
        let ns = NetNs::create(&unique("exec")).unwrap();
        let out = ns.exec("ip", &["-o", "link", "show"]).unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.contains("lo:"), "{stdout}");
        assert!(!stdout.contains("eth"), "{stdout}");
        let err = ns.exec("ip", &["link", "show", "no-such-dev"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no-such-dev") && msg.contains("does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn veth_carries_tcp_between_two_namespaces() {
        root();
        let a = NetNs::create(&unique("va")).unwrap();
        let b = NetNs::create(&unique("vb")).unwrap();
        let veth = Veth::create(Some(&a), "to-b", Some(&b), "to-a").unwrap();
        assert_eq!(veth.ifname(Side::A), "to-b");
        veth.add_addr(Side::A, "198.18.0.1/24").unwrap();
        veth.add_addr(Side::B, "198.18.0.2/24").unwrap();
        veth.add_addr(Side::A, "fd00:0:99::1/64").unwrap();
        veth.add_addr(Side::B, "fd00:0:99::2/64").unwrap();
        assert!(matches!(
            veth.add_addr(Side::A, "198.18.0.1"),
            Err(NetnsError::InvalidCidr { .. })
        ));

        for ip in [
            IpAddr::from(Ipv4Addr::new(198, 18, 0, 2)),
            "fd00:0:99::2".parse().unwrap(),
        ] {
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let server = b
                .spawn_runtime("veth-server", move || async move {
                    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
                    addr_tx.send(listener.local_addr().unwrap()).unwrap();
                    let (mut stream, peer) = listener.accept().await.unwrap();
                    let mut buf = [0; 5];
                    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut buf)
                        .await
                        .unwrap();
                    tokio::io::AsyncWriteExt::write_all(&mut stream, b"world")
                        .await
                        .unwrap();
                    (buf, peer)
                })
                .unwrap();
            let addr: SocketAddr = addr_rx.recv().unwrap();
            let client = a
                .spawn_runtime("veth-client", move || async move {
                    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                    tokio::io::AsyncWriteExt::write_all(&mut stream, b"hello")
                        .await
                        .unwrap();
                    let mut buf = [0; 5];
                    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut buf)
                        .await
                        .unwrap();
                    buf
                })
                .unwrap();
            assert_eq!(&client.join().unwrap().unwrap(), b"world");
            let (got, peer) = server.join().unwrap().unwrap();
            assert_eq!(&got, b"hello");
            assert_eq!(peer.ip().is_ipv4(), ip.is_ipv4());
        }

        drop(veth);
        let links = a.exec("ip", &["-o", "link", "show"]).unwrap();
        assert!(!String::from_utf8_lossy(&links.stdout).contains("to-b"));
    }

    #[test]
    fn veth_to_this_namespace_is_deleted_on_drop() {
        root();
        let ns = NetNs::create(&unique("vr")).unwrap();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let host_side = format!("skv{}x{n}", std::process::id() % 100_000);
        let veth = Veth::create(None, &host_side, Some(&ns), "to-host").unwrap();
        assert!(run("ip", &["link", "show", &host_side]).is_ok());
        ns.ip(&["link", "show", "to-host"]).unwrap();
        drop(veth);
        assert!(
            run("ip", &["link", "show", &host_side]).is_err(),
            "{host_side} survived drop"
        );
        assert!(ns.ip(&["link", "show", "to-host"]).is_err());
    }

    #[test]
    fn sweep_deletes_only_namespaces_of_dead_creators() {
        root();
        // A pid that is certainly dead: a child we started and reaped.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let prefix = format!("sktest{}", std::process::id());
        let stale = format!("{prefix}-{dead}-0");
        let live = format!("{prefix}-{}-0", std::process::id());
        let unrelated = format!("{prefix}x-{dead}-0");
        for name in [&stale, &live, &unrelated] {
            run("ip", &["netns", "add", name]).unwrap();
        }
        let swept = NetNs::sweep_stale(&prefix);
        let remaining = [&live, &unrelated].map(|name| netns_path(name).exists());
        for name in [&stale, &live, &unrelated] {
            let _ = run("ip", &["netns", "del", name]);
        }
        assert_eq!(swept, std::slice::from_ref(&stale));
        assert_eq!(remaining, [true, true]);
    }
}
