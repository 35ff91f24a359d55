//! `ServiceImport`s against test-support's FakeKube (a fake API server:
//! there is no real one on these machines): written with their status,
//! updated, deleted when their service leaves, never written where the
//! namespace does not exist, and a missing namespace not asked about at
//! every event.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_kube::imports::{self, ImportStats};
use fedmesh_kube::{Import, Imports};
use fedmesh_test_support::{FakeKube, eventually};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

fn imports_of(entries: &[(&str, &str, &[&str])]) -> Arc<Imports> {
    Arc::new(
        entries
            .iter()
            .map(|(ns, name, clusters)| {
                (
                    ServiceKey::new(ns, name),
                    Import {
                        ports: vec![8080],
                        clusters: clusters.iter().map(|c| c.to_string()).collect(),
                    },
                )
            })
            .collect::<BTreeMap<_, _>>(),
    )
}

/// `status.clusters` of an import, once it has one.
fn clusters(fake: &FakeKube, ns: &str, name: &str) -> Option<String> {
    let i = fake.get("serviceimports", ns, name)?;
    let c = &i["status"]["clusters"];
    (!c.is_null()).then(|| c.to_string())
}

#[tokio::test]
async fn imports_follow_the_clusterset_where_their_namespace_exists() {
    let fake = FakeKube::start("127.0.1.53", Duration::from_secs(1))
        .await
        .unwrap();
    fake.add_namespace("shop");
    let client = kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap();
    let (tx, rx) = watch::channel(imports_of(&[
        ("shop", "cart", &["aws"]),
        ("pay", "card", &["aws"]),
    ]));
    let stats = Arc::new(ImportStats::default());
    let ip = Some("10.96.0.53".parse().unwrap());
    let task = tokio::spawn(imports::run(client, rx, ip, stats.clone()));

    let got = eventually("shop/cart imported", WAIT, || async {
        clusters(&fake, "shop", "cart")
    })
    .await;
    assert_eq!(got, r#"[{"cluster":"aws"}]"#);
    let cart = fake.get("serviceimports", "shop", "cart").unwrap();
    assert_eq!(cart["spec"]["ips"], serde_json::json!(["10.96.0.53"]));
    assert_eq!(cart["spec"]["type"], "ClusterSetIP");
    assert_eq!(
        cart["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "fedmesh"
    );
    assert!(fake.get("serviceimports", "pay", "card").is_none());

    // Three changes to cart: two writes each (spec, then status), and none
    // for pay/card, whose namespace was found missing a moment ago.
    let before = fake.stats().writes.load(Ordering::Relaxed);
    for clusters_now in [&["aws", "gcp"][..], &["gcp"], &["aws", "gcp"]] {
        tx.send_replace(imports_of(&[
            ("shop", "cart", clusters_now),
            ("pay", "card", &["aws"]),
        ]));
        let want = serde_json::to_string(
            &clusters_now
                .iter()
                .map(|c| serde_json::json!({ "cluster": c }))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        eventually("cart's clusters updated", WAIT, || async {
            clusters(&fake, "shop", "cart").filter(|c| *c == want)
        })
        .await;
    }
    assert_eq!(fake.stats().writes.load(Ordering::Relaxed) - before, 6);

    // cart leaves the clusterset: its import is deleted; one made by
    // someone else is never touched.
    fake.put(&serde_json::json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"namespace": "shop", "name": "theirs"},
        "spec": {"type": "ClusterSetIP", "ports": [{"port": 80, "protocol": "TCP"}]},
    }));
    tx.send_replace(imports_of(&[]));
    eventually("cart's import deleted", WAIT, || async {
        fake.get("serviceimports", "shop", "cart")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(fake.get("serviceimports", "shop", "theirs").is_some());
    assert_eq!(stats.errors.load(Ordering::Relaxed), 0);
    task.abort();
}
