//! Failover under steady GET load, over real sockets: real HTTP backends,
//! real gateways (QUIC, mutual TLS, each cluster its own CA) and the proxy
//! in this process. No GET may fail while a zone, or every local backend,
//! goes away; traffic returns only after the failback window.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::proxy as support;

use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_proxy::config::{OutlierSettings, Settings};
use fedmesh_proxy::table::{RemoteCluster, ServiceSpec};
use fedmesh_tunnel::peers::Peers;
use support::gw::{Domain, Gw, bundles, export, start_gateway};
use support::{Backend, Load, Reach, get, start_proxy};
use tokio::time::Instant;

const CART: &str = "cart.shop.svc.clusterset.local";

fn local(backends: &[&Backend], zones: &[&str], healthy: bool) -> Vec<fedmesh_api::Endpoint> {
    backends
        .iter()
        .zip(zones)
        .map(|(b, z)| fedmesh_api::Endpoint {
            address: b.addr,
            zone: (*z).into(),
            healthy,
        })
        .collect()
}

fn cart(local: Vec<fedmesh_api::Endpoint>, remote: Vec<RemoteCluster>) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey::new("shop", "cart"),
        port: 8080,
        local,
        remote,
        policy: None,
    }
}

/// How the proxy under test reaches other clusters: each cross-cluster
/// test runs both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// QUIC from the proxy straight to gcp's gateways.
    Direct,
    /// Through a local egress gateway of aws.
    Egress,
}

/// aws's side of a test: how its proxy reaches the clusters `to`, and the
/// egress gateway that `Mode::Egress` needs (kept alive by the caller).
async fn aws_side(
    mode: Mode,
    aws: &Domain,
    to: Peers,
    all: &fedmesh_trust::BundleSet,
) -> (Reach, Option<Gw>) {
    match mode {
        Mode::Direct => (Reach::Direct(to), None),
        Mode::Egress => {
            let mut ra = aws.routes("az1");
            ra.peers.extend(to);
            let gw = start_gateway(aws, 1, true, all.clone(), ra, Default::default()).await;
            (Reach::Egress(vec![gw.egress()]), Some(gw))
        }
    }
}

fn peers(d: &Domain, gateways: &[std::net::SocketAddr]) -> Peers {
    Peers::from([d.as_peer(gateways.to_vec())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_local_zone_fails_no_get() {
    let d = Domain::new("aws", "aws.fedmesh.test", 51);
    let mut a1 = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let mut a2 = Backend::new(d.ip(11), "aws", "az1", "cart").await;
    let b1 = Backend::new(d.ip(12), "aws", "az2", "cart").await;
    let b2 = Backend::new(d.ip(13), "aws", "az2", "cart").await;
    let spec = cart(
        local(&[&a1, &a2, &b1, &b2], &["az1", "az1", "az2", "az2"], true),
        vec![],
    );
    let (proxy, _table) = start_proxy(
        &d,
        "az1",
        &[spec],
        Reach::nowhere(),
        bundles(&[&d]),
        Settings::default(),
    )
    .await;
    let load = Load::start(proxy.http.unwrap(), CART, 4, Duration::from_millis(2));
    load.until("answers from our zone", 100, |a| a.zone == "az1")
        .await;
    assert_eq!(
        load.count(|a| a.zone != "az1"),
        0,
        "a healthy zone keeps all its traffic"
    );

    // The zone dies without the proxy being told: connect-time failover
    // and retries carry every request to the other zone.
    a1.stop();
    a2.stop();
    load.until("answers from the other zone", 300, |a| a.zone == "az2")
        .await;
    let (answers, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    let tail = &answers[answers.len() - 200..];
    assert!(
        tail.iter().all(|a| a.zone == "az2"),
        "traffic settled in az2"
    );
    let scrape = scrape(&proxy);
    assert!(
        scrape.contains(r#"fedmesh_proxy_requests_total{service="shop/cart",cluster="aws",zone="az2",outcome="success"}"#),
        "{scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_local_backend_moves_traffic_to_another_cluster_and_back_after_failback() {
    failover_and_failback(Mode::Direct, 52).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_egress_losing_every_local_backend_moves_traffic_away_and_back() {
    failover_and_failback(Mode::Egress, 71).await;
}

async fn failover_and_failback(mode: Mode, block: u8) {
    let aws = Domain::new("aws", "aws.fedmesh.test", block);
    let gcp = Domain::new("gcp", "gcp.fedmesh.test", block + 1);
    let all = bundles(&[&aws, &gcp]);

    // gcp: two backends behind its gateway.
    let g1 = Backend::new(gcp.ip(10), "gcp", "az1", "cart").await;
    let g2 = Backend::new(gcp.ip(11), "gcp", "az1", "cart").await;
    let mut rg = gcp.routes("az1");
    rg.peers.extend([aws.as_peer(vec![])]);
    export(
        &mut rg,
        "shop/cart",
        8080,
        &[(g1.addr, "az1"), (g2.addr, "az1")],
    );
    let gw_gcp = start_gateway(&gcp, 1, false, all.clone(), rg, Default::default()).await;
    // aws: two local backends, and its way to gcp.
    let (reach, _egress) = aws_side(mode, &aws, peers(&gcp, &[gw_gcp.quic()]), &all).await;
    let mut a1 = Backend::new(aws.ip(10), "aws", "az1", "cart").await;
    let mut a2 = Backend::new(aws.ip(11), "aws", "az1", "cart").await;
    let remote = vec![RemoteCluster {
        cluster: "gcp".into(),
        cloud: "gcp".into(),
        region: "r1".into(),
        healthy: 2,
        total: 2,
    }];
    let hold = Duration::from_secs(2);
    let settings = Settings {
        failback_hold: hold,
        outlier: OutlierSettings {
            base_ejection: Duration::from_secs(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let (proxy, table) = start_proxy(
        &aws,
        "az1",
        &[cart(
            local(&[&a1, &a2], &["az1", "az1"], true),
            remote.clone(),
        )],
        reach,
        all,
        settings,
    )
    .await;
    let http = proxy.http.unwrap();

    // The remote cluster is reachable through the gateways on its own:
    // a request the proxy can only send there.
    table.update(&[cart(vec![], remote.clone())]);
    assert_eq!(get(http, CART).await.unwrap().cluster, "gcp");
    table.update(&[cart(
        local(&[&a1, &a2], &["az1", "az1"], true),
        remote.clone(),
    )]);

    let load = Load::start(http, CART, 4, Duration::from_millis(2));
    load.until("answers from aws", 100, |a| a.cluster == "aws")
        .await;

    // Every local backend dies; the proxy learns it only by failing.
    a1.stop();
    a2.stop();
    load.until("answers from gcp", 200, |a| a.cluster == "gcp")
        .await;
    // The registry then marks them down, as the controller would.
    table.update(&[cart(
        local(&[&a1, &a2], &["az1", "az1"], false),
        remote.clone(),
    )]);
    load.until("more answers from gcp", 100, |a| a.cluster == "gcp")
        .await;

    // They come back and are marked healthy: traffic returns to aws, but
    // only once the level has stayed healthy for the failback window.
    a1.start().await;
    a2.start().await;
    let back = Instant::now();
    table.update(&[cart(local(&[&a1, &a2], &["az1", "az1"], true), remote)]);
    load.until("answers from aws again", 100, |a| a.cluster == "aws")
        .await;
    let (answers, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    let first_back = answers
        .iter()
        .find(|a| a.at >= back && a.cluster == "aws")
        .unwrap();
    assert!(
        first_back.at - back >= hold,
        "traffic returned {:?} after recovery, inside the {hold:?} failback window",
        first_back.at - back
    );
    assert!(g1.addr != g2.addr);
    let scrape = scrape(&proxy);
    let up = format!(
        r#"fedmesh_proxy_gateway_up{{cluster="gcp",gateway="{}"}} 1"#,
        gw_gcp.quic()
    );
    assert_eq!(
        scrape.contains(&up),
        mode == Mode::Direct,
        "the proxy's own QUIC connection to gcp's gateway, in direct mode only: {scrape}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_of_one_remote_cluster_never_share_a_tunnel() {
    two_services(Mode::Direct, 56).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_egress_two_services_of_one_remote_cluster_never_share_a_tunnel() {
    two_services(Mode::Egress, 73).await;
}

async fn two_services(mode: Mode, block: u8) {
    let aws = Domain::new("aws", "aws.fedmesh.test", block);
    let gcp = Domain::new("gcp", "gcp.fedmesh.test", block + 1);
    let all = bundles(&[&aws, &gcp]);
    let cart = Backend::new(gcp.ip(10), "gcp", "az1", "cart").await;
    let pay = Backend::new(gcp.ip(11), "gcp", "az1", "pay").await;
    let mut rg = gcp.routes("az1");
    rg.peers.extend([aws.as_peer(vec![])]);
    export(&mut rg, "shop/cart", 8080, &[(cart.addr, "az1")]);
    export(&mut rg, "shop/pay", 8080, &[(pay.addr, "az1")]);
    let gw_gcp = start_gateway(&gcp, 1, false, all.clone(), rg, Default::default()).await;
    let (reach, _egress) = aws_side(mode, &aws, peers(&gcp, &[gw_gcp.quic()]), &all).await;
    let remote_only = |name: &str| ServiceSpec {
        key: ServiceKey::new("shop", name),
        port: 8080,
        local: vec![],
        remote: vec![RemoteCluster {
            cluster: "gcp".into(),
            cloud: "gcp".into(),
            region: "r1".into(),
            healthy: 1,
            total: 1,
        }],
        policy: None,
    };
    let (proxy, _table) = start_proxy(
        &aws,
        "az1",
        &[remote_only("cart"), remote_only("pay")],
        reach,
        all,
        Settings::default(),
    )
    .await;
    // One keep-alive client alternating: each answer comes from the
    // service asked for, although both go to gcp through pooled tunnels.
    let mut c = support::Client::connect(proxy.http.unwrap()).await.unwrap();
    for i in 0..10 {
        let (host, want) = if i % 2 == 0 {
            ("cart.shop", "cart")
        } else {
            ("pay.shop", "pay")
        };
        let a = c.get(host).await.unwrap();
        assert_eq!(
            (a.cluster.as_str(), a.service.as_str()),
            ("gcp", want),
            "request {i}"
        );
    }
    assert!(proxy.idle_connections() >= 2, "both tunnels were pooled");
}

fn scrape(p: &fedmesh_proxy::Proxy) -> String {
    let mut reg = prometheus_client::registry::Registry::default();
    p.metrics.register(&mut reg);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
    out
}

/// A backend that answers each request after `delay`, saying it is gcp's.
async fn slow_backend(ip: std::net::IpAddr, delay: Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                tokio::time::sleep(delay).await;
                let body = r#"{"cluster":"gcp","zone":"az1","service":"cart"}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// The only cluster that serves a service is reached through one of its
/// two gateways; that gateway dies while a GET is in flight through it.
/// The GET is retried on a fresh path to the same cluster (its other
/// gateway) instead of failing: the cluster was never the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_that_dies_with_its_gateway_is_retried_on_a_fresh_path() {
    dies_with_its_gateway(Mode::Direct, 58).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_egress_a_tunnel_that_dies_with_its_gateway_is_retried() {
    dies_with_its_gateway(Mode::Egress, 75).await;
}

async fn dies_with_its_gateway(mode: Mode, block: u8) {
    let aws = Domain::new("aws", "aws.fedmesh.test", block);
    let gcp = Domain::new("gcp", "gcp.fedmesh.test", block + 1);
    let all = bundles(&[&aws, &gcp]);
    let backend = slow_backend(gcp.ip(10), Duration::from_millis(500)).await;
    let mut rg = gcp.routes("az1");
    rg.peers.extend([aws.as_peer(vec![])]);
    export(&mut rg, "shop/cart", 8080, &[(backend, "az1")]);
    // gw1 cuts its live streams almost at once when it shuts down.
    let quick = fedmesh_gateway::Settings {
        drain_timeout: Duration::from_millis(10),
        ..Default::default()
    };
    let gw1 = start_gateway(&gcp, 1, false, all.clone(), rg.clone(), quick).await;
    let gw2 = start_gateway(&gcp, 2, false, all.clone(), rg, Default::default()).await;
    let (reach, egress) = aws_side(mode, &aws, peers(&gcp, &[gw1.quic()]), &all).await;
    let remote = vec![RemoteCluster {
        cluster: "gcp".into(),
        cloud: "gcp".into(),
        region: "r1".into(),
        healthy: 1,
        total: 1,
    }];
    let (proxy, table) = start_proxy(
        &aws,
        "az1",
        &[cart(vec![], remote)],
        reach,
        all,
        Settings::default(),
    )
    .await;
    let http = proxy.http.unwrap();
    // The GET goes through gw1, the only gateway aws knows yet.
    let pending = tokio::spawn(async move { get(http, CART).await });
    fedmesh_test_support::eventually("the tunnel through gw1", Duration::from_secs(5), || async {
        (gw1.gateway.active_streams() > 0).then_some(())
    })
    .await;
    // gcp now lists both gateways; gw1 goes away mid-request.
    let both = [gw1.quic(), gw2.quic()];
    match &egress {
        Some(gw_aws) => gw_aws.update(|r| {
            r.peers.extend([gcp.as_peer(both.to_vec())]);
        }),
        None => table.reach(Reach::Direct(peers(&gcp, &both))),
    }
    gw1.gateway.shutdown().await;
    let answer = pending.await.unwrap();
    assert_eq!(answer.map(|a| a.cluster), Ok("gcp".to_string()));
    assert!(gw2.scrape().contains("ingress"), "served through gw2");
}

/// gcp (the nearer cluster) refuses every tunnel for the service before
/// its first byte (its only endpoint is down: `NO_HEALTHY_ENDPOINTS`);
/// every GET goes on to azure, none fails, and gcp is charged with the
/// refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_refuses_is_failed_over_to_the_next() {
    refused_then_next_cluster(Mode::Direct, 77).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_egress_a_cluster_that_refuses_is_failed_over_to_the_next() {
    refused_then_next_cluster(Mode::Egress, 80).await;
}

async fn refused_then_next_cluster(mode: Mode, block: u8) {
    let aws = Domain::new("aws", "aws.fedmesh.test", block);
    let gcp = Domain::new("gcp", "gcp.fedmesh.test", block + 1);
    let azure = Domain::new("azure", "azure.fedmesh.test", block + 2);
    let all = bundles(&[&aws, &gcp, &azure]);
    // gcp's only endpoint: a port nobody listens on any more.
    let dead = std::net::TcpListener::bind((gcp.ip(10), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let mut rg = gcp.routes("az1");
    rg.peers.extend([aws.as_peer(vec![])]);
    export(&mut rg, "shop/cart", 8080, &[(dead, "az1")]);
    let gw_gcp = start_gateway(&gcp, 1, false, all.clone(), rg, Default::default()).await;
    let z = Backend::new(azure.ip(10), "azure", "az1", "cart").await;
    let mut rz = azure.routes("az1");
    rz.peers.extend([aws.as_peer(vec![])]);
    export(&mut rz, "shop/cart", 8080, &[(z.addr, "az1")]);
    let gw_azure = start_gateway(&azure, 1, false, all.clone(), rz, Default::default()).await;
    let to = Peers::from([
        gcp.as_peer(vec![gw_gcp.quic()]),
        azure.as_peer(vec![gw_azure.quic()]),
    ]);
    let (reach, _egress) = aws_side(mode, &aws, to, &all).await;
    let remote = |cluster: &str, cloud: &str| RemoteCluster {
        cluster: cluster.into(),
        cloud: cloud.into(),
        region: "r1".into(),
        healthy: 1,
        total: 1,
    };
    // gcp shares our cloud and region: it comes first.
    let spec = cart(vec![], vec![remote("gcp", "aws"), remote("azure", "azure")]);
    let (proxy, _table) = start_proxy(&aws, "az1", &[spec], reach, all, Settings::default()).await;
    let load = Load::start(proxy.http.unwrap(), CART, 2, Duration::from_millis(5));
    load.until("answers from azure", 50, |a| a.cluster == "azure")
        .await;
    let (answers, failures) = load.finish().await;
    assert!(failures.is_empty(), "failed GETs: {failures:?}");
    assert!(answers.iter().all(|a| a.cluster == "azure"));
    let scrape = scrape(&proxy);
    assert!(
        scrape.contains(r#"cluster="gcp",result="no_healthy_endpoints"}"#),
        "gcp's refusal is counted against it: {scrape}"
    );
}
