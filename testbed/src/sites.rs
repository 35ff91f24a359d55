//! Registered clusters with real controllers (over a real etcd), and
//! gateways in this process that take everything from them. Shared by the
//! gateway's discovery tests and the proxy's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fedmesh_api::{ClusterRecord, Endpoint, KeySpace, LocalService, LocalServices, ServiceKey};
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_controller::tokens::Tokens;
use fedmesh_discovery::{ClientPolicy, ControllerAccess, Discovered};
use fedmesh_gateway::config::{DiscoveryConfig, Listen};
use fedmesh_gateway::discovered::{self, Local};
use fedmesh_gateway::{Gateway, GatewayOptions, Metrics, Routes, Settings};
use fedmesh_test_support::Etcd;
use fedmesh_trust::{Bundle, BundleSet, CaOptions, ClusterCa, SpiffeId};
use fedmesh_zone::GlobalZone;
use fedmesh_zone::TokensFile;
use fedmesh_zone::join::{EtcdAccess, JoinDir};
use tokio::sync::watch;

use crate::gateway::Domain;

/// The `alive` lease of test controllers: etcd's shortest, so a dead
/// controller's cluster turns unverified within seconds.
pub const ALIVE_TTL: Duration = Duration::from_secs(2);

pub const GATEWAY_TOKEN: &str = "gateway-token-0123456789abcdef01234";
pub const WEB_TOKEN: &str = "web-token-0123456789abcdef01234567";

/// A registered cluster with its controller.
pub struct Registered {
    pub domain: Domain,
    pub own_bundle: Bundle,
    /// The gateway port in the cluster's record, on 127.0.<block>.1.
    pub gw_port: u16,
    pub controller: Option<Controller>,
    pub services: watch::Sender<Arc<LocalServices>>,
}

/// A registered cluster and a gateway, in this process, that follows it.
pub struct Site {
    pub reg: Registered,
    pub gateway: Gateway,
    pub discovered: Discovered<Routes>,
}

pub fn free_udp_port(ip: std::net::IpAddr) -> u16 {
    std::net::UdpSocket::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn policy() -> ClientPolicy {
    ClientPolicy {
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    }
}

/// Registers `name` (with its own CA) and starts its controller.
pub async fn register(etcd: &Etcd, name: &str, block: u8) -> Registered {
    register_with(etcd, name, block, |_| {}).await
}

/// [`register`], with `tune` applied to the controller's config (a
/// Kubernetes source beside the test's channel, say).
pub async fn register_with(
    etcd: &Etcd,
    name: &str,
    block: u8,
    tune: impl FnOnce(&mut ControllerConfig),
) -> Registered {
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
        egress: Default::default(),
    };
    let anchor = fedmesh_test_support::anchor();
    GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .with_anchor(anchor.clone())
        .register(&record, &ca)
        .await
        .unwrap();
    let join = JoinDir {
        cluster: record,
        etcd: EtcdAccess {
            endpoints: vec![etcd.endpoint()],
            prefix: KeySpace::default().prefix().into(),
            user: None,
            password: None,
            tls: None,
        },
        ca,
        anchor: Some(anchor.public()),
    };
    let (services, rx) = watch::channel(Arc::new(LocalServices::new()));
    let mut config = ControllerConfig::new(
        join,
        LocalSource::Channel(rx),
        SocketAddr::new(domain.ip(2), 0),
    );
    config.alive_ttl = ALIVE_TTL;
    // Small chunks, so that every test's updates arrive in several.
    config.discovery_chunk_bytes = 2048;
    config.tokens = Tokens::fixed(TokensFile::granting(
        [
            (GATEWAY_TOKEN, domain.gateway_id()),
            (WEB_TOKEN, SpiffeId::workload(&td, "shop", "web").unwrap()),
        ],
        Duration::from_secs(3600),
    ));
    tune(&mut config);
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
pub async fn site(etcd: &Etcd, name: &str, block: u8) -> Site {
    site_with(etcd, name, block, |_| {}).await
}

/// [`site`], with `tune` applied to the controller's config.
pub async fn site_with(
    etcd: &Etcd,
    name: &str,
    block: u8,
    tune: impl FnOnce(&mut ControllerConfig),
) -> Site {
    let reg = register_with(etcd, name, block, tune).await;
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
            credential: fedmesh_discovery::Credential::JoinToken(GATEWAY_TOKEN.into()),
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

pub fn export(reg: &Registered, name: &str, endpoint: SocketAddr) {
    set_service(reg, name, &[(endpoint, "az1", true)]);
}

/// Lists `shop/<name>` (port 8080) in the cluster's registry with these
/// `(address, zone, healthy)` endpoints, as its discovery source would.
pub fn set_service(reg: &Registered, name: &str, endpoints: &[(SocketAddr, &str, bool)]) {
    reg.services.send_modify(|s| {
        let mut next = (**s).clone();
        next.insert(
            ServiceKey::new("shop", name),
            LocalService {
                ports: vec![8080],
                endpoints: endpoints
                    .iter()
                    .map(|&(address, zone, healthy)| Endpoint {
                        address,
                        zone: zone.into(),
                        healthy,
                    })
                    .collect(),
            },
        );
        *s = Arc::new(next);
    });
}

/// The controller's Kubernetes options for test-support's `FakeKube` (a
/// fake API server: none can run here), over plain HTTP.
pub fn fake_kube(
    fake: &fedmesh_test_support::FakeKube,
) -> fedmesh_controller::kubernetes::KubeOptions {
    let url = fake.url().parse().expect("the fake's URL");
    fedmesh_controller::kubernetes::KubeOptions {
        client: kube::Client::try_from(kube::Config::new(url)).expect("a client for the fake"),
        clusterset_ip: None,
        gateway_account: None,
    }
}
