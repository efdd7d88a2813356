//! `home-agent connect --edge droplet` against a stand-in DigitalOcean API
//! ([`skerry_tests::fake_do`]). The provisioning code is the production
//! code, driven through the same library entry points the CLI calls
//! (`provision::connect`, `droplet::destroy`, `provision::list`); only the
//! API's base URL differs.
//!
//! The tests marked *root* boot droplets as real edge-agents in network
//! namespaces; the others need no privileges (the API answers on
//! 127.0.0.1 and no droplet boots).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use home_agent::provision::digitalocean::{ApiToken, Client, ClientOptions};
use home_agent::provision::droplet::{self, STATE_FILE, release_image_name};
use home_agent::provision::{self, ApiArgs, Cleanup, DropletArgs, DropletError, Phase};
use home_agent::{HomeOptions, HomeState, HomeStatus};
use skerry::bootstrap::Bootstrap;
use skerry::paths::{EdgeName, StateLock};
use skerry::pki::HomePki;
use skerry::tunnel::TunnelAddrs;
use skerry_tests::agents::{SETTLE, block_on, port_map};
use skerry_tests::fake_do::{Boot, FakeDo, Fault, World};
use skerry_tests::{Background, init_tracing, run_in, spawn_in, tcp_listener_in, unique};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "dop_v1_0123456789abcdef-fake-token-for-tests";
const GREETING: &[u8] = b"hello from home, through a droplet\n";

/// A home: a state dir, a token file, an edge name. Removed on drop.
struct Home {
    root: PathBuf,
    dir: PathBuf,
    token_file: PathBuf,
    name: EdgeName,
}

impl Home {
    fn new(token: &str) -> Home {
        let root = std::env::temp_dir().join(unique("skerry-do"));
        let dir = root.join("state");
        std::fs::create_dir_all(&dir).expect("state dir");
        let token_file = root.join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token file");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let name: EdgeName = format!("t{}", unique("e").replace('-', ""))
            .parse()
            .expect("edge name");
        Home {
            root,
            dir,
            token_file,
            name,
        }
    }

    fn api(&self, fake: &FakeDo) -> ApiArgs {
        ApiArgs::new(Some(self.token_file.clone()), &fake.url)
    }

    fn args(&self, fake: &FakeDo) -> DropletArgs {
        DropletArgs::new(self.api(fake))
    }

    fn client(&self, fake: &FakeDo) -> Client {
        self.api(fake).client().expect("API client")
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

type Phases = Arc<Mutex<Vec<Phase>>>;

fn phases_of(p: &Phases) -> Vec<Phase> {
    p.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Runs `provision::connect` in this thread (no world: nothing boots).
fn provision_here(
    home: &Home,
    args: DropletArgs,
) -> (anyhow::Result<provision::ProvisionedEdge>, Vec<Phase>) {
    let phases: Phases = Arc::default();
    let pki = HomePki::load_or_create(&home.dir).expect("PKI");
    let sink = phases.clone();
    let result = block_on(provision::connect(
        &args,
        &home.name,
        &home.dir,
        &pki,
        &move |p| sink.lock().unwrap_or_else(|e| e.into_inner()).push(p),
        &CancellationToken::new(),
    ));
    (result, phases_of(&phases))
}

/// Runs `provision::connect` inside the world's home namespace, holding the
/// state lock as `connect` does; `cancel_at` cancels when that phase shows.
fn provision_in_home(
    world: &World,
    dir: &Path,
    name: &EdgeName,
    args: DropletArgs,
    cancel_at: Option<fn(&Phase) -> bool>,
) -> (
    Result<provision::ProvisionedEdge, String>,
    Vec<Phase>,
    Option<DropletError>,
) {
    let phases: Phases = Arc::default();
    let sink = phases.clone();
    let (dir, name) = (dir.to_path_buf(), name.clone());
    let (result, err) = run_in(&world.home, move || async move {
        let state = HomeState::open(&dir).expect("home state");
        let cancel = CancellationToken::new();
        let trip = cancel.clone();
        let progress = move |p: Phase| {
            if cancel_at.is_some_and(|f| f(&p)) {
                trip.cancel();
            }
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(p);
        };
        match provision::connect(&args, &name, &dir, &state.pki, &progress, &cancel).await {
            Ok(edge) => (Ok(edge), None),
            Err(e) => {
                let text = format!("{e:#}");
                (Err(text), e.downcast::<DropletError>().ok())
            }
        }
    });
    (result, phases_of(&phases), err)
}

/// A home-agent session: provisioned through the droplet flow, then
/// `home_agent::run`, in the world's home namespace.
struct Session {
    stop: CancellationToken,
    agent: Option<Background>,
    edge: provision::ProvisionedEdge,
    phases: Vec<Phase>,
}

impl Session {
    fn start(world: &World, home: &Home, args: DropletArgs, spec: String) -> Session {
        let phases: Phases = Arc::default();
        let sink = phases.clone();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (dir, name) = (home.dir.clone(), home.name.clone());
        let agent = spawn_in(&world.home, move || async move {
            let state = match HomeState::open(&dir) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let progress = move |p: Phase| sink.lock().unwrap_or_else(|e| e.into_inner()).push(p);
            let edge =
                match provision::connect(&args, &name, &dir, &state.pki, &progress, &token).await {
                    Ok(edge) => edge,
                    Err(e) => {
                        let _ = tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
            let (_map_tx, map_rx) = watch::channel(port_map(1, &[&spec]));
            let (status_tx, status_rx) = watch::channel(HomeStatus::default());
            let opts = HomeOptions {
                edge: edge.control,
                tun_name: home_agent::tun_name(&name),
                udp_idle: Duration::from_secs(60),
                drain_grace: Duration::from_secs(5),
                dead_peer: skerry::dead_peer::DeadPeer::default(),
                requested_tunnel: None,
            };
            let _ = tx.send(Ok((edge, status_rx)));
            if let Err(e) =
                home_agent::run(opts, &state.pki, &state.key, map_rx, status_tx, token).await
            {
                tracing::error!(error = %format!("{e:#}"), "home-agent failed");
            }
        });
        let (edge, mut status) = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("provisioning failed: {e}"),
            Err(e) => panic!("provisioning did not finish: {e}"),
        };
        block_on(async {
            tokio::time::timeout(
                SETTLE,
                status.wait_for(|s| s.applied.as_ref().is_some_and(|a| a.generation >= 1)),
            )
            .await
            .expect("the edge did not answer the port map in time")
            .expect("the home-agent stopped");
        });
        Session {
            stop,
            agent: Some(agent),
            edge,
            phases: phases_of(&phases),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.cancel();
        drop(self.agent.take());
    }
}

/// A TCP service in the home namespace that sends [`GREETING`] and closes.
fn greeter(world: &World) -> (SocketAddr, Background) {
    let listener = tcp_listener_in(&world.home, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let addr = listener.local_addr().expect("greeter address");
    let bg = spawn_in(&world.home, move || async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("greeter");
        loop {
            if let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(GREETING).await;
                    let _ = s.shutdown().await;
                });
            }
        }
    });
    (addr, bg)
}

/// What a client on the internet gets from `addr`.
fn fetch_from_client(world: &World, addr: SocketAddr) -> Vec<u8> {
    run_in(&world.client, move || async move {
        let mut s = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .unwrap_or_else(|_| panic!("connecting to {addr} timed out"))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("reading from {addr} timed out"))
            .unwrap_or_else(|e| panic!("reading from {addr}: {e}"));
        got
    })
}

fn fake_with_release_image(world: Option<World>) -> FakeDo {
    let fake = match world {
        Some(w) => FakeDo::start_with_world(TOKEN, w),
        None => FakeDo::start(TOKEN),
    };
    // Pages of two: the release image is on the third page.
    fake.set_page_size(2);
    for i in 0..4 {
        fake.add_image(
            &format!("skerry-edge-0.0.{i}"),
            &["fra1"],
            "2025-01-01T00:00:00Z",
        );
    }
    fake.add_image(
        &release_image_name(),
        &["fra1", "ams3"],
        "2026-01-01T00:00:00Z",
    );
    fake.add_image("someone-elses-snapshot", &["fra1"], "2026-02-01T00:00:00Z");
    fake
}

/// *root*. The whole flow: a droplet is created (its user data is the
/// bootstrap, never the token), boots a real edge-agent that reads the
/// bootstrap from the metadata service, and a public request reaches the
/// home service through it, also on the reserved IP. A restarted agent
/// re-attaches without a second create; destroy removes the droplet, the
/// tag and the record, and only unassigns the reserved IP. A 429 and 5xx
/// on the way are waited out and retried.
#[test]
fn droplet_edge_serves_then_reattaches_then_is_destroyed() {
    skerry_tests::require_root();
    init_tracing();
    let fake = fake_with_release_image(Some(World::new()));
    let rip = Ipv4Addr::new(198, 18, 250, 7);
    fake.add_reserved_ip(rip, "fra1");
    fake.inject(
        "GET",
        "/v2/images",
        Fault::RateLimit {
            retry_after: Some(1),
            reset_in: 30,
        },
        1,
    );
    fake.inject("GET", "/v2/droplets/", Fault::Status(503), 2);
    let world = fake.world().expect("world");
    let (service, _greeter) = greeter(world);
    let home = Home::new(TOKEN);
    let mut args = home.args(&fake);
    args.reserved_ip = Some(rip);
    // Not the default tunnel addresses: `connect --tunnel-*` reach the edge.
    let tunnel = TunnelAddrs::new(Ipv4Addr::new(10, 99, 9, 1), Ipv4Addr::new(10, 99, 9, 2), 29)
        .expect("tunnel addresses");
    args.tunnel = tunnel;
    let spec = format!("tcp/8080={service}");

    let first = Session::start(world, &home, args.clone(), spec.clone());
    assert!(first.edge.created);
    assert_eq!(first.edge.reserved_ip, Some(rip));
    assert_eq!(fake.count("POST", "/v2/droplets"), 1);
    let ids = fake.droplet_ids();
    assert_eq!(ids, vec![first.edge.droplet_id]);
    assert!(
        first
            .phases
            .iter()
            .any(|p| matches!(p, Phase::Creating { .. }))
            && first
                .phases
                .iter()
                .any(|p| matches!(p, Phase::EdgeAnswered { .. })),
        "{:?}",
        first.phases
    );
    let user_data = fake.user_data(ids[0]).expect("user data");
    let bootstrap = Bootstrap::parse(&user_data).expect("the user data is the bootstrap");
    assert_eq!(bootstrap.tunnel, tunnel, "the edge's tunnel addresses");
    assert!(!user_data.contains(TOKEN), "the token went to the edge");
    let record = std::fs::read_to_string(home.dir.join(STATE_FILE)).expect("droplet.json");
    assert!(record.contains(&ids[0].to_string()), "{record}");
    assert!(!record.contains(TOKEN), "the token went into the state dir");
    // The 429 was waited out, the two 503s retried.
    let log = fake.log();
    assert!(log.iter().any(|l| l.status == 429), "{log:?}");
    assert_eq!(log.iter().filter(|l| l.status == 503).count(), 2, "{log:?}");

    let public = SocketAddr::from((first.edge.public_v4, 8080));
    assert_eq!(fetch_from_client(world, public), GREETING);
    assert_eq!(
        fetch_from_client(world, SocketAddr::from((rip, 8080))),
        GREETING
    );
    drop(first);

    // A restarted home-agent finds its droplet and makes no second one.
    let again = Session::start(world, &home, args, spec);
    assert!(!again.edge.created);
    assert_eq!(again.edge.droplet_id, ids[0]);
    assert!(
        again
            .phases
            .iter()
            .any(|p| matches!(p, Phase::Reattached { .. }))
            && !again
                .phases
                .iter()
                .any(|p| matches!(p, Phase::Creating { .. })),
        "{:?}",
        again.phases
    );
    assert_eq!(
        fake.count("POST", "/v2/droplets"),
        1,
        "a second create call"
    );
    assert_eq!(fetch_from_client(world, public), GREETING);
    drop(again);

    // destroy, holding the lock as the CLI does.
    let client = home.client(&fake);
    let (dir, name) = (home.dir.clone(), home.name.clone());
    let done = run_in(&world.home, move || async move {
        let _lock = StateLock::acquire(&dir).expect("lock");
        droplet::destroy(&client, &name, Some(&dir)).await
    })
    .expect("destroy");
    assert_eq!(done.droplets.len(), 1, "{done:?}");
    assert_eq!(done.unassigned, Some(rip));
    assert!(fake.droplet_ids().is_empty());
    assert_eq!(fake.reserved_ip_droplet(rip), None);
    assert!(!fake.tags().contains(&format!("skerry-{}", home.name)));
    assert!(!home.dir.join(STATE_FILE).exists());
}

/// *root*. A droplet whose edge-agent never answers is reported with its
/// id and destroyed.
#[test]
fn droplet_that_never_answers_is_destroyed() {
    skerry_tests::require_root();
    init_tracing();
    let fake = fake_with_release_image(Some(World::new()));
    fake.set_boot(Boot::Silent);
    let home = Home::new(TOKEN);
    let mut args = home.args(&fake);
    args.ready_timeout = Duration::from_secs(4);
    let world = fake.world().expect("world");
    let (result, _, err) = provision_in_home(world, &home.dir, &home.name, args, None);
    let text = result.expect_err("the edge never answers");
    match err {
        Some(DropletError::Abandoned { reason, cleanup }) => {
            assert!(matches!(*reason, DropletError::NotReady { .. }), "{reason}");
            assert!(matches!(cleanup, Cleanup::Destroyed { .. }), "{cleanup:?}");
        }
        other => panic!("not the expected error: {other:?}"),
    }
    assert!(
        text.contains("did not answer") && text.contains("destroyed"),
        "{text}"
    );
    assert!(fake.droplet_ids().is_empty());
    assert_eq!(fake.count("DELETE", "/v2/droplets/"), 1);
    assert!(!home.dir.join(STATE_FILE).exists());
}

/// *root*. Ctrl-C while waiting for the edge leaves no droplet behind.
#[test]
fn interrupted_provisioning_destroys_its_droplet() {
    skerry_tests::require_root();
    init_tracing();
    let fake = fake_with_release_image(Some(World::new()));
    fake.set_boot(Boot::Silent);
    let home = Home::new(TOKEN);
    let world = fake.world().expect("world");
    let (result, _, err) = provision_in_home(
        world,
        &home.dir,
        &home.name,
        home.args(&fake),
        Some(|p| matches!(p, Phase::WaitingForEdge { .. })),
    );
    let text = result.expect_err("cancelled");
    assert!(
        matches!(
            &err,
            Some(DropletError::Abandoned { reason, cleanup: Cleanup::Destroyed { .. } })
                if matches!(**reason, DropletError::Cancelled)
        ),
        "{err:?}"
    );
    assert!(text.contains("nothing is left behind"), "{text}");
    assert!(fake.droplet_ids().is_empty());
}

/// *root*. A create call that worked but answered 500 is not repeated: the
/// tag shows the droplet, which is then used.
#[test]
fn unclear_create_is_checked_by_tag_not_repeated() {
    skerry_tests::require_root();
    init_tracing();
    let fake = fake_with_release_image(Some(World::new()));
    fake.inject("POST", "/v2/droplets", Fault::StatusAfterWork(500), 1);
    let home = Home::new(TOKEN);
    let world = fake.world().expect("world");
    let (result, _, _) = provision_in_home(world, &home.dir, &home.name, home.args(&fake), None);
    let edge = result.expect("provisioned despite the 500");
    assert_eq!(fake.count("POST", "/v2/droplets"), 1, "{:?}", fake.log());
    assert_eq!(fake.droplet_ids(), vec![edge.droplet_id]);
}

/// *root*. Re-attaching from a state dir with another CA fails with a
/// message that says what to do, and leaves the droplet alone.
#[test]
fn reattach_with_another_ca_says_what_to_do() {
    skerry_tests::require_root();
    init_tracing();
    let fake = fake_with_release_image(Some(World::new()));
    let home = Home::new(TOKEN);
    let world = fake.world().expect("world");
    let (first, _, _) = provision_in_home(world, &home.dir, &home.name, home.args(&fake), None);
    let edge = first.expect("provisioned");
    // Another home: a fresh CA, but the record of the same droplet.
    let other = Home::new(TOKEN);
    std::fs::copy(home.dir.join(STATE_FILE), other.dir.join(STATE_FILE)).expect("copy record");
    let (second, _, err) =
        provision_in_home(world, &other.dir, &home.name, other.args(&fake), None);
    let text = second.expect_err("another CA");
    assert!(
        matches!(err, Some(DropletError::ForeignCa { .. })),
        "{err:?}"
    );
    assert!(
        text.contains(&format!("home-agent destroy --name {}", home.name))
            && text.contains("Restore the state directory"),
        "{text}"
    );
    assert_eq!(
        fake.droplet_ids(),
        vec![edge.droplet_id],
        "the droplet was touched"
    );
    assert_eq!(fake.count("POST", "/v2/droplets"), 1);
}

/// A bad token fails at the first call, with DigitalOcean's message, and
/// nothing is retried or created.
#[test]
fn bad_token_fails_fast_with_its_message() {
    init_tracing();
    let fake = fake_with_release_image(None);
    let home = Home::new("dop_v1_not_the_right_one");
    let started = Instant::now();
    let (result, _) = provision_here(&home, home.args(&fake));
    let text = format!("{:#}", result.expect_err("refused"));
    assert!(
        text.contains("Unable to authenticate you") && text.contains("401"),
        "{text}"
    );
    assert!(
        !text.contains("dop_v1_not_the_right_one"),
        "the token was printed: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.log().len(), 1, "{:?}", fake.log());
}

/// No image for this release: the error says how to build one, and no
/// droplet is created.
#[test]
fn missing_image_says_how_to_build_it() {
    init_tracing();
    let fake = FakeDo::start(TOKEN);
    fake.add_image("skerry-edge-0.0.1", &["fra1"], "2025-01-01T00:00:00Z");
    let home = Home::new(TOKEN);
    let (result, _) = provision_here(&home, home.args(&fake));
    let text = format!("{:#}", result.expect_err("no image"));
    assert!(
        text.contains(&release_image_name()) && text.contains("packer build packer/"),
        "{text}"
    );
    assert_eq!(fake.count("POST", "/v2/droplets"), 0);
}

/// A bad region is refused before anything is created, naming the regions
/// that would do.
#[test]
fn image_not_in_region_fails_before_creating() {
    init_tracing();
    let fake = fake_with_release_image(None);
    let home = Home::new(TOKEN);
    let mut args = home.args(&fake);
    args.region = Some("sgp1".into());
    let (result, _) = provision_here(&home, args);
    let text = format!("{:#}", result.expect_err("wrong region"));
    assert!(
        text.contains("sgp1") && text.contains("fra1, ams3"),
        "{text}"
    );
    assert_eq!(fake.count("POST", "/v2/droplets"), 0);
}

/// The client: a 429 is waited out as `Retry-After` asks, 5xx and a
/// dropped connection are retried for a GET, pages are followed (by path,
/// though the links name DigitalOcean's host) to the end.
#[test]
fn client_retries_safe_calls_and_follows_pages() {
    init_tracing();
    let fake = fake_with_release_image(None);
    fake.inject(
        "GET",
        "/v2/images",
        Fault::RateLimit {
            retry_after: Some(1),
            reset_in: 60,
        },
        1,
    );
    fake.inject("GET", "/v2/images", Fault::Status(502), 1);
    fake.inject("GET", "/v2/images", Fault::HangUp, 1);
    let token = ApiToken::new(TOKEN, "test").expect("token");
    let client = Client::new(&token, ClientOptions::new(&fake.url).expect("url")).expect("client");
    let started = Instant::now();
    let images = block_on(client.private_images()).expect("images");
    assert_eq!(images.len(), 6);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    let statuses: Vec<u16> = fake
        .log()
        .iter()
        .filter(|l| l.path.starts_with("/v2/images"))
        .map(|l| l.status)
        .collect();
    assert_eq!(
        statuses,
        vec![429, 502, 0, 200, 200, 200],
        "{:?}",
        fake.log()
    );
}

/// The client: a GET that times out is retried; a POST that times out or
/// fails with a 5xx is not, and says its outcome is unknown.
#[test]
fn client_never_repeats_an_unclear_post() {
    init_tracing();
    let fake = fake_with_release_image(None);
    let id = fake.seed_droplet(
        "skerry-x",
        "fra1",
        &["skerry", "skerry-x"],
        Ipv4Addr::LOCALHOST,
    );
    let token = ApiToken::new(TOKEN, "test").expect("token");
    let mut opts = ClientOptions::new(&fake.url).expect("url");
    opts.request_timeout = Duration::from_millis(500);
    let client = Client::new(&token, opts).expect("client");

    fake.inject(
        "GET",
        "/v2/droplets/",
        Fault::Stall(Duration::from_secs(2)),
        1,
    );
    let d = block_on(client.droplet(id))
        .expect("retried")
        .expect("exists");
    assert_eq!(d.id, id);
    assert_eq!(fake.count("GET", &format!("/v2/droplets/{id}")), 2);

    fake.inject("POST", "/v2/reserved_ips/", Fault::Status(503), 1);
    let err = block_on(client.reserved_ip_action(
        Ipv4Addr::new(198, 18, 250, 9),
        home_agent::provision::digitalocean::ReservedIpAction::Unassign,
    ))
    .expect_err("503");
    assert!(err.outcome_unknown(), "{err}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(
        fake.count("POST", "/v2/reserved_ips/"),
        1,
        "a POST was repeated"
    );
}

/// `home-agent list`: the skerry-tagged droplets, with region, address and
/// age; nothing else of the account.
#[test]
fn list_shows_only_skerry_edges() {
    init_tracing();
    let fake = FakeDo::start(TOKEN);
    fake.set_page_size(1);
    fake.seed_droplet(
        "skerry-home",
        "fra1",
        &["skerry", "skerry-home"],
        Ipv4Addr::new(198, 18, 7, 1),
    );
    fake.seed_droplet(
        "skerry-lab",
        "ams3",
        &["skerry", "skerry-lab"],
        Ipv4Addr::new(198, 18, 8, 1),
    );
    fake.seed_droplet("my-database", "fra1", &["db"], Ipv4Addr::new(198, 18, 9, 1));
    let home = Home::new(TOKEN);
    let table = block_on(provision::list(&home.api(&fake))).expect("list");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].starts_with("home")
            && lines[1].contains("fra1")
            && lines[1].contains("198.18.7.1"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("lab") && lines[2].contains("ams3"),
        "{table}"
    );
    assert!(!table.contains("database"), "{table}");
}

/// A create that DigitalOcean refuses (422) fails at once with
/// DigitalOcean's own message; nothing is repeated or left.
#[test]
fn refused_create_shows_digitaloceans_message() {
    init_tracing();
    let fake = fake_with_release_image(None);
    fake.inject(
        "POST",
        "/v2/droplets",
        Fault::Refuse {
            status: 422,
            message: "Size is not available in this region.",
        },
        1,
    );
    let home = Home::new(TOKEN);
    let (result, _) = provision_here(&home, home.args(&fake));
    let text = format!("{:#}", result.expect_err("refused"));
    assert!(
        text.contains("Size is not available in this region.")
            && text.contains("422")
            && text.contains("creating droplet"),
        "{text}"
    );
    assert_eq!(fake.count("POST", "/v2/droplets"), 1);
    assert!(fake.droplet_ids().is_empty());
    assert!(!home.dir.join(STATE_FILE).exists());
}

/// Re-attach finds the droplet by its tag when the recorded id is gone,
/// and ignores a recorded droplet that does not carry the edge's tag.
#[test]
fn reattach_falls_back_to_the_tag() {
    init_tracing();
    let fake = FakeDo::start(TOKEN);
    let home = Home::new(TOKEN);
    let tag = droplet::edge_tag(&home.name);
    let stranger = fake.seed_droplet("web", "fra1", &["web"], Ipv4Addr::new(198, 18, 3, 1));
    let ours = fake.seed_droplet(
        &tag,
        "fra1",
        &["skerry", &tag],
        Ipv4Addr::new(198, 18, 4, 1),
    );
    let client = home.client(&fake);
    for recorded in [999_999, stranger] {
        std::fs::write(
            home.dir.join(STATE_FILE),
            format!(
                r#"{{"version":1,"id":{recorded},"name":"{tag}","region":"fra1","created_at":"2026-01-01T00:00:00Z"}}"#
            ),
        )
        .expect("record");
        let found = block_on(droplet::find_existing(&client, &home.name, &home.dir))
            .expect("lookup")
            .expect("found by tag");
        assert_eq!(found.id, ours);
        let record = droplet::load_record(&home.dir)
            .expect("record")
            .expect("rewritten");
        assert_eq!(record.id, ours);
    }
}

/// A create that failed with a 5xx and did nothing is tried again once the
/// tag shows no droplet: one droplet in the end. (No world here, so it
/// never gets an address and is destroyed again after the ready timeout.)
#[test]
fn create_failed_by_a_5xx_is_repeated_once_the_tag_shows_nothing() {
    init_tracing();
    let fake = fake_with_release_image(None);
    fake.inject("POST", "/v2/droplets", Fault::Status(500), 1);
    let home = Home::new(TOKEN);
    let mut args = home.args(&fake);
    args.ready_timeout = Duration::from_secs(3);
    let (result, phases) = provision_here(&home, args);
    let err = result.expect_err("never gets an address");
    assert!(
        matches!(
            err.downcast_ref::<DropletError>(),
            Some(DropletError::Abandoned { reason, cleanup: Cleanup::Destroyed { .. } })
                if matches!(**reason, DropletError::NotActive { .. })
        ),
        "{err:#}"
    );
    assert_eq!(fake.count("POST", "/v2/droplets"), 2, "{:?}", fake.log());
    assert_eq!(fake.count("DELETE", "/v2/droplets/"), 1, "{:?}", fake.log());
    assert!(fake.droplet_ids().is_empty());
    assert_eq!(
        phases
            .iter()
            .filter(|p| matches!(p, Phase::Created { .. }))
            .count(),
        1
    );
}
