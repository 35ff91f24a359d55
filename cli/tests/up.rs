//! End to end: `fedmesh up topologies/three-clouds.yaml` brings up real
//! processes (etcd, three registered clusters with their controllers,
//! gateways and proxies, demo backends, WAN relays with the topology's
//! latency between clouds); under steady GETs from aws,
//! every checkout backend in aws is stopped and no GET fails, traffic
//! going to gcp or azure; started again, traffic returns to aws. The test
//! asserts on the `cluster` the backends report.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

const FEDMESH: &str = env!("CARGO_BIN_EXE_fedmesh");
/// aws-use1's proxy in three-clouds.yaml (block 127.0.10.x).
const AWS_PROXY: &str = "127.0.10.5:4140";

/// `fedmesh up` needs its sibling binaries; `cargo test --workspace`
/// builds them, `cargo test -p fedmesh` alone may not have.
fn ensure_binaries() {
    let dir = Path::new(FEDMESH).parent().unwrap();
    let missing = ["fedmesh-controller", "fedmesh-gateway", "fedmesh-proxy"]
        .iter()
        .any(|b| !dir.join(b).is_file());
    if missing {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args([
                "build",
                "--bins",
                "-p",
                "federation-controller",
                "-p",
                "east-west-gateway",
                "-p",
                "proxy",
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "building the binaries failed");
    }
}

fn fedmesh(args: &[&str], state: &Path) -> std::process::Output {
    Command::new(FEDMESH)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

/// Brings everything down even when the test fails.
struct Up(PathBuf);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = fedmesh(&["down"], &self.0);
    }
}

#[derive(Debug, Clone)]
struct Answer {
    at: Instant,
    cluster: String,
}

async fn client(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

async fn get(
    tx: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> Result<String, String> {
    tx.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get("/")
        .header("host", "checkout.shop")
        .body(Empty::new())
        .unwrap();
    let r = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).to_string();
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    Ok(v["cluster"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clouds_fail_over_from_aws_and_back() {
    ensure_binaries();
    let state = tempfile::tempdir().unwrap();
    let topology = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/three-clouds.yaml"
    );
    // A taken address is refused up front, named, with what it is for.
    {
        let _taken = std::net::TcpListener::bind(AWS_PROXY).unwrap();
        let out = fedmesh(&["up", topology, "-d"], state.path());
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("127.0.10.5:4140 is taken; it is aws-use1's proxy"),
            "{err}"
        );
    }
    let out = fedmesh(&["up", topology, "-d"], state.path());
    let _up = Up(state.path().to_path_buf());
    assert!(
        out.status.success(),
        "fedmesh up failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("curl -s -H 'host: "), "{shown}");

    // Steady GETs from aws: four keep-alive clients.
    let proxy: SocketAddr = AWS_PROXY.parse().unwrap();
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stop, stopped) = watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (answers, failures, stopped) = (answers.clone(), failures.clone(), stopped.clone());
        workers.push(tokio::spawn(async move {
            let end = Instant::now() + Duration::from_secs(240);
            let mut tx = client(proxy).await;
            while !*stopped.borrow() && Instant::now() < end {
                match get(&mut tx).await {
                    Ok(cluster) => answers.lock().unwrap().push(Answer {
                        at: Instant::now(),
                        cluster,
                    }),
                    Err(e) => {
                        failures.lock().unwrap().push(e);
                        tx = client(proxy).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let count_since = |t: Instant, pred: &dyn Fn(&str) -> bool| {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.at >= t && pred(&a.cluster))
            .count()
    };
    let wait = |what: &'static str,
                since: Instant,
                n: usize,
                pred: &'static (dyn Fn(&str) -> bool + Sync)| {
        let count_since = &count_since;
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            while count_since(since, pred) < n {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let t0 = Instant::now();
    wait("answers from aws", t0, 100, &|c| c == "aws-use1").await;

    // Every checkout backend in aws stops.
    let out = fedmesh(&["stop", "aws-use1/shop/checkout"], state.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped_at = Instant::now();
    wait("answers from gcp or azure", stopped_at, 300, &|c| {
        c != "aws-use1"
    })
    .await;
    assert_eq!(
        count_since(stopped_at, &|c| c == "aws-use1"),
        0,
        "no answer from aws once its backends are gone"
    );

    // They start again: traffic returns to aws.
    let out = fedmesh(&["start", "aws-use1/shop/checkout"], state.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started_at = Instant::now();
    wait("answers from aws again", started_at, 100, &|c| {
        c == "aws-use1"
    })
    .await;

    let _ = stop.send(true);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    let seen: std::collections::BTreeSet<String> = answers
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.cluster.clone())
        .collect();
    assert!(seen.contains("aws-use1") && seen.len() >= 2, "{seen:?}");

    // `status -o json` reports the backends up again, then `down` stops it all.
    let out = fedmesh(&["status", "-o", "json"], state.path());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status[0]["name"], "aws-use1");
    assert_eq!(status[0]["services"]["shop/checkout"], "2/2");
    assert_eq!(status[0]["proxy"], AWS_PROXY);
    assert_eq!(status[0]["proxy_health"], "up");
    assert_eq!(status[1]["controller"], "up");
    assert_eq!(status[2]["gateways_up"], 1);
    let out = fedmesh(&["down"], state.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "the proxy is gone"
    );
}

#[test]
fn a_bad_topology_is_refused_with_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: fedmesh.io/v1\nkind: Topology\nname: bad\nclusters:\n  - {name: aws, cloud: aws, region: r1, zones: [a]}\nservices:\n  - name: shop/cart\n    port: 8080\n    replicas: {gcp: {a: 1}}\n",
    )
    .unwrap();
    let out = fedmesh(&["up", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "bad.yaml: line 7 column 5: services[0].replicas.gcp: no cluster of that name"
        ),
        "{err}"
    );
}
