//! Peer verification over real rustls handshakes on loopback.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use fedmesh_trust::{AllowAnyVerified, AllowIds, AllowTrustDomains, AuthorizeFn, SpiffeId};
use rustls::CertificateError;

fn is_cert_error(e: &rustls::Error, pred: impl Fn(&CertificateError) -> bool) -> bool {
    matches!(e, rustls::Error::InvalidCertificate(c) if pred(c))
}

struct Fixture {
    aws: Cluster,
    gcp: Cluster,
    bundles: tokio::sync::watch::Receiver<Arc<fedmesh_trust::BundleSet>>,
    _bundles_tx: tokio::sync::watch::Sender<Arc<fedmesh_trust::BundleSet>>,
}

impl Fixture {
    fn new() -> Self {
        let aws = Cluster::new("aws.fedmesh.test");
        let gcp = Cluster::new("gcp.fedmesh.test");
        let (tx, rx) = watch_of(bundles(&[&aws, &gcp]));
        Self {
            aws,
            gcp,
            bundles: rx,
            _bundles_tx: tx,
        }
    }

    /// A gateway of gcp that accepts any verified client.
    fn gcp_gateway(&self) -> Arc<rustls::ServerConfig> {
        let id = SpiffeId::gateway(&self.gcp.td, "gcp-1").unwrap();
        let (tx, rx) = watch_of(self.gcp.svid(&id));
        std::mem::forget(tx);
        server(&rx, &self.bundles, Arc::new(AllowAnyVerified))
    }

    fn aws_client(&self) -> Arc<rustls::ClientConfig> {
        let (tx, rx) = watch_of(self.aws.svid(&self.aws.id("shop", "web")));
        std::mem::forget(tx);
        client(&rx, &self.bundles, Arc::new(AllowAnyVerified))
    }
}

#[tokio::test]
async fn legitimate_cross_domain_peers_are_accepted_with_post_quantum_key_exchange() {
    let f = Fixture::new();
    let out = connect(f.gcp_gateway(), f.aws_client()).await;
    assert!(out.ok(), "{out:?}");
    assert_eq!(
        out.server.unwrap().unwrap().as_str(),
        "spiffe://aws.fedmesh.test/ns/shop/sa/web"
    );
    assert_eq!(
        out.client.unwrap().unwrap().as_str(),
        "spiffe://gcp.fedmesh.test/fedmesh/gateway/gcp-1"
    );
    assert_eq!(out.kx_group, Some(rustls::NamedGroup::X25519MLKEM768));
}

#[tokio::test]
async fn forged_self_signed_certificate_with_a_victims_id_is_rejected() {
    let f = Fixture::new();
    let victim = "spiffe://aws.fedmesh.test/ns/shop/sa/web";
    let forged = forge_self_signed(victim);

    // As a client, against a real server.
    let out = connect(f.gcp_gateway(), forged_client(&forged, &f.bundles)).await;
    let err = out.server.unwrap_err();
    assert!(
        is_cert_error(&err, |c| *c == CertificateError::UnknownIssuer),
        "{err:?}"
    );
    assert!(out.client.is_err());

    // As a server, against a real client.
    let out = connect(forged_server(&forged), f.aws_client()).await;
    let err = out.client.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("unknown"),
        "{err}"
    );
}

#[tokio::test]
async fn another_clusters_ca_cannot_mint_this_trust_domains_identities() {
    let f = Fixture::new();
    // gcp's real CA key signs a leaf claiming an aws identity. gcp's bundle
    // is trusted, but only for gcp's own trust domain.
    let forged = forge_valid_now(&f.gcp.ca, &["spiffe://aws.fedmesh.test/ns/shop/sa/web"]);
    let out = connect(f.gcp_gateway(), forged_client(&forged, &f.bundles)).await;
    let err = out.server.unwrap_err();
    assert!(
        is_cert_error(&err, |c| *c == CertificateError::UnknownIssuer),
        "{err:?}"
    );

    let out = connect(forged_server(&forged), f.aws_client()).await;
    assert!(out.client.is_err(), "{out:?}");
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_rejected() {
    let f = Fixture::new();
    let id = "spiffe://aws.fedmesh.test/ns/shop/sa/web";
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    let expired = forge_signed_by(&f.aws.ca, &[id], now - 3 * hour, now - hour);
    let out = connect(f.gcp_gateway(), forged_client(&expired, &f.bundles)).await;
    let err = out.server.unwrap_err();
    assert!(
        is_cert_error(&err, |c| matches!(
            c,
            CertificateError::ExpiredContext { .. }
        )),
        "{err:?}"
    );

    let future = forge_signed_by(&f.aws.ca, &[id], now + hour, now + 3 * hour);
    let out = connect(f.gcp_gateway(), forged_client(&future, &f.bundles)).await;
    let err = out.server.unwrap_err();
    assert!(
        is_cert_error(&err, |c| matches!(
            c,
            CertificateError::NotValidYetContext { .. }
        )),
        "{err:?}"
    );

    // The same checks hold when the server presents them.
    let out = connect(forged_server(&expired), f.aws_client()).await;
    assert!(out.client.unwrap_err().contains("expired"));
}

#[tokio::test]
async fn certificates_with_two_uri_sans_or_none_are_rejected() {
    let f = Fixture::new();
    let two = forge_valid_now(
        &f.aws.ca,
        &[
            "spiffe://aws.fedmesh.test/ns/shop/sa/web",
            "spiffe://aws.fedmesh.test/ns/shop/sa/admin",
        ],
    );
    let none = forge_valid_now(&f.aws.ca, &[]);
    let not_spiffe = forge_valid_now(&f.aws.ca, &["https://aws.fedmesh.test/web"]);
    for (what, forged) in [
        ("two URI SANs", two),
        ("no URI SAN", none),
        ("non-SPIFFE URI", not_spiffe),
    ] {
        let out = connect(f.gcp_gateway(), forged_client(&forged, &f.bundles)).await;
        let err = out.server.unwrap_err();
        assert!(
            is_cert_error(&err, |c| *c
                == CertificateError::ApplicationVerificationFailure),
            "{what}: {err:?}"
        );
        let out = connect(forged_server(&forged), f.aws_client()).await;
        assert!(out.client.is_err(), "{what}: {out:?}");
    }
}

#[tokio::test]
async fn unfederated_trust_domains_are_rejected() {
    let f = Fixture::new();
    let azure = Cluster::new("azure.fedmesh.test");
    let forged = {
        let svid = azure.svid(&azure.id("shop", "web"));
        Forged {
            chain: svid.chain().to_vec(),
            key: svid.private_key().clone_key(),
        }
    };
    let out = connect(f.gcp_gateway(), forged_client(&forged, &f.bundles)).await;
    let err = out.server.unwrap_err();
    assert!(
        is_cert_error(&err, |c| *c == CertificateError::UnknownIssuer),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_authorizer_decides_which_verified_ids_may_connect() {
    let f = Fixture::new();
    let gw_id = SpiffeId::gateway(&f.gcp.td, "gcp-1").unwrap();
    let (_gw_tx, gw_svid) = watch_of(f.gcp.svid(&gw_id));
    let web = f.aws.id("shop", "web");
    let (_c_tx, c_svid) = watch_of(f.aws.svid(&web));

    // Server allows only aws's trust domain: accepted.
    let only_aws = AllowTrustDomains([f.aws.td.clone()].into());
    let out = connect(
        server(&gw_svid, &f.bundles, Arc::new(only_aws)),
        client(&c_svid, &f.bundles, Arc::new(AllowAnyVerified)),
    )
    .await;
    assert!(out.ok(), "{out:?}");

    // Server allows only another ID: refused, though the chain is fine.
    let only_admin = AllowIds::one(f.aws.id("shop", "admin"));
    let out = connect(
        server(&gw_svid, &f.bundles, Arc::new(only_admin)),
        client(&c_svid, &f.bundles, Arc::new(AllowAnyVerified)),
    )
    .await;
    let err = out.server.unwrap_err();
    assert!(
        is_cert_error(&err, |c| *c
            == CertificateError::ApplicationVerificationFailure),
        "{err:?}"
    );

    // Client pins the gateway it meant to reach: a different gcp identity is refused.
    let pinned = AllowIds::one(SpiffeId::gateway(&f.gcp.td, "gcp-2").unwrap());
    let out = connect(
        server(&gw_svid, &f.bundles, Arc::new(AllowAnyVerified)),
        client(&c_svid, &f.bundles, Arc::new(pinned)),
    )
    .await;
    assert!(out.client.is_err(), "{out:?}");

    // A closure works as a hook.
    let by_path = AuthorizeFn(|id: &SpiffeId| {
        if id.path().starts_with("/ns/shop/") {
            Ok(())
        } else {
            Err("namespace not allowed".into())
        }
    });
    let out = connect(
        server(&gw_svid, &f.bundles, Arc::new(by_path)),
        client(&c_svid, &f.bundles, Arc::new(AllowAnyVerified)),
    )
    .await;
    assert!(out.ok(), "{out:?}");
}

#[tokio::test]
async fn a_running_server_picks_up_new_bundles_and_svids_without_restart() {
    let aws = Cluster::new("aws.fedmesh.test");
    let gcp = Cluster::new("gcp.fedmesh.test");
    // gcp's server starts knowing only its own bundle.
    let (bundles_tx, bundles_rx) = watch_of(bundles(&[&gcp]));
    let gw_id = SpiffeId::gateway(&gcp.td, "gcp-1").unwrap();
    let first = gcp.svid(&gw_id);
    let first_leaf = first.leaf().clone();
    let (svid_tx, svid_rx) = watch_of(first);
    let server_cfg = server(&svid_rx, &bundles_rx, Arc::new(AllowAnyVerified));

    // The aws client trusts both.
    let (_t, client_bundles) = watch_of(bundles(&[&aws, &gcp]));
    let (_c, c_svid) = watch_of(aws.svid(&aws.id("shop", "web")));
    let client_cfg = client(&c_svid, &client_bundles, Arc::new(AllowAnyVerified));

    let out = connect(server_cfg.clone(), client_cfg.clone()).await;
    assert!(out.server.is_err(), "aws is not federated yet: {out:?}");

    // Federate aws: the same server config now accepts it.
    bundles_tx.send_replace(Arc::new(bundles(&[&aws, &gcp])));
    let out = connect(server_cfg.clone(), client_cfg.clone()).await;
    assert!(out.ok(), "{out:?}");

    // Renew the server's SVID: the next handshake presents the new leaf.
    let renewed = gcp.svid(&gw_id);
    let renewed_leaf = renewed.leaf().clone();
    assert_ne!(renewed_leaf, first_leaf);
    svid_tx.send_replace(Arc::new(renewed));
    let out = connect(server_cfg.clone(), client_cfg.clone()).await;
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.server_leaf, Some(renewed_leaf));

    // Withdraw aws's bundle: the next connection is refused. No resumed
    // session lets the client skip verification.
    bundles_tx.send_replace(Arc::new(bundles(&[&gcp])));
    let out = connect(server_cfg, client_cfg).await;
    assert!(out.server.is_err(), "{out:?}");
}
