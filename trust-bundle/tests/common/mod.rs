//! Shared fixtures: clusters with their own CA, forged certificates, and a
//! real rustls handshake over loopback.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fedmesh_trust::{
    Authorizer, BundleSet, CaOptions, ClusterCa, SpiffeId, Svid, SvidPolicy, TrustDomain,
};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Cluster {
    pub td: TrustDomain,
    pub ca: ClusterCa,
}

impl Cluster {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
        Self { td, ca }
    }

    pub fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(&self.td, ns, sa).unwrap()
    }

    pub fn svid(&self, id: &SpiffeId) -> Svid {
        self.ca
            .issue(id, &SvidPolicy::default(), SystemTime::now())
            .unwrap()
    }

    pub fn bundle(&self) -> fedmesh_trust::Bundle {
        fedmesh_trust::Bundle::with_roots(self.td.clone(), [self.ca.cert_der().clone()])
    }
}

pub fn bundles(clusters: &[&Cluster]) -> BundleSet {
    let mut set = BundleSet::new();
    for c in clusters {
        set.insert(c.bundle());
    }
    set
}

/// A certificate and key made outside any `ClusterCa` rules.
pub struct Forged {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub fn leaf_params(
    uris: &[&str],
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    p
}

fn day() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// A leaf for `uris`, signed with `ca`'s real key: what a compromised or
/// misbehaving CA could mint, bypassing `ClusterCa`'s own checks.
pub fn forge_signed_by(
    ca: &ClusterCa,
    uris: &[&str],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Forged {
    let ca_key = KeyPair::from_pem(&ca.key_pem()).unwrap();
    let issuer = Issuer::from_ca_cert_der(ca.cert_der(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(uris, not_before, not_after)
        .signed_by(&key, &issuer)
        .unwrap();
    Forged {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

pub fn forge_valid_now(ca: &ClusterCa, uris: &[&str]) -> Forged {
    let now = SystemTime::now();
    forge_signed_by(ca, uris, now - Duration::from_secs(60), now + day())
}

/// A self-signed leaf carrying `uri`: an attacker with no CA at all.
pub fn forge_self_signed(uri: &str) -> Forged {
    let now = SystemTime::now();
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(&[uri], now - Duration::from_secs(60), now + day())
        .self_signed(&key)
        .unwrap();
    Forged {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

pub fn watch_of<T>(v: T) -> (watch::Sender<Arc<T>>, watch::Receiver<Arc<T>>) {
    watch::channel(Arc::new(v))
}

pub fn server(
    svid: &watch::Receiver<Arc<Svid>>,
    bundles: &watch::Receiver<Arc<BundleSet>>,
    authz: Arc<dyn Authorizer>,
) -> Arc<ServerConfig> {
    Arc::new(
        fedmesh_trust::server_config(
            svid.clone(),
            bundles.clone(),
            authz,
            &[fedmesh_trust::tls::ALPN_TUNNEL],
        )
        .unwrap(),
    )
}

pub fn client(
    svid: &watch::Receiver<Arc<Svid>>,
    bundles: &watch::Receiver<Arc<BundleSet>>,
    authz: Arc<dyn Authorizer>,
) -> Arc<ClientConfig> {
    Arc::new(
        fedmesh_trust::client_config(
            svid.clone(),
            bundles.clone(),
            authz,
            &[fedmesh_trust::tls::ALPN_TUNNEL],
        )
        .unwrap(),
    )
}

/// A server presenting `forged`, requiring no client certificate.
pub fn forged_server(forged: &Forged) -> Arc<ServerConfig> {
    let cfg = ServerConfig::builder_with_provider(fedmesh_trust::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(forged.chain.clone(), forged.key.clone_key())
        .unwrap();
    Arc::new(cfg)
}

/// A client presenting `forged`, and trusting any server.
pub fn forged_client(
    forged: &Forged,
    bundles: &watch::Receiver<Arc<BundleSet>>,
) -> Arc<ClientConfig> {
    let verifier =
        fedmesh_trust::verify::SpiffeServerVerifier(fedmesh_trust::verify::SpiffeVerifier::new(
            bundles.clone(),
            Arc::new(fedmesh_trust::AllowAnyVerified),
            fedmesh_trust::crypto_provider().signature_verification_algorithms,
        ));
    let cfg = ClientConfig::builder_with_provider(fedmesh_trust::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(forged.chain.clone(), forged.key.clone_key())
        .unwrap();
    Arc::new(cfg)
}

/// What each side saw of one connection attempt.
#[derive(Debug)]
pub struct Outcome {
    /// The server's view: the client's verified ID, or why it refused.
    pub server: Result<Option<SpiffeId>, rustls::Error>,
    /// The client's view: the server's verified ID once a round trip
    /// completed, or why it failed.
    pub client: Result<Option<SpiffeId>, String>,
    pub kx_group: Option<rustls::NamedGroup>,
    /// The leaf the server presented, as the client received it.
    pub server_leaf: Option<CertificateDer<'static>>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.server.is_ok() && self.client.is_ok()
    }
}

/// One TLS connection over real loopback sockets: handshake, then a
/// ping/pong so that TLS 1.3's late client-certificate failures surface.
pub async fn connect(server_cfg: Arc<ServerConfig>, client_cfg: Arc<ClientConfig>) -> Outcome {
    connect_at("127.0.2.1:0".parse().unwrap(), server_cfg, client_cfg).await
}

pub async fn connect_at(
    bind: SocketAddr,
    server_cfg: Arc<ServerConfig>,
    client_cfg: Arc<ClientConfig>,
) -> Outcome {
    let listener = TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = match acceptor.accept(tcp).await {
            Ok(t) => t,
            Err(e) => return Err(rustls_error(e)),
        };
        let mut buf = [0u8; 4];
        if let Err(e) = tls.read_exact(&mut buf).await {
            return Err(rustls_error(e));
        }
        let _ = tls.write_all(b"pong").await;
        let _ = tls.shutdown().await;
        Ok(fedmesh_trust::peer_spiffe_id(
            tls.get_ref().1.peer_certificates(),
        ))
    });
    let connector = tokio_rustls::TlsConnector::from(client_cfg);
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("fedmesh.invalid").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let conn = tls.get_ref().1;
        let group = conn.negotiated_key_exchange_group().map(|g| g.name());
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((
            fedmesh_trust::peer_spiffe_id(tls.get_ref().1.peer_certificates()),
            group,
            leaf,
        ))
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .map(|r| r.unwrap())
        .unwrap_or_else(|_| Err(rustls::Error::General("server timed out".into())));
    let (client, kx_group, server_leaf) = match client {
        Ok((id, g, leaf)) => (Ok(id), g, leaf),
        Err(e) => (Err(e), None, None),
    };
    Outcome {
        server,
        client,
        kx_group,
        server_leaf,
    }
}

fn rustls_error(e: std::io::Error) -> rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| rustls::Error::General(e.to_string()))
}
