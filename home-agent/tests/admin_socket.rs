//! `home-agent ports …` finds the agent it means when `connect` and the
//! command were started one with `sudo` and one without: the two would
//! otherwise look for the admin socket in different places and report that
//! no agent runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use home_agent::admin::{Request, Response};
use skerry::paths::ROOT_SOCKET_DIR;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (it plays `sudo` and another user): run it as root, as `sudo scripts/test` does"
    );
}

/// A name no other test or agent uses.
fn unique_name(tag: &str) -> String {
    format!("t-{tag}-{}", std::process::id())
}

/// A directory removed when the test ends, however it ends.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The command's connection, if it comes within 60 s (the test fails
/// instead of hanging when it does not).
fn accept_within(listener: &UnixListener) -> Option<std::os::unix::net::UnixStream> {
    listener.set_nonblocking(true).expect("non-blocking");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// An agent on `listener` that takes one request and gives `answer`;
/// joined, it returns the request.
fn fake_agent(listener: UnixListener, answer: Response) -> std::thread::JoinHandle<Request> {
    std::thread::spawn(move || {
        let stream = accept_within(&listener).expect("a connection from `home-agent ports`");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("the request");
        let mut bytes = serde_json::to_vec(&answer).expect("an answer");
        bytes.push(b'\n');
        (&stream).write_all(&bytes).expect("the answer");
        serde_json::from_str(&line).expect("a request")
    })
}

/// The home-agent binary run as another user (uid 65534, no session dir),
/// with a TMPDIR of its own: its admin socket is `<scratch>/skerry-65534/`.
struct Nobody {
    scratch: Removed,
    binary: PathBuf,
}

impl Nobody {
    const UID: u32 = 65534;

    fn new(tag: &str) -> Nobody {
        assert!(
            Command::new("setpriv").arg("--help").output().is_ok(),
            "this test needs setpriv (util-linux): run scripts/install-deps"
        );
        // The binary and a TMPDIR where the other user can reach them.
        let scratch = PathBuf::from(format!(
            "/tmp/skerry-admin-socket-{tag}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let scratch = Removed(scratch);
        std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o1777))
            .expect("chmod");
        let binary = scratch.0.join("home-agent");
        std::fs::copy(env!("CARGO_BIN_EXE_home-agent"), &binary).expect("copy the binary");
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Nobody { scratch, binary }
    }

    fn home_agent(&self) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={}", Self::UID),
            &format!("--regid={}", Self::UID),
            "--clear-groups",
            "--",
        ])
        .arg(&self.binary)
        .env("TMPDIR", &self.scratch.0)
        .env_remove("SUDO_UID");
        cmd
    }

    /// Where its agent for `name` would listen.
    fn socket_dir(&self) -> PathBuf {
        self.scratch.0.join(format!("skerry-{}", Self::UID))
    }
}

/// In a shared /tmp, another user can make the directory where a user's
/// agent would listen, and a socket in it: `ports` must not talk to it.
#[test]
fn ports_refuses_a_socket_someone_else_made_where_its_own_would_be() {
    require_root();
    let name = unique_name("planted");
    let nobody = Nobody::new("planted");
    // Made by root, open to the user: someone else's.
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(nobody.socket_dir())
        .expect("the planted dir");
    let socket = nobody.socket_dir().join(format!("{name}.sock"));
    let listener = UnixListener::bind(&socket).expect("the planted socket");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = ports_list(&mut nobody.home_agent(), &name);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "it used the planted socket: {stderr}"
    );
    listener.set_nonblocking(true).expect("non-blocking");
    assert!(
        listener.accept().is_err(),
        "it connected to the planted socket"
    );
    assert!(
        stderr.contains("is not safe to use") && stderr.contains("owned by uid 0"),
        "it did not say why: {stderr}"
    );
}

fn ports_list(cmd: &mut Command, name: &str) -> Output {
    cmd.args(["ports", "list", "--name", name])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .expect("running home-agent")
}

/// The socket of an agent of `name` started by a user with no session
/// dir (so under /tmp) and a uid no one has (`base` + this process's id),
/// made by root: [`UserAgent::make_theirs`] hands it over.
struct UserAgent {
    uid: u32,
    dir: Removed,
    socket: PathBuf,
    listener: UnixListener,
}

impl UserAgent {
    fn new(base: u32, name: &str) -> UserAgent {
        let uid = base + std::process::id() % 1_000_000;
        let dir = PathBuf::from(format!("/tmp/skerry-{uid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .expect("the user's socket dir");
        let socket = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&socket).expect("the user's agent's socket");
        UserAgent {
            uid,
            dir: Removed(dir),
            socket,
            listener,
        }
    }

    fn make_theirs(&self) {
        std::os::unix::fs::chown(&self.dir.0, Some(self.uid), None).expect("chown");
        std::os::unix::fs::chown(&self.socket, Some(self.uid), None).expect("chown");
    }

    /// `sudo home-agent ports list --name NAME`, typed by this user.
    fn sudo_ports_list(&self, name: &str) -> Output {
        ports_list(
            Command::new(env!("CARGO_BIN_EXE_home-agent")).env("SUDO_UID", self.uid.to_string()),
            name,
        )
    }
}

#[test]
fn sudo_ports_reaches_the_agent_its_user_started_and_only_it() {
    require_root();
    let name = unique_name("sudo");
    let user = UserAgent::new(4_000_000_000, &name);
    let socket = user.socket.clone();
    let sudo_ports_list = || user.sudo_ports_list(&name);

    // Not the user's: someone else could have put it in the shared /tmp.
    let out = sudo_ports_list();
    assert!(
        !out.status.success(),
        "root used a socket dir that is not the user's: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    user.listener.set_nonblocking(true).expect("non-blocking");
    assert!(
        user.listener.accept().is_err(),
        "root connected to a socket that is not the user's"
    );

    user.make_theirs();
    let agent = fake_agent(
        user.listener.try_clone().expect("the listener"),
        Response::Ports { ports: Vec::new() },
    );
    let out = sudo_ports_list();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`sudo home-agent ports list` did not reach the user's agent: {stderr}"
    );
    assert_eq!(agent.join().expect("the agent"), Request::List);
    assert!(
        stderr.contains(&format!(
            "using the home-agent of the user who ran sudo, at {}",
            socket.display()
        )),
        "it did not say whose agent it used: {stderr}"
    );
}

/// Root and the user who ran sudo each run an agent of the name: `sudo
/// home-agent ports` reaches root's, and says that the user's exists and
/// how to reach it.
#[test]
fn sudo_ports_with_two_agents_of_a_name_says_which_it_uses() {
    require_root();
    let name = unique_name("two");
    let user = UserAgent::new(4_100_000_000, &name);
    user.make_theirs();
    let users = user.socket.clone();

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(ROOT_SOCKET_DIR)
        .expect("root's socket dir");
    let roots = Path::new(ROOT_SOCKET_DIR).join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&roots);
    struct RemovedFile(PathBuf);
    impl Drop for RemovedFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _roots = RemovedFile(roots.clone());
    let agent = fake_agent(
        UnixListener::bind(&roots).expect("root's agent's socket"),
        Response::Ports { ports: Vec::new() },
    );
    let out = user.sudo_ports_list(&name);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(agent.join().expect("root's agent"), Request::List);
    assert!(
        stderr.contains("two home-agents run")
            && stderr.contains(&roots.display().to_string())
            && stderr.contains(&users.display().to_string()),
        "it did not say there are two: {stderr}"
    );
}

#[test]
fn ports_without_sudo_says_to_use_sudo_for_an_agent_root_started() {
    require_root();
    let name = unique_name("user");
    // Root's socket dir, as an agent started with sudo leaves it.
    let made_root_dir = !Path::new(ROOT_SOCKET_DIR).exists();
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(ROOT_SOCKET_DIR)
        .expect("root's socket dir");
    let nobody = Nobody::new("user");
    let out = ports_list(&mut nobody.home_agent(), &name);
    if made_root_dir {
        let _ = std::fs::remove_dir(ROOT_SOCKET_DIR);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "it found an agent that does not run: {stderr}"
    );
    assert!(
        stderr.contains("its socket is under /run/skerry")
            && stderr.contains("run this command as root too"),
        "a user's `ports list` did not say to use sudo: {stderr}"
    );
}

/// An agent that cannot take the request (an older one than the command)
/// makes the command fail with its message, as an error (exit 1), not as
/// a refused entry (exit 3).
#[test]
fn an_agent_that_cannot_take_the_request_is_an_error() {
    let runtime = PathBuf::from(format!(
        "/tmp/skerry-admin-socket-error-{}",
        std::process::id()
    ));
    let _runtime = Removed(runtime.clone());
    std::fs::create_dir_all(runtime.join("skerry")).expect("runtime dir");
    let name = unique_name("error");
    let listener =
        UnixListener::bind(runtime.join("skerry").join(format!("{name}.sock"))).expect("socket");
    let agent = fake_agent(
        listener,
        Response::Error {
            message: "malformed request: unknown variant".into(),
        },
    );
    let out = Command::new(env!("CARGO_BIN_EXE_home-agent"))
        .args(["ports", "list", "--name", &name])
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .expect("running home-agent");
    agent.join().expect("the agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("malformed request: unknown variant"),
        "{stderr}"
    );
}
