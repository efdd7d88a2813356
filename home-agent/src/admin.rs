//! The local admin socket: how `home-agent ports …` and `home-agent status`
//! talk to a running agent.
//!
//! One JSON request per connection, one JSON answer, each a single line, on
//! a unix socket only its owner can open (mode 0600 in a 0700 directory).
//! Changes go through the [`Controller`], which is also what the config
//! file watcher uses, so every path that changes the map answers the same
//! way: per entry, with the edge's own answer.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skerry::paths::StateLock;
use skerry::portmap::{PortKey, PortMap, PortSpec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::HomeStatus;

/// Longest request accepted: a few thousand specs.
const MAX_REQUEST: u64 = 1 << 20;
/// How long a change waits for the edge's answer.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    List,
    Add { specs: Vec<String> },
    Remove { keys: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Response {
    Status(StatusReport),
    Ports { ports: Vec<PortReport> },
    Changed(ChangeReport),
    Error { message: String },
}

/// One port of the running map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortReport {
    pub key: String,
    pub spec: String,
    /// The edge's answer: `listening`, or why not; `pending` before it answered.
    pub state: String,
    pub ok: bool,
    pub open_flows: usize,
}

/// The answer to one entry of `ports add` or `ports rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryReport {
    pub input: String,
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeReport {
    pub generation: u64,
    pub entries: Vec<EntryReport>,
    /// Something the user should know about the change as a whole.
    pub note: Option<String>,
}

impl ChangeReport {
    pub fn all_ok(&self) -> bool {
        self.entries.iter().all(|e| e.ok)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub name: String,
    pub edge: String,
    pub connected: bool,
    pub public_addrs: Vec<String>,
    pub tunnel_up: bool,
    /// The tunnel's addresses as the edge announced them, once it has:
    /// `home ↔ edge/prefix`. Absent in an older agent's report.
    #[serde(default)]
    pub tunnel_addrs: Option<String>,
    pub last_handshake_secs: Option<f64>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub generation: u64,
    pub ports: Vec<PortReport>,
    pub last_error: Option<String>,
    pub config_file: Option<String>,
    pub config_error: Option<String>,
}

/// Changes the running port map and reports on it.
#[derive(Debug)]
pub struct Controller {
    name: String,
    edge: SocketAddr,
    map: watch::Sender<PortMap>,
    status: watch::Receiver<HomeStatus>,
    /// One change at a time, so answers match the change that asked.
    edits: Mutex<()>,
    pub config_file: Option<PathBuf>,
}

impl Controller {
    pub fn new(
        name: String,
        edge: SocketAddr,
        map: watch::Sender<PortMap>,
        status: watch::Receiver<HomeStatus>,
        config_file: Option<PathBuf>,
    ) -> Self {
        Controller {
            name,
            edge,
            map,
            status,
            edits: Mutex::new(()),
            config_file,
        }
    }

    /// A controller of `map` with no edge behind it, as tests drive one:
    /// also the map's receiver and the status's sender.
    #[cfg(test)]
    pub(crate) fn for_test(
        map: PortMap,
        config_file: Option<PathBuf>,
    ) -> (
        Controller,
        watch::Receiver<PortMap>,
        watch::Sender<HomeStatus>,
    ) {
        let (map_tx, map_rx) = watch::channel(map);
        let (status_tx, status_rx) = watch::channel(HomeStatus::default());
        let edge = SocketAddr::from(([127, 0, 0, 1], 7443));
        let controller = Controller::new("test".into(), edge, map_tx, status_rx, config_file);
        (controller, map_rx, status_tx)
    }

    pub fn map(&self) -> PortMap {
        self.map.borrow().clone()
    }

    pub async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => Response::Status(self.status_report()),
            Request::List => Response::Ports {
                ports: self.port_reports(),
            },
            Request::Add { specs } => Response::Changed(self.add(&specs).await),
            Request::Remove { keys } => Response::Changed(self.remove(&keys).await),
        }
    }

    /// Adds or retargets entries; each bad one is refused alone.
    pub async fn add(&self, specs: &[String]) -> ChangeReport {
        let _edit = self.edits.lock().await;
        let mut map = self.map();
        let mut entries = Vec::new();
        let mut applied_keys = Vec::new();
        for input in specs {
            let result = input
                .parse::<PortSpec>()
                .and_then(|spec| map.insert(spec.clone()).map(|m| (m, spec.key())));
            match result {
                Ok((next, key)) => {
                    map = next;
                    applied_keys.push((entries.len(), key));
                    entries.push(EntryReport {
                        input: input.clone(),
                        ok: true,
                        message: String::new(),
                    });
                }
                Err(e) => entries.push(EntryReport {
                    input: input.clone(),
                    ok: false,
                    message: e.to_string(),
                }),
            }
        }
        // Sent, it would fail every session: the change is refused whole.
        // (Only an addition can make the map larger; `replace` checks too.)
        if let Err(e) = skerry::protocol::check_map_size(&map.public()) {
            for entry in entries.iter_mut().filter(|e| e.ok) {
                entry.ok = false;
                entry.message = format!("not applied: {e}");
            }
            return ChangeReport {
                generation: self.map.borrow().generation(),
                entries,
                note: None,
            };
        }
        self.commit(map, entries, applied_keys, "listening").await
    }

    pub async fn remove(&self, keys: &[String]) -> ChangeReport {
        let _edit = self.edits.lock().await;
        let mut map = self.map();
        let mut entries = Vec::new();
        for input in keys {
            let result = input.parse::<PortKey>().and_then(|k| map.remove(&k));
            match result {
                Ok(next) => {
                    map = next;
                    entries.push(EntryReport {
                        input: input.clone(),
                        ok: true,
                        message: "removed; open flows drain".into(),
                    });
                }
                Err(e) => entries.push(EntryReport {
                    input: input.clone(),
                    ok: false,
                    message: e.to_string(),
                }),
            }
        }
        self.commit(map, entries, Vec::new(), "").await
    }

    /// Replaces the whole map (the config file changed).
    pub async fn replace(&self, specs: Vec<PortSpec>) -> Result<ChangeReport, String> {
        let _edit = self.edits.lock().await;
        let next_generation = self.map.borrow().generation() + 1;
        let (map, refused) = PortMap::from_specs(next_generation, specs.clone());
        if let Some((i, e)) = refused.first() {
            return Err(format!("entry {}: {e}", i + 1));
        }
        skerry::protocol::check_map_size(&map.public()).map_err(|e| e.to_string())?;
        let keys = map
            .specs()
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.key()))
            .collect();
        let entries = specs
            .iter()
            .map(|s| EntryReport {
                input: s.to_string(),
                ok: true,
                message: String::new(),
            })
            .collect();
        Ok(self.commit(map, entries, keys, "listening").await)
    }

    /// Sends the map and fills in the edge's answers for `keys`.
    async fn commit(
        &self,
        map: PortMap,
        mut entries: Vec<EntryReport>,
        keys: Vec<(usize, PortKey)>,
        ok_message: &str,
    ) -> ChangeReport {
        let generation = map.generation();
        if generation == self.map.borrow().generation() {
            return ChangeReport {
                generation,
                entries,
                note: None,
            };
        }
        self.map.send_replace(map);
        let mut note = None;
        let mut status = self.status.clone();
        let connected = status.borrow().connected;
        let applied = if connected {
            tokio::time::timeout(
                APPLY_TIMEOUT,
                status.wait_for(|s| {
                    s.applied
                        .as_ref()
                        .is_some_and(|a| a.generation >= generation)
                }),
            )
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.applied.clone()))
        } else {
            None
        };
        match applied {
            Some(a) => {
                for (i, key) in keys {
                    let answer = a.results.iter().find(|r| r.key == key);
                    if let (Some(entry), Some(answer)) = (entries.get_mut(i), answer) {
                        entry.ok = answer.status.is_ok();
                        entry.message = if entry.ok {
                            ok_message.to_owned()
                        } else {
                            answer.status.to_string()
                        };
                    }
                }
            }
            None => {
                note = Some(
                    "the edge is not connected: the change is kept and sent when it reconnects"
                        .into(),
                );
                for (i, _) in keys {
                    if let Some(entry) = entries.get_mut(i) {
                        entry.message = "pending".into();
                    }
                }
            }
        }
        if self.config_file.is_some() {
            let n = note.get_or_insert_with(String::new);
            if !n.is_empty() {
                n.push_str("; ");
            }
            n.push_str(
                "this agent follows a config file: the next edit of that file replaces this change",
            );
        }
        ChangeReport {
            generation,
            entries,
            note,
        }
    }

    pub fn port_reports(&self) -> Vec<PortReport> {
        let map = self.map();
        let status = self.status.borrow();
        let flows = status
            .forwarding
            .as_ref()
            .map(|f| f.open_flows())
            .unwrap_or_default();
        map.specs()
            .iter()
            .map(|spec| {
                let key = spec.key();
                let answer = status
                    .applied
                    .as_ref()
                    .filter(|a| a.generation == map.generation())
                    .and_then(|a| a.results.iter().find(|r| r.key == key));
                let open_flows = key
                    .ports
                    .iter()
                    .map(|p| flows.get(&(key.protocol, p)).copied().unwrap_or(0))
                    .sum();
                PortReport {
                    key: key.to_string(),
                    spec: spec.to_string(),
                    state: answer.map_or_else(|| "pending".to_owned(), |a| a.status.to_string()),
                    ok: answer.is_some_and(|a| a.status.is_ok()),
                    open_flows,
                }
            })
            .collect()
    }

    pub fn status_report(&self) -> StatusReport {
        let ports = self.port_reports();
        let s = self.status.borrow();
        let stats = s.tunnel_handle.as_ref().map(|t| t.stats());
        StatusReport {
            name: self.name.clone(),
            edge: self.edge.to_string(),
            connected: s.connected,
            public_addrs: s
                .edge_public_addrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            tunnel_up: stats.as_ref().is_some_and(|t| t.last_handshake.is_some()),
            tunnel_addrs: (s.sessions > 0).then(|| s.tunnel.to_string()),
            last_handshake_secs: stats
                .as_ref()
                .and_then(|t| t.last_handshake)
                .map(|t| t.elapsed().as_secs_f64()),
            tx_bytes: stats.as_ref().map_or(0, |t| t.tx_bytes),
            rx_bytes: stats.as_ref().map_or(0, |t| t.rx_bytes),
            generation: self.map.borrow().generation(),
            ports,
            last_error: s.last_error.clone(),
            config_file: self.config_file.as_ref().map(|p| p.display().to_string()),
            config_error: s.config_error.clone(),
        }
    }
}

/// The admin socket, bound when `connect` starts, with a lock beside it
/// (`NAME.sock.lock`), both held until this value is dropped at the agent's
/// very end (which removes the socket, the locks still held).
///
/// Agents of one name with different state directories (the service's in
/// /var/lib, one started by hand with sudo) share the socket path, or as
/// root /run/skerry's lock: the second is refused before it makes or dials
/// anything.
#[derive(Debug)]
pub struct AdminSocket {
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
    _locks: Vec<StateLock>,
}

impl AdminSocket {
    /// Locks `path` and each of `also` (root's system-wide socket when
    /// this agent listens elsewhere: one agent per name for root), then
    /// binds `path`, replacing a socket an agent that died left there.
    pub fn claim(path: PathBuf, also: &[PathBuf]) -> Result<AdminSocket, ClaimError> {
        let mut locks = Vec::new();
        for p in std::iter::once(&path).chain(also) {
            locks.push(StateLock::acquire_file(skerry::paths::socket_lock(p))?);
        }
        // The lock is held: a socket file here is stale.
        let bind = || -> std::io::Result<std::os::unix::net::UnixListener> {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let listener = std::os::unix::net::UnixListener::bind(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        };
        let listener = bind().map_err(|source| ClaimError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(AdminSocket {
            listener: Some(listener),
            path,
            _locks: locks,
        })
    }

    /// The listener, for [`serve`] (once; on a runtime).
    pub fn take_listener(&mut self) -> std::io::Result<UnixListener> {
        let listener = self.listener.take().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "the listener was taken")
        })?;
        UnixListener::from_std(listener)
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        // Ours while the locks are held (they go after this).
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Lock(#[from] skerry::paths::PathsError),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Serves the admin socket's `listener` until `shutdown` (its
/// [`AdminSocket`] removes the file).
pub async fn serve(
    listener: UnixListener,
    controller: Arc<Controller>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let controller = controller.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &controller).await {
                debug!(error = %e, "admin request failed");
            }
        });
    }
    Ok(())
}

async fn serve_one(stream: UnixStream, controller: &Controller) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => controller.handle(req).await,
        Err(e) => Response::Error {
            message: format!("malformed request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// How long a command waits for the agent's answer: the agent waits up to
/// [`APPLY_TIMEOUT`] for the edge's, and a change may queue behind another
/// (a config file's, another command's) that waits as long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one request to the agent listening at `path`.
pub async fn request(path: &Path, req: &Request) -> anyhow::Result<Response> {
    tokio::time::timeout(ANSWER_TIMEOUT, exchange(path, req))
        .await
        .unwrap_or_else(|_| {
            anyhow::bail!(
                "the home-agent at {} did not answer within {} s; a change may still be applied \
                 (check with `home-agent ports list`), and its log (its terminal, or journalctl) \
                 says what holds it up",
                path.display(),
                ANSWER_TIMEOUT.as_secs()
            )
        })
}

async fn exchange(path: &Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "no home-agent is running for this name (nothing at {}): start one with `home-agent connect`",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut body = serde_json::to_vec(req)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    write.shutdown().await?;
    let mut line = String::new();
    BufReader::new(read.take(64 << 20))
        .read_line(&mut line)
        .await?;
    serde_json::from_str(&line).context("malformed answer from the home-agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that would make the map too large to send to the edge is
    /// refused whole, and the running map stays: sent, it would fail every
    /// session, every port with it.
    #[tokio::test]
    async fn a_change_too_large_to_send_is_refused_and_changes_nothing() {
        let (map, refused) =
            PortMap::from_specs(1, vec!["tcp/80=127.0.0.1:80".parse().expect("a spec")]);
        assert!(refused.is_empty());
        let (controller, map_rx, _status_tx) = Controller::for_test(map, None);
        // 200,000 prefixes in one allow list: over 1 MiB.
        let allow: Vec<String> = (0..200_000u32)
            .map(|i| format!("10.{}.{}.0/24", i >> 8 & 0xff, i & 0xff))
            .collect();
        let huge = format!("tcp/443=127.0.0.1:443,allow={}", allow.join(","));
        let report = controller
            .add(&[huge, "tcp/8080=127.0.0.1:8080".into()])
            .await;
        assert!(
            report.entries.iter().all(|e| !e.ok),
            "{:?}",
            report
                .entries
                .iter()
                .map(|e| &e.message)
                .collect::<Vec<_>>()
        );
        assert!(
            report.entries[0]
                .message
                .contains("more than the control channel's"),
            "{}",
            report.entries[0].message
        );
        assert_eq!(report.generation, 1);
        assert_eq!(map_rx.borrow().generation(), 1, "the map was sent");
        assert!(
            controller.replace(vec![]).await.is_ok(),
            "a small map still goes"
        );
    }

    /// Two agents of one name with different state directories (the
    /// service's, one started by hand) share the socket path: the second is
    /// refused, the first keeps its socket; one an agent that died left is
    /// taken.
    #[tokio::test]
    async fn a_second_agent_of_a_name_is_refused_and_a_dead_ones_socket_is_taken() {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let path = dir.path().join("edge.sock");
        let system = dir.path().join("system.sock");
        let (controller, _map_rx, _status_tx) = Controller::for_test(PortMap::default(), None);
        let controller = Arc::new(controller);
        let first = AdminSocket::claim(path.clone(), std::slice::from_ref(&system))
            .expect("the first agent's socket");
        for (p, what) in [
            (&path, "its own socket"),
            (&system, "the system socket it locks too"),
        ] {
            match AdminSocket::claim(p.clone(), &[]) {
                Err(ClaimError::Lock(skerry::paths::PathsError::Locked { pid, .. })) => {
                    assert_eq!(pid, Some(std::process::id()), "{what}")
                }
                other => panic!("a second agent on {what}: {other:?}"),
            }
        }
        assert!(path.exists(), "the first agent's socket was removed");

        // The first agent's end removes its socket; one that died (killed)
        // leaves a stale file.
        drop(first);
        assert!(!path.exists(), "the first agent's socket outlived it");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("a stale socket"));
        assert!(path.exists());
        let mut second = AdminSocket::claim(path.clone(), &[]).expect("a dead agent's socket");
        let stop = CancellationToken::new();
        let listener = second.take_listener().expect("the listener");
        let serving = tokio::spawn(serve(listener, controller, stop.clone()));
        let response = request(&path, &Request::List).await;
        assert!(response.is_ok(), "{response:?}");
        stop.cancel();
        serving
            .await
            .expect("serve panicked")
            .expect("serve failed");
        assert!(path.exists(), "removed while the agent still runs");
        drop(second);
        assert!(!path.exists(), "the socket outlived its agent");
        AdminSocket::claim(path.clone(), &[]).expect("the name is free again");
    }

    #[test]
    fn requests_round_trip_as_json() {
        for req in [
            Request::Status,
            Request::List,
            Request::Add {
                specs: vec!["tcp/80=127.0.0.1:8080".into()],
            },
            Request::Remove {
                keys: vec!["tcp/80".into()],
            },
        ] {
            let text = serde_json::to_string(&req).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
        }
        assert!(serde_json::from_str::<Request>(r#"{"op":"add","specs":[],"x":1}"#).is_err());
    }
}
