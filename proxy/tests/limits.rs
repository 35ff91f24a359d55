//! The app-facing listener's limits, on a real `fedmesh-proxy` process:
//! idle connections cannot starve real requests, even past the process's
//! file descriptor limit, and a client that never finishes its headers is
//! dropped at the header timeout.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fedmesh_testbed::proxy as support;
use support::gw::Domain;
use support::{Backend, ProxyProcess, get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_under_a_limit_of_1024_descriptors_stop_no_request() {
    let d = Domain::new("aws", "aws.fedmesh.test", 91);
    let backend = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::static_config(dir.path(), &d, backend.addr, false, "{}");
    let p = ProxyProcess::start_with_fd_limit(&config, "warn", 1024).await;
    let http = p.http.unwrap();
    assert_eq!(get(http, "cart.shop").await.unwrap().cluster, "aws");

    // 2,000 connections that never send a byte, held open.
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        match TcpStream::connect(http).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect {}: {e}", idle.len()),
        }
    }
    // Real requests still get through, each on a fresh connection.
    for i in 0..20 {
        let r = tokio::time::timeout(Duration::from_secs(10), get(http, "cart.shop")).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "request {i} with 2,000 idle connections open: {r:?}"
        );
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_dropped_at_the_header_timeout() {
    let d = Domain::new("aws", "aws.fedmesh.test", 92);
    let backend = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let dir = tempfile::tempdir().unwrap();
    let config = support::static_config(
        dir.path(),
        &d,
        backend.addr,
        false,
        "{downstreamHeaderTimeout: 500ms}",
    );
    let p = ProxyProcess::start(&config, "warn").await;
    let http = p.http.unwrap();
    for partial in [&b""[..], b"GET / HTTP/1.1\r\nhost: cart.shop\r\n"] {
        let mut s = TcpStream::connect(http).await.unwrap();
        s.write_all(partial).await.unwrap();
        let t = Instant::now();
        let mut buf = [0u8; 512];
        // The proxy closes it (EOF, or a 408 then EOF); bounded wait.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{partial:?}: still open after 10 s");
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{partial:?}: closed before the header timeout ({:?})",
            t.elapsed()
        );
    }
    // A client that does send its headers is served.
    assert_eq!(get(http, "cart.shop").await.unwrap().cluster, "aws");
}
