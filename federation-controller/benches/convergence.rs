//! Convergence: how long a change of one zone's healthy count in cluster A
//! takes to reach a discovery stream of cluster B, with 10 clusters × 1000
//! services in the global zone. Side by side, in the same run: the latency
//! of a bare etcd put → watch notification, the floor any etcd-based design
//! sits on.
//!
//! Run: `cargo bench -p fedmesh-controller --bench convergence`
//! (CHANGES=1000 CLUSTERS=10 SERVICES=1000 by default).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fedmesh_api::ServiceKey;
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_controller::tokens::Tokens;
use fedmesh_discovery::MeshState;
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_test_support::Etcd;
use fedmesh_trust::{SpiffeId, TrustDomain};
use fedmesh_zone::TokensFile;
use hdrhistogram::Histogram;
use tokio::sync::watch;

fn env(name: &str, default: usize) -> usize {
    fedmesh_test_support::env_or(name, default)
}

#[tokio::main]
async fn main() {
    fedmesh_trust::install_default_provider();
    let changes = env("CHANGES", 1000);
    let clusters = env("CLUSTERS", 10).max(2);
    let services = env("SERVICES", 1000);

    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();

    // Cluster A publishes through a real controller; B observes through a
    // real controller; the rest are loaded straight into etcd.
    let join_a = register(&client, &etcd.endpoint(), "c0", 0).await;
    let join_b = register(&client, &etcd.endpoint(), "c1", 1).await;
    for n in 2..clusters {
        let name = format!("c{n}");
        let join = register(&client, &etcd.endpoint(), &name, n).await;
        load_exports(&mut client, &join, services).await;
    }
    let (a_tx, a_rx) = watch::channel(local_services(services, None));
    let a = Controller::start(ControllerConfig::new(
        join_a,
        LocalSource::Channel(a_rx),
        "127.0.1.2:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let b_td = TrustDomain::new(&join_b.cluster.trust_domain).unwrap();
    let b_root = join_b.ca.cert_der().clone();
    let token = "bench-token-0123456789abcdef0123456789".to_string();
    let mut cfg = ControllerConfig::new(
        join_b,
        LocalSource::Channel(watch::channel(Arc::new(Default::default())).1),
        "127.0.2.2:0".parse().unwrap(),
    );
    cfg.tokens = Tokens::fixed(TokensFile::granting(
        [(
            token.as_str(),
            SpiffeId::workload(&b_td, "bench", "client").unwrap(),
        )],
        Duration::from_secs(3600),
    ));
    let b = Controller::start(cfg).await.unwrap();
    // A client of B, as a proxy is one.
    let (req_tx, mut stream) = discovery_client(b.discovery_addr, &b_td, b_root, token).await;

    let a_name = "c0";
    let mut state = MeshState::default();
    let healthy_of = |m: &MeshState, svc: &str| {
        m.services
            .get(&ServiceKey::new("bench", svc))
            .and_then(|s| s.remote.iter().find(|r| r.cluster == a_name))
            .and_then(|r| r.localities.iter().find(|l| l.zone == "az1"))
            .map(|l| l.healthy)
    };
    // Wait for the full view: every service, with A and every other cluster.
    let setup = Instant::now();
    loop {
        let r = stream.message().await.unwrap().unwrap();
        req_tx
            .send(pb::DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        state.apply(&r).unwrap();
        let complete = state.services.len() == services
            && state
                .services
                .values()
                .all(|s| s.remote.len() == clusters - 1);
        if complete {
            break;
        }
        assert!(
            setup.elapsed() < Duration::from_secs(120),
            "view never completed"
        );
    }

    let mut fedmesh = Histogram::<u64>::new(3).unwrap();
    let mut healthy = vec![3usize; services];
    let started = Instant::now();
    for i in 0..changes {
        let svc = i % services;
        let next = if healthy[svc] == 3 { 2 } else { 3 };
        healthy[svc] = next;
        let name = format!("svc-{svc}");
        let update = local_services(services, Some((svc, next)));
        let t0 = Instant::now();
        a_tx.send_replace(update);
        loop {
            let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            req_tx
                .send(pb::DiscoveryRequest {
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
            state.apply(&r).unwrap();
            if healthy_of(&state, &name) == Some(next as u32) {
                break;
            }
        }
        fedmesh.record(t0.elapsed().as_micros() as u64).unwrap();
    }
    let run_time = started.elapsed();

    // Baseline: a bare etcd put → watch notification, same etcd, same run.
    let raw = bare_put_watch(&mut client, changes).await;

    let (f50, f99) = (percentile(&fedmesh, 0.50), percentile(&fedmesh, 0.99));
    let (r50, r99) = (percentile(&raw, 0.50), percentile(&raw, 0.99));
    println!(
        "convergence: {clusters} clusters x {services} services, {changes} changes in {:.1} s",
        run_time.as_secs_f64()
    );
    println!("| path | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|");
    println!(
        "| fedmesh: A's source -> A's controller -> etcd -> B's controller -> B's discovery stream | {f50:.2} | {f99:.2} |"
    );
    println!("| bare etcd put -> watch event | {r50:.2} | {r99:.2} |");
    println!(
        "| ratio fedmesh / bare etcd | {:.1}x | {:.1}x |",
        f50 / r50,
        f99 / r99
    );
    println!(
        "goal: p99 <= 100 ms: {}",
        if f99 <= 100.0 { "met" } else { "NOT met" }
    );
    drop((a, b));
}
