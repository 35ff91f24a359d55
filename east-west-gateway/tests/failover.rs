//! `kill -9` of a peer gateway process: the egress notices within about
//! the idle timeout (1 s by default), fails the streams that were on it,
//! and sends new streams to the cluster's second gateway. The peer
//! gateways here are real `fedmesh-gateway` processes on static YAML.
#![allow(clippy::unwrap_used)]

use fedmesh_testbed::gateway as support;

use std::time::Duration;

use fedmesh_gateway::Settings;
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_test_support::eventually;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_peer_gateway_fails_over_to_its_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let a = Domain::new("aws-use1", "aws.example", 1);
    let b = Domain::new("gcp-usc1", "gcp.example", 2);
    let echo1 = Echo::start(b.ip(10)).await;
    let echo2 = Echo::start(b.ip(11)).await;
    let g1 = GatewayProcess::spawn(
        dir.path(),
        &b,
        1,
        &[(&a, vec![])],
        &[("shop/echo", echo1.addr)],
        false,
        Settings {
            reveal_endpoint: true,
            ..Default::default()
        },
    )
    .await;
    let g2 = GatewayProcess::spawn(
        dir.path(),
        &b,
        2,
        &[(&a, vec![])],
        &[("shop/echo", echo2.addr)],
        false,
        Settings {
            reveal_endpoint: true,
            ..Default::default()
        },
    )
    .await;
    let (addr1, addr2) = (g1.quic, g2.quic);
    let mut children = [(g1.child, addr1, echo1.addr), (g2.child, addr2, echo2.addr)];

    let mut ra = a.routes("use1-a");
    ra.peers.extend([b.as_peer(vec![addr1, addr2])]);
    let settings = Settings::default();
    let idle = settings.idle_timeout;
    let gw_a = start_gateway(&a, 1, true, bundles(&[&a, &b]), ra, settings).await;
    let proxy = proxy_tls(a.workload_svid("shop", "web"), bundles(&[&a]), &a);
    let open = open_msg("shop/echo", 8080, "gcp-usc1");

    let (mut live, accept) = open_tunnel(gw_a.egress(), proxy.clone(), &open)
        .await
        .unwrap();
    assert_eq!(accept.status, Status::Ok as i32, "{accept:?}");
    live.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    live.read_exact(&mut buf).await.unwrap();
    let victim = children
        .iter()
        .position(|(_, _, echo)| echo.to_string() == accept.endpoint)
        .unwrap();
    let (victim_addr, survivor_echo) = (children[victim].1, children[1 - victim].2);
    assert!(gw_a.gateway.pool().connected(victim_addr));

    children[victim].0.start_kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    children[victim].0.wait().await.unwrap();
    eventually(
        "the egress to notice the dead peer",
        Duration::from_secs(10),
        || async { (!gw_a.gateway.pool().connected(victim_addr)).then_some(()) },
    )
    .await;
    let noticed = killed.elapsed();
    eprintln!("kill -9 noticed after {noticed:?} (idle timeout {idle:?})");
    // The idle timeout plus scheduling slack on a loaded 2-core machine.
    assert!(
        noticed <= idle + Duration::from_millis(500),
        "noticed after {noticed:?}"
    );

    // The stream that was on it fails rather than hangs.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), live.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "a stream to a dead peer hung");

    // New streams go to the sibling, at once.
    for _ in 0..20 {
        let (mut s, a) = open_tunnel(gw_a.egress(), proxy.clone(), &open)
            .await
            .unwrap();
        assert_eq!(a.status, Status::Ok as i32, "{a:?}");
        assert_eq!(a.endpoint, survivor_echo.to_string());
        s.write_all(b"pong").await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }

    // SIGTERM drains the survivor and it exits cleanly.
    let survivor = &mut children[1 - victim].0;
    let pid = survivor.id().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), survivor.wait())
        .await
        .expect("the gateway did not exit after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
