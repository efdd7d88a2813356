//! The bootstrap from the droplet metadata service.
//!
//! A DigitalOcean droplet serves the `user_data` it was created with at
//! `http://169.254.169.254/metadata/v1/user-data`: plain HTTP, no
//! authentication, reachable only from the droplet itself. `edge-agent run`
//! without `--bootstrap` reads its bootstrap there, without cloud-init.
//!
//! The edge needs one GET of a small document, so this is a minimal
//! HTTP/1.1 client rather than a general one: one request per connection
//! (`Connection: close`), a timeout on the whole exchange, the status line
//! and headers parsed, the body taken by `Content-Length`, chunked, or up to
//! the end of the connection, and nothing larger than
//! [`MAX_BOOTSTRAP_LEN`] accepted. [`parse_response`] is the pure part: it
//! tells a response that is still incomplete from one that is invalid.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use skerry::bootstrap::{Bootstrap, MAX_BOOTSTRAP_LEN};
use skerry::pki::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The metadata service of every droplet.
pub const DEFAULT_METADATA_URL: &str = "http://169.254.169.254";

/// Where the user data is, under the base URL.
pub const USER_DATA_PATH: &str = "/metadata/v1/user-data";

/// The longest status line plus headers accepted.
const MAX_HEAD: usize = 16 * 1024;

/// One whole request: connect, send, read.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Failed attempts logged at `info` before they turn into warnings: the
/// network of a booting droplet may take a few seconds.
const QUIET_ATTEMPTS: u32 = 5;

/// A plain-HTTP base URL: `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataUrl {
    /// As it goes into `connect` (brackets removed from an IPv6 literal).
    host: String,
    port: u16,
    /// No trailing slash.
    prefix: String,
}

impl Default for MetadataUrl {
    fn default() -> Self {
        MetadataUrl {
            host: "169.254.169.254".into(),
            port: 80,
            prefix: String::new(),
        }
    }
}

impl fmt::Display for MetadataUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.prefix)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
        }
    }
}

impl FromStr for MetadataUrl {
    type Err = MetadataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| MetadataError::BadUrl {
            url: s.to_owned(),
            why,
        };
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            bad("it must start with http:// (the metadata service is plain HTTP)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) || path.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(bad("the path may hold no query, fragment or spaces"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("an unclosed [ in the host"))?;
            match after {
                "" => (host, 80),
                p => (
                    host,
                    p.strip_prefix(':')
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| bad("the port is not a number"))?,
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("the port is not a number"))?),
                None => (authority, 80),
            }
        };
        if host.is_empty() || host.contains(['@', ' ']) {
            return Err(bad("it has no usable host"));
        }
        Ok(MetadataUrl {
            host: host.to_owned(),
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

/// Why a metadata request failed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("the metadata URL {url:?} is not usable: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("cannot reach the metadata service: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer from the metadata service within {0:?}")]
    Timeout(Duration),
    #[error("the metadata service's answer is not valid HTTP: {0}")]
    Malformed(&'static str),
    #[error("the metadata service's answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses the response in `buf`. `Ok(None)`: incomplete, read more
/// (unless `eof`, which turns an incomplete response into an error). The
/// body may be at most `max_body` bytes.
pub fn parse_response(
    buf: &[u8],
    eof: bool,
    max_body: usize,
) -> Result<Option<Response>, MetadataError> {
    let incomplete = |what| {
        if eof {
            Err(MetadataError::Malformed(what))
        } else {
            Ok(None)
        }
    };
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(MetadataError::Malformed("the headers are too long"));
        }
        return incomplete("the connection closed inside the headers");
    };
    if head_end > MAX_HEAD {
        return Err(MetadataError::Malformed("the headers are too long"));
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| MetadataError::Malformed("the headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(MetadataError::Malformed("no status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(MetadataError::Malformed("not an HTTP/1 status line"));
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or(MetadataError::Malformed("the status code is not a number"))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(MetadataError::Malformed("a header line without ':'"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| MetadataError::Malformed("Content-Length is not a number"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(MetadataError::Malformed("two different Content-Lengths"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else {
                return Err(MetadataError::Malformed(
                    "a transfer encoding other than chunked",
                ));
            }
        }
    }
    let body = &buf[head_end + 4..];
    if chunked {
        return match decode_chunked(body, max_body)? {
            Some(body) => Ok(Some(Response { status, body })),
            None => incomplete("the connection closed inside a chunked body"),
        };
    }
    match content_length {
        Some(n) if n > max_body => Err(MetadataError::TooLarge(max_body)),
        Some(n) if body.len() >= n => Ok(Some(Response {
            status,
            body: body[..n].to_vec(),
        })),
        Some(_) => incomplete("the connection closed before Content-Length bytes"),
        None if body.len() > max_body => Err(MetadataError::TooLarge(max_body)),
        None if eof => Ok(Some(Response {
            status,
            body: body.to_vec(),
        })),
        None => Ok(None),
    }
}

/// A chunked body; `Ok(None)` if it has not all arrived. Trailers are
/// skipped.
fn decode_chunked(mut rest: &[u8], max_body: usize) -> Result<Option<Vec<u8>>, MetadataError> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            if rest.len() > 64 {
                return Err(MetadataError::Malformed("a chunk size line is too long"));
            }
            return Ok(None);
        };
        let line = std::str::from_utf8(&rest[..line_end])
            .map_err(|_| MetadataError::Malformed("a chunk size is not text"))?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| MetadataError::Malformed("a chunk size is not hexadecimal"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, end with an empty line.
            return Ok(
                if rest.starts_with(b"\r\n") || find(rest, b"\r\n\r\n").is_some() {
                    Some(body)
                } else {
                    None
                },
            );
        }
        if body.len().saturating_add(size) > max_body {
            return Err(MetadataError::TooLarge(max_body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err(MetadataError::Malformed("a chunk does not end with CRLF"));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// `GET base/path`, one connection, `REQUEST_TIMEOUT` in all.
pub async fn get(
    base: &MetadataUrl,
    path: &str,
    max_body: usize,
) -> Result<Response, MetadataError> {
    let exchange = async {
        let mut stream = TcpStream::connect((base.host.as_str(), base.port)).await?;
        let host = if base.host.contains(':') {
            format!("[{}]", base.host)
        } else {
            base.host.clone()
        };
        let request = format!(
            "GET {}{path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: skerry-edge-agent/{}\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n",
            base.prefix,
            env!("CARGO_PKG_VERSION")
        );
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(8 * 1024);
        let mut chunk = [0u8; 8 * 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(response) = parse_response(&buf, n == 0, max_body)? {
                return Ok(response);
            }
            // Chunk framing aside, nothing valid is this long.
            if buf.len() > MAX_HEAD + 2 * max_body + 1024 {
                return Err(MetadataError::TooLarge(max_body));
            }
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| MetadataError::Timeout(REQUEST_TIMEOUT))?
}

/// Reads the bootstrap from the metadata service at `base`, retrying with
/// backoff (and saying why at each try) until it answers with one;
/// `Ok(None)` if `shutdown` came first. No user data yet (404, or an empty
/// answer) is retried like an unreachable service, with a clear warning. A
/// document that is there but not a usable bootstrap is an error: user
/// data cannot change, so retrying would not help.
pub async fn fetch_bootstrap(
    base: &MetadataUrl,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Bootstrap>> {
    let mut delay = Duration::from_millis(500);
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match get(base, USER_DATA_PATH, MAX_BOOTSTRAP_LEN).await {
            Ok(r) if r.status == 200 && !r.body.iter().all(u8::is_ascii_whitespace) => {
                // The document holds the edge's key: keep it in a type
                // that never prints, and never quote it in an error.
                let text = SecretString::new(String::from_utf8(r.body).map_err(|_| {
                    anyhow::anyhow!(
                        "the droplet's user data is not UTF-8 text, so not a skerry bootstrap"
                    )
                })?);
                let bootstrap = Bootstrap::parse(text.expose()).map_err(|e| {
                    anyhow::Error::new(e).context(
                        "the droplet's user data is not a usable skerry bootstrap; destroy the \
                         droplet and create it again with `home-agent connect --edge droplet`",
                    )
                })?;
                info!(url = %base, attempt, "bootstrap read from the metadata service");
                return Ok(Some(bootstrap));
            }
            Ok(r) if r.status == 200 || r.status == 404 => warn!(
                url = %base,
                attempt,
                status = r.status,
                "the metadata service has no user data for this droplet: was it created by \
                 `home-agent connect --edge droplet`? retrying"
            ),
            Ok(r) => {
                warn!(url = %base, attempt, status = r.status, "the metadata service answered with an error; retrying")
            }
            Err(e @ MetadataError::TooLarge(_)) => {
                return Err(anyhow::Error::new(e).context("reading the droplet's user data"));
            }
            Err(e) if attempt <= QUIET_ATTEMPTS => {
                info!(url = %base, attempt, error = %e, "metadata service not reachable yet; retrying");
            }
            Err(e) => {
                warn!(url = %base, attempt, error = %e, "metadata service still not reachable; retrying");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64;

    #[test]
    fn urls() {
        let u: MetadataUrl = "http://169.254.169.254".parse().expect("default");
        assert_eq!(u, MetadataUrl::default());
        let u: MetadataUrl = "http://127.0.0.1:8080/base/"
            .parse()
            .expect("port and prefix");
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 8080, "/base")
        );
        let u: MetadataUrl = "http://[fd00::1]:81".parse().expect("v6");
        assert_eq!((u.host.as_str(), u.port), ("fd00::1", 81));
        assert_eq!(u.to_string(), "http://[fd00::1]:81");
        for bad in [
            "https://x",
            "x",
            "http://",
            "http://h:p",
            "http://[::1",
            "http://h/a?b",
        ] {
            assert!(bad.parse::<MetadataUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn content_length_body() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut], false, MAX).expect("prefix"),
                None,
                "{cut}"
            );
            assert!(parse_response(&full[..cut], true, MAX).is_err(), "{cut}");
        }
        let r = parse_response(full, false, MAX)
            .expect("ok")
            .expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    }

    #[test]
    fn body_to_eof_and_404() {
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope", true, MAX)
            .expect("ok")
            .expect("complete at eof");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\n\r\nmore", false, MAX).expect("ok"),
            None
        );
    }

    #[test]
    fn chunked_body() {
        let full = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut], false, MAX).expect("prefix"),
                None,
                "{cut}"
            );
        }
        let r = parse_response(full, false, MAX)
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body, b"abcde");
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n";
        assert!(parse_response(bad, false, MAX).is_err());
    }

    #[test]
    fn limits_and_garbage() {
        let big = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX + 1);
        assert!(matches!(
            parse_response(big.as_bytes(), false, MAX),
            Err(MetadataError::TooLarge(_))
        ));
        let mut eof_big = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        eof_big.extend(std::iter::repeat_n(b'a', MAX + 1));
        assert!(matches!(
            parse_response(&eof_big, false, MAX),
            Err(MetadataError::TooLarge(_))
        ));
        let chunk_big = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            MAX + 1
        );
        assert!(matches!(
            parse_response(chunk_big.as_bytes(), false, MAX),
            Err(MetadataError::TooLarge(_))
        ));
        for garbage in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            assert!(parse_response(garbage, true, MAX).is_err());
        }
        let endless = vec![b'a'; MAX_HEAD + 1];
        assert!(parse_response(&endless, false, MAX).is_err());
    }
}
