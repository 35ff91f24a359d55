//! Registration in the global zone, against a real etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::time::SystemTime;

use etcd_client::{Client, ConnectOptions};
use fedmesh_api::{ClusterRecord, KeySpace};
use fedmesh_test_support::{Etcd, EtcdOptions};
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, TrustDomain};
use fedmesh_zone::client::cluster_role;
use fedmesh_zone::{GlobalZone, RegisterOutcome, ZoneError};
use time::OffsetDateTime;

fn record(name: &str, td: &str) -> ClusterRecord {
    ClusterRecord {
        name: name.into(),
        cloud: "aws".into(),
        region: "us-east-1".into(),
        zones: vec!["az1".into(), "az2".into()],
        trust_domain: td.into(),
        gateways: vec!["127.0.1.1:15443".parse().unwrap()],
        labels: BTreeMap::new(),
        registered_at: OffsetDateTime::now_utc(),
        egress: Default::default(),
    }
}

fn ca(td: &str) -> ClusterCa {
    let td = TrustDomain::new(td).unwrap();
    ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap()
}

fn bundle_of(ca: &ClusterCa) -> Bundle {
    Bundle::with_roots(ca.trust_domain().clone(), [ca.cert_der().clone()])
}

/// The operator's handle: signs with the test anchor.
fn operator(client: Client, keys: KeySpace) -> GlobalZone {
    GlobalZone::new(client, keys).with_anchor(fedmesh_test_support::anchor())
}

async fn revision(c: &mut Client) -> i64 {
    c.get("/", None).await.unwrap().header().unwrap().revision()
}

#[tokio::test]
async fn register_is_one_transaction_and_idempotent() {
    let etcd = Etcd::start().await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    let mut zone = operator(raw.clone(), KeySpace::default());
    let rec = record("aws-use1", "aws-use1.fedmesh.test");
    let ca = ca("aws-use1.fedmesh.test");
    let bundle = bundle_of(&ca);

    let before = revision(&mut raw).await;
    assert_eq!(
        zone.register(&rec, &ca).await.unwrap(),
        RegisterOutcome::Created
    );
    // Both keys appeared in a single revision.
    assert_eq!(revision(&mut raw).await, before + 1);
    let stored = zone.clusters().await.unwrap();
    assert_eq!(stored, vec![rec.clone()]);
    assert_eq!(zone.bundles().await.unwrap(), vec![bundle.clone()]);

    // Again, with the same values: nothing is written.
    let mut again = rec.clone();
    again.registered_at = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let rev = revision(&mut raw).await;
    assert_eq!(
        zone.register(&again, &ca).await.unwrap(),
        RegisterOutcome::Unchanged
    );
    assert_eq!(revision(&mut raw).await, rev);

    // New gateways update the record and keep the original registration time.
    let mut moved = rec.clone();
    moved.gateways.push("127.0.1.2:15443".parse().unwrap());
    assert_eq!(
        zone.register(&moved, &ca).await.unwrap(),
        RegisterOutcome::Updated
    );
    let stored = zone.clusters().await.unwrap().remove(0);
    assert_eq!(stored.gateways.len(), 2);
    assert_eq!(stored.registered_at, rec.registered_at);
}

#[tokio::test]
async fn conflicts_are_refused_and_write_nothing() {
    let etcd = Etcd::start().await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    let mut zone = operator(raw.clone(), KeySpace::default());
    let a = record("aws-use1", "aws.fedmesh.test");
    let a_ca = ca("aws.fedmesh.test");
    zone.register(&a, &a_ca).await.unwrap();
    let rev = revision(&mut raw).await;

    // The name is taken with another trust domain.
    let err = zone
        .register(
            &record("aws-use1", "other.fedmesh.test"),
            &ca("other.fedmesh.test"),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ZoneError::NameTaken { .. }), "{err}");
    assert!(err.to_string().contains("aws.fedmesh.test"), "{err}");

    // The trust domain belongs to another cluster.
    let err = zone
        .register(
            &record("gcp-euw1", "aws.fedmesh.test"),
            &ca("aws.fedmesh.test"),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cluster \"aws-use1\""), "{err}");

    // Same name and trust domain, but another CA.
    let err = zone
        .register(&a, &ca("aws.fedmesh.test"))
        .await
        .unwrap_err();
    assert!(matches!(err, ZoneError::ForeignCa { .. }), "{err}");

    // Invalid input is refused before anything is read or written.
    let mut bad = record("AWS", "x.fedmesh.test");
    assert!(matches!(
        zone.register(&bad, &ca("x.fedmesh.test")).await,
        Err(ZoneError::Invalid(_))
    ));
    bad = record("ok", "x.fedmesh.test");
    bad.zones.clear();
    assert!(matches!(
        zone.register(&bad, &ca("x.fedmesh.test")).await,
        Err(ZoneError::Invalid(_))
    ));

    assert_eq!(revision(&mut raw).await, rev, "a refusal wrote something");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn deregister_removes_everything_of_the_cluster_and_nothing_else() {
    let etcd = Etcd::start().await.unwrap();
    let mut raw = etcd.client().await.unwrap();
    let keys = KeySpace::default();
    let mut zone = operator(raw.clone(), keys.clone());
    let a_ca = ca("a.fedmesh.test");
    zone.register(&record("a", "a.fedmesh.test"), &a_ca)
        .await
        .unwrap();
    zone.register(&record("b", "b.fedmesh.test"), &ca("b.fedmesh.test"))
        .await
        .unwrap();
    for c in ["a", "b"] {
        raw.put(keys.alive(c), "{}", None).await.unwrap();
        raw.put(keys.export(c, "shop", "cart"), "{}", None)
            .await
            .unwrap();
    }
    let removed = zone.deregister("a").await.unwrap();
    assert_eq!(removed.name, "a");
    let left: Vec<String> = raw
        .get(
            "/fedmesh/v1/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    assert_eq!(
        left,
        [
            "/fedmesh/v1/alive/b",
            "/fedmesh/v1/bundles/b.fedmesh.test",
            // A signed deletion: the only removal readers obey.
            "/fedmesh/v1/clusters/a",
            "/fedmesh/v1/clusters/b",
            "/fedmesh/v1/exports/b/shop/cart",
        ]
    );
    let names: Vec<String> = zone
        .clusters()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["b"]);
    assert!(matches!(
        zone.deregister("a").await,
        Err(ZoneError::NotRegistered(_))
    ));
    // Registered again: its record outranks the deletion.
    assert_eq!(
        zone.register(&record("a", "a.fedmesh.test"), &a_ca)
            .await
            .unwrap(),
        RegisterOutcome::Created
    );
    assert_eq!(zone.clusters().await.unwrap().len(), 2);
}

async fn login(etcd: &Etcd, user: &str, password: &str) -> Client {
    Client::connect(
        [etcd.endpoint()],
        Some(ConnectOptions::new().with_user(user, password)),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn with_auth_a_cluster_can_write_only_its_own_keys() {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let keys = KeySpace::default();
    let mut admin = operator(etcd.client().await.unwrap(), keys.clone());
    for (c, td) in [("a", "a.fedmesh.test"), ("b", "b.fedmesh.test")] {
        admin.register(&record(c, td), &ca(td)).await.unwrap();
        admin
            .ensure_cluster_access(c, td, Some(&format!("pw-{c}")))
            .await
            .unwrap();
    }
    let mut b = login(&etcd, &cluster_role("b"), "pw-b").await;

    // B writes its own keys and reads everyone's.
    b.put(keys.export("b", "shop", "cart"), "{}", None)
        .await
        .unwrap();
    b.put(keys.alive("b"), "{}", None).await.unwrap();
    let b_doc = bundle_of(&ca("b.fedmesh.test")).to_document();
    b.put(keys.bundle("b.fedmesh.test"), b_doc, None)
        .await
        .unwrap();
    assert_eq!(b.get(keys.cluster("a"), None).await.unwrap().kvs().len(), 1);

    // B may write its own record key (so that its controller can put back
    // what the anchor signed), and nothing it writes there is believed.
    b.put(keys.cluster("b"), "evil", None).await.unwrap();
    let believed = admin.believed().await.unwrap();
    assert!(believed.refused.contains_key(&keys.cluster("b")));
    assert!(!believed.clusters().unwrap().iter().any(|c| c.name == "b"));

    // B cannot overwrite A's exports, liveness, bundle or record.
    for key in [
        keys.export("a", "shop", "cart"),
        keys.alive("a"),
        keys.bundle("a.fedmesh.test"),
        keys.cluster("a"),
    ] {
        let err = b.put(key.as_str(), "evil", None).await.unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{key}: {err}"
        );
    }
    let a_bundle = admin.bundles().await.unwrap();
    assert!(
        a_bundle
            .iter()
            .any(|x| x.trust_domain().as_str() == "a.fedmesh.test")
    );

    // Re-running is idempotent (role and user already exist), and removal
    // takes the credentials away.
    admin
        .ensure_cluster_access("b", "b.fedmesh.test", Some("pw-b2"))
        .await
        .unwrap();
    let _ = login(&etcd, &cluster_role("b"), "pw-b2").await;
    admin.remove_cluster_access("b").await.unwrap();
    admin.remove_cluster_access("b").await.unwrap();
    let gone = Client::connect(
        [etcd.endpoint()],
        Some(ConnectOptions::new().with_user(cluster_role("b"), "pw-b2")),
    )
    .await;
    assert!(gone.is_err());
}
