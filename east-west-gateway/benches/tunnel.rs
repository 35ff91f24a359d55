//! Tunnel throughput and latency next to a direct TCP path, in one run.
//!
//! `cargo bench -p east-west-gateway --bench tunnel`
//!
//! - Bulk: one tunnel (proxy TLS → egress → QUIC → ingress → backend)
//!   carries `BULK_MB` (default 256) MiB to a sink, against the same bytes
//!   over direct TCP. Three runs each, median reported.
//! - Latency: 64-byte echoes at a fixed 1000 req/s for `SECS` (default 5)
//!   seconds over one established tunnel, and over direct TCP.
//!
//! `UDP_PAYLOAD=<bytes>` raises the path-MTU ceiling (`maxUdpPayload`,
//! default 1452) on both gateways, as on a jumbo-frame network.
//!
//! Loopback only; every loop is bounded in count and time.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use east_west_gateway::Settings;
use hdrhistogram::Histogram;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = env("BULK_MB", 256) * 1024 * 1024;
    let secs = env("SECS", 5);
    let settings = Settings {
        max_udp_payload: env("UDP_PAYLOAD", 1452) as u16,
        ..Settings::default()
    };
    println!("maxUdpPayload {}", settings.max_udp_payload);
    let a = Domain::new("aws-use1", "aws.example", 1);
    let b = Domain::new("gcp-usc1", "gcp.example", 2);
    let echo = Echo::start(b.ip(10)).await;
    let sink_addr = sink(b.ip(11)).await;
    let mut rb = b.routes("usc1-a");
    rb.peers.extend([a.as_peer(vec![])]);
    export(&mut rb, "shop/echo", 8080, &[(echo.addr, "usc1-a")]);
    export(&mut rb, "shop/sink", 8080, &[(sink_addr, "usc1-a")]);
    let gw_b = start_gateway(&b, 1, false, bundles(&[&a, &b]), rb, settings.clone()).await;
    let mut ra = a.routes("use1-a");
    ra.peers.extend([b.as_peer(vec![gw_b.quic()])]);
    let gw_a = start_gateway(&a, 1, true, bundles(&[&a, &b]), ra, settings).await;
    let proxy = proxy_tls(a.workload_svid("shop", "web"), bundles(&[&a]), &a);
    let tunnel = |svc: &'static str| {
        let proxy = proxy.clone();
        let egress = gw_a.egress();
        async move {
            let (s, acc) = open_tunnel(egress, proxy, &open_msg(svc, 8080, "gcp-usc1"))
                .await
                .unwrap();
            assert_eq!(acc.status, 1, "{acc:?}");
            s
        }
    };
    let direct = |addr: SocketAddr| async move {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    };

    let (mut t, mut d) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        d.push(bulk(direct(sink_addr).await, total).await);
        t.push(bulk(tunnel("shop/sink").await, total).await);
    }
    let (t, d) = (median(t), median(d));
    println!("bulk, one stream, {} MiB, median of 3:", total >> 20);
    println!("  direct TCP     {d:7.2} Gbit/s");
    println!("  fedmesh tunnel {t:7.2} Gbit/s   ({:.2}x direct)", t / d);

    let hd = latency(direct(echo.addr).await, secs).await;
    let ht = latency(tunnel("shop/echo").await, secs).await;
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "latency, 64 B echo at 1000 req/s for {secs} s ({} samples):",
        ht.len()
    );
    println!(
        "  direct TCP     p50 {:7.1} us  p99 {:7.1} us",
        us(&hd, 0.5),
        us(&hd, 0.99)
    );
    println!(
        "  fedmesh tunnel p50 {:7.1} us  p99 {:7.1} us",
        us(&ht, 0.5),
        us(&ht, 0.99)
    );
    println!(
        "  added          p50 {:7.1} us  p99 {:7.1} us",
        us(&ht, 0.5) - us(&hd, 0.5),
        us(&ht, 0.99) - us(&hd, 0.99)
    );
}
