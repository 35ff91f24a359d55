//! The global zone over mutual TLS, against someone on the path: a relay
//! between a controller and etcd that wants to rewrite `bundles/<td>`. To
//! read or change a byte it must end TLS itself, with a certificate etcd's
//! CA never signed; the controller refuses it. And a root for a peer's
//! trust domain that did not come from that peer never admits a gateway
//! it signed.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fedmesh_api::{ClusterRecord, KeySpace};
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_test_support::{Etcd, EtcdOptions, eventually};
use fedmesh_trust::pki::LocalPki;
use fedmesh_trust::verify::SpiffeVerifier;
use fedmesh_trust::{
    AllowAnyVerified, CaOptions, ClusterCa, SpiffeId, SvidPolicy, TrustDomain, Usage,
};
use fedmesh_zone::join::{EtcdAccess, JoinDir};
use fedmesh_zone::{EtcdTls, GlobalZone};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

fn record(name: &str, td: &TrustDomain, n: u8) -> ClusterRecord {
    ClusterRecord {
        name: name.into(),
        cloud: name.into(),
        region: "r1".into(),
        zones: vec!["az1".into()],
        trust_domain: td.to_string(),
        gateways: vec![format!("127.0.{n}.1:15443").parse().unwrap()],
        labels: BTreeMap::new(),
        registered_at: time::OffsetDateTime::now_utc(),
        egress: Default::default(),
    }
}

/// What the relay saw of each connection's TLS handshake.
#[derive(Default)]
struct Seen {
    refused: Vec<String>,
    completed: usize,
}

/// A TLS-terminating relay on loopback with the attacker's certificate
/// (valid for 127.0.0.1, from the attacker's own root). A handshake that
/// completed would hand it the plaintext to rewrite; none may.
async fn relay(pki: &LocalPki, seen: Arc<Mutex<Seen>>) -> SocketAddr {
    let pair = pki
        .server("relay", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(&pair.cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(&pair.key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(fedmesh_trust::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                match acceptor.accept(tcp).await {
                    Ok(_) => seen.lock().unwrap().completed += 1,
                    Err(e) => seen.lock().unwrap().refused.push(e.to_string()),
                }
            });
        }
    });
    addr
}

async fn controller(etcd: &Etcd, endpoint: String, ca: ClusterCa, td: &TrustDomain) -> Controller {
    let client = etcd.issue_client("fedmesh-cluster-aws").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, "services: []\n").unwrap();
    let join = JoinDir {
        cluster: record("aws", td, 1),
        etcd: EtcdAccess {
            endpoints: vec![endpoint],
            prefix: KeySpace::default().prefix().into(),
            user: None,
            password: None,
            tls: Some(EtcdTls {
                ca: etcd.ca_file().unwrap(),
                cert: Some(client.cert),
                key: Some(client.key),
            }),
        },
        ca,
        anchor: Some(fedmesh_test_support::anchor().public()),
    };
    let config = ControllerConfig::new(
        join,
        LocalSource::File {
            path: registry,
            poll: Duration::from_millis(50),
        },
        "127.0.1.2:0".parse().unwrap(),
    );
    let c = Controller::start(config).await.unwrap();
    // The registry file is read at start; the directory may go.
    drop(dir);
    c
}

#[tokio::test]
async fn a_relay_on_the_path_is_refused_and_a_foreign_root_admits_no_forged_gateway() {
    let etcd = Etcd::start_with(EtcdOptions {
        tls: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let now = SystemTime::now();
    let (aws, gcp) = (
        TrustDomain::new("aws.fedmesh.test").unwrap(),
        TrustDomain::new("gcp.fedmesh.test").unwrap(),
    );
    let aws_ca = ClusterCa::generate(&aws, &CaOptions::default(), now).unwrap();
    let gcp_ca = ClusterCa::generate(&gcp, &CaOptions::default(), now).unwrap();
    let mut zone = GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .with_anchor(fedmesh_test_support::anchor());
    for (name, td, ca, n) in [("aws", &aws, &aws_ca, 1), ("gcp", &gcp, &gcp_ca, 2)] {
        zone.register(&record(name, td, n), ca).await.unwrap();
    }

    // Through the relay: every handshake is refused by the controller,
    // which never learns a peer's bundle from it.
    let dir = tempfile::tempdir().unwrap();
    let attacker = LocalPki::create(&dir.path().join("attacker"), "attacker root").unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let relay = relay(&attacker, seen.clone()).await;
    let (cert, key) = (aws_ca.cert_pem(), aws_ca.key_pem());
    let copy = || ClusterCa::from_pem(&aws, cert.as_bytes(), key.as_bytes(), "ca", "key").unwrap();
    let fooled = controller(&etcd, format!("https://{relay}"), copy(), &aws).await;
    eventually(
        "the relay to see a refused handshake",
        Duration::from_secs(20),
        || async { (!seen.lock().unwrap().refused.is_empty()).then_some(()) },
    )
    .await;

    // Straight to etcd, the same controller learns gcp's genuine root.
    let direct = controller(&etcd, etcd.endpoint(), copy(), &aws).await;
    let mut bundles = direct.bundles.clone();
    eventually("gcp's bundle from etcd", Duration::from_secs(20), || {
        let found = bundles.borrow_and_update().get(&gcp).map(|_| ());
        async move { found }
    })
    .await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.completed, 0, "a handshake with the relay completed");
        let why = seen.refused.join("; ").to_lowercase();
        assert!(
            why.contains("alert") || why.contains("certificate"),
            "{why}"
        );
    }
    assert!(
        fooled.bundles.borrow().get(&gcp).is_none(),
        "a controller behind the relay holds a peer's bundle"
    );

    // A root for gcp's trust domain that gcp never published (what the
    // relay would have injected) signs a gateway SVID: the bundles the
    // controller hands its gateways refuse it, and take gcp's own.
    let forger = ClusterCa::generate(&gcp, &CaOptions::default(), now).unwrap();
    let id = SpiffeId::gateway(&gcp, "gcp").unwrap();
    let forged = forger.issue(&id, &SvidPolicy::default(), now).unwrap();
    let genuine = gcp_ca.issue(&id, &SvidPolicy::default(), now).unwrap();
    let verifier = SpiffeVerifier::new(
        direct.bundles.clone(),
        Arc::new(AllowAnyVerified),
        fedmesh_trust::crypto_provider().signature_verification_algorithms,
    );
    let at = UnixTime::now();
    let refused = verifier
        .verify(forged.leaf(), &forged.chain()[1..], at, Usage::Client)
        .unwrap_err();
    assert!(!refused.to_string().is_empty());
    assert_eq!(
        verifier
            .verify(genuine.leaf(), &genuine.chain()[1..], at, Usage::Client)
            .unwrap(),
        id
    );
}
