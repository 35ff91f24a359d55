//! End to end: global traffic policies applied with `fedmesh apply` to a
//! federation `fedmesh up topologies/three-clouds.yaml` runs (real etcd,
//! controllers, gateways, proxies, backends). Weights shift a share of
//! `checkout` to gcp, a header routes to `checkout-v2`, an allow rule
//! admits aws's proxy at gcp and refuses azure's, a failover order skips a
//! cloud, `export.clusters` leaves a cluster out, and a rollback brings the
//! old behaviour back. `fedmesh get proxies` says when every proxy runs
//! each change.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{Up, ensure_binaries, fedmesh, fedmesh_ok};
use tokio::time::Instant;

/// The proxies of aws-use1 and azure-eus (blocks moved up by 100).
const AWS_PROXY: &str = "127.0.110.5:4140";
const AZURE_PROXY: &str = "127.0.112.5:4140";

/// One GET: (status, cluster, service) of the answer.
async fn get(proxy: SocketAddr, host: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get("/").header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = tx
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    (status, s("cluster"), s("service"))
}

/// `n` GETs over 8 concurrent clients: the answering cluster of each; any
/// failure fails the test.
async fn clusters(proxy: SocketAddr, n: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in (w..n).step_by(8) {
                let (status, cluster, _) = get(proxy, "checkout.shop", &[]).await;
                assert_eq!(status, 200, "a GET failed");
                out.push(cluster);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn share(answers: &[String], cluster: &str) -> f64 {
    answers.iter().filter(|c| *c == cluster).count() as f64 / answers.len() as f64
}

/// `fedmesh <args>` towards the global zone (no --state-dir), as a shell
/// that sourced `etcd.env`.
fn zone_ok(state: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .envs(support::zone_env(state))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fedmesh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn state_json(state: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap()
}

/// Applies one policy document and waits until every proxy and gateway
/// runs it (`fedmesh get proxies`: CURRENT for all).
async fn apply(state: &Path, etcd: &str, name: &str, spec: &str) {
    let file = state.join(format!("{name}.yaml"));
    std::fs::write(
        &file,
        format!(
            "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
        ),
    )
    .unwrap();
    zone_ok(
        state,
        &["apply", "-f", file.to_str().unwrap(), "--etcd", etcd],
    );
    wait_current(state, etcd).await;
}

async fn wait_current(state: &Path, etcd: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = fedmesh(&["get", "proxies", "-o", "json", "--etcd", etcd], state);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let rows = rows.as_array().cloned().unwrap_or_default();
        // Three proxies and three gateways.
        if rows.len() >= 6 && rows.iter().all(|r| r["current"] == true) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every proxy runs the policy: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policies_shift_route_allow_and_roll_back_on_a_live_federation() {
    ensure_binaries();
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    let topology = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/three-clouds.yaml"
    );
    let out = fedmesh(&["up", topology, "-d"], s);
    let _up = Up(s.to_path_buf());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every secret `up` writes is its owner's alone.
    for file in [
        "aws-use1/tokens.yaml",
        "aws-use1/proxy.token",
        "etcd.env",
        "etcd-pki/root-key.pem",
        "etcd-pki/root.password",
        "aws-use1/join/etcd-tls/client-key.pem",
    ] {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(s.join(file));
        let mode = meta
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file}: {mode:o}");
    }
    let st = state_json(s);
    let etcd = format!("https://{}", st["etcd"][0]["address"].as_str().unwrap());
    let aws: SocketAddr = AWS_PROXY.parse().unwrap();
    let azure: SocketAddr = AZURE_PROXY.parse().unwrap();

    // Without a policy, aws serves aws.
    let before = clusters(aws, 200).await;
    assert_eq!(share(&before, "aws-use1"), 1.0);

    // 10% of checkout to gcp: within 3 points over 2,000 requests.
    apply(
        s,
        &etcd,
        "checkout",
        "  service: shop/checkout\n  weights: {aws-use1: 90, gcp-usc1: 10}\n",
    )
    .await;
    let first_rev: i64 = {
        let out = zone_ok(s, &["get", "policies", "-o", "json", "--etcd", &etcd]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["revision"].as_i64().unwrap()
    };
    let answers = clusters(aws, 2000).await;
    let gcp = share(&answers, "gcp-usc1");
    assert!((0.07..=0.13).contains(&gcp), "gcp share {gcp}");

    // A header routes to v2; other requests stay on checkout.
    apply(
        s,
        &etcd,
        "checkout",
        "  service: shop/checkout\n  routes:\n    - match: {headers: {x-canary: {exact: \"1\"}}}\n      to: [{service: shop/checkout-v2}]\n",
    )
    .await;
    for _ in 0..20 {
        let (st, _, svc) = get(aws, "checkout.shop", &[("x-canary", "1")]).await;
        assert_eq!((st, svc.as_str()), (200, "shop/checkout-v2"));
        let (st, _, svc) = get(aws, "checkout.shop", &[]).await;
        assert_eq!((st, svc.as_str()), (200, "shop/checkout"));
    }

    // All of checkout to gcp, which admits aws's proxy only: azure's
    // requests are refused there (FORBIDDEN, before the first byte) and
    // fail over to azure's own backends; none fails.
    apply(
        s,
        &etcd,
        "checkout",
        "  service: shop/checkout\n  weights: {gcp-usc1: 1}\n  export:\n    allow:\n      - cluster: aws-use1\n        identities: [\"spiffe://aws-use1.fedmesh.local/ns/fedmesh/sa/proxy\"]\n",
    )
    .await;
    let from_aws = clusters(aws, 100).await;
    assert_eq!(share(&from_aws, "gcp-usc1"), 1.0, "aws is admitted");
    let from_azure = clusters(azure, 100).await;
    assert_eq!(share(&from_azure, "gcp-usc1"), 0.0, "azure is refused");
    let gw_admin = st["clusters"][1]["gateways"][0]["admin"].as_str().unwrap();
    let (_, metrics) = fedmesh_get_metrics(gw_admin.parse().unwrap()).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("fedmesh_gateway_streams_refused")
                && l.contains("azure-eus")
                && l.to_lowercase().contains("forbidden")),
        "gcp's ingress counts azure's refusals: {metrics}"
    );

    // export.clusters without gcp: gcp no longer exports checkout, so even
    // a policy weighting gcp alone sends it nothing.
    apply(
        s,
        &etcd,
        "checkout",
        "  service: shop/checkout\n  weights: {gcp-usc1: 1}\n  export: {clusters: [aws-use1, azure-eus]}\n",
    )
    .await;
    assert_eq!(
        share(&clusters(aws, 100).await, "gcp-usc1"),
        0.0,
        "gcp does not export it"
    );

    // A failover order that skips gcp: with aws's checkout down, all of it
    // goes to azure (by locality, gcp's larger capacity would take most).
    apply(
        s,
        &etcd,
        "checkout",
        "  service: shop/checkout\n  failover: {clusters: [aws-use1, azure-eus]}\n",
    )
    .await;
    fedmesh_ok(&["stop", "aws-use1/shop/checkout"], s);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = clusters(aws, 50).await;
        if share(&a, "azure-eus") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "not all to azure: {a:?}");
    }
    assert_eq!(share(&clusters(aws, 200).await, "azure-eus"), 1.0);
    fedmesh_ok(&["start", "aws-use1/shop/checkout"], s);

    // Roll back to the first revision: the 90/10 split returns.
    zone_ok(
        s,
        &[
            "rollback",
            "policy",
            "checkout",
            "--to",
            &first_rev.to_string(),
            "--etcd",
            &etcd,
        ],
    );
    wait_current(s, &etcd).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = clusters(aws, 1000).await;
        let gcp = share(&a, "gcp-usc1");
        if (0.07..=0.13).contains(&gcp) {
            break;
        }
        // Backends just restarted wait out the failback hold.
        assert!(
            Instant::now() < deadline,
            "gcp share {gcp} after the rollback"
        );
    }
}

async fn fedmesh_get_metrics(admin: SocketAddr) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
