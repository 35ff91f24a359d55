//! rustls configs for fedmesh components: TLS 1.3 only, aws-lc-rs with the
//! post-quantum hybrid X25519MLKEM768 preferred, SVIDs presented and verified
//! through watch channels so that renewals and bundle updates apply to a
//! running server or client without a restart.

use std::sync::{Arc, OnceLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{self, kx_group};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::sync::watch;

use crate::svid::Svid;
use crate::verify::{
    Authorizer, BundleSet, SpiffeClientVerifier, SpiffeServerVerifier, SpiffeVerifier,
};

/// The one crypto provider of the whole tree.
///
/// Key exchange prefers X25519MLKEM768, so that a recording of cross-cloud
/// traffic made today stays unreadable to a future quantum attacker; plain
/// X25519 and P-256 remain for peers without it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = aws_lc_rs::default_provider();
            p.kx_groups = vec![
                kx_group::X25519MLKEM768,
                kx_group::X25519,
                kx_group::SECP256R1,
            ];
            Arc::new(p)
        })
        .clone()
}

/// Installs [`crypto_provider`] as the process default. Call first thing in
/// `main`, before any library builds a config of its own. Calling it again is
/// harmless.
pub fn install_default_provider() {
    // An error means a provider is already installed: ours, from an earlier
    // call. A foreign one would be a build mistake that `cargo tree -i ring`
    // guards against.
    let _ = CryptoProvider::install_default((*crypto_provider()).clone());
}

/// ALPN protocol of the fedmesh tunnel.
pub const ALPN_TUNNEL: &[u8] = b"fedmesh-tunnel/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("building TLS config: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server config that presents the current SVID and requires a client SVID
/// that verifies against the current bundles and passes `authorizer`.
pub fn server_config(
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsConfigError> {
    build_server_config(svid, bundles, authorizer, alpn, true)
}

/// Like [`server_config`], but a client without a certificate may connect
/// too; one that presents a certificate is verified all the same. For
/// bootstrap endpoints such as the controller's `Certify`.
pub fn server_config_optional_client_auth(
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, TlsConfigError> {
    build_server_config(svid, bundles, authorizer, alpn, false)
}

fn build_server_config(
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[&[u8]],
    mandatory: bool,
) -> Result<ServerConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier = SpiffeVerifier::new(
        bundles,
        authorizer,
        provider.signature_verification_algorithms,
    );
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            verifier,
            mandatory,
        }))
        .with_cert_resolver(Arc::new(SvidResolver(svid)));
    // No resumption: a resumed session skips certificate verification, so a
    // peer whose bundle was withdrawn, or whose ID the authorizer no longer
    // allows, could keep reconnecting. Connections are pooled, so full
    // handshakes are rare enough to afford.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config that presents the current SVID and accepts a server only
/// if its SVID verifies against the current bundles and passes `authorizer`.
pub fn client_config(
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsConfigError> {
    build_client_config(Some(svid), bundles, authorizer, alpn)
}

/// A client config for a caller that has no SVID yet (bootstrap: the
/// controller's `Certify`). It still verifies the server like
/// [`client_config`] does.
pub fn client_config_without_svid(
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsConfigError> {
    build_client_config(None, bundles, authorizer, alpn)
}

fn build_client_config(
    svid: Option<watch::Receiver<Arc<Svid>>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier = SpiffeVerifier::new(
        bundles,
        authorizer,
        provider.signature_verification_algorithms,
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier(verifier)));
    let mut config = match svid {
        Some(svid) => builder.with_client_cert_resolver(Arc::new(SvidResolver(svid))),
        None => builder.with_no_client_auth(),
    };
    // See `server_config`: every connection verifies against current bundles.
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Presents whichever SVID the watch channel holds at handshake time.
#[derive(Debug)]
struct SvidResolver(watch::Receiver<Arc<Svid>>);

impl SvidResolver {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0.borrow().certified_key().clone()
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
