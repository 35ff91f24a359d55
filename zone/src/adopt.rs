//! `fedmesh anchor adopt|rotate`: the operator signs again every cluster
//! record and policy the zone holds. Adopting is the one step that makes a
//! federation created before signing a signed one (run with
//! `--trust-unsigned`), and after it any older copy of a record (an old
//! backup, an etcd snapshot) is a rollback to every reader. Rotating first
//! extends the anchor chain (`fedmesh_seal::chain`: the new key endorsed by
//! the old), then signs everything again with the new key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use fedmesh_api::{ClusterRecord, GlobalKey};
use fedmesh_seal::{
    AnchorChain, AnchorKey, CHAIN_SUBJECT, Signer, Statement, next_seq, root_keyid, seal,
};

use crate::client::{GlobalZone, ZoneError, decode_bundle, parse_json, subject};
use crate::gate::{Gate, GateConfig, Registration, current_anchor};

impl GlobalZone {
    /// Signs again, with this handle's anchor, each cluster record and
    /// policy its trust believes (unsigned ones too, with
    /// `trust_unsigned`: a record then pins its trust domain's current
    /// roots). Each is written only if etcd still holds what was read.
    /// Returns the keys written; a key changed meanwhile is left out.
    pub async fn adopt(&mut self) -> Result<Vec<String>, ZoneError> {
        let reading = self.trust().clone();
        self.resign(reading).await
    }

    /// Rotates the federation anchor to `next`: the anchor chain, this
    /// handle's anchor endorsing `next`, signed by `next`; then every
    /// record and policy this handle believes, signed again by `next`,
    /// which this handle signs with from then on. Readers pinned to any
    /// earlier key follow the chain. Returns the records signed again.
    pub async fn rotate_anchor(&mut self, next: Arc<AnchorKey>) -> Result<Vec<String>, ZoneError> {
        let reading = self.trust().clone();
        let current = self.anchor_key()?;
        let key = self.keys().anchor_chain();
        let stored = self.get_one(&key).await?;
        let (chain, held, rev) = match &stored {
            // Rotated to `next` already (a rotation cut short): sign the
            // records, which may not all be.
            Some((raw, _))
                if current_anchor(&[next.public()], raw).is_ok_and(|(_, k)| k == next.public()) =>
            {
                self.replace_anchor(next);
                return self.resign(reading).await;
            }
            Some((raw, rev)) => {
                let (seq, _) = current_anchor(&reading.anchors, raw).map_err(|refusal| {
                    ZoneError::Untrusted {
                        key: key.clone(),
                        refusal,
                    }
                })?;
                let chain = fedmesh_seal::peek::<AnchorChain>(raw)
                    .ok()
                    .and_then(|s| s.value)
                    .unwrap_or_else(|| AnchorChain::starting_at(&current.public()));
                (chain, Some(seq), *rev)
            }
            None => (AnchorChain::starting_at(&current.public()), None, 0),
        };
        let chain =
            chain
                .rotated(&current, &next.public())
                .map_err(|refusal| ZoneError::Untrusted {
                    key: key.clone(),
                    refusal,
                })?;
        let statement = Statement {
            subject: CHAIN_SUBJECT.to_owned(),
            seq: next_seq(SystemTime::now(), held),
            value: Some(chain),
            x5c: vec![],
            endorsements: vec![],
        };
        let sealed = seal(statement, Signer::Anchor(&next))?.to_json();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.as_str(), sealed, None)]);
        if !self.client().txn(txn).await?.succeeded() {
            return Err(ZoneError::Raced("rotating the anchor"));
        }
        self.replace_anchor(next);
        self.resign(reading).await
    }

    /// Signs again, with this handle's anchor, what `reading` believes.
    async fn resign(&mut self, reading: GateConfig) -> Result<Vec<String>, ZoneError> {
        // Nothing is read without the key to sign with.
        self.anchor()?;
        let mut raw = Vec::new();
        for kind in ["clusters/", "bundles/", "policies/"] {
            raw.extend(self.list(kind).await?);
        }
        let revisions: BTreeMap<String, i64> = raw
            .iter()
            .map(|kv| (kv.key.clone(), kv.mod_revision))
            .collect();
        let mut gate = Gate::new(self.keys().clone(), reading);
        gate.admit_records(raw, SystemTime::now());
        let believed = gate.signed_records();
        // Roots of each trust domain's believed bundle, for records read
        // unsigned.
        let mut roots: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for kv in &believed {
            if let Some(GlobalKey::Bundle(td)) = self.keys().parse(&kv.key) {
                let doc = match fedmesh_seal::peek::<serde_json::Value>(&kv.value) {
                    Ok(s) => s.value.map(|v| v.to_string().into_bytes()),
                    Err(_) => Some(kv.value.clone()),
                };
                if let Some(b) = doc.and_then(|d| decode_bundle(&td, &kv.key, &d).ok()) {
                    roots.insert(td, b.roots().iter().filter_map(root_keyid).collect());
                }
            }
        }
        let mut written = Vec::new();
        for kv in believed {
            let kind = self.keys().parse(&kv.key);
            let (seq, value) = match fedmesh_seal::peek::<serde_json::Value>(&kv.value) {
                // A signed deletion stays as it is.
                Ok(s) if s.value.is_none() => continue,
                Ok(s) => (Some(s.seq), s.value.unwrap_or_default()),
                Err(_) => match &kind {
                    Some(GlobalKey::Cluster(_)) => {
                        let record: ClusterRecord = parse_json(&kv.key, &kv.value)?;
                        let reg = Registration {
                            roots: roots.get(&record.trust_domain).cloned().unwrap_or_default(),
                            record,
                        };
                        (None, serde_json::to_value(reg).unwrap_or_default())
                    }
                    _ => (None, parse_json(&kv.key, &kv.value)?),
                },
            };
            if !matches!(kind, Some(GlobalKey::Cluster(_) | GlobalKey::Policy(_))) {
                continue;
            }
            let statement = Statement {
                subject: subject(self.keys(), &kv.key),
                seq: next_seq(SystemTime::now(), seq),
                value: Some(value),
                x5c: vec![],
                endorsements: vec![],
            };
            let sealed = seal(statement, Signer::Anchor(self.anchor()?))?.to_json();
            let rev = revisions.get(&kv.key).copied().unwrap_or(0);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    kv.key.as_str(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then([TxnOp::put(kv.key.as_str(), sealed, None)]);
            if self.client().txn(txn).await?.succeeded() {
                written.push(kv.key);
            }
        }
        Ok(written)
    }
}
