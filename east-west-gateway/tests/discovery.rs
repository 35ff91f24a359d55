//! Gateways that take their SVIDs, bundles and routes from real controllers
//! (over a real etcd): a tunnel works end to end, a newly exported service
//! becomes reachable without a restart, and the gateways keep routing after
//! both controllers are gone.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::gateway as support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_discovery::ControllerAccess;
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_test_support::{Etcd, eventually};
use fedmesh_trust::SpiffeId;
use support::sites::{GATEWAY_TOKEN, Site, WEB_TOKEN, export, register, site};
use support::{Echo, GatewayProcess, echo_through, proxy_tls};

/// A workload of `from` calling `service` in `to` through `from`'s egress.
/// Its SVID comes from `from`'s controller, as a proxy's would.
struct Caller {
    tls: Arc<rustls::ClientConfig>,
    egress: SocketAddr,
}

impl Caller {
    async fn new(from: &Site) -> Self {
        let d = &from.reg.domain;
        let access = ControllerAccess {
            address: from.reg.controller.as_ref().unwrap().discovery_addr,
            controller: SpiffeId::controller(&d.td, &d.cluster).unwrap(),
            identity: SpiffeId::workload(&d.td, "shop", "web").unwrap(),
            credential: fedmesh_discovery::Credential::JoinToken(WEB_TOKEN.into()),
            node: "web".into(),
        };
        let svid = fedmesh_discovery::certify(&access, from.discovered.bundles.clone(), None)
            .await
            .unwrap();
        let trusted = (**from.discovered.bundles.borrow()).clone();
        Self {
            tls: proxy_tls(svid, trusted, d),
            egress: from.gateway.egress_addr().unwrap(),
        }
    }

    async fn call(&self, service: &str, to: &str) -> Result<(), Status> {
        echo_through(
            self.egress,
            self.tls.clone(),
            service,
            to,
            b"hello across clouds",
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_follow_their_controllers_and_outlive_them() {
    let etcd = Etcd::start().await.unwrap();
    let mut aws = site(&etcd, "aws", 43).await;
    let mut gcp = site(&etcd, "gcp", 44).await;
    let echo = Echo::start(gcp.reg.domain.ip(10)).await;
    export(&gcp.reg, "echo", echo.addr);
    let caller = Caller::new(&aws).await;

    // Peers, bundles and gcp's export arrive through the two controllers.
    eventually(
        "a tunnel from aws to gcp's echo",
        Duration::from_secs(20),
        || async { caller.call("shop/echo", "gcp").await.ok() },
    )
    .await;
    assert!(echo.accepted() >= 1);

    // A service gcp does not export yet is refused; once exported, it is
    // reached without restarting anything.
    assert_eq!(
        caller.call("shop/late", "gcp").await,
        Err(Status::UnknownService)
    );
    let late = Echo::start(gcp.reg.domain.ip(11)).await;
    export(&gcp.reg, "late", late.addr);
    eventually(
        "gcp's new export to be reachable",
        Duration::from_secs(20),
        || async { caller.call("shop/late", "gcp").await.ok() },
    )
    .await;
    assert_eq!(late.accepted(), 1);

    // Both controllers go away: the gateways keep their last good routes,
    // SVIDs and bundles, and new tunnels still work.
    aws.reg.controller.take().unwrap().shutdown().await;
    gcp.reg.controller.take().unwrap().shutdown().await;
    for _ in 0..3 {
        caller.call("shop/echo", "gcp").await.unwrap();
    }
    let routes = gcp.discovered.config.borrow().clone();
    assert!(
        routes
            .services
            .contains_key(&ServiceKey::new("shop", "late"))
    );
    assert!(routes.peers.contains_key("aws"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_binary_runs_from_its_controller() {
    let etcd = Etcd::start().await.unwrap();
    let aws = site(&etcd, "aws", 45).await;
    let gcp = register(&etcd, "gcp", 46).await;
    let echo = Echo::start(gcp.domain.ip(10)).await;
    export(&gcp, "echo", echo.addr);

    // gcp's gateway is a real `fedmesh-gateway` process whose file names
    // only who it is and where its controller is.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bundle.json"), gcp.own_bundle.to_document()).unwrap();
    std::fs::write(
        dir.path().join("gateway.token"),
        format!("{GATEWAY_TOKEN}\n"),
    )
    .unwrap();
    let yaml = format!(
        "cluster: gcp\ntrustDomain: {td}\nzone: az1\nlisten: {{quic: \"{ip}:{port}\"}}\ncontroller: {{address: \"{ctl}\", bundle: bundle.json, joinTokenFile: gateway.token}}\n",
        td = gcp.domain.td,
        ip = gcp.domain.ip(1),
        port = gcp.gw_port,
        ctl = gcp.controller.as_ref().unwrap().discovery_addr,
    );
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let gateway = GatewayProcess::start(&config).await;
    assert_eq!(
        gateway.quic,
        SocketAddr::new(gcp.domain.ip(1), gcp.gw_port),
        "it listens where the cluster's record says"
    );

    let caller = Caller::new(&aws).await;
    eventually(
        "a tunnel from aws to gcp's gateway process",
        Duration::from_secs(20),
        || async { caller.call("shop/echo", "gcp").await.ok() },
    )
    .await;
    assert_eq!(echo.accepted(), 1);
}
