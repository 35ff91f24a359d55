//! The mesh view pushed to this cluster's proxies and gateways: for each
//! service its local endpoints, one virtual endpoint per remote cluster that
//! exports it, and every trust bundle.
//!
//! [`MeshBuilder`] is I/O-free and incremental: given new inputs it
//! recomputes only the services whose exports or local endpoints changed
//! (found by diffing the global view's persistent maps), and everything only
//! when cluster records or liveness change, which is rare.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fedmesh_api::{LocalService, LocalServices, ServiceKey};
use fedmesh_proto::discovery::v1 as pb;
use imbl::OrdMap;
use imbl::ordmap::DiffItem;

use crate::view::GlobalView;

#[derive(Debug, Clone)]
pub struct MeshBuilder {
    cluster: String,
    local: Arc<LocalServices>,
    global: Arc<GlobalView>,
    services: OrdMap<ServiceKey, pb::Service>,
    bundles: BTreeMap<String, String>,
}

impl MeshBuilder {
    pub fn new(cluster: &str, keys: fedmesh_api::KeySpace) -> Self {
        Self {
            cluster: cluster.to_owned(),
            local: Arc::default(),
            global: Arc::new(GlobalView::new(keys)),
            services: OrdMap::new(),
            bundles: BTreeMap::new(),
        }
    }

    /// Moves to new inputs. Returns whether the mesh changed.
    pub fn update(&mut self, local: Arc<LocalServices>, global: Arc<GlobalView>) -> bool {
        let old = std::mem::replace(&mut self.global, global);
        let old_local = std::mem::replace(&mut self.local, local);
        let g = self.global.clone();

        // Cluster records (gateways, locality) and liveness shape every
        // remote endpoint: recompute everything when they move.
        let everything = !old.clusters.ptr_eq(&g.clusters) || !old.alive.ptr_eq(&g.alive);
        let mut affected: BTreeSet<ServiceKey> = BTreeSet::new();
        if everything {
            affected.extend(self.services.keys().cloned());
            affected.extend(self.local.keys().cloned());
            affected.extend(g.by_service.keys().cloned());
        } else {
            for d in old.by_service.diff(&g.by_service) {
                affected.insert(match d {
                    DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k.clone(),
                    DiffItem::Update { new: (k, _), .. } => k.clone(),
                });
            }
            if !Arc::ptr_eq(&old_local, &self.local) {
                let keys: BTreeSet<&ServiceKey> =
                    old_local.keys().chain(self.local.keys()).collect();
                for k in keys {
                    if old_local.get(k) != self.local.get(k) {
                        affected.insert(k.clone());
                    }
                }
            }
        }

        let mut changed = false;
        for key in affected {
            match self.service(&key) {
                Some(svc) => {
                    if self.services.get(&key) != Some(&svc) {
                        self.services.insert(key, svc);
                        changed = true;
                    }
                }
                None => changed |= self.services.remove(&key).is_some(),
            }
        }
        if !old.bundles.ptr_eq(&g.bundles) || self.bundles.len() != g.bundles.len() {
            let bundles: BTreeMap<String, String> = g
                .bundles
                .iter()
                .map(|(td, b)| (td.clone(), b.to_document()))
                .collect();
            if bundles != self.bundles {
                self.bundles = bundles;
                changed = true;
            }
        }
        changed
    }

    /// The services, as a persistent map: O(1) to clone.
    pub fn services(&self) -> OrdMap<ServiceKey, pb::Service> {
        self.services.clone()
    }

    pub fn bundles(&self) -> &BTreeMap<String, String> {
        &self.bundles
    }

    /// The whole mesh in its wire form.
    pub fn snapshot(&self) -> pb::MeshSnapshot {
        pb::MeshSnapshot {
            cluster: self.cluster.clone(),
            services: self.services.values().cloned().collect(),
            bundles: self.bundles.clone().into_iter().collect(),
        }
    }

    /// One service: our endpoints plus a virtual endpoint per remote cluster.
    /// `None` when nobody has it.
    fn service(&self, key: &ServiceKey) -> Option<pb::Service> {
        let local = self.local.get(key);
        let g = &self.global;
        let remote: Vec<pb::RemoteCluster> = g
            .by_service
            .get(key)
            .into_iter()
            .flat_map(|per_cluster| per_cluster.iter())
            .filter(|(c, _)| **c != self.cluster)
            // An export without a cluster record cannot be reached: no gateways.
            .filter_map(|(c, summary)| {
                let record = g.clusters.get(c)?;
                Some(pb::RemoteCluster {
                    cluster: c.clone(),
                    cloud: record.cloud.clone(),
                    region: record.region.clone(),
                    localities: summary
                        .localities
                        .iter()
                        .map(|l| pb::ZoneCapacity {
                            zone: l.zone.clone(),
                            healthy: l.healthy,
                            total: l.total,
                            weight: l.weight,
                        })
                        .collect(),
                    healthy: summary.healthy(),
                    gateways: record
                        .gateways
                        .iter()
                        .map(|gw| pb::GatewayAddress {
                            address: gw.address.clone(),
                            port: u32::from(gw.port),
                        })
                        .collect(),
                    trust_domain: record.trust_domain.clone(),
                    // An expired `alive` key marks the cluster unverified;
                    // traffic continues while the data plane's signals allow.
                    verified: g.alive.contains_key(c),
                })
            })
            .collect();
        if local.is_none() && remote.is_empty() {
            return None;
        }
        let ports = match local {
            Some(l) => l.ports.clone(),
            None => g
                .by_service
                .get(key)
                .and_then(|m| m.values().next())
                .map(|s| s.ports.clone())
                .unwrap_or_default(),
        };
        Some(pb::Service {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            ports: ports.into_iter().map(u32::from).collect(),
            local: local.map(local_endpoints).unwrap_or_default(),
            remote,
        })
    }
}

fn local_endpoints(s: &LocalService) -> Vec<pb::LocalEndpoint> {
    s.endpoints
        .iter()
        .map(|e| pb::LocalEndpoint {
            address: e.address.to_string(),
            zone: e.zone.clone(),
            healthy: e.healthy,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{RawEvent, RawKv};
    use fedmesh_api::{Endpoint, KeySpace};

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

    fn local() -> Arc<LocalServices> {
        Arc::new(LocalServices::from([(
            ServiceKey::new("shop", "cart"),
            LocalService {
                ports: vec![8080],
                endpoints: vec![Endpoint {
                    address: "127.0.1.10:8080".parse().unwrap(),
                    zone: "az1".into(),
                    healthy: true,
                }],
            },
        )]))
    }

    fn remotes(b: &MeshBuilder, name: &str) -> Vec<(String, u64, bool)> {
        b.snapshot()
            .services
            .iter()
            .find(|s| s.name == name)
            .map(|s| {
                s.remote
                    .iter()
                    .map(|r| (r.cluster.clone(), r.healthy, r.verified))
                    .collect()
            })
            .unwrap_or_default()
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

        let mut b = MeshBuilder::new("aws", ks);
        assert!(b.update(local(), Arc::new(g)));
        let snap = b.snapshot();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.services[0].local.len(), 1);
        assert_eq!(
            remotes(&b, "cart"),
            [("azure".into(), 3, false), ("gcp".into(), 2, true)]
        );
        assert_eq!(snap.services[0].remote[0].gateways[0].port, 15443);
    }

    #[test]
    fn updates_touch_only_what_changed_and_match_a_full_rebuild() {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        put(&mut g, ks.cluster("gcp"), record("gcp"), 1);
        for i in 0..50 {
            put(
                &mut g,
                ks.export("gcp", "shop", &format!("s{i}")),
                export(3),
                2 + i,
            );
        }
        let mut b = MeshBuilder::new("aws", ks.clone());
        let l = local();
        assert!(b.update(l.clone(), Arc::new(g.clone())));
        // Same inputs: nothing changes.
        assert!(!b.update(l.clone(), Arc::new(g.clone())));

        // One export changes; another appears; one disappears.
        put(&mut g, ks.export("gcp", "shop", "s7"), export(1), 100);
        put(&mut g, ks.export("gcp", "shop", "new"), export(2), 101);
        g.apply_event(RawEvent::Delete {
            key: ks.export("gcp", "shop", "s9"),
            mod_revision: 102,
        });
        assert!(b.update(l.clone(), Arc::new(g.clone())));
        assert_eq!(remotes(&b, "s7"), [("gcp".into(), 1, false)]);
        assert_eq!(remotes(&b, "new"), [("gcp".into(), 2, false)]);
        assert!(remotes(&b, "s9").is_empty());

        // Liveness changes every remote endpoint.
        put(
            &mut g,
            ks.alive("gcp"),
            serde_json::json!({"controller": "c", "startedAt": "2026-11-24T00:00:00Z", "version": "0.1"}),
            103,
        );
        assert!(b.update(l.clone(), Arc::new(g.clone())));
        assert!(remotes(&b, "s3")[0].2);

        // The incremental result equals a fresh build from the same inputs.
        let mut fresh = MeshBuilder::new("aws", ks);
        fresh.update(l, Arc::new(g));
        assert_eq!(b.snapshot(), fresh.snapshot());
    }
}
