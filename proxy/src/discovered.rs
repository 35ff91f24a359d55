//! The table from the controller's discovery stream. I/O-free: a function
//! from the client's [`MeshState`] to the proxy's service specs, peers and
//! egress mode. The discovery client has already skipped (and reported)
//! any service it could not accept, so only an update for another cluster
//! fails whole.

use fedmesh_discovery::MeshState;
use fedmesh_trust::BundleSet;

use std::sync::Arc;

use crate::config::{Me, Settings};
use crate::table::{RemoteCluster, ServiceSpec, Table};

/// The table `m` describes for a proxy `me`: its services, the peers'
/// gateways, and the cluster's egress mode unless `settings` set one.
pub fn table(
    me: &Me,
    settings: &Settings,
    m: &MeshState,
    bundles: &BundleSet,
) -> Result<Table, String> {
    let specs = services(&me.cluster, m)?;
    let peers = fedmesh_tunnel::peers::from_discovery(&m.peers, bundles);
    Ok(Table::build(&me.cluster, &me.locality, settings, &specs)
        .reaching(settings.egress.unwrap_or(m.egress), peers))
}

/// The services `m` describes, for a proxy in `cluster`, each with its
/// traffic policy.
pub fn services(cluster: &str, m: &MeshState) -> Result<Vec<ServiceSpec>, String> {
    if m.cluster != cluster {
        return Err(format!(
            "the controller serves cluster {:?}, but this proxy belongs to {cluster:?}",
            m.cluster
        ));
    }
    let mut out = Vec::with_capacity(m.services.len());
    for (key, s) in &m.services {
        // `MeshState` holds only services that passed `check_service`.
        let (Ok(ports), Ok(local), Ok(policy)) = (
            fedmesh_discovery::service_ports(s),
            fedmesh_discovery::local_endpoints(s),
            fedmesh_discovery::service_policy(s),
        ) else {
            continue;
        };
        let Some(&port) = ports.first() else {
            continue;
        };
        let remote = s
            .remote
            .iter()
            .map(|r| RemoteCluster {
                cluster: r.cluster.clone(),
                cloud: r.cloud.clone(),
                region: r.region.clone(),
                // An unverified cluster (its liveness key lapsed) keeps its
                // last known capacity: whether it still works is for the
                // data plane's own signals to say, never the control plane.
                healthy: r.healthy,
                total: r.localities.iter().map(|z| u64::from(z.total)).sum(),
            })
            .collect();
        out.push(ServiceSpec {
            key: key.clone(),
            port,
            local,
            remote,
            policy: policy.map(Arc::new),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_api::ServiceKey;
    use fedmesh_proto::discovery::v1 as pb;

    fn mesh(verified: bool) -> MeshState {
        let mut m = MeshState {
            cluster: "aws".into(),
            ..Default::default()
        };
        m.services.insert(
            ServiceKey::new("shop", "cart"),
            pb::Service {
                namespace: "shop".into(),
                name: "cart".into(),
                ports: vec![8080],
                local: vec![pb::LocalEndpoint {
                    address: "127.0.1.10:8080".into(),
                    zone: "az1".into(),
                    healthy: true,
                }],
                remote: vec![pb::RemoteCluster {
                    cluster: "gcp".into(),
                    cloud: "gcp".into(),
                    region: "usc1".into(),
                    localities: vec![
                        pb::ZoneCapacity {
                            zone: "a".into(),
                            healthy: 2,
                            total: 2,
                            weight: 1,
                        },
                        pb::ZoneCapacity {
                            zone: "b".into(),
                            healthy: 1,
                            total: 3,
                            weight: 1,
                        },
                    ],
                    healthy: 3,
                    verified,
                    ..Default::default()
                }],
                exported: false,
                policy: None,
            },
        );
        m
    }

    #[test]
    fn a_mesh_becomes_specs_and_an_unverified_cluster_keeps_its_capacity() {
        let s = services("aws", &mesh(true)).unwrap();
        assert_eq!(s[0].port, 8080);
        assert_eq!(s[0].local[0].address.to_string(), "127.0.1.10:8080");
        assert_eq!((s[0].remote[0].healthy, s[0].remote[0].total), (3, 5));
        // Static stability: a lapsed liveness key never zeroes a cluster;
        // the data plane's own signals decide.
        let s = services("aws", &mesh(false)).unwrap();
        assert_eq!((s[0].remote[0].healthy, s[0].remote[0].total), (3, 5));
    }

    #[test]
    fn an_update_for_another_cluster_is_refused_whole() {
        assert!(
            services("gcp", &mesh(true))
                .unwrap_err()
                .contains("serves cluster")
        );
    }
}
