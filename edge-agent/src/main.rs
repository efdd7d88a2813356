//! The edge-agent binary: parses arguments and runs [`edge_agent::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use skerry::bootstrap::Bootstrap;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "skerry's edge: public ports carried home through WireGuard"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: control channel, tunnel and public ports.
    Run {
        /// The bootstrap file written by `home-agent edge-bootstrap`.
        /// Without it, the bootstrap is read from the droplet metadata
        /// service (the droplet's user data).
        #[arg(long)]
        bootstrap: Option<PathBuf>,
        /// Base URL of the metadata service read when there is no
        /// --bootstrap.
        #[arg(long, default_value = edge_agent::metadata::DEFAULT_METADATA_URL)]
        metadata_url: edge_agent::metadata::MetadataUrl,
        /// Name of the TUN device.
        #[arg(long, default_value = edge_agent::DEFAULT_TUN_NAME)]
        tun_name: String,
        /// Idle time after which a UDP flow is forgotten.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        udp_idle: Duration,
    },
}

fn main() -> ExitCode {
    skerry::logging::subscriber(
        std::io::stdout,
        skerry::logging::filter_from_env(LevelFilter::INFO),
    )
    .init();
    if let Err(e) = skerry::fd_limit::raise() {
        tracing::warn!(error = %e, "could not raise the open-file limit; it stays at its soft value");
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Run {
        bootstrap,
        metadata_url,
        tun_name,
        udp_idle,
    } = cli.command;
    let from_file = match &bootstrap {
        Some(path) => Some(
            Bootstrap::read_from(path)
                .with_context(|| format!("reading the bootstrap file {}", path.display()))?,
        ),
        None => None,
    };
    // One thread, as on the home side: the data path is a pipeline (public
    // socket, in-tunnel socket, TUN, cipher, UDP) whose stages wake each other
    // for every packet, and on tokio's multi-thread runtime those wake-ups
    // cross cores. One thread measured better in every figure (interleaved
    // A/B on 2 cores: UDP 648 -> ~1000 Mbit/s, connections/s +14 %, latency
    // p99 -7 %), and the $4 droplet has one core anyway.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(skerry::shutdown::on_signal(shutdown.clone()));
        let bootstrap = match from_file {
            Some(b) => b,
            None => {
                tracing::info!(url = %metadata_url, "no --bootstrap: reading it from the droplet metadata service");
                match edge_agent::metadata::fetch_bootstrap(&metadata_url, &shutdown).await? {
                    Some(b) => b,
                    None => return Ok(()),
                }
            }
        };
        let mut opts = edge_agent::EdgeOptions::new(bootstrap);
        opts.tun_name = tun_name;
        opts.udp_idle = udp_idle;
        edge_agent::run(opts, shutdown).await
    })
}
