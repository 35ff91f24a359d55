//! The mesh view pushed to this cluster's proxies and gateways: for each
//! service its local endpoints, one virtual endpoint per remote cluster that
//! exports it, and every trust bundle. I/O-free: built from the local
//! services and the global view.

use std::collections::BTreeMap;

use fedmesh_api::{Endpoint, GatewayAddress, LocalServices, ServiceKey, ZoneCapacity};
use serde::Serialize;

use crate::view::GlobalView;

/// A remote cluster as one endpoint of a service: never one per gateway, so
/// that one ejection cannot blackhole everything behind a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCluster {
    pub cluster: String,
    pub cloud: String,
    pub region: String,
    pub localities: Vec<ZoneCapacity>,
    /// Healthy endpoints across the cluster's zones: the endpoint's weight.
    pub healthy: u64,
    pub gateways: Vec<GatewayAddress>,
    pub trust_domain: String,
    /// False when the cluster's `alive` key has expired: traffic continues,
    /// but the data plane's own signals decide.
    pub verified: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct MeshService {
    pub ports: Vec<u16>,
    pub local: Vec<Endpoint>,
    pub remote: Vec<RemoteCluster>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct MeshView {
    pub cluster: String,
    pub services: BTreeMap<ServiceKey, MeshService>,
    /// Trust domain → SPIFFE bundle document.
    pub bundles: BTreeMap<String, String>,
}

/// Builds the view of `cluster` from its own services and the global zone.
pub fn build(cluster: &str, local: &LocalServices, global: &GlobalView) -> MeshView {
    let mut services: BTreeMap<ServiceKey, MeshService> = local
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                MeshService {
                    ports: s.ports.clone(),
                    local: s.endpoints.clone(),
                    remote: Vec::new(),
                },
            )
        })
        .collect();
    for ((c, ns, name), summary) in &global.exports {
        if c == cluster {
            continue;
        }
        // An export without a cluster record cannot be reached: no gateways.
        let Some(record) = global.clusters.get(c) else {
            continue;
        };
        let entry = services.entry(ServiceKey::new(ns, name)).or_default();
        if entry.ports.is_empty() {
            entry.ports = summary.ports.clone();
        }
        entry.remote.push(RemoteCluster {
            cluster: c.clone(),
            cloud: record.cloud.clone(),
            region: record.region.clone(),
            localities: summary.localities.clone(),
            healthy: summary.healthy(),
            gateways: record.gateways.clone(),
            trust_domain: record.trust_domain.clone(),
            verified: global.alive.contains_key(c),
        });
    }
    let bundles = global
        .bundles
        .iter()
        .map(|(td, b)| (td.clone(), b.to_document()))
        .collect();
    MeshView {
        cluster: cluster.to_owned(),
        services,
        bundles,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{RawEvent, RawKv};
    use fedmesh_api::{KeySpace, LocalService};

    fn put(v: &mut GlobalView, key: String, value: serde_json::Value, rev: i64) {
        v.apply_event(RawEvent::Put(RawKv {
            key,
            value: value.to_string().into_bytes(),
            mod_revision: rev,
        }));
    }

    fn record(name: &str) -> serde_json::Value {
        serde_json::json!({
            "name": name, "cloud": "gcp", "region": "europe-west1", "zones": ["b"],
            "trustDomain": format!("{name}.fedmesh"),
            "gateways": [{"address": "127.0.2.1", "port": 15443}],
            "registeredAt": "2026-11-24T00:00:00Z"
        })
    }

    fn export(healthy: u32) -> serde_json::Value {
        serde_json::json!({
            "ports": [8080],
            "localities": [{"zone": "b", "healthy": healthy, "total": 3, "weight": healthy}],
            "generation": 1
        })
    }

    #[test]
    fn one_virtual_endpoint_per_remote_cluster() {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        put(&mut g, ks.cluster("gcp"), record("gcp"), 1);
        put(&mut g, ks.cluster("azure"), record("azure"), 2);
        put(&mut g, ks.export("gcp", "shop", "cart"), export(2), 3);
        put(&mut g, ks.export("azure", "shop", "cart"), export(3), 4);
        put(&mut g, ks.export("aws", "shop", "cart"), export(3), 5); // ourselves
        put(&mut g, ks.export("ghost", "shop", "cart"), export(3), 6); // no record
        put(
            &mut g,
            ks.alive("gcp"),
            serde_json::json!({"controller": "c", "startedAt": "2026-11-24T00:00:00Z", "version": "0.1"}),
            7,
        );

        let local = LocalServices::from([(
            ServiceKey::new("shop", "cart"),
            LocalService {
                ports: vec![8080],
                endpoints: vec![Endpoint {
                    address: "127.0.1.10:8080".parse().unwrap(),
                    zone: "az1".into(),
                    healthy: true,
                }],
            },
        )]);
        let view = build("aws", &local, &g);
        let svc = &view.services[&ServiceKey::new("shop", "cart")];
        assert_eq!(svc.local.len(), 1);
        let remotes: Vec<(&str, u64, bool)> = svc
            .remote
            .iter()
            .map(|r| (r.cluster.as_str(), r.healthy, r.verified))
            .collect();
        assert_eq!(remotes, [("azure", 3, false), ("gcp", 2, true)]);
        assert_eq!(svc.remote[0].gateways[0].port, 15443);
    }
}
