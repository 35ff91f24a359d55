//! What a QUIC Retry costs a new peer connection: fresh handshakes to an
//! ingress that never retries, and to one that always does, interleaved
//! in one run (same machine, same moment). The ratio is the price of
//! `addressValidation: always`; `auto` pays it only during a flood.
//!
//! `cargo bench -p fedmesh-gateway --bench handshake`
//!
//! `N` handshakes to each (default 300). Loopback only; bounded by `N`.
#![allow(clippy::unwrap_used)]

use fedmesh_testbed::gateway as support;

use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_gateway::validate::AddressValidation;
use fedmesh_gateway::{Settings, quic};
use hdrhistogram::Histogram;
use support::*;
use tokio::sync::watch;
use tokio::time::Instant;

/// One full handshake from a fresh client endpoint, in microseconds.
async fn handshake(
    from: &Domain,
    to: &Domain,
    at: SocketAddr,
    bundles: fedmesh_trust::BundleSet,
) -> u64 {
    let endpoint = quinn::Endpoint::client(SocketAddr::new(from.ip(60), 0)).unwrap();
    let (_s, svid) = watch::channel(Arc::new(from.gateway_svid()));
    let (_b, bundles) = watch::channel(Arc::new(bundles));
    let transport = Arc::new(quic::transport(&Settings::default()).unwrap());
    let cfg = quic::client_config(svid, bundles, to.gateway_id(), transport).unwrap();
    let started = Instant::now();
    let conn = endpoint.connect_with(cfg, at, "gw").unwrap().await.unwrap();
    let took = started.elapsed();
    conn.close(0u32.into(), b"bench");
    endpoint.wait_idle().await;
    u64::try_from(took.as_micros()).unwrap_or(u64::MAX)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    fedmesh_trust::install_default_provider();
    let n = fedmesh_test_support::env_or("N", 300);
    let a = Domain::new("aws-use1", "aws.example", 1);
    let b = Domain::new("gcp-usc1", "gcp.example", 2);
    let gateway = |host, validation| {
        let mut routes = b.routes("usc1-a");
        routes.peers.extend([a.as_peer(vec![])]);
        start_gateway(
            &b,
            host,
            false,
            bundles(&[&a, &b]),
            routes,
            Settings {
                address_validation: validation,
                // The bench's own connections are no flood.
                max_connections_per_peer: 100_000,
                ..Settings::default()
            },
        )
    };
    let never = gateway(1, AddressValidation::Never).await;
    let always = gateway(3, AddressValidation::Always).await;
    let mut plain = Histogram::<u64>::new(3).unwrap();
    let mut retried = Histogram::<u64>::new(3).unwrap();
    for _ in 0..n {
        plain
            .record(handshake(&a, &b, never.quic(), bundles(&[&a, &b])).await)
            .unwrap();
        retried
            .record(handshake(&a, &b, always.quic(), bundles(&[&a, &b])).await)
            .unwrap();
    }
    assert!(always.sample("fedmesh_gateway_address_validations_total") >= n as f64);
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    println!("handshakes: {n} to each ingress, interleaved");
    println!("{:<22} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!(
        "{:<22} {:>10.3} {:>10.3}",
        "no Retry",
        q(&plain, 0.5),
        q(&plain, 0.99)
    );
    println!(
        "{:<22} {:>10.3} {:>10.3}",
        "Retry (always)",
        q(&retried, 0.5),
        q(&retried, 0.99)
    );
    println!(
        "ratio p50 {:.2}, p99 {:.2}",
        q(&retried, 0.5) / q(&plain, 0.5),
        q(&retried, 0.99) / q(&plain, 0.99)
    );
}
