//! WireGuard keys.
//!
//! The home-agent keeps its key in its state directory so that a reconnect
//! or restart presents the same key to the edge and the tunnel session
//! survives; the edge makes a fresh key each time it starts and announces it
//! over the authenticated control channel.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};

/// A WireGuard private key. Never printed.
#[derive(Clone)]
pub struct WireguardKey(StaticSecret);

impl std::fmt::Debug for WireguardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WireguardKey(public {})", self.public_base64())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write WireGuard key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("WireGuard key file {path} is not a base64 32-byte key; delete it to make a new one")]
    Malformed { path: String },
}

impl WireguardKey {
    pub fn generate() -> Self {
        WireguardKey(StaticSecret::random())
    }

    pub fn secret(&self) -> StaticSecret {
        self.0.clone()
    }

    pub fn public(&self) -> [u8; 32] {
        *PublicKey::from(&self.0).as_bytes()
    }

    pub fn public_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.public())
    }

    /// Loads the key at `path`, or makes one and writes it there (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| KeyError::Malformed {
                        path: path.display().to_string(),
                    })?;
                Ok(WireguardKey(StaticSecret::from(bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?;
                let text = base64::engine::general_purpose::STANDARD.encode(key.0.to_bytes());
                f.write_all(text.as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn persists_with_private_mode() {
        let dir = crate::paths::TestDir::new("wgkey");
        let path = dir.path().join("wg.key");
        let a = WireguardKey::load_or_create(&path).unwrap();
        let b = WireguardKey::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            !format!("{a:?}")
                .contains(&base64::engine::general_purpose::STANDARD.encode(a.0.to_bytes()))
        );
        std::fs::write(&path, "nonsense").unwrap();
        assert!(matches!(
            WireguardKey::load_or_create(&path),
            Err(KeyError::Malformed { .. })
        ));
    }
}
