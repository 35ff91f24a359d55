//! A cluster's export manifest: how one signature per cluster vouches for
//! every export value it publishes, so that readers check a million
//! exports without a million signature verifications.
//!
//! Export values stay plain JSON under `exports/<c>/<ns>/<svc>`. The
//! cluster's controller signs, at `seen/<c>`, a manifest of them:
//! - `buckets`: services are spread over [`BUCKETS`] buckets by the hash of
//!   their name; each bucket's root is the SHA-256 (truncated to 16 bytes)
//!   of its services' names and value digests in name order. A reader that
//!   lists the zone checks every bucket against the listing and believes a
//!   bucket only whole, so a forged, deleted or added export spoils its own
//!   bucket and never another.
//! - `prev` and `changes`: the manifest this one follows and the exports the
//!   same etcd transaction wrote or deleted, with their digests. A watching
//!   reader that believed `prev` checks only the changed values: O(change).
//! - `count`: how many exports the cluster publishes (a reader's budget).

use std::collections::BTreeMap;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

use crate::anchor::hex;

/// How many buckets a cluster's exports are spread over.
pub const BUCKETS: u8 = 64;

/// The first 16 bytes of a SHA-256.
pub type Digest = [u8; 16];

/// The signed value of `seen/<cluster>`. Fields this version does not know
/// (a newer controller's) are ignored: clusters one version apart federate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportManifest {
    /// The sequence of the manifest this one follows (0: none).
    pub prev: u64,
    pub count: u32,
    /// Root of each non-empty bucket, hex.
    pub buckets: BTreeMap<u8, String>,
    /// `ns/svc` of each export written (its value's digest, hex) or deleted
    /// (`null`) together with this manifest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub changes: BTreeMap<String, Option<String>>,
}

/// The digest of an export's stored bytes.
pub fn value_digest(value: &[u8]) -> Digest {
    truncate(digest::digest(&digest::SHA256, value).as_ref())
}

/// The bucket of a service, `ns/svc`.
pub fn bucket_of(service: &str) -> u8 {
    digest::digest(&digest::SHA256, service.as_bytes()).as_ref()[0] % BUCKETS
}

pub fn digest_hex(d: &Digest) -> String {
    hex(d)
}

fn truncate(full: &[u8]) -> Digest {
    let mut d = [0; 16];
    d.copy_from_slice(&full[..16]);
    d
}

/// A set of exports as (service, value digest): what a controller has
/// published, or what a reader listed. Kept by bucket, with each bucket's
/// root cached until it changes, so that a change costs the hashing of its
/// own bucket only (a 64th of the cluster's exports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSet {
    buckets: Vec<BTreeMap<String, Digest>>,
    /// Roots of clean, non-empty buckets.
    roots: BTreeMap<u8, Digest>,
    dirty: std::collections::BTreeSet<u8>,
    len: usize,
}

impl Default for ExportSet {
    fn default() -> Self {
        Self {
            buckets: vec![BTreeMap::new(); usize::from(BUCKETS)],
            roots: BTreeMap::new(),
            dirty: Default::default(),
            len: 0,
        }
    }
}

impl ExportSet {
    pub fn insert(&mut self, service: String, digest: Digest) {
        let b = bucket_of(&service);
        if self.buckets[usize::from(b)]
            .insert(service, digest)
            .is_none()
        {
            self.len += 1;
        }
        self.dirty.insert(b);
    }

    pub fn remove(&mut self, service: &str) {
        let b = bucket_of(service);
        if self.buckets[usize::from(b)].remove(service).is_some() {
            self.len -= 1;
            self.dirty.insert(b);
        }
    }

    pub fn get(&self, service: &str) -> Option<&Digest> {
        self.buckets[usize::from(bucket_of(service))].get(service)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The root of every non-empty bucket; only buckets changed since the
    /// last call are hashed again.
    pub fn roots(&mut self) -> &BTreeMap<u8, Digest> {
        for b in std::mem::take(&mut self.dirty) {
            let entries = &self.buckets[usize::from(b)];
            if entries.is_empty() {
                self.roots.remove(&b);
                continue;
            }
            let mut h = digest::Context::new(&digest::SHA256);
            for (service, d) in entries {
                // Length-prefixed, so no two sets hash the same bytes.
                h.update(&(service.len() as u32).to_be_bytes());
                h.update(service.as_bytes());
                h.update(d);
            }
            self.roots.insert(b, truncate(h.finish().as_ref()));
        }
        &self.roots
    }

    /// The manifest of this set, following `prev`, listing `changes`.
    pub fn manifest(
        &mut self,
        prev: u64,
        changes: BTreeMap<String, Option<String>>,
    ) -> ExportManifest {
        let count = self.len as u32;
        ExportManifest {
            prev,
            count,
            buckets: self.roots().iter().map(|(b, d)| (*b, hex(d))).collect(),
            changes,
        }
    }

    /// The buckets whose roots differ from `manifest`'s: a bucket missing
    /// on either side counts as differing.
    pub fn mismatched(&mut self, manifest: &ExportManifest) -> Vec<u8> {
        let mine = self.roots();
        (0..BUCKETS)
            .filter(|b| mine.get(b).map(|d| hex(d)) != manifest.buckets.get(b).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[(&str, &[u8])]) -> ExportSet {
        let mut s = ExportSet::default();
        for (svc, v) in entries {
            s.insert((*svc).into(), value_digest(v));
        }
        s
    }

    #[test]
    fn a_listing_matches_the_manifest_of_the_same_set() {
        let mut s = set(&[("shop/cart", b"1"), ("shop/web", b"2"), ("pay/api", b"3")]);
        let m = s.manifest(0, BTreeMap::new());
        assert_eq!(m.count, 3);
        assert!(s.mismatched(&m).is_empty());
        assert!(m.buckets.len() <= 3);
    }

    #[test]
    fn a_change_spoils_only_its_own_bucket() {
        let mut s = set(&[("shop/cart", b"1"), ("shop/web", b"2"), ("pay/api", b"3")]);
        let m = s.manifest(0, BTreeMap::new());
        for (svc, forged) in [
            ("shop/cart", Some(&b"forged"[..])),
            ("shop/web", None),
            ("evil/svc", Some(&b"x"[..])),
        ] {
            let mut t = s.clone();
            match forged {
                Some(v) => t.insert(svc.into(), value_digest(v)),
                None => t.remove(svc),
            }
            assert_eq!(t.mismatched(&m), vec![bucket_of(svc)], "{svc}");
        }
    }

    #[test]
    fn cached_roots_follow_every_change() {
        let mut s = set(&[("shop/cart", b"1"), ("shop/web", b"2")]);
        let before = s.roots().clone();
        s.insert("shop/cart".into(), value_digest(b"changed"));
        s.remove("shop/web");
        s.remove("shop/absent");
        // The same set built from scratch has the same roots.
        let mut fresh = set(&[("shop/cart", b"changed")]);
        assert_eq!(s.roots(), fresh.roots());
        assert_ne!(s.roots(), &before);
        assert_eq!(s.len(), 1);
        s.remove("shop/cart");
        assert!(s.roots().is_empty() && s.is_empty());
    }
}
