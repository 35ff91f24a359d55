//! Global traffic policies in etcd (`policies/<name>`): read them all at one
//! revision, write a set of changes in one transaction that fails if any
//! policy changed since that read, and read a policy's history back from
//! etcd's own revisions.
//!
//! History lives in etcd's MVCC store, so it lasts until etcd compacts: a
//! history read after a compaction starts at the compaction revision and
//! says so, and `rollback --to` a compacted revision is refused.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use fedmesh_api::policy::GlobalTrafficPolicy;

use std::time::SystemTime;

use fedmesh_seal::{AnchorPublic, Refusal, Signer, Statement, next_seq, open_anchored, seal};

use crate::client::{GlobalZone, ZoneError, prefix_end, subject};

/// One stored policy: its value (or why it cannot be read) and revision.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPolicy {
    pub policy: Result<GlobalTrafficPolicy, String>,
    pub mod_revision: i64,
    /// The sequence it was signed with (None: unsigned or unreadable).
    pub seq: Option<u64>,
    /// `ok`, or why the value is not believed (`FORGED`, `UNSIGNED`,
    /// `INVALID`, …): `fedmesh get policies`' TRUST column.
    pub trust: &'static str,
}

/// Every stored policy, by name, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredPolicies {
    pub revision: i64,
    pub policies: BTreeMap<String, StoredPolicy>,
    /// Policies deleted by a signed deletion: (mod_revision, sequence).
    pub deleted: BTreeMap<String, (i64, u64)>,
}

/// A change `write_policies` makes.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyChange {
    Put(Box<GlobalTrafficPolicy>),
    Delete(String),
}

impl PolicyChange {
    pub fn name(&self) -> &str {
        match self {
            PolicyChange::Put(p) => &p.metadata.name,
            PolicyChange::Delete(n) => n,
        }
    }
}

/// One revision of a policy.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub revision: i64,
    /// `None`: deleted at this revision.
    pub policy: Option<Result<GlobalTrafficPolicy, String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyHistory {
    pub entries: Vec<HistoryEntry>,
    /// Set when etcd has compacted revisions before this one: older
    /// history is gone.
    pub compacted_before: Option<i64>,
}

/// The most documents one apply writes: etcd's default `--max-txn-ops` is
/// 128, and the transaction also compares.
pub const MAX_CHANGES: usize = 100;

/// What a stored policy value says: a policy, a signed deletion (`None`),
/// or why it is not believed; the sequence it was signed with; and its
/// trust label.
type Decoded = (
    Option<Result<GlobalTrafficPolicy, String>>,
    Option<u64>,
    &'static str,
);

fn check(key: &str, p: GlobalTrafficPolicy) -> Result<GlobalTrafficPolicy, String> {
    p.validate().map_err(|e| format!("{key}: {e}"))?;
    Ok(p)
}

fn denied(e: &etcd_client::Error) -> bool {
    let s = e.to_string();
    s.contains("permission denied") || s.contains("user name is empty")
}

impl GlobalZone {
    /// Reads a stored policy with this handle's trust: signed by one of
    /// `anchors`, or (only when trusting unsigned values) plain.
    fn decode(&self, key: &str, raw: &[u8], anchors: &[AnchorPublic]) -> Decoded {
        let trust = self.trust();
        let label = |p: &Option<Result<GlobalTrafficPolicy, String>>| match p {
            Some(Err(_)) => "INVALID",
            _ => "ok",
        };
        match open_anchored::<GlobalTrafficPolicy>(raw, &subject(self.keys(), key), anchors) {
            Ok(o) => {
                let p = o.value.map(|p| check(key, p));
                let trust = label(&p);
                (p, Some(o.seq), trust)
            }
            Err(Refusal::Unsigned(_)) if trust.trust_unsigned => {
                let p = Some(
                    serde_json::from_slice(raw)
                        .map_err(|e| format!("{key}: not a policy: {e}"))
                        .and_then(|p| check(key, p)),
                );
                let trust = label(&p);
                (p, None, trust)
            }
            Err(r) => (Some(Err(format!("{key}: {r}"))), None, r.label()),
        }
    }

    /// Every policy, at one revision.
    pub async fn policies(&mut self) -> Result<StoredPolicies, ZoneError> {
        let prefix = self.keys().policy("");
        let resp = self
            .client()
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let anchors = self.anchor_chain().await?.current;
        let mut policies = BTreeMap::new();
        let mut deleted = BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let name = key[prefix.len()..].to_owned();
            match self.decode(&key, kv.value(), &anchors) {
                (None, seq, _) => {
                    deleted.insert(name, (kv.mod_revision(), seq.unwrap_or(0)));
                }
                (Some(policy), seq, trust) => {
                    policies.insert(
                        name,
                        StoredPolicy {
                            policy,
                            mod_revision: kv.mod_revision(),
                            seq,
                            trust,
                        },
                    );
                }
            }
        }
        Ok(StoredPolicies {
            revision,
            policies,
            deleted,
        })
    }

    /// Writes `changes` in one transaction, which applies only if no policy
    /// was added, changed or (among those changed here) deleted since
    /// `read`. Returns the revision of the write.
    pub async fn write_policies(
        &mut self,
        read: &StoredPolicies,
        changes: &[PolicyChange],
    ) -> Result<i64, ZoneError> {
        if changes.len() > MAX_CHANGES {
            return Err(ZoneError::Corrupt {
                key: self.keys().policy(""),
                reason: format!(
                    "{} changes in one apply; at most {MAX_CHANGES} fit in one etcd transaction",
                    changes.len()
                ),
            });
        }
        let prefix = self.keys().policy("");
        // Nothing under policies/ changed after the read...
        let mut when = vec![
            Compare::mod_revision(prefix.as_str(), CompareOp::Less, read.revision + 1)
                .with_range(prefix_end(prefix.as_bytes())),
        ];
        let anchor = self.anchor()?;
        let mut ops = Vec::with_capacity(changes.len());
        for c in changes {
            let key = self.keys().policy(c.name());
            // ...and each key written is as read (this catches a deletion).
            let (seen, after) = match (read.policies.get(c.name()), read.deleted.get(c.name())) {
                (Some(p), _) => (p.mod_revision, p.seq),
                (None, Some((rev, seq))) => (*rev, Some(*seq)),
                (None, None) => (0, None),
            };
            when.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, seen));
            // A deletion is signed too: readers obey no other.
            let statement = Statement {
                subject: subject(self.keys(), &key),
                seq: next_seq(SystemTime::now(), after),
                value: match c {
                    PolicyChange::Put(p) => Some(p.as_ref().clone()),
                    PolicyChange::Delete(_) => None,
                },
                x5c: vec![],
                endorsements: vec![],
            };
            let value = seal(statement, Signer::Anchor(anchor))?.to_json();
            ops.push(TxnOp::put(key.as_str(), value, None));
        }
        let txn = Txn::new().when(when).and_then(ops);
        match self.client().txn(txn).await {
            Ok(r) if r.succeeded() => Ok(r.header().map_or(0, |h| h.revision())),
            Ok(_) => Err(ZoneError::Raced(
                "applying: another change to the policies landed after they were read",
            )),
            Err(e) if denied(&e) => Err(ZoneError::Denied(format!(
                "etcd refused to write {prefix}*: {e}. Policies are an operator's write: \
                 a cluster's own etcd user (fedmesh-cluster-*) may not write them; \
                 use an operator's credentials (--etcd-user/--etcd-password, e.g. root)"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The policy `name` as it was at `revision`; `None` if it did not
    /// exist then.
    pub async fn policy_at(
        &mut self,
        name: &str,
        revision: i64,
    ) -> Result<Option<Result<GlobalTrafficPolicy, String>>, ZoneError> {
        let key = self.keys().policy(name);
        // A revision from before a rotation was signed by a key since
        // retired; it was genuine then.
        let anchors = self.anchor_chain().await?.followed;
        let resp = self
            .client()
            .get(
                key.as_str(),
                Some(GetOptions::new().with_revision(revision)),
            )
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| self.decode(&key, kv.value(), &anchors).0))
    }

    /// Every revision of `name` etcd still holds, oldest first: puts and
    /// deletions, replayed by a watch from revision 1 (or from the
    /// compaction). The replay is complete once it reaches the key's
    /// current revision or, for a key deleted now, ends on that deletion
    /// (etcd 3.4 answers progress requests before an unsynced watch has
    /// replayed, so those alone prove nothing).
    pub async fn policy_history(&mut self, name: &str) -> Result<PolicyHistory, ZoneError> {
        let key = self.keys().policy(name);
        let anchors = self.anchor_chain().await?.followed;
        let current = self
            .client()
            .get(key.as_str(), None)
            .await?
            .kvs()
            .first()
            .map(|kv| kv.mod_revision());
        let mut from = 1;
        let mut compacted_before = None;
        loop {
            let mut stream = self
                .client()
                .watch(
                    key.as_str(),
                    Some(WatchOptions::new().with_start_revision(from)),
                )
                .await?;
            let mut entries: Vec<HistoryEntry> = Vec::new();
            let mut restart = None;
            // A key that never existed replays nothing: give the watch a
            // moment to sync, then say so.
            let quiet = Duration::from_secs(2);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let complete = match (current, entries.last()) {
                    (Some(rev), Some(last)) => last.revision >= rev,
                    (None, Some(last)) => last.policy.is_none(),
                    (_, None) => false,
                };
                if complete {
                    break;
                }
                let wait = if entries.is_empty() && current.is_none() {
                    quiet
                } else {
                    deadline.saturating_duration_since(tokio::time::Instant::now())
                };
                let resp = match tokio::time::timeout(wait, stream.message()).await {
                    Err(_) if current.is_none() && entries.is_empty() => break,
                    Err(_) => {
                        return Err(ZoneError::Raced(
                            "reading the history (etcd did not answer)",
                        ));
                    }
                    Ok(msg) => {
                        msg?.ok_or(ZoneError::Raced("reading the history (the watch ended)"))?
                    }
                };
                if resp.compact_revision() > 0 {
                    restart = Some(resp.compact_revision());
                    break;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    entries.push(HistoryEntry {
                        revision: kv.mod_revision(),
                        policy: match ev.event_type() {
                            EventType::Put => self.decode(&key, kv.value(), &anchors).0,
                            EventType::Delete => None,
                        },
                    });
                }
            }
            match restart {
                Some(r) => {
                    compacted_before = Some(r);
                    from = r;
                }
                None => {
                    return Ok(PolicyHistory {
                        entries,
                        compacted_before,
                    });
                }
            }
        }
    }
}
