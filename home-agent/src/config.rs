//! The port map as a file the running agent follows.
//!
//! ```toml
//! # ~/.config/skerry/default.toml
//! ports = [
//!   "tcp/25565=127.0.0.1:25565",
//!   "udp/19132=127.0.0.1:19132",
//!   "tcp/443=127.0.0.1:8443,proxy=v2,allow=203.0.113.0/24",
//! ]
//! ```
//!
//! Saving the file applies it as a new generation. A file that does not
//! parse, or has one bad entry, is refused whole with the line and the
//! reason, and the running map stays as it was: a half-applied file would
//! be a state the user never wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use serde::Deserialize;
use skerry::portmap::PortSpec;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::HomeStatus;
use crate::admin::Controller;

/// Editors write a file in several steps; changes closer than this are one.
const SETTLE: Duration = Duration::from_millis(150);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    ports: Vec<toml::Spanned<String>>,
}

/// Why a config file was refused: where, and what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub line: usize,
    pub reason: String,
}

/// Parses a config file's text into port specs.
pub fn parse(path: &Path, text: &str) -> Result<Vec<PortSpec>, ConfigError> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let error = |line, reason: String| ConfigError {
        path: path.display().to_string(),
        line,
        reason,
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(s.start));
        error(line, e.message().to_owned())
    })?;
    raw.ports
        .iter()
        .map(|entry| {
            entry.get_ref().parse::<PortSpec>().map_err(|e| {
                error(
                    line_of(entry.span().start),
                    format!("`{}`: {e}", entry.get_ref()),
                )
            })
        })
        .collect()
}

pub fn read(path: &Path) -> Result<Vec<PortSpec>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.display().to_string(),
        line: 0,
        reason: e.to_string(),
    })?;
    parse(path, &text)
}

/// Follows `path` until `shutdown`: each saved version replaces the map,
/// with `extra` (the `-p` entries of the command line) added.
pub async fn follow(
    path: PathBuf,
    extra: Vec<PortSpec>,
    controller: Arc<Controller>,
    status: watch::Sender<HomeStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_name = path.file_name().map(ToOwned::to_owned);
    let (tx, mut rx) = mpsc::channel::<()>(16);
    // Watch the directory, not the file: editors replace files by rename.
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let ours = event
            .paths
            .iter()
            .any(|p| p.file_name().map(ToOwned::to_owned) == file_name);
        if ours && matches!(event.kind, EventKind::Create(_) | EventKind::Modify(_)) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            got = rx.recv() => if got.is_none() { break },
        }
        // Let the editor finish, then take everything that piled up.
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        reload(&path, &extra, &controller, &status).await;
    }
    drop(watcher);
    Ok(())
}

async fn reload(
    path: &Path,
    extra: &[PortSpec],
    controller: &Controller,
    status: &watch::Sender<HomeStatus>,
) {
    let result = read(path).map(|mut specs| {
        specs.extend(extra.iter().cloned());
        specs
    });
    let outcome = match result {
        Ok(specs) => controller
            .replace(specs)
            .await
            .map_err(|reason| ConfigError {
                path: path.display().to_string(),
                line: 0,
                reason,
            }),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(report) => {
            info!(file = %path.display(), generation = report.generation, "config file applied");
            for e in report.entries.iter().filter(|e| !e.ok) {
                warn!(entry = %e.input, reason = %e.message, "edge refused an entry of the config file");
            }
            status.send_modify(|s| s.config_error = None);
        }
        Err(e) => {
            warn!(error = %e, "config file refused; the running map is unchanged");
            status.send_modify(|s| s.config_error = Some(e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_names_the_bad_line() {
        let p = Path::new("x.toml");
        let ok = parse(
            p,
            "ports = [\n  \"tcp/80=127.0.0.1:8080\",\n  \"udp/53=[::1]:53\",\n]\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse(
            p,
            "ports = [\n  \"tcp/80=127.0.0.1:8080\",\n  \"tcp/0=127.0.0.1:1\",\n]\n",
        )
        .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("port 0"), "{e}");
        let e = parse(p, "ports = [\n\"tcp/80=127.0.0.1:8080\"\n").unwrap_err();
        assert!(e.line >= 2, "{e}");
        let e = parse(p, "port = []\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("unknown field"), "{e}");
        assert!(parse(p, "").unwrap().is_empty());
    }
}
