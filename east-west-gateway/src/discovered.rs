//! Routes from the controller's discovery stream: [`routes`], an I/O-free
//! function from the client's [`MeshState`] to [`Routes`], and [`connect`],
//! the thin driver that starts the discovery client with it. A gateway asks only for what
//! its own cluster exports (plus the peers and bundles), so its memory does
//! not grow with other clusters' services.

use fedmesh_api::policy::PolicySpec;
use fedmesh_discovery::{ClientError, ClientPolicy, Discovered, MeshState};
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_trust::{BundleSet, SpiffeId, TrustDomain};

use crate::config::DiscoveryConfig;
use crate::routes::{AllowRule, ExportedService, Routes};

/// Gets the gateway's SVID from the controller and follows its discovery
/// stream. Returns once the first routes are in; after that the routes,
/// SVID and bundles follow the controller, and stay at their last good
/// value while it is away.
pub async fn connect(
    c: &DiscoveryConfig,
    policy: ClientPolicy,
) -> Result<Discovered<Routes>, ClientError> {
    let local = c.local.clone();
    let policy = ClientPolicy {
        scope: pb::Scope::Exported,
        ..policy
    };
    fedmesh_discovery::start(
        c.access.clone(),
        c.bootstrap.clone(),
        policy,
        move |m, b| routes(&local, m, b),
    )
    .await
}

/// Who this gateway is. The controller says everything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub zone: Option<String>,
}

/// The routes a mesh state describes: every service this cluster exports,
/// with its local endpoints and its traffic policy's allow rules, and every
/// other registered cluster as a peer.
pub fn routes(me: &Local, m: &MeshState, bundles: &BundleSet) -> Result<Routes, String> {
    if m.cluster != me.cluster {
        return Err(format!(
            "the controller serves cluster {:?}, but this gateway belongs to {:?}",
            m.cluster, me.cluster
        ));
    }
    let mut routes = Routes::new(&me.cluster, me.trust_domain.clone());
    routes.zone = me.zone.clone();
    routes.peers = fedmesh_tunnel::peers::from_discovery(&m.peers, bundles);
    for (key, s) in m.services.iter().filter(|(_, s)| s.exported) {
        // `MeshState` holds only services that passed `check_service`.
        let (Ok(ports), Ok(endpoints), Ok(policy)) = (
            fedmesh_discovery::service_ports(s),
            fedmesh_discovery::local_endpoints(s),
            fedmesh_discovery::service_policy(s),
        ) else {
            continue;
        };
        let allow = policy.as_ref().and_then(allow_rules);
        routes.services.insert(
            key.clone(),
            ExportedService {
                ports,
                endpoints,
                allow,
            },
        );
    }
    Ok(routes)
}

/// A policy's `export.allow`, as the ingress checks it; `None`: open to
/// every federated cluster. The policy was checked whole; an identity that
/// still does not parse admits nobody rather than everybody.
pub fn allow_rules(p: &PolicySpec) -> Option<Vec<AllowRule>> {
    let rules = p.export.as_ref()?.allow.as_ref()?;
    Some(
        rules
            .iter()
            .map(|r| AllowRule {
                cluster: r.cluster.clone(),
                identities: match &r.identities {
                    None => Vec::new(),
                    Some(ids) => {
                        let parsed: Vec<SpiffeId> =
                            ids.iter().filter_map(|i| i.parse().ok()).collect();
                        if parsed.is_empty() {
                            return AllowRule {
                                cluster: String::new(),
                                identities: Vec::new(),
                            };
                        }
                        parsed
                    }
                },
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::GatewayAddr;
    use fedmesh_api::ServiceKey;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn local() -> Local {
        Local {
            cluster: "gcp".into(),
            trust_domain: td("gcp.fedmesh"),
            zone: Some("b".into()),
        }
    }

    fn service(name: &str, exported: bool, endpoint: &str) -> pb::Service {
        pb::Service {
            namespace: "shop".into(),
            name: name.into(),
            ports: vec![8080],
            local: vec![pb::LocalEndpoint {
                address: endpoint.into(),
                zone: "b".into(),
                healthy: true,
            }],
            remote: vec![],
            exported,
            policy: None,
        }
    }

    fn mesh() -> MeshState {
        let mut m = MeshState {
            cluster: "gcp".into(),
            ..Default::default()
        };
        for s in [
            service("checkout", true, "127.0.2.10:8080"),
            service("remote-only", false, "127.0.2.11:8080"),
        ] {
            m.services.insert(ServiceKey::new("shop", &s.name), s);
        }
        m.peers.insert(
            "aws".into(),
            pb::PeerCluster {
                cluster: "aws".into(),
                trust_domain: "aws.fedmesh".into(),
                gateways: vec![pb::GatewayAddress {
                    address: "127.0.1.1".into(),
                    port: 15443,
                }],
                ..Default::default()
            },
        );
        m
    }

    #[test]
    fn exported_services_and_every_peer_become_routes() {
        let r = routes(&local(), &mesh(), &BundleSet::new()).unwrap();
        assert_eq!(r.zone.as_deref(), Some("b"));
        let keys: Vec<String> = r.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["shop/checkout"], "only what this cluster exports");
        let aws = &r.peers["aws"];
        assert_eq!(aws.trust_domain, td("aws.fedmesh"));
        assert_eq!(
            aws.gateways,
            [GatewayAddr::parse("127.0.1.1:15443").unwrap()]
        );
    }

    #[test]
    fn an_unverified_peer_stays_a_peer() {
        let mut m = mesh();
        let aws = m.peers.get_mut("aws").unwrap();
        aws.verified = false;
        aws.last_seen_unix_ms = 1;
        let r = routes(&local(), &m, &BundleSet::new()).unwrap();
        assert_eq!(r.peers["aws"].gateways.len(), 1);
    }

    #[test]
    fn only_an_update_for_another_cluster_is_refused_whole() {
        let mut other = mesh();
        other.cluster = "azure".into();
        assert!(
            routes(&local(), &other, &BundleSet::new())
                .unwrap_err()
                .contains("azure")
        );
    }
}
