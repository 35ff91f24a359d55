//! End to end: `fedmesh up topologies/three-clouds.yaml` brings up real
//! processes (etcd, three registered clusters with their controllers,
//! gateways and proxies, demo backends, WAN relays with the topology's
//! latency between clouds); under steady GETs from aws,
//! every checkout backend in aws is stopped and no GET fails, traffic
//! going to gcp or azure; started again, traffic returns to aws. The test
//! asserts on the `cluster` the backends report.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use support::{Load, Up, ensure_binaries, fedmesh, fedmesh_ok};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// aws-use1's proxy in three-clouds.yaml (block 127.0.110.x: the tests move every block up by 100, clear of a federation the user may have up).
const AWS_PROXY: &str = "127.0.110.5:4140";

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
            err.contains("127.0.110.5:4140 is taken; it is aws-use1's proxy"),
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
    let load = Load::start(proxy, "checkout.shop", 4).await;
    let t0 = Instant::now();
    load.wait("answers from aws", t0, 100, |c| c == "aws-use1")
        .await;

    // Every checkout backend in aws stops.
    fedmesh_ok(&["stop", "aws-use1/shop/checkout"], state.path());
    let stopped_at = Instant::now();
    load.wait("answers from gcp or azure", stopped_at, 300, |c| {
        c != "aws-use1"
    })
    .await;
    assert_eq!(
        load.count_since(stopped_at, |c| c == "aws-use1"),
        0,
        "no answer from aws once its backends are gone"
    );

    // They start again: traffic returns to aws.
    fedmesh_ok(&["start", "aws-use1/shop/checkout"], state.path());
    let started_at = Instant::now();
    load.wait("answers from aws again", started_at, 100, |c| {
        c == "aws-use1"
    })
    .await;

    let (answers, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    let seen: std::collections::BTreeSet<String> =
        answers.iter().map(|a| a.cluster.clone()).collect();
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

    // The federation's own processes stop and start again by name, from
    // the command they were first started with.
    let status_of = |field: &str| {
        let out = fedmesh(&["status", "-o", "json"], state.path());
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        status[0][field].clone()
    };
    use serde_json::json;
    for (target, field, down, up) in [
        (
            "aws-use1/controller",
            "controller",
            json!("down"),
            json!("up"),
        ),
        ("aws-use1/gateway-0", "gateways_up", json!(0), json!(1)),
    ] {
        fedmesh_ok(&["stop", target], state.path());
        assert_eq!(status_of(field), down, "{target} stopped");
        fedmesh_ok(&["start", target], state.path());
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while status_of(field) != up {
            assert!(
                Instant::now() < deadline,
                "{target} not ready again in 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    after_a_crash_start_restarts_what_died(state.path());
    drills_run_against_what_is_up(state.path());

    fedmesh_ok(&["down"], state.path());
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "the proxy is gone"
    );
}

/// azure's payments backends and its proxy are killed (SIGKILL, not
/// `fedmesh stop`): `status` shows them dead; `start` starts exactly what
/// died and says so; `stop` of what is already stopped says it was not
/// running.
fn after_a_crash_start_restarts_what_died(state: &std::path::Path) {
    let raw = std::fs::read(state.join("state.json")).unwrap();
    let s: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let azure = &s["clusters"][2];
    assert_eq!(azure["name"], "azure-eus");
    let payments: Vec<u64> = azure["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["service"] == "shop/payments")
        .map(|b| b["pid"].as_u64().unwrap())
        .collect();
    let proxy = azure["proxy"]["pid"].as_u64().unwrap();
    assert!(!payments.is_empty());
    for pid in payments.iter().chain([&proxy]) {
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -9 {pid}");
    }
    let status = |state: &std::path::Path| -> serde_json::Value {
        let out = fedmesh(&["status", "-o", "json"], state);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // The killed processes are reaped by the supervisor: poll until the
    // status sees them gone.
    let n = payments.len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let st = status(state);
        let shown = st[2]["services"]["shop/payments"].clone();
        if shown == format!("0/{n} ({n} dead)") && st[2]["proxy_health"] == "dead" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status after kill -9: {shown}, proxy {}",
            st[2]["proxy_health"]
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let said = fedmesh_ok(&["start", "azure-eus/shop/payments"], state);
    assert_eq!(
        said.lines()
            .filter(|l| l.starts_with("started azure-eus/shop/payments"))
            .count(),
        n,
        "{said}"
    );
    let said = fedmesh_ok(&["start", "azure-eus/proxy"], state);
    assert_eq!(said.trim(), "started azure-eus-proxy");
    let st = status(state);
    assert_eq!(st[2]["services"]["shop/payments"], format!("{n}/{n}"));
    assert_eq!(st[2]["proxy_health"], "up");
    let said = fedmesh_ok(&["start", "azure-eus/proxy"], state);
    assert_eq!(said.trim(), "azure-eus-proxy was already running");
    // Stopped twice: the second says so.
    fedmesh_ok(&["stop", "azure-eus/shop/payments@eus-1"], state);
    let said = fedmesh_ok(&["stop", "azure-eus/shop/payments@eus-1"], state);
    assert!(
        said.lines().all(|l| l.ends_with("was not running")),
        "{said}"
    );
    fedmesh_ok(&["start", "azure-eus/shop/payments@eus-1"], state);
}

/// `fedmesh drill` on the federation that is up: a drill file of the
/// user's, whose fault follows the traffic (the WAN to whichever cloud
/// serves aws is cut, live, through the supervisor's relays), reported as
/// JSON with its timeline; the exit code is the verdict. A drill written
/// for another topology, and a WAN command for an unknown cloud, are
/// refused by name.
fn drills_run_against_what_is_up(state: &std::path::Path) {
    let file = state.join("cut.yaml");
    std::fs::write(
        &file,
        "name: cut
about: the WAN to the serving cloud is cut
topology: three-clouds
client: aws-use1
service: shop/payments
rate: 100
duration: 4s
fault: {wan: {between: [aws, \"{serving-cloud}\"], blackhole: true}, at: 1500ms, recover: 3s}
thresholds: {failed: 0}
",
    )
    .unwrap();
    let out = fedmesh(&["drill", file.to_str().unwrap(), "-o", "json"], state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    let r = &reports[0];
    assert_eq!(r["drill"], "cut");
    assert_eq!(r["requests"], 400, "every due request is recorded");
    let fault = r["fault"].as_str().unwrap();
    assert!(
        fault == "wan aws ↔ gcp: blackhole" || fault == "wan aws ↔ azure: blackhole",
        "{fault}"
    );
    let passed = r["verdict"]["passed"].as_bool().unwrap();
    assert_eq!(out.status.success(), passed, "{stderr}");
    assert!(state.join("drills/cut.svg").is_file());

    let other = state.join("other.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &other,
        text.replace("topology: three-clouds", "topology: two-clusters-ha"),
    )
    .unwrap();
    let out = fedmesh(&["drill", other.to_str().unwrap()], state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cut is written for the topology two-clusters-ha"),
        "{err}"
    );
    let out = fedmesh(&["wan", "aws", "mars", "--latency", "100ms"], state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("\"mars\""), "{err}");
    // A change that is made is said in words.
    let said = fedmesh_ok(
        &["wan", "aws", "azure", "--latency", "0ms", "--jitter", "0ms"],
        state,
    );
    assert_eq!(said.trim(), "aws ↔ azure: latency 0 ms, jitter 0 ms");
    let said = fedmesh_ok(&["wan", "aws", "azure", "--reset"], state);
    assert_eq!(said.trim(), "aws ↔ azure: the topology's link again");
}

#[test]
fn a_block_offset_that_leaves_no_room_is_refused_before_anything_starts() {
    ensure_binaries();
    let dir = tempfile::tempdir().unwrap();
    let topology = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/three-clouds.yaml"
    );
    let out = fedmesh(&["up", topology, "--block-offset", "250"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--block-offset: a block offset of 250") && err.contains("use at most 243"),
        "{err}"
    );
    assert!(!dir.path().join("state.json").exists(), "nothing started");
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

/// Every live process whose command line names `dir` (etcd, controllers,
/// gateways and proxies are given paths in it) or `block` (the demo
/// backends listen there), but `fedmesh up` itself.
fn processes_under(dir: &std::path::Path, block: &str) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        let ours = cmd.contains(&needle) || cmd.contains(block);
        let up = cmd.split_whitespace().nth(1) == Some("up");
        if ours && !zombie && !up {
            out.push(cmd);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_the_start_stops_everything_started_so_far() {
    ensure_binaries();
    let state = tempfile::tempdir().unwrap();
    let topology = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/three-clouds.yaml"
    );
    // Its own blocks: up.rs's other federation may be up at the same time.
    let up = std::process::Command::new(support::FEDMESH)
        .args(["up", topology, "--block-offset", "150", "--state-dir"])
        .arg(state.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once a cluster is half-way: its controller has started.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    // aws-use1's block, moved up by 150.
    let block = "127.0.160.";
    while !processes_under(state.path(), block)
        .iter()
        .any(|p| p.contains("fedmesh-controller"))
    {
        assert!(
            Instant::now() < deadline,
            "no controller started within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let pid = up.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || up.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted while starting"), "{err}");
    assert_eq!(
        processes_under(state.path(), block),
        Vec::<String>::new(),
        "left running"
    );
    assert!(!state.path().join("state.json").exists());
}
