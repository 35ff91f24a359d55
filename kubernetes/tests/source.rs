//! The Kubernetes source against the fake API server (test-support's
//! `FakeKube`, a fake: there is no real API server on these machines) over
//! real HTTP: exports, zones turning not-ready, withdrawal, conditions, and
//! the watch surviving what API servers do (410 Gone, bookmarks, dropped
//! connections, a restart).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedmesh_api::{LocalServices, ServiceKey};
use fedmesh_kube::{Conflicts, KubeSource};
use fedmesh_test_support::kube_objects::{condition, export, service, slice};
use fedmesh_test_support::{FakeKube, eventually};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);

fn client(fake: &FakeKube) -> kube::Client {
    kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap()
}

/// `(address, zone, healthy)` of a service's endpoints, if exported.
fn endpoints(s: &LocalServices, ns: &str, name: &str) -> Option<Vec<(String, String, bool)>> {
    let svc = s.get(&ServiceKey::new(ns, name))?;
    Some(
        svc.endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.zone.clone(), e.healthy))
            .collect(),
    )
}

async fn until<T>(
    rx: &watch::Receiver<Arc<LocalServices>>,
    what: &str,
    f: impl Fn(&LocalServices) -> Option<T>,
) -> T {
    eventually(what, WAIT, || {
        let s = rx.borrow().clone();
        let r = f(&s);
        async move { r }
    })
    .await
}

fn checkout_cluster(fake: &FakeKube) {
    fake.put(&service("shop", "checkout", 80));
    fake.put(&slice(
        "shop",
        "checkout-a",
        "checkout",
        8080,
        &[("10.1.0.1", "az1", true), ("10.1.0.2", "az2", true)],
    ));
    // Not exported: never leaves the cluster.
    fake.put(&service("shop", "internal", 80));
}

#[tokio::test]
async fn a_service_export_exports_its_service_and_follows_its_endpoints() {
    let fake = FakeKube::start("127.0.1.50", Duration::from_millis(200))
        .await
        .unwrap();
    checkout_cluster(&fake);
    let (_conflicts_tx, conflicts) = watch::channel(Arc::new(Conflicts::new()));
    let source = KubeSource::start(client(&fake), conflicts, Default::default()).await;
    let rx = source.services();
    assert!(
        rx.borrow().is_empty(),
        "nothing is exported without a ServiceExport"
    );

    fake.put(&export("shop", "checkout"));
    let eps = until(&rx, "checkout exported", |s| {
        endpoints(s, "shop", "checkout")
    })
    .await;
    assert_eq!(
        eps,
        [
            ("10.1.0.1:8080".into(), "az1".into(), true),
            ("10.1.0.2:8080".into(), "az2".into(), true)
        ]
    );
    assert_eq!(
        rx.borrow()[&ServiceKey::new("shop", "checkout")].ports,
        [80]
    );
    assert_eq!(rx.borrow().len(), 1, "internal is not exported");
    let valid = eventually("the Valid condition", WAIT, || async {
        condition(&fake, "shop", "checkout", "Valid")
    })
    .await;
    assert_eq!((valid.0.as_str(), valid.1.as_str()), ("True", "Exported"));

    // az2's pod turns not-ready: its endpoint stays, unhealthy.
    fake.put(&slice(
        "shop",
        "checkout-a",
        "checkout",
        8080,
        &[("10.1.0.1", "az1", true), ("10.1.0.2", "az2", false)],
    ));
    until(&rx, "az2 not ready", |s| {
        let eps = endpoints(s, "shop", "checkout")?;
        (!eps[1].2).then_some(())
    })
    .await;

    // A ServiceExport with no Service says so.
    fake.put(&export("shop", "ghost"));
    let ghost = eventually("ghost's Valid condition", WAIT, || async {
        condition(&fake, "shop", "ghost", "Valid")
    })
    .await;
    assert_eq!(
        (ghost.0.as_str(), ghost.1.as_str()),
        ("False", "ServiceNotFound")
    );
    assert!(!rx.borrow().contains_key(&ServiceKey::new("shop", "ghost")));

    // Deleting the ServiceExport withdraws the service.
    assert!(fake.delete("serviceexports", "shop", "checkout"));
    until(&rx, "checkout withdrawn", |s| {
        (!s.contains_key(&ServiceKey::new("shop", "checkout"))).then_some(())
    })
    .await;
    assert!(source.stats.status_errors.load(Ordering::Relaxed) == 0);
}

#[tokio::test]
async fn a_conflict_sets_the_condition_and_clears_when_it_goes() {
    let fake = FakeKube::start("127.0.1.51", Duration::from_millis(200))
        .await
        .unwrap();
    checkout_cluster(&fake);
    fake.put(&export("shop", "checkout"));
    let (conflicts_tx, conflicts) = watch::channel(Arc::new(Conflicts::new()));
    let _source = KubeSource::start(client(&fake), conflicts, Default::default()).await;
    let c = eventually("Conflict=False", WAIT, || async {
        condition(&fake, "shop", "checkout", "Conflict").filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(c.1, "NoConflict");

    conflicts_tx.send_replace(Arc::new(BTreeMap::from([(
        ServiceKey::new("shop", "checkout"),
        vec!["gcp-usc1".to_string()],
    )])));
    let c = eventually("Conflict=True", WAIT, || async {
        condition(&fake, "shop", "checkout", "Conflict").filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(c.1, "PortConflict");
    assert!(c.2.contains("gcp-usc1") && c.2.contains("[80]"), "{}", c.2);

    conflicts_tx.send_replace(Arc::new(Conflicts::new()));
    eventually("Conflict=False again", WAIT, || async {
        condition(&fake, "shop", "checkout", "Conflict").filter(|c| c.0 == "False")
    })
    .await;
}

#[tokio::test]
async fn watches_survive_gone_bookmarks_dropped_connections_and_a_restart() {
    let mut fake = FakeKube::start("127.0.1.52", Duration::from_millis(100))
        .await
        .unwrap();
    checkout_cluster(&fake);
    fake.put(&export("shop", "checkout"));
    let (_conflicts_tx, conflicts) = watch::channel(Arc::new(Conflicts::new()));
    let source = KubeSource::start(client(&fake), conflicts, Default::default()).await;
    let rx = source.services();
    until(&rx, "checkout exported", |s| {
        endpoints(s, "shop", "checkout")
    })
    .await;
    eventually("bookmarks sent", WAIT, || async {
        (fake.stats().bookmarks.load(Ordering::Relaxed) > 3).then_some(())
    })
    .await;

    // 410: the history is gone and every watch is cut; while nobody
    // watches, a pod goes and one comes. The relist must see both.
    fake.compact();
    fake.drop_connections();
    fake.put(&slice(
        "shop",
        "checkout-a",
        "checkout",
        8080,
        &[("10.1.0.1", "az1", true), ("10.1.0.3", "az3", true)],
    ));
    let eps = until(&rx, "the relist's endpoints", |s| {
        let eps = endpoints(s, "shop", "checkout")?;
        eps.iter().any(|e| e.0 == "10.1.0.3:8080").then_some(eps)
    })
    .await;
    assert_eq!(
        eps.len(),
        2,
        "10.1.0.2 is gone, and nothing repeats: {eps:?}"
    );
    eventually("a 410 answered", WAIT, || async {
        (fake.stats().gone.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;

    // Every kind has listed again (3 first listings, 3 after the 410).
    eventually("all three kinds relisted", WAIT, || async {
        (source.stats.listings.load(Ordering::Relaxed) >= 6).then_some(())
    })
    .await;

    // A dropped connection without compaction: resumed, not relisted.
    let lists = fake.stats().lists.load(Ordering::Relaxed);
    fake.drop_connections();
    fake.put(&service("shop", "cart", 8080));
    fake.put(&export("shop", "cart"));
    until(&rx, "cart exported after a drop", |s| {
        endpoints(s, "shop", "cart")
    })
    .await;
    assert_eq!(
        fake.stats().lists.load(Ordering::Relaxed),
        lists,
        "a resumable watch resumes from its resourceVersion, without a list"
    );

    // A restart, with a change made while the server is down.
    let errors = source.stats.watch_errors.load(Ordering::Relaxed);
    fake.stop().await;
    fake.delete("serviceexports", "shop", "cart");
    eventually("the source to notice the server is down", WAIT, || async {
        (source.stats.watch_errors.load(Ordering::Relaxed) > errors).then_some(())
    })
    .await;
    fake.resume().await.unwrap();
    until(&rx, "cart withdrawn after the restart", |s| {
        (!s.contains_key(&ServiceKey::new("shop", "cart"))).then_some(())
    })
    .await;
    assert!(
        rx.borrow()
            .contains_key(&ServiceKey::new("shop", "checkout"))
    );
}
