//! A stand-in for DigitalOcean's API v2, for the `--edge droplet` tests.
//!
//! It speaks the documented JSON of the calls skerry makes, over plain HTTP
//! on 127.0.0.1 (the client's base URL is the only thing a test changes):
//! droplets (create, get, list by tag with pagination, delete), private
//! images (paginated, with `links.pages.next` as absolute URLs of the real
//! API host, and `meta.total`), reserved IPs and their actions, tags, the
//! `ratelimit-*` headers on every answer, and DigitalOcean's error bodies
//! (`{"id":"unauthorized","message":"Unable to authenticate you"}`). Faults
//! are injected per call: a 429, a 5xx, a 5xx *after* doing the work, a
//! stall, a dropped connection. Every request is logged for assertions.
//!
//! With a [`World`] (root only), creating a droplet boots a machine: a fresh
//! network namespace linked to the world's `home` and `client` namespaces,
//! with a metadata service on 169.254.169.254:80 inside that serves the
//! droplet's `user_data`, and a real edge-agent that reads its bootstrap
//! from there with the same code as `edge-agent run` without `--bootstrap`.
//! The droplet's public IPv4 in the API is that namespace's address.
//!
//! ```text
//!   home ── dhK ═══ eth0 ── droplet K ── eth1 ═══ dcK ── client
//!   198.18.K.2      198.18.K.1 (public)  198.19.K.1      198.19.K.2
//! ```
//!
//! The home namespace reaches the public address on its own link (as a
//! home reaches a droplet's eth0 through the internet); the client reaches
//! it by a route through the droplet's other link. The API listens on
//! 127.0.0.1 in `home`, where the home-agent runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use skerry::netns::{NetNs, Side, Veth};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{Background, NETNS_PREFIX, spawn_in, tcp_listener_in, unique};

/// The namespaces a fake cloud's droplets join: the home network (where
/// the API answers and the home-agent runs) and an internet client.
pub struct World {
    pub home: NetNs,
    pub client: NetNs,
}

impl World {
    /// Two fresh namespaces, unlinked until a droplet boots.
    #[allow(
        clippy::new_without_default,
        reason = "creating namespaces is no default"
    )]
    pub fn new() -> World {
        crate::require_root();
        let id = unique(NETNS_PREFIX);
        let ns = |role: &str| {
            let name = format!("{id}-{role}");
            NetNs::create(&name).unwrap_or_else(|e| panic!("fake cloud: namespace {name}: {e}"))
        };
        World {
            home: ns("home"),
            client: ns("inet"),
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer this status with a DigitalOcean error body, doing nothing.
    Status(u16),
    /// Refuse with this status and DigitalOcean `message`, doing nothing.
    Refuse { status: u16, message: &'static str },
    /// Do the work, then answer this status: the worst case for a POST.
    StatusAfterWork(u16),
    /// 429 with `Retry-After` (if given) and `ratelimit-reset` in `reset_in`
    /// seconds.
    RateLimit {
        retry_after: Option<u64>,
        reset_in: u64,
    },
    /// Answer only after this long (past the client's timeout, say).
    Stall(Duration),
    /// Close the connection without an answer.
    HangUp,
}

#[derive(Debug, Clone)]
struct FaultRule {
    method: String,
    path_prefix: String,
    fault: Fault,
    times: u32,
}

/// A request the fake saw: method, path with query, the status it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// How a created droplet behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// Boots a machine with a real edge-agent (needs a [`World`]).
    EdgeAgent,
    /// Boots a machine whose edge-agent never answers: the network is up,
    /// nothing listens on the control port.
    Silent,
}

struct FakeDroplet {
    json: Value,
    user_data: String,
    /// GETs left before it turns active.
    gets_until_active: u32,
    public_v4: Option<Ipv4Addr>,
    public_v6: Option<Ipv6Addr>,
    machine: Option<Machine>,
}

struct Cloud {
    token: String,
    next_id: u64,
    page_size: usize,
    boot: Boot,
    boots: u8,
    images: Vec<Value>,
    droplets: BTreeMap<u64, FakeDroplet>,
    reserved_ips: BTreeMap<Ipv4Addr, (String, Option<u64>)>,
    actions: BTreeMap<u64, Value>,
    tags: BTreeSet<String>,
    faults: Vec<FaultRule>,
    log: Vec<Logged>,
    remaining: u64,
    world: Option<Arc<World>>,
}

/// The fake API. Dropping it stops the server, every droplet's machine,
/// and then the world's namespaces.
pub struct FakeDo {
    /// `http://127.0.0.1:PORT`, in the home namespace when there is a world.
    pub url: String,
    server: Option<Service>,
    cloud: Arc<Mutex<Cloud>>,
    world: Option<Arc<World>>,
}

impl FakeDo {
    /// The API on 127.0.0.1 in this process's namespace, no world: droplets
    /// are created but never boot. Accepts `token` only.
    pub fn start(token: &str) -> FakeDo {
        Self::start_in(token, None)
    }

    /// The API in `world.home`; created droplets boot there.
    pub fn start_with_world(token: &str, world: World) -> FakeDo {
        Self::start_in(token, Some(Arc::new(world)))
    }

    fn start_in(token: &str, world: Option<Arc<World>>) -> FakeDo {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let listener = match &world {
            Some(w) => tcp_listener_in(&w.home, any),
            None => {
                let l = std::net::TcpListener::bind(any).expect("fake API: bind 127.0.0.1");
                l.set_nonblocking(true).expect("fake API: nonblocking");
                l
            }
        };
        let port = listener.local_addr().expect("fake API: address").port();
        let url = format!("http://127.0.0.1:{port}");
        let cloud = Arc::new(Mutex::new(Cloud {
            token: token.to_owned(),
            next_id: 1000,
            page_size: 200,
            boot: Boot::EdgeAgent,
            boots: 0,
            images: Vec::new(),
            droplets: BTreeMap::new(),
            reserved_ips: BTreeMap::new(),
            actions: BTreeMap::new(),
            tags: BTreeSet::new(),
            faults: Vec::new(),
            log: Vec::new(),
            remaining: 5000,
            world: world.clone(),
        }));
        let handler_cloud = cloud.clone();
        let serve = move || async move {
            let listener = TcpListener::from_std(listener).expect("fake API: listener");
            serve_http(listener, move |req| handle(&handler_cloud, req)).await;
        };
        let server = match &world {
            Some(w) => Service::Ns(spawn_in(&w.home, serve)),
            None => Service::thread("fake-do", serve),
        };
        FakeDo {
            url,
            server: Some(server),
            cloud,
            world,
        }
    }

    fn cloud(&self) -> MutexGuard<'_, Cloud> {
        // A panicking handler poisons nothing we cannot still read.
        self.cloud.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The world, if there is one.
    pub fn world(&self) -> Option<&World> {
        self.world.as_deref()
    }

    /// Pages hold at most `n` items, whatever `per_page` asks.
    pub fn set_page_size(&self, n: usize) {
        self.cloud().page_size = n.max(1);
    }

    /// How droplets created from now on behave.
    pub fn set_boot(&self, boot: Boot) {
        self.cloud().boot = boot;
    }

    /// Adds a private snapshot; returns its id.
    pub fn add_image(&self, name: &str, regions: &[&str], created_at: &str) -> u64 {
        let mut c = self.cloud();
        let id = c.fresh_id();
        c.images.push(json!({
            "id": id, "name": name, "type": "snapshot", "distribution": "Debian",
            "slug": null, "public": false, "regions": regions, "created_at": created_at,
            "min_disk_size": 10, "size_gigabytes": 1.2, "description": "", "tags": [],
            "status": "available", "error_message": ""
        }));
        id
    }

    /// Adds a reserved IPv4 address in `region`, unassigned.
    pub fn add_reserved_ip(&self, ip: Ipv4Addr, region: &str) {
        self.cloud()
            .reserved_ips
            .insert(ip, (region.to_owned(), None));
    }

    /// The droplet a reserved IP is assigned to.
    pub fn reserved_ip_droplet(&self, ip: Ipv4Addr) -> Option<u64> {
        self.cloud().reserved_ips.get(&ip).and_then(|(_, d)| *d)
    }

    /// Adds an active droplet that boots nothing (for `list`).
    pub fn seed_droplet(&self, name: &str, region: &str, tags: &[&str], v4: Ipv4Addr) -> u64 {
        let mut c = self.cloud();
        let id = c.fresh_id();
        let json = droplet_json(id, name, region, "s-1vcpu-512mb-10gb", tags);
        c.tags.extend(tags.iter().map(|t| (*t).to_owned()));
        c.droplets.insert(
            id,
            FakeDroplet {
                json,
                user_data: String::new(),
                gets_until_active: 0,
                public_v4: Some(v4),
                public_v6: None,
                machine: None,
            },
        );
        id
    }

    /// The next `times` calls of `method` to a path starting with
    /// `path_prefix` meet `fault`.
    pub fn inject(&self, method: &str, path_prefix: &str, fault: Fault, times: u32) {
        self.cloud().faults.push(FaultRule {
            method: method.to_owned(),
            path_prefix: path_prefix.to_owned(),
            fault,
            times,
        });
    }

    /// Every request so far.
    pub fn log(&self) -> Vec<Logged> {
        self.cloud().log.clone()
    }

    /// How many requests of `method` had a path starting with `prefix`.
    pub fn count(&self, method: &str, prefix: &str) -> usize {
        self.cloud()
            .log
            .iter()
            .filter(|l| l.method == method && l.path.starts_with(prefix))
            .count()
    }

    /// Ids of the droplets that exist.
    pub fn droplet_ids(&self) -> Vec<u64> {
        self.cloud().droplets.keys().copied().collect()
    }

    /// The user data a droplet was created with.
    pub fn user_data(&self, id: u64) -> Option<String> {
        self.cloud().droplets.get(&id).map(|d| d.user_data.clone())
    }

    /// Tags that exist.
    pub fn tags(&self) -> BTreeSet<String> {
        self.cloud().tags.clone()
    }
}

impl Drop for FakeDo {
    fn drop(&mut self) {
        drop(self.server.take());
        // Machines before the world they are linked into.
        let machines: Vec<Machine> = {
            let mut c = self.cloud();
            c.world = None;
            std::mem::take(&mut c.droplets)
                .into_values()
                .filter_map(|d| d.machine)
                .collect()
        };
        drop(machines);
    }
}

/// A server thread: in a namespace ([`Background`]) or in this process's.
enum Service {
    Ns(#[allow(dead_code, reason = "held for its Drop")] Background),
    Thread {
        stop: Option<oneshot::Sender<()>>,
        thread: Option<JoinHandle<()>>,
    },
}

impl Service {
    fn thread<Fut>(name: &str, f: impl FnOnce() -> Fut + Send + 'static) -> Service
    where
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake API runtime");
                runtime.block_on(async move {
                    tokio::select! {
                        () = f() => {}
                        _ = stopped => {}
                    }
                });
            })
            .expect("fake API thread");
        Service::Thread {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Service::Thread { stop, thread } = self {
            if let Some(stop) = stop.take() {
                let _ = stop.send(());
            }
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A droplet's machine: its namespace, links and services. Dropping it
/// stops the edge-agent and removes the namespace.
struct Machine {
    stop: CancellationToken,
    edge: Option<Background>,
    metadata: Option<Background>,
    veths: Vec<Veth>,
    ns: NetNs,
    world: Arc<World>,
    k: u8,
    extra: Vec<Ipv4Addr>,
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop.cancel();
        drop(self.edge.take());
        drop(self.metadata.take());
        for ip in std::mem::take(&mut self.extra) {
            self.unroute(ip);
        }
        self.veths.clear();
        tracing::debug!(netns = self.ns.name(), "fake droplet's machine stopped");
    }
}

impl Machine {
    fn public_v4(k: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, k, 1)
    }

    fn public_v6(k: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 5, u16::from(k), 0, 0, 0, 0, 1)
    }

    fn boot(world: Arc<World>, k: u8, user_data: String, boot: Boot) -> anyhow::Result<Machine> {
        let ns = NetNs::create(&format!("{}-drop", unique(NETNS_PREFIX)))?;
        let home = Veth::create(Some(&world.home), &format!("dh{k}"), Some(&ns), "eth0")?;
        home.add_addr(Side::A, &format!("198.18.{k}.2/24"))?;
        home.add_addr(Side::A, &format!("fd00:5:{k}::2/64"))?;
        home.add_addr(Side::B, &format!("{}/24", Self::public_v4(k)))?;
        home.add_addr(Side::B, &format!("{}/64", Self::public_v6(k)))?;
        let client = Veth::create(Some(&world.client), &format!("dc{k}"), Some(&ns), "eth1")?;
        client.add_addr(Side::A, &format!("198.19.{k}.2/24"))?;
        client.add_addr(Side::A, &format!("fd00:6:{k}::2/64"))?;
        client.add_addr(Side::B, &format!("198.19.{k}.1/24"))?;
        client.add_addr(Side::B, &format!("fd00:6:{k}::1/64"))?;
        world.client.ip(&[
            "route",
            "add",
            &format!("{}/32", Self::public_v4(k)),
            "via",
            &format!("198.19.{k}.1"),
        ])?;
        world.client.ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", Self::public_v6(k)),
            "via",
            &format!("fd00:6:{k}::1"),
        ])?;
        // The metadata service, as on a droplet: link-local, host scope
        // (so the edge-agent does not count it as a public address).
        ns.ip(&[
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "lo",
            "scope",
            "host",
        ])?;
        let listener = tcp_listener_in(&ns, SocketAddr::from(([169, 254, 169, 254], 80)));
        let metadata = spawn_in(&ns, move || async move {
            let listener = TcpListener::from_std(listener).expect("metadata listener");
            serve_http(listener, move |req| {
                if req.method == "GET" && req.path == edge_agent::metadata::USER_DATA_PATH {
                    Reply::new(200, user_data.clone().into_bytes()).content_type("text/plain")
                } else {
                    Reply::new(404, b"not found".to_vec())
                }
            })
            .await;
        });
        let stop = CancellationToken::new();
        let edge = match boot {
            Boot::Silent => None,
            Boot::EdgeAgent => {
                let token = stop.clone();
                Some(spawn_in(&ns, move || async move {
                    let url = edge_agent::metadata::MetadataUrl::default();
                    match edge_agent::metadata::fetch_bootstrap(&url, &token).await {
                        Ok(Some(bootstrap)) => {
                            let opts = edge_agent::EdgeOptions::new(bootstrap);
                            if let Err(e) = edge_agent::run(opts, token).await {
                                tracing::error!(error = %format!("{e:#}"), "fake droplet: edge-agent failed");
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "fake droplet: no bootstrap");
                        }
                    }
                }))
            }
        };
        Ok(Machine {
            stop,
            edge,
            metadata: Some(metadata),
            veths: vec![home, client],
            ns,
            world,
            k,
            extra: Vec::new(),
        })
    }

    /// Routes a reserved IP to this machine, as DigitalOcean does.
    fn route(&mut self, ip: Ipv4Addr) {
        let k = self.k;
        let results = [
            self.ns
                .ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]),
            self.world.client.ip(&[
                "route",
                "add",
                &format!("{ip}/32"),
                "via",
                &format!("198.19.{k}.1"),
            ]),
            self.world.home.ip(&[
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                &format!("dh{k}"),
            ]),
        ];
        for r in results {
            if let Err(e) = r {
                tracing::warn!(error = %e, "fake cloud: routing a reserved IP");
            }
        }
        self.extra.push(ip);
    }

    fn unroute(&self, ip: Ipv4Addr) {
        let _ = self
            .ns
            .ip(&["addr", "del", &format!("{ip}/32"), "dev", "eth0"]);
        let _ = self.world.client.ip(&["route", "del", &format!("{ip}/32")]);
        let _ = self.world.home.ip(&["route", "del", &format!("{ip}/32")]);
    }
}

fn droplet_json(id: u64, name: &str, region: &str, size: &str, tags: &[&str]) -> Value {
    json!({
        "id": id, "name": name, "memory": 512, "vcpus": 1, "disk": 10, "locked": false,
        "status": "new", "kernel": null, "created_at": now_rfc3339(),
        "features": [], "backup_ids": [], "snapshot_ids": [], "volume_ids": [],
        "image": {}, "size": {"slug": size}, "size_slug": size,
        "networks": {"v4": [], "v6": []},
        "region": {"slug": region, "name": region, "available": true},
        "tags": tags, "vpc_uuid": "00000000-0000-0000-0000-000000000000"
    })
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "2026-01-01T00:00:00Z".into())
}

impl Cloud {
    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The droplet as the API shows it; each GET moves a new one on.
    fn droplet_view(&mut self, id: u64, advance: bool) -> Option<Value> {
        let d = self.droplets.get_mut(&id)?;
        if advance && d.gets_until_active > 0 {
            d.gets_until_active -= 1;
        }
        let mut v = d.json.clone();
        if d.gets_until_active == 0 {
            v["status"] = json!("active");
            let mut v4 = Vec::new();
            if let Some(ip) = d.public_v4 {
                v4.push(
                    json!({"ip_address": ip.to_string(), "netmask": "255.255.255.0",
                    "gateway": "198.18.0.254", "type": "public"}),
                );
                v4.push(
                    json!({"ip_address": "10.110.0.2", "netmask": "255.255.240.0",
                    "gateway": "10.110.0.1", "type": "private"}),
                );
            }
            let v6: Vec<Value> = d
                .public_v6
                .iter()
                .map(|ip| {
                    json!({"ip_address": ip.to_string(), "netmask": 64,
                    "gateway": "fd00:5::fffe", "type": "public"})
                })
                .collect();
            v["networks"] = json!({"v4": v4, "v6": v6});
        }
        Some(v)
    }

    fn take_fault(&mut self, method: &str, path: &str) -> Option<Fault> {
        let i = self
            .faults
            .iter()
            .position(|f| f.times > 0 && f.method == method && path.starts_with(&f.path_prefix))?;
        let rule = &mut self.faults[i];
        rule.times -= 1;
        let fault = rule.fault.clone();
        if rule.times == 0 {
            self.faults.remove(i);
        }
        Some(fault)
    }

    fn create_droplet(&mut self, body: &Value) -> Reply {
        let s = |k: &str| {
            body.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let (name, region, size) = (s("name"), s("region"), s("size"));
        let user_data = s("user_data");
        if name.is_empty() || region.is_empty() || size.is_empty() {
            return error(
                422,
                "unprocessable_entity",
                "name, region and size are required",
            );
        }
        let image_id = body.get("image").and_then(Value::as_u64);
        let Some(image) = image_id.and_then(|id| self.images.iter().find(|i| i["id"] == id)) else {
            return error(
                422,
                "unprocessable_entity",
                "You specified an invalid image for Droplet creation.",
            );
        };
        if !image["regions"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == region.as_str()))
        {
            return error(
                422,
                "unprocessable_entity",
                "Region is not available for this image.",
            );
        }
        if user_data.len() > 64 * 1024 {
            return error(
                422,
                "unprocessable_entity",
                "user_data is limited to 64 KiB",
            );
        }
        let tags: Vec<String> = body
            .get("tags")
            .and_then(Value::as_array)
            .map(|t| {
                t.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let id = self.fresh_id();
        let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        let json = droplet_json(id, &name, &region, &size, &tag_refs);
        self.tags.extend(tags.iter().cloned());
        let mut droplet = FakeDroplet {
            json,
            user_data: user_data.clone(),
            gets_until_active: 1,
            public_v4: None,
            public_v6: None,
            machine: None,
        };
        if let Some(world) = self.world.clone() {
            self.boots += 1;
            let k = self.boots;
            match Machine::boot(world, k, user_data, self.boot) {
                Ok(m) => {
                    droplet.public_v4 = Some(Machine::public_v4(k));
                    droplet.public_v6 = Some(Machine::public_v6(k));
                    droplet.machine = Some(m);
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "fake cloud: cannot boot a droplet")
                }
            }
        }
        let action = self.fresh_id();
        let mut v = droplet.json.clone();
        v["status"] = json!("new");
        self.droplets.insert(id, droplet);
        Reply::json(
            202,
            &json!({"droplet": v, "links": {"actions": [
                {"id": action, "rel": "create", "href": format!("https://api.digitalocean.com/v2/actions/{action}")}
            ]}}),
        )
    }

    fn delete_droplet(&mut self, id: u64) -> Reply {
        match self.droplets.remove(&id) {
            Some(d) => {
                for (_, assigned) in self.reserved_ips.values_mut() {
                    if *assigned == Some(id) {
                        *assigned = None;
                    }
                }
                drop(d.machine);
                Reply::new(204, Vec::new())
            }
            None => not_found(),
        }
    }

    fn reserved_ip_json(&mut self, ip: Ipv4Addr) -> Option<Value> {
        let (region, droplet) = self.reserved_ips.get(&ip).cloned()?;
        let droplet = match droplet {
            Some(id) => self.droplet_view(id, false).unwrap_or(Value::Null),
            None => Value::Null,
        };
        Some(
            json!({"ip": ip.to_string(), "region": {"slug": region, "name": region},
            "droplet": droplet, "locked": false, "project_id": "p"}),
        )
    }

    fn reserved_ip_action(&mut self, ip: Ipv4Addr, body: &Value) -> Reply {
        let Some((region, assigned)) = self.reserved_ips.get(&ip).cloned() else {
            return not_found();
        };
        let kind = body.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "assign" => {
                let Some(id) = body.get("droplet_id").and_then(Value::as_u64) else {
                    return error(422, "unprocessable_entity", "droplet_id is required");
                };
                let Some(d) = self.droplets.get_mut(&id) else {
                    return error(422, "unprocessable_entity", "Droplet not found.");
                };
                if d.json["region"]["slug"] != region.as_str() {
                    return error(
                        422,
                        "unprocessable_entity",
                        "The Droplet and the reserved IP must be in the same region.",
                    );
                }
                if let Some(m) = d.machine.as_mut() {
                    m.route(ip);
                }
                if let Some(old) = assigned.filter(|o| *o != id)
                    && let Some(m) = self.droplets.get_mut(&old).and_then(|d| d.machine.as_mut())
                {
                    m.unroute(ip);
                }
                self.reserved_ips.insert(ip, (region.clone(), Some(id)));
            }
            "unassign" => {
                if let Some(old) = assigned
                    && let Some(m) = self.droplets.get_mut(&old).and_then(|d| d.machine.as_mut())
                {
                    m.unroute(ip);
                }
                self.reserved_ips.insert(ip, (region.clone(), None));
            }
            _ => return error(422, "unprocessable_entity", "unknown action type"),
        }
        let id = self.fresh_id();
        let action = json!({"id": id, "status": "in-progress", "type": format!("{kind}_ip"),
            "started_at": now_rfc3339(), "completed_at": null, "resource_id": 0,
            "resource_type": "reserved_ip", "region_slug": region});
        self.actions.insert(id, action.clone());
        Reply::json(201, &json!({"action": action}))
    }

    /// A page of `items` per the query's `page`/`per_page`, with the links
    /// DigitalOcean gives (absolute, on its own host) and `meta.total`.
    fn page(&self, key: &str, items: Vec<Value>, path: &str, query: &Query) -> Reply {
        let per_page = query
            .get("per_page")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(20)
            .clamp(1, 200)
            .min(self.page_size);
        let page = query
            .get("page")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let total = items.len();
        let pages = total.div_ceil(per_page).max(1);
        let these: Vec<Value> = items
            .into_iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .collect();
        let link = |p: usize| {
            let mut q: Vec<String> = query
                .pairs
                .iter()
                .filter(|(k, _)| k != "page" && k != "per_page")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            q.push(format!("page={p}"));
            q.push(format!("per_page={per_page}"));
            format!("https://api.digitalocean.com{path}?{}", q.join("&"))
        };
        let mut pages_links = serde_json::Map::new();
        if page > 1 {
            pages_links.insert("first".into(), json!(link(1)));
            pages_links.insert("prev".into(), json!(link(page - 1)));
        }
        if page < pages {
            pages_links.insert("next".into(), json!(link(page + 1)));
            pages_links.insert("last".into(), json!(link(pages)));
        }
        Reply::json(
            200,
            &json!({key: these, "links": {"pages": pages_links}, "meta": {"total": total}}),
        )
    }
}

/// The query of a request, in order.
struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    fn parse(q: &str) -> Query {
        Query {
            pairs: q
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (p.to_owned(), String::new()),
                })
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn error(status: u16, id: &str, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({"id": id, "message": message, "request_id": "00000000-fake"}),
    )
}

fn not_found() -> Reply {
    error(
        404,
        "not_found",
        "The resource you were accessing could not be found.",
    )
}

fn handle(cloud: &Mutex<Cloud>, req: Request) -> Reply {
    let mut c = cloud.lock().unwrap_or_else(|p| p.into_inner());
    let mut reply = route(&mut c, &req);
    c.remaining = c.remaining.saturating_sub(1);
    let reset = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 60;
    reply
        .headers
        .push(("ratelimit-limit".into(), "5000".into()));
    reply
        .headers
        .push(("ratelimit-remaining".into(), c.remaining.to_string()));
    if !reply.headers.iter().any(|(k, _)| k == "ratelimit-reset") {
        reply
            .headers
            .push(("ratelimit-reset".into(), reset.to_string()));
    }
    c.log.push(Logged {
        method: req.method.clone(),
        path: req.path.clone(),
        status: if reply.hang_up { 0 } else { reply.status },
    });
    reply
}

fn route(c: &mut Cloud, req: &Request) -> Reply {
    let auth = req.header("authorization").unwrap_or_default();
    if auth != format!("Bearer {}", c.token) {
        return error(401, "unauthorized", "Unable to authenticate you");
    }
    let fault = c.take_fault(&req.method, &req.path);
    let after_work = match fault {
        Some(Fault::Status(status)) => {
            return error(
                status,
                "server_error",
                "Server was unable to give you a response.",
            );
        }
        Some(Fault::Refuse { status, message }) => {
            return error(status, "unprocessable_entity", message);
        }
        Some(Fault::RateLimit {
            retry_after,
            reset_in,
        }) => {
            let mut r = error(429, "too_many_requests", "API Rate limit exceeded.");
            if let Some(s) = retry_after {
                r.headers.push(("retry-after".into(), s.to_string()));
            }
            let reset = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                + reset_in;
            r.headers
                .push(("ratelimit-reset".into(), reset.to_string()));
            return r;
        }
        Some(Fault::HangUp) => {
            let mut r = Reply::new(0, Vec::new());
            r.hang_up = true;
            return r;
        }
        Some(Fault::Stall(d)) => {
            let mut r = dispatch(c, req);
            r.delay = Some(d);
            return r;
        }
        Some(Fault::StatusAfterWork(status)) => Some(status),
        None => None,
    };
    let reply = dispatch(c, req);
    match after_work {
        Some(status) => error(
            status,
            "server_error",
            "Server was unable to give you a response.",
        ),
        None => reply,
    }
}

fn dispatch(c: &mut Cloud, req: &Request) -> Reply {
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Query::parse(q)),
        None => (req.path.as_str(), Query::parse("")),
    };
    let body: Value = if req.body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&req.body) {
            Ok(v) => v,
            Err(_) => return error(400, "bad_request", "The request body is not JSON."),
        }
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["v2", "images"]) => {
            let private = query.get("private") == Some("true");
            let items: Vec<Value> = c
                .images
                .iter()
                .filter(|i| !private || i["public"] == false)
                .cloned()
                .collect();
            c.page("images", items, path, &query)
        }
        ("GET", ["v2", "images", id]) => {
            let id: Option<u64> = id.parse().ok();
            match c.images.iter().find(|i| id.is_some_and(|id| i["id"] == id)) {
                Some(i) => Reply::json(200, &json!({"image": i})),
                None => not_found(),
            }
        }
        ("GET", ["v2", "droplets"]) => {
            let tag = query.get("tag_name").map(str::to_owned);
            let ids: Vec<u64> = c
                .droplets
                .iter()
                .filter(|(_, d)| {
                    tag.as_ref().is_none_or(|t| {
                        d.json["tags"]
                            .as_array()
                            .is_some_and(|a| a.iter().any(|x| x == t.as_str()))
                    })
                })
                .map(|(id, _)| *id)
                .collect();
            let items = ids
                .into_iter()
                .filter_map(|id| c.droplet_view(id, false))
                .collect();
            c.page("droplets", items, path, &query)
        }
        ("POST", ["v2", "droplets"]) => c.create_droplet(&body),
        ("GET", ["v2", "droplets", id]) => {
            match id.parse().ok().and_then(|id| c.droplet_view(id, true)) {
                Some(d) => Reply::json(200, &json!({"droplet": d})),
                None => not_found(),
            }
        }
        ("DELETE", ["v2", "droplets", id]) => match id.parse() {
            Ok(id) => c.delete_droplet(id),
            Err(_) => not_found(),
        },
        ("GET", ["v2", "reserved_ips", ip]) => {
            match ip.parse().ok().and_then(|ip| c.reserved_ip_json(ip)) {
                Some(r) => Reply::json(200, &json!({"reserved_ip": r})),
                None => not_found(),
            }
        }
        ("POST", ["v2", "reserved_ips", ip, "actions"]) => match ip.parse() {
            Ok(ip) => c.reserved_ip_action(ip, &body),
            Err(_) => not_found(),
        },
        ("GET", ["v2", "actions", id]) => {
            let Some(action) = id.parse::<u64>().ok().and_then(|id| c.actions.get_mut(&id)) else {
                return not_found();
            };
            // Actions finish by the first time someone looks.
            action["status"] = json!("completed");
            action["completed_at"] = json!(now_rfc3339());
            Reply::json(200, &json!({"action": action.clone()}))
        }
        ("DELETE", ["v2", "tags", tag]) => {
            if c.tags.remove(*tag) {
                for d in c.droplets.values_mut() {
                    if let Some(tags) = d.json["tags"].as_array_mut() {
                        tags.retain(|t| t != *tag);
                    }
                }
                Reply::new(204, Vec::new())
            } else {
                not_found()
            }
        }
        _ => not_found(),
    }
}

/// A parsed request.
pub struct Request {
    pub method: String,
    /// Path and query.
    pub path: String,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An answer, or a misbehaviour.
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Option<Duration>,
    hang_up: bool,
}

impl Reply {
    fn new(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body,
            delay: None,
            hang_up: false,
        }
    }

    fn json(status: u16, v: &Value) -> Reply {
        Reply::new(status, v.to_string().into_bytes())
            .content_type("application/json; charset=utf-8")
    }

    fn content_type(mut self, ct: &str) -> Reply {
        self.headers.push(("content-type".into(), ct.into()));
        self
    }
}

/// Serves HTTP/1.1, one request per connection, until dropped.
async fn serve_http<H>(listener: TcpListener, handler: H)
where
    H: Fn(Request) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &*handler).await {
                tracing::debug!(error = %e, "fake HTTP connection failed");
            }
        });
    }
}

async fn serve_connection<H>(mut stream: TcpStream, handler: &H) -> std::io::Result<()>
where
    H: Fn(Request) -> Reply + Send + Sync,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_owned();
    let path = first.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    let reply = handler(Request {
        method,
        path,
        headers,
        body,
    });
    if let Some(d) = reply.delay {
        tokio::time::sleep(d).await;
    }
    if reply.hang_up {
        return Ok(());
    }
    let reason = match reply.status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        401 => "Unauthorized",
        404 => "Not Found",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        _ => "Status",
    };
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        reply.body.len()
    ));
    stream.write_all(out.as_bytes()).await?;
    stream.write_all(&reply.body).await?;
    stream.shutdown().await
}
