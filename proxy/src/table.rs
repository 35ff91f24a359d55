//! The service table: what the proxy can route to, built from plain data
//! (a static file or the controller's mesh state) and I/O-free.
//!
//! Each service has one target per local endpoint and one virtual target
//! per remote cluster, each at its priority level as seen from this
//! proxy's locality. Requests find a service by name: the HTTP Host (or
//! `:authority`) `name.namespace`, optionally followed by `.svc`,
//! `.svc.cluster.local` or `.svc.clusterset.local`, and a port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_api::{EgressMode, Endpoint, ServiceKey};
use fedmesh_tunnel::peers::Peers;

use crate::balancer::Target;
use crate::locality::{Level, Locality};
use fedmesh_api::policy::PolicySpec;

use crate::config::Settings;
use crate::policy::ServicePolicy;

/// Where an attempt goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetKey {
    /// A local endpoint, reached directly.
    Local(SocketAddr),
    /// A remote cluster, reached through its gateways (directly, or through
    /// a local egress gateway).
    Remote(String),
}

impl TargetKey {
    /// The cluster label of metrics: ours, or the remote one.
    pub fn cluster<'a>(&'a self, ours: &'a str) -> &'a str {
        match self {
            TargetKey::Local(_) => ours,
            TargetKey::Remote(c) => c,
        }
    }
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetKey::Local(a) => write!(f, "{a}"),
            TargetKey::Remote(c) => write!(f, "cluster {c}"),
        }
    }
}

/// A remote cluster serving a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCluster {
    pub cluster: String,
    pub cloud: String,
    pub region: String,
    pub healthy: u64,
    pub total: u64,
}

/// One service as configured or discovered.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub key: ServiceKey,
    /// The port remote clusters serve it on (named in `TunnelOpen`).
    pub port: u16,
    pub local: Vec<Endpoint>,
    pub remote: Vec<RemoteCluster>,
    /// Its effective global traffic policy, as the controller or the file
    /// gave it; [`Table::build`] puts it over the proxy's settings.
    pub policy: Option<Arc<PolicySpec>>,
}

/// One service's targets, ready for the balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct Routable {
    pub key: ServiceKey,
    pub port: u16,
    pub targets: Vec<Target<TargetKey>>,
    /// Zone of each local endpoint, for metrics and access logs.
    pub zones: HashMap<SocketAddr, String>,
    /// Its knobs: the proxy's settings under its policy (failover order,
    /// weights, routes, timeouts, retries, outliers, limits).
    pub policy: Arc<ServicePolicy>,
}

/// Every service this proxy can route to, and how remote clusters are
/// reached.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub cluster: String,
    pub services: HashMap<ServiceKey, Arc<Routable>>,
    /// Through a local egress gateway, or straight to the peers' gateways.
    pub egress: EgressMode,
    /// Other clusters' trust domains and gateways, for `direct`.
    pub peers: Arc<Peers>,
}

impl fedmesh_tunnel::peers::HasPeers for Table {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn peers(&self) -> &Peers {
        &self.peers
    }
}

impl Table {
    /// The table seen from `me` in `cluster`, each service's policy put
    /// over `settings`.
    pub fn build(cluster: &str, me: &Locality, settings: &Settings, specs: &[ServiceSpec]) -> Self {
        let services = specs
            .iter()
            .map(|s| {
                let policy = Arc::new(ServicePolicy::resolve(settings, s.policy.as_deref()));
                (s.key.clone(), Arc::new(routable(cluster, me, s, policy)))
            })
            .collect();
        Self {
            cluster: cluster.into(),
            services,
            egress: settings.egress.unwrap_or_default(),
            peers: Arc::default(),
        }
    }

    /// This table, reaching remote clusters as `egress` says, with `peers`.
    pub fn reaching(mut self, egress: EgressMode, peers: Peers) -> Self {
        self.egress = egress;
        self.peers = Arc::new(peers);
        self
    }

    /// The service a Host / `:authority` names, if any.
    pub fn by_host(&self, host: &str) -> Option<&Arc<Routable>> {
        self.services.get(&service_of_host(host)?)
    }
}

fn routable(cluster: &str, me: &Locality, s: &ServiceSpec, policy: Arc<ServicePolicy>) -> Routable {
    let mut targets = Vec::with_capacity(s.local.len() + s.remote.len());
    let mut zones = HashMap::new();
    let failover = &policy.failover;
    let group = |c: &str| {
        policy
            .weights
            .iter()
            .position(|(w, _)| w == c)
            .and_then(|g| u16::try_from(g).ok())
    };
    for e in &s.local {
        // Local endpoints share our cloud and region; only the zone differs.
        let level = if e.zone == me.zone {
            Level::Zone
        } else {
            Level::Region
        };
        targets.push(Target {
            key: TargetKey::Local(e.address),
            priority: failover.priority(cluster, cluster, level),
            healthy: u64::from(e.healthy),
            total: 1,
            group: group(cluster),
        });
        zones.insert(e.address, e.zone.clone());
    }
    for r in s.remote.iter().filter(|r| r.cluster != cluster) {
        let there = Locality {
            cloud: r.cloud.clone(),
            region: r.region.clone(),
            zone: String::new(),
        };
        // Another cluster is never our zone, even in our region.
        let level = me.level_of(&there).max(Level::Region);
        targets.push(Target {
            key: TargetKey::Remote(r.cluster.clone()),
            priority: failover.priority(cluster, &r.cluster, level),
            healthy: r.healthy,
            // A summary racing its own update may say healthy > total.
            total: r.total.max(r.healthy),
            group: group(&r.cluster),
        });
    }
    Routable {
        key: s.key.clone(),
        port: s.port,
        targets,
        zones,
        policy,
    }
}

/// The service a Host header names: `name.namespace[.svc[.cluster.local |
/// .clusterset.local]][:port]`, any case, with or without a trailing dot.
pub fn service_of_host(host: &str) -> Option<ServiceKey> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let base = [".svc.clusterset.local", ".svc.cluster.local", ".svc"]
        .iter()
        .find_map(|s| host.strip_suffix(s))
        .unwrap_or(&host);
    let (name, namespace) = base.split_once('.')?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return None;
    }
    Some(ServiceKey::new(namespace, name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locality::FailoverOrder;

    fn me() -> Locality {
        Locality {
            cloud: "aws".into(),
            region: "use1".into(),
            zone: "az1".into(),
        }
    }

    #[test]
    fn hosts_name_services_in_every_usual_form() {
        let cart = Some(ServiceKey::new("shop", "cart"));
        for h in [
            "cart.shop",
            "cart.shop:8080",
            "Cart.Shop.svc",
            "cart.shop.svc.cluster.local",
            "cart.shop.svc.clusterset.local.",
            "cart.shop.svc.clusterset.local:80",
        ] {
            assert_eq!(service_of_host(h), cart, "{h}");
        }
        for h in ["cart", "cart.shop.example.com", ".shop", "cart.", ""] {
            assert_eq!(service_of_host(h), None, "{h}");
        }
    }

    #[test]
    fn targets_sit_at_their_level_and_our_own_cluster_is_never_remote() {
        let spec = ServiceSpec {
            key: ServiceKey::new("shop", "cart"),
            port: 8080,
            local: vec![
                Endpoint {
                    address: "127.0.1.10:8080".parse().unwrap(),
                    zone: "az1".into(),
                    healthy: true,
                },
                Endpoint {
                    address: "127.0.1.11:8080".parse().unwrap(),
                    zone: "az2".into(),
                    healthy: false,
                },
            ],
            remote: vec![
                RemoteCluster {
                    cluster: "aws-usw2".into(),
                    cloud: "aws".into(),
                    region: "usw2".into(),
                    healthy: 2,
                    total: 3,
                },
                RemoteCluster {
                    cluster: "aws-use1-b".into(),
                    cloud: "aws".into(),
                    region: "use1".into(),
                    healthy: 1,
                    total: 1,
                },
                RemoteCluster {
                    cluster: "gcp".into(),
                    cloud: "gcp".into(),
                    region: "usc1".into(),
                    healthy: 4,
                    total: 4,
                },
                RemoteCluster {
                    cluster: "aws".into(),
                    cloud: "aws".into(),
                    region: "use1".into(),
                    healthy: 9,
                    total: 9,
                },
            ],
            policy: None,
        };
        let t = Table::build("aws", &me(), &Settings::default(), &[spec]);
        let r = t.by_host("cart.shop").unwrap();
        let levels: Vec<(String, u8, u64)> = r
            .targets
            .iter()
            .map(|t| (t.key.to_string(), t.priority, t.healthy))
            .collect();
        assert_eq!(
            levels,
            [
                ("127.0.1.10:8080".into(), Level::Zone as u8, 1),
                ("127.0.1.11:8080".into(), Level::Region as u8, 0),
                ("cluster aws-usw2".into(), Level::Cloud as u8, 2),
                ("cluster aws-use1-b".into(), Level::Region as u8, 1),
                ("cluster gcp".into(), Level::Other as u8, 4),
            ]
        );
    }

    #[test]
    fn an_explicit_cluster_order_sends_failover_to_the_first_listed_cluster() {
        use crate::balancer::{Balancer, BalancerPolicy, Draw};
        let remote = |cluster: &str, healthy| RemoteCluster {
            cluster: cluster.into(),
            cloud: cluster.into(),
            region: "r1".into(),
            healthy,
            total: healthy,
        };
        let spec = |failover| ServiceSpec {
            policy: Some(Arc::new(PolicySpec {
                service: "shop/cart".into(),
                failover: Some(failover),
                ..Default::default()
            })),
            key: ServiceKey::new("shop", "cart"),
            port: 8080,
            local: vec![Endpoint {
                address: "127.0.1.10:8080".parse().unwrap(),
                zone: "az1".into(),
                healthy: false,
            }],
            // gcp has more capacity; by locality both are "other".
            remote: vec![remote("gcp", 9), remote("azure", 1)],
        };
        let picks = |failover| {
            let t = Table::build("aws", &me(), &Settings::default(), &[spec(failover)]);
            let svc = t.by_host("cart.shop").unwrap().clone();
            let mut b = Balancer::new(BalancerPolicy::default());
            let now = std::time::Instant::now();
            (0..100)
                .map(|i| {
                    let draw = Draw {
                        level: f64::from(i) / 100.0,
                        weight: 0.5,
                        a: i as usize,
                        b: 7 * i as usize,
                    };
                    b.choose(&svc.targets, &[], draw, now).unwrap()
                })
                .filter(|k| *k == TargetKey::Remote("azure".into()))
                .count()
        };
        assert!(
            picks(FailoverOrder::Locality) < 50,
            "by capacity, gcp gets most"
        );
        assert_eq!(
            picks(FailoverOrder::Clusters(vec!["azure".into(), "gcp".into()])),
            100
        );
    }
}
