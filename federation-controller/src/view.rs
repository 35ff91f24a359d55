//! The global view: what this controller knows of the global zone, built from
//! a list followed by watch events. I/O-free: the watcher feeds it listings
//! and events; tests feed it by hand.
//!
//! Every applied key remembers its `mod_revision`, and the view remembers the
//! last revision it has seen, so an event delivered twice (a resumed watch
//! overlapping a list) is ignored, and a re-list after a compaction is
//! reconciled key by key instead of replacing the view wholesale.
//!
//! Exports dominate at scale (a million of them with 100 clusters × 10,000
//! services), so they are stored compactly: cluster and zone names are
//! shared, and each service keeps its exporters in one sorted list.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use fedmesh_api::policy::{GlobalTrafficPolicy, PolicySpec};
use fedmesh_api::{
    AliveRecord, ClusterRecord, GlobalKey, KeySpace, SeenRecord, ServiceKey, validate_locality,
    validate_ports,
};
use fedmesh_trust::Bundle;
use imbl::{OrdMap, OrdSet};

use fedmesh_seal::bucket_of;
use fedmesh_zone::decode_bundle;
pub use fedmesh_zone::{RawEvent, RawKv};

/// A cluster or zone name, shared by every export that mentions it.
pub type Name = Arc<str>;

/// The healthy capacity of one zone, as an export reports it: the view's
/// interned form of [`fedmesh_api::ZoneCapacity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneCapacity {
    pub zone: Name,
    pub healthy: u32,
    pub total: u32,
    pub weight: u32,
}

/// One cluster's export of one service, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub cluster: Name,
    pub mod_revision: i64,
    pub generation: u64,
    pub ports: Box<[u16]>,
    pub localities: Box<[ZoneCapacity]>,
}

impl Export {
    /// Healthy endpoints across all zones.
    pub fn healthy(&self) -> u64 {
        self.localities.iter().map(|l| u64::from(l.healthy)).sum()
    }
}

/// The exports of one service, sorted by cluster. Versions of the view
/// share it; a change copies this one list (one entry per exporting
/// cluster), never the whole view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exporters(Arc<Vec<Export>>);

impl Exporters {
    fn find(&self, cluster: &str) -> Result<usize, usize> {
        // A listing goes cluster by cluster in order, so a new export
        // usually sorts last: one probe instead of a search.
        match self.0.last() {
            None => Err(0),
            Some(last) if *last.cluster < *cluster => Err(self.0.len()),
            Some(_) => self.0.binary_search_by(|e| (*e.cluster).cmp(cluster)),
        }
    }

    pub fn get(&self, cluster: &str) -> Option<&Export> {
        self.find(cluster).ok().map(|i| &self.0[i])
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Export> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Puts `export` where [`Self::find`] said its cluster is or belongs.
    fn put(&mut self, at: Result<usize, usize>, export: Export) {
        match at {
            Ok(i) => Arc::make_mut(&mut self.0)[i] = export,
            Err(i) => Arc::make_mut(&mut self.0).insert(i, export),
        }
    }

    fn remove(&mut self, cluster: &str) -> Option<Export> {
        let i = self.find(cluster).ok()?;
        Some(Arc::make_mut(&mut self.0).remove(i))
    }
}

/// A listing in progress: the keys it has seen so far.
#[derive(Debug, Default)]
pub struct Listing {
    /// Every key other than exports (a handful per cluster).
    records: HashSet<String>,
    /// Clusters whose exports have been listed.
    clusters: HashSet<Name>,
}

/// What an applied listing or event changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Upsert(GlobalKey),
    Remove(GlobalKey),
}

/// The maps are persistent (structurally shared), so publishing a copy of
/// the view after each change costs O(change), not O(size), and consumers
/// can diff two versions cheaply.
#[derive(Debug, Clone)]
pub struct GlobalView {
    keys: KeySpace,
    revision: i64,
    /// `mod_revision` of every key other than exports (exports keep theirs
    /// beside their summary).
    seen: OrdMap<String, i64>,
    /// Cluster and zone names in use, so that exports share them.
    names: OrdSet<Name>,
    /// How many exports each cluster has in the view.
    export_counts: OrdMap<Name, usize>,
    pub clusters: OrdMap<String, ClusterRecord>,
    pub alive: OrdMap<String, AliveRecord>,
    /// When each cluster last said it was alive; outlives `alive`.
    pub last_seen: OrdMap<String, SeenRecord>,
    pub bundles: OrdMap<String, Bundle>,
    /// Exports by service: the shape the mesh is built in.
    pub by_service: OrdMap<ServiceKey, Exporters>,
    /// Global traffic policies by name, each checked, with its revision.
    pub policies: OrdMap<String, Policy>,
    /// Keys whose latest value could not be read, with the reason. Their last
    /// good value (if any) stays in the view.
    pub invalid: OrdMap<String, String>,
    /// The next listing comes from another etcd: its revisions say nothing
    /// of ours, so every listed value is taken afresh.
    rewound: bool,
    /// A whole listing (of etcd, or of the last good view on disk) has
    /// been applied: the view may be served.
    complete: bool,
}

/// A checked global traffic policy and the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub spec: Arc<PolicySpec>,
    pub revision: i64,
}

impl GlobalView {
    pub fn new(keys: KeySpace) -> Self {
        Self {
            keys,
            revision: 0,
            seen: OrdMap::new(),
            names: OrdSet::new(),
            export_counts: OrdMap::new(),
            clusters: OrdMap::new(),
            alive: OrdMap::new(),
            last_seen: OrdMap::new(),
            bundles: OrdMap::new(),
            by_service: OrdMap::new(),
            policies: OrdMap::new(),
            invalid: OrdMap::new(),
            rewound: false,
            complete: false,
        }
    }

    /// Whether a whole listing has been applied: before that, an empty view
    /// would tell proxies that nothing exists anywhere.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Every export as the plain value its cluster wrote (the view keeps
    /// all of it), cluster by cluster, for the last good view on disk.
    /// Lazy: a million exports are never copied at once.
    pub fn export_kvs(&self) -> impl Iterator<Item = RawKv> + '_ {
        self.export_counts.keys().flat_map(move |cluster| {
            self.by_service.iter().filter_map(move |(svc, exporters)| {
                let e = exporters.get(cluster)?;
                let summary = fedmesh_api::ExportSummary {
                    ports: e.ports.to_vec(),
                    localities: e
                        .localities
                        .iter()
                        .map(|l| fedmesh_api::ZoneCapacity {
                            zone: l.zone.to_string(),
                            healthy: l.healthy,
                            total: l.total,
                            weight: l.weight,
                        })
                        .collect(),
                    generation: e.generation,
                };
                Some(RawKv {
                    key: self.keys.export(cluster, &svc.namespace, &svc.name),
                    value: serde_json::to_vec(&summary).unwrap_or_default(),
                    mod_revision: e.mod_revision,
                })
            })
        })
    }

    /// Forgets every revision: the next listing comes from another etcd (a
    /// new one, or one restored from a backup), whose revisions start anew.
    /// The values stay until that listing settles them.
    pub fn rewind(&mut self) {
        self.revision = 0;
        self.seen.clear();
        self.rewound = true;
    }

    /// The policy for `service` ("*" for the default): with two (written
    /// around `fedmesh apply`), the first by name, as every controller picks.
    pub fn policy_for(&self, service: &str) -> Option<(&String, &Policy)> {
        self.policies
            .iter()
            .find(|(_, p)| p.spec.service == service)
    }

    /// A policy for a service another policy already covers is refused
    /// (and reported); the one held stays.
    fn check_policy(&self, name: &str, p: &Policy) -> Result<(), String> {
        match self.policy_for(&p.spec.service) {
            Some((other, _)) if other != name => Err(format!(
                "policy {other:?} is already for {:?}; there can be one",
                p.spec.service
            )),
            _ => Ok(()),
        }
    }

    /// One cluster's export of one service.
    pub fn export(&self, cluster: &str, namespace: &str, service: &str) -> Option<&Export> {
        self.by_service
            .get(&ServiceKey::new(namespace, service))?
            .get(cluster)
    }

    /// How many (cluster, service) exports the view holds.
    pub fn export_count(&self) -> usize {
        self.export_counts.values().sum()
    }

    /// The last etcd revision the view reflects.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// Reconciles with a full listing taken at `revision`: keys absent from
    /// it are removed, new or newer ones applied, unchanged ones left alone.
    pub fn apply_snapshot(&mut self, kvs: impl IntoIterator<Item = RawKv>, revision: i64) -> usize {
        let mut listing = Listing::default();
        let mut records = Vec::new();
        let mut exports: std::collections::BTreeMap<String, Vec<RawKv>> = Default::default();
        for kv in kvs {
            match self.keys.parse_export(&kv.key) {
                Some((cluster, ..)) => exports.entry(cluster.to_owned()).or_default().push(kv),
                None => records.push(kv),
            }
        }
        let mut changed = self.list_records(&mut listing, records);
        for (cluster, kvs) in exports {
            changed += self.list_exports(&mut listing, &cluster, kvs, &BTreeSet::new());
        }
        changed + self.finish_listing(listing, revision)
    }

    /// Applies listed keys other than exports. Returns how many changed.
    pub fn list_records(
        &mut self,
        listing: &mut Listing,
        kvs: impl IntoIterator<Item = RawKv>,
    ) -> usize {
        let mut changed = 0;
        for kv in kvs {
            listing.records.insert(kv.key.clone());
            let Some(parsed) = self.keys.parse(&kv.key) else {
                continue;
            };
            if matches!(parsed, GlobalKey::Export { .. }) {
                continue;
            }
            if self.seen.get(&kv.key) != Some(&kv.mod_revision) {
                changed += usize::from(self.upsert_parsed(parsed, kv));
            }
        }
        changed
    }

    /// Applies every listed export of `cluster`, then removes the exports of
    /// `cluster` the listing did not contain. Listings are applied cluster by
    /// cluster as they arrive, so a large one never sits in memory whole.
    /// Returns how many exports changed.
    /// Services in the `held` buckets (`fedmesh_seal::manifest`) keep what
    /// the view holds: the gate did not believe their listing.
    pub fn list_exports(
        &mut self,
        listing: &mut Listing,
        cluster: &str,
        kvs: Vec<RawKv>,
        held: &BTreeSet<u8>,
    ) -> usize {
        let name = self.name(cluster);
        listing.clusters.insert(name.clone());
        let keys = self.keys.clone();
        let listed = || {
            kvs.iter().filter_map(|kv| {
                let (c, ns, svc) = keys.parse_export(&kv.key)?;
                (c == cluster).then(|| (kv, ServiceKey::new(ns, svc)))
            })
        };
        let (mut changed, mut kept) = (0, 0);
        for (kv, svc) in listed() {
            match self.upsert_export(&name, svc, kv) {
                Put::Unchanged => kept += 1,
                Put::Taken => (changed, kept) = (changed + 1, kept + 1),
                Put::Refused { held: h } => kept += usize::from(h),
            }
        }

        // Only a view holding more of this cluster's exports than were
        // listed has any to remove; a cold sync never pays for the sweep.
        if self.export_counts.get(cluster).copied().unwrap_or(0) <= kept {
            return changed;
        }
        let listed: HashSet<ServiceKey> = listed().map(|(_, svc)| svc).collect();
        let gone: Vec<ServiceKey> = self
            .by_service
            .iter()
            .filter(|(svc, e)| e.get(cluster).is_some() && !listed.contains(*svc))
            .filter(|(svc, _)| held.is_empty() || !held.contains(&bucket_of(&svc.to_string())))
            .map(|(svc, _)| svc.clone())
            .collect();
        changed
            + gone
                .iter()
                .filter(|svc| self.remove_export(cluster, svc))
                .count()
    }

    /// Ends a listing taken at `revision`: every record it did not contain,
    /// and every export of a cluster it did not list, is removed. Returns how
    /// many keys were.
    pub fn finish_listing(&mut self, listing: Listing, revision: i64) -> usize {
        let gone: Vec<String> = self
            .seen
            .keys()
            .filter(|k| !listing.records.contains(*k))
            .cloned()
            .collect();
        let mut removed = gone.iter().filter(|k| self.remove(k).is_some()).count();
        let orphans: Vec<(Name, ServiceKey)> = self
            .by_service
            .iter()
            .flat_map(|(svc, e)| {
                e.iter()
                    .filter(|e| !listing.clusters.contains(&e.cluster))
                    .map(move |e| (e.cluster.clone(), svc.clone()))
            })
            .collect();
        removed += orphans
            .iter()
            .filter(|(c, svc)| self.remove_export(c, svc))
            .count();
        drop(listing);
        // Forget names nothing uses any more.
        let unused: Vec<Name> = self
            .names
            .iter()
            .filter(|n| Arc::strong_count(n) == 1)
            .cloned()
            .collect();
        for n in unused {
            self.names.remove(&n);
        }
        self.revision = self.revision.max(revision);
        self.rewound = false;
        self.complete = true;
        removed
    }

    /// Applies one watch event, unless the view already reflects it.
    pub fn apply_event(&mut self, event: RawEvent) -> Option<Change> {
        let rev = match &event {
            RawEvent::Put(kv) => kv.mod_revision,
            RawEvent::Delete { mod_revision, .. } => *mod_revision,
        };
        // Equal is not stale: one transaction (a registration writes a
        // cluster's record and its bundle together) gives every key it
        // touches the same revision, and each arrives as its own event.
        if rev < self.revision {
            return None;
        }
        self.revision = rev;
        match event {
            RawEvent::Put(kv) => {
                let parsed = self.keys.parse(&kv.key)?;
                self.upsert_parsed(parsed.clone(), kv)
                    .then_some(Change::Upsert(parsed))
            }
            RawEvent::Delete { key, .. } => self.remove(&key).map(Change::Remove),
        }
    }

    /// Records that the watch has progressed to `revision` with no event for us.
    pub fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    fn name(&mut self, name: &str) -> Name {
        intern(&mut self.names, name)
    }

    /// Whether the view took the new value.
    fn upsert_parsed(&mut self, parsed: GlobalKey, kv: RawKv) -> bool {
        if self.seen.get(&kv.key) == Some(&kv.mod_revision) {
            return false; // A replay: this key already holds that revision.
        }
        let result = match &parsed {
            // The gate's business: it never reaches the view.
            GlobalKey::AnchorChain => return false,
            GlobalKey::Cluster(name) => json::<ClusterRecord>(&kv.value)
                .and_then(|r| match r.validate() {
                    Ok(()) if r.name == *name => Ok(r),
                    Ok(()) => Err(format!("the record names cluster {:?}", r.name)),
                    Err(e) => Err(e.to_string()),
                })
                .map(|r| {
                    self.clusters.insert(name.clone(), r);
                }),
            GlobalKey::Alive(name) => json(&kv.value).map(|r| {
                self.alive.insert(name.clone(), r);
            }),
            GlobalKey::Seen(name) => json(&kv.value).map(|r| {
                self.last_seen.insert(name.clone(), r);
            }),
            GlobalKey::Bundle(td) => decode_bundle(td, &kv.key, &kv.value)
                .map_err(|e| e.to_string())
                .map(|b| {
                    self.bundles.insert(td.clone(), b);
                }),
            GlobalKey::Export {
                cluster,
                namespace,
                service,
            } => {
                let name = self.name(cluster);
                let svc = ServiceKey::new(namespace, service);
                return matches!(self.upsert_export(&name, svc, &kv), Put::Taken);
            }
            GlobalKey::Policy(name) => read_policy(name, &kv).and_then(|p| {
                self.check_policy(name, &p)?;
                self.policies.insert(name.clone(), p);
                Ok(())
            }),
        };
        self.seen.insert(kv.key.clone(), kv.mod_revision);
        self.settle(&kv.key, result)
    }

    /// Takes an export's value unless the view holds that very revision. One
    /// lookup, since a cold sync makes a million of these.
    fn upsert_export(&mut self, cluster: &Name, svc: ServiceKey, kv: &RawKv) -> Put {
        let Self {
            by_service,
            names,
            export_counts,
            rewound,
            ..
        } = self;
        let (read, held) = match by_service.get_mut(&svc) {
            Some(exporters) => {
                let at = exporters.find(cluster);
                if let Ok(i) = at
                    && exporters.0[i].mod_revision == kv.mod_revision
                    && !*rewound
                {
                    return Put::Unchanged;
                }
                let read = read_export(names, cluster, kv).map(|e| exporters.put(at, e));
                (read, at.is_ok())
            }
            None => {
                let read = read_export(names, cluster, kv).map(|e| {
                    by_service.insert(svc, Exporters(Arc::new(vec![e])));
                });
                (read, false)
            }
        };
        if read.is_ok() && !held {
            *export_counts.entry(cluster.clone()).or_default() += 1;
        }
        match self.settle(&kv.key, read) {
            true => Put::Taken,
            false => Put::Refused { held },
        }
    }

    /// Records the outcome of reading `key`'s new value: whether it was taken.
    fn settle(&mut self, key: &str, read: Result<(), String>) -> bool {
        match read {
            Ok(()) => {
                self.invalid.remove(key);
                true
            }
            Err(reason) => {
                tracing::warn!(%key, %reason, "ignoring an unreadable value; keeping the last good one");
                self.invalid.insert(key.to_owned(), reason);
                false
            }
        }
    }

    /// The key removed, if the view held it.
    fn remove(&mut self, key: &str) -> Option<GlobalKey> {
        self.seen.remove(key);
        self.invalid.remove(key);
        let parsed = self.keys.parse(key)?;
        match &parsed {
            GlobalKey::AnchorChain => None,
            GlobalKey::Cluster(n) => self.clusters.remove(n).map(drop),
            GlobalKey::Alive(n) => self.alive.remove(n).map(drop),
            GlobalKey::Seen(n) => self.last_seen.remove(n).map(drop),
            GlobalKey::Bundle(td) => self.bundles.remove(td).map(drop),
            GlobalKey::Export {
                cluster,
                namespace,
                service,
            } => self
                .remove_export(cluster, &ServiceKey::new(namespace, service))
                .then_some(()),
            GlobalKey::Policy(n) => self.policies.remove(n).map(drop),
        }
        .map(|()| parsed)
    }

    /// Whether the view held that export.
    fn remove_export(&mut self, cluster: &str, svc: &ServiceKey) -> bool {
        let Some(exporters) = self.by_service.get_mut(svc) else {
            return false;
        };
        if exporters.remove(cluster).is_none() {
            return false;
        }
        if exporters.is_empty() {
            self.by_service.remove(svc);
        }
        if let Some(n) = self.export_counts.get_mut(cluster) {
            *n -= 1;
            if *n == 0 {
                self.export_counts.remove(cluster);
            }
        }
        true
    }
}

/// What became of an export's new value.
enum Put {
    /// The view already held that revision.
    Unchanged,
    Taken,
    /// Unreadable; `held` says whether an earlier value stays in force.
    Refused {
        held: bool,
    },
}

/// Reads a [`fedmesh_api::ExportSummary`] straight into the compact form,
/// with the same rules, sharing zone names rather than allocating them.
fn read_export(names: &mut OrdSet<Name>, cluster: &Name, kv: &RawKv) -> Result<Export, String> {
    let wire: WireExport<'_> = json(&kv.value)?;
    validate_ports(&wire.ports).map_err(|e| e.to_string())?;
    let mut localities = Vec::with_capacity(wire.localities.len());
    for l in wire.localities {
        validate_locality(&l.zone, l.healthy, l.total).map_err(|e| e.to_string())?;
        localities.push(ZoneCapacity {
            zone: intern(names, &l.zone),
            healthy: l.healthy,
            total: l.total,
            weight: l.weight,
        });
    }
    Ok(Export {
        cluster: cluster.clone(),
        mod_revision: kv.mod_revision,
        generation: wire.generation,
        ports: wire.ports,
        localities: localities.into(),
    })
}

/// The shared copy of `name`.
fn intern(names: &mut OrdSet<Name>, name: &str) -> Name {
    if let Some(n) = names.get(name) {
        return n.clone();
    }
    let n: Name = name.into();
    names.insert(n.clone());
    n
}

fn read_policy(name: &str, kv: &RawKv) -> Result<Policy, String> {
    let p: GlobalTrafficPolicy = json(&kv.value)?;
    p.validate().map_err(|e| e.to_string())?;
    if p.metadata.name != name {
        return Err(format!("the policy names itself {:?}", p.metadata.name));
    }
    Ok(Policy {
        spec: Arc::new(p.spec),
        revision: kv.mod_revision,
    })
}

fn json<'a, T: serde::Deserialize<'a>>(raw: &'a [u8]) -> Result<T, String> {
    serde_json::from_slice(raw).map_err(|e| e.to_string())
}

/// [`fedmesh_api::ExportSummary`] as written, borrowing zone names from the input.
#[derive(serde::Deserialize)]
struct WireExport<'a> {
    ports: Box<[u16]>,
    #[serde(borrow)]
    localities: Vec<WireLocality<'a>>,
    generation: u64,
}

/// [`fedmesh_api::ZoneCapacity`] as written.
#[derive(serde::Deserialize)]
struct WireLocality<'a> {
    #[serde(borrow)]
    zone: std::borrow::Cow<'a, str>,
    healthy: u32,
    total: u32,
    weight: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ks() -> KeySpace {
        KeySpace::default()
    }

    fn export(generation: u64, healthy: u32) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "ports": [8080],
            "localities": [{"zone": "az1", "healthy": healthy, "total": 3, "weight": healthy}],
            "generation": generation,
        }))
        .unwrap()
    }

    fn put(key: &str, value: Vec<u8>, rev: i64) -> RawEvent {
        RawEvent::Put(RawKv {
            key: key.into(),
            value,
            mod_revision: rev,
        })
    }

    fn gen_of(v: &GlobalView, c: &str) -> Option<u64> {
        v.export(c, "shop", "cart").map(|s| s.generation)
    }

    #[test]
    fn events_apply_once_in_revision_order() {
        let mut v = GlobalView::new(ks());
        let k = ks().export("a", "shop", "cart");
        assert!(v.apply_event(put(&k, export(1, 3), 10)).is_some());
        assert_eq!(v.revision(), 10);
        // A replay of the same revision, or an older one, is ignored.
        assert_eq!(v.apply_event(put(&k, export(0, 0), 10)), None);
        assert_eq!(v.apply_event(put(&k, export(0, 0), 9)), None);
        assert_eq!(gen_of(&v, "a"), Some(1));
        assert!(v.apply_event(put(&k, export(2, 1), 11)).is_some());
        assert_eq!(
            v.export("a", "shop", "cart").unwrap().localities[0].healthy,
            1
        );
        let gone = v.apply_event(RawEvent::Delete {
            key: k.clone(),
            mod_revision: 12,
        });
        assert!(matches!(gone, Some(Change::Remove(_))));
        assert_eq!(v.export_count(), 0);
        assert!(v.by_service.is_empty());
    }

    #[test]
    fn every_key_of_one_transaction_applies() {
        let mut v = GlobalView::new(ks());
        let record = serde_json::json!({
            "name": "a", "cloud": "c", "region": "r", "zones": ["z"], "trustDomain": "a.test",
            "gateways": [{"address": "127.0.1.1", "port": 15443}], "registeredAt": "2026-11-24T00:00:00Z"
        });
        let alive = serde_json::json!({"controller": "c", "startedAt": "2026-11-24T00:00:00Z", "version": "1"});
        // Both keys carry the transaction's revision.
        let cluster = put(&ks().cluster("a"), record.to_string().into_bytes(), 7);
        let live = put(&ks().alive("a"), alive.to_string().into_bytes(), 7);
        assert!(v.apply_event(cluster.clone()).is_some());
        assert!(
            v.apply_event(live.clone()).is_some(),
            "the second key of the transaction"
        );
        assert!(v.clusters.contains_key("a") && v.alive.contains_key("a"));
        // Delivered again (a resumed watch): nothing changes.
        assert_eq!(v.apply_event(cluster), None);
        assert_eq!(v.apply_event(live), None);
    }

    #[test]
    fn a_snapshot_reconciles_key_by_key() {
        let mut v = GlobalView::new(ks());
        let (ka, kb, kc) = (
            ks().export("a", "shop", "cart"),
            ks().export("b", "shop", "cart"),
            ks().export("c", "shop", "cart"),
        );
        v.apply_event(put(&ka, export(1, 3), 5));
        v.apply_event(put(&kb, export(1, 3), 6));
        // After a compaction the re-list shows: a unchanged, b deleted, c new.
        let changed = v.apply_snapshot(
            [
                RawKv {
                    key: ka.clone(),
                    value: export(1, 3),
                    mod_revision: 5,
                },
                RawKv {
                    key: kc.clone(),
                    value: export(7, 2),
                    mod_revision: 40,
                },
            ],
            42,
        );
        assert_eq!(changed, 2);
        assert!(gen_of(&v, "a").is_some() && gen_of(&v, "c").is_some());
        assert!(gen_of(&v, "b").is_none());
        assert_eq!(v.revision(), 42);
        // Events the snapshot already covered are ignored.
        assert_eq!(v.apply_event(put(&kc, export(6, 2), 40)), None);
    }

    #[test]
    fn unreadable_values_keep_the_last_good_one_and_are_reported() {
        let mut v = GlobalView::new(ks());
        let k = ks().export("a", "shop", "cart");
        v.apply_event(put(&k, export(1, 3), 5));
        assert_eq!(v.apply_event(put(&k, b"{not json".to_vec(), 6)), None);
        assert_eq!(gen_of(&v, "a"), Some(1));
        assert!(v.invalid.contains_key(&k));
        v.apply_event(put(&k, export(2, 3), 7));
        assert!(v.invalid.is_empty());
    }

    #[test]
    fn exports_with_bad_ports_are_refused_like_any_unreadable_value() {
        let mut v = GlobalView::new(ks());
        let k = ks().export("a", "shop", "cart");
        v.apply_event(put(&k, export(1, 3), 5));
        let bad = |ports: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({
                "ports": ports,
                "localities": [{"zone": "az1", "healthy": 1, "total": 1, "weight": 1}],
                "generation": 9,
            }))
            .unwrap()
        };
        for (rev, ports, why) in [
            (6, serde_json::json!([0]), "out of range"),
            (7, serde_json::json!([]), "at least one port"),
            (8, serde_json::json!([80, 80]), "twice"),
            (9, serde_json::json!([70000]), "70000"),
        ] {
            assert_eq!(v.apply_event(put(&k, bad(ports), rev)), None);
            assert_eq!(gen_of(&v, "a"), Some(1), "the last good value stays");
            assert!(v.invalid[&k].contains(why), "{}", v.invalid[&k]);
        }
        // A service nobody held before is simply not there.
        let fresh = ks().export("a", "shop", "evil");
        assert_eq!(
            v.apply_event(put(&fresh, bad(serde_json::json!([0])), 10)),
            None
        );
        assert!(v.export("a", "shop", "evil").is_none());
        assert_eq!(v.export_count(), 1);
    }

    #[test]
    fn exports_read_as_the_api_writes_them_and_obey_its_rules() {
        use fedmesh_api::{ExportSummary, ZoneCapacity};
        let zone = |zone: &str, healthy, total| ZoneCapacity {
            zone: zone.into(),
            healthy,
            total,
            weight: healthy,
        };
        let written = ExportSummary {
            ports: vec![8080, 9090],
            localities: vec![zone("az1", 2, 3), zone("az2", 0, 1)],
            generation: 7,
        };
        let mut v = GlobalView::new(ks());
        let k = ks().export("a", "shop", "cart");
        v.apply_event(put(&k, serde_json::to_vec(&written).unwrap(), 5));
        let e = v.export("a", "shop", "cart").unwrap();
        assert_eq!(
            (&*e.ports, e.generation, e.healthy()),
            (&[8080, 9090][..], 7, 2)
        );
        let read: Vec<_> = e
            .localities
            .iter()
            .map(|l| zone(&l.zone, l.healthy, l.total))
            .collect();
        assert_eq!(read, written.localities);

        // What ExportSummary::validate refuses, the view refuses too.
        for bad in [
            ExportSummary {
                localities: vec![zone("az1", 4, 3)],
                ..written.clone()
            },
            ExportSummary {
                localities: vec![zone("Not_A_Label", 1, 3)],
                ..written.clone()
            },
        ] {
            assert!(bad.validate().is_err());
            assert_eq!(
                v.apply_event(put(
                    &k,
                    serde_json::to_vec(&bad).unwrap(),
                    6 + bad.localities[0].total as i64
                )),
                None
            );
            assert!(v.invalid.contains_key(&k));
            assert_eq!(
                v.export("a", "shop", "cart").unwrap().generation,
                7,
                "the last good value stays"
            );
        }
    }

    #[test]
    fn names_are_shared_between_exports() {
        let mut v = GlobalView::new(ks());
        v.apply_event(put(&ks().export("a", "shop", "cart"), export(1, 3), 5));
        v.apply_event(put(&ks().export("a", "shop", "web"), export(1, 3), 6));
        let (x, y) = (
            v.export("a", "shop", "cart").unwrap(),
            v.export("a", "shop", "web").unwrap(),
        );
        assert!(Arc::ptr_eq(&x.cluster, &y.cluster));
        assert!(Arc::ptr_eq(&x.localities[0].zone, &y.localities[0].zone));
    }

    #[test]
    fn a_relist_removes_exports_of_a_listed_cluster_and_of_an_unlisted_one() {
        let mut v = GlobalView::new(ks());
        for (i, (c, s)) in [("a", "cart"), ("a", "web"), ("b", "cart")]
            .iter()
            .enumerate()
        {
            v.apply_event(put(&ks().export(c, "shop", s), export(1, 3), 5 + i as i64));
        }
        let mut listing = Listing::default();
        let kept = RawKv {
            key: ks().export("a", "shop", "cart"),
            value: export(1, 3),
            mod_revision: 5,
        };
        assert_eq!(
            v.list_exports(&mut listing, "a", vec![kept], &BTreeSet::new()),
            1,
            "a/web is gone"
        );
        assert_eq!(v.finish_listing(listing, 20), 1, "b was not listed at all");
        assert_eq!(v.export_count(), 1);
        assert!(gen_of(&v, "a").is_some());
        assert!(v.export("a", "shop", "web").is_none() && gen_of(&v, "b").is_none());
    }

    #[test]
    fn foreign_keys_are_ignored() {
        let mut v = GlobalView::new(ks());
        assert_eq!(v.apply_event(put("/fedmesh/v1/unknown/x", vec![], 3)), None);
        assert_eq!(v.revision(), 3);
    }
}
