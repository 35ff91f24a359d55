//! `fedmesh anchor adopt`: the operator signs again every cluster record and
//! policy the zone holds. It is the one step that makes a federation
//! created before signing a signed one (run with `--trust-unsigned`), and
//! after it any older copy of a record (an old backup, an etcd snapshot) is
//! a rollback to every reader.

use std::collections::BTreeMap;
use std::time::SystemTime;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use fedmesh_api::{ClusterRecord, GlobalKey};
use fedmesh_seal::{Signer, Statement, next_seq, root_keyid, seal};

use crate::client::{GlobalZone, ZoneError, decode_bundle, parse_json, subject};
use crate::gate::{Gate, Registration};

impl GlobalZone {
    /// Signs again, with this handle's anchor, each cluster record and
    /// policy its trust believes (unsigned ones too, with
    /// `trust_unsigned`: a record then pins its trust domain's current
    /// roots). Each is written only if etcd still holds what was read.
    /// Returns the keys written; a key changed meanwhile is left out.
    pub async fn adopt(&mut self) -> Result<Vec<String>, ZoneError> {
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
        let mut gate = Gate::new(self.keys().clone(), self.trust().clone());
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
