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
use skerry::portmap::{PortMap, PortSpec, PortSpecError};
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

/// The specs of a map made of a config file's text and `extra` (the `-p`
/// entries of the command line, after the file's): refused whole, at the
/// first entry that cannot join the others (an overlap, one too many),
/// named by its line and, for an overlap, the line of the entry it
/// overlaps.
pub fn parse_map(
    path: &Path,
    text: &str,
    extra: &[PortSpec],
) -> Result<Vec<PortSpec>, ConfigError> {
    let entries = parse_entries(path, text)?;
    let in_file = entries.len();
    let mut specs: Vec<PortSpec> = entries.iter().map(|e| e.spec.clone()).collect();
    specs.extend(extra.iter().cloned());
    let (_, refused) = PortMap::from_specs(0, specs.clone());
    let Some((i, e)) = refused.into_iter().next() else {
        return Ok(specs);
    };
    // As the user wrote it: the file's entries as they stand in it.
    let written = |i: usize| match (entries.get(i), specs.get(i)) {
        (Some(entry), _) => format!("`{}`", entry.written),
        (None, Some(spec)) => format!("`-p {spec}`"),
        (None, None) => String::new(),
    };
    let line_of = |i: usize| entries.get(i).map(|e| e.line);
    let last_line = entries.last().map_or(1, |e| e.line);
    let (line, reason) = match (&e, line_of(i)) {
        // The earlier of two overlapping entries is never the one refused,
        // so a file entry overlaps one of the file's.
        (PortSpecError::OverlapsEntry { key, entry }, Some(line)) => (
            line,
            format!(
                "{} overlaps {key} on line {}: drop or narrow one of them",
                written(i),
                line_of(*entry).unwrap_or(0)
            ),
        ),
        // A `-p` entry that overlaps one of the file's: that line.
        (PortSpecError::OverlapsEntry { key, entry }, None) => (
            line_of(*entry).unwrap_or(last_line),
            format!("{} overlaps {key} here: drop one of them", written(i)),
        ),
        (PortSpecError::MapFull, None) => (
            last_line,
            format!(
                "the file's {in_file} entries leave no room for {}: {e}",
                written(i)
            ),
        ),
        (other, line) => (
            line.unwrap_or(last_line),
            format!("{}: {other}", written(i)),
        ),
    };
    Err(ConfigError {
        path: path.display().to_string(),
        line,
        reason,
    })
}

/// One entry of a config file.
struct Entry {
    line: usize,
    /// As it stands in the file.
    written: String,
    spec: PortSpec,
}

/// Each entry of a config file, with the line it is on.
fn parse_entries(path: &Path, text: &str) -> Result<Vec<Entry>, ConfigError> {
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
            let line = line_of(entry.span().start);
            let written = entry.get_ref().clone();
            let spec = written
                .parse::<PortSpec>()
                .map_err(|e| error(line, format!("`{written}`: {e}")))?;
            Ok(Entry {
                line,
                written,
                spec,
            })
        })
        .collect()
}

/// The config file `connect` follows when none is named: `NAME.toml` in
/// `dir`, if it exists. One behind a link to nothing, or in a directory
/// this user may not enter, is an error: starting without it would serve
/// no ports and say nothing.
pub fn default_file(dir: &Path, name: &skerry::paths::EdgeName) -> anyhow::Result<Option<PathBuf>> {
    let path = dir.join(format!("{name}.toml"));
    match path.try_exists() {
        Ok(true) => Ok(Some(path)),
        // A link to nothing (yet) is a file the user meant.
        Ok(false) if path.is_symlink() => anyhow::bail!(
            "the config file {} is a link to a file that does not exist; fix the link, or name \
             one with --config",
            path.display()
        ),
        Ok(false) => Ok(None),
        Err(e) => anyhow::bail!(
            "cannot tell whether the config file {} exists: {e}; make it (and where it links \
             to) readable, or name one with --config",
            path.display()
        ),
    }
}

/// The file's text, through any symbolic links.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.display().to_string(),
        line: 0,
        reason: e.to_string(),
    })
}

/// Follows `path` until `shutdown`: each saved version replaces the map,
/// with `extra` (the `-p` entries of the command line) added. `loaded` is
/// the text the running map came from.
///
/// A save that leaves the text as it was changes nothing (a `touch`, a
/// sync tool rewriting the file), so it does not drop what `ports add|rm`
/// changed since. A file that is a symbolic link is followed where it
/// points too: a dotfile manager's link to another directory, or a
/// Kubernetes ConfigMap volume, whose update swaps a `..data` link beside
/// the file's own.
pub async fn follow(
    path: PathBuf,
    extra: Vec<PortSpec>,
    loaded: Option<String>,
    controller: Arc<Controller>,
    status: watch::Sender<HomeStatus>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel::<()>(16);
    // Any change in the watched directories: which of their entries the
    // file's text hangs on (links, `..data`) is not worth tracking, as
    // reading it again is cheap and an unchanged text is passed over. A
    // rescan (the kernel's event queue overflowed) counts too.
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !matches!(event.kind, EventKind::Access(_)) {
            let _ = tx.try_send(());
        }
    })?;
    // Directories, not the file: editors replace files by rename. The
    // file's own must be watched; where a link leads is followed as far as
    // it can be (a directory may be gone, or not ours to watch).
    watcher.watch(&dir_of(&path), RecursiveMode::NonRecursive)?;
    let mut elsewhere = None;
    follow_link(&path, &mut watcher, &mut elsewhere);
    let mut last = loaded.map(|text| Acted { text, error: None });
    // A save made since `connect` read the file (building a droplet takes
    // minutes) raised no event here.
    reload(&path, &extra, &mut last, &controller, &status).await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            got = rx.recv() => if got.is_none() { break },
        }
        // Let the editor finish: wait until the directories are quiet (a
        // busy one is read after a few seconds all the same).
        for _ in 0..20 {
            tokio::time::sleep(SETTLE).await;
            if rx.try_recv().is_err() {
                break;
            }
            while rx.try_recv().is_ok() {}
        }
        // Watched first: an edit where the link now leads, made while
        // this reads, is not missed.
        follow_link(&path, &mut watcher, &mut elsewhere);
        reload(&path, &extra, &mut last, &controller, &status).await;
    }
    drop(watcher);
    Ok(())
}

/// Watches the directory `path` leads to now, if that is not its own (a
/// link may have been pointed elsewhere since), and no longer the one it
/// left. A file gone for now (removed, to be put back) keeps the watch it
/// had: its return is an event there.
fn follow_link(path: &Path, watcher: &mut impl Watcher, watched: &mut Option<PathBuf>) {
    let Ok(real) = std::fs::canonicalize(path) else {
        return;
    };
    let real_dir = dir_of(&real);
    let now =
        (std::fs::canonicalize(dir_of(path)).ok().as_ref() != Some(&real_dir)).then_some(real_dir);
    if now == *watched {
        return;
    }
    if let Some(gone) = watched.take() {
        let _ = watcher.unwatch(&gone);
    }
    if let Some(dir) = now {
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => *watched = Some(dir),
            Err(e) => warn!(
                dir = %dir.display(),
                error = %e,
                "cannot follow where the config file's link leads; edits there are seen at the next change beside the link"
            ),
        }
    }
}

/// The text last read and what came of it, so that the same text again is
/// passed over, and its outcome shown again.
struct Acted {
    text: String,
    /// Why it was refused, if it was.
    error: Option<String>,
}

fn dir_of(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Applies the file if its text is not the one last acted on.
async fn reload(
    path: &Path,
    extra: &[PortSpec],
    last: &mut Option<Acted>,
    controller: &Controller,
    status: &watch::Sender<HomeStatus>,
) {
    let text = match read_text(path) {
        Ok(text) => text,
        Err(e) => {
            // Gone or unreadable for now: the running map stays, and the
            // same text back changes nothing either.
            warn!(error = %e, "config file unreadable; the running map is unchanged");
            show_error(status, Some(e.to_string()));
            return;
        }
    };
    if let Some(acted) = last.as_ref().filter(|a| a.text == text) {
        show_error(status, acted.error.clone());
        return;
    }
    let outcome = match parse_map(path, &text, extra) {
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
    let error = match outcome {
        Ok(report) => {
            info!(file = %path.display(), generation = report.generation, "config file applied");
            for e in report.entries.iter().filter(|e| !e.ok) {
                warn!(entry = %e.input, reason = %e.message, "edge refused an entry of the config file");
            }
            None
        }
        Err(e) => {
            warn!(error = %e, "config file refused; the running map is unchanged");
            Some(e.to_string())
        }
    };
    show_error(status, error.clone());
    *last = Some(Acted { text, error });
}

/// Puts the file's error (or none) in `status`, waking its readers only
/// when that changes.
fn show_error(status: &watch::Sender<HomeStatus>, error: Option<String>) {
    status.send_if_modified(|s| {
        let changed = s.config_error != error;
        s.config_error = error;
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Request;
    use skerry::portmap::{PortMap, Protocol};

    /// `connect` without --config takes NAME.toml when it exists; one it
    /// cannot look at is an error, not a start with no ports.
    #[test]
    fn the_default_file_is_taken_when_it_exists_and_an_unreadable_one_is_an_error() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let name: skerry::paths::EdgeName = "home".parse().expect("a name");
        assert_eq!(default_file(dir.path(), &name).expect("no error"), None);
        let path = dir.path().join("home.toml");
        std::fs::write(&path, ports(&[80])).expect("writing");
        assert_eq!(
            default_file(dir.path(), &name).expect("no error"),
            Some(path.clone())
        );
        // A link to nothing.
        std::fs::remove_file(&path).expect("removing");
        std::os::unix::fs::symlink(dir.path().join("gone.toml"), &path).expect("a link");
        let err = default_file(dir.path(), &name).expect_err("a dangling link was ignored");
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        // A link that cannot be resolved (here a loop; for root without
        // CAP_DAC_OVERRIDE, a target in a home directory of mode 0700).
        std::fs::remove_file(&path).expect("removing");
        std::os::unix::fs::symlink(dir.path().join("loop.toml"), &path).expect("a link");
        std::os::unix::fs::symlink(&path, dir.path().join("loop.toml")).expect("a link");
        let err = default_file(dir.path(), &name).expect_err("an unresolvable file was ignored");
        assert!(format!("{err:#}").contains("--config"), "{err:#}");
    }

    fn ports(list: &[u16]) -> String {
        let entries: Vec<String> = list
            .iter()
            .map(|p| format!("  \"tcp/{p}=127.0.0.1:{p}\",\n"))
            .collect();
        format!("ports = [\n{}]\n", entries.concat())
    }

    /// `follow` of `path` as `connect` starts it, from the text `loaded`; the
    /// edge is not connected, so every change is taken at once.
    struct Following {
        map: watch::Receiver<skerry::portmap::PortMap>,
        status: watch::Receiver<HomeStatus>,
        controller: Arc<Controller>,
        stop: CancellationToken,
    }

    impl Following {
        fn start(path: &Path, loaded: &str) -> Following {
            let specs = parse_map(path, loaded, &[]).expect("a valid file");
            let (map, refused) = PortMap::from_specs(1, specs);
            assert!(refused.is_empty());
            let (controller, map_rx, status_tx) = Controller::for_test(map, Some(path.to_owned()));
            let controller = Arc::new(controller);
            let stop = CancellationToken::new();
            let status = status_tx.subscribe();
            tokio::spawn(follow(
                path.to_owned(),
                Vec::new(),
                Some(loaded.to_owned()),
                controller.clone(),
                status_tx,
                stop.clone(),
            ));
            Following {
                map: map_rx,
                status,
                controller,
                stop,
            }
        }

        /// Waits until the map serves TCP `port`; returns its generation.
        async fn serves(&mut self, port: u16) -> u64 {
            let wait = self
                .map
                .wait_for(|m| m.lookup(Protocol::Tcp, port).is_some());
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .unwrap_or_else(|_| panic!("the file's port {port} was never applied"))
                .expect("the map")
                .generation()
        }
    }

    impl Drop for Following {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    #[tokio::test]
    async fn a_save_made_before_following_started_is_applied() {
        let dir = tempfile::tempdir().expect("a scratch dir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, ports(&[9001])).expect("the file");
        // `connect` read the first version, then built a droplet for minutes.
        let mut following = Following::start(&path, &ports(&[9000]));
        following.serves(9001).await;
    }

    #[tokio::test]
    async fn rewriting_the_same_text_keeps_ports_add_changes() {
        let dir = tempfile::tempdir().expect("a scratch dir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, ports(&[9000])).expect("the file");
        let mut following = Following::start(&path, &ports(&[9000]));
        tokio::time::sleep(SETTLE).await;
        following
            .controller
            .handle(Request::Add {
                specs: vec!["tcp/9100=127.0.0.1:9100".into()],
            })
            .await;
        assert_eq!(following.serves(9100).await, 2);
        // A touch, a sync tool writing the file anew: nothing to apply.
        std::fs::write(&path, ports(&[9000])).expect("the file");
        tokio::time::sleep(SETTLE * 5).await;
        assert!(
            following.map.borrow().lookup(Protocol::Tcp, 9100).is_some(),
            "rewriting the file unchanged dropped the port `ports add` opened"
        );
        // A real edit is applied, as the next generation.
        std::fs::write(&path, ports(&[9000, 9001])).expect("the file");
        assert_eq!(following.serves(9001).await, 3);
    }

    /// Until it is back, a file that went away is reported in `status`.
    #[tokio::test]
    async fn a_file_removed_and_put_back_as_it_was_is_reported_then_fine() {
        let dir = tempfile::tempdir().expect("a scratch dir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, ports(&[9000])).expect("the file");
        let following = Following::start(&path, &ports(&[9000]));
        tokio::time::sleep(SETTLE).await;
        let error = |want: bool| {
            let mut status = following.status.clone();
            async move {
                let wait = status.wait_for(|s| s.config_error.is_some() == want);
                tokio::time::timeout(Duration::from_secs(10), wait)
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
        };
        std::fs::remove_file(&path).expect("remove");
        assert!(error(true).await, "the missing file was not reported");
        std::fs::write(&path, ports(&[9000])).expect("the file");
        assert!(
            error(false).await,
            "the error stayed with the file back as it was"
        );
        assert_eq!(following.map.borrow().generation(), 1, "nothing to apply");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_file_linked_from_elsewhere_is_followed_where_it_lives() {
        let dir = tempfile::tempdir().expect("a scratch dir");
        let (config, dotfiles) = (dir.path().join("config"), dir.path().join("dotfiles"));
        std::fs::create_dir(&config).expect("dir");
        std::fs::create_dir(&dotfiles).expect("dir");
        let real = dotfiles.join("edge.toml");
        std::fs::write(&real, ports(&[9000])).expect("the file");
        let path = config.join("edge.toml");
        std::os::unix::fs::symlink(&real, &path).expect("the link");
        let mut following = Following::start(&path, &ports(&[9000]));
        // Edited where it lives, as a dotfile manager's user does.
        tokio::time::sleep(SETTLE).await;
        std::fs::write(&real, ports(&[9000, 9001])).expect("the file");
        following.serves(9001).await;
        // Removed where it lives and put back a while later (a dotfile
        // tool, a checkout): still followed there.
        std::fs::remove_file(&real).expect("remove");
        let mut status = following.status.clone();
        let reported = status.wait_for(|s| s.config_error.is_some());
        tokio::time::timeout(Duration::from_secs(10), reported)
            .await
            .expect("the missing file reported")
            .expect("status");
        std::fs::write(&real, ports(&[9000, 9002])).expect("the file");
        following.serves(9002).await;
    }

    /// A ConfigMap volume: `edge.toml -> ..data/edge.toml`, `..data -> ..v1`;
    /// an update writes `..v2` and swaps `..data` by rename.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_kubernetes_configmap_update_is_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().expect("a scratch dir");
        let volume = dir.path();
        for (version, list) in [("..v1", &[9000][..]), ("..v2", &[9000, 9001])] {
            std::fs::create_dir(volume.join(version)).expect("dir");
            std::fs::write(volume.join(version).join("edge.toml"), ports(list)).expect("file");
        }
        symlink("..v1", volume.join("..data")).expect("link");
        symlink("..data/edge.toml", volume.join("edge.toml")).expect("link");
        let mut following = Following::start(&volume.join("edge.toml"), &ports(&[9000]));
        tokio::time::sleep(SETTLE).await;
        symlink("..v2", volume.join("..data_tmp")).expect("link");
        std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).expect("swap");
        following.serves(9001).await;
    }

    #[test]
    fn entries_that_cannot_join_are_named_by_their_line() {
        let p = Path::new("x.toml");
        let text = "ports = [\n  \"tcp/80=127.0.0.1:8080\",\n  \"udp/53=127.0.0.1:53\",\n  \"tcp/70-90=127.0.0.1:7000\",\n]\n";
        let e = parse_map(p, text, &[]).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.reason.contains("overlaps tcp/80 on line 2"), "{e}");
        assert!(e.reason.starts_with("`tcp/70-90=127.0.0.1:7000`"), "{e}");
        let one = "ports = [\n  \"tcp/80=127.0.0.1:8080\",\n]\n";
        let dash_p: PortSpec = "tcp/80=127.0.0.1:9090".parse().unwrap();
        let e = parse_map(p, one, &[dash_p]).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(
            e.reason
                .contains("`-p tcp/80=127.0.0.1:9090` overlaps tcp/80"),
            "{e}"
        );
        let udp: PortSpec = "udp/80=127.0.0.1:80".parse().unwrap();
        assert_eq!(parse_map(p, one, &[udp]).unwrap().len(), 2);
    }

    #[test]
    fn parses_ports_and_names_the_bad_line() {
        let parse = |text| parse_map(Path::new("x.toml"), text, &[]);
        let ok =
            parse("ports = [\n  \"tcp/80=127.0.0.1:8080\",\n  \"udp/53=[::1]:53\",\n]\n").unwrap();
        assert_eq!(ok.len(), 2);
        let e = parse("ports = [\n  \"tcp/80=127.0.0.1:8080\",\n  \"tcp/0=127.0.0.1:1\",\n]\n")
            .unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("port 0"), "{e}");
        let e = parse("ports = [\n\"tcp/80=127.0.0.1:8080\"\n").unwrap_err();
        assert!(e.line >= 2, "{e}");
        let e = parse("port = []\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.reason.contains("unknown field"), "{e}");
        assert!(parse("").unwrap().is_empty());
    }
}
