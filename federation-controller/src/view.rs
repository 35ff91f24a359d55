//! The global view: what this controller knows of the global zone, built from
//! a list followed by watch events. I/O-free: the watcher feeds it snapshots
//! and events; tests feed it by hand.
//!
//! Every applied key remembers its `mod_revision`, and the view remembers the
//! last revision it has seen, so an event delivered twice (a resumed watch
//! overlapping a list) is ignored, and a re-list after a compaction is
//! reconciled key by key instead of replacing the view wholesale.

use fedmesh_api::{AliveRecord, ClusterRecord, ExportSummary, GlobalKey, KeySpace, ServiceKey};
use imbl::OrdMap;
use trust_bundle::Bundle;

use crate::zone::decode_bundle;

/// One key of the global zone as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// A watch event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    Put(RawKv),
    /// `mod_revision` is the revision of the deletion.
    Delete {
        key: String,
        mod_revision: i64,
    },
}

/// One cluster's export of one service, as last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub summary: ExportSummary,
    pub mod_revision: i64,
}

/// The keys seen so far by a listing in progress.
#[derive(Debug, Default)]
pub struct Listing {
    keys: std::collections::HashSet<String>,
}

/// What an applied snapshot or event changed.
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
    /// beside their summary: there are a million of them at scale).
    seen: OrdMap<String, i64>,
    pub clusters: OrdMap<String, ClusterRecord>,
    pub alive: OrdMap<String, AliveRecord>,
    pub bundles: OrdMap<String, Bundle>,
    /// Exports by service, then cluster: the shape the mesh is built in.
    pub by_service: OrdMap<ServiceKey, OrdMap<String, Export>>,
    /// Keys whose latest value could not be read, with the reason. Their last
    /// good value (if any) stays in the view.
    pub invalid: OrdMap<String, String>,
}

impl GlobalView {
    pub fn new(keys: KeySpace) -> Self {
        Self {
            keys,
            revision: 0,
            seen: OrdMap::new(),
            clusters: OrdMap::new(),
            alive: OrdMap::new(),
            bundles: OrdMap::new(),
            by_service: OrdMap::new(),
            invalid: OrdMap::new(),
        }
    }

    /// One cluster's export of one service.
    pub fn export(&self, cluster: &str, namespace: &str, service: &str) -> Option<&ExportSummary> {
        self.by_service
            .get(&ServiceKey::new(namespace, service))?
            .get(cluster)
            .map(|e| &e.summary)
    }

    /// The `mod_revision` the view holds for the key `parsed` names.
    fn known_revision(&self, key: &str, parsed: &GlobalKey) -> Option<i64> {
        match parsed {
            GlobalKey::Export {
                cluster,
                namespace,
                service,
            } => self
                .by_service
                .get(&ServiceKey::new(namespace, service))?
                .get(cluster)
                .map(|e| e.mod_revision),
            _ => self.seen.get(key).copied(),
        }
    }

    /// How many (cluster, service) exports the view holds.
    pub fn export_count(&self) -> usize {
        self.by_service.values().map(|m| m.len()).sum()
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
    pub fn apply_snapshot(
        &mut self,
        kvs: impl IntoIterator<Item = RawKv>,
        revision: i64,
    ) -> Vec<Change> {
        let mut listing = Listing::default();
        let mut changes = self.apply_listed(&mut listing, kvs);
        changes.extend(self.finish_listing(listing, revision));
        changes
    }

    /// Applies one page of a listing in progress. Pages are applied as they
    /// arrive, so a large listing never sits in memory whole.
    pub fn apply_listed(
        &mut self,
        listing: &mut Listing,
        kvs: impl IntoIterator<Item = RawKv>,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for kv in kvs {
            listing.keys.insert(kv.key.clone());
            let Some(parsed) = self.keys.parse(&kv.key) else {
                continue;
            };
            if self.known_revision(&kv.key, &parsed) != Some(kv.mod_revision) {
                changes.extend(self.upsert_parsed(parsed, kv));
            }
        }
        changes
    }

    /// Ends a listing taken at `revision`: every key it did not contain is
    /// removed.
    pub fn finish_listing(&mut self, listing: Listing, revision: i64) -> Vec<Change> {
        let exports = self.by_service.iter().flat_map(|(svc, per_cluster)| {
            per_cluster
                .keys()
                .map(|c| self.keys.export(c, &svc.namespace, &svc.name))
        });
        let gone: Vec<String> = self
            .seen
            .keys()
            .cloned()
            .chain(exports)
            .filter(|k| !listing.keys.contains(k))
            .collect();
        let changes = gone.iter().filter_map(|k| self.remove(k)).collect();
        self.revision = self.revision.max(revision);
        changes
    }

    /// Applies one watch event, unless the view already reflects it.
    pub fn apply_event(&mut self, event: RawEvent) -> Option<Change> {
        let rev = match &event {
            RawEvent::Put(kv) => kv.mod_revision,
            RawEvent::Delete { mod_revision, .. } => *mod_revision,
        };
        if rev <= self.revision {
            return None;
        }
        self.revision = rev;
        match event {
            RawEvent::Put(kv) => self.upsert(kv),
            RawEvent::Delete { key, .. } => self.remove(&key),
        }
    }

    /// Records that the watch has progressed to `revision` with no event for us.
    pub fn advance(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    fn upsert(&mut self, kv: RawKv) -> Option<Change> {
        let parsed = self.keys.parse(&kv.key)?;
        self.upsert_parsed(parsed, kv)
    }

    fn upsert_parsed(&mut self, parsed: GlobalKey, kv: RawKv) -> Option<Change> {
        let result = match &parsed {
            GlobalKey::Cluster(name) => json(&kv.value).map(|r| {
                self.clusters.insert(name.clone(), r);
            }),
            GlobalKey::Alive(name) => json(&kv.value).map(|r| {
                self.alive.insert(name.clone(), r);
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
            } => json::<ExportSummary>(&kv.value).map(|summary| {
                self.by_service
                    .entry(ServiceKey::new(namespace, service))
                    .or_default()
                    .insert(
                        cluster.clone(),
                        Export {
                            summary,
                            mod_revision: kv.mod_revision,
                        },
                    );
            }),
            // Policies are read by a later part of the controller.
            GlobalKey::Policy(_) => Ok(()),
        };
        if !matches!(parsed, GlobalKey::Export { .. }) {
            self.seen.insert(kv.key.clone(), kv.mod_revision);
        }
        match result {
            Ok(()) => {
                self.invalid.remove(&kv.key);
                Some(Change::Upsert(parsed))
            }
            Err(reason) => {
                tracing::warn!(key = %kv.key, %reason, "ignoring an unreadable value; keeping the last good one");
                self.invalid.insert(kv.key, reason);
                None
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Change> {
        self.seen.remove(key);
        self.invalid.remove(key);
        let parsed = self.keys.parse(key)?;
        match &parsed {
            GlobalKey::Cluster(n) => self.clusters.remove(n).map(drop),
            GlobalKey::Alive(n) => self.alive.remove(n).map(drop),
            GlobalKey::Bundle(td) => self.bundles.remove(td).map(drop),
            GlobalKey::Export {
                cluster,
                namespace,
                service,
            } => {
                let svc = ServiceKey::new(namespace, service);
                let per_cluster = self.by_service.get_mut(&svc)?;
                let removed = per_cluster.remove(cluster).map(drop);
                if per_cluster.is_empty() {
                    self.by_service.remove(&svc);
                }
                removed
            }
            GlobalKey::Policy(_) => Some(()),
        }
        .map(|()| Change::Remove(parsed))
    }
}

fn json<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    serde_json::from_slice(raw).map_err(|e| e.to_string())
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
        let changes = v.apply_snapshot(
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
        assert_eq!(changes.len(), 2, "{changes:?}");
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
    fn foreign_keys_are_ignored() {
        let mut v = GlobalView::new(ks());
        assert_eq!(v.apply_event(put("/fedmesh/v1/unknown/x", vec![], 3)), None);
        assert_eq!(v.revision(), 3);
    }
}
