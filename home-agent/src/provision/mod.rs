//! Provisioning: the edge as a DigitalOcean droplet.
//!
//! | module | owns |
//! |---|---|
//! | [`digitalocean`] | the API v2 client: calls, errors, retries, the token |
//! | [`droplet`] | finding, creating, re-attaching and destroying an edge's droplet |
//!
//! This module holds the command-line side that `home-agent connect --edge
//! droplet`, `destroy` and `list` share: the flags, where the token comes
//! from, and the progress lines. The token is read here and handed to the
//! client; it never reaches the edge, the state dir or a log line.

pub mod digitalocean;
pub mod droplet;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use skerry::paths::EdgeName;
use skerry::pki::HomePki;
use skerry::tunnel::TunnelAddrs;
use tokio_util::sync::CancellationToken;

pub use digitalocean::{ApiError, ApiToken, Client, ClientOptions, DEFAULT_API_URL};
pub use droplet::{Cleanup, DropletError, DropletOptions, ImageChoice, Phase, ProvisionedEdge};

/// How to reach the DigitalOcean API.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// A file holding the DigitalOcean API token (else $DIGITALOCEAN_TOKEN
    /// or $DIGITALOCEAN_ACCESS_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The API's base URL; only a test stand-in changes it.
    #[arg(long, env = "SKERRY_DO_API_URL", default_value = DEFAULT_API_URL, hide = true)]
    pub api_url: String,
}

impl ApiArgs {
    /// For the given token file and base URL.
    pub fn new(token_file: Option<PathBuf>, api_url: &str) -> Self {
        ApiArgs {
            token_file,
            api_url: api_url.to_owned(),
        }
    }

    /// The client, with the token from `--token-file` or the environment.
    pub fn client(&self) -> Result<Client, ApiError> {
        let token = ApiToken::load(self.token_file.as_deref())?;
        Client::new(&token, ClientOptions::new(&self.api_url)?)
    }
}

/// `connect --edge droplet`'s own flags.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "With --edge droplet")]
pub struct DropletArgs {
    /// Region of a new droplet [default: the reserved IP's, else the
    /// edge image's first region].
    #[arg(long)]
    pub region: Option<String>,
    /// Size slug of a new droplet.
    #[arg(long, default_value = droplet::DEFAULT_SIZE)]
    pub size: String,
    /// Image of a new droplet [default: the newest private image named
    /// skerry-edge-VERSION, VERSION being this home-agent's].
    #[arg(long, value_name = "NAME|ID")]
    pub image: Option<ImageChoice>,
    /// A reserved IPv4 address of yours to assign to the droplet: the
    /// edge's public address.
    #[arg(long, value_name = "IP")]
    pub reserved_ip: Option<Ipv4Addr>,
    /// Destroy a droplet this run created if it does not come up.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub cleanup_on_failure: bool,
    /// How long a droplet may take until its edge-agent answers.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// The tunnel addresses of a new droplet (`connect` sets them from its
    /// `--tunnel-*`).
    #[arg(skip)]
    pub tunnel: TunnelAddrs,
    #[command(flatten)]
    pub api: ApiArgs,
}

impl DropletArgs {
    /// Defaults for everything, the API as given.
    pub fn new(api: ApiArgs) -> Self {
        let d = DropletOptions::default();
        DropletArgs {
            region: d.region,
            size: d.size,
            image: None,
            reserved_ip: d.reserved_ip,
            cleanup_on_failure: d.cleanup_on_failure,
            ready_timeout: d.ready_timeout,
            tunnel: d.tunnel,
            api,
        }
    }

    pub fn options(&self) -> DropletOptions {
        DropletOptions {
            region: self.region.clone(),
            size: self.size.clone(),
            image: self.image.clone().unwrap_or_default(),
            reserved_ip: self.reserved_ip,
            cleanup_on_failure: self.cleanup_on_failure,
            ready_timeout: self.ready_timeout,
            tunnel: self.tunnel,
            ..DropletOptions::default()
        }
    }
}

/// `connect --edge droplet` up to a dialable edge: finds or creates the
/// droplet of `name` and waits for its edge-agent (see
/// [`droplet::bring_up`]). The caller holds the state lock of `state_dir`.
pub async fn connect(
    args: &DropletArgs,
    name: &EdgeName,
    state_dir: &Path,
    pki: &HomePki,
    progress: &(dyn Fn(Phase) + Sync),
    cancel: &CancellationToken,
) -> anyhow::Result<ProvisionedEdge> {
    let api = args.api.client()?;
    let edge = droplet::bring_up(
        &api,
        name,
        state_dir,
        pki,
        &args.options(),
        progress,
        cancel,
    )
    .await?;
    Ok(edge)
}

/// `home-agent destroy`: see [`droplet::destroy`]. Takes the state lock
/// when the state dir exists, so a running agent is not pulled from
/// under; the CA and keys stay, so a later connect makes an edge that
/// trusts this home again.
pub async fn destroy(api: &ApiArgs, name: &EdgeName) -> anyhow::Result<droplet::Destroyed> {
    let client = api.client()?;
    let dir = skerry::paths::state_dir(name)?;
    let _lock = if dir.is_dir() {
        Some(skerry::paths::StateLock::acquire(&dir)?)
    } else {
        None
    };
    let state = dir.is_dir().then_some(dir.as_path());
    droplet::destroy(&client, name, state)
        .await
        .with_context(|| format!("destroying edge {name}"))
}

/// `home-agent list`: the table of the user's skerry edges.
pub async fn list(api: &ApiArgs) -> anyhow::Result<String> {
    let client = api.client()?;
    let edges = droplet::list(&client).await?;
    Ok(droplet::render_list(
        &edges,
        time::OffsetDateTime::now_utc(),
    ))
}

/// Prints a provisioning phase like the rest of `connect`'s progress: a
/// wait that begins as `  … what`, a step done as `  ✓ what   12.3s`.
pub fn print_phase(started: Instant, phase: &Phase) {
    if phase.is_start() {
        crate::say!("  … {phase}");
    } else {
        crate::say!(
            "  ✓ {:<60} {:>6.1}s",
            phase.to_string(),
            started.elapsed().as_secs_f64()
        );
    }
}
