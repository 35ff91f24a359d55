//! Gateways that take their SVIDs, bundles and routes from real controllers
//! (over a real etcd): a tunnel works end to end, a newly exported service
//! becomes reachable without a restart, and the gateways keep routing after
//! both controllers are gone.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use east_west_gateway::config::{DiscoveryConfig, Listen};
use east_west_gateway::discovered::{self, Local};
use east_west_gateway::{Gateway, GatewayOptions, Metrics, Routes, Settings};
use federation_controller::GlobalZone;
use federation_controller::controller::{Controller, ControllerConfig, LocalSource};
use federation_controller::join::{EtcdAccess, JoinDir};
use fedmesh_api::{ClusterRecord, Endpoint, KeySpace, LocalService, LocalServices, ServiceKey};
use fedmesh_discovery::{ClientPolicy, ControllerAccess, Discovered};
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_test_support::{Etcd, eventually};
use support::{Domain, Echo, GatewayProcess, echo_through, proxy_tls};
use tokio::sync::watch;
use trust_bundle::{Bundle, BundleSet, CaOptions, ClusterCa, SpiffeId};

const GATEWAY_TOKEN: &str = "gateway-token-0123456789";
const WEB_TOKEN: &str = "web-token-0123456789abcd";

/// A registered cluster with its controller.
struct Registered {
    domain: Domain,
    own_bundle: Bundle,
    /// The gateway port in the cluster's record, on 127.0.<block>.1.
    gw_port: u16,
    controller: Option<Controller>,
    services: watch::Sender<Arc<LocalServices>>,
}

/// A registered cluster and a gateway, in this process, that follows it.
struct Site {
    reg: Registered,
    gateway: Gateway,
    discovered: Discovered<Routes>,
}

fn free_udp_port(ip: std::net::IpAddr) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn policy() -> ClientPolicy {
    ClientPolicy {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    }
}

/// Registers `name` (with its own CA) and starts its controller.
async fn register(etcd: &Etcd, name: &str, block: u8) -> Registered {
    let domain = Domain::new(name, &format!("{name}.fedmesh.test"), block);
    let td = domain.td.clone();
    // The controller takes the CA; Domain keeps its own for test SVIDs, so
    // this cluster's CA is a second one, the only one its gateway trusts.
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let own_bundle = Bundle::with_roots(td.clone(), [ca.cert_der().clone()]);
    let gw_port = free_udp_port(domain.ip(1));
    let record = ClusterRecord {
        name: name.into(),
        cloud: name.into(),
        region: "r1".into(),
        zones: vec!["az1".into()],
        trust_domain: td.to_string(),
        gateways: vec![format!("{}:{gw_port}", domain.ip(1)).parse().unwrap()],
        labels: BTreeMap::new(),
        registered_at: time::OffsetDateTime::now_utc(),
    };
    GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .register(&record, &own_bundle)
        .await
        .unwrap();
    let join = JoinDir {
        cluster: record,
        etcd: EtcdAccess {
            endpoints: vec![etcd.endpoint()],
            prefix: KeySpace::default().prefix().into(),
            user: None,
            password: None,
        },
        ca,
    };
    let (services, rx) = watch::channel(Arc::new(LocalServices::new()));
    let mut config = ControllerConfig::new(
        join,
        LocalSource::Channel(rx),
        SocketAddr::new(domain.ip(2), 0),
    );
    config.tokens = HashMap::from([
        (GATEWAY_TOKEN.to_string(), domain.gateway_id()),
        (
            WEB_TOKEN.to_string(),
            SpiffeId::workload(&td, "shop", "web").unwrap(),
        ),
    ]);
    let controller = Controller::start(config).await.unwrap();
    Registered {
        domain,
        own_bundle,
        gw_port,
        controller: Some(controller),
        services,
    }
}

/// Registers `name`, then starts its gateway from its controller alone.
async fn site(etcd: &Etcd, name: &str, block: u8) -> Site {
    let reg = register(etcd, name, block).await;
    let (domain, td, gw_port) = (&reg.domain, reg.domain.td.clone(), reg.gw_port);
    let controller = reg.controller.as_ref().unwrap();
    let mut bootstrap = BundleSet::new();
    bootstrap.insert(reg.own_bundle.clone());
    let c = DiscoveryConfig {
        listen: Listen {
            quic: SocketAddr::new(domain.ip(1), gw_port),
            egress: Some(SocketAddr::new(domain.ip(1), 0)),
            admin: None,
        },
        settings: Settings::default(),
        local: Local {
            cluster: name.into(),
            trust_domain: td.clone(),
            zone: Some("az1".into()),
        },
        access: ControllerAccess {
            address: controller.discovery_addr,
            controller: SpiffeId::controller(&td, name).unwrap(),
            identity: domain.gateway_id(),
            join_token: GATEWAY_TOKEN.into(),
            node: format!("{name}-gateway"),
        },
        bootstrap,
    };
    let discovered = discovered::connect(&c, policy()).await.unwrap();
    let options = GatewayOptions {
        quic: c.listen.quic,
        egress: c.listen.egress,
        settings: c.settings.clone(),
    };
    let gateway = Gateway::start(
        options,
        discovered.config.clone(),
        discovered.svid.clone(),
        discovered.bundles.clone(),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    Site {
        reg,
        gateway,
        discovered,
    }
}

fn export(reg: &Registered, name: &str, endpoint: SocketAddr) {
    reg.services.send_modify(|s| {
        let mut next = (**s).clone();
        next.insert(
            ServiceKey::new("shop", name),
            LocalService {
                ports: vec![8080],
                endpoints: vec![Endpoint {
                    address: endpoint,
                    zone: "az1".into(),
                    healthy: true,
                }],
            },
        );
        *s = Arc::new(next);
    });
}

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
            join_token: WEB_TOKEN.into(),
            node: "web".into(),
        };
        let svid = fedmesh_discovery::certify(&access, from.discovered.bundles.clone())
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
