//! One gateway never takes a cluster away. `fedmesh up
//! topologies/two-clusters-ha.yaml` runs two clusters with two gateways
//! each, as real processes. aws's checkout backends are stopped, so aws's
//! proxy sends every GET to gcp. Under steady GETs, one of aws's gateways
//! is killed with SIGKILL, then one of gcp's: no GET fails, and traffic
//! never pauses for long. The topology's TCP service is reachable through
//! each proxy's listener for it, from aws's own backend and, once that is
//! stopped, from gcp's.
//!
//! Its own test binary: `cargo test` runs binaries one after another, so
//! this federation never shares loopback addresses with `up.rs`'s.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{Load, Up, ensure_binaries, fedmesh_ok};
use tokio::time::Instant;

/// aws-use1's proxy: the first cluster's block, 127.0.110.x (the tests move
/// every block up by 100, clear of a federation the user may have up).
const AWS_PROXY: &str = "127.0.110.5:4140";
/// aws-use1's proxy listener for the TCP service shop/db (port 5432).
const AWS_DB: &str = "127.0.110.5:5432";

/// Bytes through the mesh's TCP listener come back from the db's demo
/// backend, a byte echo that first says where it runs; returns that
/// cluster.
async fn echo_through(listener: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(listener).await.unwrap();
    let mut s = tokio::io::BufReader::new(s);
    let exchange = async {
        let mut banner = String::new();
        s.read_line(&mut banner).await.unwrap();
        s.get_mut().write_all(b"select 1").await.unwrap();
        let mut back = [0u8; 8];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"select 1");
        banner
    };
    let banner = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("an echo within 10 s");
    let mut words = banner.split_whitespace();
    assert_eq!(words.next(), Some("fedmesh-echo"), "{banner:?}");
    words.next().unwrap().to_string()
}

/// The pid of `cluster`'s gateway `i`, from the state `up` keeps.
fn gateway_pid(state: &std::path::Path, cluster: &str, i: usize) -> u32 {
    let raw = std::fs::read(state.join("state.json")).unwrap();
    let s: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let c = s["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap();
    u32::try_from(c["gateways"][i]["pid"].as_u64().unwrap()).unwrap()
}

fn kill_9(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -9 {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_gateway_on_either_side_fails_no_get() {
    ensure_binaries();
    let state = tempfile::tempdir().unwrap();
    let topology = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../topologies/two-clusters-ha.yaml"
    );
    fedmesh_ok(&["up", topology, "-d"], state.path());
    let _up = Up(state.path().to_path_buf());
    fedmesh_ok(&["stop", "aws-use1/shop/checkout"], state.path());

    let proxy: SocketAddr = AWS_PROXY.parse().unwrap();
    // Enough clients that many pooled tunnels run through each gateway.
    let load = Load::start(proxy, "checkout.shop", 16).await;
    let t0 = Instant::now();
    load.wait("answers from gcp", t0, 200, |c| c == "gcp-usc1")
        .await;

    // One of the caller's own gateways (its egress) dies.
    kill_9(gateway_pid(state.path(), "aws-use1", 0));
    let t1 = Instant::now();
    load.wait("answers from gcp after aws lost a gateway", t1, 400, |c| {
        c == "gcp-usc1"
    })
    .await;

    // One of the serving cluster's gateways dies.
    kill_9(gateway_pid(state.path(), "gcp-usc1", 0));
    let t2 = Instant::now();
    load.wait("answers from gcp after gcp lost a gateway", t2, 400, |c| {
        c == "gcp-usc1"
    })
    .await;

    let (answers, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed GETs, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The longest pause in traffic after the first kill: a dead gateway's
    // connections are given up after the QUIC idle timeout at the latest
    // (the proxies' and gateways' default; failover is usually far sooner,
    // on the refused or reset stream).
    let longest = answers
        .windows(2)
        .filter(|w| w[0].at >= t1)
        .map(|w| w[1].at.saturating_duration_since(w[0].at))
        .max()
        .unwrap_or_default();
    println!("longest pause after the first kill: {longest:?}");
    let idle = fedmesh_proxy::config::Settings::default().quic_idle_timeout;
    assert!(
        longest <= idle,
        "traffic paused for {longest:?} (idle timeout {idle:?})"
    );

    // The TCP service, through aws's proxy listener: from aws's own db,
    // then, with it stopped, across the WAN from gcp's.
    let status = fedmesh_ok(&["status", "-o", "json"], state.path());
    assert!(
        status.contains(AWS_DB),
        "status names the listener: {status}"
    );
    assert_eq!(echo_through(AWS_DB).await, "aws-use1");
    fedmesh_ok(&["stop", "aws-use1/shop/db"], state.path());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The proxy learns of the stop from its controller; until then a
        // connection may still go to the stopped backend and be refused.
        let tried = tokio::spawn(echo_through(AWS_DB)).await;
        if let Ok(cluster) = tried {
            assert_eq!(cluster, "gcp-usc1");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no echo from gcp's db within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
