//! A client's copy of the mesh, kept up to date from discovery responses.
//! I/O-free. [`MeshState::apply`] checks each service on its own: one it
//! cannot accept is skipped (it keeps its last good value) and named, and
//! the rest applies, so one bad export never freezes a client. What cannot
//! be split by service (a full snapshot without its peers, a nameless peer)
//! fails the whole response, which then changes nothing.

use std::collections::BTreeMap;

use std::net::SocketAddr;

use fedmesh_api::policy::PolicySpec;
use fedmesh_api::{Endpoint, ServiceKey};
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_trust::{Bundle, BundleSet, TrustDomain};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshState {
    pub version_info: String,
    pub cluster: String,
    pub services: BTreeMap<ServiceKey, pb::Service>,
    /// Trust domain → SPIFFE bundle document.
    pub bundles: BTreeMap<String, String>,
    /// Every other registered cluster, by name.
    pub peers: BTreeMap<String, pb::PeerCluster>,
    /// How this cluster's proxies reach the peers (its registration's).
    pub egress: fedmesh_api::EgressMode,
    /// Services the client could not accept, with why. Each keeps its last
    /// good value in `services` (or is absent, if it never had one).
    pub rejected: BTreeMap<String, String>,
}

/// A discovered service's ports: at least one, each 1-65535, none twice.
pub fn service_ports(s: &pb::Service) -> Result<Vec<u16>, String> {
    let ports = s
        .ports
        .iter()
        .map(|&p| u16::try_from(p).map_err(|_| format!("port {p} is out of range (1-65535)")))
        .collect::<Result<Vec<u16>, String>>()?;
    fedmesh_api::validate_ports(&ports).map_err(|e| e.to_string())?;
    Ok(ports)
}

/// Everything a client needs of a service to use it: a name, valid ports
/// and readable local endpoints, and a name for every remote cluster.
pub fn check_service(s: &pb::Service) -> Result<(), String> {
    if s.namespace.is_empty() || s.name.is_empty() {
        return Err("empty namespace or name".into());
    }
    service_ports(s)?;
    local_endpoints(s)?;
    if s.remote.iter().any(|r| r.cluster.is_empty()) {
        return Err("a remote cluster with an empty name".into());
    }
    service_policy(s)?;
    Ok(())
}

/// A service's effective traffic policy, checked as `fedmesh apply` checks
/// it; `None` when no policy applies.
pub fn service_policy(s: &pb::Service) -> Result<Option<PolicySpec>, String> {
    let Some(p) = &s.policy else { return Ok(None) };
    let spec: PolicySpec =
        serde_json::from_str(&p.spec).map_err(|e| format!("policy: not a policy spec: {e}"))?;
    spec.validate().map_err(|e| format!("policy: spec.{e}"))?;
    Ok(Some(spec))
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
    /// Applies a response, service by service. Returns the services it
    /// skipped, each named with why (`shop/evil: ...`): the caller reports
    /// them in its ACK. On error nothing is changed: the caller NACKs and
    /// keeps its last good state.
    pub fn apply(&mut self, r: &pb::DiscoveryResponse) -> Result<Vec<String>, String> {
        let snap = r.snapshot.as_ref().ok_or("response without a snapshot")?;
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
        let egress = match snap.peers.as_ref().map(|p| pb::Egress::try_from(p.egress)) {
            None => self.egress,
            Some(Ok(pb::Egress::Direct)) => fedmesh_api::EgressMode::Direct,
            Some(Ok(pb::Egress::Gateway)) => fedmesh_api::EgressMode::Gateway,
            // A newer controller's mode, which this client cannot follow.
            Some(Err(_)) => {
                return Err(format!(
                    "peers.egress: {} is not a mode this client knows (direct, gateway)",
                    snap.peers.as_ref().map_or(0, |p| p.egress)
                ));
            }
        };
        let checked: Vec<_> = snap
            .services
            .iter()
            .map(|s| (s, check_service(s)))
            .collect();
        if !r.incremental {
            // A full snapshot replaces everything, except that a service it
            // carries in a form we cannot accept keeps its last good value.
            let mut last_good = std::mem::take(&mut self.services);
            self.services = checked
                .iter()
                .filter(|(_, ok)| ok.is_err())
                .filter_map(|(s, _)| {
                    let key = ServiceKey::new(&s.namespace, &s.name);
                    last_good.remove(&key).map(|v| (key, v))
                })
                .collect();
            self.bundles.clear();
            self.rejected.clear();
        }
        let mut skipped = Vec::new();
        for (s, ok) in checked {
            let name = format!("{}/{}", s.namespace, s.name);
            match ok {
                Ok(()) => {
                    self.rejected.remove(&name);
                    self.services
                        .insert(ServiceKey::new(&s.namespace, &s.name), s.clone());
                }
                Err(why) => {
                    skipped.push(format!("service {name}: {why}"));
                    self.rejected.insert(name, why);
                }
            }
        }
        for k in &r.removed {
            self.rejected.remove(&format!("{}/{}", k.namespace, k.name));
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
        self.egress = egress;
        self.cluster = snap.cluster.clone();
        self.version_info = r.version_info.clone();
        Ok(skipped)
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
                peers: peers.map(|clusters| pb::Peers {
                    clusters,
                    egress: 0,
                }),
            }),
            incremental,
            removed: vec![],
            more: false,
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
    fn the_egress_mode_rides_with_the_peers_and_an_unknown_one_is_refused() {
        use fedmesh_api::EgressMode;
        let with = |egress: i32| {
            let mut r = response(true, Some(vec![peer("gcp")]));
            r.snapshot.as_mut().unwrap().peers.as_mut().unwrap().egress = egress;
            r
        };
        let mut s = MeshState::default();
        s.apply(&with(pb::Egress::Gateway.into())).unwrap();
        assert_eq!(s.egress, EgressMode::Gateway);
        // Peers not sent: the mode stays.
        s.apply(&response(true, None)).unwrap();
        assert_eq!(s.egress, EgressMode::Gateway);
        let before = s.clone();
        let e = s.apply(&with(7)).unwrap_err();
        assert!(e.contains("peers.egress: 7"), "{e}");
        assert_eq!(s, before, "a refused response changes nothing");
        s.apply(&with(pb::Egress::Direct.into())).unwrap();
        assert_eq!(s.egress, EgressMode::Direct);
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

    fn service(name: &str, ports: Vec<u32>) -> pb::Service {
        pb::Service {
            namespace: "shop".into(),
            name: name.into(),
            ports,
            ..Default::default()
        }
    }

    fn with_services(
        incremental: bool,
        services: Vec<pb::Service>,
        version: &str,
    ) -> pb::DiscoveryResponse {
        let mut r = response(incremental, Some(vec![peer("gcp")]));
        r.version_info = version.into();
        r.snapshot.as_mut().unwrap().services = services;
        r
    }

    #[test]
    fn a_bad_service_is_skipped_and_named_and_the_rest_applies() {
        let mut s = MeshState::default();
        let skipped = s
            .apply(&with_services(
                false,
                vec![service("cart", vec![8080]), service("evil", vec![0])],
                "v1",
            ))
            .unwrap();
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("shop/evil") && skipped[0].contains("out of range"));
        assert_eq!(s.version_info, "v1");
        assert!(s.services.contains_key(&ServiceKey::new("shop", "cart")));
        assert!(!s.services.contains_key(&ServiceKey::new("shop", "evil")));
        assert!(s.rejected.contains_key("shop/evil"));

        // A later update applies around the bad service.
        let skipped = s
            .apply(&with_services(
                true,
                vec![
                    service("new", vec![9090]),
                    service("cart", vec![8080, 8080]),
                ],
                "v2",
            ))
            .unwrap();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(s.services.contains_key(&ServiceKey::new("shop", "new")));
        let cart = &s.services[&ServiceKey::new("shop", "cart")];
        assert_eq!(cart.ports, [8080], "cart keeps its last good value");

        // Even a full snapshot keeps a rejected service's last good value.
        let skipped = s
            .apply(&with_services(
                false,
                vec![service("cart", vec![]), service("new", vec![9090])],
                "v3",
            ))
            .unwrap();
        assert!(skipped[0].contains("at least one port"), "{skipped:?}");
        assert_eq!(s.services[&ServiceKey::new("shop", "cart")].ports, [8080]);
        assert_eq!(
            s.rejected.keys().collect::<Vec<_>>(),
            ["shop/cart"],
            "evil is no longer in the mesh"
        );

        // Fixed: accepted, and no longer reported.
        s.apply(&with_services(
            true,
            vec![service("cart", vec![8081])],
            "v4",
        ))
        .unwrap();
        assert!(s.rejected.is_empty());
        assert_eq!(s.services[&ServiceKey::new("shop", "cart")].ports, [8081]);
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

    #[test]
    fn a_service_whose_policy_cannot_be_used_is_skipped_and_keeps_its_last_good_value() {
        let svc = |name: &str, policy: Option<&str>| pb::Service {
            namespace: "shop".into(),
            name: name.into(),
            ports: vec![8080],
            policy: policy.map(|spec| pb::ServicePolicy {
                spec: spec.into(),
                sources: vec![],
            }),
            ..Default::default()
        };
        let mut s = MeshState::default();
        let mut first = response(false, Some(vec![]));
        first.snapshot.as_mut().unwrap().services =
            vec![svc("cart", Some(r#"{"service":"shop/cart","retries":1}"#))];
        assert!(s.apply(&first).unwrap().is_empty());
        let mut next = response(true, None);
        next.snapshot.as_mut().unwrap().services = vec![
            svc(
                "cart",
                Some(r#"{"service":"shop/cart","failoverThreshold":1.5}"#),
            ),
            svc("pay", Some(r#"{"service":"shop/pay","retries":2}"#)),
        ];
        let skipped = s.apply(&next).unwrap();
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].contains("shop/cart") && skipped[0].contains("failoverThreshold"),
            "{skipped:?}"
        );
        let cart = service_policy(&s.services[&ServiceKey::new("shop", "cart")])
            .unwrap()
            .unwrap();
        assert_eq!(cart.retries, Some(1), "the last good policy stays");
        let pay = service_policy(&s.services[&ServiceKey::new("shop", "pay")])
            .unwrap()
            .unwrap();
        assert_eq!(pay.retries, Some(2), "the rest applies");
        assert!(
            service_policy(&svc("x", Some("not json")))
                .unwrap_err()
                .contains("not a policy spec")
        );
    }
}
