//! Peer gateways given by DNS name: the egress resolves the name (through a
//! real DNS server on loopback), and follows it when it moves.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::gateway as support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use fedmesh_gateway::Settings;
use fedmesh_gateway::routes::GatewayAddr;
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_test_support::{DnsServer, eventually};
use support::{
    Domain, Echo, bundles, echo_through, export, open_msg, open_tunnel, proxy_tls, start_gateway,
    start_gateway_at,
};

const NAME: &str = "gw.gcp-usc1.example";

fn v4(ip: IpAddr) -> std::net::Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => unreachable!("loopback blocks are IPv4"),
    }
}

async fn call(egress: SocketAddr, tls: std::sync::Arc<rustls::ClientConfig>) -> Result<(), Status> {
    echo_through(egress, tls, "shop/echo", "gcp-usc1", b"by name").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gateway_name_is_resolved_and_followed_when_it_moves() {
    let aws = Domain::new("aws-use1", "aws.example", 47);
    let gcp = Domain::new("gcp-usc1", "gcp.example", 48);
    let set = bundles(&[&aws, &gcp]);
    let dns = DnsServer::start(aws.ip(53)).await.unwrap();
    let echo = Echo::start(gcp.ip(10)).await;

    let mut gcp_routes = gcp.routes("usc1-a");
    gcp_routes.peers.extend([aws.as_peer(vec![])]);
    export(&mut gcp_routes, "shop/echo", 8080, &[(echo.addr, "usc1-a")]);
    let first = start_gateway(
        &gcp,
        1,
        false,
        set.clone(),
        gcp_routes.clone(),
        Settings::default(),
    )
    .await;
    let port = first.quic().port();
    // A long TTL: only the failed connection can make the egress ask again.
    dns.set(NAME, &[v4(gcp.ip(1))], 300);

    let mut aws_routes = aws.routes("use1-a");
    let (name, mut peer) = gcp.as_peer(vec![]);
    peer.gateways = vec![GatewayAddr::parse(&format!("{NAME}:{port}")).unwrap()];
    aws_routes.peers.insert(name, peer);
    let settings = Settings {
        dns_servers: vec![dns.addr()],
        ..Settings::default()
    };
    let egress = start_gateway(&aws, 1, true, set.clone(), aws_routes, settings).await;
    let tls = proxy_tls(aws.workload_svid("shop", "web"), set.clone(), &aws);

    call(egress.egress(), tls.clone()).await.unwrap();
    assert!(dns.queries() >= 1, "the name was looked up");
    let after_first = dns.queries();
    for _ in 0..5 {
        call(egress.egress(), tls.clone()).await.unwrap();
    }
    assert_eq!(
        dns.queries(),
        after_first,
        "answers are cached for their TTL"
    );

    // The name moves to a new gateway on another address; the old one goes.
    let second = start_gateway_at(
        &gcp,
        SocketAddr::new(gcp.ip(2), port),
        false,
        set.clone(),
        gcp_routes,
        Settings::default(),
    )
    .await;
    dns.set(NAME, &[v4(gcp.ip(2))], 300);
    first.gateway.shutdown().await;
    eventually(
        "the egress to follow the name to its new address",
        Duration::from_secs(10),
        || async { call(egress.egress(), tls.clone()).await.ok() },
    )
    .await;
    assert!(
        dns.queries() > after_first,
        "the failure sent the egress back to DNS"
    );
    assert!(egress.gateway.pool().connected(second.quic()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_name_is_unreachable_with_the_reason() {
    let aws = Domain::new("aws-use1", "aws.example", 49);
    let gcp = Domain::new("gcp-usc1", "gcp.example", 50);
    let set = bundles(&[&aws, &gcp]);
    let dns = DnsServer::start(aws.ip(53)).await.unwrap();
    let mut aws_routes = aws.routes("use1-a");
    let (name, mut peer) = gcp.as_peer(vec![]);
    peer.gateways = vec![GatewayAddr::parse("nowhere.example:15443").unwrap()];
    aws_routes.peers.insert(name, peer);
    let settings = Settings {
        dns_servers: vec![dns.addr()],
        ..Settings::default()
    };
    let egress = start_gateway(&aws, 1, true, set.clone(), aws_routes, settings).await;
    let tls = proxy_tls(aws.workload_svid("shop", "web"), set, &aws);
    let (_s, accept) = open_tunnel(
        egress.egress(),
        tls,
        &open_msg("shop/echo", 8080, "gcp-usc1"),
    )
    .await
    .unwrap();
    assert_eq!(accept.status(), Status::Unreachable);
    assert!(
        accept.message.contains("nowhere.example"),
        "{}",
        accept.message
    );
    assert!(dns.queries() >= 1);
}
