//! A cluster's certificate authority: one self-signed root per trust domain.
//!
//! The CA issues X.509-SVIDs only inside its own trust domain. It never
//! leaves the cluster: peers receive its certificate through the bundle.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{self, Svid, SvidError};
use crate::tls;

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{origin}: {source}")]
    Io {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin}: {reason}")]
    Pem { origin: String, reason: String },
    #[error(
        "{origin}: wrong key type: found {found}; a cluster CA key must be ECDSA P-256 or P-384"
    )]
    WrongKeyType { origin: String, found: String },
    #[error("{origin}: not usable as a CA certificate: {reason}")]
    NotCa { origin: String, reason: String },
    #[error("{key_origin}: this private key does not belong to the certificate in {cert_origin}")]
    KeyMismatch {
        cert_origin: String,
        key_origin: String,
    },
    #[error(
        "{origin}: the certificate names trust domain {found:?}, but this CA was loaded for {expected:?}"
    )]
    TrustDomainMismatch {
        origin: String,
        found: String,
        expected: String,
    },
    #[error("CA for trust domain {ca} cannot issue {requested}: it is outside the trust domain")]
    ForeignIdentity {
        ca: TrustDomain,
        requested: SpiffeId,
    },
    #[error("certificate signing request refused: {0}")]
    CsrRefused(String),
    #[error("issued certificate is not a valid SVID: {0}")]
    BadIssue(#[from] SvidError),
    #[error("the system random number generator failed; retry")]
    Random,
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

impl CaError {
    pub(crate) fn io(origin: &Path, source: std::io::Error) -> Self {
        Self::Io {
            origin: origin.display().to_string(),
            source,
        }
    }
}

/// The key algorithm of a new CA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyAlgorithm {
    #[default]
    EcdsaP256,
    EcdsaP384,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        }
    }
}

/// How a new CA root is made.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub key_algorithm: KeyAlgorithm,
    /// Validity of the root. Rotation replaces it well before the end.
    pub lifetime: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            key_algorithm: KeyAlgorithm::EcdsaP256,
            lifetime: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// How leaves are issued.
#[derive(Debug, Clone)]
pub struct SvidPolicy {
    /// Validity of a leaf, from the moment it is issued.
    pub lifetime: Duration,
    /// How far not-before is set in the past, to absorb clock skew between
    /// clusters. Capped at a tenth of `lifetime` so short test lifetimes work.
    pub clock_skew: Duration,
}

impl Default for SvidPolicy {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(24 * 3600),
            clock_skew: Duration::from_secs(5 * 60),
        }
    }
}

impl SvidPolicy {
    fn window(&self, now: SystemTime) -> (SystemTime, SystemTime) {
        let backdate = self.clock_skew.min(self.lifetime / 10);
        (now - backdate, now + self.lifetime)
    }
}

/// A trust domain's signing root.
pub struct ClusterCa {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Creates a fresh, self-signed root for `trust_domain`.
    pub fn generate(
        trust_domain: &TrustDomain,
        options: &CaOptions,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(options.key_algorithm.rcgen())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "fedmesh");
        dn.push(
            DnType::CommonName,
            format!("fedmesh root {trust_domain} {}", unix_secs(now)),
        );
        params.distinguished_name = dn;
        // Leaves only, straight under the root: nothing may chain below a leaf.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // The SPIFFE ID of a signing authority is its trust domain's own ID.
        params.subject_alt_names = vec![SanType::URI(trust_domain.id().as_str().try_into()?)];
        params.not_before = to_offset(now - Duration::from_secs(60));
        params.not_after = to_offset(now + options.lifetime);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert = cert.der().clone();
        Self::assemble(trust_domain.clone(), cert, key, "generated")
    }

    /// Reads a CA from PEM text. `cert_origin` and `key_origin` name where the
    /// text came from (a file, an etcd key) so that errors point at it.
    pub fn from_pem(
        trust_domain: &TrustDomain,
        cert_pem: &[u8],
        key_pem: &[u8],
        cert_origin: &str,
        key_origin: &str,
    ) -> Result<Self, CaError> {
        let cert = CertificateDer::from_pem_slice(cert_pem).map_err(|e| CaError::Pem {
            origin: cert_origin.into(),
            reason: format!("no readable CERTIFICATE block: {e}"),
        })?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CaError::Pem {
            origin: key_origin.into(),
            reason: format!("no readable PRIVATE KEY block: {e}"),
        })?;
        let key = load_key(&key_der, key_origin)?;
        let parsed = X509Certificate::from_der(&cert)
            .map_err(|e| CaError::Pem {
                origin: cert_origin.into(),
                reason: format!("not a valid X.509 certificate: {e}"),
            })?
            .1;
        if !parsed.is_ca() {
            return Err(CaError::NotCa {
                origin: cert_origin.into(),
                reason: "basicConstraints cA is not set".into(),
            });
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
            return Err(CaError::KeyMismatch {
                cert_origin: cert_origin.into(),
                key_origin: key_origin.into(),
            });
        }
        let info = svid::parse_any(&cert).map_err(|e| CaError::NotCa {
            origin: cert_origin.into(),
            reason: e.to_string(),
        })?;
        if let Some(id) = info
            .spiffe_id
            .filter(|id| id.trust_domain_name() != trust_domain.as_str())
        {
            return Err(CaError::TrustDomainMismatch {
                origin: cert_origin.into(),
                found: id.trust_domain_name().into(),
                expected: trust_domain.to_string(),
            });
        }
        Self::assemble(trust_domain.clone(), cert, key, cert_origin)
    }

    fn assemble(
        trust_domain: TrustDomain,
        cert: CertificateDer<'static>,
        key: KeyPair,
        origin: &str,
    ) -> Result<Self, CaError> {
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::NotCa {
            origin: origin.into(),
            reason: e.to_string(),
        })?;
        let info = svid::parse_any(&cert).map_err(|e| CaError::NotCa {
            origin: origin.into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            trust_domain,
            cert,
            issuer,
            not_after: info.not_after,
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert = fs::read(&cert_path).map_err(|e| CaError::io(&cert_path, e))?;
        let key = fs::read(&key_path).map_err(|e| CaError::io(&key_path, e))?;
        warn_if_exposed(&key_path);
        Self::from_pem(
            trust_domain,
            &cert,
            &key,
            &cert_path.display().to_string(),
            &key_path.display().to_string(),
        )
    }

    /// Writes `ca.crt` and `ca.key` into `dir` (created 0700 if missing), both
    /// 0600. Each file is written whole and renamed into place, so a crash
    /// never leaves half a key behind.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        create_private_dir(dir)?;
        write_private(&dir.join(CA_CERT_FILE), self.cert_pem().as_bytes())?;
        write_private(&dir.join(CA_KEY_FILE), self.key_pem().as_bytes())?;
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub fn cert_pem(&self) -> String {
        crate::pem::encode("CERTIFICATE", &self.cert)
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs `msg` with the root's key (ECDSA, ASN.1 DER): how a cluster
    /// vouches for its bundle in the global zone. Verified with the root
    /// certificate's public key, which readers already trust.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CaError> {
        use rcgen::SigningKey;
        Ok(self.issuer.key().sign(msg)?)
    }

    /// Issues an SVID for `id` with a freshly generated P-256 key.
    pub fn issue(
        &self,
        id: &SpiffeId,
        policy: &SvidPolicy,
        now: SystemTime,
    ) -> Result<Svid, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = self.sign_leaf(id, &key, policy, now)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Svid::new(vec![cert], key_der)?)
    }

    /// Signs a CSR, but only for `allowed`: the identity that the caller's
    /// credential entitles it to. The CSR must prove possession of its key and
    /// may ask for no other name; the subject is ignored.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        allowed: &SpiffeId,
        policy: &SvidPolicy,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CaError::CsrRefused(format!("unreadable or badly signed CSR: {e}")))?;
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == allowed.as_str() => {}
                SanType::URI(uri) => {
                    return Err(CaError::CsrRefused(format!(
                        "it asks for {:?}, but the caller may only have {allowed}",
                        uri.as_str()
                    )));
                }
                other => {
                    return Err(CaError::CsrRefused(format!(
                        "it asks for a non-URI name {other:?}; only {allowed} may be requested"
                    )));
                }
            }
        }
        if csr.params.is_ca != IsCa::NoCa {
            return Err(CaError::CsrRefused("it asks to be a CA".into()));
        }
        self.sign_leaf(allowed, &csr.public_key, policy, now)
    }

    fn sign_leaf(
        &self,
        id: &SpiffeId,
        public_key: &impl PublicKeyData,
        policy: &SvidPolicy,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignIdentity {
                ca: self.trust_domain.clone(),
                requested: id.clone(),
            });
        }
        let (not_before, not_after) = policy.window(now);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "fedmesh");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = to_offset(not_before);
        // Never outlive the root that vouches for the leaf.
        params.not_after = to_offset(not_after.min(self.not_after));
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(cert.der().clone())
    }
}

/// A fresh P-256 key and a CSR for `id`, as a workload sends to `Certify`.
pub fn certificate_request(id: &SpiffeId) -> Result<(Vec<u8>, PrivateKeyDer<'static>), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((csr.der().to_vec(), key_der))
}

fn load_key(der: &PrivateKeyDer<'_>, origin: &str) -> Result<KeyPair, CaError> {
    if let PrivateKeyDer::Pkcs1(_) = der {
        return Err(CaError::WrongKeyType {
            origin: origin.into(),
            found: "RSA".into(),
        });
    }
    let key = KeyPair::try_from(der).map_err(|e| CaError::Pem {
        origin: origin.into(),
        reason: format!("unreadable private key: {e}"),
    })?;
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 || alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Ok(key);
    }
    let found = if alg == &rcgen::PKCS_ED25519 {
        "Ed25519".to_string()
    } else if alg == &rcgen::PKCS_RSA_SHA256 {
        "RSA".to_string()
    } else {
        format!("{alg:?}")
    };
    Err(CaError::WrongKeyType {
        origin: origin.into(),
        found,
    })
}

/// `n` random bytes from the crypto provider, as lowercase hex: secrets
/// (join tokens, passwords) made in one place.
pub fn random_hex(n: usize) -> Result<String, CaError> {
    let mut bytes = vec![0u8; n];
    tls::crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub(crate) fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    tls::crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // A positive INTEGER: clear the top bit, and keep it non-zero.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

pub(crate) fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::UNIX_EPOCH + t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CaError::io(dir, e))
}

/// Writes `bytes` to `path` with mode 0600, atomically (temp file + rename).
/// For key material and anything else that must not be world-readable.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = path.with_extension("tmp");
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CaError::io(path, e)
    })
}

fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "CA private key is readable by group or others; chmod 600 it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn generated_root_is_a_p256_ca_carrying_its_trust_domain_id() {
        let ca = ClusterCa::generate(&td("aws.example"), &CaOptions::default(), now()).unwrap();
        let info = svid::parse_any(ca.cert_der()).unwrap();
        assert!(info.is_ca);
        assert_eq!(info.spiffe_id.unwrap().as_str(), "spiffe://aws.example");
        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert_eq!(
            cert.signature_algorithm.algorithm,
            x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );
        assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
    }

    #[test]
    fn save_writes_0600_files_and_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca");
        let t = td("gcp.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        ca.save(&path).unwrap();
        for f in [CA_CERT_FILE, CA_KEY_FILE] {
            let mode = fs::metadata(path.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let dir_mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let loaded = ClusterCa::load(&path, &t).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        // The loaded CA signs leaves that chain to the same root.
        let id = SpiffeId::workload(&t, "shop", "cart").unwrap();
        let svid = loaded.issue(&id, &SvidPolicy::default(), now()).unwrap();
        assert_eq!(svid.spiffe_id(), &id);
    }

    #[test]
    fn p384_roots_work_too() {
        let opts = CaOptions {
            key_algorithm: KeyAlgorithm::EcdsaP384,
            ..Default::default()
        };
        let t = td("azure.example");
        let ca = ClusterCa::generate(&t, &opts, now()).unwrap();
        let pem = ClusterCa::from_pem(
            &t,
            ca.cert_pem().as_bytes(),
            ca.key_pem().as_bytes(),
            "c",
            "k",
        );
        assert!(pem.is_ok());
    }

    #[test]
    fn load_names_the_file_on_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let t = td("aws.example");
        let err = ClusterCa::load(dir.path(), &t).unwrap_err().to_string();
        assert!(
            err.contains("ca.crt") && err.contains("No such file"),
            "{err}"
        );

        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        ca.save(dir.path()).unwrap();
        let crt = dir.path().join(CA_CERT_FILE);

        // Corrupt PEM.
        fs::write(
            &crt,
            "-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = ClusterCa::load(dir.path(), &t).unwrap_err().to_string();
        assert!(err.contains("ca.crt"), "{err}");

        // Valid PEM, but not a certificate.
        fs::write(&crt, crate::pem::encode("CERTIFICATE", b"garbage")).unwrap();
        let err = ClusterCa::load(dir.path(), &t).unwrap_err().to_string();
        assert!(
            err.contains("ca.crt") && err.contains("not a valid X.509"),
            "{err}"
        );

        // Wrong trust domain.
        fs::write(&crt, ca.cert_pem()).unwrap();
        let err = ClusterCa::load(dir.path(), &td("gcp.example"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("aws.example") && err.contains("gcp.example"),
            "{err}"
        );

        // A key of another CA.
        let other = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        fs::write(dir.path().join(CA_KEY_FILE), other.key_pem()).unwrap();
        let err = ClusterCa::load(dir.path(), &t).unwrap_err();
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("ca.key"));
    }

    #[test]
    fn wrong_key_types_are_named() {
        let t = td("aws.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let err = ClusterCa::from_pem(
            &t,
            ca.cert_pem().as_bytes(),
            ed.serialize_pem().as_bytes(),
            "ca.crt",
            "ca.key",
        )
        .unwrap_err();
        assert!(
            matches!(&err, CaError::WrongKeyType { found, .. } if found == "Ed25519"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("ca.key: wrong key type"),
            "{err}"
        );

        let rsa_pkcs1 = crate::pem::encode("RSA PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        let err = ClusterCa::from_pem(
            &t,
            ca.cert_pem().as_bytes(),
            rsa_pkcs1.as_bytes(),
            "ca.crt",
            "ca.key",
        )
        .unwrap_err();
        assert!(
            matches!(&err, CaError::WrongKeyType { found, .. } if found == "RSA"),
            "{err}"
        );
    }

    #[test]
    fn a_leaf_certificate_is_not_accepted_as_a_ca() {
        let t = td("aws.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        let svid = ca
            .issue(
                &SpiffeId::workload(&t, "a", "b").unwrap(),
                &SvidPolicy::default(),
                now(),
            )
            .unwrap();
        let err = ClusterCa::from_pem(
            &t,
            svid.chain_pem().as_bytes(),
            svid.key_pem().as_bytes(),
            "leaf.crt",
            "leaf.key",
        )
        .unwrap_err();
        assert!(matches!(err, CaError::NotCa { .. }), "{err}");
    }

    #[test]
    fn issued_svid_has_the_x509_svid_profile() {
        let t = td("aws.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        let id = SpiffeId::gateway(&t, "aws-use1").unwrap();
        let issued_at = now();
        let svid = ca.issue(&id, &SvidPolicy::default(), issued_at).unwrap();
        let (_, cert) = X509Certificate::from_der(svid.leaf()).unwrap();
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        // 24 h by default, not-before slightly in the past.
        let life = svid.not_after().duration_since(issued_at).unwrap();
        assert!(
            life <= Duration::from_secs(24 * 3600) && life > Duration::from_secs(24 * 3600 - 2)
        );
        let skew = issued_at.duration_since(svid.not_before()).unwrap();
        assert!(
            skew >= Duration::from_secs(299) && skew <= Duration::from_secs(301),
            "{skew:?}"
        );
    }

    #[test]
    fn serials_are_unique() {
        let t = td("aws.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        let id = SpiffeId::workload(&t, "a", "b").unwrap();
        let serial = |der: &CertificateDer<'_>| {
            X509Certificate::from_der(der)
                .unwrap()
                .1
                .raw_serial()
                .to_vec()
        };
        let a = ca.issue(&id, &SvidPolicy::default(), now()).unwrap();
        let b = ca.issue(&id, &SvidPolicy::default(), now()).unwrap();
        assert_ne!(serial(a.leaf()), serial(b.leaf()));
    }

    #[test]
    fn refuses_identities_of_other_trust_domains() {
        let ca = ClusterCa::generate(&td("aws.example"), &CaOptions::default(), now()).unwrap();
        let foreign = SpiffeId::parse("spiffe://gcp.example/ns/shop/sa/cart").unwrap();
        let err = ca
            .issue(&foreign, &SvidPolicy::default(), now())
            .unwrap_err();
        assert!(matches!(err, CaError::ForeignIdentity { .. }), "{err}");
    }

    fn csr_for(names: &[&str]) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| SanType::URI((*n).try_into().unwrap()))
            .collect();
        let csr = params.serialize_request(&key).unwrap();
        (csr.der().to_vec(), key)
    }

    #[test]
    fn csr_is_signed_only_for_the_allowed_identity() {
        let t = td("aws.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        let allowed = SpiffeId::workload(&t, "shop", "checkout").unwrap();
        let policy = SvidPolicy::default();

        let (csr, key) = csr_for(&[allowed.as_str()]);
        let cert = ca.sign_csr(&csr, &allowed, &policy, now()).unwrap();
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let svid = Svid::new(vec![cert], key_der).unwrap();
        assert_eq!(svid.spiffe_id(), &allowed);

        // No SAN asked: the allowed identity is filled in.
        let (csr, _) = csr_for(&[]);
        let cert = ca.sign_csr(&csr, &allowed, &policy, now()).unwrap();
        assert_eq!(svid::parse_leaf(&cert).unwrap().0, allowed);

        // Another identity, or an extra one, is refused.
        let (csr, _) = csr_for(&["spiffe://aws.example/ns/shop/sa/admin"]);
        let err = ca.sign_csr(&csr, &allowed, &policy, now()).unwrap_err();
        assert!(err.to_string().contains("sa/admin"), "{err}");
        let (csr, _) = csr_for(&[allowed.as_str(), "spiffe://aws.example/x"]);
        assert!(ca.sign_csr(&csr, &allowed, &policy, now()).is_err());

        // A CSR whose signature does not match (tampered) is refused.
        let (mut csr, _) = csr_for(&[allowed.as_str()]);
        let last = csr.len() - 1;
        csr[last] ^= 0xff;
        let err = ca.sign_csr(&csr, &allowed, &policy, now()).unwrap_err();
        assert!(matches!(err, CaError::CsrRefused(_)), "{err}");

        // Garbage does not panic.
        assert!(
            ca.sign_csr(b"\x30\x03\x02\x01", &allowed, &policy, now())
                .is_err()
        );
    }

    #[test]
    fn certificate_request_round_trips_through_sign_csr() {
        let t = td("aws.example");
        let ca = ClusterCa::generate(&t, &CaOptions::default(), now()).unwrap();
        let id = SpiffeId::workload(&t, "shop", "web").unwrap();
        let (csr, key) = certificate_request(&id).unwrap();
        let cert = ca
            .sign_csr(&csr, &id, &SvidPolicy::default(), now())
            .unwrap();
        assert_eq!(Svid::new(vec![cert], key).unwrap().spiffe_id(), &id);
    }

    #[test]
    fn leaves_never_outlive_their_root() {
        let t = td("aws.example");
        let opts = CaOptions {
            lifetime: Duration::from_secs(3600),
            ..Default::default()
        };
        let ca = ClusterCa::generate(&t, &opts, now()).unwrap();
        let svid = ca
            .issue(
                &SpiffeId::workload(&t, "a", "b").unwrap(),
                &SvidPolicy::default(),
                now(),
            )
            .unwrap();
        assert!(svid.not_after() <= ca.not_after());
    }
}
