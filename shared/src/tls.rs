//! rustls and quinn configurations for the mutually authenticated control
//! channel.
//!
//! Both sides trust exactly one root, the home's private CA, and nothing
//! from the system store. The edge (server) requires a client certificate
//! with `clientAuth` from that CA; the home side (client) checks the edge's
//! certificate for [`EDGE_SERVER_NAME`](crate::pki::EDGE_SERVER_NAME), never
//! for the IP address. TLS 1.3 only, the *ring* provider named explicitly (so
//! aws-lc is never needed and no process default is consulted), no 0-RTT.
//!
//! With TLS 1.3 a client whose certificate the edge refuses may see its
//! `connect` succeed: the refusal then surfaces as an error on the first
//! stream operation. Callers should treat the first stream error of a new
//! connection as a possible authentication failure.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::pki::Identity;

/// The ALPN protocol of the control channel; its version moves with the
/// framing, not with the messages (those negotiate their own version).
pub const CONTROL_ALPN: &[u8] = b"skerry-ctl/1";

/// How often an idle control connection sends a keep-alive.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a control connection may hear nothing before it is dead
/// (four missed keep-alives).
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Bidirectional streams either side may have open at once.
pub const MAX_CONCURRENT_BIDI_STREAMS: u32 = 4;

/// The *ring* crypto provider, the only one skerry uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the CA certificate is not usable as a trust anchor: {0}")]
    TrustAnchor(#[source] rustls::Error),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    #[error("TLS configuration refused (is the identity's key the one of its certificate?): {0}")]
    Config(#[from] rustls::Error),
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(TlsError::TrustAnchor)?;
    Ok(Arc::new(roots))
}

/// The edge's rustls configuration: TLS 1.3, client certificates required
/// and verified against `ca`, ALPN [`CONTROL_ALPN`].
pub fn server_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key())?;
    config.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    Ok(config)
}

/// The home side's rustls configuration: trusts only `ca`, presents
/// `identity`, ALPN [`CONTROL_ALPN`].
pub fn client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key())?;
    config.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
    Ok(config)
}

/// The QUIC transport settings both ends use: keep-alives, an idle timeout,
/// no unidirectional streams and at most [`MAX_CONCURRENT_BIDI_STREAMS`]
/// bidirectional ones.
pub fn transport_config() -> TransportConfig {
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(idle_timeout()))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_BIDI_STREAMS));
    transport
}

fn idle_timeout() -> IdleTimeout {
    // The idle timeout is a QUIC varint of milliseconds; 20 000 fits a u32.
    let millis = u32::try_from(MAX_IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX);
    IdleTimeout::from(VarInt::from_u32(millis))
}

/// [`server_config`] for quinn, with [`transport_config`].
pub fn quic_server_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = QuicServerConfig::try_from(Arc::new(server_config(ca, identity)?))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// [`client_config`] for quinn, with [`transport_config`].
pub fn quic_client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = QuicClientConfig::try_from(Arc::new(client_config(ca, identity)?))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::paths::TestDir;
    use crate::pki::{EDGE_SERVER_NAME, HomePki};

    /// Every network step of a test must finish within this.
    const STEP: Duration = Duration::from_secs(10);

    const MESSAGE: &[u8] = b"hello from home";

    /// An edge endpoint on 127.0.0.1:0 that accepts one connection, echoes
    /// one bidirectional stream, and reports what happened.
    struct Edge {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<Result<Vec<u8>, String>>,
        _endpoint: quinn::Endpoint,
    }

    impl Edge {
        fn start(pki: &HomePki) -> Edge {
            let config = quic_server_config(pki.ca_cert(), pki.edge()).unwrap();
            let endpoint =
                quinn::Endpoint::server(config, (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
            let addr = endpoint.local_addr().unwrap();
            let accepting = endpoint.clone();
            let task = tokio::spawn(async move {
                let incoming = accepting.accept().await.ok_or("endpoint closed")?;
                let conn = incoming.await.map_err(|e| format!("handshake: {e}"))?;
                let (mut send, mut recv) = conn
                    .accept_bi()
                    .await
                    .map_err(|e| format!("accept_bi: {e}"))?;
                let got = recv
                    .read_to_end(1024)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                send.write_all(&got)
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                send.finish().map_err(|e| format!("finish: {e}"))?;
                conn.closed().await;
                Ok(got)
            });
            Edge {
                addr,
                task,
                _endpoint: endpoint,
            }
        }

        async fn outcome(self) -> Result<Vec<u8>, String> {
            tokio::time::timeout(STEP, self.task)
                .await
                .map_err(|_| "edge timed out".to_owned())?
                .map_err(|e| format!("edge task: {e}"))?
        }
    }

    /// Connects to `addr` as `name`, echoes [`MESSAGE`], returns the echo.
    async fn echo(
        config: quinn::ClientConfig,
        addr: SocketAddr,
        name: &str,
    ) -> Result<Vec<u8>, String> {
        let mut endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        endpoint.set_default_client_config(config);
        let attempt = async {
            let conn = endpoint
                .connect(addr, name)
                .map_err(|e| format!("connect: {e}"))?
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open_bi: {e}"))?;
            send.write_all(MESSAGE)
                .await
                .map_err(|e| format!("write: {e}"))?;
            send.finish().map_err(|e| format!("finish: {e}"))?;
            let echoed = recv
                .read_to_end(1024)
                .await
                .map_err(|e| format!("read: {e}"))?;
            conn.close(VarInt::from_u32(0), b"done");
            Ok(echoed)
        };
        let result = tokio::time::timeout(STEP, attempt)
            .await
            .unwrap_or_else(|_| Err("client timed out".to_owned()));
        endpoint.wait_idle().await;
        result
    }

    fn no_client_cert_config(pki: &HomePki) -> quinn::ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_cert().clone()).unwrap();
        let mut crypto = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        crypto.alpn_protocols = vec![CONTROL_ALPN.to_vec()];
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto).unwrap()))
    }

    #[tokio::test]
    async fn mutual_tls_with_one_ca_echoes() {
        let dir = TestDir::new("tls-ok");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let edge = Edge::start(&pki);
        let config = quic_client_config(pki.ca_cert(), pki.home()).unwrap();
        let echoed = echo(config, edge.addr, EDGE_SERVER_NAME).await;
        assert_eq!(echoed.as_deref(), Ok(MESSAGE));
        assert_eq!(edge.outcome().await.as_deref(), Ok(MESSAGE));
    }

    #[tokio::test]
    async fn client_cert_from_another_ca_is_refused() {
        let dir = TestDir::new("tls-ours");
        let other = TestDir::new("tls-theirs");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let intruder = HomePki::load_or_create(other.path()).unwrap();
        let edge = Edge::start(&pki);
        // Trusts our CA (so the edge looks fine) but presents a stranger's cert.
        let config = quic_client_config(pki.ca_cert(), intruder.home()).unwrap();
        let echoed = echo(config, edge.addr, EDGE_SERVER_NAME).await;
        assert!(echoed.is_err(), "client got {echoed:?}");
        let outcome = edge.outcome().await;
        assert!(
            outcome.as_ref().is_err_and(|e| e.starts_with("handshake")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn client_without_a_cert_is_refused() {
        let dir = TestDir::new("tls-nocert");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let edge = Edge::start(&pki);
        let echoed = echo(no_client_cert_config(&pki), edge.addr, EDGE_SERVER_NAME).await;
        assert!(echoed.is_err(), "client got {echoed:?}");
        let outcome = edge.outcome().await;
        assert!(
            outcome.as_ref().is_err_and(|e| e.starts_with("handshake")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn the_edge_identity_cannot_act_as_the_home() {
        let dir = TestDir::new("tls-swap");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let edge = Edge::start(&pki);
        // Signed by the right CA, but for serverAuth only.
        let config = quic_client_config(pki.ca_cert(), pki.edge()).unwrap();
        let echoed = echo(config, edge.addr, EDGE_SERVER_NAME).await;
        assert!(echoed.is_err(), "client got {echoed:?}");
        assert!(edge.outcome().await.is_err());
    }

    #[tokio::test]
    async fn the_server_name_checked_is_the_fixed_edge_name() {
        let dir = TestDir::new("tls-name");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let config = quic_client_config(pki.ca_cert(), pki.home()).unwrap();
        for name in ["other.skerry.internal", "127.0.0.1"] {
            let edge = Edge::start(&pki);
            let echoed = echo(config.clone(), edge.addr, name).await;
            assert!(
                echoed.as_ref().is_err_and(|e| e.starts_with("handshake")),
                "{name}: {echoed:?}"
            );
            assert!(edge.outcome().await.is_err(), "{name}");
        }
        let edge = Edge::start(&pki);
        let echoed = echo(config, edge.addr, EDGE_SERVER_NAME).await;
        assert_eq!(echoed.as_deref(), Ok(MESSAGE));
        assert_eq!(edge.outcome().await.as_deref(), Ok(MESSAGE));
    }

    #[test]
    fn configs_are_tls13_with_alpn() {
        let dir = TestDir::new("tls-config");
        let pki = HomePki::load_or_create(dir.path()).unwrap();
        let server = server_config(pki.ca_cert(), pki.edge()).unwrap();
        let client = client_config(pki.ca_cert(), pki.home()).unwrap();
        assert_eq!(server.alpn_protocols, vec![CONTROL_ALPN.to_vec()]);
        assert_eq!(client.alpn_protocols, vec![CONTROL_ALPN.to_vec()]);
        assert_eq!(server.max_early_data_size, 0);
        assert!(!client.enable_early_data);
        // A key that is not the certificate's is refused when building.
        let mut mixed = pki.edge().clone();
        mixed.cert_chain = pki.home().cert_chain.clone();
        assert!(matches!(
            server_config(pki.ca_cert(), &mixed),
            Err(TlsError::Config(_))
        ));
    }
}
