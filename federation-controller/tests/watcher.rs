//! The global-zone watcher against a real etcd: list, watch, resume,
//! compaction, and outages.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use fedmesh_api::KeySpace;
use fedmesh_controller::view::GlobalView;
use fedmesh_controller::watcher::{self, WatchStats, WatcherConfig};
use fedmesh_test_support::{Etcd, TcpRelay, eventually};
use fedmesh_zone::gate::{Gate, GateConfig};
use tokio::sync::watch;

fn summary(generation: u64) -> String {
    serde_json::json!({
        "ports": [8080],
        "localities": [{"zone": "az1", "healthy": 2, "total": 3, "weight": 2}],
        "generation": generation,
    })
    .to_string()
}

struct Running {
    rx: watch::Receiver<Arc<GlobalView>>,
    stats: Arc<WatchStats>,
    _task: tokio::task::JoinHandle<()>,
}

async fn start_watcher(endpoint: String) -> Running {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_keep_alive(Duration::from_millis(500), Duration::from_millis(500));
    let client = Client::connect([endpoint], Some(opts)).await.unwrap();
    let keys = KeySpace::default();
    let (tx, rx) = watch::channel(Arc::new(GlobalView::new(keys.clone())));
    let stats = Arc::new(WatchStats::default());
    let config = WatcherConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        ..Default::default()
    };
    // These tests are about listing and watching: they write the plain
    // values of a federation from before signing, which the gate believes
    // only in that upgrade mode (tests/controller.rs and fedmesh-zone's
    // gate tests cover the signed zone).
    let gate = Gate::new(
        keys.clone(),
        GateConfig {
            anchors: vec![],
            trust_unsigned: true,
            budget: Default::default(),
        },
    );
    let task = tokio::spawn(watcher::run(
        client,
        GlobalView::new(keys),
        gate,
        tx,
        config,
        stats.clone(),
    ));
    Running {
        rx,
        stats,
        _task: task,
    }
}

/// A minimal cluster record, so that the cluster's exports are listed.
async fn record(c: &mut Client, cluster: &str) {
    let rec = serde_json::json!({
        "name": cluster, "cloud": "aws", "region": "r1", "zones": ["az1"],
        "trustDomain": format!("{cluster}.fedmesh.test"),
        "gateways": [{"address": "127.0.1.1", "port": 15443}],
        "registeredAt": "2026-11-24T00:00:00Z"
    });
    c.put(KeySpace::default().cluster(cluster), rec.to_string(), None)
        .await
        .unwrap();
}

/// Waits until the view holds `want` as the generation of `cluster`'s
/// shop/cart export (`None`: no such export).
async fn until_generation(
    what: &str,
    rx: &watch::Receiver<Arc<GlobalView>>,
    cluster: &str,
    want: Option<u64>,
) {
    eventually(what, Duration::from_secs(20), || {
        let g = generation(&rx.borrow(), cluster);
        async move { (g == want).then_some(()) }
    })
    .await;
}

/// A real etcd with clusters a, b, gone and new registered, and a's
/// shop/cart export at generation 1.
async fn seeded() -> (Etcd, Client) {
    let etcd = Etcd::start().await.unwrap();
    let mut c = etcd.client().await.unwrap();
    for cluster in ["a", "b", "gone", "new"] {
        record(&mut c, cluster).await;
    }
    c.put(
        KeySpace::default().export("a", "shop", "cart"),
        summary(1),
        None,
    )
    .await
    .unwrap();
    (etcd, c)
}

fn generation(view: &GlobalView, cluster: &str) -> Option<u64> {
    view.export(cluster, "shop", "cart").map(|s| s.generation)
}

#[tokio::test]
async fn lists_then_follows_changes() {
    let (etcd, mut c) = seeded().await;
    let keys = KeySpace::default();

    let w = start_watcher(etcd.endpoint()).await;
    let rx = w.rx.clone();
    until_generation("the listed export", &rx, "a", Some(1)).await;

    c.put(keys.export("a", "shop", "cart"), summary(2), None)
        .await
        .unwrap();
    c.put(keys.export("b", "shop", "cart"), summary(1), None)
        .await
        .unwrap();
    c.delete(keys.export("a", "shop", "cart"), None)
        .await
        .unwrap();
    eventually("the watched changes", Duration::from_secs(10), || {
        let v = rx.borrow().clone();
        async move { (generation(&v, "a").is_none() && generation(&v, "b") == Some(1)).then_some(()) }
    })
    .await;
    assert_eq!(w.stats.lists.load(Ordering::Relaxed), 1);
    assert_eq!(w.stats.compaction_relists.load(Ordering::Relaxed), 0);
}

/// etcd is replaced (wiped and started empty, as a restore from an old
/// backup would leave it): its revisions start again below the view's. The
/// watcher notices, lists it as new and follows it, instead of waiting,
/// silent, for a revision the new etcd will take long to reach.
#[tokio::test]
async fn a_replaced_etcd_is_listed_as_new_and_followed() {
    let (mut etcd, mut c) = seeded().await;
    let keys = KeySpace::default();
    // Move the revision well ahead of what a new etcd starts from.
    for generation in 2..40 {
        c.put(keys.export("a", "shop", "cart"), summary(generation), None)
            .await
            .unwrap();
    }
    let w = start_watcher(etcd.endpoint()).await;
    let rx = w.rx.clone();
    until_generation("the listed export", &rx, "a", Some(39)).await;

    etcd.kill();
    for entry in std::fs::read_dir(etcd.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::remove_dir_all(&path)
            .or_else(|_| std::fs::remove_file(&path))
            .unwrap();
    }
    etcd.restart().await.unwrap();
    let mut c = etcd.client().await.unwrap();
    record(&mut c, "b").await;
    c.put(keys.export("b", "shop", "cart"), summary(5), None)
        .await
        .unwrap();
    until_generation("b's export in the new etcd", &rx, "b", Some(5)).await;
    assert!(w.stats.compaction_relists.load(Ordering::Relaxed) >= 1);
    // Later changes are followed too.
    c.put(keys.export("b", "shop", "cart"), summary(6), None)
        .await
        .unwrap();
    until_generation("a later change", &rx, "b", Some(6)).await;
}

/// A stale cluster's age comes from `seen/<c>`, which a listing must read:
/// before it did, a controller that started (or re-listed) against a zone
/// knew no cluster's last liveness until that cluster's next `seen` write.
#[tokio::test]
async fn a_listing_reads_when_each_cluster_was_last_seen() {
    let (etcd, mut c) = seeded().await;
    let seen = serde_json::json!({"at": "2026-12-07T10:00:00Z"});
    c.put(KeySpace::default().seen("a"), seen.to_string(), None)
        .await
        .unwrap();
    let w = start_watcher(etcd.endpoint()).await;
    let rx = w.rx.clone();
    until_generation("the listed export", &rx, "a", Some(1)).await;
    let view = rx.borrow().clone();
    let at = view.last_seen.get("a").map(|s| s.at.unix_timestamp());
    assert_eq!(at, Some(1_796_637_600), "{:?}", view.last_seen);
    assert!(view.last_seen.get("b").is_none());
}

#[tokio::test]
async fn after_a_compaction_it_lists_again_and_loses_or_repeats_nothing() {
    let (etcd, mut c) = seeded().await;
    let keys = KeySpace::default();
    c.put(keys.export("gone", "shop", "cart"), summary(1), None)
        .await
        .unwrap();

    // The controller reaches etcd through a relay the test can cut.
    let relay = TcpRelay::start(IpAddr::V4(Ipv4Addr::LOCALHOST), etcd.client_addr())
        .await
        .unwrap();
    let w = start_watcher(format!("http://{}", relay.addr())).await;
    let mut rx = w.rx.clone();
    until_generation("the first list", &rx, "a", Some(1)).await;

    // Record every generation of "a" that consumers see.
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            let current = generation(&rx.borrow_and_update(), "a");
            if let Some(g) = current
                && seen.last() != Some(&g)
            {
                seen.push(g);
            }
            if seen.last() == Some(&50) {
                break;
            }
        }
        seen
    });

    // Break the watch. While cut, the view stays as it was.
    relay.cut().await;
    let stats = w.stats.clone();
    eventually("the watcher to notice", Duration::from_secs(10), || {
        let n = stats.etcd_errors.load(Ordering::Relaxed);
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert_eq!(
        generation(&w.rx.borrow(), "a"),
        Some(1),
        "view kept during the outage"
    );

    // Meanwhile: 49 updates, a delete, a new key, then a compaction that
    // removes the history the watcher would resume from.
    for g in 2..=50 {
        c.put(keys.export("a", "shop", "cart"), summary(g), None)
            .await
            .unwrap();
    }
    c.delete(keys.export("gone", "shop", "cart"), None)
        .await
        .unwrap();
    c.put(keys.export("new", "shop", "cart"), summary(7), None)
        .await
        .unwrap();
    let rev = c.get("/", None).await.unwrap().header().unwrap().revision();
    c.compact(rev, None).await.unwrap();

    relay.restore();
    let rx = w.rx.clone();
    eventually(
        "the view to converge after the compaction",
        Duration::from_secs(20),
        || {
            let v = rx.borrow().clone();
            async move {
                (generation(&v, "a") == Some(50)
                    && generation(&v, "gone").is_none()
                    && generation(&v, "new") == Some(7))
                .then_some(())
            }
        },
    )
    .await;
    assert!(
        w.stats.compaction_relists.load(Ordering::Relaxed) >= 1,
        "the compaction path was not taken"
    );
    assert!(rx.borrow().revision() >= rev);

    // Consumers never saw a generation go backwards or repeat.
    let seen = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .unwrap()
        .unwrap();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&50));

    // And it keeps following live changes afterwards.
    c.put(keys.export("a", "shop", "cart"), summary(51), None)
        .await
        .unwrap();
    until_generation("a live change after the re-list", &rx, "a", Some(51)).await;
}

#[tokio::test]
async fn an_etcd_outage_keeps_the_last_view_and_resyncs_on_return() {
    let (mut etcd, _) = seeded().await;
    let keys = KeySpace::default();
    let w = start_watcher(etcd.endpoint()).await;
    let rx = w.rx.clone();
    until_generation("the first list", &rx, "a", Some(1)).await;
    let publishes = w.stats.publishes.load(Ordering::Relaxed);

    etcd.kill();
    let stats = w.stats.clone();
    eventually(
        "the watcher to notice the outage",
        Duration::from_secs(10),
        || {
            let n = stats.etcd_errors.load(Ordering::Relaxed);
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    // Nothing was published during the outage: no empty or partial view.
    assert_eq!(w.stats.publishes.load(Ordering::Relaxed), publishes);
    assert_eq!(generation(&rx.borrow(), "a"), Some(1));

    etcd.restart().await.unwrap();
    let mut c = etcd.client().await.unwrap();
    for cluster in ["a", "b", "gone", "new"] {
        record(&mut c, cluster).await;
    }
    c.put(keys.export("a", "shop", "cart"), summary(2), None)
        .await
        .unwrap();
    until_generation("the resync after etcd returns", &rx, "a", Some(2)).await;
}

#[tokio::test]
async fn large_listings_are_read_in_pages_at_one_revision() {
    let etcd = Etcd::start().await.unwrap();
    let keys = KeySpace::default();
    let mut c = etcd.client().await.unwrap();
    for cluster in ["a", "b", "gone", "new"] {
        record(&mut c, cluster).await;
    }
    // More keys than one page holds.
    for chunk in (0..4500).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<_> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    keys.export("a", "shop", &format!("svc-{i}")),
                    summary(1),
                    None,
                )
            })
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
    let w = start_watcher(etcd.endpoint()).await;
    let rx = w.rx.clone();
    eventually("all 4500 exports", Duration::from_secs(20), || {
        let n = rx.borrow().export_count();
        async move { (n == 4500).then_some(()) }
    })
    .await;
    assert_eq!(w.stats.lists.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn exports_of_a_cluster_without_a_record_are_not_listed() {
    let etcd = Etcd::start().await.unwrap();
    let keys = KeySpace::default();
    let mut c = etcd.client().await.unwrap();
    record(&mut c, "a").await;
    c.put(keys.export("a", "shop", "cart"), summary(1), None)
        .await
        .unwrap();
    c.put(keys.export("orphan", "shop", "cart"), summary(1), None)
        .await
        .unwrap();
    let w = start_watcher(etcd.endpoint()).await;
    let rx = w.rx.clone();
    until_generation("the listed export", &rx, "a", Some(1)).await;
    assert_eq!(generation(&rx.borrow(), "orphan"), None);
    // Once it registers, its later exports arrive by the watch.
    record(&mut c, "orphan").await;
    c.put(keys.export("orphan", "shop", "cart"), summary(2), None)
        .await
        .unwrap();
    until_generation(
        "the orphan's export after registering",
        &rx,
        "orphan",
        Some(2),
    )
    .await;
}
