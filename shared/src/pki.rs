//! The private CA and the certificates of both agents.
//!
//! The home-agent owns a small CA (ECDSA P-256, made with rcgen) whose key
//! never leaves the home machine. It issues two leaves:
//!
//! - the **home** client certificate (SAN [`HOME_CLIENT_NAME`], EKU
//!   `clientAuth`), which the home-agent presents on the control channel;
//! - the **edge** server certificate (SAN [`EDGE_SERVER_NAME`], EKU
//!   `serverAuth`), which travels to the edge inside the bootstrap document.
//!
//! The extended key usages keep the roles apart: the edge's key, which lives
//! on a less trusted machine, cannot be used to connect as the home side.
//!
//! [`HomePki::load_or_create`] keeps everything in one private directory and
//! creates any missing part on first use. It never replaces the CA: a new CA
//! would silently orphan every edge bootstrapped from the old one, so a missing
//! or mismatched CA is an error that says what to do.
//!
//! Secrets live in [`Identity`] and [`SecretString`], whose `Debug` never
//! prints key material.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, RootCertStore};
use time::OffsetDateTime;

use crate::paths;

/// The DNS name in the edge's certificate, and the name the home side checks.
///
/// Fixed because the edge's IP address is unknown when its certificate is
/// made (the certificate goes into the droplet's user data). The home-agent
/// always connects with this name, never with the IP.
pub const EDGE_SERVER_NAME: &str = "edge.skerry.internal";

/// The DNS name in the home-agent's client certificate.
pub const HOME_CLIENT_NAME: &str = "home.skerry.internal";

/// The common name of the private CA.
pub const CA_COMMON_NAME: &str = "skerry private CA";

/// How long the CA and both leaves are valid.
///
/// Ten years for the leaves too: the edge has no way to renew its
/// certificate yet (it would need a new bootstrap), so a short lifetime would
/// only turn into an outage.
pub const VALIDITY: time::Duration = time::Duration::days(3652);

/// How far `not_before` is set in the past, to tolerate clocks that lag.
const BACKDATE: time::Duration = time::Duration::days(1);

/// A certificate chain and its private key (PKCS#8).
///
/// `Debug` prints the number of certificates, never the key.
pub struct Identity {
    /// End-entity certificate first. skerry's leaves are issued directly by
    /// the CA, so the chain holds exactly one certificate.
    pub cert_chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    /// A copy of the private key, in the form rustls takes it.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Parses a PEM certificate chain (end entity first) and a PEM PKCS#8
    /// private key (`BEGIN PRIVATE KEY`), and checks that the key belongs to
    /// the first certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Self::parse(cert_pem, key_pem, "certificate", "private key")
    }

    /// [`Identity::from_pem`] with names for the two inputs in error messages.
    fn parse(
        cert_pem: &str,
        key_pem: &str,
        cert_what: &str,
        key_what: &str,
    ) -> Result<Self, PkiError> {
        let cert_chain = parse_certs(cert_pem, cert_what)?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            Ok(PrivateKeyDer::Pkcs8(key)) => key,
            Ok(_) => {
                return Err(PkiError::parse(
                    key_what,
                    "the key is not in PKCS#8 form (`BEGIN PRIVATE KEY`); convert it with \
                     `openssl pkcs8 -topk8 -nocrypt`",
                ));
            }
            Err(e) => {
                return Err(PkiError::parse(
                    key_what,
                    format!("no usable private key: {e}"),
                ));
            }
        };
        let identity = Identity { cert_chain, key };
        // Loads the key with ring and compares its public half with the
        // certificate's, so a mixed-up pair fails here and not in a handshake.
        rustls::sign::CertifiedKey::from_der(
            identity.cert_chain.clone(),
            identity.key(),
            &crate::tls::crypto_provider(),
        )
        .map_err(|e| PkiError::parse(key_what, format!("does not match {cert_what}: {e}")))?;
        Ok(identity)
    }

    /// The certificate chain as PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c.as_ref()))
            .collect()
    }

    /// The private key as PEM (`BEGIN PRIVATE KEY`).
    pub fn key_pem(&self) -> SecretString {
        SecretString::new(pem_encode("PRIVATE KEY", self.key.secret_pkcs8_der()))
    }

    /// The end-entity certificate.
    fn end_entity(&self) -> Option<&CertificateDer<'static>> {
        self.cert_chain.first()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("certificates", &self.cert_chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

/// A string that holds a secret: `Debug` shows `[redacted]`, there is no
/// `Display`, equality takes the same time wherever the strings differ, and
/// the bytes are overwritten when it is dropped (best effort: copies made
/// through [`SecretString::expose`] are the caller's business).
///
/// It deserializes from a plain string but does not serialize: writing a
/// secret out must go through [`SecretString::expose`], visibly.
#[derive(Clone, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(secret: String) -> Self {
        SecretString(secret)
    }

    /// The secret itself. Every call site is a place where it can leak.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(secret: String) -> Self {
        SecretString(secret)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl PartialEq for SecretString {
    /// Compares every byte whatever the first difference; only the lengths
    /// leak through timing.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        std::hint::black_box(diff) == 0
    }
}

impl Eq for SecretString {}

impl Drop for SecretString {
    fn drop(&mut self) {
        let mut bytes = std::mem::take(&mut self.0).into_bytes();
        bytes.iter_mut().for_each(|b| *b = 0);
        std::hint::black_box(&bytes);
    }
}

/// What the home side keeps: the CA certificate, the home client identity
/// and the edge server identity (kept so that a bootstrap can be written
/// again at any time).
///
/// The CA key is read only while leaves are issued and is not kept in memory.
#[derive(Debug, Clone)]
pub struct HomePki {
    ca_cert: CertificateDer<'static>,
    home: Identity,
    edge: Identity,
}

/// The files in a PKI directory.
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

impl HomePki {
    /// Loads the PKI from `dir`, creating any missing part on first use.
    ///
    /// `dir` is created with mode 0700 (and tightened if it is looser); the
    /// `*.key` files are written with mode 0600 from creation, atomically.
    /// Files: `ca.pem`, `ca.key`, `home.pem`, `home.key`, `edge.pem`,
    /// `edge.key`.
    ///
    /// - No CA and no leaf: a new CA and both leaves are made.
    /// - A CA and a missing leaf (either of its two files): the leaf is
    ///   issued from the existing CA. A new edge leaf does not disturb an edge
    ///   that runs with the old one; both are signed by the same CA.
    /// - A leaf not signed by the CA on disk: [`PkiError::Mismatch`].
    /// - Half a CA, or leaves without a CA: [`PkiError::Incomplete`]; the CA
    ///   is never replaced behind the user's back.
    ///
    /// Callers that may run concurrently should hold a
    /// [`StateLock`](crate::paths::StateLock) on the directory.
    pub fn load_or_create(dir: &Path) -> Result<HomePki, PkiError> {
        paths::ensure_private_dir(dir).map_err(PkiError::io(dir))?;
        let now = OffsetDateTime::now_utc();
        let ca_cert_path = dir.join(CA_CERT_FILE);
        let ca_key_path = dir.join(CA_KEY_FILE);

        let ca = match (exists(&ca_cert_path)?, exists(&ca_key_path)?) {
            (true, true) => Ca::load(&ca_cert_path, &ca_key_path)?,
            (false, false) => {
                for role in [Role::Home, Role::Edge] {
                    for path in [role.cert_path(dir), role.key_path(dir)] {
                        if exists(&path)? {
                            return Err(PkiError::Incomplete {
                                present: path,
                                missing: ca_cert_path,
                            });
                        }
                    }
                }
                Ca::create(&ca_cert_path, &ca_key_path, now)?
            }
            (true, false) => {
                return Err(PkiError::Incomplete {
                    present: ca_cert_path,
                    missing: ca_key_path,
                });
            }
            (false, true) => {
                return Err(PkiError::Incomplete {
                    present: ca_key_path,
                    missing: ca_cert_path,
                });
            }
        };

        let home = ca.load_or_issue(dir, Role::Home, now)?;
        let edge = ca.load_or_issue(dir, Role::Edge, now)?;
        Ok(HomePki {
            ca_cert: ca.cert,
            home,
            edge,
        })
    }

    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    pub fn ca_cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", self.ca_cert.as_ref())
    }

    /// The home-agent's client identity.
    pub fn home(&self) -> &Identity {
        &self.home
    }

    /// The edge's server identity, as it goes into the bootstrap.
    pub fn edge(&self) -> &Identity {
        &self.edge
    }
}

/// Why the PKI cannot be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot generate a key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{what} is not usable: {reason}")]
    Parse { what: String, reason: String },
    #[error(
        "{leaf} was not issued by the CA in {ca} ({reason}). If the CA was replaced on purpose, \
         delete the leaf's .pem and .key so that they are issued again from it (for the edge \
         leaf, run `home-agent edge-bootstrap` again afterwards); otherwise restore the CA that \
         issued it"
    )]
    Mismatch {
        leaf: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error(
        "{leaf} cannot be used ({reason}); delete it and its .key to issue a new one from the CA"
    )]
    Rejected { leaf: PathBuf, reason: String },
    #[error(
        "{present} exists but {missing} does not: restore {missing} from a backup, or move \
         every file of that directory away to start over with a new CA (each edge then needs a \
         new `home-agent edge-bootstrap`)"
    )]
    Incomplete { present: PathBuf, missing: PathBuf },
}

impl PkiError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
        move |source| PkiError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn parse(what: impl fmt::Display, reason: impl Into<String>) -> PkiError {
        PkiError::Parse {
            what: what.to_string(),
            reason: reason.into(),
        }
    }
}

/// The two leaves and what distinguishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Home,
    Edge,
}

impl Role {
    fn stem(self) -> &'static str {
        match self {
            Role::Home => "home",
            Role::Edge => "edge",
        }
    }

    fn cert_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.pem", self.stem()))
    }

    fn key_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.key", self.stem()))
    }

    fn params(self, now: OffsetDateTime) -> Result<CertificateParams, rcgen::Error> {
        let (name, eku) = match self {
            Role::Home => (HOME_CLIENT_NAME, ExtendedKeyUsagePurpose::ClientAuth),
            Role::Edge => (EDGE_SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth),
        };
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = now + VALIDITY;
        params.serial_number = Some(random_serial());
        Ok(params)
    }
}

/// The CA while leaves are loaded or issued.
struct Ca {
    cert: CertificateDer<'static>,
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn create(cert_path: &Path, key_path: &Path, now: OffsetDateTime) -> Result<Ca, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + VALIDITY;
        params.serial_number = Some(random_serial());
        let certified = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let cert = certified.der().clone();
        let key_pem = SecretString::new(certified.key().serialize_pem());
        // Key first: a crash in between leaves `ca.key` without `ca.pem`,
        // which is refused, rather than a certificate whose key is lost.
        write_file(key_path, key_pem.expose(), KEY_MODE)?;
        write_file(cert_path, &certified.pem(), CERT_MODE)?;
        // `CertifiedIssuer` derefs to the `Issuer`; rebuild an owned one from
        // the same certificate so that both paths hold the same type.
        let key = KeyPair::from_pem(key_pem.expose())?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Ca {
            cert,
            cert_path: cert_path.to_path_buf(),
            issuer,
        })
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_file(cert_path)?;
        let key_pem = SecretString::new(read_key_file(key_path)?);
        let identity = Identity::parse(
            &cert_pem,
            key_pem.expose(),
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )?;
        let Some(cert) = identity.end_entity().cloned() else {
            // `parse_certs` refuses an empty chain.
            return Err(PkiError::parse(cert_path.display(), "no certificate"));
        };
        let key = KeyPair::from_pem(key_pem.expose())
            .map_err(|e| PkiError::parse(key_path.display(), e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| PkiError::parse(cert_path.display(), e.to_string()))?;
        Ok(Ca {
            cert,
            cert_path: cert_path.to_path_buf(),
            issuer,
        })
    }

    fn load_or_issue(
        &self,
        dir: &Path,
        role: Role,
        now: OffsetDateTime,
    ) -> Result<Identity, PkiError> {
        let cert_path = role.cert_path(dir);
        let key_path = role.key_path(dir);
        if exists(&cert_path)? && exists(&key_path)? {
            let cert_pem = read_file(&cert_path)?;
            let key_pem = SecretString::new(read_key_file(&key_path)?);
            let identity = Identity::parse(
                &cert_pem,
                key_pem.expose(),
                &cert_path.display().to_string(),
                &key_path.display().to_string(),
            )?;
            return match verify_leaf(&self.cert, role, &identity) {
                Ok(()) => Ok(identity),
                Err(LeafProblem::NotIssued(reason)) => Err(PkiError::Mismatch {
                    leaf: cert_path,
                    ca: self.cert_path.clone(),
                    reason,
                }),
                Err(LeafProblem::Unusable(reason)) => Err(PkiError::Rejected {
                    leaf: cert_path,
                    reason,
                }),
            };
        }

        let key = KeyPair::generate()?;
        let cert = role.params(now)?.signed_by(&key, &self.issuer)?;
        let identity = Identity {
            cert_chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        };
        write_file(&key_path, identity.key_pem().expose(), KEY_MODE)?;
        write_file(&cert_path, &identity.cert_pem(), CERT_MODE)?;
        Ok(identity)
    }
}

/// Why a leaf does not verify against the CA.
#[derive(Debug)]
pub(crate) enum LeafProblem {
    /// Signed by someone else: the CA changed.
    NotIssued(String),
    /// Signed by the CA but unusable (expired, wrong name or purpose).
    Unusable(String),
}

impl fmt::Display for LeafProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafProblem::NotIssued(reason) => write!(f, "not issued by this CA: {reason}"),
            LeafProblem::Unusable(reason) => f.write_str(reason),
        }
    }
}

/// Checks the edge's server certificate against the CA the way the home
/// side will: chain, validity, `serverAuth` and [`EDGE_SERVER_NAME`].
pub(crate) fn verify_edge(
    ca: &CertificateDer<'static>,
    edge: &Identity,
) -> Result<(), LeafProblem> {
    verify_leaf(ca, Role::Edge, edge)
}

/// Verifies a leaf with the same rustls verifiers the control channel uses.
fn verify_leaf(
    ca: &CertificateDer<'static>,
    role: Role,
    leaf: &Identity,
) -> Result<(), LeafProblem> {
    verify_leaf_at(ca, role, leaf, UnixTime::now())
}

fn verify_leaf_at(
    ca: &CertificateDer<'static>,
    role: Role,
    leaf: &Identity,
    now: UnixTime,
) -> Result<(), LeafProblem> {
    let unusable = |e: &dyn fmt::Display| LeafProblem::Unusable(e.to_string());
    let Some(end_entity) = leaf.end_entity() else {
        return Err(LeafProblem::Unusable("no certificate".into()));
    };
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| LeafProblem::Unusable(format!("the CA certificate is not usable: {e}")))?;
    let roots = Arc::new(roots);
    let provider = crate::tls::crypto_provider();
    let verified = match role {
        Role::Edge => {
            let name = ServerName::try_from(EDGE_SERVER_NAME).map_err(|e| unusable(&e))?;
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| unusable(&e))?
                .verify_server_cert(end_entity, &leaf.cert_chain[1..], &name, &[], now)
                .map(drop)
        }
        Role::Home => rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| unusable(&e))?
            .verify_client_cert(end_entity, &leaf.cert_chain[1..], now)
            .map(drop),
    };
    verified.map_err(|e| match e {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => LeafProblem::NotIssued(e.to_string()),
        other => LeafProblem::Unusable(other.to_string()),
    })
}

/// Parses one or more PEM certificates.
pub(crate) fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::parse(what, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(PkiError::parse(what, "no `BEGIN CERTIFICATE` block"));
    }
    Ok(certs)
}

/// PEM with 64-column base64 lines (RFC 7468).
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so every 64-byte chunk is valid UTF-8.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// A positive serial number of 16 random bytes.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(PkiError::io(path))
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(PkiError::io(path))
}

/// Reads a key file, first tightening its mode to 0600 if it is looser.
fn read_key_file(path: &Path) -> Result<String, PkiError> {
    let mode = fs::metadata(path)
        .map_err(PkiError::io(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(KEY_MODE))
            .map_err(PkiError::io(path))?;
    }
    read_file(path)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    paths::write_atomic(path, contents.as_bytes(), mode).map_err(PkiError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_then_reloads_the_same_pki() {
        let dir = TestDir::new("pki-reload");
        let pki_dir = dir.path().join("state");
        let first = HomePki::load_or_create(&pki_dir).unwrap();
        let second = HomePki::load_or_create(&pki_dir).unwrap();
        assert_eq!(first.ca_cert(), second.ca_cert());
        assert_eq!(
            first.ca_cert_pem(),
            fs::read_to_string(pki_dir.join("ca.pem")).unwrap()
        );
        assert_eq!(first.home().cert_chain, second.home().cert_chain);
        assert_eq!(first.edge().cert_chain, second.edge().cert_chain);
        assert_eq!(first.edge().key_pem(), second.edge().key_pem());
        assert_eq!(first.home().key(), second.home().key());
        verify_leaf(first.ca_cert(), Role::Home, first.home()).unwrap();
        verify_leaf(first.ca_cert(), Role::Edge, first.edge()).unwrap();
    }

    #[test]
    fn directory_is_private_and_keys_are_0600() {
        let dir = TestDir::new("pki-modes");
        let pki_dir = dir.path().join("state");
        HomePki::load_or_create(&pki_dir).unwrap();
        assert_eq!(mode(&pki_dir), 0o700);
        for key in ["ca.key", "home.key", "edge.key"] {
            assert_eq!(mode(&pki_dir.join(key)), 0o600, "{key}");
        }
        for name in ["ca.pem", "home.pem", "edge.pem"] {
            assert!(pki_dir.join(name).is_file(), "{name}");
        }
        // Nothing but the six files: no temporary files left over.
        assert_eq!(fs::read_dir(&pki_dir).unwrap().count(), 6);

        // Looser modes are tightened on the next load.
        fs::set_permissions(&pki_dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(pki_dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        HomePki::load_or_create(&pki_dir).unwrap();
        assert_eq!(mode(&pki_dir), 0o700);
        assert_eq!(mode(&pki_dir.join("ca.key")), 0o600);
    }

    #[test]
    fn certificates_have_the_documented_shape() {
        let dir = TestDir::new("pki-shape");
        let pki = HomePki::load_or_create(dir.path()).unwrap();

        // Key usages, as rcgen reads them back from the certificate.
        let key = KeyPair::generate().unwrap();
        let ca = Issuer::from_ca_cert_der(pki.ca_cert(), key).unwrap();
        for usage in [
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ] {
            assert!(ca.key_usages().contains(&usage), "{usage:?}");
        }

        // Validity: backdated by a day, ten years ahead.
        let at = |offset: time::Duration| {
            let when = OffsetDateTime::now_utc() + offset;
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                u64::try_from(when.unix_timestamp()).unwrap(),
            ))
        };
        for role in [Role::Home, Role::Edge] {
            let leaf = match role {
                Role::Home => pki.home(),
                Role::Edge => pki.edge(),
            };
            verify_leaf_at(pki.ca_cert(), role, leaf, at(-time::Duration::hours(12))).unwrap();
            verify_leaf_at(
                pki.ca_cert(),
                role,
                leaf,
                at(VALIDITY - time::Duration::days(1)),
            )
            .unwrap();
            let early = verify_leaf_at(pki.ca_cert(), role, leaf, at(-time::Duration::days(2)));
            assert!(matches!(early, Err(LeafProblem::Unusable(_))), "{early:?}");
            let late = verify_leaf_at(
                pki.ca_cert(),
                role,
                leaf,
                at(VALIDITY + time::Duration::days(1)),
            );
            assert!(matches!(late, Err(LeafProblem::Unusable(_))), "{late:?}");
        }

        // The roles do not swap: the edge cannot act as the home client.
        assert!(verify_leaf(pki.ca_cert(), Role::Home, pki.edge()).is_err());
        assert!(verify_leaf(pki.ca_cert(), Role::Edge, pki.home()).is_err());
    }

    #[test]
    fn missing_leaf_is_issued_from_the_existing_ca() {
        let dir = TestDir::new("pki-reissue");
        let first = HomePki::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join("edge.key")).unwrap();
        let second = HomePki::load_or_create(dir.path()).unwrap();
        assert_eq!(first.ca_cert(), second.ca_cert());
        assert_eq!(first.home().cert_chain, second.home().cert_chain);
        assert_ne!(first.edge().cert_chain, second.edge().cert_chain);
        verify_edge(second.ca_cert(), second.edge()).unwrap();
    }

    #[test]
    fn leaf_from_another_ca_is_a_mismatch() {
        let ours = TestDir::new("pki-ours");
        let theirs = TestDir::new("pki-theirs");
        HomePki::load_or_create(ours.path()).unwrap();
        HomePki::load_or_create(theirs.path()).unwrap();
        for file in ["home.pem", "home.key"] {
            fs::copy(theirs.path().join(file), ours.path().join(file)).unwrap();
        }
        let err = HomePki::load_or_create(ours.path()).unwrap_err();
        assert!(matches!(err, PkiError::Mismatch { .. }), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("home.pem") && message.contains("delete"),
            "{message}"
        );
    }

    #[test]
    fn leaves_without_a_ca_are_refused_and_nothing_is_created() {
        let dir = TestDir::new("pki-no-ca");
        HomePki::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join("ca.pem")).unwrap();
        let err = HomePki::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, PkiError::Incomplete { .. }), "{err}");

        fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = HomePki::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, PkiError::Incomplete { .. }), "{err}");
        assert!(!dir.path().join("ca.pem").exists());
    }

    #[test]
    fn identity_pem_round_trip_and_key_check() {
        let dir = TestDir::new("pki-identity");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let edge = pki.edge();
        let again = Identity::from_pem(&edge.cert_pem(), edge.key_pem().expose()).unwrap();
        assert_eq!(again.cert_chain, edge.cert_chain);
        assert_eq!(again.key(), edge.key());

        let err = Identity::from_pem(&edge.cert_pem(), pki.home().key_pem().expose()).unwrap_err();
        assert!(matches!(err, PkiError::Parse { .. }), "{err}");
        assert!(Identity::from_pem("not pem", edge.key_pem().expose()).is_err());
        assert!(Identity::from_pem(&edge.cert_pem(), "not pem").is_err());
    }

    #[test]
    fn debug_never_prints_keys() {
        let dir = TestDir::new("pki-debug");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let key_pem = pki.edge().key_pem();
        let key_body = key_pem.expose().lines().nth(1).unwrap().to_owned();
        for shown in [
            format!("{pki:?}"),
            format!("{:?}", pki.edge()),
            format!("{key_pem:?}"),
        ] {
            assert!(!shown.contains(&key_body), "{shown}");
            assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        }
        assert_eq!(format!("{key_pem:?}"), "[redacted]");
    }

    #[test]
    fn secret_string_equality() {
        let a = SecretString::new("hunter2".into());
        assert_eq!(a, SecretString::new("hunter2".into()));
        assert_ne!(a, SecretString::new("hunter3".into()));
        assert_ne!(a, SecretString::new("hunter22".into()));
        assert_eq!(a.expose(), "hunter2");
    }

    #[test]
    fn pem_lines_are_64_columns() {
        let pem = pem_encode("CERTIFICATE", &[0xab; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        let parsed = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(parsed.as_ref(), &[0xab; 100]);
    }
}
