//! A client for the calls skerry makes to DigitalOcean's API v2, with the
//! retry rule each call needs.
//!
//! - Every answer is classified into an [`ApiError`] that says what to do:
//!   a refused token (401/403), a refused request (422, with DigitalOcean's
//!   own `message`), the rate limit (429), a server error (5xx), a timeout.
//! - 429 is retried for every call, after `Retry-After` or `ratelimit-reset`:
//!   the request was refused, not carried out.
//! - 5xx, timeouts and broken connections are retried with bounded backoff
//!   only for calls that are safe to repeat (GET, DELETE). A POST is retried
//!   only when it was certainly never sent (the connection failed); any
//!   other failure of a POST comes back with [`ApiError::outcome_unknown`]
//!   set, so that the caller checks what exists before trying again (see
//!   `droplet::create`).
//! - The token lives in an [`ApiToken`], which never prints, and goes out in
//!   a header marked sensitive. Pagination links (`links.pages.next`) are
//!   followed by path only, against the configured base URL, so the token
//!   is never sent to a host that an answer names.
//!
//! Answers are decoded leniently (unknown fields are ignored): this is
//! DigitalOcean's format, and it grows fields without notice.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::backoff::Backoff;

/// Where the API is, unless `--api-url` / `SKERRY_DO_API_URL` says otherwise.
pub const DEFAULT_API_URL: &str = "https://api.digitalocean.com";

/// Items asked for per page; DigitalOcean's maximum.
const PER_PAGE: u32 = 200;

/// A list longer than this many pages is a loop in the links, not a list.
const MAX_PAGES: usize = 100;

/// An answer larger than this is refused: no call skerry makes comes near.
const MAX_BODY: usize = 16 << 20;

/// Environment variables read for the token, in this order.
pub const TOKEN_VARS: [&str; 2] = ["DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN"];

/// A DigitalOcean API token. `Debug` shows `[redacted]` and there is no
/// `Display`: the only way out is the request header.
#[derive(Clone)]
pub struct ApiToken(String);

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken([redacted])")
    }
}

/// Why no usable token was found.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "no DigitalOcean API token: set DIGITALOCEAN_TOKEN (or DIGITALOCEAN_ACCESS_TOKEN) or pass \
         --token-file FILE; make one with read and write scope in the control panel, under API"
    )]
    Missing,
    #[error("the DigitalOcean API token from {from} is empty")]
    Empty { from: String },
    #[error(
        "the DigitalOcean API token from {from} holds characters a token cannot have (spaces, \
         control characters or non-ASCII)"
    )]
    Invalid { from: String },
    #[error("cannot read the token file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ApiToken {
    /// A token from its text; surrounding whitespace (a trailing newline in
    /// a file) is dropped. `from` names the source in errors.
    pub fn new(text: &str, from: &str) -> Result<ApiToken, TokenError> {
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty { from: from.into() });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid { from: from.into() });
        }
        Ok(ApiToken(token.to_owned()))
    }

    /// The token of the first of [`TOKEN_VARS`] that is set.
    pub fn from_env() -> Result<Option<ApiToken>, TokenError> {
        for var in TOKEN_VARS {
            if let Some(value) = std::env::var_os(var) {
                let text = value.into_string().map_err(|_| TokenError::Invalid {
                    from: format!("${var}"),
                })?;
                return ApiToken::new(&text, &format!("${var}")).map(Some);
            }
        }
        Ok(None)
    }

    /// The token in `path` (its first line). A file that others may read
    /// is used, with a warning.
    pub fn from_file(path: &Path) -> Result<ApiToken, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = std::fs::read_to_string(path).map_err(read)?;
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                warn!(path = %path.display(), "the token file is readable by other users; chmod 600 it");
            }
        }
        let first = text.lines().next().unwrap_or("");
        ApiToken::new(first, &path.display().to_string())
    }

    /// `--token-file` if given, else the environment.
    pub fn load(file: Option<&Path>) -> Result<ApiToken, TokenError> {
        match file {
            Some(path) => ApiToken::from_file(path),
            None => ApiToken::from_env()?.ok_or(TokenError::Missing),
        }
    }

    fn header(&self) -> Result<HeaderValue, TokenError> {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0)).map_err(|_| {
            TokenError::Invalid {
                from: "the token".into(),
            }
        })?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// One API call, for messages: `GET /v2/droplets/42`.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// Why a call failed, one variant per thing the user does about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "DigitalOcean refused the API token ({status} {id}: {message}); check DIGITALOCEAN_TOKEN \
         or --token-file: the token may be mistyped, expired or revoked"
    )]
    Unauthorized {
        call: Call,
        status: u16,
        id: String,
        message: String,
    },
    #[error(
        "the API token may not do {call} (403 {id}: {message}); a custom-scoped token needs \
         create, read and delete on droplet, image, tag and reserved_ip"
    )]
    Forbidden {
        call: Call,
        id: String,
        message: String,
    },
    #[error("DigitalOcean refused {call}: {message} (422 {id})")]
    Unprocessable {
        call: Call,
        id: String,
        message: String,
    },
    #[error("{call}: not found ({message})")]
    NotFound { call: Call, message: String },
    #[error(
        "DigitalOcean's rate limit is used up: {call} was still refused with 429 after {attempts} \
         tries{}; try again later",
        reset_note(.reset_in)
    )]
    RateLimited {
        call: Call,
        attempts: u32,
        reset_in: Option<Duration>,
    },
    #[error(
        "DigitalOcean answered {status} to {call} ({attempts} {}): {message}; its API may be \
         having trouble, try again later",
        tries(*.attempts)
    )]
    Server {
        call: Call,
        status: u16,
        message: String,
        attempts: u32,
        outcome_unknown: bool,
    },
    #[error("no answer from DigitalOcean to {call} within {timeout:?} ({attempts} {})", tries(*.attempts))]
    Timeout {
        call: Call,
        timeout: Duration,
        attempts: u32,
        outcome_unknown: bool,
    },
    #[error("cannot reach the DigitalOcean API for {call} ({attempts} {})", tries(*.attempts))]
    Transport {
        call: Call,
        attempts: u32,
        outcome_unknown: bool,
        #[source]
        source: reqwest::Error,
    },
    #[error("DigitalOcean answered {status} to {call}: {message} ({id})")]
    Status {
        call: Call,
        status: u16,
        id: String,
        message: String,
    },
    #[error("unexpected answer from DigitalOcean to {call}: {reason}")]
    Decode { call: Call, reason: String },
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the API URL {url} is not usable: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
}

fn reset_note(reset_in: &Option<Duration>) -> String {
    reset_in
        .map(|d| format!(" (the limit resets in {}s)", d.as_secs()))
        .unwrap_or_default()
}

fn tries(n: u32) -> &'static str {
    if n == 1 { "try" } else { "tries" }
}

impl ApiError {
    /// Whether a failed POST may nevertheless have been carried out: the
    /// request went out and no clear answer came back.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            ApiError::Server {
                outcome_unknown, ..
            }
            | ApiError::Timeout {
                outcome_unknown, ..
            }
            | ApiError::Transport {
                outcome_unknown, ..
            } => *outcome_unknown,
            _ => false,
        }
    }

    /// Whether DigitalOcean said the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::NotFound { .. })
    }
}

/// How a [`Client`] talks to the API. [`ClientOptions::new`] gives the
/// values production uses; only the base URL differs in the tests.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub base_url: Url,
    /// Per request, answer included.
    pub request_timeout: Duration,
    /// Retries of a safe call after a 5xx, a timeout or a broken connection.
    pub retries: u32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Retries after a 429.
    pub rate_limit_retries: u32,
    /// A 429 that asks for a longer wait than this fails instead.
    pub max_rate_limit_wait: Duration,
}

impl ClientOptions {
    /// Production settings for the API at `base_url` (scheme, host and
    /// port; no path). Plain `http` is refused except to a loopback
    /// address, which only a test stand-in uses: the token would travel in
    /// clear.
    pub fn new(base_url: &str) -> Result<ClientOptions, ApiError> {
        let bad = |reason| ApiError::BadUrl {
            url: base_url.to_owned(),
            reason,
        };
        let url = Url::parse(base_url).map_err(|_| bad("it does not parse as a URL"))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let loopback = url.host_str().is_some_and(|h| {
                    h == "localhost"
                        || h.trim_start_matches('[')
                            .trim_end_matches(']')
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                });
                if !loopback {
                    return Err(bad(
                        "plain http would send the API token in clear; use https",
                    ));
                }
            }
            _ => return Err(bad("the scheme must be https")),
        }
        if url.host().is_none() {
            return Err(bad("it has no host"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(bad("give only scheme, host and port"));
        }
        Ok(ClientOptions {
            base_url: url,
            request_timeout: Duration::from_secs(30),
            retries: 4,
            retry_base: Duration::from_millis(500),
            retry_cap: Duration::from_secs(8),
            rate_limit_retries: 5,
            max_rate_limit_wait: Duration::from_secs(90),
        })
    }
}

/// Installs *ring* as rustls' process-wide provider, which reqwest's
/// `rustls-no-provider` build needs before a client is built. Once per
/// process; a provider someone else installed first is kept.
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err: a provider is already installed, which is all we need.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Whether a failed call may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// GET and DELETE: repeating them changes nothing.
    Safe,
    /// POST: repeated only if it was certainly not sent, or refused by 429.
    Once,
}

/// DigitalOcean's error body: `{"id":"unauthorized","message":"..."}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
}

impl ErrorBody {
    fn parse(status: StatusCode, body: &[u8]) -> ErrorBody {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) if !b.message.is_empty() || !b.id.is_empty() => b,
            _ => {
                // Not DigitalOcean's JSON (a proxy's page, say): a short,
                // printable excerpt is more use than nothing.
                let text: String = String::from_utf8_lossy(body)
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect();
                ErrorBody {
                    id: status.canonical_reason().unwrap_or("error").to_owned(),
                    message: if text.trim().is_empty() {
                        "(no message)".to_owned()
                    } else {
                        text.trim().to_owned()
                    },
                }
            }
        }
    }
}

/// The wait a 429 asks for: `Retry-After` (seconds) if present, else
/// until `ratelimit-reset` (a Unix time), else a few seconds.
pub fn rate_limit_wait(headers: &HeaderMap, now: SystemTime) -> Duration {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(secs) = number(header::RETRY_AFTER.as_str()) {
        return Duration::from_secs(secs).max(Duration::from_millis(100));
    }
    if let Some(reset) = number("ratelimit-reset") {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        return Duration::from_secs(reset.saturating_sub(now)).max(Duration::from_secs(1));
    }
    Duration::from_secs(5)
}

/// The API client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    auth: HeaderValue,
    opts: ClientOptions,
}

impl Client {
    pub fn new(token: &ApiToken, opts: ClientOptions) -> Result<Client, ApiError> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("skerry-home-agent/", env!("CARGO_PKG_VERSION")))
            .timeout(opts.request_timeout)
            .connect_timeout(opts.request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(ApiError::Client)?;
        Ok(Client {
            http,
            auth: token.header()?,
            opts,
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn url(&self, path: &str) -> Result<Url, ApiError> {
        self.opts.base_url.join(path).map_err(|_| ApiError::BadUrl {
            url: format!("{}{path}", self.opts.base_url),
            reason: "the path does not form a URL",
        })
    }

    /// Sends one call with its retry rule and returns a successful answer's
    /// body; every other outcome becomes an [`ApiError`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        retry: Retry,
    ) -> Result<Vec<u8>, ApiError> {
        let call = Call {
            method: method.clone(),
            path: path.to_owned(),
        };
        let url = self.url(path)?;
        let mut backoff = Backoff::new(self.opts.retry_base, self.opts.retry_cap);
        let mut attempts = 0u32;
        let mut failures = 0u32;
        let mut limited = 0u32;
        loop {
            attempts += 1;
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .header(header::AUTHORIZATION, self.auth.clone())
                .header(header::ACCEPT, "application/json");
            if let Some(body) = &body {
                request = request
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(body.clone());
            }
            let answer = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    read_body(response).await.map(|b| (status, headers, b))
                }
                Err(e) => Err(e),
            };
            let (status, headers, bytes) = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    // A connection that never opened carried no request.
                    let never_sent = e.is_connect();
                    failures += 1;
                    if (retry == Retry::Safe || never_sent) && failures <= self.opts.retries {
                        let wait = backoff.next_delay(rand::random::<f64>());
                        debug!(%call, error = %e, retry_in = ?wait, "DigitalOcean API call failed; retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let outcome_unknown = retry == Retry::Once && !never_sent;
                    return Err(if e.is_timeout() {
                        ApiError::Timeout {
                            call,
                            timeout: self.opts.request_timeout,
                            attempts,
                            outcome_unknown,
                        }
                    } else {
                        ApiError::Transport {
                            call,
                            attempts,
                            outcome_unknown,
                            source: e,
                        }
                    });
                }
            };
            if status.is_success() {
                return Ok(bytes);
            }
            let err = ErrorBody::parse(status, &bytes);
            match status.as_u16() {
                429 => {
                    limited += 1;
                    let wait = rate_limit_wait(&headers, SystemTime::now());
                    if limited <= self.opts.rate_limit_retries
                        && wait <= self.opts.max_rate_limit_wait
                    {
                        warn!(%call, wait = ?wait, "DigitalOcean rate limit reached; waiting as it asks");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(ApiError::RateLimited {
                        call,
                        attempts,
                        reset_in: Some(wait),
                    });
                }
                500..=599 => {
                    failures += 1;
                    if retry == Retry::Safe && failures <= self.opts.retries {
                        let wait = backoff.next_delay(rand::random::<f64>());
                        warn!(%call, status = status.as_u16(), retry_in = ?wait, "DigitalOcean server error; retrying");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    return Err(ApiError::Server {
                        call,
                        status: status.as_u16(),
                        message: err.message,
                        attempts,
                        outcome_unknown: retry == Retry::Once,
                    });
                }
                401 => {
                    return Err(ApiError::Unauthorized {
                        call,
                        status: 401,
                        id: err.id,
                        message: err.message,
                    });
                }
                403 => {
                    return Err(ApiError::Forbidden {
                        call,
                        id: err.id,
                        message: err.message,
                    });
                }
                404 => {
                    return Err(ApiError::NotFound {
                        call,
                        message: err.message,
                    });
                }
                422 => {
                    return Err(ApiError::Unprocessable {
                        call,
                        id: err.id,
                        message: err.message,
                    });
                }
                other => {
                    return Err(ApiError::Status {
                        call,
                        status: other,
                        id: err.id,
                        message: err.message,
                    });
                }
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let body = self.send(Method::GET, path, None, Retry::Safe).await?;
        decode(Method::GET, path, &body)
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Decode {
            call: Call {
                method: Method::POST,
                path: path.to_owned(),
            },
            reason: format!("cannot encode the request: {e}"),
        })?;
        let answer = self
            .send(Method::POST, path, Some(bytes), Retry::Once)
            .await?;
        decode(Method::POST, path, &answer)
    }

    /// DELETE; `Ok(false)` if it was already gone (a retried DELETE may
    /// find its first try's work done).
    async fn delete(&self, path: &str) -> Result<bool, ApiError> {
        match self.send(Method::DELETE, path, None, Retry::Safe).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every item of a paginated list: `key` holds the items of each page,
    /// `links.pages.next` leads to the next one.
    async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        key: &'static str,
    ) -> Result<Vec<T>, ApiError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut next = Some(format!("{path}{sep}per_page={PER_PAGE}"));
        let mut items = Vec::new();
        let mut pages = 0;
        while let Some(page_path) = next.take() {
            pages += 1;
            let call = || Call {
                method: Method::GET,
                path: page_path.clone(),
            };
            if pages > MAX_PAGES {
                return Err(ApiError::Decode {
                    call: call(),
                    reason: format!("more than {MAX_PAGES} pages; the links loop"),
                });
            }
            let mut page: serde_json::Map<String, serde_json::Value> = self.get(&page_path).await?;
            let list = page.remove(key).ok_or_else(|| ApiError::Decode {
                call: call(),
                reason: format!("no \"{key}\" in the answer"),
            })?;
            let mut these: Vec<T> = serde_json::from_value(list).map_err(|e| ApiError::Decode {
                call: call(),
                reason: e.to_string(),
            })?;
            items.append(&mut these);
            let links: Links = page
                .remove("links")
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| ApiError::Decode {
                    call: call(),
                    reason: format!("links: {e}"),
                })?
                .unwrap_or_default();
            next = match links.pages.next {
                Some(link) => {
                    Some(
                        self.same_origin_path(&link)
                            .ok_or_else(|| ApiError::Decode {
                                call: call(),
                                reason: format!("a next-page link that is not an API path: {link}"),
                            })?,
                    )
                }
                None => None,
            };
        }
        Ok(items)
    }

    /// The path and query of a pagination link, to be requested from the
    /// configured base URL whatever host the link names.
    fn same_origin_path(&self, link: &str) -> Option<String> {
        let url = self.opts.base_url.join(link).ok()?;
        if !url.path().starts_with("/v2/") {
            return None;
        }
        Some(match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        })
    }

    /// `GET /v2/droplets/{id}`; `None` if there is no such droplet.
    pub async fn droplet(&self, id: u64) -> Result<Option<Droplet>, ApiError> {
        match self
            .get::<DropletEnvelope>(&format!("/v2/droplets/{id}"))
            .await
        {
            Ok(d) => Ok(Some(d.droplet)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v2/droplets?tag_name=TAG`, every page.
    pub async fn droplets_by_tag(&self, tag: &str) -> Result<Vec<Droplet>, ApiError> {
        self.list(&format!("/v2/droplets?tag_name={tag}"), "droplets")
            .await
    }

    /// `POST /v2/droplets`. Not repeated on a 5xx or a timeout: see
    /// [`ApiError::outcome_unknown`].
    pub async fn create_droplet(&self, req: &CreateDroplet<'_>) -> Result<Droplet, ApiError> {
        let created: DropletEnvelope = self.post("/v2/droplets", req).await?;
        Ok(created.droplet)
    }

    /// `DELETE /v2/droplets/{id}`; `Ok(false)` if it was already gone.
    pub async fn delete_droplet(&self, id: u64) -> Result<bool, ApiError> {
        self.delete(&format!("/v2/droplets/{id}")).await
    }

    /// The user's own images: custom images and snapshots
    /// (`GET /v2/images?private=true`, every page).
    pub async fn private_images(&self) -> Result<Vec<Image>, ApiError> {
        self.list("/v2/images?private=true", "images").await
    }

    /// `GET /v2/images/{id}`; `None` if there is no such image.
    pub async fn image(&self, id: u64) -> Result<Option<Image>, ApiError> {
        match self.get::<ImageEnvelope>(&format!("/v2/images/{id}")).await {
            Ok(i) => Ok(Some(i.image)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v2/reserved_ips/{ip}`; `None` if the account has no such IP.
    pub async fn reserved_ip(&self, ip: Ipv4Addr) -> Result<Option<ReservedIp>, ApiError> {
        match self
            .get::<ReservedIpEnvelope>(&format!("/v2/reserved_ips/{ip}"))
            .await
        {
            Ok(r) => Ok(Some(r.reserved_ip)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /v2/reserved_ips/{ip}/actions`: assign to a droplet, or
    /// unassign. Not repeated on a 5xx or a timeout.
    pub async fn reserved_ip_action(
        &self,
        ip: Ipv4Addr,
        action: ReservedIpAction,
    ) -> Result<Action, ApiError> {
        let a: ActionEnvelope = self
            .post(&format!("/v2/reserved_ips/{ip}/actions"), &action)
            .await?;
        Ok(a.action)
    }

    /// `GET /v2/actions/{id}`.
    pub async fn action(&self, id: u64) -> Result<Action, ApiError> {
        let a: ActionEnvelope = self.get(&format!("/v2/actions/{id}")).await?;
        Ok(a.action)
    }

    /// `DELETE /v2/tags/{tag}`; `Ok(false)` if there was no such tag.
    pub async fn delete_tag(&self, tag: &str) -> Result<bool, ApiError> {
        self.delete(&format!("/v2/tags/{tag}")).await
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes.
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY {
            // Keep what fits: the caller fails to decode a cut answer, and
            // an error body is only shown in part anyway.
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn decode<T: DeserializeOwned>(method: Method, path: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Decode {
        call: Call {
            method,
            path: path.to_owned(),
        },
        reason: e.to_string(),
    })
}

#[derive(Debug, Default, Deserialize)]
struct Links {
    #[serde(default)]
    pages: PageLinks,
}

#[derive(Debug, Default, Deserialize)]
struct PageLinks {
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DropletEnvelope {
    droplet: Droplet,
}

#[derive(Debug, Deserialize)]
struct ImageEnvelope {
    image: Image,
}

#[derive(Debug, Deserialize)]
struct ReservedIpEnvelope {
    reserved_ip: ReservedIp,
}

#[derive(Debug, Deserialize)]
struct ActionEnvelope {
    action: Action,
}

/// A droplet, as much of it as skerry reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Droplet {
    pub id: u64,
    pub name: String,
    pub status: DropletStatus,
    #[serde(default)]
    pub created_at: String,
    pub region: RegionRef,
    #[serde(default)]
    pub size_slug: String,
    #[serde(default)]
    pub networks: Networks,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl Droplet {
    /// The first public IPv4 address, once the droplet has one.
    pub fn public_v4(&self) -> Option<Ipv4Addr> {
        self.networks
            .v4
            .iter()
            .find(|n| n.kind == "public")
            .map(|n| n.ip_address)
    }

    /// The first public IPv6 address, if IPv6 is on.
    pub fn public_v6(&self) -> Option<Ipv6Addr> {
        self.networks
            .v6
            .iter()
            .find(|n| n.kind == "public")
            .map(|n| n.ip_address)
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// `droplet.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropletStatus {
    New,
    Active,
    Off,
    Archive,
    #[serde(other)]
    Other,
}

impl fmt::Display for DropletStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropletStatus::New => "new",
            DropletStatus::Active => "active",
            DropletStatus::Off => "off",
            DropletStatus::Archive => "archive",
            DropletStatus::Other => "unknown",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegionRef {
    pub slug: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Networks {
    #[serde(default)]
    pub v4: Vec<Network<Ipv4Addr>>,
    #[serde(default)]
    pub v6: Vec<Network<Ipv6Addr>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Network<A> {
    pub ip_address: A,
    #[serde(rename = "type")]
    pub kind: String,
}

/// An image (snapshot, custom image, backup or distribution).
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    pub id: u64,
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub created_at: String,
    /// `available`, `pending`, `deleted`…; absent on older answers.
    #[serde(default)]
    pub status: Option<String>,
}

/// A reserved IPv4 address.
#[derive(Debug, Clone, Deserialize)]
pub struct ReservedIp {
    pub ip: Ipv4Addr,
    pub region: RegionRef,
    /// The droplet it is assigned to, `null` when unassigned.
    pub droplet: Option<DropletId>,
}

/// A droplet object read only for its id.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct DropletId {
    pub id: u64,
}

/// The body of `POST /v2/reserved_ips/{ip}/actions`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ReservedIpAction {
    Assign { droplet_id: u64 },
    Unassign,
}

/// An action (a reserved IP assignment, for one).
#[derive(Debug, Clone, Deserialize)]
pub struct Action {
    pub id: u64,
    pub status: ActionStatus,
    #[serde(rename = "type", default)]
    pub kind: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionStatus {
    InProgress,
    Completed,
    Errored,
    #[serde(other)]
    Other,
}

/// The body of `POST /v2/droplets`. `Debug` leaves out `user_data`: it
/// holds the edge's private key.
#[derive(Serialize)]
pub struct CreateDroplet<'a> {
    pub name: &'a str,
    pub region: &'a str,
    pub size: &'a str,
    pub image: u64,
    pub ipv6: bool,
    pub monitoring: bool,
    pub backups: bool,
    pub with_droplet_agent: bool,
    pub tags: Vec<String>,
    pub user_data: &'a str,
}

impl fmt::Debug for CreateDroplet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateDroplet")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("size", &self.size)
            .field("image", &self.image)
            .field("tags", &self.tags)
            .field(
                "user_data",
                &format_args!("[{} bytes]", self.user_data.len()),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_never_prints_and_is_trimmed() {
        let t = ApiToken::new("  dop_v1_secret\n", "test").expect("valid");
        assert!(!format!("{t:?}").contains("secret"));
        assert_eq!(t.0, "dop_v1_secret");
        assert!(matches!(
            ApiToken::new(" \n", "x"),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            ApiToken::new("a b", "x"),
            Err(TokenError::Invalid { .. })
        ));
        let h = t.header().expect("header");
        assert!(h.is_sensitive());
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(ClientOptions::new("https://api.digitalocean.com").is_ok());
        assert!(ClientOptions::new("http://127.0.0.1:8080").is_ok());
        assert!(ClientOptions::new("http://[::1]:8080/").is_ok());
        assert!(ClientOptions::new("http://api.digitalocean.com").is_err());
        assert!(ClientOptions::new("https://example.com/v2").is_err());
        assert!(ClientOptions::new("ftp://example.com").is_err());
    }

    #[test]
    fn rate_limit_wait_prefers_retry_after_then_reset() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut h = HeaderMap::new();
        h.insert("ratelimit-reset", HeaderValue::from_static("1030"));
        assert_eq!(rate_limit_wait(&h, now), Duration::from_secs(30));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(rate_limit_wait(&h, now), Duration::from_secs(7));
        let mut past = HeaderMap::new();
        past.insert("ratelimit-reset", HeaderValue::from_static("10"));
        assert_eq!(rate_limit_wait(&past, now), Duration::from_secs(1));
        assert_eq!(
            rate_limit_wait(&HeaderMap::new(), now),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn error_bodies_are_read_or_excerpted() {
        let b = ErrorBody::parse(
            StatusCode::UNAUTHORIZED,
            br#"{"id":"unauthorized","message":"Unable to authenticate you"}"#,
        );
        assert_eq!(b.id, "unauthorized");
        assert_eq!(b.message, "Unable to authenticate you");
        let b = ErrorBody::parse(StatusCode::BAD_GATEWAY, b"<html>\nbad gateway</html>");
        assert_eq!(b.id, "Bad Gateway");
        assert!(b.message.contains("bad gateway"));
    }

    #[test]
    fn droplet_json_decodes() {
        let d: DropletEnvelope = serde_json::from_str(
            r#"{"droplet":{"id":3164494,"name":"skerry-x","memory":512,"status":"active",
            "created_at":"2020-07-21T18:37:44Z","region":{"slug":"fra1","name":"Frankfurt 1"},
            "size_slug":"s-1vcpu-512mb-10gb","tags":["skerry","skerry-x"],
            "networks":{"v4":[{"ip_address":"10.135.0.2","netmask":"255.255.0.0","gateway":"10.135.0.1","type":"private"},
                              {"ip_address":"203.0.113.5","netmask":"255.255.240.0","gateway":"203.0.113.1","type":"public"}],
                        "v6":[{"ip_address":"2001:db8::5","netmask":64,"gateway":"2001:db8::1","type":"public"}]}}}"#,
        )
        .expect("decodes");
        assert_eq!(d.droplet.public_v4(), Some(Ipv4Addr::new(203, 0, 113, 5)));
        assert_eq!(d.droplet.public_v6(), "2001:db8::5".parse().ok());
        assert_eq!(d.droplet.status, DropletStatus::Active);
        assert!(d.droplet.has_tag("skerry-x"));
        let weird: DropletStatus = serde_json::from_str(r#""rebooting""#).expect("other");
        assert_eq!(weird, DropletStatus::Other);
    }

    #[test]
    fn reserved_ip_actions_encode_as_documented() {
        let a = serde_json::to_value(ReservedIpAction::Assign { droplet_id: 7 }).expect("json");
        assert_eq!(a, serde_json::json!({"type": "assign", "droplet_id": 7}));
        let u = serde_json::to_value(ReservedIpAction::Unassign).expect("json");
        assert_eq!(u, serde_json::json!({"type": "unassign"}));
    }

    #[test]
    fn next_links_are_followed_by_path_only() {
        let token = ApiToken::new("t", "test").expect("token");
        let opts = ClientOptions::new("http://127.0.0.1:9").expect("url");
        let c = Client::new(&token, opts).expect("client");
        assert_eq!(
            c.same_origin_path("https://api.digitalocean.com/v2/images?page=2&per_page=200")
                .as_deref(),
            Some("/v2/images?page=2&per_page=200")
        );
        assert_eq!(
            c.same_origin_path("https://evil.example/v2/droplets?page=3")
                .as_deref(),
            Some("/v2/droplets?page=3")
        );
        assert_eq!(c.same_origin_path("https://evil.example/steal"), None);
    }
}
