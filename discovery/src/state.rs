//! A client's copy of the mesh, kept up to date from discovery responses.
//! I/O-free: [`MeshState::apply`] either applies a whole response or
//! changes nothing, so a client can NACK and keep its last good state.

use std::collections::BTreeMap;

use std::net::SocketAddr;

use fedmesh_api::{Endpoint, ServiceKey};
use fedmesh_proto::discovery::v1 as pb;
use trust_bundle::{Bundle, BundleSet, TrustDomain};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshState {
    pub version_info: String,
    pub cluster: String,
    pub services: BTreeMap<ServiceKey, pb::Service>,
    /// Trust domain → SPIFFE bundle document.
    pub bundles: BTreeMap<String, String>,
    /// Every other registered cluster, by name.
    pub peers: BTreeMap<String, pb::PeerCluster>,
}

/// A discovered service's ports, each checked to be 1-65535.
pub fn service_ports(s: &pb::Service) -> Result<Vec<u16>, String> {
    s.ports
        .iter()
        .map(|&p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p} is out of range"))
        })
        .collect()
}

/// A discovered service's local endpoints, each address checked.
pub fn local_endpoints(s: &pb::Service) -> Result<Vec<Endpoint>, String> {
    s.local
        .iter()
        .map(|e| {
            let address: SocketAddr = e
                .address
                .parse()
                .map_err(|_| format!("endpoint {:?} is not ip:port", e.address))?;
            Ok(Endpoint {
                address,
                zone: e.zone.clone(),
                healthy: e.healthy,
            })
        })
        .collect()
}

impl MeshState {
    /// Applies a response. On error nothing is changed: the caller NACKs
    /// and keeps its last good state.
    pub fn apply(&mut self, r: &pb::DiscoveryResponse) -> Result<(), String> {
        let snap = r.snapshot.as_ref().ok_or("response without a snapshot")?;
        if let Some(bad) = snap
            .services
            .iter()
            .find(|s| s.namespace.is_empty() || s.name.is_empty())
        {
            return Err(format!("service with an empty name: {bad:?}"));
        }
        if !r.incremental && snap.peers.is_none() {
            return Err("a full snapshot without its peer list".into());
        }
        if let Some(bad) = snap
            .peers
            .iter()
            .flat_map(|p| &p.clusters)
            .find(|p| p.cluster.is_empty())
        {
            return Err(format!("peer cluster with an empty name: {bad:?}"));
        }
        if !r.incremental {
            self.services.clear();
            self.bundles.clear();
        }
        for s in &snap.services {
            self.services
                .insert(ServiceKey::new(&s.namespace, &s.name), s.clone());
        }
        for k in &r.removed {
            self.services
                .remove(&ServiceKey::new(&k.namespace, &k.name));
        }
        if !r.incremental || !snap.bundles.is_empty() {
            self.bundles = snap
                .bundles
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
        }
        if let Some(peers) = &snap.peers {
            self.peers = peers
                .clusters
                .iter()
                .map(|p| (p.cluster.clone(), p.clone()))
                .collect();
        }
        self.cluster = snap.cluster.clone();
        self.version_info = r.version_info.clone();
        Ok(())
    }

    /// The bundles, parsed. An unreadable one is an error that names its
    /// trust domain, so the client NACKs rather than trust a partial set.
    pub fn bundle_set(&self) -> Result<BundleSet, String> {
        let mut set = BundleSet::new();
        for (td, doc) in &self.bundles {
            let name = TrustDomain::new(td).map_err(|e| format!("bundles[{td:?}]: {e}"))?;
            let bundle = Bundle::from_document(name, doc.as_bytes(), &format!("bundles[{td}]"))
                .map_err(|e| e.to_string())?;
            set.insert(bundle);
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str) -> pb::PeerCluster {
        pb::PeerCluster {
            cluster: name.into(),
            trust_domain: format!("{name}.fedmesh"),
            ..Default::default()
        }
    }

    fn response(incremental: bool, peers: Option<Vec<pb::PeerCluster>>) -> pb::DiscoveryResponse {
        pb::DiscoveryResponse {
            version_info: "1.1".into(),
            nonce: "1".into(),
            snapshot: Some(pb::MeshSnapshot {
                cluster: "aws".into(),
                services: vec![],
                bundles: Default::default(),
                peers: peers.map(|clusters| pb::Peers { clusters }),
            }),
            incremental,
            removed: vec![],
        }
    }

    #[test]
    fn peers_are_replaced_only_when_sent() {
        let mut s = MeshState::default();
        s.apply(&response(false, Some(vec![peer("gcp"), peer("azure")])))
            .unwrap();
        assert_eq!(s.peers.len(), 2);
        // Absent in an incremental response: unchanged.
        s.apply(&response(true, None)).unwrap();
        assert_eq!(s.peers.len(), 2);
        // Present and empty: the last peer left.
        s.apply(&response(true, Some(vec![]))).unwrap();
        assert!(s.peers.is_empty());
    }

    #[test]
    fn a_full_snapshot_must_carry_peers_and_a_bad_one_changes_nothing() {
        let mut s = MeshState::default();
        s.apply(&response(false, Some(vec![peer("gcp")]))).unwrap();
        let before = s.clone();
        assert!(s.apply(&response(false, None)).is_err());
        assert!(
            s.apply(&response(true, Some(vec![peer("")])))
                .unwrap_err()
                .contains("empty name")
        );
        assert_eq!(s, before);
    }

    #[test]
    fn an_unreadable_bundle_is_named() {
        let s = MeshState {
            bundles: BTreeMap::from([("gcp.fedmesh".into(), "{not json".into())]),
            ..Default::default()
        };
        let err = s.bundle_set().unwrap_err();
        assert!(err.contains("gcp"), "{err}");
    }
}
