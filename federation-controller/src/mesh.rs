//! The mesh view pushed to this cluster's proxies and gateways: for each
//! service its local endpoints, one virtual endpoint per remote cluster that
//! exports it, and every trust bundle.
//!
//! Nothing here is materialised: a version of the mesh is just its inputs
//! (this cluster's services and the global view, both cheap to share), and
//! services are rendered when they are sent. [`changed`] finds which
//! services two versions differ in by diffing the global view's persistent
//! maps, so a change costs O(change) in time and nothing in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fedmesh_api::{LocalService, LocalServices, ServiceKey};
use fedmesh_proto::discovery::v1 as pb;
use imbl::ordmap::DiffItem;

use fedmesh_api::policy::{DEFAULT_SERVICE, PolicySpec, effective};
use fedmesh_trust::Bundle;

use crate::view::{Export, Exporters, GlobalView, Name, Policy};

/// Everything one version of the mesh is made from.
#[derive(Debug, Clone)]
pub struct MeshInputs {
    pub cluster: Arc<str>,
    pub local: Arc<LocalServices>,
    pub global: Arc<GlobalView>,
    /// This cluster's own bundle, from its own CA files: what proxies and
    /// gateways get for our trust domain, whatever etcd holds for it.
    pub own: Option<Arc<Bundle>>,
}

/// Which services differ between two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Cluster records or liveness moved: every remote endpoint may differ.
    All,
    Services(BTreeSet<ServiceKey>),
}

impl Changed {
    pub fn is_empty(&self) -> bool {
        matches!(self, Changed::Services(s) if s.is_empty())
    }
}

/// Which services one client receives: everything, what this cluster
/// exports itself (a gateway), or what it has subscribed to (a proxy that
/// names its services or asks on demand). Memory and traffic then grow with
/// what a client uses, not with the federation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    #[default]
    All,
    Exported,
    Listed {
        names: BTreeSet<ServiceKey>,
        namespaces: BTreeSet<String>,
    },
}

/// What a subscription adds: exact services and whole namespaces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribed {
    pub names: BTreeSet<ServiceKey>,
    pub namespaces: BTreeSet<String>,
}

impl Subscribed {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.namespaces.is_empty()
    }
}

/// Reads "namespace/name" and "namespace/*"; a malformed entry is named.
pub fn parse_subscriptions(entries: &[String]) -> (Subscribed, Vec<String>) {
    let mut out = Subscribed::default();
    let mut bad = Vec::new();
    for e in entries {
        match e.split_once('/') {
            Some((ns, "*")) if !ns.is_empty() && !ns.contains('/') => {
                out.namespaces.insert(ns.to_owned());
            }
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                out.names.insert(ServiceKey::new(ns, name));
            }
            _ => bad.push(e.clone()),
        }
    }
    (out, bad)
}

impl Scope {
    /// Whether `key` is in this scope, given the mesh `m`.
    pub fn contains(&self, key: &ServiceKey, m: &MeshInputs) -> bool {
        match self {
            Scope::All => true,
            Scope::Exported => m.local.contains_key(key),
            Scope::Listed { names, namespaces } => {
                names.contains(key) || namespaces.contains(&key.namespace)
            }
        }
    }

    /// Adds a subscription; returns what is new. Only a listed scope
    /// subscribes: the others already hold what they will ever get.
    pub fn subscribe(&mut self, more: Subscribed) -> Subscribed {
        let Scope::Listed { names, namespaces } = self else {
            return Subscribed::default();
        };
        let mut new = Subscribed::default();
        for ns in more.namespaces {
            if namespaces.insert(ns.clone()) {
                new.namespaces.insert(ns);
            }
        }
        for k in more.names {
            if !namespaces.contains(&k.namespace) && names.insert(k.clone()) {
                new.names.insert(k);
            }
        }
        new
    }
}

impl MeshInputs {
    /// The services of a subscription that exist, and the exact names that
    /// do not.
    pub fn keys_of(&self, sub: &Subscribed) -> (BTreeSet<ServiceKey>, Vec<ServiceKey>) {
        let mut found = BTreeSet::new();
        let mut missing = Vec::new();
        for k in &sub.names {
            if self.local.contains_key(k) || self.global.by_service.contains_key(k) {
                found.insert(k.clone());
            } else {
                missing.push(k.clone());
            }
        }
        for ns in &sub.namespaces {
            let from = ServiceKey::new(ns, "");
            let in_ns = |k: &&ServiceKey| k.namespace == *ns;
            found.extend(
                self.local
                    .range::<ServiceKey, _>(&from..)
                    .map(|(k, _)| k)
                    .take_while(in_ns)
                    .cloned(),
            );
            found.extend(
                self.global
                    .by_service
                    .range::<_, ServiceKey>(&from..)
                    .map(|(k, _)| k)
                    .take_while(in_ns)
                    .cloned(),
            );
        }
        (found, missing)
    }

    /// Every service of `scope` that exists.
    pub fn keys_in(&self, scope: &Scope) -> BTreeSet<ServiceKey> {
        match scope {
            Scope::All => self.keys(),
            Scope::Exported => self.local.keys().cloned().collect(),
            Scope::Listed { names, namespaces } => {
                let sub = Subscribed {
                    names: names.clone(),
                    namespaces: namespaces.clone(),
                };
                self.keys_of(&sub).0
            }
        }
    }

    /// Every service that exists locally or remotely.
    pub fn keys(&self) -> BTreeSet<ServiceKey> {
        self.local
            .keys()
            .chain(self.global.by_service.keys())
            .cloned()
            .collect()
    }

    /// Trust domain → bundle document. Our own trust domain's is our own
    /// bundle, never etcd's: someone who could rewrite `bundles/<our td>`
    /// must not be able to add a root that our own workloads trust.
    pub fn bundles(&self) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = self
            .global
            .bundles
            .iter()
            .map(|(td, b)| (td.clone(), b.to_document()))
            .collect();
        if let Some(own) = &self.own {
            out.insert(own.trust_domain().to_string(), own.to_document());
        }
        out
    }

    /// Whether etcd holds a bundle for our trust domain with roots other
    /// than ours (a rewrite, or a rotation still publishing): reported, never
    /// used.
    pub fn foreign_own_bundle(&self) -> bool {
        self.own.as_ref().is_some_and(|own| {
            self.global
                .bundles
                .get(own.trust_domain().as_str())
                .is_some_and(|b| b.roots() != own.roots())
        })
    }

    /// Whether `other` has different bundles.
    pub fn bundles_differ(&self, other: &MeshInputs) -> bool {
        self.own != other.own
            || (!self.global.bundles.ptr_eq(&other.global.bundles)
                && self.global.bundles != other.global.bundles)
    }

    /// Every other registered cluster, with its gateways, and how our own
    /// proxies reach them (our registration's `egress`).
    pub fn peers(&self) -> pb::Peers {
        let g = &self.global;
        let clusters = g
            .clusters
            .iter()
            .filter(|(name, _)| name.as_str() != &*self.cluster)
            .map(|(name, record)| pb::PeerCluster {
                cluster: name.clone(),
                trust_domain: record.trust_domain.clone(),
                gateways: gateway_addresses(record),
                cloud: record.cloud.clone(),
                region: record.region.clone(),
                verified: g.alive.contains_key(name),
                last_seen_unix_ms: last_seen(g, name),
            })
            .collect();
        let egress = match g.clusters.get(&*self.cluster).map(|r| r.egress) {
            Some(fedmesh_api::EgressMode::Gateway) => pb::Egress::Gateway,
            _ => pb::Egress::Direct,
        };
        pb::Peers {
            clusters,
            egress: egress.into(),
        }
    }

    /// Whether `other` has different peers (records or liveness). A live
    /// cluster rewrites its `seen` key every 30 s; that alone changes
    /// nothing we send, so only an unverified cluster's is compared.
    pub fn peers_differ(&self, other: &MeshInputs) -> bool {
        let (a, b) = (&self.global, &other.global);
        !a.clusters.ptr_eq(&b.clusters) && a.clusters != b.clusters
            || !a.alive.ptr_eq(&b.alive) && a.alive != b.alive
            || !a.last_seen.ptr_eq(&b.last_seen) && !stale_seen(a).eq(stale_seen(b))
    }

    /// The ports a service is served on, and which remote exporters
    /// disagree with them. The rule: this cluster's own ports when it has
    /// the service; otherwise those of the exporting cluster that joined
    /// the federation first (earliest `registeredAt`, then name). Clusters
    /// that export other ports are left out of the service: a tunnel names
    /// a port they do not serve.
    pub fn ports(&self, key: &ServiceKey) -> (Vec<u16>, Vec<Name>) {
        let g = &self.global;
        let exporters = || {
            g.by_service
                .get(key)
                .into_iter()
                .flat_map(Exporters::iter)
                .filter(|e| e.cluster != self.cluster)
                .filter_map(|e| Some((e, g.clusters.get(&*e.cluster)?)))
        };
        let ports: Vec<u16> = match self.local.get(key) {
            Some(l) => l.ports.clone(),
            None => exporters()
                .min_by(|(a, ra), (b, rb)| {
                    (ra.registered_at, &a.cluster).cmp(&(rb.registered_at, &b.cluster))
                })
                .map(|(e, _)| e.ports.to_vec())
                .unwrap_or_default(),
        };
        let conflicting = exporters()
            .filter(|(e, _)| *e.ports != *ports)
            .map(|(e, _)| e.cluster.clone())
            .collect();
        (ports, conflicting)
    }

    /// A service's effective policy (its own over the default, field by
    /// field), with the policies it came from; `None` when none applies.
    pub fn policy(&self, key: &ServiceKey) -> Option<(PolicySpec, Vec<pb::PolicySource>)> {
        let g = &self.global;
        let own = g.policy_for(&key.to_string());
        let default = g.policy_for(DEFAULT_SERVICE);
        let source = |(name, p): (&String, &Policy)| pb::PolicySource {
            name: name.clone(),
            revision: p.revision,
        };
        let spec = effective(
            &key.to_string(),
            own.map(|(_, p)| &*p.spec),
            default.map(|(_, p)| &*p.spec),
        )?;
        Some((spec, own.into_iter().chain(default).map(source).collect()))
    }

    /// One service: our endpoints plus a virtual endpoint per remote cluster
    /// (never one per gateway). `None` when nobody has it. A policy's
    /// `export.clusters` leaves out the clusters it does not list: as
    /// exporters here, and as `exported` for our own gateways.
    pub fn render(&self, key: &ServiceKey) -> Option<pb::Service> {
        let local = self.local.get(key);
        let g = &self.global;
        let policy = self.policy(key);
        let exported_by = |c: &str| policy.as_ref().is_none_or(|(p, _)| p.exported_by(c));
        let (ports, conflicting) = self.ports(key);
        let remote: Vec<pb::RemoteCluster> = g
            .by_service
            .get(key)
            .into_iter()
            .flat_map(|exporters| exporters.iter())
            .filter(|e| e.cluster != self.cluster && !conflicting.contains(&e.cluster))
            .filter(|e| exported_by(&e.cluster))
            // An export without a cluster record cannot be reached: no gateways.
            .filter_map(|export| {
                let c = &*export.cluster;
                let record = g.clusters.get(c)?;
                Some(pb::RemoteCluster {
                    cluster: c.to_owned(),
                    cloud: record.cloud.clone(),
                    region: record.region.clone(),
                    localities: export
                        .localities
                        .iter()
                        .map(|l| pb::ZoneCapacity {
                            zone: l.zone.to_string(),
                            healthy: l.healthy,
                            total: l.total,
                            weight: l.weight,
                        })
                        .collect(),
                    healthy: export.healthy(),
                    gateways: gateway_addresses(record),
                    trust_domain: record.trust_domain.clone(),
                    // An expired `alive` key marks the cluster unverified;
                    // traffic continues while the data plane's signals allow.
                    verified: g.alive.contains_key(c),
                    last_seen_unix_ms: last_seen(g, c),
                })
            })
            .collect();
        if local.is_none() && remote.is_empty() {
            return None;
        }
        Some(pb::Service {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            ports: ports.into_iter().map(u32::from).collect(),
            local: local.map(local_endpoints).unwrap_or_default(),
            remote,
            exported: local.is_some() && exported_by(&self.cluster),
            policy: policy.map(|(spec, sources)| pb::ServicePolicy {
                spec: serde_json::to_string(&spec).unwrap_or_default(),
                sources,
            }),
        })
    }

    /// The whole mesh in its wire form.
    pub fn snapshot(&self) -> pb::MeshSnapshot {
        pb::MeshSnapshot {
            cluster: self.cluster.to_string(),
            services: self.keys().iter().filter_map(|k| self.render(k)).collect(),
            bundles: self.bundles().into_iter().collect(),
            peers: Some(self.peers()),
        }
    }

    /// The mesh without its services: what every full snapshot starts with.
    pub fn frame(&self) -> pb::MeshSnapshot {
        pb::MeshSnapshot {
            cluster: self.cluster.to_string(),
            services: Vec::new(),
            bundles: self.bundles().into_iter().collect(),
            peers: Some(self.peers()),
        }
    }
}

/// The services that differ between `old` and `new`. Our own exports are
/// not part of our mesh, so their changes are ignored.
pub fn changed(old: &MeshInputs, new: &MeshInputs) -> Changed {
    if old.peers_differ(new) {
        return Changed::All;
    }
    let (o, n) = (&old.global, &new.global);
    let mut keys = BTreeSet::new();
    // A policy change touches the services it was and is for (and, through
    // their routes, nothing else: a route's target keeps its own policy).
    for d in o.policies.diff(&n.policies) {
        let specs: Vec<&Policy> = match &d {
            DiffItem::Add(_, p) | DiffItem::Remove(_, p) => vec![p],
            DiffItem::Update {
                old: (_, a),
                new: (_, b),
            } => vec![a, b],
        };
        for p in specs {
            match p.spec.service_key() {
                Some(k) => {
                    keys.insert(k);
                }
                // The default touches every service.
                None => return Changed::All,
            }
        }
    }
    for d in o.by_service.diff(&n.by_service) {
        let (key, before, after) = match d {
            DiffItem::Add(k, v) => (k, None, Some(v)),
            DiffItem::Remove(k, v) => (k, Some(v), None),
            DiffItem::Update {
                old: (k, a),
                new: (_, b),
            } => (k, Some(a), Some(b)),
        };
        if !others(before, &new.cluster).eq(others(after, &new.cluster)) {
            keys.insert(key.clone());
        }
    }
    if !Arc::ptr_eq(&old.local, &new.local) {
        let all: BTreeSet<&ServiceKey> = old.local.keys().chain(new.local.keys()).collect();
        keys.extend(
            all.into_iter()
                .filter(|k| old.local.get(*k) != new.local.get(*k))
                .cloned(),
        );
    }
    Changed::Services(keys)
}

/// For an unverified cluster, when it was last seen alive (Unix ms; 0 when
/// never seen). 0 for a live one.
fn last_seen(g: &GlobalView, cluster: &str) -> u64 {
    if g.alive.contains_key(cluster) {
        return 0;
    }
    g.last_seen
        .get(cluster)
        .map(|s| (s.at.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        .unwrap_or(0)
}

/// The `seen` records of clusters whose `alive` key is absent.
fn stale_seen(g: &GlobalView) -> impl Iterator<Item = (&String, &fedmesh_api::SeenRecord)> {
    g.last_seen
        .iter()
        .filter(|(c, _)| !g.alive.contains_key(*c))
}

/// The exports of a service by clusters other than `us`.
fn others<'a>(m: Option<&'a Exporters>, us: &'a str) -> impl Iterator<Item = &'a Export> {
    m.into_iter()
        .flat_map(Exporters::iter)
        .filter(move |e| &*e.cluster != us)
}

fn gateway_addresses(record: &fedmesh_api::ClusterRecord) -> Vec<pb::GatewayAddress> {
    record
        .gateways
        .iter()
        .map(|gw| pb::GatewayAddress {
            address: gw.address.clone(),
            port: u32::from(gw.port),
        })
        .collect()
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

    fn alive() -> serde_json::Value {
        serde_json::json!({"controller": "c", "startedAt": "2026-11-24T00:00:00Z", "version": "0.1"})
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

    fn inputs(local: Arc<LocalServices>, g: &GlobalView) -> MeshInputs {
        MeshInputs {
            own: None,
            cluster: "aws".into(),
            local,
            global: Arc::new(g.clone()),
        }
    }

    fn remotes(m: &MeshInputs, name: &str) -> Vec<(String, u64, bool)> {
        m.render(&ServiceKey::new("shop", name))
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
        put(&mut g, ks.alive("gcp"), alive(), 7);

        let m = inputs(local(), &g);
        let snap = m.snapshot();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(snap.services[0].local.len(), 1);
        assert_eq!(
            remotes(&m, "cart"),
            [("azure".into(), 3, false), ("gcp".into(), 2, true)]
        );
        assert_eq!(snap.services[0].remote[0].gateways[0].port, 15443);
    }

    #[test]
    fn changed_finds_exactly_the_services_a_change_touches() {
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
        let l = local();
        let v1 = inputs(l.clone(), &g);
        assert!(changed(&v1, &inputs(l.clone(), &g)).is_empty());

        put(&mut g, ks.export("gcp", "shop", "s7"), export(1), 100);
        put(&mut g, ks.export("gcp", "shop", "new"), export(2), 101);
        g.apply_event(RawEvent::Delete {
            key: ks.export("gcp", "shop", "s9"),
            mod_revision: 102,
        });
        put(&mut g, ks.export("aws", "shop", "s3"), export(1), 103); // our own
        let v2 = inputs(l.clone(), &g);
        let want: BTreeSet<ServiceKey> = ["new", "s7", "s9"]
            .iter()
            .map(|n| ServiceKey::new("shop", n))
            .collect();
        assert_eq!(changed(&v1, &v2), Changed::Services(want));
        assert_eq!(remotes(&v2, "s7"), [("gcp".into(), 1, false)]);
        assert!(v2.render(&ServiceKey::new("shop", "s9")).is_none());

        // Liveness changes every remote endpoint.
        put(&mut g, ks.alive("gcp"), alive(), 104);
        let v3 = inputs(l, &g);
        assert_eq!(changed(&v2, &v3), Changed::All);
        assert!(remotes(&v3, "s3")[0].2);
    }

    fn record_at(name: &str, registered_at: &str) -> serde_json::Value {
        let mut r = record(name);
        r["registeredAt"] = registered_at.into();
        r
    }

    fn export_ports(ports: &[u16]) -> serde_json::Value {
        serde_json::json!({
            "ports": ports,
            "localities": [{"zone": "b", "healthy": 1, "total": 1, "weight": 1}],
            "generation": 1
        })
    }

    #[test]
    fn disagreeing_ports_go_to_the_cluster_that_joined_first() {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        // "zeta" sorts last but joined first; "alpha" joined later.
        put(
            &mut g,
            ks.cluster("zeta"),
            record_at("zeta", "2026-01-01T00:00:00Z"),
            1,
        );
        put(
            &mut g,
            ks.cluster("alpha"),
            record_at("alpha", "2026-06-01T00:00:00Z"),
            2,
        );
        put(
            &mut g,
            ks.cluster("mid"),
            record_at("mid", "2026-03-01T00:00:00Z"),
            3,
        );
        put(
            &mut g,
            ks.export("alpha", "shop", "pay"),
            export_ports(&[9090]),
            4,
        );
        put(
            &mut g,
            ks.export("zeta", "shop", "pay"),
            export_ports(&[8080]),
            5,
        );
        put(
            &mut g,
            ks.export("mid", "shop", "pay"),
            export_ports(&[8080]),
            6,
        );
        let m = inputs(Arc::default(), &g);
        let key = ServiceKey::new("shop", "pay");
        let (ports, conflicting) = m.ports(&key);
        assert_eq!(ports, [8080]);
        assert_eq!(conflicting, [Name::from("alpha")]);
        let s = m.render(&key).unwrap();
        assert_eq!(s.ports, [8080]);
        let clusters: Vec<&str> = s.remote.iter().map(|r| r.cluster.as_str()).collect();
        assert_eq!(
            clusters,
            ["mid", "zeta"],
            "a cluster on other ports is left out"
        );

        // Our own ports win when we have the service.
        let ours = Arc::new(LocalServices::from([(
            key.clone(),
            LocalService {
                ports: vec![9090],
                endpoints: vec![],
            },
        )]));
        let m = inputs(ours, &g);
        let clusters: Vec<String> = m
            .render(&key)
            .unwrap()
            .remote
            .into_iter()
            .map(|r| r.cluster)
            .collect();
        assert_eq!(clusters, ["alpha"]);
    }

    #[test]
    fn our_registration_says_how_our_proxies_reach_the_peers_and_a_change_is_resent() {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        put(&mut g, ks.cluster("gcp"), record("gcp"), 1);
        let unregistered = inputs(local(), &g);
        assert_eq!(unregistered.peers().egress(), pb::Egress::Direct);
        let mut aws = record("aws");
        put(&mut g, ks.cluster("aws"), aws.clone(), 2);
        let direct = inputs(local(), &g);
        let peers: Vec<String> = direct
            .peers()
            .clusters
            .into_iter()
            .map(|p| p.cluster)
            .collect();
        assert_eq!(peers, ["gcp"], "never ourselves");
        assert_eq!(direct.peers().egress(), pb::Egress::Direct, "the default");
        aws["egress"] = "gateway".into();
        put(&mut g, ks.cluster("aws"), aws, 3);
        let gateway = inputs(local(), &g);
        assert_eq!(gateway.peers().egress(), pb::Egress::Gateway);
        assert!(
            gateway.peers_differ(&direct),
            "re-registering resends the peers"
        );
    }

    #[test]
    fn an_unverified_cluster_keeps_its_capacity_and_says_when_it_was_last_seen() {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        put(&mut g, ks.cluster("gcp"), record("gcp"), 1);
        put(&mut g, ks.export("gcp", "shop", "cart"), export(2), 2);
        put(&mut g, ks.alive("gcp"), alive(), 3);
        put(
            &mut g,
            ks.seen("gcp"),
            serde_json::json!({"at": "2026-11-24T00:00:10Z"}),
            4,
        );
        let live = inputs(local(), &g);
        assert_eq!(remotes(&live, "cart"), [("gcp".into(), 2, true)]);
        assert_eq!(live.peers().clusters[0].last_seen_unix_ms, 0);

        // A live cluster's periodic `seen` write changes nothing we send.
        put(
            &mut g,
            ks.seen("gcp"),
            serde_json::json!({"at": "2026-11-24T00:00:40Z"}),
            5,
        );
        let rewritten = inputs(local(), &g);
        assert!(changed(&live, &rewritten).is_empty());

        // Its lease lapses: unverified, same capacity, dated.
        g.apply_event(RawEvent::Delete {
            key: ks.alive("gcp"),
            mod_revision: 6,
        });
        let stale = inputs(local(), &g);
        assert_eq!(changed(&rewritten, &stale), Changed::All);
        assert_eq!(remotes(&stale, "cart"), [("gcp".into(), 2, false)]);
        let seen_ms = 1_795_478_440_000; // 2026-11-24T00:00:40Z
        assert_eq!(stale.peers().clusters[0].last_seen_unix_ms, seen_ms);
        let cart = stale.render(&ServiceKey::new("shop", "cart")).unwrap();
        assert_eq!(cart.remote[0].last_seen_unix_ms, seen_ms);

        // Only removing its exports takes it away.
        g.apply_event(RawEvent::Delete {
            key: ks.export("gcp", "shop", "cart"),
            mod_revision: 7,
        });
        assert!(remotes(&inputs(local(), &g), "cart").is_empty());
    }

    fn policy(name: &str, service: &str, spec: serde_json::Value) -> serde_json::Value {
        let mut spec = spec;
        spec["service"] = service.into();
        serde_json::json!({"apiVersion": "fedmesh.io/v1", "kind": "GlobalTrafficPolicy",
            "metadata": {"name": name}, "spec": spec})
    }

    #[test]
    fn policies_reach_the_services_they_name_and_a_bad_one_changes_nothing() {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        put(&mut g, ks.cluster("gcp"), record("gcp"), 2);
        put(&mut g, ks.alive("gcp"), alive(), 3);
        put(&mut g, ks.export("gcp", "shop", "cart"), export(2), 4);
        put(&mut g, ks.export("gcp", "shop", "pay"), export(2), 5);
        let before = inputs(local(), &g);
        put(
            &mut g,
            ks.policy("cart"),
            policy(
                "cart",
                "shop/cart",
                serde_json::json!({"retries": 0, "export": {"clusters": ["aws"]}}),
            ),
            6,
        );
        put(
            &mut g,
            ks.policy("all"),
            policy(
                "all",
                "*",
                serde_json::json!({"retries": 3, "requestTimeout": "2s"}),
            ),
            7,
        );
        let mut after_cart = g.clone();
        after_cart.policies.remove("all");
        let m1 = inputs(before.local.clone(), &after_cart);
        assert_eq!(
            changed(&before, &m1),
            Changed::Services([ServiceKey::new("shop", "cart")].into()),
            "one service's policy touches that service alone"
        );
        let m2 = inputs(before.local.clone(), &g);
        assert_eq!(
            changed(&m1, &m2),
            Changed::All,
            "the default touches every service"
        );

        let cart = m2.render(&ServiceKey::new("shop", "cart")).unwrap();
        let p = cart.policy.unwrap();
        let spec: PolicySpec = serde_json::from_str(&p.spec).unwrap();
        assert_eq!(spec.retries, Some(0), "the service's own value wins");
        assert_eq!(
            spec.request_timeout,
            Some(std::time::Duration::from_secs(2))
        );
        let sources: Vec<(String, i64)> = p
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.revision))
            .collect();
        assert_eq!(sources, [("cart".to_string(), 6), ("all".to_string(), 7)]);
        // export.clusters: [aws] leaves gcp out as an exporter; we still export.
        assert!(cart.remote.is_empty() && cart.exported);
        let pay = m2.render(&ServiceKey::new("shop", "pay")).unwrap();
        assert_eq!(pay.remote.len(), 1);
        assert!(
            pay.policy
                .unwrap()
                .spec
                .contains("\"service\":\"shop/pay\"")
        );

        // A value that parses but fails the checks is refused and reported;
        // the last good one stays.
        put(
            &mut g,
            ks.policy("cart"),
            policy(
                "cart",
                "shop/cart",
                serde_json::json!({"failoverThreshold": 1.5}),
            ),
            8,
        );
        assert!(g.invalid[&ks.policy("cart")].contains("failoverThreshold"));
        assert_eq!(g.policies["cart"].revision, 6);
        // A second policy for the same service is refused too.
        put(
            &mut g,
            ks.policy("cart2"),
            policy("cart2", "shop/cart", serde_json::json!({})),
            9,
        );
        assert!(g.invalid[&ks.policy("cart2")].contains("already for"));
        assert!(!g.policies.contains_key("cart2"));
    }

    #[test]
    fn our_own_trust_domain_gets_our_roots_never_etcds() {
        use fedmesh_trust::{CaOptions, ClusterCa, TrustDomain};
        let ks = KeySpace::default();
        let td = TrustDomain::new("aws.fedmesh").unwrap();
        let now = std::time::SystemTime::now();
        let ours = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
        let forged = ClusterCa::generate(&td, &CaOptions::default(), now).unwrap();
        let mut g = GlobalView::new(ks.clone());
        // Someone on the path to etcd rewrote our bundle with their root.
        let evil = Bundle::with_roots(td.clone(), [forged.cert_der().clone()]);
        g.apply_event(RawEvent::Put(RawKv {
            key: ks.bundle("aws.fedmesh"),
            value: evil.to_document().into_bytes(),
            mod_revision: 2,
        }));
        let own = Bundle::with_roots(td.clone(), [ours.cert_der().clone()]);
        let m = MeshInputs {
            own: Some(Arc::new(own.clone())),
            ..inputs(local(), &g)
        };
        assert!(m.foreign_own_bundle(), "reported");
        let sent = m.bundles();
        let got = Bundle::from_document(td, sent["aws.fedmesh"].as_bytes(), "t").unwrap();
        assert_eq!(got.roots(), own.roots(), "ours, not etcd's");
        assert!(!got.roots().contains(forged.cert_der()));
        assert!(m.bundles_differ(&inputs(local(), &g)));
    }
}
