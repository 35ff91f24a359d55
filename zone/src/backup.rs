//! `fedmesh zone backup|restore`: the operator's copy of the global zone,
//! and putting back what a lost or rolled-back etcd lacks. Cluster records,
//! bundles and exports come back on their own (their owners write them
//! again, [`crate::dump`] keeps each controller's view); policies and
//! deregistrations come back from the operator's backup.

use std::collections::BTreeMap;
use std::time::SystemTime;

use etcd_client::{Txn, TxnOp};
use fedmesh_api::{ClusterRecord, GlobalKey};

use crate::client::{GlobalZone, RawKv, ZoneError, parse_json};
use crate::dump::{RestorePlan, ZoneDump, plan_restore};
use crate::gate::{Gate, Refused};

/// Operations in one restore transaction, under etcd's default of 128.
const TXN_OPS: usize = 120;

/// What a restore did, and what of the dump it did not believe.
#[derive(Debug)]
pub struct Restored {
    pub plan: RestorePlan,
    /// Values of the dump no reader would believe: not written.
    pub refused: BTreeMap<String, Refused>,
    /// Clusters whose etcd user and role were (re)created.
    pub roles: Vec<String>,
}

impl GlobalZone {
    /// Everything this handle believes of the zone, as signed, and what it
    /// refused (which a backup leaves out).
    pub async fn backup(&mut self) -> Result<(ZoneDump, BTreeMap<String, Refused>), ZoneError> {
        let b = self.believed().await?;
        let dump = ZoneDump::new(self.keys().prefix(), b.signed, b.exports, SystemTime::now());
        Ok((dump, b.refused))
    }

    /// Puts back each record of `dump` that etcd lacks, or holds older or
    /// unbelieved, never one older than etcd's; a cluster's exports come
    /// back with its manifest. Then (re)creates the etcd user and role of
    /// every cluster the dump registers, which an empty etcd lacks. With
    /// `dry_run`, only plans.
    pub async fn restore(&mut self, dump: &ZoneDump, dry_run: bool) -> Result<Restored, ZoneError> {
        let now = SystemTime::now();
        let mut gate = Gate::new(self.keys().clone(), self.trust().clone());
        let admitted = dump.admit(&mut gate, now);
        let refused = gate.refused().clone();
        let mut records = Vec::new();
        for kind in ["anchor/", "clusters/", "seen/", "bundles/", "policies/"] {
            records.extend(self.list(kind).await?);
        }
        let mut etcd_exports: BTreeMap<String, Vec<RawKv>> = BTreeMap::new();
        for kv in self.list("exports/").await? {
            if let Some((c, ..)) = self.keys().parse_export(&kv.key) {
                etcd_exports.entry(c.to_owned()).or_default().push(kv);
            }
        }
        let mut in_etcd = Gate::new(self.keys().clone(), self.trust().clone());
        in_etcd.admit_records(records.clone(), now);
        // The newer of each wins; etcd's signed deletions take what they take.
        gate.admit_records(records, now);
        let plan = plan_restore(&gate, &admitted, &in_etcd.signed_records(), &etcd_exports);
        let mut roles = Vec::new();
        if dry_run {
            return Ok(Restored {
                plan,
                refused,
                roles,
            });
        }
        for chunk in plan.writes.chunks(TXN_OPS) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(key, value)| match value {
                    Some(v) => TxnOp::put(key.as_str(), v.clone(), None),
                    None => TxnOp::delete(key.as_str(), None),
                })
                .collect();
            self.client().txn(Txn::new().and_then(ops)).await?;
        }
        for kv in &admitted.records {
            if let Some(GlobalKey::Cluster(name)) = self.keys().parse(&kv.key) {
                let record: ClusterRecord = parse_json(&kv.key, &kv.value)?;
                self.ensure_cluster_access(&name, &record.trust_domain, None)
                    .await?;
                roles.push(name);
            }
        }
        Ok(Restored {
            plan,
            refused,
            roles,
        })
    }

    /// Turns etcd's auth on with `user` (the operator, in etcd's root
    /// role): what a new etcd needs once the clusters' users exist again.
    /// An existing user keeps its password.
    pub async fn enable_auth(&mut self, user: &str, password: &str) -> Result<(), ZoneError> {
        match self.client().user_add(user, password, None).await {
            Ok(_) => {}
            Err(e) if crate::client::is_exists(&e) => {}
            Err(e) => return Err(e.into()),
        }
        self.client().user_grant_role(user, "root").await?;
        self.client().auth_enable().await?;
        Ok(())
    }
}
