//! One kind's objects as the watcher last saw them: I/O-free.
//!
//! A relist (after a dropped watch, a `410 Gone`, a restarted API server)
//! arrives as `Init`, the objects, then `InitDone`; the mirror swaps the
//! new listing in whole at `InitDone`, so nothing is lost, repeated or
//! half-seen, and an object missing from the listing is gone.

use std::collections::BTreeMap;

use kube::Resource;
use kube::runtime::watcher::Event;

/// `(namespace, name)`; cluster-scoped objects have an empty namespace.
pub type ObjectKey = (String, String);

#[derive(Debug, Clone)]
pub struct Mirror<K> {
    objects: BTreeMap<ObjectKey, K>,
    /// A listing under way.
    listing: Option<BTreeMap<ObjectKey, K>>,
    listed: bool,
}

impl<K> Default for Mirror<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            listing: None,
            listed: false,
        }
    }
}

fn key_of<K: Resource>(k: &K) -> ObjectKey {
    let m = k.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

impl<K: Resource> Mirror<K> {
    /// Applies one watcher event; true when what [`Self::iter`] shows
    /// may have changed.
    pub fn apply(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(k) => {
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key_of(&k), k);
                false
            }
            Event::InitDone => {
                self.objects = self.listing.take().unwrap_or_default();
                self.listed = true;
                true
            }
            Event::Apply(k) => {
                self.objects.insert(key_of(&k), k);
                true
            }
            Event::Delete(k) => self.objects.remove(&key_of(&k)).is_some(),
        }
    }

    /// True once a first listing has completed.
    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.objects.get(&(namespace.to_owned(), name.to_owned()))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &K)> {
        self.objects.iter()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, rv: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_relist_replaces_the_objects_whole_at_init_done() {
        let mut m = Mirror::default();
        assert!(!m.listed());
        m.apply(Event::Init);
        m.apply(Event::InitApply(svc("a", "1")));
        m.apply(Event::InitApply(svc("b", "1")));
        assert!(m.is_empty(), "nothing shows before the listing is complete");
        assert!(m.apply(Event::InitDone));
        assert!(m.listed());
        assert_eq!(m.len(), 2);

        // A watch event, then a relist that no longer has `a` and has a
        // newer `b`: while it runs the old objects stay.
        assert!(m.apply(Event::Apply(svc("c", "2"))));
        m.apply(Event::Init);
        m.apply(Event::InitApply(svc("b", "3")));
        assert_eq!(m.len(), 3);
        m.apply(Event::InitDone);
        let names: Vec<_> = m.iter().map(|(k, _)| k.1.as_str()).collect();
        assert_eq!(names, ["b"], "deleted while unwatched means gone");
        assert_eq!(
            m.get("shop", "b")
                .unwrap()
                .metadata
                .resource_version
                .as_deref(),
            Some("3")
        );
        assert!(m.apply(Event::Delete(svc("b", "4"))));
        assert!(
            !m.apply(Event::Delete(svc("b", "4"))),
            "deleting twice changes nothing"
        );
    }
}
