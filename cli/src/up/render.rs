//! The files `fedmesh up` writes for each cluster, built from the types
//! their readers parse (the registry's, the controller's join tokens, the
//! gateway's and the proxy's config), so that a schema change breaks the
//! build rather than a demo.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fedmesh_api::{ListedEndpoint, ListedService, RegistryFile};
use fedmesh_topology::{Cluster, ClusterPlan, GatewayPlan};
use serde::Serialize;

use super::state::ClusterState;

/// Writes `value` as YAML to `path`, atomically (a reader never sees half
/// a file).
pub fn write_yaml<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let yaml =
        serde_saphyr::to_string(value).with_context(|| format!("rendering {}", path.display()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A cluster's registry: its backends, healthy unless stopped.
pub fn registry(c: &ClusterState) -> RegistryFile {
    let mut by_service: BTreeMap<&str, ListedService> = BTreeMap::new();
    for b in &c.backends {
        let (ns, name) = b.service.split_once('/').unwrap_or(("default", &b.service));
        by_service
            .entry(&b.service)
            .or_insert_with(|| ListedService {
                namespace: ns.into(),
                name: name.into(),
                ports: vec![b.address.port()],
                endpoints: Vec::new(),
            })
            .endpoints
            .push(ListedEndpoint {
                address: b.address.to_string(),
                zone: b.zone.clone(),
                healthy: b.pid.is_some(),
            });
    }
    RegistryFile {
        services: by_service.into_values().collect(),
    }
}

/// Writes the registry `c`'s controller follows; `stop` and `start` rewrite
/// it as a readiness probe would.
pub fn write_registry(c: &ClusterState) -> anyhow::Result<()> {
    write_yaml(&c.registry, &registry(c))
}

/// Files a data-plane process reads from its cluster's directory.
#[derive(Debug, Clone)]
pub struct FromController {
    pub controller: SocketAddr,
    /// The cluster's own bundle document.
    pub bundle: PathBuf,
    pub join_token_file: PathBuf,
}

/// Gateway `g` of cluster `c`, configured by its controller.
pub fn gateway(
    c: &Cluster,
    trust_domain: &str,
    zone: &str,
    g: &GatewayPlan,
    from: &FromController,
) -> fedmesh_gateway::config::GatewayFile {
    use fedmesh_gateway::config::{ControllerFile, GatewayFile, Listen};
    GatewayFile {
        cluster: c.name.clone(),
        trust_domain: trust_domain.into(),
        zone: Some(zone.into()),
        listen: Listen {
            quic: g.quic_listen,
            egress: Some(g.egress),
            admin: Some(g.admin),
        },
        controller: Some(ControllerFile {
            address: from.controller.into(),
            bundle: from.bundle.clone(),
            join_token_file: Some(from.join_token_file.clone()),
            service_account_token_file: None,
        }),
        identity: None,
        bundles: None,
        peers: Vec::new(),
        services: Vec::new(),
        policies: Vec::new(),
        settings: Default::default(),
    }
}

/// Cluster `c`'s proxy, configured by its controller. Drills want traffic
/// back soon after a recovery: a 5 s failback window and 5 s ejections
/// (the production defaults are 30 s for both).
pub fn proxy(
    c: &Cluster,
    trust_domain: &str,
    cp: &ClusterPlan,
    from: &FromController,
) -> fedmesh_proxy::config::ProxyFile {
    use fedmesh_proxy::config::{
        ControllerFile, Listen, LocalityFile, OutlierSettings, ProxyFile, Settings, TcpListen,
    };
    let settings = Settings {
        // QUIC to other clusters' gateways leaves from the cluster's block.
        source_address: Some(cp.proxy_http.ip()),
        failback_hold: Duration::from_secs(5),
        outlier: OutlierSettings {
            base_ejection: Duration::from_secs(5),
            ..Default::default()
        },
        ..Default::default()
    };
    ProxyFile {
        cluster: c.name.clone(),
        trust_domain: trust_domain.into(),
        locality: LocalityFile {
            cloud: c.cloud.clone(),
            region: c.region.clone(),
            zone: c.zones[0].clone(),
        },
        listen: Listen {
            http: Some(cp.proxy_http),
            tcp: cp
                .proxy_tcp
                .iter()
                .map(|(service, address)| TcpListen {
                    address: *address,
                    service: service.clone(),
                })
                .collect(),
            admin: Some(cp.proxy_admin),
        },
        gateways: cp.gateways.iter().map(|g| g.egress).collect(),
        controller: Some(ControllerFile {
            address: from.controller.into(),
            bundle: from.bundle.clone(),
            join_token_file: Some(from.join_token_file.clone()),
            service_account_token_file: None,
            namespace: "fedmesh".into(),
            service_account: "proxy".into(),
            services: Vec::new(),
        }),
        identity: None,
        bundles: None,
        services: Vec::new(),
        peers: Vec::new(),
        policies: Vec::new(),
        settings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::state::{BackendState, Proc};
    use fedmesh_trust::{Bundle, CaOptions, ClusterCa, TrustDomain};
    use std::time::SystemTime;

    fn cluster() -> Cluster {
        Cluster {
            name: "aws".into(),
            cloud: "aws".into(),
            region: "us-east-1".into(),
            zones: vec!["az1".into(), "az2".into()],
            gateways: 1,
            egress: Default::default(),
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn gw() -> GatewayPlan {
        GatewayPlan {
            quic: addr("127.0.1.1:15443"),
            quic_listen: addr("127.0.1.1:15444"),
            egress: addr("127.0.1.1:15001"),
            admin: addr("127.0.1.1:15020"),
        }
    }

    fn plan() -> ClusterPlan {
        ClusterPlan {
            name: "aws".into(),
            block: 1,
            controller: addr("127.0.1.2:15010"),
            controller_admin: addr("127.0.1.2:15014"),
            gateways: vec![gw()],
            proxy_http: addr("127.0.1.3:15080"),
            proxy_admin: addr("127.0.1.3:15081"),
            proxy_tcp: vec![("shop/db".parse().unwrap(), addr("127.0.1.3:5432"))],
            backends: vec![],
        }
    }

    fn from() -> FromController {
        FromController {
            controller: addr("127.0.1.2:15010"),
            bundle: "bundle.json".into(),
            join_token_file: "proxy.token".into(),
        }
    }

    /// What the readers' `read` closure finds beside the config: a real
    /// bundle document and a token.
    fn files(td: &TrustDomain) -> impl Fn(&Path) -> Result<Vec<u8>, String> {
        fedmesh_trust::install_default_provider();
        let ca = ClusterCa::generate(td, &CaOptions::default(), SystemTime::now()).unwrap();
        let doc = Bundle::with_roots(td.clone(), [ca.cert_der().clone()]).to_document();
        move |p: &Path| match p.to_str() {
            Some("bundle.json") => Ok(doc.clone().into_bytes()),
            Some(_) => Ok(b"0123456789abcdef0123".to_vec()),
            None => Err("?".into()),
        }
    }

    #[test]
    fn the_proxy_file_is_what_the_proxy_parses() {
        let td = TrustDomain::new("aws.fedmesh.local").unwrap();
        let file = proxy(&cluster(), td.as_str(), &plan(), &from());
        let yaml = serde_saphyr::to_string(&file).unwrap();
        let parsed: fedmesh_proxy::config::ProxyFile = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(parsed, file, "round trip:\n{yaml}");
        let config = fedmesh_proxy::config::ProxyConfig::parse(&yaml, "proxy.yaml", files(&td))
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let common = config.common();
        assert_eq!(common.settings.failback_hold, Duration::from_secs(5));
        assert_eq!(common.listen.http, Some(addr("127.0.1.3:15080")));
        assert_eq!(common.gateways, vec![addr("127.0.1.1:15001")]);
        assert_eq!(common.listen.tcp.len(), 1);
        assert_eq!(common.listen.tcp[0].address, addr("127.0.1.3:5432"));
        assert_eq!(common.listen.tcp[0].service.to_string(), "shop/db");
        assert!(matches!(
            config,
            fedmesh_proxy::config::ProxyConfig::Discovery(_)
        ));
    }

    #[test]
    fn the_gateway_file_is_what_the_gateway_parses() {
        let td = TrustDomain::new("aws.fedmesh.local").unwrap();
        let file = gateway(&cluster(), td.as_str(), "az2", &gw(), &from());
        let yaml = serde_saphyr::to_string(&file).unwrap();
        let parsed: fedmesh_gateway::config::GatewayFile = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(parsed, file, "round trip:\n{yaml}");
        let config =
            fedmesh_gateway::config::GatewayConfig::parse(&yaml, "gateway.yaml", files(&td))
                .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let fedmesh_gateway::config::GatewayConfig::Discovery(d) = config else {
            panic!("a gateway of up is configured by its controller");
        };
        assert_eq!(d.listen.quic, addr("127.0.1.1:15444"));
        assert_eq!(d.listen.egress, Some(addr("127.0.1.1:15001")));
    }

    #[test]
    fn the_registry_lists_every_backend_healthy_unless_stopped() {
        let p = |n: &str| Proc {
            name: n.into(),
            pid: 1,
            address: addr("127.0.1.9:1"),
            admin: None,
            command: Vec::new(),
            zone: None,
        };
        let b = |svc: &str, a: &str, pid: Option<u32>| BackendState {
            id: format!("aws/{svc}@az1#{a}"),
            service: svc.into(),
            zone: "az1".into(),
            address: addr(a),
            tcp: false,
            pid,
        };
        let c = ClusterState {
            name: "aws".into(),
            cloud: "aws".into(),
            region: "r".into(),
            trust_domain: "aws.fedmesh.local".into(),
            controller: p("c"),
            gateways: vec![],
            proxy: p("p"),
            proxy_tcp: Default::default(),
            registry: "registry.yaml".into(),
            backends: vec![
                b("shop/cart", "127.0.1.50:8080", Some(5)),
                b("shop/cart", "127.0.1.51:8080", None),
                b("shop/web", "127.0.1.52:9090", Some(6)),
            ],
        };
        let yaml = serde_saphyr::to_string(&registry(&c)).unwrap();
        let parsed: RegistryFile = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(parsed.services.len(), 2);
        let cart = &parsed.services[0];
        assert_eq!(
            (cart.namespace.as_str(), cart.name.as_str()),
            ("shop", "cart")
        );
        assert_eq!(cart.ports, vec![8080]);
        let health: Vec<bool> = cart.endpoints.iter().map(|e| e.healthy).collect();
        assert_eq!(health, [true, false]);
        let svc =
            fedmesh_api::LocalService::from_listed(cart.ports.clone(), cart.endpoints.clone())
                .unwrap();
        assert_eq!(svc.endpoints.len(), 2);
    }
}
