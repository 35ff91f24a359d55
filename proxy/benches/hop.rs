//! One proxy hop: the added latency of a real `fedmesh-proxy` process
//! between an HTTP client and its backend, and the proxy's memory, at a
//! fixed 1000 req/s.
//!
//! The load is open-loop: request i is due at start + i ms whatever
//! happened before (a thread of its own paces them), and its latency runs
//! from when it was due, so a stall
//! is charged to every request it delays (no coordinated omission). Keep-
//! alive connections (`CONNS`, default 32) take due requests from a queue.
//! The direct path, the proxy and a peer doing the same hop (Debian's
//! haproxy in HTTP mode, installed when missing) alternate for `ROUNDS`
//! rounds of `SECS` seconds each; the report gives each path's median p50
//! and p99 over the rounds, and what each hop adds to the direct path.
//!
//! A second proxy process runs beside the first with `POLICIES` services
//! (1000 by default), each carrying a global traffic policy (a header
//! route, cluster weights, retries, timeouts, outlier settings); the
//! requests go to one of them, through its route check and weighted draw.
//!
//! `cargo bench -p fedmesh-proxy --bench hop` (`SECS=5 ROUNDS=3 RATE=1000 CONNS=32 POLICIES=1000`).

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::proxy as support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use support::gw::Domain;
use support::{Backend, Client};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

fn env(name: &str, default: u64) -> u64 {
    fedmesh_test_support::env_or(name, default)
}

/// Requests due every `1/rate` s for `secs`, answered by `conns`
/// keep-alive clients; latency from when each was due.
async fn open_loop(
    target: SocketAddr,
    host: &str,
    rate: u64,
    secs: u64,
    conns: usize,
) -> Histogram<u64> {
    let (tx, rx) = mpsc::channel::<Instant>(100_000);
    let rx = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (rx, host) = (rx.clone(), host.to_string());
        let mut client = Client::connect(target).await.unwrap();
        workers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut failed = 0u64;
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { break };
                match client.get(&host).await {
                    Ok(_) => h.record(due.elapsed().as_nanos() as u64).unwrap(),
                    Err(_) => failed += 1,
                }
            }
            (h, failed)
        }));
    }
    // A thread of its own paces the requests: tokio's timer fires up to a
    // millisecond late, which would swamp what is measured. It sleeps to
    // just before each due time and spins the rest.
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(10);
        for i in 0..rate * secs {
            let due = start + period * u32::try_from(i).unwrap();
            let early = due.saturating_duration_since(Instant::now());
            if early > Duration::from_micros(200) {
                std::thread::sleep(early - Duration::from_micros(200));
            }
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            tx.blocking_send(due).unwrap();
        }
    });
    tokio::task::spawn_blocking(move || pacer.join().unwrap())
        .await
        .unwrap();
    let mut all = Histogram::<u64>::new(3).unwrap();
    let mut failed = 0;
    for w in workers {
        let (h, f) = w.await.unwrap();
        all.add(h).unwrap();
        failed += f;
    }
    assert_eq!(failed, 0, "requests failed during the run");
    all
}

/// Debian's haproxy as the same HTTP hop: one thread, keep-alive both
/// ways, upstream connections reused.
async fn haproxy_hop(
    dir: &std::path::Path,
    ip: std::net::IpAddr,
    backend: SocketAddr,
) -> (SocketAddr, tokio::process::Child) {
    fedmesh_test_support::ensure_haproxy();
    let entry = std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = format!(
        "global\n  nbthread 1\n  maxconn 1000\ndefaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten hop\n  bind {entry}\n  server b {backend}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = tokio::process::Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(entry).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "haproxy did not listen on {entry}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (entry, child)
}

/// `config` with `n` more services beside `shop/cart` (all served by
/// `backend`), and a policy for every service.
fn with_policies(
    config: &std::path::Path,
    n: u64,
    backend: SocketAddr,
    cluster: &str,
) -> std::path::PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let (head, settings) = text.split_once("settings:").unwrap();
    let mut out = head.to_string();
    for i in 0..n {
        out.push_str(&format!(
            "  - name: shop/svc-{i}\n    port: 8080\n    endpoints: [{{address: \"{backend}\", zone: az1}}]\n"
        ));
    }
    out.push_str("policies:\n");
    let services = std::iter::once("cart".to_string()).chain((0..n).map(|i| format!("svc-{i}")));
    for s in services {
        out.push_str(&format!(
            "  - apiVersion: fedmesh.io/v1\n    kind: GlobalTrafficPolicy\n    metadata: {{name: {s}}}\n    spec:\n      service: shop/{s}\n      weights: {{{cluster}: 90, other: 10}}\n      routes:\n        - match: {{headers: {{x-canary: {{exact: \"1\"}}}}}}\n          to: [{{service: shop/{s}}}]\n      requestTimeout: 5s\n      retries: 1\n      outlier: {{consecutiveFailures: 3}}\n"
        ));
    }
    out.push_str("settings:");
    out.push_str(settings);
    let path = config.with_file_name("proxy-policies.yaml");
    std::fs::write(&path, out).unwrap();
    path
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = env("SECS", 5);
    let rounds = env("ROUNDS", 3);
    let rate = env("RATE", 1000);
    let conns = usize::try_from(env("CONNS", 32)).unwrap();
    let policies = env("POLICIES", 1000);

    let d = Domain::new("aws", "aws.fedmesh.test", 81);
    let backend = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::static_config(dir.path(), &d, backend.addr, false, "{}");
    let child = support::ProxyProcess::start(&config, "warn").await;
    let (proxy, mut child) = (child.http.unwrap(), child.child);
    let pid = child.id().unwrap();
    let (idle_rss, _) = fedmesh_test_support::rss_kb(pid);
    let (haproxy, _haproxy) = haproxy_hop(dir.path(), d.ip(6), backend.addr).await;
    let many = with_policies(
        &config,
        policies.saturating_sub(1),
        backend.addr,
        &d.cluster,
    );
    let many = support::ProxyProcess::start(&many, "warn").await;
    let (policed, mut many_child) = (many.http.unwrap(), many.child);
    let policed_pid = many_child.id().unwrap();

    // Warm both paths (connections, allocator, EWMA).
    open_loop(backend.addr, "cart.shop", rate, 1, conns).await;
    open_loop(proxy, "cart.shop", rate, 1, conns).await;
    open_loop(haproxy, "cart.shop", rate, 1, conns).await;
    open_loop(policed, "cart.shop", rate, 1, conns).await;

    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (mut d50, mut d99, mut p50, mut p99) = (vec![], vec![], vec![], vec![]);
    let (mut h50, mut h99) = (vec![], vec![]);
    let (mut m50, mut m99) = (vec![], vec![]);
    let mut rss_max = 0;
    println!("{rounds} rounds of {secs} s at {rate} req/s over {conns} keep-alive connections");
    for round in 1..=rounds {
        let direct = open_loop(backend.addr, "cart.shop", rate, secs, conns).await;
        // Sample the proxy's memory while it is under load.
        let sampler = tokio::spawn(async move {
            let mut max = 0;
            for _ in 0..secs * 4 {
                tokio::time::sleep(Duration::from_millis(250)).await;
                max = max.max(fedmesh_test_support::rss_kb(pid).0);
            }
            max
        });
        let proxied = open_loop(proxy, "cart.shop", rate, secs, conns).await;
        rss_max = rss_max.max(sampler.await.unwrap());
        let peer = open_loop(haproxy, "cart.shop", rate, secs, conns).await;
        let policed_run = open_loop(policed, "cart.shop", rate, secs, conns).await;
        println!(
            "round {round}: p50/p99 µs: direct {:.1}/{:.1} | fedmesh-proxy {:.1}/{:.1} | with {policies} policies {:.1}/{:.1} | haproxy {:.1}/{:.1} ({} samples each)",
            us(&direct, 0.5),
            us(&direct, 0.99),
            us(&proxied, 0.5),
            us(&proxied, 0.99),
            us(&policed_run, 0.5),
            us(&policed_run, 0.99),
            us(&peer, 0.5),
            us(&peer, 0.99),
            direct.len(),
        );
        m50.push(us(&policed_run, 0.5));
        m99.push(us(&policed_run, 0.99));
        h50.push(us(&peer, 0.5));
        h99.push(us(&peer, 0.99));
        d50.push(us(&direct, 0.5));
        d99.push(us(&direct, 0.99));
        p50.push(us(&proxied, 0.5));
        p99.push(us(&proxied, 0.99));
    }
    let (d50, d99, p50, p99) = (median(d50), median(d99), median(p50), median(p99));
    let (h50, h99) = (median(h50), median(h99));
    let (m50, m99) = (median(m50), median(m99));
    let (_, hwm) = fedmesh_test_support::rss_kb(pid);
    println!("median over rounds:");
    println!("  direct  p50 {d50:.1} µs  p99 {d99:.1} µs");
    println!("  fedmesh-proxy  p50 {p50:.1} µs  p99 {p99:.1} µs");
    println!("  haproxy        p50 {h50:.1} µs  p99 {h99:.1} µs");
    println!(
        "  added by fedmesh-proxy  p50 {:+.1} µs  p99 {:+.1} µs   (goal: p99 ≤ +200 µs)",
        p50 - d50,
        p99 - d99
    );
    println!(
        "  added by fedmesh-proxy with {policies} policies  p50 {:+.1} µs  p99 {:+.1} µs",
        m50 - d50,
        m99 - d99
    );
    println!(
        "  added by haproxy        p50 {:+.1} µs  p99 {:+.1} µs",
        h50 - d50,
        h99 - d99
    );
    println!(
        "proxy RSS: {:.1} MB idle, {:.1} MB max under load, {:.1} MB peak (goal ≤ 12 MB)",
        idle_rss as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "proxy with {policies} policies: RSS {:.1} MB",
        fedmesh_test_support::rss_kb(policed_pid).0 as f64 / 1024.0
    );
    let _ = child.start_kill();
    let _ = many_child.start_kill();
}
