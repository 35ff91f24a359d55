//! The global zone on etcd: registration, deregistration, per-cluster etcd
//! roles, and typed reads. Every multi-key change is one etcd transaction
//! guarded by revisions, so nothing is ever half-applied.

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, Permission, Txn, TxnOp, UserAddOptions,
};
use fedmesh_api::records::RecordError;
use fedmesh_api::{ClusterRecord, ExportSummary, GlobalKey, KeySpace, Liveness, SeenRecord};

use std::sync::Arc;
use std::time::SystemTime;

use fedmesh_seal::{
    AnchorKey, Refusal, Signer, Statement, next_seq, open_anchored, root_keyid, seal,
};
use fedmesh_trust::{Bundle, BundleError, ClusterCa, TrustDomain};

use crate::gate::{Gate, GateConfig, Refused, Registration};

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

impl RawEvent {
    pub fn key(&self) -> &str {
        match self {
            RawEvent::Put(kv) => &kv.key,
            RawEvent::Delete { key, .. } => key,
        }
    }

    /// The revision the event happened at.
    pub fn revision(&self) -> i64 {
        match self {
            RawEvent::Put(kv) => kv.mod_revision,
            RawEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    /// etcd is unreachable, timed out, or refused the request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("invalid cluster record: {0}")]
    Invalid(#[from] RecordError),
    /// A stored bundle is unreadable; the error names its key.
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("{key}: stored value is not valid: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "cluster {name:?} is already registered with trust domain {existing:?}; refusing to register it with {requested:?} (deregister it first)"
    )]
    NameTaken {
        name: String,
        existing: String,
        requested: String,
    },
    #[error(
        "trust domain {trust_domain:?} already belongs to {owner}; choose another --trust-domain"
    )]
    TrustDomainTaken { trust_domain: String, owner: String },
    #[error(
        "cluster {name:?} is registered with a different CA; pass its CA with --ca-cert/--ca-key, or reuse its join directory"
    )]
    ForeignCa { name: String },
    #[error("cluster {0:?} is not registered")]
    NotRegistered(String),
    #[error("the global zone changed while {0}; nothing was written, retry")]
    Raced(&'static str),
    /// etcd refused a write for lack of rights.
    #[error("{0}")]
    Denied(String),
    #[error("signing: {0}")]
    Seal(#[from] fedmesh_seal::SealError),
    #[error(
        "this write must be signed by the federation anchor, and none was given (fedmesh anchor init, then --anchor-dir)"
    )]
    NoAnchor,
    #[error("{key}: refusing to build on a value that does not verify: {refusal}")]
    Untrusted { key: String, refusal: Refusal },
}

impl ZoneError {
    /// Whether running the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ZoneError::Etcd(_) | ZoneError::Raced(_))
    }
}

/// What `register` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created,
    /// Same name, trust domain and CA; other fields (gateways, zones) changed.
    Updated,
    /// Everything was already so; nothing was written.
    Unchanged,
}

/// The name of a cluster's etcd user and role.
pub fn cluster_role(cluster: &str) -> String {
    format!("fedmesh-cluster-{cluster}")
}

/// Where a handle's pinned anchors lead through the anchor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowedAnchors {
    /// What values count from now: the chain's newest key.
    pub current: Vec<fedmesh_seal::AnchorPublic>,
    /// Every key from the pinned one to the newest: what signed genuine
    /// values in the past (a policy's history).
    pub followed: Vec<fedmesh_seal::AnchorPublic>,
}

/// The ranges (under the prefix) a reader lists besides the exports, in
/// the order a gate judges them: what vouches for a key comes first. `seen/`
/// too: a stale cluster's age comes from it.
pub const RECORD_KINDS: [&str; 6] = [
    "anchor/",
    "clusters/",
    "alive/",
    "seen/",
    "bundles/",
    "policies/",
];

/// A handle on the global zone.
#[derive(Clone)]
pub struct GlobalZone {
    client: Client,
    keys: KeySpace,
    /// Signs cluster records and policies: the operator's.
    anchor: Option<Arc<AnchorKey>>,
    /// What reads believe (see [`crate::gate`]).
    trust: GateConfig,
}

impl std::fmt::Debug for GlobalZone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalZone")
            .field("prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl GlobalZone {
    /// A handle that believes nothing signed until given the anchor
    /// ([`Self::with_anchor`], [`Self::trusting`]).
    pub fn new(client: Client, keys: KeySpace) -> Self {
        Self {
            client,
            keys,
            anchor: None,
            trust: GateConfig {
                anchors: Vec::new(),
                trust_unsigned: false,
                budget: Default::default(),
            },
        }
    }

    /// Signs with `anchor`, and believes what it signed.
    pub fn with_anchor(mut self, anchor: Arc<AnchorKey>) -> Self {
        self.trust.anchors = vec![anchor.public()];
        self.anchor = Some(anchor);
        self
    }

    /// Signs with `next` from now on, and believes it alone (an anchor
    /// rotation).
    pub(crate) fn replace_anchor(&mut self, next: Arc<AnchorKey>) {
        self.trust.anchors = vec![next.public()];
        self.anchor = Some(next);
    }

    /// Where this handle's anchors lead through the anchor chain in etcd
    /// (`fedmesh_seal::chain`): a chain that does not verify from them is
    /// ignored, as a reader's gate ignores it.
    pub async fn anchor_chain(&mut self) -> Result<FollowedAnchors, ZoneError> {
        let pinned = self.trust.anchors.clone();
        let key = self.keys.anchor_chain();
        let followed = match self.get_one(&key).await? {
            Some((raw, _)) => crate::gate::current_anchor(&pinned, &raw)
                .ok()
                .and_then(|_| {
                    let chain = fedmesh_seal::peek::<fedmesh_seal::AnchorChain>(&raw)
                        .ok()?
                        .value?;
                    let keys = chain.keys().ok()?;
                    let from = keys.iter().rposition(|k| pinned.contains(k))?;
                    Some(keys[from..].to_vec())
                }),
            None => None,
        };
        Ok(match followed {
            Some(keys) => FollowedAnchors {
                current: keys.last().cloned().into_iter().collect(),
                followed: keys,
            },
            None => FollowedAnchors {
                current: pinned.clone(),
                followed: pinned,
            },
        })
    }

    /// Reads believe what `trust` says (the anchor given before is kept).
    pub fn trusting(mut self, trust: GateConfig) -> Self {
        self.trust = trust;
        self
    }

    pub fn trust(&self) -> &GateConfig {
        &self.trust
    }

    pub(crate) fn anchor(&self) -> Result<&AnchorKey, ZoneError> {
        self.anchor.as_deref().ok_or(ZoneError::NoAnchor)
    }

    pub(crate) fn anchor_key(&self) -> Result<Arc<AnchorKey>, ZoneError> {
        self.anchor.clone().ok_or(ZoneError::NoAnchor)
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    pub(crate) fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The value stored at `key`, as stored (an envelope, say).
    pub async fn stored(&mut self, key: &str) -> Result<Option<Vec<u8>>, ZoneError> {
        Ok(self.get_one(key).await?.map(|(v, _)| v))
    }

    pub(crate) async fn get_one(&mut self, key: &str) -> Result<Option<(Vec<u8>, i64)>, ZoneError> {
        let resp = self.client.get(key, None).await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Registers `record` with `bundle` (its CA's roots) in one transaction.
    ///
    /// Idempotent: the same values again change nothing. Conflicts (the name
    /// taken with another trust domain, the trust domain owned by another
    /// cluster, another CA for this cluster) are refused, and nothing is written.
    pub async fn register(
        &mut self,
        record: &ClusterRecord,
        ca: &ClusterCa,
    ) -> Result<RegisterOutcome, ZoneError> {
        self.registration(record, ca, true).await
    }

    /// What [`Self::register`] would do, or the conflict it would refuse
    /// with, writing nothing: checked before the CA is saved, so that a
    /// refused registration never replaces a join directory.
    pub async fn check_registration(
        &mut self,
        record: &ClusterRecord,
        ca: &ClusterCa,
    ) -> Result<RegisterOutcome, ZoneError> {
        self.registration(record, ca, false).await
    }

    async fn registration(
        &mut self,
        record: &ClusterRecord,
        ca: &ClusterCa,
        commit: bool,
    ) -> Result<RegisterOutcome, ZoneError> {
        record.validate()?;
        let anchor = self.anchor()?.public();
        let bundle = Bundle::with_roots(ca.trust_domain().clone(), [ca.cert_der().clone()]);
        let ck = self.keys.cluster(&record.name);
        let bk = self.keys.bundle(&record.trust_domain);
        let stored = match self.get_one(&ck).await? {
            Some((raw, rev)) => Some((stored_record(&self.keys, &ck, &raw, &anchor)?, rev)),
            None => None,
        };
        let stored_bundle = match self.get_one(&bk).await? {
            Some((raw, rev)) => Some((stored_bundle(&record.trust_domain, &bk, &raw)?, rev)),
            None => None,
        };
        let record_seq = stored.as_ref().and_then(|(s, _)| s.seq);
        let current = stored
            .as_ref()
            .and_then(|(s, rev)| s.record.clone().map(|r| (r, *rev)));

        let Some((current, rev)) = current else {
            if stored_bundle.is_some() {
                let owner = self
                    .clusters()
                    .await?
                    .into_iter()
                    .find(|c| c.trust_domain == record.trust_domain)
                    .map_or_else(
                        || "a stale bundle with no cluster (delete it, or choose another trust domain)".to_string(),
                        |c| format!("cluster {:?}", c.name),
                    );
                return Err(ZoneError::TrustDomainTaken {
                    trust_domain: record.trust_domain.clone(),
                    owner,
                });
            }
            if !commit {
                return Ok(RegisterOutcome::Created);
            }
            // Absent, or a signed deletion (deregistered): compared by
            // revision either way.
            let ck_rev = stored.as_ref().map_or(0, |(_, rev)| *rev);
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(ck.as_str(), CompareOp::Equal, ck_rev),
                    Compare::create_revision(bk.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(
                        ck.as_str(),
                        self.signed_record(record, ca, record_seq)?,
                        None,
                    ),
                    TxnOp::put(
                        bk.as_str(),
                        signed_bundle(&self.keys, &bundle, ca, None, vec![])?.0,
                        None,
                    ),
                ]);
            return if self.client.txn(txn).await?.succeeded() {
                Ok(RegisterOutcome::Created)
            } else {
                Err(ZoneError::Raced("registering"))
            };
        };

        if current.trust_domain != record.trust_domain {
            return Err(ZoneError::NameTaken {
                name: record.name.clone(),
                existing: current.trust_domain,
                requested: record.trust_domain.clone(),
            });
        }
        let ours_is_published = stored_bundle
            .as_ref()
            .is_some_and(|(b, _)| bundle.roots().iter().all(|r| b.bundle.roots().contains(r)));
        if !ours_is_published {
            return Err(ZoneError::ForeignCa {
                name: record.name.clone(),
            });
        }
        // A zone written before signing is signed now (adopted).
        let record_signed = record_seq.is_some();
        let bundle_signed = stored_bundle.as_ref().is_some_and(|(b, _)| b.seq.is_some());
        if current.same_registration(record) && record_signed && bundle_signed {
            return Ok(RegisterOutcome::Unchanged);
        }
        if !commit {
            return Ok(RegisterOutcome::Updated);
        }
        // Keep the original registration time; update the rest.
        let updated = ClusterRecord {
            registered_at: current.registered_at,
            ..record.clone()
        };
        let mut when = vec![Compare::mod_revision(ck.as_str(), CompareOp::Equal, rev)];
        let mut ops = vec![TxnOp::put(
            ck.as_str(),
            self.signed_record(&updated, ca, record_seq)?,
            None,
        )];
        if let Some((b, brev)) = stored_bundle.as_ref().filter(|(b, _)| b.seq.is_none()) {
            when.push(Compare::mod_revision(bk.as_str(), CompareOp::Equal, *brev));
            ops.push(TxnOp::put(
                bk.as_str(),
                signed_bundle(&self.keys, &b.bundle, ca, None, vec![])?.0,
                None,
            ));
        }
        let txn = Txn::new().when(when).and_then(ops);
        if self.client.txn(txn).await?.succeeded() {
            Ok(RegisterOutcome::Updated)
        } else {
            Err(ZoneError::Raced("updating the registration"))
        }
    }

    /// `record`, pinning `ca`'s root, signed by the anchor after `after`.
    fn signed_record(
        &self,
        record: &ClusterRecord,
        ca: &ClusterCa,
        after: Option<u64>,
    ) -> Result<String, ZoneError> {
        let reg = Registration {
            record: record.clone(),
            roots: root_keyid(ca.cert_der()).into_iter().collect(),
        };
        let statement = Statement {
            subject: subject(&self.keys, &self.keys.cluster(&record.name)),
            seq: next_seq(SystemTime::now(), after),
            value: Some(reg),
            x5c: vec![],
            endorsements: vec![],
        };
        Ok(seal(statement, Signer::Anchor(self.anchor()?))?.to_json())
    }

    /// Deregisters a cluster in one transaction: its record becomes a
    /// signed deletion (readers obey no other), and its bundle, liveness
    /// keys and exports are removed. Returns the removed record.
    pub async fn deregister(&mut self, name: &str) -> Result<ClusterRecord, ZoneError> {
        let anchor = self.anchor()?.public();
        let ck = self.keys.cluster(name);
        let (raw, rev) = self
            .get_one(&ck)
            .await?
            .ok_or_else(|| ZoneError::NotRegistered(name.into()))?;
        let stored = stored_record(&self.keys, &ck, &raw, &anchor)?;
        let record = stored
            .record
            .ok_or_else(|| ZoneError::NotRegistered(name.into()))?;
        let tombstone = Statement::<Registration> {
            subject: subject(&self.keys, &ck),
            seq: next_seq(SystemTime::now(), stored.seq),
            value: None,
            x5c: vec![],
            endorsements: vec![],
        };
        let tombstone = seal(tombstone, Signer::Anchor(self.anchor()?))?.to_json();
        let txn = Txn::new()
            .when([Compare::mod_revision(ck.as_str(), CompareOp::Equal, rev)])
            .and_then([
                TxnOp::put(ck.as_str(), tombstone, None),
                TxnOp::delete(self.keys.bundle(&record.trust_domain), None),
                TxnOp::delete(self.keys.alive(name), None),
                TxnOp::delete(self.keys.seen(name), None),
                TxnOp::delete(
                    self.keys.exports_of(name),
                    Some(DeleteOptions::new().with_prefix()),
                ),
            ]);
        if self.client.txn(txn).await?.succeeded() {
            Ok(record)
        } else {
            Err(ZoneError::Raced("deregistering"))
        }
    }

    /// Creates (or refreshes) the etcd user and role of a cluster. The role may
    /// read the whole global zone and write only `alive/<c>`, `seen/<c>`,
    /// `exports/<c>/`, `bundles/<its trust domain>` and `clusters/<c>` (its
    /// record is the anchor's to sign: the cluster can only put back what
    /// the operator signed, as its controller does when the zone loses it).
    /// Without a password, the cluster proves who it is with its client
    /// certificate.
    pub async fn ensure_cluster_access(
        &mut self,
        cluster: &str,
        trust_domain: &str,
        password: Option<&str>,
    ) -> Result<(), ZoneError> {
        let role = cluster_role(cluster);
        ignore_exists(self.client.role_add(role.as_str()).await)?;
        let grants = [
            Permission::read(self.keys.prefix()).with_prefix(),
            Permission::read_write(self.keys.alive(cluster)),
            Permission::read_write(self.keys.seen(cluster)),
            Permission::read_write(self.keys.exports_of(cluster)).with_prefix(),
            Permission::read_write(self.keys.bundle(trust_domain)),
            Permission::read_write(self.keys.cluster(cluster)),
        ];
        for perm in grants {
            self.client
                .role_grant_permission(role.as_str(), perm)
                .await?;
        }
        // Without a password the user is reachable only through a client
        // certificate whose CN names it (etcd's --client-cert-auth).
        let (pw, options) = match password {
            Some(p) => (p, None),
            None => ("", Some(UserAddOptions::new().with_no_pwd())),
        };
        match self.client.user_add(role.as_str(), pw, options).await {
            Ok(_) => {}
            Err(e) if is_exists(&e) => {
                if let Some(p) = password {
                    self.client.user_change_password(role.as_str(), p).await?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        self.client
            .user_grant_role(role.as_str(), role.as_str())
            .await?;
        Ok(())
    }

    /// Removes a cluster's etcd user and role, if they exist.
    pub async fn remove_cluster_access(&mut self, cluster: &str) -> Result<(), ZoneError> {
        let role = cluster_role(cluster);
        ignore_missing(self.client.user_delete(role.as_str()).await)?;
        ignore_missing(self.client.role_delete(role.as_str()).await)?;
        Ok(())
    }

    /// Every key under `<prefix><kind>`, paginated.
    pub(crate) async fn list(&mut self, kind: &str) -> Result<Vec<RawKv>, ZoneError> {
        let mut kvs = Vec::new();
        let prefix = format!("{}{kind}", self.keys.prefix());
        list_range(
            &mut self.client,
            &prefix,
            &mut 0,
            &mut Pager::default(),
            &mut kvs,
        )
        .await?;
        Ok(kvs)
    }

    /// The whole zone as this handle's trust believes it: every record and
    /// export passed through a [`Gate`], with what it refused.
    pub async fn believed(&mut self) -> Result<Believed, ZoneError> {
        let mut gate = Gate::new(self.keys.clone(), self.trust.clone());
        let mut records = Vec::new();
        for kind in RECORD_KINDS {
            records.extend(self.list(kind).await?);
        }
        let listed = crate::dump::admit(
            &mut gate,
            records,
            self.list("exports/").await?,
            SystemTime::now(),
        );
        let exports: Vec<RawKv> = listed.exports.into_values().flat_map(|l| l.kvs).collect();
        Ok(Believed {
            keys: self.keys.clone(),
            records: listed.records,
            signed: gate.signed_records(),
            exports,
            refused: gate.refused().clone(),
        })
    }

    /// Every registered cluster, by name.
    pub async fn clusters(&mut self) -> Result<Vec<ClusterRecord>, ZoneError> {
        self.believed().await?.clusters()
    }

    /// The liveness of each of `clusters` as of `now`, from the `alive`
    /// and `seen` keys, in the same order.
    pub async fn liveness(
        &mut self,
        clusters: &[ClusterRecord],
        now: time::OffsetDateTime,
    ) -> Result<Vec<Liveness>, ZoneError> {
        self.believed().await?.liveness(clusters, now)
    }

    /// Every export: (cluster, namespace, service, summary).
    pub async fn exports(
        &mut self,
    ) -> Result<Vec<(String, String, String, ExportSummary)>, ZoneError> {
        self.believed().await?.exports()
    }

    /// Every published bundle.
    pub async fn bundles(&mut self) -> Result<Vec<Bundle>, ZoneError> {
        self.believed().await?.bundles()
    }
}

/// What a handle's trust believes of the zone at one listing (plain values),
/// and what it refused, by key.
#[derive(Debug, Clone)]
pub struct Believed {
    keys: KeySpace,
    pub records: Vec<RawKv>,
    /// The believed records as signed (see [`Gate::signed_records`]).
    pub signed: Vec<RawKv>,
    pub exports: Vec<RawKv>,
    pub refused: std::collections::BTreeMap<String, Refused>,
}

impl Believed {
    fn each<T>(
        &self,
        kvs: &[RawKv],
        mut pick: impl FnMut(GlobalKey, &RawKv) -> Option<Result<T, ZoneError>>,
    ) -> Result<Vec<T>, ZoneError> {
        kvs.iter()
            .filter_map(|kv| pick(self.keys.parse(&kv.key)?, kv))
            .collect()
    }

    pub fn clusters(&self) -> Result<Vec<ClusterRecord>, ZoneError> {
        let mut out = self.each(&self.records, |k, kv| match k {
            GlobalKey::Cluster(_) => Some(parse_json(&kv.key, &kv.value)),
            _ => None,
        })?;
        out.sort_by(|a: &ClusterRecord, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn liveness(
        &self,
        clusters: &[ClusterRecord],
        now: time::OffsetDateTime,
    ) -> Result<Vec<Liveness>, ZoneError> {
        let alive: std::collections::BTreeSet<String> = self
            .each(&self.records, |k, _| match k {
                GlobalKey::Alive(c) => Some(Ok(c)),
                _ => None,
            })?
            .into_iter()
            .collect();
        let seen: std::collections::BTreeMap<String, SeenRecord> = self
            .each(&self.records, |k, kv| match k {
                GlobalKey::Seen(c) => Some(parse_json(&kv.key, &kv.value).map(|s| (c, s))),
                _ => None,
            })?
            .into_iter()
            .collect();
        Ok(clusters
            .iter()
            .map(|c| Liveness::of(alive.contains(&c.name), seen.get(&c.name), now))
            .collect())
    }

    pub fn exports(&self) -> Result<Vec<(String, String, String, ExportSummary)>, ZoneError> {
        self.each(&self.exports, |k, kv| match k {
            GlobalKey::Export {
                cluster,
                namespace,
                service,
            } => Some(parse_json(&kv.key, &kv.value).map(|s| (cluster, namespace, service, s))),
            _ => None,
        })
    }

    pub fn bundles(&self) -> Result<Vec<Bundle>, ZoneError> {
        self.each(&self.records, |k, kv| match k {
            GlobalKey::Bundle(td) => Some(decode_bundle(&td, &kv.key, &kv.value)),
            _ => None,
        })
    }
}

/// A stored `clusters/<c>`: signed by the anchor (verified), or plain as
/// written before signing (`seq` None); `record` None for a signed
/// deletion. A value that is neither is refused: registration never builds
/// on a forged record.
struct StoredRecord {
    record: Option<ClusterRecord>,
    seq: Option<u64>,
}

fn stored_record(
    keys: &KeySpace,
    key: &str,
    raw: &[u8],
    anchor: &fedmesh_seal::AnchorPublic,
) -> Result<StoredRecord, ZoneError> {
    let anchors = std::slice::from_ref(anchor);
    match open_anchored::<Registration>(raw, &subject(keys, key), anchors) {
        Ok(o) => Ok(StoredRecord {
            record: o.value.map(|r| r.record),
            seq: Some(o.seq),
        }),
        Err(Refusal::Unsigned(_)) => Ok(StoredRecord {
            record: Some(parse_json(key, raw)?),
            seq: None,
        }),
        Err(refusal) => Err(ZoneError::Untrusted {
            key: key.into(),
            refusal,
        }),
    }
}

/// A stored bundle for the conflict checks of registration, signed or not
/// (not verified: registration only compares it with the CA it holds).
struct StoredBundle {
    bundle: Bundle,
    seq: Option<u64>,
}

fn stored_bundle(td: &str, key: &str, raw: &[u8]) -> Result<StoredBundle, ZoneError> {
    match fedmesh_seal::peek::<serde_json::Value>(raw) {
        Ok(statement) => {
            let doc = statement.value.ok_or_else(|| ZoneError::Corrupt {
                key: key.into(),
                reason: "a deleted bundle".into(),
            })?;
            Ok(StoredBundle {
                bundle: decode_bundle(td, key, doc.to_string().as_bytes())?,
                seq: Some(statement.seq),
            })
        }
        Err(Refusal::Unsigned(_)) => Ok(StoredBundle {
            bundle: decode_bundle(td, key, raw)?,
            seq: None,
        }),
        Err(refusal) => Err(ZoneError::Corrupt {
            key: key.into(),
            reason: refusal.to_string(),
        }),
    }
}

/// The bundle a stored value holds, signed or not, **without checking the
/// signature**: for tools that watch a publication happen (a drill waiting
/// for a rotation), never for trusting it (that is the gate's).
pub fn unverified_bundle(td: &str, key: &str, raw: &[u8]) -> Result<Bundle, ZoneError> {
    stored_bundle(td, key, raw).map(|b| b.bundle)
}

/// `bundle`, signed by `ca`'s root, after `after`; and its sequence.
/// `bundle`, signed by `ca` after `after`, carrying the `endorsements`
/// that lead from the cluster's first root to `ca`'s.
pub fn signed_bundle(
    keys: &KeySpace,
    bundle: &Bundle,
    ca: &ClusterCa,
    after: Option<u64>,
    endorsements: Vec<fedmesh_seal::Endorsement>,
) -> Result<(String, u64), ZoneError> {
    let key = keys.bundle(bundle.trust_domain().as_str());
    let doc: serde_json::Value =
        serde_json::from_str(&bundle.to_document()).map_err(|e| ZoneError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
    let seq = next_seq(SystemTime::now(), after);
    let statement = Statement {
        subject: subject(keys, &key),
        seq,
        value: Some(doc),
        x5c: vec![],
        endorsements,
    };
    Ok((seal(statement, Signer::Root(ca))?.to_json(), seq))
}

/// A key without the zone's prefix: what a statement names.
pub fn subject(keys: &KeySpace, key: &str) -> String {
    key.strip_prefix(keys.prefix()).unwrap_or(key).to_owned()
}

/// Sizes the pages of listings. Large listings are read in pages so that
/// no response outgrows gRPC's 4 MiB message limit; etcd 3.4 walks the
/// whole remaining range for each page, so pages are as large as is safe.
/// A pager learns the size of keys and values as it goes, and can be
/// carried from one range to the next, so that a range of similar keys is
/// read in one page.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pager {
    bytes: usize,
    keys: usize,
}

impl Pager {
    /// What a page aims at: half the message limit.
    const PAGE_BYTES: usize = 2 << 20;
    /// Assumed per key until one is seen: a first page of 1000 keys.
    const FIRST_GUESS: usize = Self::PAGE_BYTES / 1000;
    const MAX_PAGE: usize = 10_000;

    fn limit(&self) -> i64 {
        let per_key = match self.keys {
            0 => Self::FIRST_GUESS,
            n => (self.bytes / n).max(1),
        };
        (Self::PAGE_BYTES / per_key).clamp(1, Self::MAX_PAGE) as i64
    }
}

/// Appends every key under `prefix`, page by page, at `revision` (set from
/// the first response when 0, so that every page sees the same state).
///
/// etcd 3.4 walks the whole remaining range to answer each limited page, so
/// callers keep ranges small (one cluster's exports, say).
pub async fn list_range(
    client: &mut Client,
    prefix: &str,
    revision: &mut i64,
    pager: &mut Pager,
    kvs: &mut Vec<RawKv>,
) -> Result<(), etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.as_bytes().to_vec();
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(pager.limit());
        if *revision > 0 {
            opts = opts.with_revision(*revision);
        }
        let mut resp = client.get(start.clone(), Some(opts)).await?;
        if *revision == 0 {
            *revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let last = resp.kvs().last().map(|kv| kv.key().to_vec());
        for kv in resp.kvs() {
            pager.bytes += kv.key().len() + kv.value().len();
        }
        pager.keys += resp.kvs().len();
        // Moved, not copied: a cold sync reads a million of them.
        kvs.extend(resp.take_kvs().into_iter().map(|kv| {
            let mod_revision = kv.mod_revision();
            let (key, value) = kv.into_key_value();
            RawKv {
                key: String::from_utf8(key)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                value,
                mod_revision,
            }
        }));
        match last {
            Some(last) if more => {
                start = last;
                start.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The first key after every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

pub fn parse_json<T: serde::de::DeserializeOwned>(key: &str, raw: &[u8]) -> Result<T, ZoneError> {
    serde_json::from_slice(raw).map_err(|e| ZoneError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

/// Decodes the bundle stored at `key` for trust domain `td`. Pure: the
/// watcher's view uses it too.
pub fn decode_bundle(td: &str, key: &str, raw: &[u8]) -> Result<Bundle, ZoneError> {
    let td = TrustDomain::new(td).map_err(|e| ZoneError::Corrupt {
        key: key.into(),
        reason: format!("trust domain {e}"),
    })?;
    Ok(Bundle::from_document(td, raw, key)?)
}

pub(crate) fn is_exists(e: &etcd_client::Error) -> bool {
    e.to_string().contains("already exists")
}

fn ignore_exists<T>(r: Result<T, etcd_client::Error>) -> Result<(), ZoneError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if is_exists(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn ignore_missing<T>(r: Result<T, etcd_client::Error>) -> Result<(), ZoneError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::Pager;

    #[test]
    fn pages_stay_near_two_mebibytes_whatever_the_value_size() {
        let learnt = |bytes, keys| Pager { bytes, keys }.limit();
        assert_eq!(
            Pager::default().limit(),
            1000,
            "a guess until keys are seen"
        );
        // Small summaries: one page for a 10,000-service cluster.
        assert_eq!(learnt(230_000, 1000), 9118);
        assert_eq!(learnt(10, 10), 10_000, "capped");
        // Large values: pages shrink, never to nothing.
        assert_eq!(learnt(4_000_000, 1000), 524);
        assert_eq!(learnt(8 << 20, 1), 1);
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(super::prefix_end(b"/fedmesh/v1/"), b"/fedmesh/v10".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(super::prefix_end(b"\xff"), vec![0]);
    }
}
