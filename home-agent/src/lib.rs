//! skerry's home-agent: runs next to the services.
//!
//! It owns the private CA, dials the edge over mutually authenticated QUIC,
//! brings up the WireGuard tunnel and forwards each public flow to the
//! local target its port map names. The edge never learns those targets.
//!
//! | module | owns |
//! |---|---|
//! | [`session`] | the control session (reconnecting) and bringing up the data plane |
//! | [`forward`] | forwarding tunneled TCP and UDP flows to targets |
//! | [`proxy_protocol`] | PROXY protocol v1/v2 headers toward targets that ask |
//! | [`local_edge`] | `--edge local`: a real edge in a private network namespace |
//! | [`backoff`] | reconnect delays (no I/O) |
//! | [`provision`] | `--edge droplet`: the DigitalOcean API client and the droplet's life cycle |
//! | [`admin`] | the local admin socket and the controller that changes the map live |
//! | [`config`] | the port map as a file the running agent follows |
#![forbid(unsafe_code)]

/// Prints a line for the user on stdout, and goes on when stdout is gone:
/// `println!` panics on a closed pipe (`home-agent connect … | head`), and
/// a running agent must not stop because its output is no longer read.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// [`say!`] for stderr: errors and warnings for the user, which must not
/// stop a running agent when no one reads them any more either.
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

pub mod admin;
pub mod backoff;
pub mod config;
pub mod forward;
pub mod local_edge;
pub mod provision;
pub mod proxy_protocol;
pub mod session;

use std::path::Path;

use anyhow::Context;
use skerry::paths::{EdgeName, StateLock};
use skerry::pki::HomePki;
use skerry::tunnel::WireguardKey;

pub use session::{HomeOptions, HomeStatus, run};

/// What a home-agent holds for one edge name: the lock, the PKI, its key.
#[derive(Debug)]
pub struct HomeState {
    pub lock: StateLock,
    pub pki: HomePki,
    pub key: WireguardKey,
}

impl HomeState {
    /// Takes the lock on `dir` first, so two agents never race to create
    /// the CA or drive one edge.
    pub fn open(dir: &Path) -> anyhow::Result<HomeState> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock = StateLock::acquire(dir)?;
        let pki = HomePki::load_or_create(dir)?;
        let key = WireguardKey::load_or_create(&dir.join("wireguard.key"))?;
        Ok(HomeState { lock, pki, key })
    }
}

/// The TUN device name for an edge name: at most 15 bytes.
pub fn tun_name(name: &EdgeName) -> String {
    let n = name.as_ref();
    if n.len() <= 12 {
        format!("sk-{n}")
    } else {
        format!("sk-{:08x}", name_hash(n))
    }
}

/// FNV-1a of an edge name: stable short identifiers (device names, local
/// subnets) that differ between names.
pub(crate) fn name_hash(name: &str) -> u32 {
    let mut h: u32 = 2_166_136_261;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    h
}
