//! `--edge droplet`: the edge as a DigitalOcean droplet, created once per
//! edge name, found again by every later connect, destroyed on request.
//!
//! Contracts:
//! - One droplet per edge name. It carries the tags [`SKERRY_TAG`] and
//!   `skerry-<name>`, and its id is kept in `droplet.json` in the state dir
//!   (written the moment the create call answers). A connect first looks
//!   for it (the id, confirmed by the tag; else the tag alone) and never
//!   creates a second one.
//! - A droplet this run created and that does not come up (not active, no
//!   edge-agent answering within the ready timeout, any error on the way,
//!   or Ctrl-C) is destroyed again unless cleanup was turned off; either way
//!   the error names it.
//! - A create call that failed without a clear answer (5xx, timeout) may
//!   have worked: the droplets carrying the tag are listed before it is
//!   tried again.
//! - The droplet's `user_data` is the bootstrap document (CA certificate,
//!   the edge's certificate and key). The API token is not in it, nor in
//!   the state dir.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skerry::bootstrap::{Bootstrap, BootstrapError, DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT};
use skerry::paths::EdgeName;
use skerry::pki::{EDGE_SERVER_NAME, HomePki};
use skerry::tunnel::TunnelAddrs;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::digitalocean::{
    ActionStatus, ApiError, Client, CreateDroplet, Droplet, DropletStatus, Image, ReservedIp,
    ReservedIpAction,
};
use crate::backoff::Backoff;

/// The tag on every droplet skerry creates.
pub const SKERRY_TAG: &str = "skerry";

/// Edge images are named this, then the release: `skerry-edge-0.1.0`,
/// optionally followed by `-<digits>` (a build timestamp).
pub const IMAGE_PREFIX: &str = "skerry-edge-";

/// The smallest droplet: the edge needs little.
pub const DEFAULT_SIZE: &str = "s-1vcpu-512mb-10gb";

/// How long a droplet has to become active and answer on its control port.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The droplet record in the state dir.
pub const STATE_FILE: &str = "droplet.json";

const RECORD_VERSION: u32 = 1;

/// One QUIC handshake attempt against the edge.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Create calls, including those repeated after an unclear failure.
const CREATE_TRIES: u32 = 3;

/// The image name this release looks for: `skerry-edge-<version>`.
pub fn release_image_name() -> String {
    format!("{IMAGE_PREFIX}{}", env!("CARGO_PKG_VERSION"))
}

/// The tag, and the droplet name, of edge `name`: `skerry-<name>`.
pub fn edge_tag(name: &EdgeName) -> String {
    format!("skerry-{name}")
}

/// Which image to boot the edge from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ImageChoice {
    /// The newest private image named for this release.
    #[default]
    Release,
    Id(u64),
    Name(String),
}

impl FromStr for ImageChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an image name or id is needed".into());
        }
        Ok(match s.parse::<u64>() {
            Ok(id) => ImageChoice::Id(id),
            Err(_) => ImageChoice::Name(s.to_owned()),
        })
    }
}

/// How to create the droplet.
#[derive(Debug, Clone)]
pub struct DropletOptions {
    /// `None`: the reserved IP's region, else the image's first region.
    pub region: Option<String>,
    pub size: String,
    pub image: ImageChoice,
    pub reserved_ip: Option<Ipv4Addr>,
    pub cleanup_on_failure: bool,
    pub ready_timeout: Duration,
    pub control_port: u16,
    pub wireguard_port: u16,
    pub tunnel: TunnelAddrs,
}

impl Default for DropletOptions {
    fn default() -> Self {
        DropletOptions {
            region: None,
            size: DEFAULT_SIZE.to_owned(),
            image: ImageChoice::Release,
            reserved_ip: None,
            cleanup_on_failure: true,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            control_port: DEFAULT_CONTROL_PORT,
            wireguard_port: DEFAULT_WIREGUARD_PORT,
            tunnel: TunnelAddrs::DEFAULT,
        }
    }
}

/// A step of [`bring_up`], for the progress display. `is_start` phases
/// begin a wait; the others report one that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Reattached {
        id: u64,
        name: String,
        region: String,
    },
    ImageFound {
        id: u64,
        name: String,
    },
    Creating {
        name: String,
        region: String,
        size: String,
    },
    Created {
        id: u64,
    },
    Booting {
        id: u64,
    },
    Booted {
        v4: Ipv4Addr,
        v6: Option<Ipv6Addr>,
    },
    ReservedIpAssigned {
        ip: Ipv4Addr,
    },
    WaitingForEdge {
        addr: SocketAddr,
    },
    EdgeAnswered {
        addr: SocketAddr,
    },
    CleanedUp {
        id: u64,
    },
}

impl Phase {
    pub fn is_start(&self) -> bool {
        matches!(
            self,
            Phase::Creating { .. } | Phase::Booting { .. } | Phase::WaitingForEdge { .. }
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Reattached { id, name, region } => {
                write!(f, "found droplet {id} ({name}, {region}); re-attaching")
            }
            Phase::ImageFound { id, name } => write!(f, "edge image {name} (id {id})"),
            Phase::Creating { name, region, size } => {
                write!(f, "creating droplet {name} ({region}, {size})")
            }
            Phase::Created { id } => write!(f, "droplet {id} created"),
            Phase::Booting { id } => write!(f, "droplet {id} booting"),
            Phase::Booted { v4, v6: Some(v6) } => write!(f, "droplet active at {v4}, {v6}"),
            Phase::Booted { v4, v6: None } => write!(f, "droplet active at {v4}"),
            Phase::ReservedIpAssigned { ip } => write!(f, "reserved IP {ip} assigned"),
            Phase::WaitingForEdge { addr } => write!(f, "waiting for the edge-agent on {addr}"),
            Phase::EdgeAnswered { addr } => write!(f, "edge-agent answering on {addr}"),
            Phase::CleanedUp { id } => write!(f, "droplet {id} destroyed"),
        }
    }
}

/// The edge that [`bring_up`] found or made.
#[derive(Debug, Clone)]
pub struct ProvisionedEdge {
    pub droplet_id: u64,
    pub droplet_name: String,
    pub region: String,
    pub public_v4: Ipv4Addr,
    pub public_v6: Option<Ipv6Addr>,
    pub reserved_ip: Option<Ipv4Addr>,
    /// Where the home-agent dials: the droplet's own IPv4 address. A
    /// reserved IP is the public face, not the tunnel's path: on droplets
    /// from snapshots it arrives through the anchor address, and replies
    /// leave from the droplet's own one, which a tunnel pinned to the
    /// reserved IP would drop.
    pub control: SocketAddr,
    /// Whether this run created it.
    pub created: bool,
}

impl fmt::Display for ProvisionedEdge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "droplet {} ({}, {}): {}",
            self.droplet_id, self.droplet_name, self.region, self.public_v4
        )?;
        if let Some(v6) = self.public_v6 {
            write!(f, ", {v6}")?;
        }
        if let Some(ip) = self.reserved_ip {
            write!(f, "; reserved IP {ip}")?;
        }
        Ok(())
    }
}

/// What became of a droplet when provisioning gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleanup {
    NothingCreated,
    Destroyed {
        id: u64,
    },
    /// It is there still: not made by this run, or cleanup was off.
    Kept {
        id: u64,
        edge: EdgeName,
    },
    Failed {
        id: u64,
        edge: EdgeName,
        error: String,
    },
}

impl fmt::Display for Cleanup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cleanup::NothingCreated => f.write_str("no droplet was created"),
            Cleanup::Destroyed { id } => {
                write!(
                    f,
                    "droplet {id} was destroyed again; nothing is left behind"
                )
            }
            Cleanup::Kept { id, edge } => write!(
                f,
                "droplet {id} still exists; `home-agent destroy --name {edge}` removes it"
            ),
            Cleanup::Failed { id, edge, error } => write!(
                f,
                "destroying droplet {id} failed ({error}); it still exists: run \
                 `home-agent destroy --name {edge}` or delete it in the control panel"
            ),
        }
    }
}

/// Why an edge droplet could not be found, made, used or destroyed.
#[derive(Debug, thiserror::Error)]
pub enum DropletError {
    #[error("{doing}")]
    Api {
        doing: String,
        #[source]
        source: Box<ApiError>,
    },
    #[error(
        "no edge image for this release in your DigitalOcean account: looked for a private image \
         or snapshot named {wanted}{}. Build it once with `packer build packer/` (see README: Edge \
         image), or name one with --image NAME|ID",
        seen_note(.seen)
    )]
    NoImage { wanted: String, seen: Vec<String> },
    #[error(
        "image {image} is {status}, not available yet; wait for it, or choose another with --image"
    )]
    ImageNotAvailable { image: String, status: String },
    #[error(
        "image {image} is not in region {region} (it is in {}): pass --region with one of those, \
         or transfer the image to {region} in the control panel",
        .available.join(", ")
    )]
    ImageNotInRegion {
        image: String,
        region: String,
        available: Vec<String>,
    },
    #[error(
        "more than one droplet carries the tag {tag} (ids {ids:?}); skerry keeps one droplet per \
         edge name: delete the extra ones in the control panel, or all of them with \
         `home-agent destroy --name {edge}`"
    )]
    Ambiguous {
        tag: String,
        edge: EdgeName,
        ids: Vec<u64>,
    },
    #[error("the reserved IP {ip} is not in this DigitalOcean account")]
    ReservedIpMissing { ip: Ipv4Addr },
    #[error(
        "the reserved IP {ip} is assigned to droplet {droplet}; unassign it first (skerry does not \
         take an address from another droplet)"
    )]
    ReservedIpBusy { ip: Ipv4Addr, droplet: u64 },
    #[error(
        "the reserved IP {ip} is in region {ip_region}, the droplet in {region}: a reserved IP \
         works only in its own region"
    )]
    ReservedIpRegion {
        ip: Ipv4Addr,
        ip_region: String,
        region: String,
    },
    #[error("assigning the reserved IP {ip} failed (action {action} {status:?})")]
    ReservedIpAction {
        ip: Ipv4Addr,
        action: u64,
        status: ActionStatus,
    },
    #[error(
        "droplet {id} ({name}) presents a certificate this home's CA did not issue ({detail}): it \
         was made from another state directory, and {state_dir} now holds a different CA. \
         Restore the state directory it was created from, or run `home-agent destroy --name \
         {edge}` and connect again for a fresh edge"
    )]
    ForeignCa {
        id: u64,
        name: String,
        edge: EdgeName,
        state_dir: PathBuf,
        detail: String,
    },
    #[error(
        "droplet {id} ({name}) is {status}: power it on in the control panel, or run \
         `home-agent destroy --name {edge}` and connect again"
    )]
    Unusable {
        id: u64,
        name: String,
        edge: EdgeName,
        status: DropletStatus,
    },
    #[error("droplet {id} disappeared while it was starting (deleted in the control panel?)")]
    Vanished { id: u64 },
    #[error("droplet {id} did not become active with a public IPv4 address within {timeout:?}")]
    NotActive { id: u64, timeout: Duration },
    #[error(
        "the edge-agent on droplet {id} did not answer on {addr} within {timeout:?}{}",
        last_note(.last_error)
    )]
    NotReady {
        id: u64,
        addr: SocketAddr,
        timeout: Duration,
        last_error: Option<String>,
    },
    #[error("stopped by a signal while provisioning")]
    Cancelled,
    /// Provisioning gave up after it had a droplet in hand.
    #[error("{reason}; {cleanup}")]
    Abandoned {
        reason: Box<DropletError>,
        cleanup: Cleanup,
    },
    #[error("cannot write the droplet record {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the droplet record {path} is not valid ({reason}); remove it: the droplet is found \
         again by its tag"
    )]
    BadState { path: PathBuf, reason: String },
    #[error("cannot reach the edge for a check of its certificate: {0}")]
    Probe(String),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
}

fn seen_note(seen: &[String]) -> String {
    if seen.is_empty() {
        String::new()
    } else {
        format!(" (found only {})", seen.join(", "))
    }
}

fn last_note(last: &Option<String>) -> String {
    last.as_ref()
        .map(|e| format!(" (last: {e})"))
        .unwrap_or_default()
}

fn api_err(doing: impl Into<String>) -> impl FnOnce(ApiError) -> DropletError {
    let doing = doing.into();
    move |source| DropletError::Api {
        doing,
        source: Box::new(source),
    }
}

/// What the state dir remembers of the droplet. Never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DropletRecord {
    pub version: u32,
    pub id: u64,
    pub name: String,
    pub region: String,
    pub created_at: String,
    #[serde(default)]
    pub reserved_ip: Option<Ipv4Addr>,
}

impl DropletRecord {
    fn of(d: &Droplet, reserved_ip: Option<Ipv4Addr>) -> Self {
        DropletRecord {
            version: RECORD_VERSION,
            id: d.id,
            name: d.name.clone(),
            region: d.region.slug.clone(),
            created_at: d.created_at.clone(),
            reserved_ip,
        }
    }
}

/// The record in `dir`, if there is one.
pub fn load_record(dir: &Path) -> Result<Option<DropletRecord>, DropletError> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(DropletError::State { path, source }),
    };
    let record: DropletRecord =
        serde_json::from_str(&text).map_err(|e| DropletError::BadState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if record.version != RECORD_VERSION {
        return Err(DropletError::BadState {
            path,
            reason: format!(
                "version {}, this release reads {RECORD_VERSION}",
                record.version
            ),
        });
    }
    Ok(Some(record))
}

fn save_record(dir: &Path, record: &DropletRecord) -> Result<(), DropletError> {
    let path = dir.join(STATE_FILE);
    let mut text = serde_json::to_vec_pretty(record).map_err(|e| DropletError::State {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    text.push(b'\n');
    skerry::paths::write_atomic(&path, &text, 0o600)
        .map_err(|source| DropletError::State { path, source })
}

fn remove_record(dir: &Path) -> Result<(), DropletError> {
    let path = dir.join(STATE_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DropletError::State { path, source }),
    }
}

/// Whether `name` is an edge image of release `version`:
/// `skerry-edge-<version>` or `skerry-edge-<version>-<digits>`.
pub fn is_release_image(name: &str, version: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(IMAGE_PREFIX)
        .and_then(|r| r.strip_prefix(version))
    else {
        return false;
    };
    rest.is_empty()
        || rest
            .strip_prefix('-')
            .is_some_and(|stamp| !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()))
}

fn created_key(image: &Image) -> (Option<OffsetDateTime>, u64) {
    (
        OffsetDateTime::parse(&image.created_at, &Rfc3339).ok(),
        image.id,
    )
}

/// The newest image named `name`-ish by `matches`, preferring available
/// ones; errors say what was found instead.
pub fn pick_image(
    images: &[Image],
    wanted: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<Image, DropletError> {
    let candidates: Vec<&Image> = images.iter().filter(|i| matches(&i.name)).collect();
    let available = candidates
        .iter()
        .filter(|i| i.status.as_deref().is_none_or(|s| s == "available"))
        .max_by_key(|i| created_key(i));
    if let Some(image) = available {
        return Ok((*image).clone());
    }
    if let Some(pending) = candidates.iter().max_by_key(|i| created_key(i)) {
        return Err(DropletError::ImageNotAvailable {
            image: pending.name.clone(),
            status: pending.status.clone().unwrap_or_default(),
        });
    }
    let mut seen: Vec<String> = images
        .iter()
        .filter(|i| i.name.starts_with(IMAGE_PREFIX))
        .map(|i| i.name.clone())
        .collect();
    seen.sort();
    seen.dedup();
    Err(DropletError::NoImage {
        wanted: wanted.to_owned(),
        seen,
    })
}

async fn find_image(api: &Client, choice: &ImageChoice) -> Result<Image, DropletError> {
    match choice {
        ImageChoice::Id(id) => api
            .image(*id)
            .await
            .map_err(api_err(format!("looking up image {id}")))?
            .ok_or_else(|| DropletError::NoImage {
                wanted: format!("id {id}"),
                seen: Vec::new(),
            }),
        ImageChoice::Name(name) => {
            let images = api
                .private_images()
                .await
                .map_err(api_err("listing your images"))?;
            pick_image(&images, name, |n| n == name)
        }
        ImageChoice::Release => {
            let images = api
                .private_images()
                .await
                .map_err(api_err("listing your images"))?;
            let version = env!("CARGO_PKG_VERSION");
            pick_image(&images, &release_image_name(), |n| {
                is_release_image(n, version)
            })
        }
    }
}

/// The droplet of edge `name`, if it exists: the one in the record when
/// it still carries the tag, else the one carrying the tag.
pub async fn find_existing(
    api: &Client,
    name: &EdgeName,
    state_dir: &Path,
) -> Result<Option<Droplet>, DropletError> {
    let tag = edge_tag(name);
    let record = load_record(state_dir)?;
    if let Some(rec) = &record {
        match api
            .droplet(rec.id)
            .await
            .map_err(api_err(format!("looking up droplet {}", rec.id)))?
        {
            Some(d) if d.has_tag(&tag) => return Ok(Some(d)),
            Some(d) => warn!(
                id = d.id,
                tag = %tag,
                "the droplet in the record does not carry the edge's tag; not using it"
            ),
            None => info!(id = rec.id, "the droplet in the record no longer exists"),
        }
    }
    let mut found = api
        .droplets_by_tag(&tag)
        .await
        .map_err(api_err(format!("listing droplets tagged {tag}")))?;
    match found.len() {
        0 => {
            if record.is_some() {
                remove_record(state_dir)?;
            }
            Ok(None)
        }
        1 => {
            let d = found.remove(0);
            let reserved = record.and_then(|r| r.reserved_ip);
            save_record(state_dir, &DropletRecord::of(&d, reserved))?;
            Ok(Some(d))
        }
        _ => Err(DropletError::Ambiguous {
            tag,
            edge: name.clone(),
            ids: found.iter().map(|d| d.id).collect(),
        }),
    }
}

/// `POST /v2/droplets`, repeated after an unclear failure only once the
/// tag shows that no droplet was made.
async fn create(
    api: &Client,
    req: &CreateDroplet<'_>,
    tag: &str,
    edge: &EdgeName,
) -> Result<Droplet, DropletError> {
    let doing = || {
        format!(
            "creating droplet {} in {} (size {}, image {})",
            req.name, req.region, req.size, req.image
        )
    };
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
    let mut tries = 0;
    loop {
        tries += 1;
        let err = match api.create_droplet(req).await {
            Ok(d) => return Ok(d),
            Err(e) if e.outcome_unknown() => e,
            Err(e) => return Err(api_err(doing())(e)),
        };
        warn!(error = %err, "the create call may or may not have worked; checking the tag before anything else");
        tokio::time::sleep(backoff.next_delay(rand::random::<f64>())).await;
        let mut found = api.droplets_by_tag(tag).await.map_err(api_err(format!(
            "checking for a droplet tagged {tag} after an unclear create (if one exists, \
             `home-agent destroy --name {edge}` removes it)"
        )))?;
        match found.len() {
            0 if tries < CREATE_TRIES => continue,
            0 => {
                return Err(api_err(format!(
                    "{} (no droplet with tag {tag} shows yet; if one appears, `home-agent \
                     destroy --name {edge}` removes it)",
                    doing()
                ))(err));
            }
            1 => {
                info!(id = found[0].id, "the droplet was created after all");
                return Ok(found.remove(0));
            }
            _ => {
                return Err(DropletError::Ambiguous {
                    tag: tag.to_owned(),
                    edge: edge.clone(),
                    ids: found.iter().map(|d| d.id).collect(),
                });
            }
        }
    }
}

/// Checks that `ip` exists and is free (or already this droplet's).
async fn check_reserved_ip(api: &Client, ip: Ipv4Addr) -> Result<ReservedIp, DropletError> {
    api.reserved_ip(ip)
        .await
        .map_err(api_err(format!("looking up reserved IP {ip}")))?
        .ok_or(DropletError::ReservedIpMissing { ip })
}

/// Assigns `ip` to `droplet` and waits for the action to finish.
async fn assign_reserved_ip(
    api: &Client,
    ip: Ipv4Addr,
    droplet: &Droplet,
    deadline: Instant,
) -> Result<(), DropletError> {
    let rip = check_reserved_ip(api, ip).await?;
    match rip.droplet {
        Some(d) if d.id == droplet.id => return Ok(()),
        Some(d) => return Err(DropletError::ReservedIpBusy { ip, droplet: d.id }),
        None => {}
    }
    if rip.region.slug != droplet.region.slug {
        return Err(DropletError::ReservedIpRegion {
            ip,
            ip_region: rip.region.slug,
            region: droplet.region.slug.clone(),
        });
    }
    let doing = format!("assigning reserved IP {ip} to droplet {}", droplet.id);
    let action = match api
        .reserved_ip_action(
            ip,
            ReservedIpAction::Assign {
                droplet_id: droplet.id,
            },
        )
        .await
    {
        Ok(a) => a,
        Err(e) if e.outcome_unknown() => {
            // Look before repeating: the first call may have worked.
            let now = check_reserved_ip(api, ip).await?;
            if now.droplet.is_some_and(|d| d.id == droplet.id) {
                return Ok(());
            }
            api.reserved_ip_action(
                ip,
                ReservedIpAction::Assign {
                    droplet_id: droplet.id,
                },
            )
            .await
            .map_err(api_err(doing.clone()))?
        }
        Err(e) => return Err(api_err(doing)(e)),
    };
    wait_action(api, ip, action.id, action.status, deadline).await
}

async fn wait_action(
    api: &Client,
    ip: Ipv4Addr,
    id: u64,
    mut status: ActionStatus,
    deadline: Instant,
) -> Result<(), DropletError> {
    let mut poll = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
    loop {
        match status {
            ActionStatus::Completed => return Ok(()),
            ActionStatus::Errored => {
                return Err(DropletError::ReservedIpAction {
                    ip,
                    action: id,
                    status,
                });
            }
            ActionStatus::InProgress | ActionStatus::Other => {}
        }
        if Instant::now() >= deadline {
            return Err(DropletError::ReservedIpAction {
                ip,
                action: id,
                status,
            });
        }
        tokio::time::sleep(poll.next_delay(1.0)).await;
        status = api
            .action(id)
            .await
            .map_err(api_err(format!("checking action {id}")))?
            .status;
    }
}

/// Polls until the droplet is active with a public IPv4 address.
async fn wait_active(
    api: &Client,
    id: u64,
    edge: &EdgeName,
    deadline: Instant,
    timeout: Duration,
) -> Result<Droplet, DropletError> {
    let mut poll = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        let d = api
            .droplet(id)
            .await
            .map_err(api_err(format!("checking droplet {id}")))?
            .ok_or(DropletError::Vanished { id })?;
        match d.status {
            DropletStatus::Active if d.public_v4().is_some() => return Ok(d),
            DropletStatus::Off | DropletStatus::Archive => {
                return Err(DropletError::Unusable {
                    id,
                    name: d.name,
                    edge: edge.clone(),
                    status: d.status,
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(DropletError::NotActive { id, timeout });
        }
        let wait = poll.next_delay(1.0);
        tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Why the edge did not pass the probe.
enum ProbeFailure {
    /// The handshake failed on certificates: another CA.
    Tls(String),
    /// No answer in time; the last error seen.
    NoAnswer(Option<String>),
    Setup(String),
}

/// Whether a QUIC error code is a TLS alert (QUIC carries them as
/// 0x100 + alert).
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Dials the edge's control port until a QUIC handshake with this home's
/// credentials succeeds: the edge-agent is up and holds a certificate of
/// this CA. Stops at the first certificate failure.
async fn probe_edge(
    addr: SocketAddr,
    pki: &HomePki,
    deadline: Instant,
) -> Result<(), ProbeFailure> {
    let tls = skerry::tls::quic_client_config(pki.ca_cert(), pki.home())
        .map_err(|e| ProbeFailure::Setup(e.to_string()))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ProbeFailure::Setup(e.to_string()))?;
    endpoint.set_default_client_config(tls);
    let mut pause = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut last = None;
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break Err(ProbeFailure::NoAnswer(last));
        }
        let connecting = match endpoint.connect(addr, EDGE_SERVER_NAME) {
            Ok(c) => c,
            Err(e) => break Err(ProbeFailure::Setup(e.to_string())),
        };
        let limit = PROBE_TIMEOUT.min(left);
        match tokio::time::timeout(limit, connecting).await {
            Ok(Ok(conn)) => {
                conn.close(
                    quinn::VarInt::from_u32(skerry::control::close_code::SHUTDOWN),
                    b"probe done",
                );
                break Ok(());
            }
            Ok(Err(quinn::ConnectionError::TransportError(e))) if is_tls_alert(e.code) => {
                break Err(ProbeFailure::Tls(e.to_string()));
            }
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c))) if is_tls_alert(c.error_code) => {
                break Err(ProbeFailure::Tls(c.to_string()));
            }
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some(format!("no answer within {limit:?}")),
        }
        let wait = pause
            .next_delay(1.0)
            .min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(wait).await;
    };
    endpoint.close(
        quinn::VarInt::from_u32(skerry::control::close_code::SHUTDOWN),
        b"probe done",
    );
    result
}

/// Finds the edge droplet of `name` or creates it, waits until its
/// edge-agent answers with this home's certificates, and returns where to
/// dial it. See the module docs for what happens on failure; `cancel`
/// (Ctrl-C) counts as one.
#[allow(
    clippy::too_many_arguments,
    reason = "each is a distinct input of the flow"
)]
pub async fn bring_up(
    api: &Client,
    name: &EdgeName,
    state_dir: &Path,
    pki: &HomePki,
    opts: &DropletOptions,
    progress: &(dyn Fn(Phase) + Sync),
    cancel: &CancellationToken,
) -> Result<ProvisionedEdge, DropletError> {
    let deadline = Instant::now() + opts.ready_timeout;
    let found = tokio::select! {
        biased;
        () = cancel.cancelled() => Err(DropletError::Cancelled),
        r = find_or_plan(api, name, state_dir, pki, opts) => r,
    };
    let found = found.map_err(|e| match e {
        DropletError::Cancelled => DropletError::Abandoned {
            reason: Box::new(DropletError::Cancelled),
            cleanup: Cleanup::NothingCreated,
        },
        other => other,
    })?;
    let mut early = None;
    let (droplet, created) = match found {
        Found::Existing(d) => {
            progress(Phase::Reattached {
                id: d.id,
                name: d.name.clone(),
                region: d.region.slug.clone(),
            });
            (d, false)
        }
        Found::ToCreate(plan) => {
            progress(Phase::ImageFound {
                id: plan.image.id,
                name: plan.image.name.clone(),
            });
            let droplet_name = edge_tag(name);
            progress(Phase::Creating {
                name: droplet_name.clone(),
                region: plan.region.clone(),
                size: opts.size.clone(),
            });
            let req = CreateDroplet {
                name: &droplet_name,
                region: &plan.region,
                size: &opts.size,
                image: plan.image.id,
                ipv6: true,
                monitoring: false,
                backups: false,
                with_droplet_agent: false,
                tags: vec![SKERRY_TAG.to_owned(), edge_tag(name)],
                user_data: &plan.user_data,
            };
            // Not raced against `cancel`: once the call is out, only its
            // answer tells which droplet to destroy.
            let d = create(api, &req, &edge_tag(name), name).await?;
            // A record that cannot be written is a failure like any other
            // once the droplet exists: it goes through the cleanup below.
            early = save_record(state_dir, &DropletRecord::of(&d, None)).err();
            progress(Phase::Created { id: d.id });
            (d, true)
        }
    };
    let outcome = match early {
        Some(e) => Err(e),
        None => tokio::select! {
            biased;
            () = cancel.cancelled() => Err(DropletError::Cancelled),
            r = finish(api, name, state_dir, pki, opts, &droplet, created, deadline, progress) => r,
        },
    };
    let reason = match outcome {
        Ok(edge) => return Ok(edge),
        Err(reason) => reason,
    };
    let cancelled = matches!(reason, DropletError::Cancelled);
    if !created && !cancelled {
        return Err(reason);
    }
    let cleanup = if created && opts.cleanup_on_failure {
        match api.delete_droplet(droplet.id).await {
            Ok(_) => {
                if let Err(e) = remove_record(state_dir) {
                    warn!(error = %e, "cannot remove the droplet record");
                }
                progress(Phase::CleanedUp { id: droplet.id });
                Cleanup::Destroyed { id: droplet.id }
            }
            Err(e) => Cleanup::Failed {
                id: droplet.id,
                edge: name.clone(),
                error: e.to_string(),
            },
        }
    } else {
        Cleanup::Kept {
            id: droplet.id,
            edge: name.clone(),
        }
    };
    Err(DropletError::Abandoned {
        reason: Box::new(reason),
        cleanup,
    })
}

/// What to create, decided before anything is.
struct Plan {
    image: Image,
    region: String,
    user_data: String,
}

enum Found {
    Existing(Droplet),
    ToCreate(Box<Plan>),
}

/// Finds the existing droplet, or checks everything a create needs (the
/// image, the region, the reserved IP, the bootstrap) so that a bad
/// argument fails before anything is made.
async fn find_or_plan(
    api: &Client,
    name: &EdgeName,
    state_dir: &Path,
    pki: &HomePki,
    opts: &DropletOptions,
) -> Result<Found, DropletError> {
    if let Some(d) = find_existing(api, name, state_dir).await? {
        return Ok(Found::Existing(d));
    }
    let reserved = match opts.reserved_ip {
        Some(ip) => {
            let rip = check_reserved_ip(api, ip).await?;
            if let Some(d) = rip.droplet {
                return Err(DropletError::ReservedIpBusy { ip, droplet: d.id });
            }
            Some(rip)
        }
        None => None,
    };
    let image = find_image(api, &opts.image).await?;
    let region = match (&opts.region, &reserved) {
        (Some(r), _) => r.clone(),
        (None, Some(rip)) => rip.region.slug.clone(),
        (None, None) => {
            image
                .regions
                .first()
                .cloned()
                .ok_or_else(|| DropletError::ImageNotInRegion {
                    image: image.name.clone(),
                    region: "any region".into(),
                    available: Vec::new(),
                })?
        }
    };
    if !image.regions.contains(&region) {
        return Err(DropletError::ImageNotInRegion {
            image: image.name.clone(),
            region,
            available: image.regions.clone(),
        });
    }
    if let Some(rip) = &reserved
        && rip.region.slug != region
    {
        return Err(DropletError::ReservedIpRegion {
            ip: rip.ip,
            ip_region: rip.region.slug.clone(),
            region,
        });
    }
    let user_data =
        Bootstrap::from_pki(pki, opts.control_port, opts.wireguard_port, opts.tunnel).to_toml()?;
    Ok(Found::ToCreate(Box::new(Plan {
        image,
        region,
        user_data,
    })))
}

/// From a droplet in hand to an edge-agent that answers.
#[allow(
    clippy::too_many_arguments,
    reason = "each is a distinct input of the flow"
)]
async fn finish(
    api: &Client,
    name: &EdgeName,
    state_dir: &Path,
    pki: &HomePki,
    opts: &DropletOptions,
    droplet: &Droplet,
    created: bool,
    deadline: Instant,
    progress: &(dyn Fn(Phase) + Sync),
) -> Result<ProvisionedEdge, DropletError> {
    let ready = if droplet.status == DropletStatus::Active && droplet.public_v4().is_some() {
        droplet.clone()
    } else {
        progress(Phase::Booting { id: droplet.id });
        wait_active(api, droplet.id, name, deadline, opts.ready_timeout).await?
    };
    let Some(v4) = ready.public_v4() else {
        return Err(DropletError::NotActive {
            id: ready.id,
            timeout: opts.ready_timeout,
        });
    };
    let v6 = ready.public_v6();
    if created {
        progress(Phase::Booted { v4, v6 });
    }
    let recorded = load_record(state_dir)?.and_then(|r| r.reserved_ip);
    let reserved_ip = match opts.reserved_ip {
        Some(ip) => {
            assign_reserved_ip(api, ip, &ready, deadline).await?;
            progress(Phase::ReservedIpAssigned { ip });
            Some(ip)
        }
        None => recorded,
    };
    save_record(state_dir, &DropletRecord::of(&ready, reserved_ip))?;
    let control = SocketAddr::from((v4, opts.control_port));
    progress(Phase::WaitingForEdge { addr: control });
    match probe_edge(control, pki, deadline).await {
        Ok(()) => {}
        Err(ProbeFailure::Tls(detail)) => {
            return Err(DropletError::ForeignCa {
                id: ready.id,
                name: ready.name.clone(),
                edge: name.clone(),
                state_dir: state_dir.to_path_buf(),
                detail,
            });
        }
        Err(ProbeFailure::NoAnswer(last_error)) => {
            return Err(DropletError::NotReady {
                id: ready.id,
                addr: control,
                timeout: opts.ready_timeout,
                last_error,
            });
        }
        Err(ProbeFailure::Setup(e)) => return Err(DropletError::Probe(e)),
    }
    progress(Phase::EdgeAnswered { addr: control });
    Ok(ProvisionedEdge {
        droplet_id: ready.id,
        droplet_name: ready.name.clone(),
        region: ready.region.slug.clone(),
        public_v4: v4,
        public_v6: v6,
        reserved_ip,
        control,
        created,
    })
}

/// What [`destroy`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// Id and name of each droplet deleted.
    pub droplets: Vec<(u64, String)>,
    /// The reserved IP unassigned (it stays in the account).
    pub unassigned: Option<Ipv4Addr>,
    pub tag_deleted: bool,
}

impl fmt::Display for Destroyed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.droplets.is_empty() {
            f.write_str("no droplet to destroy")?;
        }
        for (i, (id, name)) in self.droplets.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "destroyed droplet {id} ({name})")?;
        }
        if let Some(ip) = self.unassigned {
            write!(f, "\nreserved IP {ip} unassigned; it stays in your account")?;
        }
        Ok(())
    }
}

/// Deletes the droplet of edge `name` (the recorded one and any carrying
/// its tag), unassigns the reserved IP skerry assigned to it, deletes the
/// edge's tag and the record. The caller holds the state lock, if there
/// is a state dir.
pub async fn destroy(
    api: &Client,
    name: &EdgeName,
    state_dir: Option<&Path>,
) -> Result<Destroyed, DropletError> {
    let tag = edge_tag(name);
    let record = match state_dir {
        Some(dir) => load_record(dir)?,
        None => None,
    };
    let mut targets = api
        .droplets_by_tag(&tag)
        .await
        .map_err(api_err(format!("listing droplets tagged {tag}")))?;
    if let Some(rec) = &record
        && !targets.iter().any(|d| d.id == rec.id)
        && let Some(d) = api
            .droplet(rec.id)
            .await
            .map_err(api_err(format!("looking up droplet {}", rec.id)))?
        && d.has_tag(&tag)
    {
        targets.push(d);
    }
    let mut done = Destroyed::default();
    if let Some(ip) = record.as_ref().and_then(|r| r.reserved_ip)
        && let Some(rip) = api
            .reserved_ip(ip)
            .await
            .map_err(api_err(format!("looking up reserved IP {ip}")))?
        && rip
            .droplet
            .is_some_and(|d| targets.iter().any(|t| t.id == d.id))
    {
        let action = api
            .reserved_ip_action(ip, ReservedIpAction::Unassign)
            .await
            .map_err(api_err(format!("unassigning reserved IP {ip}")))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        wait_action(api, ip, action.id, action.status, deadline).await?;
        done.unassigned = Some(ip);
    }
    for d in &targets {
        api.delete_droplet(d.id)
            .await
            .map_err(api_err(format!("deleting droplet {} ({})", d.id, d.name)))?;
        done.droplets.push((d.id, d.name.clone()));
    }
    match api.delete_tag(&tag).await {
        Ok(existed) => done.tag_deleted = existed,
        Err(e) => warn!(tag = %tag, error = %e, "cannot delete the edge's tag; it is harmless"),
    }
    if let Some(dir) = state_dir {
        remove_record(dir)?;
    }
    Ok(done)
}

/// One of the user's skerry edges, for `home-agent list`.
#[derive(Debug, Clone)]
pub struct EdgeSummary {
    pub edge: String,
    pub id: u64,
    pub droplet_name: String,
    pub region: String,
    pub status: DropletStatus,
    pub public_v4: Option<Ipv4Addr>,
    pub public_v6: Option<Ipv6Addr>,
    pub created_at: String,
}

/// Every droplet tagged [`SKERRY_TAG`].
pub async fn list(api: &Client) -> Result<Vec<EdgeSummary>, DropletError> {
    let droplets = api
        .droplets_by_tag(SKERRY_TAG)
        .await
        .map_err(api_err("listing droplets tagged skerry"))?;
    let mut edges: Vec<EdgeSummary> = droplets
        .into_iter()
        .map(|d| EdgeSummary {
            edge: d
                .tags
                .iter()
                .find_map(|t| t.strip_prefix("skerry-"))
                .or_else(|| d.name.strip_prefix("skerry-"))
                .unwrap_or(&d.name)
                .to_owned(),
            id: d.id,
            public_v4: d.public_v4(),
            public_v6: d.public_v6(),
            droplet_name: d.name,
            region: d.region.slug,
            status: d.status,
            created_at: d.created_at,
        })
        .collect();
    edges.sort_by(|a, b| a.edge.cmp(&b.edge).then(a.id.cmp(&b.id)));
    Ok(edges)
}

/// A rough age: `3d 4h`, `2h 5m`, `7m`.
pub fn age(created_at: &str, now: OffsetDateTime) -> String {
    let Ok(created) = OffsetDateTime::parse(created_at, &Rfc3339) else {
        return "?".into();
    };
    let minutes = (now - created).whole_minutes().max(0);
    let (d, h, m) = (minutes / 1440, minutes / 60 % 24, minutes % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m")
    }
}

/// The table `home-agent list` prints.
pub fn render_list(edges: &[EdgeSummary], now: OffsetDateTime) -> String {
    if edges.is_empty() {
        return "no skerry edges in this DigitalOcean account".into();
    }
    let dash = || "-".to_owned();
    let rows: Vec<[String; 7]> = edges
        .iter()
        .map(|e| {
            [
                e.edge.clone(),
                e.id.to_string(),
                e.region.clone(),
                e.status.to_string(),
                e.public_v4.map_or_else(dash, |a| a.to_string()),
                e.public_v6.map_or_else(dash, |a| a.to_string()),
                age(&e.created_at, now),
            ]
        })
        .collect();
    let header = ["NAME", "ID", "REGION", "STATUS", "IPV4", "IPV6", "AGE"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: u64, name: &str, created: &str, status: Option<&str>) -> Image {
        Image {
            id,
            name: name.into(),
            kind: "snapshot".into(),
            regions: vec!["fra1".into()],
            created_at: created.into(),
            status: status.map(Into::into),
        }
    }

    #[test]
    fn release_image_names() {
        assert!(is_release_image("skerry-edge-0.1.0", "0.1.0"));
        assert!(is_release_image("skerry-edge-0.1.0-1732000000", "0.1.0"));
        assert!(!is_release_image("skerry-edge-0.1.0-rc1", "0.1.0"));
        assert!(!is_release_image("skerry-edge-0.1.0-", "0.1.0"));
        assert!(!is_release_image("skerry-edge-0.1.01", "0.1.0"));
        assert!(!is_release_image("skerry-edge-0.2.0", "0.1.0"));
        assert!(!is_release_image("my-skerry-edge-0.1.0", "0.1.0"));
    }

    #[test]
    fn newest_available_release_image_wins() {
        let images = vec![
            image(
                1,
                "skerry-edge-0.1.0",
                "2026-01-01T00:00:00Z",
                Some("available"),
            ),
            image(
                2,
                "skerry-edge-0.1.0-1767300000",
                "2026-01-02T00:00:00Z",
                None,
            ),
            image(
                3,
                "skerry-edge-0.1.0",
                "2026-01-03T00:00:00Z",
                Some("pending"),
            ),
            image(
                4,
                "skerry-edge-0.0.9",
                "2026-02-01T00:00:00Z",
                Some("available"),
            ),
            image(
                5,
                "debian-backup",
                "2026-03-01T00:00:00Z",
                Some("available"),
            ),
        ];
        let chosen = pick_image(&images, "skerry-edge-0.1.0", |n| {
            is_release_image(n, "0.1.0")
        })
        .expect("found");
        assert_eq!(chosen.id, 2);
    }

    #[test]
    fn missing_image_says_how_to_build_it() {
        let images = vec![image(4, "skerry-edge-0.0.9", "2026-02-01T00:00:00Z", None)];
        let err = pick_image(&images, "skerry-edge-0.1.0", |n| {
            is_release_image(n, "0.1.0")
        })
        .expect_err("none for 0.1.0");
        let text = err.to_string();
        assert!(text.contains("skerry-edge-0.1.0"), "{text}");
        assert!(text.contains("packer build packer/"), "{text}");
        assert!(text.contains("README: Edge image"), "{text}");
        assert!(text.contains("skerry-edge-0.0.9"), "{text}");
        let pending = vec![image(
            3,
            "skerry-edge-0.1.0",
            "2026-01-03T00:00:00Z",
            Some("pending"),
        )];
        assert!(matches!(
            pick_image(&pending, "skerry-edge-0.1.0", |n| is_release_image(
                n, "0.1.0"
            )),
            Err(DropletError::ImageNotAvailable { .. })
        ));
    }

    #[test]
    fn image_choice_parses_ids_and_names() {
        assert_eq!("12345".parse(), Ok(ImageChoice::Id(12345)));
        assert_eq!(
            "skerry-edge-0.1.0".parse(),
            Ok(ImageChoice::Name("skerry-edge-0.1.0".into()))
        );
        assert!("".parse::<ImageChoice>().is_err());
    }

    #[test]
    fn record_round_trips_and_refuses_strangers() {
        let scratch = tempfile::tempdir().expect("temp dir");
        let dir = scratch.path();
        assert_eq!(load_record(dir).expect("none"), None);
        let rec = DropletRecord {
            version: RECORD_VERSION,
            id: 42,
            name: "skerry-x".into(),
            region: "fra1".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            reserved_ip: Some(Ipv4Addr::new(192, 0, 2, 7)),
        };
        save_record(dir, &rec).expect("saved");
        assert_eq!(load_record(dir).expect("read"), Some(rec));
        std::fs::write(dir.join(STATE_FILE), r#"{"version":1,"id":1,"token":"x"}"#).expect("write");
        assert!(matches!(
            load_record(dir),
            Err(DropletError::BadState { .. })
        ));
        remove_record(dir).expect("removed");
        remove_record(dir).expect("removing twice is fine");
    }

    #[test]
    fn ages_and_table() {
        let now = OffsetDateTime::parse("2026-01-03T05:07:00Z", &Rfc3339).expect("time");
        assert_eq!(age("2026-01-01T00:00:00Z", now), "2d 5h");
        assert_eq!(age("2026-01-03T03:00:00Z", now), "2h 7m");
        assert_eq!(age("2026-01-03T05:00:00Z", now), "7m");
        assert_eq!(age("garbage", now), "?");
        let table = render_list(
            &[EdgeSummary {
                edge: "home".into(),
                id: 7,
                droplet_name: "skerry-home".into(),
                region: "fra1".into(),
                status: DropletStatus::Active,
                public_v4: Some(Ipv4Addr::new(203, 0, 113, 5)),
                public_v6: None,
                created_at: "2026-01-03T05:00:00Z".into(),
            }],
            now,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{table}");
        assert!(
            lines[1].contains("home") && lines[1].contains("203.0.113.5"),
            "{table}"
        );
        assert!(lines[1].ends_with("7m"), "{table}");
    }

    #[test]
    fn cleanup_messages_name_the_droplet() {
        let edge: EdgeName = "x".parse().expect("name");
        let kept = Cleanup::Kept { id: 9, edge }.to_string();
        assert!(
            kept.contains("droplet 9") && kept.contains("home-agent destroy --name x"),
            "{kept}"
        );
    }
}
