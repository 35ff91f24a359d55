//! Cross-cluster throughput and latency, every path side by side in one
//! run, each hop a real process:
//!
//! `cargo build --release --bins && cargo bench -p fedmesh-gateway --bench tunnel`
//! (the first builds `fedmesh-proxy`, which this bench runs).
//!
//! - **direct QUIC** (`egress: direct`): app → `fedmesh-proxy` → QUIC →
//!   B's ingress gateway → backend. One encryption, two processes.
//! - **egress path** (`egress: gateway`): app → `fedmesh-proxy` → TLS →
//!   A's egress gateway → QUIC → B's ingress → backend. Two encryptions,
//!   three processes.
//! - **HAProxy chain** (Debian's haproxy, installed by `scripts/setup.sh
//!   haproxy` when missing): one instance in A originates mutual TLS 1.3, a
//!   second in B terminates it, with the same CAs. One encryption, two
//!   processes.
//! - **direct TCP**, the floor.
//!
//! Bulk: one connection carries `BULK_MB` (default 256) MiB to a sink;
//! three runs each, interleaved, median reported. Latency: 64-byte echoes
//! at a fixed 1000 req/s for `SECS` (default 5) seconds over one
//! established connection per path. Proxy memory: each proxy's resident
//! set after its latency run, and its peak.
//!
//! `GATEWAYS=inproc` runs the two gateways inside the bench process
//! instead of as `fedmesh-gateway` processes.
//!
//! `ONLY=quic` (or `egress`, `direct`, `haproxy`) runs one path's bulk test
//! alone, for profiling; no ratios are printed then.
//!
//! `UDP_PAYLOAD=<bytes>` raises the path-MTU ceiling (`maxUdpPayload`,
//! default 1452) on the gateways and the proxies, as on a jumbo-frame
//! network.
//!
//! Loopback only; every loop is bounded in count and time.
#![allow(clippy::unwrap_used)]

use fedmesh_testbed::gateway as support;

use std::net::SocketAddr;
use std::time::Duration;

use fedmesh_gateway::Settings;
use fedmesh_testbed::proxy::{ProxyProcess, remote_config};
use hdrhistogram::Histogram;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn env(name: &str, default: u64) -> u64 {
    fedmesh_test_support::env_or(name, default)
}

/// Reads until EOF, then answers with the byte count.
async fn sink(ip: std::net::IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, total: u64) -> f64 {
    let buf = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf).await.unwrap();
        sent += buf.len() as u64;
    }
    s.shutdown().await.unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await.unwrap();
    assert_eq!(u64::from_be_bytes(n), sent);
    (sent * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
}

async fn latency<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, secs: u64) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        tick.tick().await;
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        h.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    h
}

fn free_port(ip: std::net::IpAddr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Two haproxy processes: `origin` (in A) → TLS → `term` (in B) → backend,
/// one chain per backend. Returns the chains' entry addresses.
async fn haproxy_chain(
    dir: &std::path::Path,
    a: &Domain,
    b: &Domain,
    backends: &[SocketAddr],
) -> (Vec<SocketAddr>, Vec<tokio::process::Child>) {
    fedmesh_test_support::ensure_haproxy();
    let pem = |name: &str, svid: &fedmesh_trust::Svid| {
        let path = dir.join(name);
        std::fs::write(&path, format!("{}{}", svid.chain_pem(), svid.key_pem())).unwrap();
        path.display().to_string()
    };
    let client = pem("origin.pem", &a.workload_svid("shop", "web"));
    let server = pem("term.pem", &b.gateway_svid());
    let a_ca = dir.join("a-ca.pem");
    std::fs::write(&a_ca, a.ca.cert_pem()).unwrap();
    let b_ca = dir.join("b-ca.pem");
    std::fs::write(&b_ca, b.ca.cert_pem()).unwrap();
    let head = "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let (mut origin, mut term, mut entries) = (head.to_string(), head.to_string(), Vec::new());
    for (i, backend) in backends.iter().enumerate() {
        let entry = free_port(a.ip(30));
        let hop = free_port(b.ip(30));
        origin += &format!(
            "listen o{i}\n  bind {entry}\n  server t {hop} ssl verify required ca-file {} crt {client} ssl-min-ver TLSv1.3\n",
            b_ca.display()
        );
        term += &format!(
            "listen t{i}\n  bind {hop} ssl crt {server} verify required ca-file {} ssl-min-ver TLSv1.3\n  server b {backend}\n",
            a_ca.display()
        );
        entries.push(entry);
    }
    let mut children = Vec::new();
    for (name, cfg) in [("origin.cfg", origin), ("term.cfg", term)] {
        let path = dir.join(name);
        std::fs::write(&path, cfg).unwrap();
        children.push(
            tokio::process::Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&path)
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    for e in &entries {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(e).await.is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen on {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (entries, children)
}

/// Held until the end of the run.
#[allow(dead_code)]
enum Gateways {
    InProcess(Box<[Gw; 2]>),
    Processes(Box<[GatewayProcess; 2]>),
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = env("BULK_MB", 256) * 1024 * 1024;
    let secs = env("SECS", 5);
    let payload = env("UDP_PAYLOAD", 1452);
    println!("maxUdpPayload {payload}");
    let settings = fedmesh_gateway::Settings {
        max_udp_payload: payload as u16,
        ..Default::default()
    };
    let a = Domain::new("aws-use1", "aws.example", 1);
    let b = Domain::new("gcp-usc1", "gcp.example", 2);
    let echo = Echo::start(b.ip(10)).await;
    let sink_addr = sink(b.ip(11)).await;
    let dir = tempfile::tempdir().unwrap();
    let services = [("shop/echo", echo.addr), ("shop/sink", sink_addr)];
    // By default both gateways are real `fedmesh-gateway` processes, as the
    // haproxy instances are. GATEWAYS=inproc runs them in this process
    // instead, which leaves out the cost of waking other processes.
    let inproc = std::env::var("GATEWAYS").is_ok_and(|v| v == "inproc");
    println!(
        "gateways: {}",
        if inproc {
            "in the bench process"
        } else {
            "separate processes"
        }
    );
    let (egress, _gateways) = if inproc {
        let s = Settings {
            max_udp_payload: payload as u16,
            ..Settings::default()
        };
        let mut rb = b.routes("z1");
        rb.peers.extend([a.as_peer(vec![])]);
        for (name, addr) in services {
            export(&mut rb, name, 8080, &[(addr, "z1")]);
        }
        let gw_b = start_gateway(&b, 1, false, bundles(&[&a, &b]), rb, s.clone()).await;
        let mut ra = a.routes("z1");
        ra.peers.extend([b.as_peer(vec![gw_b.quic()])]);
        let gw_a = start_gateway(&a, 1, true, bundles(&[&a, &b]), ra, s).await;
        (gw_a.egress(), Gateways::InProcess(Box::new([gw_a, gw_b])))
    } else {
        let gw_b = GatewayProcess::spawn(
            dir.path(),
            &b,
            1,
            &[(&a, vec![])],
            &services,
            false,
            settings.clone(),
        )
        .await;
        let gw_a = GatewayProcess::spawn(
            dir.path(),
            &a,
            1,
            &[(&b, vec![gw_b.quic])],
            &[],
            true,
            settings.clone(),
        )
        .await;
        (
            gw_a.egress.unwrap(),
            Gateways::Processes(Box::new([gw_a, gw_b])),
        )
    };
    let gw_b_quic = match &_gateways {
        Gateways::InProcess(g) => g[1].quic(),
        Gateways::Processes(g) => g[1].quic,
    };
    // The two proxies of A, as processes: one opens QUIC to B's gateway
    // itself, one goes through A's egress. Listeners: sink, then echo.
    // Fresh ones for the latency run, whose memory is measured: the bulk
    // runs leave buffers behind that say nothing of 1000 req/s.
    let proxies = || async {
        let services = ["shop/sink", "shop/echo"];
        let quic = ProxyProcess::start(
            &remote_config(
                dir.path(),
                &a,
                &b,
                &[gw_b_quic],
                None,
                &services,
                payload as u16,
            ),
            "warn",
        )
        .await;
        let egress = ProxyProcess::start(
            &remote_config(
                dir.path(),
                &a,
                &b,
                &[gw_b_quic],
                Some(egress),
                &services,
                payload as u16,
            ),
            "warn",
        )
        .await;
        (quic, egress)
    };
    let (quic_proxy, egress_proxy) = proxies().await;
    let (quic, via_egress) = (quic_proxy.tcp.clone(), egress_proxy.tcp.clone());
    let direct = |addr: SocketAddr| async move {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    };

    if let Ok(only) = std::env::var("ONLY") {
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(match only.as_str() {
                "direct" => bulk(direct(sink_addr).await, total).await,
                "quic" => bulk(direct(quic[0]).await, total).await,
                "egress" => bulk(direct(via_egress[0]).await, total).await,
                "haproxy" => {
                    let dir = tempfile::tempdir().unwrap();
                    let (chain, _h) = haproxy_chain(dir.path(), &a, &b, &[sink_addr]).await;
                    bulk(direct(chain[0]).await, total).await
                }
                other => panic!("ONLY={other}: use quic, egress, direct or haproxy"),
            });
        }
        println!("{only}: {:.2} Gbit/s (median of 3)", median(runs));
        return;
    }

    let (chain, _haproxy) = haproxy_chain(dir.path(), &a, &b, &[sink_addr, echo.addr]).await;

    let (mut q, mut e, mut d, mut h) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        d.push(bulk(direct(sink_addr).await, total).await);
        h.push(bulk(direct(chain[0]).await, total).await);
        q.push(bulk(direct(quic[0]).await, total).await);
        e.push(bulk(direct(via_egress[0]).await, total).await);
    }
    let (q, e, d, h) = (median(q), median(e), median(d), median(h));
    println!("bulk, one connection, {} MiB, median of 3:", total >> 20);
    println!("  direct TCP           {d:7.2} Gbit/s");
    println!("  HAProxy TLS chain    {h:7.2} Gbit/s");
    for (name, x) in [("fedmesh direct QUIC", q), ("fedmesh egress path", e)] {
        println!(
            "  {name:<20} {x:7.2} Gbit/s   ({:.2}x direct, {:.2}x HAProxy)",
            x / d,
            x / h
        );
    }

    drop((quic_proxy, egress_proxy));
    let (quic_proxy, egress_proxy) = proxies().await;
    let (quic, via_egress) = (quic_proxy.tcp.clone(), egress_proxy.tcp.clone());
    let hd = latency(direct(echo.addr).await, secs).await;
    let hh = latency(direct(chain[1]).await, secs).await;
    let hq = latency(direct(quic[1]).await, secs).await;
    let rss_quic = fedmesh_test_support::rss_kb(quic_proxy.child.id().unwrap_or(0));
    let he = latency(direct(via_egress[1]).await, secs).await;
    let rss_egress = fedmesh_test_support::rss_kb(egress_proxy.child.id().unwrap_or(0));
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "latency, 64 B echo at 1000 req/s for {secs} s ({} samples):",
        hq.len()
    );
    for (name, x) in [
        ("direct TCP", &hd),
        ("HAProxy TLS chain", &hh),
        ("fedmesh direct QUIC", &hq),
        ("fedmesh egress path", &he),
    ] {
        println!(
            "  {name:<20} p50 {:7.1} us  p99 {:7.1} us  (added p50 {:6.1}, p99 {:6.1})",
            us(x, 0.5),
            us(x, 0.99),
            us(x, 0.5) - us(&hd, 0.5),
            us(x, 0.99) - us(&hd, 0.99)
        );
    }
    let mb = |kb: u64| kb as f64 / 1024.0;
    for (name, (now, peak)) in [("direct QUIC", rss_quic), ("egress path", rss_egress)] {
        println!(
            "proxy RSS, {name}: {:.1} MB after 1000 req/s, {:.1} MB peak (goal ≤ 12 MB)",
            mb(now),
            mb(peak)
        );
    }
}
