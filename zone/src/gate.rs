//! The reader's side of the signed global zone, I/O-free: what a
//! controller (or `fedmesh get`) believes of what etcd holds.
//!
//! Every value passes the gate before the view sees it. The gate opens each
//! envelope with the key allowed to sign that key (`fedmesh-seal`), refuses
//! what is unsigned, forged, copied from another key, older than what it
//! believes (rollback) or over budget, and hands on the plain value of what
//! it believes, so the view downstream is the unsigned view it always was.
//! A refusal changes nothing downstream: the last believed value stays,
//! and the refusal is kept by key for `fedmesh get`'s TRUST column and the
//! refused-records metric.
//!
//! Deletions: only a signed deletion (a statement whose value is `null`, or
//! an export the cluster's signed manifest withdraws) removes anything. A
//! raw delete, or a listing that lacks a key (a wiped or restored etcd), is
//! the loss of a copy, not a withdrawal: the believed value is handed on
//! again. So a cluster's services survive anyone deleting its keys, and
//! etcd itself.
//!
//! Chain of trust, per kind:
//! - `clusters/<c>`, `policies/<p>`: the federation anchor pinned at join;
//! - `bundles/<td>`: a root the reader trusts for `td`: first those pinned
//!   in the anchor-signed records of the clusters of `td`, then the roots of
//!   the bundle it believes (so a rotation signed by the current root needs
//!   no operator);
//! - `seen/<c>` (the export manifest): `…/fedmesh/controller/<c>`'s SVID,
//!   verified against the believed bundle of `c`'s trust domain;
//! - `exports/<c>/…`: plain JSON, believed when it matches `c`'s manifest:
//!   through the manifest's `changes` while watching, bucket by bucket when
//!   listing (`fedmesh_seal::manifest`).
//!
//! `alive/<c>` is unsigned by design: it only dates liveness, and liveness
//! never takes traffic away (static stability).

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use fedmesh_api::{ClusterRecord, GlobalKey, KeySpace, SeenRecord};
use fedmesh_seal::manifest::digest_hex;
use fedmesh_seal::{
    AnchorChain, AnchorPublic, CHAIN_SUBJECT, ExportManifest, ExportSet, Opened, Refusal,
    bucket_of, check_seq, open_anchored, open_by_root, open_by_svid, root_keyid, seq_time,
    value_digest,
};
use fedmesh_trust::{Bundle, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::client::{RawEvent, RawKv};

/// What a reader allows one cluster to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Exports per cluster.
    pub max_exports: u32,
    /// Bytes of one export value.
    pub max_export_bytes: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            max_exports: 20_000,
            max_export_bytes: 16 * 1024,
        }
    }
}

/// How a gate decides.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// The federation anchor(s) pinned in the join directory.
    pub anchors: Vec<AnchorPublic>,
    /// Believe values that are not envelopes, and obey raw deletes of them:
    /// the one upgrade step from an unsigned federation (`--trust-unsigned`).
    pub trust_unsigned: bool,
    pub budget: Budget,
}

/// The value of an anchor-signed `clusters/<c>`: the record, and the roots
/// its trust domain's bundle must first be signed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    #[serde(flatten)]
    pub record: ClusterRecord,
    /// Keyids (`root:<hex>`) of the CA roots pinned at registration.
    #[serde(default)]
    pub roots: Vec<String>,
}

/// The kind of a refused record, as the metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Anchor,
    Cluster,
    Bundle,
    Manifest,
    Export,
    Policy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Anchor => "anchor",
            Kind::Cluster => "cluster",
            Kind::Bundle => "bundle",
            Kind::Manifest => "manifest",
            Kind::Export => "export",
            Kind::Policy => "policy",
        }
    }
}

/// One refusal, kept by key until a believed value replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub kind: Kind,
    /// The cluster the key belongs to ("" for policies).
    pub cluster: String,
    pub refusal: Refusal,
}

/// What a batch of watch events came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Plain events for the view.
    pub events: Vec<RawEvent>,
    /// A manifest could not be followed from the one believed (its `prev`
    /// is another): only a listing can check that cluster's exports again.
    pub relist: bool,
}

/// A cluster's listed exports, as far as the gate believes them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListedExports {
    /// Plain exports of buckets that match the manifest.
    pub kvs: Vec<RawKv>,
    /// Buckets that do not: the view keeps what it holds in them.
    pub held: BTreeSet<u8>,
}

#[derive(Debug, Clone)]
struct Held {
    seq: Option<u64>,
    /// The plain value handed on, at the revision it was believed.
    kv: RawKv,
}

#[derive(Debug, Clone)]
struct HeldCluster {
    held: Held,
    trust_domain: String,
    roots: Vec<String>,
}

#[derive(Debug, Clone)]
struct HeldBundle {
    held: Held,
    bundle: Bundle,
}

#[derive(Debug, Clone)]
struct HeldManifest {
    seq: u64,
    manifest: ExportManifest,
    kv: RawKv,
}

/// The gate. See the module documentation.
#[derive(Debug)]
pub struct Gate {
    keys: KeySpace,
    config: GateConfig,
    clusters: BTreeMap<String, HeldCluster>,
    /// Clusters and policies whose last word is a signed deletion, with
    /// its sequence: an older genuine value must not bring them back.
    removed: BTreeMap<String, u64>,
    removed_policies: BTreeMap<String, u64>,
    bundles: BTreeMap<String, HeldBundle>,
    manifests: BTreeMap<String, HeldManifest>,
    /// `seen/<c>` of clusters read unsigned (`trust_unsigned`).
    unsigned_seen: BTreeMap<String, RawKv>,
    policies: BTreeMap<String, Held>,
    /// The anchor the believed chain ends at, and the chain's sequence:
    /// once one is believed, the only key records and policies count from.
    current_anchor: Option<(u64, AnchorPublic)>,
    /// What etcd held (or should hold) for every believed record and
    /// signed deletion, by key, as signed: what a controller keeps on disk
    /// and `fedmesh zone backup` writes, re-judged when read back.
    signed: BTreeMap<String, Vec<u8>>,
    refused: BTreeMap<String, Refused>,
    /// Refusals since the last [`Gate::drain_refusals`], for counters.
    fresh: Vec<Refused>,
}

/// The newest key of the anchor chain `raw` (an envelope at
/// `anchor/chain`) that a reader pinned to `pinned` follows, with the
/// chain's sequence, if the chain follows from one of them and its newest
/// key signed it.
pub fn current_anchor(pinned: &[AnchorPublic], raw: &[u8]) -> Result<(u64, AnchorPublic), Refusal> {
    let statement = fedmesh_seal::peek::<AnchorChain>(raw)?;
    let chain = statement
        .value
        .ok_or_else(|| Refusal::Invalid("the anchor chain cannot be deleted".into()))?;
    let newest = chain.follow(pinned)?;
    let opened = open_anchored::<AnchorChain>(raw, CHAIN_SUBJECT, std::slice::from_ref(&newest))?;
    Ok((opened.seq, newest))
}

/// Order in which one batch or listing is judged: what vouches for a key
/// comes before it.
pub fn rank(key: &GlobalKey) -> u8 {
    match key {
        GlobalKey::AnchorChain => 0,
        GlobalKey::Cluster(_) => 1,
        GlobalKey::Bundle(_) => 2,
        GlobalKey::Seen(_) => 3,
        GlobalKey::Export { .. } => 4,
        GlobalKey::Policy(_) => 5,
        GlobalKey::Alive(_) => 6,
    }
}

impl Gate {
    pub fn new(keys: KeySpace, config: GateConfig) -> Self {
        Self {
            keys,
            config,
            clusters: BTreeMap::new(),
            removed: BTreeMap::new(),
            removed_policies: BTreeMap::new(),
            bundles: BTreeMap::new(),
            manifests: BTreeMap::new(),
            unsigned_seen: BTreeMap::new(),
            policies: BTreeMap::new(),
            current_anchor: None,
            signed: BTreeMap::new(),
            refused: BTreeMap::new(),
            fresh: Vec::new(),
        }
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    /// The refusal in force for each key.
    pub fn refused(&self) -> &BTreeMap<String, Refused> {
        &self.refused
    }

    /// Refusals made since the last call.
    pub fn drain_refusals(&mut self) -> Vec<Refused> {
        std::mem::take(&mut self.fresh)
    }

    /// Clusters whose record the gate believes.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.clusters.keys().map(String::as_str)
    }

    /// Judges one watch response: every event of one or more whole
    /// revisions, as etcd delivers them. Each revision is judged on its
    /// own, so that a cluster's manifests follow one another even when a
    /// response carries several.
    pub fn admit(&mut self, events: Vec<RawEvent>, now: SystemTime) -> Admitted {
        let mut parsed: Vec<(GlobalKey, RawEvent)> = events
            .into_iter()
            .filter_map(|e| Some((self.keys.parse(e.key())?, e)))
            .collect();
        parsed.sort_by_key(|(k, e)| (e.revision(), rank(k)));
        let mut out = Admitted::default();
        let mut parsed = parsed.into_iter().peekable();
        while let Some(first) = parsed.next() {
            let rev = first.1.revision();
            let mut revision = vec![first];
            while let Some(next) = parsed.next_if(|(_, e)| e.revision() == rev) {
                revision.push(next);
            }
            self.admit_revision(revision, now, &mut out);
        }
        out
    }

    /// Judges the events of one revision (one etcd transaction).
    fn admit_revision(
        &mut self,
        events: Vec<(GlobalKey, RawEvent)>,
        now: SystemTime,
        out: &mut Admitted,
    ) {
        // Exports wait for their transaction's manifest.
        let mut exports: BTreeMap<String, Vec<(String, RawEvent)>> = BTreeMap::new();
        let mut changed_manifests: Vec<(String, Option<u64>)> = Vec::new();
        for (key, event) in events {
            match key {
                GlobalKey::Export {
                    cluster,
                    namespace,
                    service,
                } => exports
                    .entry(cluster)
                    .or_default()
                    .push((format!("{namespace}/{service}"), event)),
                GlobalKey::Seen(ref cluster) => {
                    let before = self.manifests.get(cluster).map(|m| m.seq);
                    let events = self.judge(&key, event, now);
                    if !events.is_empty() {
                        changed_manifests.push((cluster.clone(), before));
                        out.events.extend(events);
                    }
                }
                other => out.events.extend(self.judge(&other, event, now)),
            }
        }
        for (cluster, before) in changed_manifests {
            let batch = exports.remove(&cluster).unwrap_or_default();
            let (events, relist) = self.follow_manifest(&cluster, before, batch);
            out.events.extend(events);
            out.relist |= relist;
        }
        // Export events no manifest of their transaction vouches for.
        for (cluster, batch) in exports {
            for (_, event) in batch {
                out.events.extend(self.unvouched_export(&cluster, event));
            }
        }
    }

    /// Judges a listing's keys other than exports. Returns the plain values
    /// the view should hold: the believed ones, including believed keys the
    /// listing lacked (a copy lost is not a deletion).
    pub fn admit_records(&mut self, kvs: Vec<RawKv>, now: SystemTime) -> Vec<RawKv> {
        let mut parsed: Vec<(GlobalKey, RawKv)> = kvs
            .into_iter()
            .filter_map(|kv| Some((self.keys.parse(&kv.key)?, kv)))
            .filter(|(k, _)| !matches!(k, GlobalKey::Export { .. }))
            .collect();
        parsed.sort_by_key(|(k, _)| rank(k));
        let listed: BTreeSet<String> = parsed.iter().map(|(_, kv)| kv.key.clone()).collect();
        let mut alive = Vec::new();
        for (key, kv) in parsed {
            if matches!(key, GlobalKey::Alive(_)) {
                alive.push(kv);
            } else {
                self.judge(&key, RawEvent::Put(kv), now);
            }
        }
        let mut out = self.believed_records();
        for kv in &out {
            if !listed.contains(&kv.key) {
                tracing::warn!(key = %kv.key, "a believed record is missing from etcd; keeping it");
            }
        }
        out.extend(alive);
        out
    }

    /// Every record the gate believes, as plain values.
    pub fn believed_records(&self) -> Vec<RawKv> {
        let mut out: Vec<RawKv> = Vec::new();
        out.extend(self.clusters.values().map(|c| c.held.kv.clone()));
        out.extend(self.bundles.values().map(|b| b.held.kv.clone()));
        out.extend(self.manifests.values().map(|m| m.kv.clone()));
        out.extend(self.unsigned_seen.values().cloned());
        out.extend(self.policies.values().map(|p| p.kv.clone()));
        out
    }

    /// Every believed record and signed deletion as it was signed (plain
    /// values for what `trust_unsigned` let in), with no revision: what a
    /// gate fed them again believes what this one does.
    pub fn signed_records(&self) -> Vec<RawKv> {
        self.signed
            .iter()
            .map(|(key, value)| RawKv {
                key: key.clone(),
                value: value.clone(),
                mod_revision: 0,
            })
            .collect()
    }

    /// Judges a listing of one cluster's exports against its manifest.
    pub fn admit_exports(&mut self, cluster: &str, kvs: Vec<RawKv>) -> ListedExports {
        let unsigned = self.trust_unsigned_cluster(cluster);
        let Some(manifest) = self.manifests.get(cluster).map(|m| m.manifest.clone()) else {
            if unsigned {
                return ListedExports {
                    kvs,
                    held: BTreeSet::new(),
                };
            }
            for kv in kvs {
                self.refuse(
                    &kv.key,
                    Kind::Export,
                    cluster,
                    Refusal::Unsigned("no signed manifest of the cluster's exports".into()),
                );
            }
            return ListedExports {
                kvs: Vec::new(),
                held: (0..fedmesh_seal::BUCKETS).collect(),
            };
        };
        let mut set = ExportSet::default();
        let mut listed = Vec::with_capacity(kvs.len());
        for kv in kvs {
            let Some((_, ns, svc)) = self.keys.parse_export(&kv.key) else {
                continue;
            };
            let service = format!("{ns}/{svc}");
            set.insert(service.clone(), value_digest(&kv.value));
            listed.push((service, kv));
        }
        let held: BTreeSet<u8> = set.mismatched(&manifest).into_iter().collect();
        let mut out = ListedExports {
            kvs: Vec::with_capacity(listed.len()),
            held,
        };
        for (service, kv) in listed {
            if out.held.contains(&bucket_of(&service)) {
                self.refuse(
                    &kv.key,
                    Kind::Export,
                    cluster,
                    Refusal::Forged(
                        "its bucket does not match the cluster's signed manifest".into(),
                    ),
                );
            } else if kv.value.len() > self.config.budget.max_export_bytes {
                self.refuse(
                    &kv.key,
                    Kind::Export,
                    cluster,
                    self.too_large(kv.value.len()),
                );
                out.held.insert(bucket_of(&service));
            } else {
                self.refused.remove(&kv.key);
                out.kvs.push(kv);
            }
        }
        if !out.held.is_empty() {
            tracing::warn!(
                cluster,
                buckets = out.held.len(),
                "exports do not match the cluster's signed manifest; keeping the last believed ones"
            );
        }
        out
    }

    fn too_large(&self, len: usize) -> Refusal {
        Refusal::Budget(format!(
            "{len} bytes; an export may take {}",
            self.config.budget.max_export_bytes
        ))
    }

    fn trust_unsigned_cluster(&self, cluster: &str) -> bool {
        self.config.trust_unsigned
            && self
                .clusters
                .get(cluster)
                .is_some_and(|c| c.held.seq.is_none())
    }

    fn refuse(&mut self, key: &str, kind: Kind, cluster: &str, refusal: Refusal) {
        tracing::warn!(%key, reason = %refusal, "refusing a global-zone value; keeping the last believed one");
        let r = Refused {
            kind,
            cluster: cluster.to_owned(),
            refusal,
        };
        self.fresh.push(r.clone());
        self.refused.insert(key.to_owned(), r);
    }

    /// Judges one record event; the plain events to hand on (a
    /// deregistration takes the cluster's bundle and `seen` with it).
    fn judge(&mut self, key: &GlobalKey, event: RawEvent, now: SystemTime) -> Vec<RawEvent> {
        let kv = match event {
            RawEvent::Put(kv) => kv,
            RawEvent::Delete {
                key: k,
                mod_revision,
            } => {
                return self.raw_delete(key, &k, mod_revision).into_iter().collect();
            }
        };
        let one = match key {
            GlobalKey::Alive(_) => Some(RawEvent::Put(kv)),
            GlobalKey::Cluster(c) => return self.judge_cluster(c, kv),
            GlobalKey::Bundle(td) => self.judge_bundle(td, kv),
            GlobalKey::Seen(c) => self.judge_manifest(c, kv, now),
            GlobalKey::Policy(p) => self.judge_policy(p, kv),
            GlobalKey::AnchorChain => self.judge_chain(kv),
            GlobalKey::Export { .. } => None,
        };
        one.into_iter().collect()
    }

    /// A raw delete: obeyed only for values believed unsigned (the upgrade
    /// step) and for the liveness lease.
    fn raw_delete(
        &mut self,
        key: &GlobalKey,
        raw_key: &str,
        mod_revision: i64,
    ) -> Option<RawEvent> {
        let unsigned = self.config.trust_unsigned
            && match key {
                GlobalKey::Cluster(c) => self.clusters.get(c).is_some_and(|h| h.held.seq.is_none()),
                GlobalKey::Bundle(td) => self.bundles.get(td).is_some_and(|h| h.held.seq.is_none()),
                GlobalKey::Policy(p) => self.policies.get(p).is_some_and(|h| h.seq.is_none()),
                _ => false,
            };
        let delete = RawEvent::Delete {
            key: raw_key.to_owned(),
            mod_revision,
        };
        if unsigned {
            self.signed.remove(raw_key);
        }
        match key {
            GlobalKey::Alive(_) => Some(delete),
            GlobalKey::Cluster(c) if unsigned => {
                self.clusters.remove(c);
                Some(delete)
            }
            GlobalKey::Bundle(td) if unsigned => {
                self.bundles.remove(td);
                Some(delete)
            }
            GlobalKey::Policy(p) if unsigned => {
                self.policies.remove(p);
                Some(delete)
            }
            _ => {
                tracing::warn!(
                    key = raw_key,
                    "ignoring an unsigned delete; keeping the last believed value"
                );
                None
            }
        }
    }

    /// Opens an anchor-signed value, or takes an unsigned one when allowed.
    fn open_anchored_or_unsigned<T: serde::de::DeserializeOwned>(
        &self,
        kv: &RawKv,
    ) -> Result<Opened<T>, Refusal> {
        let subject = self.subject(&kv.key);
        match open_anchored::<T>(&kv.value, subject, &self.anchors()) {
            Err(Refusal::Unsigned(_)) if self.config.trust_unsigned => {
                let value = serde_json::from_slice(&kv.value)
                    .map_err(|e| Refusal::Invalid(e.to_string()))?;
                Ok(Opened {
                    seq: 0,
                    value: Some(value),
                    signer: "unsigned".into(),
                })
            }
            r => r,
        }
    }

    /// The keys records and policies are believed from: the newest of the
    /// believed anchor chain, else those pinned.
    pub fn anchors(&self) -> Vec<AnchorPublic> {
        match &self.current_anchor {
            Some((_, current)) => vec![current.clone()],
            None => self.config.anchors.clone(),
        }
    }

    /// The anchor chain (`anchor/chain`): believed when it follows from a
    /// pinned key (or from the newest key believed so far) and its newest
    /// key signs it. It is never deleted.
    fn judge_chain(&mut self, kv: RawKv) -> Option<RawEvent> {
        let mut pinned = self.config.anchors.clone();
        pinned.extend(self.current_anchor.as_ref().map(|(_, k)| k.clone()));
        let opened = current_anchor(&pinned, &kv.value).and_then(|(seq, current)| {
            check_seq(self.current_anchor.as_ref().map(|(s, _)| *s), seq)?;
            Ok((seq, current))
        });
        match opened {
            Ok(current) => {
                self.refused.remove(&kv.key);
                self.signed.insert(kv.key.clone(), kv.value.clone());
                if self.current_anchor.as_ref().map(|(_, k)| k) != Some(&current.1) {
                    tracing::info!(anchor = %current.1.keyid(), "following the federation anchor's chain");
                }
                self.current_anchor = Some(current);
            }
            Err(r) => self.refuse(&kv.key, Kind::Anchor, "", r),
        }
        None
    }

    fn subject<'k>(&self, key: &'k str) -> &'k str {
        key.strip_prefix(self.keys.prefix()).unwrap_or(key)
    }

    fn judge_cluster(&mut self, name: &str, kv: RawKv) -> Vec<RawEvent> {
        let opened = self
            .open_anchored_or_unsigned::<Registration>(&kv)
            .and_then(|o| {
                let held = self.clusters.get(name).and_then(|c| c.held.seq);
                check_seq(held.or(self.removed.get(name).copied()), o.seq)?;
                if let Some(r) = &o.value {
                    r.record
                        .validate()
                        .map_err(|e| Refusal::Invalid(e.to_string()))?;
                    if r.record.name != name {
                        return Err(Refusal::Invalid(format!(
                            "the record names cluster {:?}",
                            r.record.name
                        )));
                    }
                }
                Ok(o)
            });
        let o = match opened {
            Ok(o) => o,
            Err(r) => {
                self.refuse(&kv.key, Kind::Cluster, name, r);
                return Vec::new();
            }
        };
        self.refused.remove(&kv.key);
        self.signed.insert(kv.key.clone(), kv.value.clone());
        let seq = (o.signer != "unsigned").then_some(o.seq);
        let gone = |key: String| RawEvent::Delete {
            key,
            mod_revision: kv.mod_revision,
        };
        match o.value {
            None => {
                // Deregistered: the cluster, its bundle (unless another
                // cluster of its trust domain remains), its `seen` and its
                // exports go, whatever the raw deletes beside it say: the
                // revocation of its identities rides on the bundle going.
                let held = self.clusters.remove(name);
                self.removed.insert(name.to_owned(), o.seq);
                let mut out = vec![gone(kv.key.clone())];
                if self.manifests.remove(name).is_some() | self.unsigned_seen.remove(name).is_some()
                {
                    self.signed.remove(&self.keys.seen(name));
                    out.push(gone(self.keys.seen(name)));
                }
                if let Some(h) = held
                    && !self
                        .clusters
                        .values()
                        .any(|c| c.trust_domain == h.trust_domain)
                    && self.bundles.remove(&h.trust_domain).is_some()
                {
                    self.signed.remove(&self.keys.bundle(&h.trust_domain));
                    out.push(gone(self.keys.bundle(&h.trust_domain)));
                }
                out
            }
            Some(reg) => {
                self.removed.remove(name);
                let plain = RawKv {
                    key: kv.key.clone(),
                    value: serde_json::to_vec(&reg.record).unwrap_or_default(),
                    mod_revision: kv.mod_revision,
                };
                self.clusters.insert(
                    name.to_owned(),
                    HeldCluster {
                        held: Held {
                            seq,
                            kv: plain.clone(),
                        },
                        trust_domain: reg.record.trust_domain.clone(),
                        roots: reg.roots,
                    },
                );
                vec![RawEvent::Put(plain)]
            }
        }
    }

    fn judge_bundle(&mut self, td: &str, kv: RawKv) -> Option<RawEvent> {
        let owner = self
            .clusters
            .iter()
            .find(|(_, c)| c.trust_domain == td)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        match self.open_bundle(td, &kv) {
            Ok((seq, bundle, doc)) => {
                self.refused.remove(&kv.key);
                self.signed.insert(kv.key.clone(), kv.value.clone());
                let plain = RawKv {
                    key: kv.key.clone(),
                    value: doc,
                    mod_revision: kv.mod_revision,
                };
                self.bundles.insert(
                    td.to_owned(),
                    HeldBundle {
                        held: Held {
                            seq,
                            kv: plain.clone(),
                        },
                        bundle,
                    },
                );
                Some(RawEvent::Put(plain))
            }
            Err(r) => {
                self.refuse(&kv.key, Kind::Bundle, &owner, r);
                None
            }
        }
    }

    /// The roots trusted to sign `td`'s bundle: pinned by the records of
    /// its clusters, and those of the bundle believed now.
    fn trusted_roots(&self, td: &str) -> (Vec<String>, Vec<CertificateDer<'static>>) {
        let mut keyids: Vec<String> = self
            .clusters
            .values()
            .filter(|c| c.trust_domain == td)
            .flat_map(|c| c.roots.iter().cloned())
            .collect();
        let mut certs = Vec::new();
        if let Some(b) = self.bundles.get(td) {
            for r in b.bundle.roots() {
                keyids.extend(root_keyid(r));
                certs.push(r.clone());
            }
        }
        (keyids, certs)
    }

    fn open_bundle(&self, td: &str, kv: &RawKv) -> Result<(Option<u64>, Bundle, Vec<u8>), Refusal> {
        let trust_domain =
            TrustDomain::new(td).map_err(|e| Refusal::Invalid(format!("trust domain {e}")))?;
        let subject = self.subject(&kv.key);
        if !self.clusters.values().any(|c| c.trust_domain == td) {
            return Err(Refusal::Forged(
                "no believed cluster record names this trust domain".into(),
            ));
        }
        let held = self.bundles.get(td).and_then(|b| b.held.seq);
        // The document itself is needed to find the signing root's
        // certificate; nothing in it is believed before the signature is.
        let decode = |doc: &[u8]| {
            Bundle::from_document(trust_domain.clone(), doc, &kv.key)
                .map_err(|e| Refusal::Invalid(e.to_string()))
        };
        let (seq, bundle, doc) = match fedmesh_seal::peek::<serde_json::Value>(&kv.value) {
            Ok(statement) => {
                let doc = statement
                    .value
                    .map(|v| serde_json::to_vec(&v).unwrap_or_default())
                    .ok_or_else(|| {
                        Refusal::Invalid("a bundle cannot be deleted on its own".into())
                    })?;
                // Its roots are where the signing root's certificate may
                // be; nothing in it is believed before the signature is.
                let candidate = decode(&doc)?;
                let (trusted, mut certs) = self.trusted_roots(td);
                certs.extend(candidate.roots().iter().cloned());
                let opened =
                    open_by_root::<serde_json::Value>(&kv.value, subject, &trusted, &certs)?;
                check_seq(held, opened.seq)?;
                (Some(opened.seq), candidate, doc)
            }
            Err(Refusal::Unsigned(_)) if self.config.trust_unsigned => {
                (None, decode(&kv.value)?, kv.value.clone())
            }
            Err(r) => return Err(r),
        };
        Ok((seq, bundle, doc))
    }

    fn judge_manifest(&mut self, cluster: &str, kv: RawKv, now: SystemTime) -> Option<RawEvent> {
        match self.open_manifest(cluster, &kv, now) {
            Ok((seq, manifest)) => {
                self.refused.remove(&kv.key);
                self.signed.insert(kv.key.clone(), kv.value.clone());
                let seen = SeenRecord {
                    at: time::OffsetDateTime::from(seq_time(seq)),
                };
                let plain = RawKv {
                    key: kv.key.clone(),
                    value: serde_json::to_vec(&seen).unwrap_or_default(),
                    mod_revision: kv.mod_revision,
                };
                self.manifests.insert(
                    cluster.to_owned(),
                    HeldManifest {
                        seq,
                        manifest,
                        kv: plain.clone(),
                    },
                );
                Some(RawEvent::Put(plain))
            }
            Err(Refusal::Unsigned(_)) if self.trust_unsigned_cluster(cluster) => {
                // An unsigned federation's `seen` is the plain record.
                self.signed.insert(kv.key.clone(), kv.value.clone());
                self.unsigned_seen.insert(cluster.to_owned(), kv.clone());
                Some(RawEvent::Put(kv))
            }
            Err(r) => {
                self.refuse(&kv.key, Kind::Manifest, cluster, r);
                None
            }
        }
    }

    fn open_manifest(
        &self,
        cluster: &str,
        kv: &RawKv,
        now: SystemTime,
    ) -> Result<(u64, ExportManifest), Refusal> {
        // Unsigned is told apart first: an unsigned federation's `seen` is
        // the plain record, whatever else is missing.
        fedmesh_seal::Envelope::parse(&kv.value)?;
        let c = self
            .clusters
            .get(cluster)
            .ok_or_else(|| Refusal::Forged("no believed record of this cluster".into()))?;
        let bundle = self.bundles.get(&c.trust_domain).ok_or_else(|| {
            Refusal::Forged("no believed bundle of the cluster's trust domain".into())
        })?;
        let td = TrustDomain::new(&c.trust_domain).map_err(|e| Refusal::Invalid(e.to_string()))?;
        let expected =
            SpiffeId::controller(&td, cluster).map_err(|e| Refusal::Invalid(e.to_string()))?;
        let opened = open_by_svid::<ExportManifest>(
            &kv.value,
            self.subject(&kv.key),
            &expected,
            &bundle.bundle,
            now,
        )?;
        check_seq(self.manifests.get(cluster).map(|m| m.seq), opened.seq)?;
        let manifest = opened
            .value
            .ok_or_else(|| Refusal::Invalid("a manifest cannot be deleted".into()))?;
        if manifest.count > self.config.budget.max_exports {
            return Err(Refusal::Budget(format!(
                "{} exports; a cluster may publish {}",
                manifest.count, self.config.budget.max_exports
            )));
        }
        Ok((opened.seq, manifest))
    }

    /// Applies the export events of a revision whose manifest was just
    /// believed: each change must be in the batch with the digest the
    /// manifest signs. `before` is the manifest believed until now.
    fn follow_manifest(
        &mut self,
        cluster: &str,
        before: Option<u64>,
        batch: Vec<(String, RawEvent)>,
    ) -> (Vec<RawEvent>, bool) {
        let Some(held) = self.manifests.get(cluster).cloned() else {
            return (Vec::new(), false);
        };
        // A manifest that does not follow the one believed: something was
        // missed (or etcd was replaced). Only a listing can tell.
        if held.manifest.prev != before.unwrap_or(0) {
            for (_, event) in batch {
                self.refuse(
                    event.key(),
                    Kind::Export,
                    cluster,
                    Refusal::Forged("awaiting a listing to check it against the manifest".into()),
                );
            }
            return (Vec::new(), true);
        }
        let mut out = Vec::new();
        let mut batch: BTreeMap<String, RawEvent> = batch.into_iter().collect();
        for (service, digest) in &held.manifest.changes {
            let Some(event) = batch.remove(service) else {
                continue;
            };
            let ok = match (&event, digest) {
                (RawEvent::Put(kv), Some(d)) => {
                    kv.value.len() <= self.config.budget.max_export_bytes
                        && digest_hex(&value_digest(&kv.value)) == *d
                }
                (RawEvent::Delete { .. }, None) => true,
                _ => false,
            };
            if ok {
                self.refused.remove(event.key());
                out.push(event);
            } else {
                self.refuse(
                    event.key(),
                    Kind::Export,
                    cluster,
                    Refusal::Forged("does not match the cluster's signed manifest".into()),
                );
            }
        }
        for (_, event) in batch {
            out.extend(self.unvouched_export(cluster, event));
        }
        (out, false)
    }

    /// An export event no manifest of its revision lists.
    fn unvouched_export(&mut self, cluster: &str, event: RawEvent) -> Option<RawEvent> {
        // Exports of a deregistered cluster go with it; those of an
        // unsigned federation pass as before.
        if self.removed.contains_key(cluster) && matches!(event, RawEvent::Delete { .. }) {
            return Some(event);
        }
        if self.trust_unsigned_cluster(cluster) && !self.manifests.contains_key(cluster) {
            return Some(event);
        }
        let what = match event {
            RawEvent::Put(_) => "written",
            RawEvent::Delete { .. } => "deleted",
        };
        self.refuse(
            event.key(),
            Kind::Export,
            cluster,
            Refusal::Forged(format!("{what} without a signed manifest listing it")),
        );
        None
    }

    fn judge_policy(&mut self, name: &str, kv: RawKv) -> Option<RawEvent> {
        let opened = self
            .open_anchored_or_unsigned::<serde_json::Value>(&kv)
            .and_then(|o| {
                let held = self.policies.get(name).and_then(|p| p.seq);
                check_seq(held.or(self.removed_policies.get(name).copied()), o.seq)?;
                Ok(o)
            });
        let o = match opened {
            Ok(o) => o,
            Err(r) => {
                self.refuse(&kv.key, Kind::Policy, "", r);
                return None;
            }
        };
        self.refused.remove(&kv.key);
        self.signed.insert(kv.key.clone(), kv.value.clone());
        let seq = (o.signer != "unsigned").then_some(o.seq);
        match o.value {
            None => {
                self.policies.remove(name);
                self.removed_policies.insert(name.to_owned(), o.seq);
                Some(RawEvent::Delete {
                    key: kv.key,
                    mod_revision: kv.mod_revision,
                })
            }
            Some(v) => {
                self.removed_policies.remove(name);
                let plain = RawKv {
                    key: kv.key.clone(),
                    value: serde_json::to_vec(&v).unwrap_or_default(),
                    mod_revision: kv.mod_revision,
                };
                self.policies.insert(
                    name.to_owned(),
                    Held {
                        seq,
                        kv: plain.clone(),
                    },
                );
                Some(RawEvent::Put(plain))
            }
        }
    }
}
