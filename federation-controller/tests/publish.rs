//! Publishing exports and liveness into a real etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedmesh_api::{
    AliveRecord, Endpoint, ExportSummary, KeySpace, LocalService, LocalServices, ServiceKey,
};
use fedmesh_controller::publish::{self, PublishStats};
use fedmesh_test_support::{Etcd, eventually};
use tokio::sync::watch;

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
    let task = tokio::spawn(publish::run_exports(
        etcd.client().await.unwrap(),
        keys.clone(),
        "aws".into(),
        rx,
        stats.clone(),
    ));

    let e = &etcd;
    let first = eventually("the first summary", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await }
    })
    .await;
    assert_eq!((first.generation, first.localities[0].healthy), (1, 2));

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

    // A removed service is deleted.
    tx.send_replace(Arc::new(LocalServices::new()));
    eventually("the export to be deleted", Duration::from_secs(10), || {
        let key = key.clone();
        async move { stored(e, &key).await.is_none().then_some(()) }
    })
    .await;
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
    let task = tokio::spawn(publish::run_exports(
        etcd.client().await.unwrap(),
        keys,
        "aws".into(),
        rx,
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

    // `seen` dates the liveness, on no lease, so it outlives `alive`.
    let seen = c.get(keys.seen("aws"), None).await.unwrap();
    let seen_kv = seen.kvs().first().expect("the seen key is written");
    assert_eq!(seen_kv.lease(), 0, "seen must outlive the lease");
    let at: fedmesh_api::SeenRecord = serde_json::from_slice(seen_kv.value()).unwrap();
    let age = time::OffsetDateTime::now_utc() - at.at;
    assert!(age < time::Duration::seconds(10), "seen is fresh: {age}");

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
    let seen = c.get(keys.seen("aws"), None).await.unwrap();
    assert_eq!(seen.kvs().len(), 1, "seen stays after alive has expired");
}
