//! Scale: a controller's cold sync and memory with a large global zone, and
//! what one later change costs; then its clients: a scoped proxy (ten named
//! services, more on demand), an unscoped one (every service), and a
//! gateway (its own cluster's exports), each a real process, with how long
//! each takes to be ready and its RSS; and last, the controller restarted
//! with etcd down, from its last good view on disk alone. The same
//! measurements at a small size in the same run show what grows with the
//! federation.
//!
//! Run: `cargo bench -p fedmesh-controller --bench scale`
//! (CLUSTERS=100 SERVICES=10000 by default; SMALL_CLUSTERS=10 SMALL_SERVICES=1000;
//! CHANGES=10 per size; CONTROLLER_LOG=info shows the controller's own log).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fedmesh_api::KeySpace;
use fedmesh_test_support::{Etcd, EtcdOptions};
use fedmesh_trust::{Bundle, TrustDomain};
use fedmesh_zone::join::JoinDir;

fn env(name: &str, default: usize) -> usize {
    fedmesh_test_support::env_or(name, default)
}

async fn http_get(addr: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The published version, once ready.
async fn ready_version(admin: &str) -> Option<u64> {
    let body = http_get(admin, "/ready").await?;
    if !body.starts_with("HTTP/1.1 200") {
        return None;
    }
    body.rsplit("version ").next()?.trim().parse().ok()
}

fn rss_mb(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU time (user + system) a process has used so far.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11..13]
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

struct Measured {
    signed: bool,
    clusters: usize,
    services: usize,
    load_s: f64,
    cold_sync_s: f64,
    /// CPU seconds the controller and etcd spent during the cold sync.
    sync_cpu_s: (f64, f64),
    rss_mb: f64,
    peak_mb: f64,
    change_ms: Vec<f64>,
    clients: Clients,
    restart: Restart,
}

/// A restart from the last good view on disk, with etcd down.
#[derive(Debug, Default, Clone, Copy)]
struct Restart {
    file_mb: f64,
    /// From the process start until `/ready` reports a view.
    ready_s: f64,
    rss_mb: f64,
}

/// A discovery client's start: until it serves, and its RSS then.
#[derive(Debug, Default, Clone, Copy)]
struct Ready {
    ready_s: f64,
    rss_mb: f64,
}

#[derive(Debug, Default)]
struct Clients {
    scoped: Ready,
    /// A scoped proxy's first request to a service it does not hold, and
    /// its second (both answered 503: the bench runs no remote gateways).
    first_ms: f64,
    second_ms: f64,
    unscoped: Ready,
    gateway: Ready,
}

/// Builds the proxy and gateway binaries beside the controller's (cargo
/// bench builds only this package's), so that none is stale.
fn build_clients() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bins",
            "-p",
            "fedmesh-proxy",
            "-p",
            "fedmesh-gateway",
        ])
        .status()
        .unwrap();
    assert!(ok.success(), "building the proxy and gateway failed");
}

/// A sibling binary of the controller's.
fn binary(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_BIN_EXE_fedmesh-controller"))
        .parent()
        .unwrap()
        .join(name)
}

/// Starts `bin --config config`; returns it once it prints its listening
/// line, with how long that took and its RSS then.
fn start_client(bin: &str, config: &std::path::Path) -> (Child, Ready) {
    use std::io::BufRead;
    let started = Instant::now();
    let mut child = Command::new(binary(bin))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains(" on "), "{bin} did not start: {line:?}");
    let ready = Ready {
        ready_s: started.elapsed().as_secs_f64(),
        rss_mb: rss_mb(child.id(), "VmRSS:"),
    };
    (child, ready)
}

/// One GET through a proxy; how long until its answer's headers.
async fn time_get(proxy: &str, host: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t0 = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    tcp.read_exact(&mut first).await.unwrap();
    t0.elapsed().as_secs_f64() * 1000.0
}

/// The clients of the controller at `discovery`, one after another.
async fn measure_clients(dir: &std::path::Path, join: &JoinDir, discovery: &str, n: u8) -> Clients {
    let td = &join.cluster.trust_domain;
    let bundle = Bundle::with_roots(TrustDomain::new(td).unwrap(), [join.ca.cert_der().clone()]);
    std::fs::write(dir.join("bundle.json"), bundle.to_document()).unwrap();
    std::fs::write(
        dir.join("proxy.token"),
        "bench-proxy-token-0123456789abcdef0123",
    )
    .unwrap();
    std::fs::write(
        dir.join("gateway.token"),
        "bench-gateway-token-0123456789abcdef01",
    )
    .unwrap();
    let proxy_yaml = |name: &str, port: u16, services: &str| {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "cluster: c0\ntrustDomain: {td}\nlocality: {{cloud: cloud0, region: region0, zone: az1}}\nlisten: {{http: \"127.0.{n}.5:{port}\"}}\ngateways: []\ncontroller: {{address: \"{discovery}\", bundle: bundle.json, joinTokenFile: proxy.token, namespace: fedmesh, serviceAccount: proxy, services: {services}}}\n"
            ),
        )
        .unwrap();
        path
    };
    let named: Vec<String> = (0..10).map(|i| format!("bench/svc-{i}")).collect();
    let scoped_cfg = proxy_yaml("scoped", 4140, &format!("{named:?}"));
    let (mut scoped_child, scoped) = start_client("fedmesh-proxy", &scoped_cfg);
    let addr = format!("127.0.{n}.5:4140");
    let first_ms = time_get(&addr, "svc-20.bench").await;
    let second_ms = time_get(&addr, "svc-20.bench").await;
    let _ = scoped_child.kill();
    let _ = scoped_child.wait();

    let unscoped_cfg = proxy_yaml("unscoped", 4141, "[\"*\"]");
    let (mut child, unscoped) = start_client("fedmesh-proxy", &unscoped_cfg);
    let _ = child.kill();
    let _ = child.wait();

    let gw_cfg = dir.join("gateway.yaml");
    std::fs::write(
        &gw_cfg,
        format!(
            "cluster: c0\ntrustDomain: {td}\nzone: az1\nlisten: {{quic: \"127.0.{n}.1:0\"}}\ncontroller: {{address: \"{discovery}\", bundle: bundle.json, joinTokenFile: gateway.token}}\n"
        ),
    )
    .unwrap();
    let (mut child, gateway) = start_client("fedmesh-gateway", &gw_cfg);
    let _ = child.kill();
    let _ = child.wait();
    Clients {
        scoped,
        first_ms,
        second_ms,
        unscoped,
        gateway,
    }
}

/// One size, `signed` (every record signed, exports vouched for by signed
/// manifests, the controller checking them) or not (a federation from
/// before signing, read with `--trust-unsigned`).
async fn measure(
    signed: bool,
    clusters: usize,
    services: usize,
    changes: usize,
    n: u8,
) -> Measured {
    let etcd = Etcd::start_with(EtcdOptions {
        extra_args: vec!["--quota-backend-bytes=8589934592".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = etcd.client().await.unwrap();
    let load = Instant::now();
    let observer = match signed {
        true => register(&client, &etcd.endpoint(), "c0", 0).await,
        false => register_unsigned(&client, &etcd.endpoint(), "c0", 0).await,
    };
    let mut changer = None;
    for c in 1..clusters {
        let name = format!("c{c}");
        if signed {
            let join = register(&client, &etcd.endpoint(), &name, c).await;
            let publisher = load_exports(&mut client, &join, services).await;
            if c == 1 {
                changer = Some(publisher);
            }
        } else {
            register_unsigned(&client, &etcd.endpoint(), &name, c).await;
            load_unsigned_exports(&mut client, &name, services).await;
        }
    }
    let load_s = load.elapsed().as_secs_f64();

    let dir = tempfile::tempdir().unwrap();
    observer.write(&dir.path().join("join")).unwrap();
    std::fs::write(dir.path().join("registry.yaml"), "").unwrap();
    let td = &observer.cluster.trust_domain;
    let id = |s: String| s.parse().unwrap();
    fedmesh_zone::TokensFile::granting(
        [
            (
                "bench-proxy-token-0123456789abcdef0123",
                id(format!("spiffe://{td}/ns/fedmesh/sa/proxy")),
            ),
            (
                "bench-gateway-token-0123456789abcdef01",
                id(format!("spiffe://{td}/fedmesh/gateway/c0")),
            ),
        ],
        Duration::from_secs(3600),
    )
    .save(&dir.path().join("tokens.yaml"))
    .unwrap();
    let admin = format!("127.0.{n}.2:{}", 20000 + u16::from(n));
    let etcd_pid = etcd.pid().unwrap();
    let etcd_cpu_before = cpu_s(etcd_pid);
    let started = Instant::now();
    let (mut child, discovery) = start_controller(dir.path(), n, &admin, signed);
    let mut version = loop {
        if let Some(v) = ready_version(&admin).await {
            break v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "cold sync did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let cold_sync_s = started.elapsed().as_secs_f64();
    let rss = rss_mb(child.id(), "VmRSS:");
    let sync_cpu_s = (cpu_s(child.id()), cpu_s(etcd_pid) - etcd_cpu_before);

    // One export changes; time until the controller has published a new version.
    let keys = KeySpace::default();
    let mut change_ms = Vec::new();
    for i in 0..changes {
        let t0 = Instant::now();
        let healthy = if i % 2 == 0 { 2 } else { 3 };
        match &mut changer {
            // With the manifest that vouches for it, as its controller writes it.
            Some(p) => client
                .txn(etcd_client::Txn::new().and_then(p.put("svc-0", &summary(healthy))))
                .await
                .map(drop)
                .unwrap(),
            None => client
                .put(keys.export("c1", "bench", "svc-0"), summary(healthy), None)
                .await
                .map(drop)
                .unwrap(),
        }
        loop {
            if let Some(v) = ready_version(&admin).await
                && v > version
            {
                version = v;
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "change never published"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        change_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let last_change = std::time::SystemTime::now();
    let clients = measure_clients(dir.path(), &observer, &discovery, n).await;
    let peak = rss_mb(child.id(), "VmHWM:");

    // The last good view on disk: once it holds the last change, the
    // controller restarts while etcd is down and serves from it alone.
    let file = dir
        .path()
        .join("state")
        .join(fedmesh_zone::dump::LAST_GOOD_FILE);
    let saved = Instant::now();
    let file_mb = loop {
        if let Ok(m) = std::fs::metadata(&file)
            && m.modified().is_ok_and(|t| t > last_change)
        {
            break m.len() as f64 / 1e6;
        }
        assert!(
            saved.elapsed() < Duration::from_secs(120),
            "the last good view was never written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    let mut etcd = etcd;
    etcd.kill();
    let restarted = Instant::now();
    let (mut child, _) = start_controller(dir.path(), n, &admin, signed);
    while ready_version(&admin).await.is_none() {
        assert!(
            restarted.elapsed() < Duration::from_secs(600),
            "no restart from disk"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restart = Restart {
        file_mb,
        ready_s: restarted.elapsed().as_secs_f64(),
        rss_mb: rss_mb(child.id(), "VmRSS:"),
    };
    let _ = child.kill();
    let _ = child.wait();
    Measured {
        signed,
        clusters,
        services,
        load_s,
        cold_sync_s,
        sync_cpu_s,
        rss_mb: rss,
        peak_mb: peak,
        change_ms,
        clients,
        restart,
    }
}

/// Starts the controller of `dir` (with `--state-dir dir/state`); returns
/// it and its discovery address, from the first line it prints. The rest
/// (its log, with CONTROLLER_LOG) is passed through.
fn start_controller(dir: &std::path::Path, n: u8, admin: &str, signed: bool) -> (Child, String) {
    let log = std::env::var("CONTROLLER_LOG").ok();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_fedmesh-controller"))
        .arg("--join")
        .arg(dir.join("join"))
        .arg("--registry")
        .arg(dir.join("registry.yaml"))
        .args(["--listen", &format!("127.0.{n}.2:0"), "--admin", admin])
        .arg("--tokens")
        .arg(dir.join("tokens.yaml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args((!signed).then_some("--trust-unsigned"))
        .env("RUST_LOG", log.as_deref().unwrap_or("error"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let discovery = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.split("discovery on ").nth(1) {
            break rest.split(',').next().unwrap().to_string();
        }
        println!("{line}");
    };
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            println!("{l}");
        }
    });
    (child, discovery)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    fedmesh_trust::install_default_provider();
    build_clients();
    let changes = env("CHANGES", 10).max(1);
    let (small, large) = (
        (env("SMALL_CLUSTERS", 10), env("SMALL_SERVICES", 1000)),
        (env("CLUSTERS", 100), env("SERVICES", 10000)),
    );
    // Signed and unsigned side by side, at both sizes, in one run.
    let mut rows = Vec::new();
    for (i, (signed, (clusters, services))) in
        [(false, small), (true, small), (false, large), (true, large)]
            .into_iter()
            .enumerate()
    {
        rows.push(measure(signed, clusters, services, changes, 1 + i as u8).await);
    }
    println!(
        "| global zone | signed | exports | load into etcd (s) | cold sync (s) | CPU during sync: controller + etcd (s) | RSS after sync (MB) | peak RSS (MB) | one change, median (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in rows.iter_mut() {
        let med = median(&mut m.change_ms);
        println!(
            "| {} clusters x {} services | {} | {} | {:.1} | {:.2} | {:.2} + {:.2} | {:.0} | {:.0} | {:.1} |",
            m.clusters,
            m.services,
            if m.signed { "yes" } else { "no" },
            (m.clusters - 1) * m.services,
            m.load_s,
            m.cold_sync_s,
            m.sync_cpu_s.0,
            m.sync_cpu_s.1,
            m.rss_mb,
            m.peak_mb,
            med
        );
    }
    for signed in [false, true] {
        let of = |size: usize| {
            rows.iter()
                .filter(|m| m.signed == signed)
                .nth(size)
                .unwrap()
        };
        let (s, l) = (of(0), of(1));
        let ratio = median(&mut l.change_ms.clone()) / median(&mut s.change_ms.clone());
        let size_ratio =
            ((l.clusters - 1) * l.services) as f64 / ((s.clusters - 1) * s.services) as f64;
        println!(
            "{}: one change costs {ratio:.1}x more at {size_ratio:.0}x the size (O(change) would be ~1x)",
            if signed { "signed" } else { "unsigned" }
        );
    }
    let (u, g) = (&rows[2], &rows[3]);
    println!(
        "signed / unsigned at the large size: cold sync {:.2}x, RSS {:.2}x, one change {:.2}x",
        g.cold_sync_s / u.cold_sync_s,
        g.rss_mb / u.rss_mb,
        median(&mut g.change_ms.clone()) / median(&mut u.change_ms.clone())
    );
    println!();
    println!(
        "| global zone | signed | last good view on disk (MB) | restart with etcd down: ready (s) | cold sync from etcd (s) | restart / cold sync | RSS after restart (MB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for m in &rows {
        println!(
            "| {} clusters x {} services | {} | {:.1} | {:.2} | {:.2} | {:.2}x | {:.0} |",
            m.clusters,
            m.services,
            if m.signed { "yes" } else { "no" },
            m.restart.file_mb,
            m.restart.ready_s,
            m.cold_sync_s,
            m.restart.ready_s / m.cold_sync_s,
            m.restart.rss_mb,
        );
    }
    println!();
    println!(
        "| global zone | scoped proxy (10 services): ready (s) | RSS (MB) | first request to an unheld service (ms) | second (ms) | unscoped proxy: ready (s) | RSS (MB) | gateway: ready (s) | RSS (MB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in &rows {
        let c = &m.clients;
        println!(
            "| {} clusters x {} services{} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2} | {:.1} |",
            m.clusters,
            m.services,
            if m.signed { ", signed" } else { "" },
            c.scoped.ready_s,
            c.scoped.rss_mb,
            c.first_ms,
            c.second_ms,
            c.unscoped.ready_s,
            c.unscoped.rss_mb,
            c.gateway.ready_s,
            c.gateway.rss_mb,
        );
    }
}
