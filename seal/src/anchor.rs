//! The federation anchor: the operator's Ed25519 key pair. It signs cluster
//! records and global traffic policies; every controller pins its public
//! key (in the join directory) and believes no such record without it.
//!
//! The private key stays on the operator's machine (0600); it is never in
//! etcd or a join directory, so no cluster's credentials can reach it.

use std::path::Path;

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

/// Where the operator keeps the anchor's private key, and where a join
/// directory keeps its public half.
pub const ANCHOR_KEY_FILE: &str = "anchor.key";
pub const ANCHOR_PUB_FILE: &str = "anchor.pub";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the
/// 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error("the system random number generator failed; retry")]
    Random,
}

/// The anchor's public key: what readers verify records with.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AnchorPublic([u8; 32]);

impl std::fmt::Debug for AnchorPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnchorPublic({})", self.keyid())
    }
}

impl AnchorPublic {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// `anchor:` and the first 16 hex digits of the key's SHA-256: names
    /// the signer in an envelope and in `fedmesh anchor` output.
    pub fn keyid(&self) -> String {
        format!(
            "anchor:{}",
            hex(&digest::digest(&digest::SHA256, &self.0).as_ref()[..8])
        )
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }

    /// PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as OpenSSL writes it.
    pub fn to_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        fedmesh_trust::pem::encode("PUBLIC KEY", &der)
    }

    /// Reads [`Self::to_pem`]'s form; `origin` names where it came from.
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, AnchorError> {
        let invalid = |reason: &str| AnchorError::Invalid {
            origin: origin.into(),
            reason: reason.into(),
        };
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(pem)
            .map_err(|_| invalid("expected a PEM PUBLIC KEY block"))?;
        let key = spki
            .as_ref()
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .ok_or_else(|| invalid("not an Ed25519 public key"))?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| invalid("an Ed25519 public key is 32 bytes"))?;
        Ok(Self(key))
    }

    pub fn load(path: &Path) -> Result<Self, AnchorError> {
        let raw = std::fs::read(path).map_err(|source| AnchorError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&raw, &path.display().to_string())
    }
}

/// The anchor's key pair, held by the operator.
pub struct AnchorKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for AnchorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AnchorKey({})", self.public().keyid())
    }
}

impl AnchorKey {
    pub fn generate() -> Result<Self, AnchorError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| AnchorError::Random)?;
        Self::from_pkcs8(doc.as_ref(), "generated")
    }

    fn from_pkcs8(der: &[u8], origin: &str) -> Result<Self, AnchorError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|_| AnchorError::Invalid {
            origin: origin.into(),
            reason: "not an Ed25519 private key (PKCS#8)".into(),
        })?;
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
        })
    }

    pub fn public(&self) -> AnchorPublic {
        let mut key = [0; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        AnchorPublic(key)
    }

    pub fn keyid(&self) -> String {
        self.public().keyid()
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// Reads a PEM `PRIVATE KEY`. A key readable by others is refused: it
    /// is the one secret that can forge every record of the federation.
    pub fn load(path: &Path) -> Result<Self, AnchorError> {
        use std::os::unix::fs::PermissionsExt;
        let origin = path.display().to_string();
        let io = |source| AnchorError::Io {
            path: origin.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(AnchorError::Invalid {
                origin,
                reason: format!(
                    "mode {:o} lets others read the anchor key; chmod 600 it",
                    mode & 0o777
                ),
            });
        }
        let raw = std::fs::read(path).map_err(io)?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&raw).map_err(|_| AnchorError::Invalid {
            origin: origin.clone(),
            reason: "expected a PEM PRIVATE KEY block".into(),
        })?;
        Self::from_pkcs8(der.secret_pkcs8_der(), &origin)
    }

    /// Writes the private key (0600) to `dir/anchor.key` and the public key
    /// to `dir/anchor.pub`. Refuses to replace an existing key: losing it
    /// orphans every record it signed.
    pub fn save_new(&self, dir: &Path) -> Result<(), AnchorError> {
        let key_path = dir.join(ANCHOR_KEY_FILE);
        if key_path.exists() {
            return Err(AnchorError::Invalid {
                origin: key_path.display().to_string(),
                reason: "an anchor key is already there; refusing to replace it".into(),
            });
        }
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| AnchorError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let pem = fedmesh_trust::pem::encode("PRIVATE KEY", &self.pkcs8);
        fedmesh_trust::ca::write_private(&key_path, pem.as_bytes()).map_err(|e| {
            AnchorError::Invalid {
                origin: key_path.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        let pub_path = dir.join(ANCHOR_PUB_FILE);
        std::fs::write(&pub_path, self.public().to_pem()).map_err(io(&pub_path))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = AnchorKey::generate().unwrap();
        key.save_new(dir.path()).unwrap();
        let back = AnchorKey::load(&dir.path().join(ANCHOR_KEY_FILE)).unwrap();
        let public = AnchorPublic::load(&dir.path().join(ANCHOR_PUB_FILE)).unwrap();
        assert_eq!(back.public(), key.public());
        assert_eq!(public, key.public());
        let sig = back.sign(b"msg");
        assert!(public.verify(b"msg", &sig));
        assert!(!public.verify(b"msh", &sig));
        assert!(key.keyid().starts_with("anchor:") && key.keyid().len() == 23);
        // Never replaced.
        let err = AnchorKey::generate().unwrap().save_new(dir.path());
        assert!(err.unwrap_err().to_string().contains("already there"));
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        AnchorKey::generate().unwrap().save_new(dir.path()).unwrap();
        let path = dir.path().join(ANCHOR_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AnchorKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn bad_public_keys_are_named() {
        let err = AnchorPublic::from_pem(b"nonsense", "join/anchor.pub").unwrap_err();
        assert!(err.to_string().starts_with("join/anchor.pub: "), "{err}");
        let p256 = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
        let err = AnchorPublic::from_pem(p256.as_bytes(), "x").unwrap_err();
        assert!(err.to_string().contains("not an Ed25519"), "{err}");
    }
}
