//! X.509-SVIDs: a leaf certificate carrying exactly one SPIFFE ID, and its key.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};
use crate::tls;

/// Why a certificate is not a usable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("not a parsable X.509 certificate: {0}")]
    Malformed(String),
    #[error("has no URI SAN; an X.509-SVID carries exactly one SPIFFE ID")]
    NoUriSan,
    #[error("has {0} URI SANs; an X.509-SVID carries exactly one SPIFFE ID")]
    MultipleUriSans(usize),
    #[error("URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: SpiffeIdError },
    #[error("is a CA certificate; a leaf SVID must have cA=false")]
    LeafIsCa,
    #[error("lacks the digitalSignature key usage")]
    MissingDigitalSignature,
    #[error("may sign certificates (keyCertSign/cRLSign); a leaf SVID must not")]
    LeafCanSign,
    #[error("chain is empty")]
    EmptyChain,
    #[error("private key: {0}")]
    Key(String),
}

/// What fedmesh reads from a certificate: its identity and its validity window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The single SPIFFE ID in the URI SAN, if the certificate has one.
    pub spiffe_id: Option<SpiffeId>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
}

/// Parses a certificate and checks the X.509-SVID leaf rules: exactly one URI
/// SAN holding a valid SPIFFE ID, cA=false, digitalSignature, no signing usages.
pub fn parse_leaf(der: &[u8]) -> Result<(SpiffeId, CertInfo), SvidError> {
    let cert = parse(der)?;
    let id = single_spiffe_id(&cert)?;
    let info = info_of(&cert, Some(id.clone()));
    if info.is_ca {
        return Err(SvidError::LeafIsCa);
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.digital_signature() {
            return Err(SvidError::MissingDigitalSignature);
        }
        if ku.value.key_cert_sign() || ku.value.crl_sign() {
            return Err(SvidError::LeafCanSign);
        }
    } else {
        return Err(SvidError::MissingDigitalSignature);
    }
    Ok((id, info))
}

/// Parses any certificate (a root, say) without applying the leaf rules.
/// `spiffe_id` is set only when there is exactly one valid SPIFFE URI SAN.
pub fn parse_any(der: &[u8]) -> Result<CertInfo, SvidError> {
    let cert = parse(der)?;
    let id = single_spiffe_id(&cert).ok();
    Ok(info_of(&cert, id))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Malformed(
            "trailing bytes after certificate".into(),
        )),
        Err(e) => Err(SvidError::Malformed(e.to_string())),
    }
}

fn single_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(|reason| SvidError::BadSpiffeId {
            uri: uri.to_string(),
            reason,
        }),
        many => Err(SvidError::MultipleUriSans(many.len())),
    }
}

fn info_of(cert: &X509Certificate<'_>, spiffe_id: Option<SpiffeId>) -> CertInfo {
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    CertInfo {
        spiffe_id,
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
        is_ca: cert.is_ca(),
    }
}

/// An X.509-SVID with its private key, ready to present in a TLS handshake.
#[derive(Clone)]
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    certified: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Svid {
    /// `chain` is the leaf first, then any intermediates (never the root,
    /// which peers take from the bundle).
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, SvidError> {
        let leaf = chain.first().ok_or(SvidError::EmptyChain)?;
        let (id, info) = parse_leaf(leaf)?;
        let signing_key = tls::crypto_provider()
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| SvidError::Key(e.to_string()))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        // Refuse a key that does not belong to the leaf now, rather than fail
        // every handshake later.
        certified
            .keys_match()
            .map_err(|e| SvidError::Key(format!("does not match the leaf certificate: {e}")))?;
        Ok(Self {
            id,
            chain,
            key: Arc::new(key),
            certified: Arc::new(certified),
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Reads an SVID from PEM text: the chain (leaf first) and a private key.
    /// `origin` names where the text came from, for error messages.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Self, SvidError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Malformed(format!("{origin}: certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| SvidError::Key(format!("{origin}: key PEM: {e}")))?;
        Self::new(chain, key)
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.id
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn private_key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Half-way through the validity window: when renewal should start.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::pem::encode("CERTIFICATE", c))
            .collect()
    }

    pub fn key_pem(&self) -> String {
        crate::pem::encode("PRIVATE KEY", self.key.secret_der())
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}
