//! Verifying peers: the federated `BundleSet`, SPIFFE-aware rustls verifiers,
//! and the authorizer hook that decides which identities may connect.
//!
//! The rule that makes federation safe: a peer's chain is checked only
//! against the bundle of the trust domain named in *its own* leaf. A cluster's
//! CA can therefore never vouch for another cluster's identities, even though
//! every cluster trusts every bundle.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use crate::bundle::Bundle;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{self, SvidError};

/// Every trust domain this cluster federates with, and its roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: Bundle) -> Option<Bundle> {
        self.bundles.insert(bundle.trust_domain().clone(), bundle)
    }

    pub fn remove(&mut self, td: &TrustDomain) -> Option<Bundle> {
        self.bundles.remove(td)
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// Verifies again, at `now`, a chain a peer presented earlier (leaf
    /// first), with the process's crypto provider: a live connection is
    /// re-checked when the bundles change, so a withdrawn root or a removed
    /// trust domain reaches it without waiting for a new handshake.
    pub fn reverify(
        &self,
        chain: &[CertificateDer<'_>],
        now: std::time::SystemTime,
        usage: Usage,
    ) -> Result<SpiffeId, VerifyError> {
        let (leaf, intermediates) =
            chain
                .split_first()
                .ok_or(VerifyError::NotSvid(SvidError::Malformed(
                    "empty chain".into(),
                )))?;
        let since = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let algorithms = crate::tls::crypto_provider().signature_verification_algorithms;
        self.verify_svid(
            leaf,
            intermediates,
            UnixTime::since_unix_epoch(since),
            usage,
            &algorithms,
        )
    }

    /// Verifies a presented chain and returns the peer's SPIFFE ID.
    ///
    /// Checks, in order: the leaf is an X.509-SVID (exactly one URI SAN with a
    /// valid SPIFFE ID, cA=false, digitalSignature, no signing usages); a
    /// bundle exists for the leaf's trust domain; the chain builds to one of
    /// that bundle's roots, with every certificate inside its validity window
    /// at `now`, valid signatures, and the extended key usage for `usage`.
    pub fn verify_svid(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
        algorithms: &WebPkiSupportedAlgorithms,
    ) -> Result<SpiffeId, VerifyError> {
        let (id, _) = svid::parse_leaf(end_entity)?;
        let td = id.trust_domain();
        let bundle = self
            .bundles
            .get(&td)
            .ok_or_else(|| VerifyError::UnknownTrustDomain(td.clone()))?;
        let anchors = bundle
            .roots()
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect::<Vec<_>>();
        if anchors.is_empty() {
            return Err(VerifyError::UnknownTrustDomain(td));
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(VerifyError::Chain)?;
        let eku = match usage {
            Usage::Server => webpki::KeyUsage::server_auth(),
            Usage::Client => webpki::KeyUsage::client_auth(),
        };
        ee.verify_for_usage(
            algorithms.all,
            &anchors,
            intermediates,
            now,
            eku,
            None,
            None,
        )
        .map_err(VerifyError::Chain)?;
        Ok(id)
    }
}

/// Which side of a handshake the verified peer is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a server: its leaf needs the serverAuth EKU.
    Server,
    /// The peer is a client: its leaf needs the clientAuth EKU.
    Client,
}

/// Why a peer was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    #[error("peer certificate is not an X.509-SVID: {0}")]
    NotSvid(#[from] SvidError),
    #[error("no bundle for trust domain {0}: it is not federated with this cluster")]
    UnknownTrustDomain(TrustDomain),
    #[error("chain does not verify against the bundle of its own trust domain: {0}")]
    Chain(webpki::Error),
    #[error("{id} is not authorized: {reason}")]
    Unauthorized { id: SpiffeId, reason: String },
}

impl VerifyError {
    /// A rustls error that keeps the precise alert (expired, unknown CA, ...)
    /// where TLS has one.
    pub fn into_rustls(self) -> rustls::Error {
        let cert_err = match &self {
            VerifyError::Chain(e) => match e {
                webpki::Error::CertExpired { time, not_after } => {
                    CertificateError::ExpiredContext {
                        time: *time,
                        not_after: *not_after,
                    }
                }
                webpki::Error::CertNotValidYet { time, not_before } => {
                    CertificateError::NotValidYetContext {
                        time: *time,
                        not_before: *not_before,
                    }
                }
                webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
                webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
                webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
                _ => CertificateError::Other(rustls::OtherError(Arc::new(self.clone()))),
            },
            VerifyError::UnknownTrustDomain(_) => CertificateError::UnknownIssuer,
            VerifyError::NotSvid(_) | VerifyError::Unauthorized { .. } => {
                CertificateError::ApplicationVerificationFailure
            }
        };
        tracing::debug!(error = %self, "refused peer certificate");
        rustls::Error::InvalidCertificate(cert_err)
    }
}

/// Decides which verified identities may connect. Called after the chain has
/// been verified, with the peer's SPIFFE ID.
pub trait Authorizer: Send + Sync + fmt::Debug {
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String>;
}

/// Any identity whose chain verifies against its own trust domain's bundle.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAnyVerified;

impl Authorizer for AllowAnyVerified {
    fn authorize(&self, _: &SpiffeId) -> Result<(), String> {
        Ok(())
    }
}

/// Exactly the listed identities.
#[derive(Debug, Clone, Default)]
pub struct AllowIds(pub HashSet<SpiffeId>);

impl AllowIds {
    pub fn one(id: SpiffeId) -> Self {
        Self(HashSet::from([id]))
    }
}

impl Authorizer for AllowIds {
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String> {
        if self.0.contains(peer) {
            Ok(())
        } else {
            Err("not in the list of allowed identities".into())
        }
    }
}

/// Any identity in the listed trust domains.
#[derive(Debug, Clone, Default)]
pub struct AllowTrustDomains(pub HashSet<TrustDomain>);

impl Authorizer for AllowTrustDomains {
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String> {
        if self.0.iter().any(|td| peer.is_member_of(td)) {
            Ok(())
        } else {
            Err(format!(
                "trust domain {} is not allowed",
                peer.trust_domain_name()
            ))
        }
    }
}

/// An authorizer from a closure.
pub struct AuthorizeFn<F>(pub F);

impl<F> fmt::Debug for AuthorizeFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthorizeFn")
    }
}

impl<F> Authorizer for AuthorizeFn<F>
where
    F: Fn(&SpiffeId) -> Result<(), String> + Send + Sync,
{
    fn authorize(&self, peer: &SpiffeId) -> Result<(), String> {
        (self.0)(peer)
    }
}

/// Verifies peers against the *current* bundle set, read from a watch channel
/// at every handshake, so that bundle updates apply without a restart.
#[derive(Debug, Clone)]
pub struct SpiffeVerifier {
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    pub fn new(
        bundles: watch::Receiver<Arc<BundleSet>>,
        authorizer: Arc<dyn Authorizer>,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            bundles,
            authorizer,
            algorithms,
        }
    }

    /// Chain verification followed by the authorizer.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, VerifyError> {
        let set = Arc::clone(&self.bundles.borrow());
        let id = set.verify_svid(end_entity, intermediates, now, usage, &self.algorithms)?;
        self.authorizer
            .authorize(&id)
            .map_err(|reason| VerifyError::Unauthorized {
                id: id.clone(),
                reason,
            })?;
        Ok(id)
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

/// The client-side view: verifies the server we connected to.
///
/// The TLS server name is deliberately ignored: SVIDs carry no DNS names, and
/// the identity check is the authorizer's job (typically `AllowIds` naming
/// the one peer we meant to reach).
#[derive(Debug, Clone)]
pub struct SpiffeServerVerifier(pub SpiffeVerifier);

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .verify(end_entity, intermediates, now, Usage::Server)
            .map(|_| ServerCertVerified::assertion())
            .map_err(VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// The server-side view: verifies a client SVID. With `mandatory` false a
/// client may also connect without a certificate (to bootstrap one); the
/// application then decides what such a client may do.
#[derive(Debug, Clone)]
pub struct SpiffeClientVerifier {
    pub verifier: SpiffeVerifier,
    pub mandatory: bool,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Clients hold one SVID each; hints would only leak the federation's shape.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier
            .verify(end_entity, intermediates, now, Usage::Client)
            .map(|_| ClientCertVerified::assertion())
            .map_err(VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier.algorithms.supported_schemes()
    }
}

// fedmesh configs offer TLS 1.3 only, so this is reached only by a downgrade.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General(
        "TLS 1.2 signature offered; fedmesh accepts TLS 1.3 only".into(),
    ))
}

/// The SPIFFE ID of an already-verified peer, from its presented chain.
pub fn peer_spiffe_id(chain: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = chain?.first()?;
    svid::parse_leaf(leaf).ok().map(|(id, _)| id)
}
