//! The proxy as an HTTP proxy, over real sockets: h2c with multiplexing,
//! unknown hosts, breakers, which failures are retried (and which are not),
//! upgrades, and TCP listeners with connect-time failover.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::proxy as support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::ServiceKey;
use fedmesh_proxy::config::{Common, Listen, Settings, TcpListen};
use fedmesh_proxy::table::{ServiceSpec, Table};
use fedmesh_test_support::eventually;
use http_body_util::{BodyExt, Empty, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::gw::{Domain, Echo, bundles};
use support::{Backend, Reach, get, start_proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn spec(name: &str, endpoints: &[SocketAddr]) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey::new("shop", name),
        port: 8080,
        local: endpoints
            .iter()
            .map(|a| fedmesh_api::Endpoint {
                address: *a,
                zone: "az1".into(),
                healthy: true,
            })
            .collect(),
        remote: vec![],
        policy: None,
    }
}

/// A backend that reads one request head, then does `then` with the
/// socket; counts the connections it took.
async fn raw_backend<F, Fut>(ip: std::net::IpAddr, then: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let then = Arc::new(then);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let then = then.clone();
            tokio::spawn(async move {
                read_head(&mut s).await;
                then(s).await;
            });
        }
    });
    (addr, n)
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_multiplex_on_one_connection() {
    let d = Domain::new("aws", "aws.fedmesh.test", 61);
    let b = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let (p, _t) = start_proxy(
        &d,
        "az1",
        &[spec("cart", &[b.addr])],
        Reach::nowhere(),
        bundles(&[&d]),
        Settings::default(),
    )
    .await;
    let tcp = TcpStream::connect(p.http.unwrap()).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let calls = (0..20).map(|_| {
        let mut tx = tx.clone();
        async move {
            let req = Request::get("http://cart.shop.svc.cluster.local/x")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let r = tx.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            r.into_body().collect().await.unwrap().to_bytes()
        }
    });
    for body in futures_join_all(calls).await {
        assert!(String::from_utf8_lossy(&body).contains(r#""cluster":"aws""#));
    }
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_is_a_404_that_says_so() {
    let d = Domain::new("aws", "aws.fedmesh.test", 62);
    let (p, _t) = start_proxy(
        &d,
        "az1",
        &[],
        Reach::nowhere(),
        bundles(&[&d]),
        Settings::default(),
    )
    .await;
    let e = get(p.http.unwrap(), "nope.shop").await.unwrap_err();
    assert!(e.starts_with("404"), "{e}");
    assert!(
        e.contains("no service is named by host \"nope.shop\""),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tripped_breaker_answers_503_naming_its_reason() {
    let d = Domain::new("aws", "aws.fedmesh.test", 63);
    // A backend that never answers: the first request stays pending.
    let (silent, taken) = raw_backend(d.ip(10), |s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let settings = Settings {
        max_pending_requests: 1,
        ..Default::default()
    };
    let (p, _t) = start_proxy(
        &d,
        "az1",
        &[spec("slow", &[silent])],
        Reach::nowhere(),
        bundles(&[&d]),
        settings,
    )
    .await;
    let http = p.http.unwrap();
    let first = tokio::spawn(async move { get(http, "slow.shop").await });
    // Once the backend has its connection, the first request holds the one
    // pending slot until it times out.
    eventually(
        "the first request to reach the backend",
        Duration::from_secs(10),
        || async { (taken.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    let tcp = TcpStream::connect(http).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::get("/")
                .header("host", "slow.shop")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-fedmesh-overloaded"],
        "max-pending-requests"
    );
    assert_eq!(resp.headers()["x-fedmesh-error"], "overloaded");
    first.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_a_body_is_not_replayed_but_a_get_is_retried_elsewhere() {
    let d = Domain::new("aws", "aws.fedmesh.test", 64);
    // In our zone, so tried first: reads the request, then hangs up.
    let (rude, taken) = raw_backend(d.ip(10), |s| async move { drop(s) }).await;
    let good = Backend::new(d.ip(11), "aws", "az2", "cart").await;
    let mut cart = spec("cart", &[rude, good.addr]);
    cart.local[1].zone = "az2".into();
    let (p, _t) = start_proxy(
        &d,
        "az1",
        &[cart],
        Reach::nowhere(),
        bundles(&[&d]),
        Settings::default(),
    )
    .await;
    let http = p.http.unwrap();

    // The POST's body reached the rude backend: it is not sent again, and
    // the 502 names the backend.
    let tcp = TcpStream::connect(http).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/")
        .header("host", "cart.shop")
        .body(Full::new(Bytes::from_static(b"an order")))
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-fedmesh-error"], "upstream-failed");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains(&rude.to_string()),
        "{body:?}"
    );
    assert_eq!(taken.load(Ordering::SeqCst), 1);

    // A GET that meets it is retried in the other zone: none fails.
    for _ in 0..10 {
        assert_eq!(get(http, "cart.shop").await.unwrap().zone, "az2");
    }
    assert!(
        taken.load(Ordering::SeqCst) > 1,
        "GETs went to the rude backend first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_pass_through() {
    let d = Domain::new("aws", "aws.fedmesh.test", 65);
    let (backend, _) = raw_backend(d.ip(10), |mut s| async move {
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let (p, _t) = start_proxy(
        &d,
        "az1",
        &[spec("chat", &[backend])],
        Reach::nowhere(),
        bundles(&[&d]),
        Settings::default(),
    )
    .await;
    let mut s = TcpStream::connect(p.http.unwrap()).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: chat.shop\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    s.write_all(b"ping over the upgraded connection")
        .await
        .unwrap();
    let mut back = [0u8; 33];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping over the upgraded connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_fails_over_at_connect_time() {
    let d = Domain::new("aws", "aws.fedmesh.test", 66);
    let echo = Echo::start(d.ip(11)).await;
    // Nothing listens here.
    let dead = {
        let l = std::net::TcpListener::bind((d.ip(10), 0)).unwrap();
        l.local_addr().unwrap()
    };
    let common = Common {
        me: support::me(&d, "az1"),
        listen: Listen {
            http: None,
            tcp: vec![TcpListen {
                address: SocketAddr::new(d.ip(5), 0),
                service: ServiceKey::new("shop", "db"),
            }],
            admin: None,
        },
        gateways: vec![],
        settings: Settings::default(),
    };
    let table = Table::build(
        "aws",
        &common.me.locality,
        &common.settings,
        &[spec("db", &[dead, echo.addr])],
    );
    let (_t, table) = watch::channel(Arc::new(table));
    let (_s, svid) = watch::channel(Arc::new(d.workload_svid("shop", "web")));
    let (_b, b) = watch::channel(Arc::new(bundles(&[&d])));
    let p = fedmesh_proxy::Proxy::start(&common, table, svid, b)
        .await
        .unwrap();
    for i in 0..10 {
        let mut s = TcpStream::connect(p.tcp[0]).await.unwrap();
        let msg = format!("query {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    assert_eq!(echo.accepted(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_backend_costs_one_try_timeout_and_then_the_request_timeout() {
    let d = Domain::new("aws", "aws.fedmesh.test", 68);
    let (silent, taken) = raw_backend(d.ip(10), |s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let good = Backend::new(d.ip(11), "aws", "az2", "cart").await;
    let settings = Settings {
        per_try_timeout: Some(Duration::from_millis(200)),
        request_timeout: Duration::from_millis(1500),
        ..Default::default()
    };
    // The silent one is in our zone, so it is tried first.
    let mut cart = spec("cart", &[silent, good.addr]);
    cart.local[1].zone = "az2".into();
    let (p, table) = start_proxy(
        &d,
        "az1",
        &[cart],
        Reach::nowhere(),
        bundles(&[&d]),
        settings,
    )
    .await;
    let http = p.http.unwrap();
    let t = tokio::time::Instant::now();
    assert_eq!(get(http, "cart.shop").await.unwrap().zone, "az2");
    assert_eq!(taken.load(Ordering::SeqCst), 1);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "the try ran to its timeout"
    );

    // With only the silent backend, its one try times out: a 504.
    table.update(&[spec("cart", &[silent])]);
    let e = get(http, "cart.shop").await.unwrap_err();
    assert!(e.starts_with("504") && e.contains("per-try timeout"), "{e}");

    // Without a per-try timeout, the request ends at its own.
    let settings = Settings {
        request_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let (p, _t) = start_proxy(
        &d,
        "az1",
        &[spec("cart", &[silent])],
        Reach::nowhere(),
        bundles(&[&d]),
        settings,
    )
    .await;
    let t = tokio::time::Instant::now();
    let e = get(p.http.unwrap(), "cart.shop").await.unwrap_err();
    assert!(e.starts_with("504"), "{e}");
    assert!(e.contains("request timeout (500 ms)"), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(500));
}
