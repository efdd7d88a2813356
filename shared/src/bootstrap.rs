//! The bootstrap: the one document an edge needs to start.
//!
//! `home-agent edge-bootstrap` writes it; a DigitalOcean droplet receives it
//! as user data (which the edge-agent reads from the metadata service), any
//! other host as a file. It holds the CA certificate, the edge's certificate
//! **and private key**, the two UDP ports and the tunnel addresses, as TOML:
//!
//! ```toml
//! version = 1
//! control_port = 7443
//! wireguard_port = 51820
//! ca_cert_pem = """
//! -----BEGIN CERTIFICATE-----
//! ...
//! """
//! edge_cert_pem = """..."""
//! edge_key_pem = """..."""
//!
//! [tunnel]
//! edge = "10.77.0.1"
//! home = "10.77.0.2"
//! prefix_len = 30
//! ```
//!
//! Because it carries the edge's key, it is written with mode 0600 and its
//! `Debug` hides the key. It stays under [`MAX_BOOTSTRAP_LEN`], the size
//! limit of droplet user data. Parsing checks everything an edge would
//! otherwise trip over later: the version, that the PEMs parse, that the key
//! is the certificate's, that the certificate was issued by the CA for
//! [`EDGE_SERVER_NAME`](crate::pki::EDGE_SERVER_NAME), and the ports.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::paths;
use crate::pki::{self, HomePki, Identity, SecretString};
use crate::tunnel::TunnelAddrs;

/// The version of the document this build writes and reads.
pub const BOOTSTRAP_VERSION: u32 = 1;

/// The edge's default control (QUIC) port.
pub const DEFAULT_CONTROL_PORT: u16 = 7443;

/// The edge's default WireGuard port.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;

/// The largest bootstrap, in bytes: DigitalOcean's limit on user data.
pub const MAX_BOOTSTRAP_LEN: usize = 64 * 1024;

/// Everything an edge needs to start. `Debug` shows the key as
/// `[redacted]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub ca_cert_pem: String,
    pub edge_cert_pem: String,
    pub edge_key_pem: SecretString,
    /// UDP port of the QUIC control channel.
    pub control_port: u16,
    /// UDP port of WireGuard.
    pub wireguard_port: u16,
    pub tunnel: TunnelAddrs,
}

/// The document as it is on disk. No `Debug`: it holds the key in clear.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    version: u32,
    control_port: u16,
    wireguard_port: u16,
    ca_cert_pem: String,
    edge_cert_pem: String,
    edge_key_pem: String,
    tunnel: TunnelAddrs,
}

/// Read first, with unknown fields allowed, so that a document from another
/// version is refused for its version and not for a field it added.
#[derive(Deserialize)]
struct VersionProbe {
    version: Option<u32>,
}

/// Why a bootstrap cannot be written or used.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot access bootstrap file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// TOML syntax or shape. Only serde's message and a line number are
    /// kept: toml's own rendering quotes the source line, which could be
    /// part of the key.
    #[error(
        "the bootstrap is not valid: {message} (line {line}); write it again with `home-agent edge-bootstrap`"
    )]
    Syntax { message: String, line: usize },
    #[error("cannot render the bootstrap as TOML: {0}")]
    Render(#[from] toml::ser::Error),
    #[error(
        "the bootstrap is version {found} but this edge-agent reads version {supported}; use an \
         edge-agent and a home-agent of the same release"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("the bootstrap's {field} is not usable: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the bootstrap is {len} bytes, more than the {max} bytes droplet user data may hold")]
    TooLarge { len: u64, max: usize },
}

impl BootstrapError {
    fn invalid(field: &'static str, reason: impl ToString) -> Self {
        BootstrapError::Invalid {
            field,
            reason: reason.to_string(),
        }
    }

    fn syntax(err: &toml::de::Error, text: &str) -> Self {
        let line = err
            .span()
            .map(|span| {
                text.as_bytes()[..span.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(0);
        BootstrapError::Syntax {
            message: err.message().trim().to_owned(),
            line,
        }
    }
}

impl Bootstrap {
    /// The bootstrap for the edge of `pki`.
    pub fn from_pki(
        pki: &HomePki,
        control_port: u16,
        wireguard_port: u16,
        tunnel: TunnelAddrs,
    ) -> Self {
        Bootstrap {
            ca_cert_pem: pki.ca_cert_pem(),
            edge_cert_pem: pki.edge().cert_pem(),
            edge_key_pem: pki.edge().key_pem(),
            control_port,
            wireguard_port,
            tunnel,
        }
    }

    /// The document, key included: this is the one place where the edge's
    /// key is written out. Checked against [`Bootstrap::parse`] and
    /// [`MAX_BOOTSTRAP_LEN`] before it is returned.
    pub fn to_toml(&self) -> Result<String, BootstrapError> {
        let raw = RawBootstrap {
            version: BOOTSTRAP_VERSION,
            control_port: self.control_port,
            wireguard_port: self.wireguard_port,
            ca_cert_pem: self.ca_cert_pem.clone(),
            edge_cert_pem: self.edge_cert_pem.clone(),
            edge_key_pem: self.edge_key_pem.expose().to_owned(),
            tunnel: self.tunnel,
        };
        let text = toml::to_string(&raw)?;
        // Whatever this side writes, the edge must accept.
        Bootstrap::parse(&text)?;
        Ok(text)
    }

    /// Parses and checks a document: size, version, fields, PEMs, the key
    /// against the certificate, the certificate against the CA, the ports.
    pub fn parse(text: &str) -> Result<Self, BootstrapError> {
        check_len(text.len() as u64)?;
        let probe: VersionProbe =
            toml::from_str(text).map_err(|e| BootstrapError::syntax(&e, text))?;
        match probe.version {
            Some(BOOTSTRAP_VERSION) => {}
            Some(found) => {
                return Err(BootstrapError::UnsupportedVersion {
                    found,
                    supported: BOOTSTRAP_VERSION,
                });
            }
            None => return Err(BootstrapError::invalid("version", "it is missing")),
        }
        let raw: RawBootstrap =
            toml::from_str(text).map_err(|e| BootstrapError::syntax(&e, text))?;
        let bootstrap = Bootstrap {
            ca_cert_pem: raw.ca_cert_pem,
            edge_cert_pem: raw.edge_cert_pem,
            edge_key_pem: SecretString::new(raw.edge_key_pem),
            control_port: raw.control_port,
            wireguard_port: raw.wireguard_port,
            tunnel: raw.tunnel,
        };

        let ca = bootstrap.ca_cert()?;
        let identity = bootstrap.identity()?;
        pki::verify_edge(&ca, &identity)
            .map_err(|e| BootstrapError::invalid("edge_cert_pem", e))?;
        for (field, port) in [
            ("control_port", bootstrap.control_port),
            ("wireguard_port", bootstrap.wireguard_port),
        ] {
            if port == 0 {
                return Err(BootstrapError::invalid(field, "port 0 is not a port"));
            }
        }
        if bootstrap.control_port == bootstrap.wireguard_port {
            return Err(BootstrapError::invalid(
                "wireguard_port",
                format!(
                    "it is the same UDP port as control_port ({}); both are UDP and need their own",
                    bootstrap.control_port
                ),
            ));
        }
        Ok(bootstrap)
    }

    /// Writes the document to `path` with mode 0600 from creation,
    /// atomically (temporary file, then rename).
    pub fn write_to(&self, path: &Path) -> Result<(), BootstrapError> {
        let text = self.to_toml()?;
        paths::write_atomic(path, text.as_bytes(), 0o600).map_err(|source| BootstrapError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // The rendered text holds the key; drop it through a SecretString.
        drop(SecretString::new(text));
        Ok(())
    }

    /// Reads and checks the document at `path`, refusing one larger than
    /// [`MAX_BOOTSTRAP_LEN`] before reading it.
    pub fn read_from(path: &Path) -> Result<Self, BootstrapError> {
        let io_err = |source| BootstrapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        check_len(file.metadata().map_err(io_err)?.len())?;
        let mut text = String::new();
        file.take(MAX_BOOTSTRAP_LEN as u64 + 1)
            .read_to_string(&mut text)
            .map_err(io_err)?;
        let text = SecretString::new(text);
        Bootstrap::parse(text.expose())
    }

    /// The CA certificate (exactly one).
    pub fn ca_cert(&self) -> Result<CertificateDer<'static>, BootstrapError> {
        let mut certs = pki::parse_certs(&self.ca_cert_pem, "ca_cert_pem")
            .map_err(|e| BootstrapError::invalid("ca_cert_pem", e))?;
        match (certs.pop(), certs.is_empty()) {
            (Some(cert), true) => Ok(cert),
            _ => Err(BootstrapError::invalid(
                "ca_cert_pem",
                "it must hold exactly one certificate",
            )),
        }
    }

    /// The edge's certificate and key, checked to belong together.
    pub fn identity(&self) -> Result<Identity, BootstrapError> {
        Identity::from_pem(&self.edge_cert_pem, self.edge_key_pem.expose())
            .map_err(|e| BootstrapError::invalid("edge_cert_pem/edge_key_pem", e))
    }
}

fn check_len(len: u64) -> Result<(), BootstrapError> {
    if len > MAX_BOOTSTRAP_LEN as u64 {
        return Err(BootstrapError::TooLarge {
            len,
            max: MAX_BOOTSTRAP_LEN,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::paths::TestDir;

    fn sample(dir: &TestDir) -> (HomePki, Bootstrap) {
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let bootstrap = Bootstrap::from_pki(
            &pki,
            DEFAULT_CONTROL_PORT,
            DEFAULT_WIREGUARD_PORT,
            TunnelAddrs::DEFAULT,
        );
        (pki, bootstrap)
    }

    #[test]
    fn round_trip() {
        let dir = TestDir::new("bootstrap-round-trip");
        let (pki, bootstrap) = sample(&dir);
        let text = bootstrap.to_toml().unwrap();
        assert!(text.len() < MAX_BOOTSTRAP_LEN);
        assert!(text.starts_with("version = 1\n"), "{text}");
        let parsed = Bootstrap::parse(&text).unwrap();
        assert_eq!(parsed, bootstrap);
        assert_eq!(&parsed.ca_cert().unwrap(), pki.ca_cert());
        assert_eq!(parsed.identity().unwrap().key(), pki.edge().key());
        assert_eq!(parsed.tunnel, TunnelAddrs::DEFAULT);
    }

    #[test]
    fn file_round_trip_with_mode_0600() {
        let dir = TestDir::new("bootstrap-file");
        let (_, bootstrap) = sample(&dir);
        let path = dir.path().join("edge-bootstrap.toml");
        bootstrap.write_to(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Bootstrap::read_from(&path).unwrap(), bootstrap);

        std::fs::write(&path, vec![b'#'; MAX_BOOTSTRAP_LEN + 1]).unwrap();
        let err = Bootstrap::read_from(&path).unwrap_err();
        assert!(matches!(err, BootstrapError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn unknown_field_is_refused() {
        let dir = TestDir::new("bootstrap-unknown");
        let (_, bootstrap) = sample(&dir);
        let text = bootstrap.to_toml().unwrap().replacen(
            "version = 1\n",
            "version = 1\nextra = true\n",
            1,
        );
        let err = Bootstrap::parse(&text).unwrap_err();
        assert!(matches!(err, BootstrapError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("extra"), "{err}");
    }

    #[test]
    fn other_versions_are_refused_clearly() {
        let dir = TestDir::new("bootstrap-version");
        let (_, bootstrap) = sample(&dir);
        let text = bootstrap.to_toml().unwrap();
        // A later version with a field this one does not know: the version
        // is what is reported.
        let v2 = text.replacen("version = 1\n", "version = 2\nnew_field = 1\n", 1);
        let err = Bootstrap::parse(&v2).unwrap_err();
        assert!(
            matches!(
                err,
                BootstrapError::UnsupportedVersion {
                    found: 2,
                    supported: 1
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("same release"), "{err}");
        let missing = text.replacen("version = 1\n", "", 1);
        assert!(matches!(
            Bootstrap::parse(&missing),
            Err(BootstrapError::Invalid {
                field: "version",
                ..
            })
        ));
    }

    #[test]
    fn debug_and_errors_hide_the_key() {
        let dir = TestDir::new("bootstrap-debug");
        let (_, bootstrap) = sample(&dir);
        let key_line = bootstrap
            .edge_key_pem
            .expose()
            .lines()
            .nth(1)
            .unwrap()
            .to_owned();
        let shown = format!("{bootstrap:?}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(!shown.contains(&key_line), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");

        // A syntax error inside the key's string does not quote it.
        let text = bootstrap.to_toml().unwrap();
        let broken = text.replacen(&key_line, &format!("{key_line}\"\"\" junk"), 1);
        let err = Bootstrap::parse(&broken).unwrap_err();
        assert!(!err.to_string().contains(&key_line), "{err}");
    }

    #[test]
    fn bad_contents_are_refused() {
        let dir = TestDir::new("bootstrap-bad");
        let other_dir = TestDir::new("bootstrap-bad-other");
        let (_, good) = sample(&dir);
        let (other, _) = sample(&other_dir);

        let mut b = good.clone();
        b.wireguard_port = b.control_port;
        assert!(matches!(
            b.to_toml(),
            Err(BootstrapError::Invalid {
                field: "wireguard_port",
                ..
            })
        ));

        let mut b = good.clone();
        b.control_port = 0;
        assert!(matches!(
            b.to_toml(),
            Err(BootstrapError::Invalid {
                field: "control_port",
                ..
            })
        ));

        let mut b = good.clone();
        b.ca_cert_pem = "garbage".into();
        assert!(matches!(
            b.to_toml(),
            Err(BootstrapError::Invalid {
                field: "ca_cert_pem",
                ..
            })
        ));

        // Certificate and key from different pairs.
        let mut b = good.clone();
        b.edge_key_pem = other.edge().key_pem();
        assert!(matches!(b.to_toml(), Err(BootstrapError::Invalid { .. })));

        // An edge certificate from another CA.
        let mut b = good.clone();
        b.ca_cert_pem = other.ca_cert_pem();
        let err = b.to_toml().unwrap_err();
        assert!(
            matches!(
                err,
                BootstrapError::Invalid {
                    field: "edge_cert_pem",
                    ..
                }
            ),
            "{err}"
        );

        // Not an edge certificate at all.
        let mut b = good.clone();
        b.edge_cert_pem = other.home().cert_pem();
        b.edge_key_pem = other.home().key_pem();
        b.ca_cert_pem = other.ca_cert_pem();
        assert!(matches!(
            b.to_toml(),
            Err(BootstrapError::Invalid {
                field: "edge_cert_pem",
                ..
            })
        ));

        let text = good.to_toml().unwrap();
        let bad_tunnel = text.replace("prefix_len = 30", "prefix_len = 31");
        assert!(matches!(
            Bootstrap::parse(&bad_tunnel),
            Err(BootstrapError::Syntax { .. })
        ));

        let too_big = format!("{text}\n#{}\n", "x".repeat(MAX_BOOTSTRAP_LEN));
        assert!(matches!(
            Bootstrap::parse(&too_big),
            Err(BootstrapError::TooLarge { .. })
        ));
    }
}
