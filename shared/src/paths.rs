//! Where skerry keeps things, and the lock that keeps one agent per edge.
//!
//! - state (PKI, the edge's record): `$XDG_STATE_HOME/skerry/<name>/`,
//!   else `$HOME/.local/state/skerry/<name>/`;
//! - configuration: `$XDG_CONFIG_HOME/skerry/`, else `$HOME/.config/skerry/`;
//! - the local admin socket: `$XDG_RUNTIME_DIR/skerry/<name>.sock`, else
//!   `/run/skerry/<name>.sock` for root, else `$TMPDIR/skerry-<uid>/<name>.sock`
//!   in a directory we create, own and keep at 0700.
//!
//! Per the XDG Base Directory spec, a relative `XDG_*` value is ignored.
//! The choice of path is a pure function of the environment values, so the
//! tests pass them in instead of changing the process environment.
//!
//! This module also owns the two file primitives that keep secrets private:
//! [`ensure_private_dir`] and [`write_atomic`].

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The longest edge name, so that `skerry-<name>` stays a short droplet name.
pub const MAX_EDGE_NAME_LEN: usize = 31;

/// The longest socket path the kernel accepts (`sun_path` is 108 bytes,
/// one of which ends the string).
const MAX_SOCKET_PATH_LEN: usize = 107;

/// An edge's name: `[a-z0-9][a-z0-9-]{0,30}`.
///
/// Also a valid DigitalOcean droplet name suffix, and safe as a file name.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct EdgeName(String);

impl EdgeName {
    fn validate(name: &str) -> Result<(), &'static str> {
        let bytes = name.as_bytes();
        match bytes.first() {
            None => return Err("it is empty"),
            Some(b) if !(b.is_ascii_lowercase() || b.is_ascii_digit()) => {
                return Err("it must start with a lowercase letter or a digit");
            }
            Some(_) => {}
        }
        if bytes.len() > MAX_EDGE_NAME_LEN {
            return Err("it is longer than 31 characters");
        }
        if !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        {
            return Err("it may only hold lowercase letters, digits and '-'");
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for EdgeName {
    fn default() -> Self {
        EdgeName("default".to_owned())
    }
}

impl FromStr for EdgeName {
    type Err = PathsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EdgeName::try_from(s.to_owned())
    }
}

impl TryFrom<String> for EdgeName {
    type Error = PathsError;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        match EdgeName::validate(&name) {
            Ok(()) => Ok(EdgeName(name)),
            Err(reason) => Err(PathsError::EdgeName { name, reason }),
        }
    }
}

impl From<EdgeName> for String {
    fn from(name: EdgeName) -> String {
        name.0
    }
}

impl fmt::Display for EdgeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for EdgeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Why a location cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(
        "invalid edge name {name:?}: {reason}; use 1 to 31 lowercase letters, digits and '-', \
         starting with a letter or digit"
    )]
    EdgeName { name: String, reason: &'static str },
    #[error("neither ${var} nor $HOME is set to an absolute path; set HOME (or {var})")]
    NoHome { var: &'static str },
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not safe to use: {reason}; remove it, or set XDG_RUNTIME_DIR")]
    UnsafeDir { path: PathBuf, reason: String },
    #[error(
        "socket path {path} is longer than {MAX_SOCKET_PATH_LEN} bytes; set XDG_RUNTIME_DIR or \
         TMPDIR to a shorter directory"
    )]
    SocketPathTooLong { path: PathBuf },
    #[error(
        "another home-agent{} is already running for this edge (it holds {path}); stop it or use --name",
        pid_note(.pid)
    )]
    Locked { path: PathBuf, pid: Option<u32> },
}

impl PathsError {
    /// The lock file another agent holds, for a [`PathsError::Locked`].
    pub fn locked_path(&self) -> Option<&Path> {
        match self {
            PathsError::Locked { path, .. } => Some(path),
            _ => None,
        }
    }
}

fn pid_note(pid: &Option<u32>) -> String {
    pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

impl PathsError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> PathsError + '_ {
        move |source| PathsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// `$XDG_STATE_HOME/skerry/<name>/`, or `$HOME/.local/state/skerry/<name>/`.
pub fn state_dir(name: &EdgeName) -> Result<PathBuf, PathsError> {
    state_dir_from(
        std::env::var_os("XDG_STATE_HOME").as_deref(),
        std::env::var_os("HOME").as_deref(),
        name,
    )
}

/// `$XDG_CONFIG_HOME/skerry/`, or `$HOME/.config/skerry/`.
pub fn config_dir() -> Result<PathBuf, PathsError> {
    config_dir_from(
        std::env::var_os("XDG_CONFIG_HOME").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
}

/// The local admin socket of the agent that drives edge `name`.
///
/// `$XDG_RUNTIME_DIR/skerry/<name>.sock`; when `XDG_RUNTIME_DIR` is unset,
/// `/run/skerry/<name>.sock` for root and `$TMPDIR/skerry-<uid>/<name>.sock`
/// (TMPDIR defaulting to `/tmp`) for anyone else. The socket's directory is
/// created with mode 0700 if needed, and refused if it is a symlink, not a
/// directory, or owned by another user (someone could otherwise have
/// prepared it in a shared `/tmp` to catch our connections).
pub fn runtime_socket(name: &EdgeName) -> Result<PathBuf, PathsError> {
    let uid = nix::unistd::geteuid().as_raw();
    let path = runtime_socket_path(name)?;
    if let Some(dir) = path.parent() {
        ensure_owned_private_dir(dir, uid)?;
    }
    Ok(path)
}

/// Where [`runtime_socket`] is, without making or checking its directory:
/// for a client, which only connects.
pub fn runtime_socket_path(name: &EdgeName) -> Result<PathBuf, PathsError> {
    runtime_socket_from(
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        std::env::var_os("TMPDIR").as_deref(),
        nix::unistd::geteuid().as_raw(),
        name,
    )
}

/// Where a home-agent run by root (the service, `sudo home-agent connect`)
/// listens, as `<name>.sock`: a directory only root can enter.
pub const ROOT_SOCKET_DIR: &str = "/run/skerry";

/// Root's system-wide socket for `name` (the service's, `sudo home-agent
/// connect`'s), whatever `XDG_RUNTIME_DIR` says: a root login shell has one
/// of its own, and must still find (and not run beside) these agents.
pub fn root_socket_path(name: &EdgeName) -> PathBuf {
    Path::new(ROOT_SOCKET_DIR).join(format!("{name}.sock"))
}

/// The lock file beside the admin socket `socket`: `<name>.sock.lock`.
pub fn socket_lock(socket: &Path) -> PathBuf {
    let mut lock = socket.as_os_str().to_owned();
    lock.push(".lock");
    PathBuf::from(lock)
}

/// [`root_socket_path`], its directory made (root's, 0700) if missing.
pub fn root_socket(name: &EdgeName) -> Result<PathBuf, PathsError> {
    let path = root_socket_path(name);
    ensure_owned_private_dir(Path::new(ROOT_SOCKET_DIR), 0)?;
    Ok(path)
}

/// Where a home-agent run by `uid` from a login session or a plain shell
/// listens for `name` (see [`runtime_socket`]; a `TMPDIR` of the user's
/// own is not known here). Root looks there when a command run with `sudo`
/// finds no agent of its own: the user who typed it means theirs.
pub fn user_sockets(uid: u32, name: &EdgeName) -> Vec<PathBuf> {
    let session = PathBuf::from(format!("/run/user/{uid}"));
    [Some(session.as_os_str()), None]
        .into_iter()
        .filter_map(|runtime| runtime_socket_from(runtime, None, uid, name).ok())
        .collect()
}

/// The socket of the home-agent `uid` runs for `name`, if one is there and
/// truly `uid`'s: a socket owned by `uid` in a directory of `uid`'s that no
/// one else may write to. In a shared `/tmp` anyone could otherwise plant
/// one (or a link) to catch root's requests and answer them.
pub fn user_socket(uid: u32, name: &EdgeName) -> Option<PathBuf> {
    user_sockets(uid, name)
        .into_iter()
        .find(|path| owned_socket(path, uid).is_ok())
}

/// Checks that `path` is a socket owned by `uid` in a directory of `uid`'s
/// that no one else may write to, creating nothing: what a client checks
/// before it connects, as [`runtime_socket`] checks the directory before an
/// agent listens there.
pub fn owned_socket(path: &Path, uid: u32) -> Result<(), PathsError> {
    let check = |p: &Path, kind: &str, is_kind: fn(&fs::FileType) -> bool| {
        let meta = owned_entry(p, uid, kind, is_kind)?;
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(PathsError::UnsafeDir {
                path: p.to_path_buf(),
                reason: "others may write to it".into(),
            });
        }
        Ok(())
    };
    if let Some(dir) = path.parent() {
        check(dir, "directory", fs::FileType::is_dir)?;
    }
    check(path, "socket", |t| t.is_socket())
}

/// `p`'s metadata if it is a `kind` (not a link to one) owned by `uid`.
fn owned_entry(
    p: &Path,
    uid: u32,
    kind: &str,
    is_kind: fn(&fs::FileType) -> bool,
) -> Result<fs::Metadata, PathsError> {
    let meta = fs::symlink_metadata(p).map_err(PathsError::io(p))?;
    let reason = if meta.file_type().is_symlink() {
        "it is a symbolic link".to_string()
    } else if !is_kind(&meta.file_type()) {
        format!("it is not a {kind}")
    } else if meta.uid() != uid {
        format!("it is owned by uid {}, not by us (uid {uid})", meta.uid())
    } else {
        return Ok(meta);
    };
    Err(PathsError::UnsafeDir {
        path: p.to_path_buf(),
        reason,
    })
}

/// An absolute path from an environment value, or `None` if it is unset,
/// empty or relative (the XDG spec says to ignore relative values).
fn absolute(value: Option<&OsStr>) -> Option<&Path> {
    value.map(Path::new).filter(|p| p.is_absolute())
}

fn xdg_dir(
    xdg: Option<&OsStr>,
    home: Option<&OsStr>,
    var: &'static str,
    default: &str,
) -> Result<PathBuf, PathsError> {
    if let Some(base) = absolute(xdg) {
        return Ok(base.join("skerry"));
    }
    match absolute(home) {
        Some(home) => Ok(home.join(default).join("skerry")),
        None => Err(PathsError::NoHome { var }),
    }
}

fn state_dir_from(
    xdg_state_home: Option<&OsStr>,
    home: Option<&OsStr>,
    name: &EdgeName,
) -> Result<PathBuf, PathsError> {
    Ok(xdg_dir(xdg_state_home, home, "XDG_STATE_HOME", ".local/state")?.join(name.as_str()))
}

fn config_dir_from(
    xdg_config_home: Option<&OsStr>,
    home: Option<&OsStr>,
) -> Result<PathBuf, PathsError> {
    xdg_dir(xdg_config_home, home, "XDG_CONFIG_HOME", ".config")
}

fn runtime_socket_from(
    xdg_runtime_dir: Option<&OsStr>,
    tmpdir: Option<&OsStr>,
    uid: u32,
    name: &EdgeName,
) -> Result<PathBuf, PathsError> {
    let dir = match absolute(xdg_runtime_dir) {
        Some(runtime) => runtime.join("skerry"),
        None if uid == 0 => PathBuf::from(ROOT_SOCKET_DIR),
        None => absolute(tmpdir)
            .unwrap_or(Path::new("/tmp"))
            .join(format!("skerry-{uid}")),
    };
    let path = dir.join(format!("{name}.sock"));
    if path.as_os_str().len() > MAX_SOCKET_PATH_LEN {
        return Err(PathsError::SocketPathTooLong { path });
    }
    Ok(path)
}

/// Creates `dir` (and missing parents) with mode 0700, and tightens its mode
/// to 0700 if it exists with group or other bits set.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// [`ensure_private_dir`] for a directory in a place other users can write
/// to: it must also be a real directory (not a symlink) owned by `uid`.
fn ensure_owned_private_dir(dir: &Path, uid: u32) -> Result<(), PathsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(PathsError::io(dir))?;
    let meta = owned_entry(dir, uid, "directory", fs::FileType::is_dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(PathsError::io(dir))?;
    }
    Ok(())
}

/// Writes `contents` to `path` atomically: a new temporary file in the same
/// directory, created with `mode` (so a secret is never readable by others,
/// not even for a moment), synced, then renamed over `path`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Some(file_name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path has no file name",
        ));
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dir.join(tmp_name);

    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        // Best effort: the temporary file may not exist.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable.
    File::open(dir)?.sync_all()
}

/// An exclusive lock on a file, held for as long as this value lives:
/// `<state_dir>/lock`, so that two agents never drive one edge, and an
/// admin socket's `<name>.sock.lock`, so that two never share one name.
///
/// The lock is an advisory `flock` (std's `File::try_lock`): the kernel
/// drops it when the process exits, however it exits, so a stale lock file
/// never blocks a restart. The file holds the owner's pid, for the message
/// the next agent shows.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock in `dir` (created 0700 if missing) without waiting.
    pub fn acquire(dir: &Path) -> Result<StateLock, PathsError> {
        ensure_private_dir(dir).map_err(PathsError::io(dir))?;
        Self::acquire_file(dir.join("lock"))
    }

    /// Takes the lock on the file `path` (created 0600; its directory must
    /// exist) without waiting.
    pub fn acquire_file(path: PathBuf) -> Result<StateLock, PathsError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // Not through a link: the lock file is written (the pid).
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(PathsError::io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = read_pid(&mut file);
                return Err(PathsError::Locked { path, pid });
            }
            Err(TryLockError::Error(e)) => return Err(PathsError::io(&path)(e)),
        }
        let record = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
        };
        record(&mut file).map_err(PathsError::io(&path))?;
        Ok(StateLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid the lock holder wrote, if it has written one yet.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// A unique directory under the system temp dir, removed on drop.
#[cfg(test)]
pub(crate) struct TestDir(PathBuf);

#[cfg(test)]
impl TestDir {
    pub(crate) fn new(label: &str) -> TestDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "skerry-test-{label}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> EdgeName {
        s.parse().unwrap()
    }

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn edge_names() {
        for good in ["default", "a", "0", "home-1", "x-", &"a".repeat(31)] {
            assert_eq!(name(good).as_ref(), good);
        }
        for bad in [
            "",
            "-a",
            "A",
            "home_1",
            "a.b",
            "a/b",
            "..",
            "é",
            &"a".repeat(32),
        ] {
            let err = bad.parse::<EdgeName>().unwrap_err();
            assert!(matches!(err, PathsError::EdgeName { .. }), "{bad:?}: {err}");
        }
        assert_eq!(EdgeName::default().to_string(), "default");
    }

    #[test]
    fn edge_name_serde_validates() {
        #[derive(Debug, serde::Deserialize, serde::Serialize)]
        struct Doc {
            name: EdgeName,
        }
        let doc: Doc = toml::from_str("name = \"lab-2\"").unwrap();
        assert_eq!(doc.name, name("lab-2"));
        assert_eq!(toml::to_string(&doc).unwrap().trim(), "name = \"lab-2\"");
        let err = toml::from_str::<Doc>("name = \"Lab\"").unwrap_err();
        assert!(err.message().contains("invalid edge name"), "{err}");
    }

    #[test]
    fn state_and_config_dirs() {
        let n = name("lab");
        assert_eq!(
            state_dir_from(os("/xdg/state"), os("/home/u"), &n).unwrap(),
            Path::new("/xdg/state/skerry/lab")
        );
        assert_eq!(
            state_dir_from(None, os("/home/u"), &n).unwrap(),
            Path::new("/home/u/.local/state/skerry/lab")
        );
        // Relative and empty XDG values are ignored.
        for ignored in ["relative/state", ""] {
            assert_eq!(
                state_dir_from(os(ignored), os("/home/u"), &n).unwrap(),
                Path::new("/home/u/.local/state/skerry/lab")
            );
        }
        assert!(matches!(
            state_dir_from(None, None, &n),
            Err(PathsError::NoHome { .. })
        ));
        assert!(matches!(
            state_dir_from(None, os("home"), &n),
            Err(PathsError::NoHome { .. })
        ));

        assert_eq!(
            config_dir_from(os("/xdg/config"), None).unwrap(),
            Path::new("/xdg/config/skerry")
        );
        assert_eq!(
            config_dir_from(os("cfg"), os("/home/u")).unwrap(),
            Path::new("/home/u/.config/skerry")
        );
        assert!(matches!(
            config_dir_from(None, os("")),
            Err(PathsError::NoHome { .. })
        ));
    }

    #[test]
    fn runtime_socket_locations() {
        let n = name("lab");
        assert_eq!(
            runtime_socket_from(os("/run/user/1000"), os("/var/tmp"), 1000, &n).unwrap(),
            Path::new("/run/user/1000/skerry/lab.sock")
        );
        assert_eq!(
            runtime_socket_from(None, os("/var/tmp"), 0, &n).unwrap(),
            Path::new("/run/skerry/lab.sock")
        );
        assert_eq!(
            runtime_socket_from(None, os("/var/tmp"), 1000, &n).unwrap(),
            Path::new("/var/tmp/skerry-1000/lab.sock")
        );
        assert_eq!(
            runtime_socket_from(os("rel"), None, 1000, &n).unwrap(),
            Path::new("/tmp/skerry-1000/lab.sock")
        );
        assert_eq!(
            user_sockets(1000, &n),
            [
                Path::new("/run/user/1000/skerry/lab.sock"),
                Path::new("/tmp/skerry-1000/lab.sock")
            ]
        );
        let long = format!("/{}", "d".repeat(100));
        assert!(matches!(
            runtime_socket_from(os(&long), None, 1000, &n),
            Err(PathsError::SocketPathTooLong { .. })
        ));
    }

    #[test]
    fn a_socket_is_ours_only_in_a_directory_of_ours_that_others_cannot_write() {
        let tmp = TestDir::new("paths-socket");
        let uid = nix::unistd::geteuid().as_raw();
        let dir = tmp.path().join("skerry-x");
        DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let socket = dir.join("a.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).unwrap();
        owned_socket(&socket, uid).unwrap();
        let unsafe_for =
            |path: &Path, uid| matches!(owned_socket(path, uid), Err(PathsError::UnsafeDir { .. }));
        assert!(unsafe_for(&socket, uid.wrapping_add(1)), "someone else's");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(unsafe_for(&socket, uid), "a directory anyone may write to");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(
            unsafe_for(&link.join("a.sock"), uid),
            "a directory that is a link"
        );
        fs::write(dir.join("file"), b"").unwrap();
        assert!(unsafe_for(&dir.join("file"), uid), "not a socket");
    }

    #[test]
    fn owned_private_dir_is_created_tightened_and_checked() {
        let tmp = TestDir::new("paths-owned");
        let uid = nix::unistd::geteuid().as_raw();
        let dir = tmp.path().join("skerry-x");
        ensure_owned_private_dir(&dir, uid).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        ensure_owned_private_dir(&dir, uid).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Someone else's directory (as seen by a process with another uid).
        let err = ensure_owned_private_dir(&dir, uid.wrapping_add(1)).unwrap_err();
        assert!(matches!(err, PathsError::UnsafeDir { .. }), "{err}");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = ensure_owned_private_dir(&link, uid).unwrap_err();
        assert!(matches!(err, PathsError::UnsafeDir { .. }), "{err}");
    }

    #[test]
    fn write_atomic_sets_mode_and_replaces() {
        let tmp = TestDir::new("paths-write");
        let path = tmp.path().join("secret.key");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn lock_is_exclusive_and_names_the_holder() {
        let tmp = TestDir::new("paths-lock");
        let dir = tmp.path().join("state");
        let first = StateLock::acquire(&dir).unwrap();
        assert_eq!(
            fs::read_to_string(first.path()).unwrap().trim(),
            std::process::id().to_string()
        );
        let err = StateLock::acquire(&dir).unwrap_err();
        match &err {
            PathsError::Locked { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("--name"), "{message}");

        drop(first);
        let again = StateLock::acquire(&dir).unwrap();
        assert_eq!(
            fs::metadata(again.path()).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
