//! The file registry's hot reload, on a real file.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_controller::registry::{DiscoverySource, FileRegistry};
use fedmesh_test_support::eventually;

fn doc(healthy: bool) -> String {
    format!(
        "services:\n  - namespace: shop\n    name: checkout\n    ports: [8080]\n    endpoints:\n      - address: 127.0.1.10:8080\n        zone: az1\n        healthy: {healthy}\n"
    )
}

#[tokio::test]
async fn reloads_on_change_and_keeps_the_last_good_version_on_a_bad_edit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.yaml");
    fedmesh_test_support::write_atomically(&path, doc(true)).unwrap();
    let reg = FileRegistry::start(path.clone(), Duration::from_millis(20))
        .await
        .unwrap();
    let rx = reg.services();
    let key = ServiceKey::new("shop", "checkout");
    assert!(rx.borrow()[&key].endpoints[0].healthy);

    fedmesh_test_support::write_atomically(&path, doc(false)).unwrap();
    eventually("the edit to apply", Duration::from_secs(5), || {
        let healthy = rx.borrow()[&key].endpoints[0].healthy;
        async move { (!healthy).then_some(()) }
    })
    .await;

    // A broken edit: reported with its position; the last good version stays.
    fedmesh_test_support::write_atomically(
        &path,
        doc(true).replace("ports: [8080]", "ports: [8080"),
    )
    .unwrap();
    let err = eventually(
        "the bad edit to be reported",
        Duration::from_secs(5),
        || {
            let e = reg.last_error();
            async move { e }
        },
    )
    .await;
    assert!(err.to_string().contains("line"), "{err}");
    assert!(
        !rx.borrow()[&key].endpoints[0].healthy,
        "last good version replaced"
    );

    // Fixing the file clears the error and applies.
    fedmesh_test_support::write_atomically(&path, doc(true)).unwrap();
    eventually("the fix to apply", Duration::from_secs(5), || {
        let ok = rx.borrow()[&key].endpoints[0].healthy && reg.last_error().is_none();
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn an_invalid_file_at_start_up_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.yaml");
    fedmesh_test_support::write_atomically(&path, "services: [{namespace: shop}]").unwrap();
    let err = FileRegistry::start(path.clone(), Duration::from_millis(20))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with(path.to_str().unwrap()), "{err}");
    let missing = FileRegistry::start(dir.path().join("nope.yaml"), Duration::from_millis(20))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("nope.yaml"), "{missing}");
}
