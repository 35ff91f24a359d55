//! Publishing exports and liveness into a real etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedmesh_api::{
    AliveRecord, Endpoint, ExportSummary, KeySpace, LocalService, LocalServices, ServiceKey,
};
use fedmesh_controller::publish::{self, ManifestSigner, PublishStats};
use fedmesh_seal::{ExportManifest, ExportSet, open_by_svid, value_digest};
use fedmesh_test_support::{Etcd, eventually};
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, SpiffeId, SvidPolicy, TrustDomain};
use tokio::sync::watch;

/// aws's controller identity, and its bundle to check the manifest with.
fn signer() -> (ManifestSigner, Bundle) {
    fedmesh_trust::install_default_provider();
    let td = TrustDomain::new("aws.fedmesh.test").unwrap();
    let now = std::time::SystemTime::now();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
    let id = SpiffeId::controller(&td, "aws").unwrap();
    let svid = ca.issue(&id, &SvidPolicy::default(), now).unwrap();
    let bundle = Bundle::with_roots(td, [ca.cert_der().clone()]);
    let signer = ManifestSigner {
        svid: watch::channel(Arc::new(svid)).1,
        own_bundle: watch::channel(bundle.clone()).1,
    };
    (signer, bundle)
}

/// aws's manifest as stored, verified, and whether it vouches for the
/// exports etcd holds now.
async fn manifest(etcd: &Etcd, bundle: &Bundle) -> Option<(ExportManifest, bool)> {
    let keys = KeySpace::default();
    let mut c = etcd.client().await.unwrap();
    let seen = c.get(keys.seen("aws"), None).await.unwrap();
    let kv = seen.kvs().first()?;
    assert_eq!(kv.lease(), 0, "seen must outlive the alive lease");
    let id = SpiffeId::controller(bundle.trust_domain(), "aws").unwrap();
    let m = open_by_svid::<ExportManifest>(
        kv.value(),
        "seen/aws",
        &id,
        bundle,
        std::time::SystemTime::now(),
    )
    .unwrap()
    .value
    .unwrap();
    let exports = c
        .get(
            keys.exports_of("aws"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let mut set = ExportSet::default();
    for kv in exports.kvs() {
        let (_, ns, svc) = keys.parse_export(kv.key_str().unwrap()).unwrap();
        set.insert(format!("{ns}/{svc}"), value_digest(kv.value()));
    }
    let matches = set.mismatched(&m).is_empty() && m.count as usize == set.len();
    Some((m, matches))
}

fn services(healthy: [bool; 2], port_base: u16) -> LocalServices {
    let endpoints = healthy
        .iter()
        .enumerate()
        .map(|(i, h)| Endpoint {
            address: format!("127.0.1.{}:{}", 10 + i, port_base).parse().unwrap(),
            zone: "az1".into(),
            healthy: *h,
        })
        .collect();
    LocalServices::from([(
        ServiceKey::new("shop", "cart"),
        LocalService {
            ports: vec![8080],
            endpoints,
        },
    )])
}

async fn stored(etcd: &Etcd, key: &str) -> Option<ExportSummary> {
    let resp = etcd.client().await.unwrap().get(key, None).await.unwrap();
    resp.kvs()
        .first()
        .map(|kv| serde_json::from_slice(kv.value()).unwrap())
}

#[tokio::test]
async fn summaries_are_written_only_when_they_change() {
    let etcd = Etcd::start().await.unwrap();
    let keys = KeySpace::default();
    let key = keys.export("aws", "shop", "cart");
    let (tx, rx) = watch::channel(Arc::new(services([true, true], 8080)));
    let stats = Arc::new(PublishStats::default());
    let (signer, bundle) = signer();
    let task = tokio::spawn(publish::run_exports(
        etcd.client().await.unwrap(),
        keys.clone(),
        "aws".into(),
        rx,
        signer,
        stats.clone(),
    ));

    let e = &etcd;
    let first = eventually("the first summary", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await }
    })
    .await;
    assert_eq!((first.generation, first.localities[0].healthy), (1, 2));
    // Written with the controller's signed manifest, in one transaction.
    let (m, matches) = manifest(e, &bundle).await.unwrap();
    assert!(matches, "{m:?}");
    assert_eq!(m.changes.len(), 1);

    // The counter moves after etcd acknowledged the put: wait for it.
    let st = stats.clone();
    eventually(
        "the first write to be counted",
        Duration::from_secs(10),
        || {
            let n = st.writes.load(Ordering::Relaxed);
            async move { (n == 1).then_some(()) }
        },
    )
    .await;

    // Pod churn with the same counts per zone: nothing is written. (The
    // channel may coalesce it with the next update; `plan`'s unit test
    // covers churn on its own.)
    tx.send_replace(Arc::new(services([true, true], 9090)));
    tx.send_replace(Arc::new(services([true, false], 9090)));
    let second = eventually("the changed summary", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await.filter(|s| s.generation == 2) }
    })
    .await;
    assert_eq!(second.localities[0].healthy, 1);
    let st = stats.clone();
    eventually(
        "the second write to be counted",
        Duration::from_secs(10),
        || {
            let n = st.writes.load(Ordering::Relaxed);
            async move { (n >= 2).then_some(n) }
        },
    )
    .await;
    assert_eq!(
        stats.writes.load(Ordering::Relaxed),
        2,
        "churn caused a write"
    );

    let (m, matches) = manifest(e, &bundle).await.unwrap();
    assert!(
        matches && m.prev > 0,
        "each manifest follows the last: {m:?}"
    );

    // A removed service is deleted, and the manifest withdraws it.
    tx.send_replace(Arc::new(LocalServices::new()));
    eventually("the export to be deleted", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await.is_none().then_some(()) }
    })
    .await;
    let (m, matches) = manifest(e, &bundle).await.unwrap();
    assert!(matches && m.count == 0, "{m:?}");
    assert_eq!(m.changes.get("shop/cart"), Some(&None));
    task.abort();
}

#[tokio::test]
async fn a_restarted_publisher_continues_generations_without_rewriting() {
    let etcd = Etcd::start().await.unwrap();
    let keys = KeySpace::default();
    let key = keys.export("aws", "shop", "cart");
    let mut c = etcd.client().await.unwrap();
    let old = serde_json::json!({
        "ports": [8080],
        "localities": [{"zone": "az1", "healthy": 2, "total": 2, "weight": 2}],
        "generation": 41
    });
    c.put(key.as_str(), old.to_string(), None).await.unwrap();
    let rev = c.get(key.as_str(), None).await.unwrap().kvs()[0].mod_revision();

    let (tx, rx) = watch::channel(Arc::new(services([true, true], 8080)));
    let stats = Arc::new(PublishStats::default());
    let (signer, bundle) = signer();
    let task = tokio::spawn(publish::run_exports(
        etcd.client().await.unwrap(),
        keys,
        "aws".into(),
        rx,
        signer,
        stats.clone(),
    ));
    tx.send_replace(Arc::new(services([true, false], 8080)));
    let e = &etcd;
    let s = eventually("generation 42", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await.filter(|s| s.generation == 42) }
    })
    .await;
    assert_eq!(s.localities[0].healthy, 1);
    // Exactly one write: the unchanged start state was not rewritten.
    let st = stats.clone();
    eventually("the write to be counted", Duration::from_secs(10), || {
        let n = st.writes.load(Ordering::Relaxed);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    assert_eq!(stats.writes.load(Ordering::Relaxed), 1);
    assert!(c.get(key.as_str(), None).await.unwrap().kvs()[0].mod_revision() > rev);
    assert!(manifest(e, &bundle).await.unwrap().1);
    task.abort();
}

/// Someone else (another cluster's credentials through a nested
/// transaction, say) rewrites and deletes aws's keys: aws's publisher puts
/// them back at its next heartbeat, re-signed.
#[tokio::test]
async fn a_publisher_heals_what_someone_else_changed() {
    let etcd = Etcd::start().await.unwrap();
    let keys = KeySpace::default();
    let key = keys.export("aws", "shop", "cart");
    let (_tx, rx) = watch::channel(Arc::new(services([true, true], 8080)));
    let (signer, bundle) = signer();
    let task = tokio::spawn(publish::run_exports(
        etcd.client().await.unwrap(),
        keys.clone(),
        "aws".into(),
        rx,
        signer,
        Arc::new(PublishStats::default()),
    ));
    let e = &etcd;
    let genuine = eventually("the first summary", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await }
    })
    .await;
    let mut c = etcd.client().await.unwrap();
    let forged = serde_json::json!({
        "ports": [8080],
        "localities": [{"zone": "az1", "healthy": 0, "total": 2, "weight": 0}],
        "generation": 99
    });
    c.put(key.as_str(), forged.to_string(), None).await.unwrap();
    c.delete(keys.seen("aws"), None).await.unwrap();
    let want = genuine.localities[0].healthy;
    let healed = eventually("the export healed", Duration::from_secs(45), || {
        let key = key.clone();
        async move {
            stored(e, &key)
                .await
                .filter(|s| s.localities[0].healthy == want)
        }
    })
    .await;
    assert!(healed.generation > 99, "{healed:?}");
    let (_, matches) = eventually("a manifest again", Duration::from_secs(10), || async {
        manifest(e, &bundle).await
    })
    .await;
    assert!(matches);
    task.abort();
}

#[tokio::test]
async fn alive_is_kept_on_a_lease_and_expires_when_the_controller_stops() {
    let etcd = Etcd::start().await.unwrap();
    let keys = KeySpace::default();
    let key = keys.alive("aws");
    let record = AliveRecord {
        controller: "fedmesh-controller".into(),
        started_at: time::OffsetDateTime::now_utc(),
        version: "test".into(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(publish::run_alive(
        etcd.client().await.unwrap(),
        keys.clone(),
        "aws".into(),
        record,
        Duration::from_secs(2),
        stop_rx,
    ));
    let e = &etcd;
    let lease = eventually("the alive key", Duration::from_secs(10), || {
        let key = key.clone();
        async move {
            let resp = e.client().await.unwrap().get(key, None).await.unwrap();
            resp.kvs().first().map(|kv| kv.lease())
        }
    })
    .await;
    assert_ne!(lease, 0, "alive must be bound to a lease");

    // Kept alive past twice its 2 s TTL while the controller runs: observe
    // the key continuously for 4.5 s.
    let mut c = etcd.client().await.unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(4500) {
        let resp = c.get(key.as_str(), None).await.unwrap();
        assert_eq!(
            resp.kvs().first().map(|kv| kv.lease()),
            Some(lease),
            "alive lapsed at {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop_tx.send(true).unwrap();
    task.await.unwrap();
    eventually("the alive key to expire", Duration::from_secs(10), || {
        let key = key.clone();
        async move {
            let resp = e.client().await.unwrap().get(key, None).await.unwrap();
            resp.kvs().is_empty().then_some(())
        }
    })
    .await;
}
