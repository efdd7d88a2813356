//! The home-agent binary: the command line over [`home_agent`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use home_agent::local_edge::LocalEdge;
use std::sync::Arc;

use home_agent::{HomeOptions, HomeState, HomeStatus, admin, say, say_err};
use skerry::bootstrap::{Bootstrap, DEFAULT_CONTROL_PORT, DEFAULT_WIREGUARD_PORT};
use skerry::paths::{self, EdgeName};
use skerry::pki::HomePki;
use skerry::portmap::{PortMap, PortSpec};
use skerry::tunnel::TunnelAddrs;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "home-agent",
    version,
    about = "skerry: put home services on a public IP you own"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start: the size of its largest variant costs nothing"
)]
#[derive(Subcommand)]
enum Command {
    /// Connect to an edge and serve the given ports until stopped.
    Connect {
        /// `local` (an edge in a private network namespace on this host),
        /// `droplet`, or HOST[:PORT] of an edge-agent you run.
        #[arg(long)]
        edge: String,
        /// Name of this edge: state, lock and device names derive from it.
        #[arg(long, default_value = "default")]
        name: EdgeName,
        /// PROTO/PORT[-END]=TARGET[,proxy=v1|v2][,allow=CIDR…][,max-conns=N]
        #[arg(short = 'p', long = "port", value_name = "SPEC")]
        ports: Vec<String>,
        /// Idle time after which a UDP flow is forgotten.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        udp_idle: Duration,
        /// How long flows on a removed port may go on before they are closed.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        drain_grace: Duration,
        /// A TOML file with the port map, followed live (default:
        /// $XDG_CONFIG_HOME/skerry/<name>.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        tunnel: TunnelArgs,
        #[command(flatten)]
        droplet: home_agent::provision::DropletArgs,
    },
    /// Destroy the edge's droplet and what skerry made for it (the state
    /// dir's CA stays; a reserved IP is only unassigned).
    Destroy {
        #[arg(long, default_value = "default")]
        name: EdgeName,
        #[command(flatten)]
        api: home_agent::provision::ApiArgs,
    },
    /// List your skerry edges on DigitalOcean.
    List {
        #[command(flatten)]
        api: home_agent::provision::ApiArgs,
    },
    /// List, add or remove ports of a running agent, live.
    Ports {
        #[command(subcommand)]
        op: PortsOp,
        #[arg(long, default_value = "default", global = true)]
        name: EdgeName,
        /// Print the answer as JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Show a running agent: edge, tunnel, ports and their flows.
    Status {
        #[arg(long, default_value = "default")]
        name: EdgeName,
        #[arg(long)]
        json: bool,
    },
    /// Write the one file an edge-agent you run yourself needs.
    EdgeBootstrap {
        #[arg(long, default_value = "default")]
        name: EdgeName,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = DEFAULT_CONTROL_PORT)]
        control_port: u16,
        #[arg(long, default_value_t = DEFAULT_WIREGUARD_PORT)]
        wireguard_port: u16,
        #[command(flatten)]
        tunnel: TunnelArgs,
    },
}

/// The tunnel's private addresses, for an edge this command makes. Change
/// them when the defaults collide with a network the home already routes.
#[derive(clap::Args)]
struct TunnelArgs {
    /// The edge's tunnel address [default: 10.77.0.1].
    #[arg(long, value_name = "IPV4", requires = "tunnel_home")]
    tunnel_edge: Option<std::net::Ipv4Addr>,
    /// The home's tunnel address [default: 10.77.0.2].
    #[arg(long, value_name = "IPV4", requires = "tunnel_edge")]
    tunnel_home: Option<std::net::Ipv4Addr>,
    /// The tunnel subnet's prefix length, 8 to 30 [default: 30].
    #[arg(long, value_name = "LEN", value_parser = clap::value_parser!(u8).range(8..=30))]
    tunnel_prefix: Option<u8>,
}

impl TunnelArgs {
    fn given(&self) -> bool {
        self.tunnel_edge.is_some() || self.tunnel_home.is_some() || self.tunnel_prefix.is_some()
    }

    /// The addresses asked for, the defaults for what was not.
    fn addrs(&self) -> anyhow::Result<TunnelAddrs> {
        let d = TunnelAddrs::DEFAULT;
        TunnelAddrs::new(
            self.tunnel_edge.unwrap_or(d.edge()),
            self.tunnel_home.unwrap_or(d.home()),
            self.tunnel_prefix.unwrap_or(d.prefix_len()),
        )
        .context("--tunnel-edge, --tunnel-home and --tunnel-prefix")
    }
}

#[derive(Subcommand)]
enum PortsOp {
    /// The running map and the edge's answer for each entry.
    List,
    /// Add entries, or retarget an existing public port.
    Add {
        #[arg(value_name = "SPEC", required = true)]
        specs: Vec<String>,
    },
    /// Remove entries by public port (`tcp/25565`, `udp/30000-30009`).
    Rm {
        #[arg(value_name = "PROTO/PORT", required = true)]
        keys: Vec<String>,
    },
}

/// Exit codes: 0 done, 1 error, 2 usage (clap), 3 some ports refused.
const EXIT_PORTS_REFUSED: u8 = 3;

fn main() -> ExitCode {
    skerry::logging::subscriber(
        std::io::stderr,
        skerry::logging::filter_from_env(LevelFilter::WARN),
    )
    .init();
    if let Err(e) = skerry::fd_limit::raise() {
        tracing::warn!(error = %e, "could not raise the open-file limit; it stays at its soft value");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            say_err!("home-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::EdgeBootstrap {
            name,
            out,
            control_port,
            wireguard_port,
            tunnel,
        } => {
            let tunnel = tunnel.addrs()?;
            let dir = paths::state_dir(&name)?;
            let pki = HomePki::load_or_create(&dir)?;
            Bootstrap::from_pki(&pki, control_port, wireguard_port, tunnel)
                .write_to(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            say!(
                "wrote {} (mode 0600): copy it to the edge and run",
                out.display()
            );
            say!("  edge-agent run --bootstrap {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Connect {
            edge,
            name,
            ports,
            udp_idle,
            drain_grace,
            config,
            tunnel,
            droplet,
        } => connect(
            &edge,
            name,
            &ports,
            Tuning {
                udp_idle,
                drain_grace,
                config,
                tunnel,
                droplet,
            },
        ),
        Command::Destroy { name, api } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            say!(
                "{}",
                runtime.block_on(home_agent::provision::destroy(&api, &name))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::List { api } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            say!("{}", runtime.block_on(home_agent::provision::list(&api))?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Ports { op, name, json } => {
            let req = match op {
                PortsOp::List => admin::Request::List,
                PortsOp::Add { specs } => admin::Request::Add { specs },
                PortsOp::Rm { keys } => admin::Request::Remove { keys },
            };
            admin_command(&name, &req, json)
        }
        Command::Status { name, json } => admin_command(&name, &admin::Request::Status, json),
    }
}

fn connect(
    edge: &str,
    name: EdgeName,
    specs: &[String],
    tuning: Tuning,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if tuning.tunnel.given() && edge != "local" && edge != "droplet" {
        bail!(
            "--tunnel-* choose the addresses of an edge this command makes (local or droplet); \
             an edge you run has them in its bootstrap file: home-agent edge-bootstrap --tunnel-…"
        );
    }
    let tunnel = tuning.tunnel.addrs()?;
    let (cli_map, mut refused) = parse_ports(specs);
    let config_file = match tuning.config {
        Some(p) => Some(p),
        None => home_agent::config::default_file(&paths::config_dir()?, &name)?,
    };
    // The file's text as read here: the follower applies any later save.
    let mut config_text = None;
    let map = match &config_file {
        None => cli_map.clone(),
        Some(path) => {
            let refused = || "the config file is refused; fix it and start again".to_string();
            let text = home_agent::config::read_text(path).with_context(refused)?;
            let specs = home_agent::config::parse_map(path, &text, cli_map.specs())
                .with_context(refused)?;
            config_text = Some(text);
            say!("port map from {}", path.display());
            // parse_map refused the file if any entry could not join.
            let (map, _) = PortMap::from_specs(1, specs);
            map
        }
    };
    skerry::protocol::check_map_size(&map.public())
        .context("the ports are refused; fix them and start again")?;
    // First, before a state directory or an edge is touched: one agent per
    // name, whatever its state directory (see AdminSocket).
    let socket = paths::runtime_socket(&name)?;
    let mut also = Vec::new();
    if nix::unistd::geteuid().is_root() {
        let system = paths::root_socket(&name)?;
        if system != socket {
            also.push(system);
        }
    }
    // Held to the end of this function: the socket goes, then the locks.
    let mut admin_socket =
        admin::AdminSocket::claim(socket.clone(), &also).map_err(|e| match e {
            admin::ClaimError::Lock(e)
                if e.locked_path()
                    .is_some_and(|p| p.starts_with(paths::ROOT_SOCKET_DIR)) =>
            {
                anyhow::anyhow!("{e} (if it is the service: sudo systemctl stop home-agent@{name})")
            }
            e => e.into(),
        })?;
    let dir = paths::state_dir(&name)?;
    let state = HomeState::open(&dir)?;
    // One thread for the data path and everything else, as on the edge (see
    // edge-agent's main for the measurements): the pipeline's stages wake each
    // other without crossing cores, and one core carries several Gbit/s.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    let local = match edge {
        "local" => {
            let e = LocalEdge::start(&name, &state.pki, tunnel)?;
            step(
                started,
                &format!("local edge started in network namespace {}", e.namespace()),
            );
            Some(e)
        }
        _ => None,
    };
    let edge_addr = match &local {
        Some(l) => l.control,
        None if edge == "droplet" => {
            // Ctrl-C while provisioning: bring_up destroys what it made.
            let cancel = CancellationToken::new();
            let provisioned = runtime.block_on(async {
                tokio::spawn(skerry::shutdown::on_signal(cancel.clone()));
                home_agent::provision::connect(
                    &home_agent::provision::DropletArgs {
                        tunnel,
                        ..tuning.droplet.clone()
                    },
                    &name,
                    &dir,
                    &state.pki,
                    &|phase| home_agent::provision::print_phase(started, &phase),
                    &cancel,
                )
                .await
            })?;
            say!("edge: {provisioned}");
            provisioned.control
        }
        None => runtime.block_on(resolve(edge))?,
    };

    let opts = HomeOptions {
        edge: edge_addr,
        tun_name: home_agent::tun_name(&name),
        udp_idle: tuning.udp_idle,
        drain_grace: tuning.drain_grace,
        dead_peer: skerry::dead_peer::DeadPeer::default(),
        requested_tunnel: tuning.tunnel.given().then_some(tunnel),
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(skerry::shutdown::on_signal(shutdown.clone()));
        let (map_tx, map_rx) = watch::channel(map.clone());
        let (status_tx, status_rx) = watch::channel(HomeStatus::default());
        let controller = Arc::new(admin::Controller::new(
            name.to_string(),
            edge_addr,
            map_tx,
            status_rx.clone(),
            config_file.clone(),
        ));
        let admin_task = tokio::spawn(admin::serve(
            admin_socket.take_listener()?,
            controller.clone(),
            shutdown.clone(),
        ));
        if let Some(path) = config_file.clone() {
            let follower = home_agent::config::follow(
                path,
                cli_map.specs().to_vec(),
                config_text.clone(),
                controller.clone(),
                status_tx.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                if let Err(e) = follower.await {
                    say_err!("home-agent: cannot follow the config file: {e:#}");
                }
            });
        }
        let agent = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                home_agent::run(opts, &state.pki, &state.key, map_rx, status_tx, shutdown).await
            }
        });
        tokio::select! {
            r = report_progress(started, edge_addr, &controller, map.generation(), status_rx, local.as_ref()) => {
                match r {
                    Ok(n) => refused += n,
                    Err(e) => say_err!("home-agent: {e:#}"),
                }
            }
            () = shutdown.cancelled() => {}
        }
        say!("serving; Ctrl-C to stop; change ports live with `home-agent ports add|rm --name {name}`");
        shutdown.cancelled().await;
        if let Ok(Err(e)) = admin_task.await {
            say_err!("home-agent: admin socket {}: {e}", socket.display());
        }
        match agent.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("home-agent task failed: {e}")),
        }
    });
    if let Some(l) = local {
        l.stop()?;
        say!("local edge stopped and its namespace removed");
    }
    drop(admin_socket);
    result?;
    Ok(if refused > 0 {
        ExitCode::from(EXIT_PORTS_REFUSED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Settings of `connect` beyond the edge and the ports.
struct Tuning {
    udp_idle: Duration,
    drain_grace: Duration,
    config: Option<PathBuf>,
    tunnel: TunnelArgs,
    droplet: home_agent::provision::DropletArgs,
}

/// The running agent's admin socket for `name`: ours, or, when there is
/// none, the one the user means. `connect` needs CAP_NET_ADMIN and is often
/// run with `sudo` while `ports …` is not, or the other way round, and the
/// two then look in different places. Nothing is created here: a client
/// only connects.
fn agent_socket(name: &EdgeName) -> anyhow::Result<PathBuf> {
    let own = paths::runtime_socket_path(name)?;
    let euid = nix::unistd::geteuid();
    let root = euid.is_root();
    // A root login shell (`sudo -i`, ssh) has XDG_RUNTIME_DIR set, and so
    // looks elsewhere than the service and `sudo home-agent connect`, which
    // use root's system-wide directory.
    let system = paths::root_socket_path(name);
    let roots = if own.exists() {
        // In a shared /tmp, anyone could have made it to catch our requests.
        paths::owned_socket(&own, euid.as_raw())?;
        Some(own.clone())
    } else if root && system != own && system.exists() {
        paths::owned_socket(&system, 0)?;
        Some(system)
    } else {
        None
    };
    // `sudo home-agent ports …` may mean an agent the user started.
    let users = if root { sudo_user_socket(name) } else { None };
    match (roots, users) {
        (Some(roots), Some(users)) => {
            say_err!(
                "two home-agents run for edge {name}: root's at {} (this one) and that of the user \
                 who ran sudo at {} (run this command without sudo for it)",
                roots.display(),
                users.display()
            );
            Ok(roots)
        }
        (Some(roots), None) => Ok(roots),
        (None, Some(users)) => {
            say_err!(
                "using the home-agent of the user who ran sudo, at {}",
                users.display()
            );
            Ok(users)
        }
        (None, None) if !root && Path::new(paths::ROOT_SOCKET_DIR).exists() => {
            // Root's socket cannot even be looked for from here.
            bail!(
                "no home-agent of yours is running for edge {name} (nothing at {}). If you \
                 started it as root (with sudo), its socket is under {}, which only root can \
                 enter: run this command as root too; otherwise start one with `home-agent connect`",
                own.display(),
                paths::ROOT_SOCKET_DIR
            );
        }
        (None, None) => Ok(own),
    }
}

/// The socket of the agent the user who ran `sudo` started for `name`, if
/// there is one and it is truly theirs.
fn sudo_user_socket(name: &EdgeName) -> Option<PathBuf> {
    let uid = std::env::var("SUDO_UID")
        .ok()
        .and_then(|uid| uid.parse::<u32>().ok())
        .filter(|&uid| uid != 0)?;
    paths::user_socket(uid, name)
}

/// Sends one request to the running agent and prints its answer; the exit
/// code says whether every entry went through.
fn admin_command(name: &EdgeName, req: &admin::Request, json: bool) -> anyhow::Result<ExitCode> {
    let socket = agent_socket(name)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let response = runtime.block_on(admin::request(&socket, req))?;
    if json {
        say!("{}", serde_json::to_string_pretty(&response)?);
    }
    if !json {
        print_response(&response);
    }
    Ok(match &response {
        admin::Response::Changed(c) if !c.all_ok() => ExitCode::from(EXIT_PORTS_REFUSED),
        // The agent could not take the request (say, an older agent than
        // this command): an error, not a refused entry.
        admin::Response::Error { .. } => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

fn print_response(response: &admin::Response) {
    let print_ports = |ports: &[admin::PortReport]| {
        if ports.is_empty() {
            say!("  (no ports)");
        }
        for p in ports {
            let mark = if p.ok { "✓" } else { "✗" };
            say!(
                "  {mark} {:<58} {:<12} {} open",
                p.spec,
                p.state,
                p.open_flows
            );
        }
    };
    match response {
        admin::Response::Status(s) => {
            say!(
                "edge {} ({}): {}",
                s.name,
                s.edge,
                if s.connected {
                    "connected"
                } else {
                    "not connected"
                }
            );
            say!("  public address: {}", s.public_addrs.join(", "));
            let addrs = s
                .tunnel_addrs
                .as_ref()
                .map(|a| format!(" ({a})"))
                .unwrap_or_default();
            match s.last_handshake_secs {
                Some(age) if s.tunnel_up => {
                    say!("  tunnel{addrs}: up, last handshake {age:.0} s ago");
                }
                _ => say!("  tunnel{addrs}: down"),
            }
            say!(
                "  traffic: {} sent, {} received (tunnel bytes)",
                s.tx_bytes,
                s.rx_bytes
            );
            if let Some(f) = &s.config_file {
                say!("  config file: {f}");
            }
            if let Some(e) = &s.config_error {
                say!("  config file refused: {e}");
            }
            if let Some(e) = &s.last_error {
                say!("  last error: {e}");
            }
            say!("  ports (generation {}):", s.generation);
            print_ports(&s.ports);
        }
        admin::Response::Ports { ports } => print_ports(ports),
        admin::Response::Changed(c) => {
            for e in &c.entries {
                let mark = if e.ok { "✓" } else { "✗" };
                say!(
                    "  {mark} {}: {}",
                    e.input,
                    if e.message.is_empty() {
                        "ok"
                    } else {
                        &e.message
                    }
                );
            }
            if let Some(n) = &c.note {
                say!("note: {n}");
            }
        }
        admin::Response::Error { message } => say_err!(
            "home-agent: the running agent could not take the request: {message} (it may be \
             older than this command: restart it)"
        ),
    }
}

/// Parses every spec, refusing each bad one alone.
fn parse_ports(specs: &[String]) -> (PortMap, usize) {
    let mut good = Vec::new();
    let mut refused = 0;
    let mut originals = Vec::new();
    for s in specs {
        match s.parse::<PortSpec>() {
            Ok(spec) => {
                good.push(spec);
                originals.push(s.clone());
            }
            Err(e) => {
                refused += 1;
                say_err!("  ✗ {s}: {e}");
            }
        }
    }
    let (map, errors) = PortMap::from_specs(1, good);
    for (i, e) in errors {
        refused += 1;
        say_err!("  ✗ {}: {e}", originals.get(i).map_or("?", String::as_str));
    }
    (map, refused)
}

async fn resolve(edge: &str) -> anyhow::Result<SocketAddr> {
    let with_port = if edge.parse::<SocketAddr>().is_ok()
        || edge
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.ends_with(':') && !h.contains(':') && p.parse::<u16>().is_ok())
    {
        edge.to_owned()
    } else if edge.contains(':') && !edge.starts_with('[') {
        format!("[{edge}]:{DEFAULT_CONTROL_PORT}")
    } else {
        format!("{edge}:{DEFAULT_CONTROL_PORT}")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("resolving the edge address {with_port}"))?
        .next()
        .with_context(|| format!("{with_port} has no address"))
}

fn step(started: Instant, what: &str) {
    say!("  ✓ {what:<60} {:>6.1}s", started.elapsed().as_secs_f64());
}

/// Prints each phase as it completes; returns how many ports the edge refused.
///
/// The edge's first answer may be to a later map than the one `connect`
/// started with (`first_generation`): a config file saved while it started
/// is applied as soon as it runs.
async fn report_progress(
    started: Instant,
    edge: SocketAddr,
    controller: &admin::Controller,
    first_generation: u64,
    mut status: watch::Receiver<HomeStatus>,
    local: Option<&LocalEdge>,
) -> anyhow::Result<usize> {
    say!("connecting to the edge at {edge} …");
    let s = status
        .wait_for(|s| s.connected || s.last_error.is_some())
        .await?
        .clone();
    if !s.connected {
        if let Some(e) = &s.last_error {
            say_err!("  … {e} (retrying)");
        }
        status.wait_for(|s| s.connected).await?;
    }
    step(started, "control channel up (QUIC, mutual TLS)");
    let tunnel = status.borrow().tunnel_handle.clone();
    if let Some(t) = tunnel
        && t.stats().last_handshake.is_none()
    {
        tokio::time::timeout(Duration::from_secs(30), t.handshake())
            .await
            .context(
                "no WireGuard handshake within 30 s: is UDP to the edge's WireGuard port blocked?",
            )??;
    }
    step(started, "WireGuard tunnel handshake complete");
    let applied = status
        .wait_for(|s| {
            s.applied
                .as_ref()
                .is_some_and(|a| a.generation >= first_generation)
        })
        .await?
        .applied
        .clone()
        .context("no answer to the port map")?;
    // The map answered, or a later one: targets are looked up, not shown.
    let map = controller.map();
    let mut refused = 0;
    for r in &applied.results {
        let target = map
            .specs()
            .iter()
            .find(|s| s.key() == r.key)
            .map_or_else(String::new, |s| format!(" → {}", s.target));
        if r.status.is_ok() {
            say!("  ✓ {}{target}: {}", r.key, r.status);
        } else {
            refused += 1;
            say!("  ✗ {}{target}: {}", r.key, r.status);
        }
    }
    let addrs = status.borrow().edge_public_addrs.clone();
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    say!("public address: {}", shown.join(", "));
    if let (Some(l), Some(first)) = (local, map.specs().first()) {
        say!(
            // netcat takes the host and the port as two arguments.
            "  try it from this host: {} {} {}",
            if first.protocol == skerry::portmap::Protocol::Tcp {
                "nc -v"
            } else {
                "nc -uv"
            },
            l.public_v4,
            first.ports.start()
        );
    }
    Ok(refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The tunnel flags are `Option`s (so that "not given" can be told from
    /// "given as the default"), which leaves their help to state the default
    /// by hand: each must be the one the code uses.
    #[test]
    fn tunnel_flag_help_states_the_defaults_the_code_uses() {
        let d = TunnelAddrs::DEFAULT;
        let defaults = [
            ("tunnel_edge", d.edge().to_string()),
            ("tunnel_home", d.home().to_string()),
            ("tunnel_prefix", d.prefix_len().to_string()),
        ];
        let cli = Cli::command();
        for subcommand in ["connect", "edge-bootstrap"] {
            let Some(cmd) = cli.find_subcommand(subcommand) else {
                panic!("no `{subcommand}` subcommand");
            };
            for (id, default) in &defaults {
                let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == id) else {
                    panic!("`{subcommand}` has no {id} argument");
                };
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                assert!(
                    help.contains(&format!("[default: {default}]")),
                    "`{subcommand}` {id}: the help says {help:?}, the default is {default}"
                );
            }
        }
    }
}
