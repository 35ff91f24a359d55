//! The gate on real keys: an anchor, two clusters with their own CAs and
//! controllers' SVIDs. Each refusal the gate makes, and each attack of
//! issue 26 made with one cluster's credentials, fed as etcd would deliver
//! it (listings and watch batches), with no etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::time::SystemTime;

use fedmesh_api::{ClusterRecord, KeySpace};
use fedmesh_seal::manifest::digest_hex;
use fedmesh_seal::*;
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, SpiffeId, Svid, SvidPolicy, TrustDomain};
use fedmesh_zone::gate::{Gate, GateConfig, Kind, Registration};
use fedmesh_zone::{RawEvent, RawKv};
use serde_json::json;

struct Cluster {
    name: String,
    td: TrustDomain,
    ca: ClusterCa,
    controller: Svid,
}

struct Fed {
    keys: KeySpace,
    anchor: AnchorKey,
    aws: Cluster,
    azure: Cluster,
    rev: i64,
    /// Manifests' sequences are signing times: these tests sign now.
    base: u64,
}

fn cluster(name: &str) -> Cluster {
    let td = TrustDomain::new(&format!("{name}.test")).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let id = SpiffeId::controller(&td, name).unwrap();
    let controller = ca
        .issue(&id, &SvidPolicy::default(), SystemTime::now())
        .unwrap();
    Cluster {
        name: name.into(),
        td,
        ca,
        controller,
    }
}

fn record(c: &Cluster, gateway: &str) -> ClusterRecord {
    serde_json::from_value(json!({
        "name": c.name, "cloud": c.name, "region": "r1", "zones": ["z1"],
        "trustDomain": c.td.as_str(),
        "gateways": [{"address": gateway, "port": 15443}],
        "registeredAt": "2026-12-07T00:00:00Z"
    }))
    .unwrap()
}

impl Fed {
    fn new() -> Self {
        fedmesh_trust::install_default_provider();
        Self {
            keys: KeySpace::default(),
            anchor: AnchorKey::generate().unwrap(),
            aws: cluster("aws"),
            azure: cluster("azure"),
            rev: 1,
            base: next_seq(SystemTime::now(), None),
        }
    }

    fn gate(&self) -> Gate {
        Gate::new(
            self.keys.clone(),
            GateConfig {
                anchors: vec![self.anchor.public()],
                trust_unsigned: false,
                budget: Default::default(),
            },
        )
    }

    fn kv(&mut self, key: String, value: impl Into<Vec<u8>>) -> RawKv {
        self.rev += 1;
        RawKv {
            key,
            value: value.into(),
            mod_revision: self.rev,
        }
    }

    fn sealed<T: serde::Serialize>(
        &self,
        subject: String,
        seq: u64,
        value: Option<T>,
        signer: Signer<'_>,
    ) -> String {
        seal(
            Statement {
                subject,
                seq,
                value,
                x5c: vec![],
                endorsements: vec![],
            },
            signer,
        )
        .unwrap()
        .to_json()
    }

    fn registration(&mut self, which: &str, seq: u64, gateway: &str) -> RawKv {
        let c = self.cluster(which);
        let reg = Registration {
            record: record(c, gateway),
            roots: vec![root_keyid(c.ca.cert_der()).unwrap()],
        };
        let name = c.name.clone();
        let value = self.sealed(
            format!("clusters/{name}"),
            seq,
            Some(reg),
            Signer::Anchor(&self.anchor),
        );
        self.kv(self.keys.cluster(&name), value)
    }

    fn cluster(&self, which: &str) -> &Cluster {
        if which == "aws" {
            &self.aws
        } else {
            &self.azure
        }
    }

    /// `which`'s bundle document for `td_of`'s trust domain, signed by
    /// `which`'s CA.
    fn bundle(&mut self, which: &str, td_of: &str, seq: u64) -> RawKv {
        let signer = self.cluster(which);
        let td = self.cluster(td_of).td.clone();
        let doc: serde_json::Value = serde_json::from_str(
            &Bundle::with_roots(td.clone(), [signer.ca.cert_der().clone()]).to_document(),
        )
        .unwrap();
        let value = self.sealed(
            format!("bundles/{td}"),
            seq,
            Some(doc),
            Signer::Root(&signer.ca),
        );
        self.kv(self.keys.bundle(td.as_str()), value)
    }

    fn s(&self, k: u64) -> u64 {
        self.base + k
    }

    fn manifest(&mut self, which: &str, signer: &str, seq: u64, m: ExportManifest) -> RawKv {
        let seq = self.s(seq);
        let name = self.cluster(which).name.clone();
        let svid = &self.cluster(signer).controller;
        let value = seal(
            Statement {
                subject: format!("seen/{name}"),
                seq,
                value: Some(m),
                x5c: vec![],
                endorsements: vec![],
            },
            Signer::Svid(svid),
        )
        .unwrap()
        .to_json();
        self.kv(self.keys.seen(&name), value)
    }

    fn export_value(healthy: u32) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "ports": [8080],
            "localities": [{"zone": "z1", "healthy": healthy, "total": 3, "weight": healthy}],
            "generation": healthy,
        }))
        .unwrap()
    }

    /// A registered aws: its record, bundle and an empty manifest, listed.
    fn registered(&mut self, gate: &mut Gate) {
        let now = SystemTime::now();
        let mut kvs = vec![
            self.registration("aws", 1, "127.0.1.1"),
            self.bundle("aws", "aws", 1),
            self.registration("azure", 1, "127.0.2.1"),
            self.bundle("azure", "azure", 1),
        ];
        let empty = ExportSet::default().manifest(0, BTreeMap::new());
        kvs.push(self.manifest("aws", "aws", 10, empty));
        let out = gate.admit_records(kvs, now);
        assert_eq!(out.len(), 5, "{:?}", gate.refused());
        assert!(gate.refused().is_empty());
    }
}

fn puts(events: &[RawEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            RawEvent::Put(kv) => Some(kv.key.as_str()),
            RawEvent::Delete { .. } => None,
        })
        .collect()
}

#[test]
fn a_signed_record_is_handed_on_plain_and_others_are_refused_with_their_reason() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let now = SystemTime::now();

    // The view gets the record itself, not the envelope.
    let out = gate.admit(
        vec![RawEvent::Put(f.registration("aws", 2, "127.0.1.9"))],
        now,
    );
    let RawEvent::Put(kv) = &out.events[0] else {
        panic!("{out:?}")
    };
    let plain: ClusterRecord = serde_json::from_slice(&kv.value).unwrap();
    assert_eq!(plain.gateways[0].address, "127.0.1.9");

    // Signed by azure's CA instead of the anchor: forged.
    let by_azure = f.sealed(
        "clusters/aws".into(),
        3,
        Some(Registration {
            record: record(&f.aws, "127.0.2.66"),
            roots: vec![],
        }),
        Signer::Root(&f.azure.ca),
    );
    let forged = f.kv(f.keys.cluster("aws"), by_azure);
    // Unsigned, as before this change.
    let unsigned = f.kv(
        f.keys.cluster("aws"),
        serde_json::to_vec(&record(&f.aws, "127.0.2.66")).unwrap(),
    );
    // Genuine but older than the one believed.
    let old = f.registration("aws", 1, "127.0.1.1");
    for (kv, label) in [
        (forged, "FORGED"),
        (unsigned, "UNSIGNED"),
        (old, "ROLLBACK"),
    ] {
        let out = gate.admit(vec![RawEvent::Put(kv)], now);
        assert!(out.events.is_empty(), "{label}: {out:?}");
        let r = &gate.refused()[&f.keys.cluster("aws")];
        assert_eq!((r.kind, r.refusal.label()), (Kind::Cluster, label));
        assert_eq!(gate.drain_refusals().len(), 1);
    }

    // A genuine record copied to another cluster's key.
    let copied = RawKv {
        key: f.keys.cluster("azure"),
        ..f.registration("aws", 5, "127.0.1.1")
    };
    assert!(
        gate.admit(vec![RawEvent::Put(copied)], now)
            .events
            .is_empty()
    );
    assert_eq!(
        gate.refused()[&f.keys.cluster("azure")].refusal.label(),
        "FORGED"
    );

    // Believed again: the refusal is cleared.
    let out = gate.admit(
        vec![RawEvent::Put(f.registration("aws", 6, "127.0.1.1"))],
        now,
    );
    assert_eq!(out.events.len(), 1);
    assert!(!gate.refused().contains_key(&f.keys.cluster("aws")));
}

#[test]
fn another_clusters_root_never_signs_a_bundle_and_raw_deletes_change_nothing() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let now = SystemTime::now();

    // azure overwrites aws's bundle with its own root, signed by its CA.
    let attack = f.bundle("azure", "aws", 99);
    let out = gate.admit(vec![RawEvent::Put(attack)], now);
    assert!(out.events.is_empty());
    assert_eq!(
        gate.refused()[&f.keys.bundle("aws.test")].refusal.label(),
        "FORGED"
    );

    // Raw deletes of aws's record and bundle: ignored.
    let rev = f.rev + 1;
    let deletes = [f.keys.cluster("aws"), f.keys.bundle("aws.test")].map(|key| RawEvent::Delete {
        key,
        mod_revision: rev,
    });
    assert!(gate.admit(deletes.to_vec(), now).events.is_empty());
    assert!(gate.clusters().any(|c| c == "aws"));

    // A rotation signed by the current root is believed without the anchor.
    let next = ClusterCa::generate(&f.aws.td, &CaOptions::default(), now).unwrap();
    let doc: serde_json::Value = serde_json::from_str(
        &Bundle::with_roots(
            f.aws.td.clone(),
            [f.aws.ca.cert_der().clone(), next.cert_der().clone()],
        )
        .to_document(),
    )
    .unwrap();
    let value = f.sealed(
        "bundles/aws.test".into(),
        2,
        Some(doc),
        Signer::Root(&f.aws.ca),
    );
    let kv = f.kv(f.keys.bundle("aws.test"), value);
    assert_eq!(gate.admit(vec![RawEvent::Put(kv)], now).events.len(), 1);
    // Then the new root alone, signed by itself: trusted through the held bundle.
    let doc: serde_json::Value = serde_json::from_str(
        &Bundle::with_roots(f.aws.td.clone(), [next.cert_der().clone()]).to_document(),
    )
    .unwrap();
    let value = f.sealed("bundles/aws.test".into(), 3, Some(doc), Signer::Root(&next));
    let kv = f.kv(f.keys.bundle("aws.test"), value);
    assert_eq!(
        gate.admit(vec![RawEvent::Put(kv)], now).events.len(),
        1,
        "{:?}",
        gate.refused()
    );
}

#[test]
fn exports_are_believed_through_the_manifest_only() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let now = SystemTime::now();

    // aws's controller publishes shop/cart with its manifest in one revision.
    let value = Fed::export_value(3);
    let mut set = ExportSet::default();
    set.insert("shop/cart".into(), value_digest(&value));
    let changes = BTreeMap::from([(
        "shop/cart".to_string(),
        Some(digest_hex(&value_digest(&value))),
    )]);
    let m = set.manifest(f.s(10), changes);
    let export = f.kv(f.keys.export("aws", "shop", "cart"), value.clone());
    let mut manifest = f.manifest("aws", "aws", 11, m);
    manifest.mod_revision = export.mod_revision;
    let out = gate.admit(vec![RawEvent::Put(export), RawEvent::Put(manifest)], now);
    assert!(!out.relist);
    assert_eq!(
        puts(&out.events),
        [f.keys.seen("aws"), f.keys.export("aws", "shop", "cart")]
    );

    // azure (its own credentials) rewrites, adds and deletes aws's exports.
    let forged = f.kv(f.keys.export("aws", "shop", "cart"), Fed::export_value(0));
    let added = f.kv(f.keys.export("aws", "shop", "evil"), Fed::export_value(3));
    let rev = f.rev + 1;
    let deleted = RawEvent::Delete {
        key: f.keys.export("aws", "shop", "cart"),
        mod_revision: rev,
    };
    let out = gate.admit(
        vec![RawEvent::Put(forged), RawEvent::Put(added), deleted],
        now,
    );
    assert!(out.events.is_empty(), "{out:?}");
    assert_eq!(gate.refused().len(), 2);
    assert!(
        gate.refused()
            .values()
            .all(|r| r.kind == Kind::Export && r.refusal.label() == "FORGED")
    );

    // Or forges a manifest too, with its own controller's SVID.
    let mut set2 = set.clone();
    set2.insert("shop/cart".into(), value_digest(&Fed::export_value(0)));
    let forged_m = f.manifest("aws", "azure", 12, set2.manifest(f.s(11), BTreeMap::new()));
    assert!(
        gate.admit(vec![RawEvent::Put(forged_m)], now)
            .events
            .is_empty()
    );
    assert_eq!(gate.refused()[&f.keys.seen("aws")].kind, Kind::Manifest);

    // A listing of the tampered etcd: the forged bucket is held, the view
    // keeps its value; the manifest still believed is seq 11.
    let listed = gate.admit_exports(
        "aws",
        vec![f.kv(f.keys.export("aws", "shop", "cart"), Fed::export_value(0))],
    );
    assert!(listed.kvs.is_empty());
    assert_eq!(
        listed.held.iter().copied().collect::<Vec<_>>(),
        [bucket_of("shop/cart")]
    );

    // The genuine state listed: believed whole.
    let listed = gate.admit_exports(
        "aws",
        vec![f.kv(f.keys.export("aws", "shop", "cart"), value)],
    );
    assert_eq!(listed.kvs.len(), 1);
    assert!(listed.held.is_empty());

    // A real withdrawal: the manifest drops it in the same revision.
    let m =
        ExportSet::default().manifest(f.s(11), BTreeMap::from([("shop/cart".to_string(), None)]));
    let manifest = f.manifest("aws", "aws", 13, m);
    let gone = RawEvent::Delete {
        key: f.keys.export("aws", "shop", "cart"),
        mod_revision: manifest.mod_revision,
    };
    let out = gate.admit(vec![gone, RawEvent::Put(manifest)], now);
    assert!(
        out.events.iter().any(|e| matches!(e, RawEvent::Delete { key, .. } if *key == f.keys.export("aws", "shop", "cart"))),
        "{out:?}"
    );
}

/// Two of aws's publishing transactions in one watch response (etcd
/// batches revisions): each manifest follows the one before it.
#[test]
fn manifests_follow_one_another_within_one_response() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let mut set = ExportSet::default();
    let mut batch = Vec::new();
    let mut prev = f.s(10);
    for (i, svc) in ["shop/cart", "shop/web"].into_iter().enumerate() {
        let value = Fed::export_value(i as u32 + 1);
        set.insert(svc.into(), value_digest(&value));
        let changes = BTreeMap::from([(svc.to_string(), Some(digest_hex(&value_digest(&value))))]);
        let (ns, name) = svc.split_once('/').unwrap();
        let export = f.kv(f.keys.export("aws", ns, name), value);
        let seq = 20 + i as u64;
        let mut manifest = f.manifest("aws", "aws", seq, set.manifest(prev, changes));
        manifest.mod_revision = export.mod_revision;
        prev = f.s(seq);
        batch.push(RawEvent::Put(manifest));
        batch.push(RawEvent::Put(export));
    }
    let out = gate.admit(batch, SystemTime::now());
    assert!(!out.relist, "{:?}", gate.refused());
    assert_eq!(out.events.len(), 4, "{out:?}");
    assert!(gate.refused().is_empty());
}

#[test]
fn a_manifest_that_skips_one_asks_for_a_listing() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let m = ExportSet::default().manifest(f.s(77), BTreeMap::new());
    let kv = f.manifest("aws", "aws", 90, m);
    let out = gate.admit(vec![RawEvent::Put(kv)], SystemTime::now());
    assert!(out.relist);
}

#[test]
fn a_wiped_etcd_lists_as_nothing_and_changes_nothing() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let before = gate.believed_records();
    let after = gate.admit_records(vec![], SystemTime::now());
    assert_eq!(after, before);
    assert!(gate.clusters().any(|c| c == "aws"));
    // aws's exports listed as none, against a manifest of none: nothing held.
    let listed = gate.admit_exports("aws", vec![]);
    assert!(listed.held.is_empty());
}

#[test]
fn a_signed_deregistration_removes_a_cluster_and_a_policy_needs_the_anchor() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let now = SystemTime::now();
    let tomb =
        f.sealed::<Registration>("clusters/azure".into(), 5, None, Signer::Anchor(&f.anchor));
    let kv = f.kv(f.keys.cluster("azure"), tomb);
    let out = gate.admit(vec![RawEvent::Put(kv)], now);
    // The record and the bundle go (the bundle's going revokes azure's
    // identities), whatever raw deletes come or do not.
    let deleted: Vec<&str> = out.events.iter().map(RawEvent::key).collect();
    assert_eq!(
        deleted,
        [f.keys.cluster("azure"), f.keys.bundle("azure.test")]
    );
    assert!(
        out.events
            .iter()
            .all(|e| matches!(e, RawEvent::Delete { .. }))
    );
    assert!(!gate.clusters().any(|c| c == "azure"));
    // The genuine registration it replaced, written back: a rollback.
    let old = f.registration("azure", 1, "127.0.2.1");
    assert!(gate.admit(vec![RawEvent::Put(old)], now).events.is_empty());
    assert_eq!(
        gate.refused()[&f.keys.cluster("azure")].refusal.label(),
        "ROLLBACK"
    );
    assert!(!gate.clusters().any(|c| c == "azure"));

    let policy = json!({"apiVersion": "fedmesh.io/v1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "p"}, "spec": {"service": "*"}});
    let genuine = f.sealed(
        "policies/p".into(),
        1,
        Some(policy.clone()),
        Signer::Anchor(&f.anchor),
    );
    let by_cluster = f.sealed(
        "policies/p".into(),
        2,
        Some(policy.clone()),
        Signer::Root(&f.aws.ca),
    );
    let kv = f.kv(f.keys.policy("p"), genuine);
    let out = gate.admit(vec![RawEvent::Put(kv)], now);
    let RawEvent::Put(plain) = &out.events[0] else {
        panic!()
    };
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&plain.value).unwrap(),
        policy
    );
    let kv = f.kv(f.keys.policy("p"), by_cluster);
    assert!(gate.admit(vec![RawEvent::Put(kv)], now).events.is_empty());
    assert_eq!(gate.refused()[&f.keys.policy("p")].kind, Kind::Policy);

    // Deleted by the anchor; the genuine policy written back is a rollback.
    let tomb =
        f.sealed::<serde_json::Value>("policies/p".into(), 3, None, Signer::Anchor(&f.anchor));
    let kv = f.kv(f.keys.policy("p"), tomb);
    assert!(matches!(
        &gate.admit(vec![RawEvent::Put(kv)], now).events[..],
        [RawEvent::Delete { .. }]
    ));
    let again = f.sealed(
        "policies/p".into(),
        1,
        Some(policy),
        Signer::Anchor(&f.anchor),
    );
    let kv = f.kv(f.keys.policy("p"), again);
    assert!(gate.admit(vec![RawEvent::Put(kv)], now).events.is_empty());
    assert_eq!(
        gate.refused()[&f.keys.policy("p")].refusal.label(),
        "ROLLBACK"
    );
}

#[test]
fn a_cluster_over_its_budget_is_refused() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let mut m = ExportSet::default().manifest(f.s(10), BTreeMap::new());
    m.count = 1_000_000;
    let kv = f.manifest("aws", "aws", 20, m);
    assert!(
        gate.admit(vec![RawEvent::Put(kv)], SystemTime::now())
            .events
            .is_empty()
    );
    assert_eq!(
        gate.refused()[&f.keys.seen("aws")].refusal.label(),
        "BUDGET"
    );
}

#[test]
fn trust_unsigned_reads_an_older_federation() {
    let mut f = Fed::new();
    let mut gate = Gate::new(
        f.keys.clone(),
        GateConfig {
            anchors: vec![f.anchor.public()],
            trust_unsigned: true,
            budget: Default::default(),
        },
    );
    let rec = f.kv(
        f.keys.cluster("aws"),
        serde_json::to_vec(&record(&f.aws, "127.0.1.1")).unwrap(),
    );
    let doc = Bundle::with_roots(f.aws.td.clone(), [f.aws.ca.cert_der().clone()]).to_document();
    let bundle = f.kv(f.keys.bundle("aws.test"), doc);
    let seen = f.kv(
        f.keys.seen("aws"),
        br#"{"at":"2026-12-07T10:00:00Z"}"#.to_vec(),
    );
    let out = gate.admit_records(vec![rec, bundle, seen], SystemTime::now());
    assert_eq!(out.len(), 3, "{:?}", gate.refused());
    let export = f.kv(f.keys.export("aws", "shop", "cart"), Fed::export_value(1));
    assert_eq!(gate.admit_exports("aws", vec![export]).kvs.len(), 1);
}

/// What a gate believes, written down as signed and read back by a new
/// gate (a restarted controller, `fedmesh zone restore`), is believed
/// again: records, signed deletions (an older record stays refused) and
/// exports, each judged anew; a tampered export is not.
#[test]
fn a_dump_read_back_through_a_new_gate_is_believed_as_before_and_no_more() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let now = SystemTime::now();
    // aws exports shop/cart; azure is deregistered.
    let value = Fed::export_value(2);
    let mut set = ExportSet::default();
    set.insert("shop/cart".into(), value_digest(&value));
    let changes = BTreeMap::from([(
        "shop/cart".to_owned(),
        Some(digest_hex(&value_digest(&value))),
    )]);
    let m = set.manifest(f.s(10), changes);
    let export = f.kv(f.keys.export("aws", "shop", "cart"), value.clone());
    let mut manifest = f.manifest("aws", "aws", 11, m);
    manifest.mod_revision = export.mod_revision;
    let batch = vec![RawEvent::Put(manifest), RawEvent::Put(export.clone())];
    assert_eq!(
        gate.admit(batch, now).events.len(),
        2,
        "{:?}",
        gate.refused()
    );
    let tomb =
        f.sealed::<Registration>("clusters/azure".into(), 5, None, Signer::Anchor(&f.anchor));
    let kv = f.kv(f.keys.cluster("azure"), tomb);
    gate.admit(vec![RawEvent::Put(kv)], now);

    let dump = fedmesh_zone::dump::ZoneDump::new(
        f.keys.prefix(),
        gate.signed_records(),
        vec![export.clone()],
        now,
    );
    let path = std::path::Path::new("last-good-view.json");
    let bytes = dump.to_bytes();
    let read = fedmesh_zone::dump::ZoneDump::parse(&bytes, path, f.keys.prefix()).unwrap();

    let mut fresh = f.gate();
    let admitted = read.admit(&mut fresh, now);
    assert!(fresh.refused().is_empty(), "{:?}", fresh.refused());
    assert_eq!(fresh.clusters().collect::<Vec<_>>(), ["aws"]);
    assert_eq!(admitted.records.len(), gate.believed_records().len());
    assert_eq!(admitted.exports["aws"].kvs.len(), 1);
    assert!(admitted.exports["aws"].held.is_empty());
    // The deletion came back with it: azure's older record is a rollback.
    let old = f.registration("azure", 1, "127.0.2.1");
    assert!(fresh.admit(vec![RawEvent::Put(old)], now).events.is_empty());
    assert_eq!(
        fresh.refused()[&f.keys.cluster("azure")].refusal.label(),
        "ROLLBACK"
    );

    // The same dump with the export's value changed: its bucket is held.
    let mut tampered = read.clone();
    tampered.exports[0].value = String::from_utf8(Fed::export_value(3)).unwrap();
    let mut fresh = f.gate();
    let admitted = tampered.admit(&mut fresh, now);
    assert!(admitted.exports["aws"].kvs.is_empty());
    assert_eq!(admitted.exports["aws"].held.len(), 1);

    // Another prefix, another format: refused, naming the file.
    let e = fedmesh_zone::dump::ZoneDump::parse(&bytes, path, "/other/").unwrap_err();
    assert!(e.to_string().starts_with("last-good-view.json: "), "{e}");
    let e =
        fedmesh_zone::dump::ZoneDump::parse(b"{\"format\": 1", path, f.keys.prefix()).unwrap_err();
    assert!(e.to_string().contains("not a global-zone dump"), "{e}");
}

/// The anchor rotated: a reader pinned to the old key follows the chain
/// (the new key endorsed by the old, the chain signed by the new), then
/// believes records and policies from the new key alone; a chain a cluster
/// forges leads nowhere, and an older chain is a rollback.
#[test]
fn a_rotated_anchor_is_followed_from_the_pinned_key_and_the_old_key_stops_counting() {
    let mut f = Fed::new();
    let mut gate = f.gate();
    f.registered(&mut gate);
    let now = SystemTime::now();
    let next = AnchorKey::generate().unwrap();
    let chain = AnchorChain::starting_at(&f.anchor.public())
        .rotated(&f.anchor, &next.public())
        .unwrap();
    let sealed_chain = |f: &Fed, seq: u64, chain: &AnchorChain, by: &AnchorKey| {
        f.sealed(
            CHAIN_SUBJECT.into(),
            seq,
            Some(chain.clone()),
            Signer::Anchor(by),
        )
    };
    // Signed by the old key, not the newest: refused.
    let by_old = sealed_chain(&f, 2, &chain, &f.anchor);
    let kv = f.kv(f.keys.anchor_chain(), by_old);
    gate.admit(vec![RawEvent::Put(kv)], now);
    assert_eq!(gate.anchors(), [f.anchor.public()]);
    assert_eq!(gate.refused()[&f.keys.anchor_chain()].kind, Kind::Anchor);

    let genuine = sealed_chain(&f, 2, &chain, &next);
    let kv = f.kv(f.keys.anchor_chain(), genuine);
    gate.admit(vec![RawEvent::Put(kv)], now);
    assert_eq!(gate.anchors(), [next.public()]);
    assert!(gate.refused().is_empty(), "{:?}", gate.refused());

    // Records count from the new key alone now.
    let reg = |f: &Fed, seq: u64, by: &AnchorKey| {
        let c = &f.aws;
        let reg = Registration {
            record: record(c, "127.0.1.9"),
            roots: vec![root_keyid(c.ca.cert_der()).unwrap()],
        };
        f.sealed("clusters/aws".into(), seq, Some(reg), Signer::Anchor(by))
    };
    let old_signed = reg(&f, 7, &f.anchor);
    let kv = f.kv(f.keys.cluster("aws"), old_signed);
    assert!(gate.admit(vec![RawEvent::Put(kv)], now).events.is_empty());
    let new_signed = reg(&f, 8, &next);
    let kv = f.kv(f.keys.cluster("aws"), new_signed);
    assert_eq!(
        puts(&gate.admit(vec![RawEvent::Put(kv)], now).events).len(),
        1
    );

    // A cluster's CA cannot extend it, nor can a chain that does not
    // follow from the pinned key; the chain believed before is a rollback.
    let stranger = AnchorKey::generate().unwrap();
    let forged = AnchorChain::starting_at(&stranger.public());
    let forged = sealed_chain(&f, 9, &forged, &stranger);
    let kv = f.kv(f.keys.anchor_chain(), forged);
    gate.admit(vec![RawEvent::Put(kv)], now);
    assert_eq!(gate.anchors(), [next.public()]);
    let by_ca = f.sealed(
        CHAIN_SUBJECT.into(),
        9,
        Some(chain.clone()),
        Signer::Root(&f.aws.ca),
    );
    let kv = f.kv(f.keys.anchor_chain(), by_ca);
    gate.admit(vec![RawEvent::Put(kv)], now);
    assert_eq!(gate.anchors(), [next.public()]);
    let older = sealed_chain(&f, 1, &chain, &next);
    let kv = f.kv(f.keys.anchor_chain(), older);
    gate.admit(vec![RawEvent::Put(kv)], now);
    assert_eq!(
        gate.refused()[&f.keys.anchor_chain()].refusal.label(),
        "ROLLBACK"
    );

    // A gate that starts from what this one believes follows the chain too.
    let mut fresh = f.gate();
    fresh.admit_records(gate.signed_records(), now);
    assert_eq!(fresh.anchors(), [next.public()]);
    assert!(fresh.clusters().any(|c| c == "aws"));
}

/// Two CA rotations later, aws's bundle holds only its third root, signed
/// by it. A reader that has never seen aws's bundle (a new controller,
/// `fedmesh get`) trusts only the first root, pinned in aws's record: it
/// follows the endorsements (each root vouching for the next) to the third,
/// and believes nothing without them, nor endorsements by another root.
#[test]
fn a_fresh_reader_follows_a_clusters_rotations_through_endorsements() {
    let mut f = Fed::new();
    let now = SystemTime::now();
    let subject = "bundles/aws.test";
    let second = ClusterCa::generate(&f.aws.td, &CaOptions::default(), now).unwrap();
    let third = ClusterCa::generate(&f.aws.td, &CaOptions::default(), now).unwrap();
    let chain = vec![
        endorse(&f.aws.ca, subject, second.cert_der()).unwrap(),
        endorse(&second, subject, third.cert_der()).unwrap(),
    ];
    let doc: serde_json::Value = serde_json::from_str(
        &Bundle::with_roots(f.aws.td.clone(), [third.cert_der().clone()]).to_document(),
    )
    .unwrap();
    let bundle = |endorsements: Vec<Endorsement>| {
        let statement = Statement {
            subject: subject.into(),
            seq: 5,
            value: Some(doc.clone()),
            x5c: vec![],
            endorsements,
        };
        seal(statement, Signer::Root(&third)).unwrap().to_json()
    };
    let fresh = |f: &mut Fed, value: String| {
        let mut gate = f.gate();
        let record = f.registration("aws", 1, "127.0.1.1");
        let kv = f.kv(f.keys.bundle("aws.test"), value);
        gate.admit_records(vec![record, kv], SystemTime::now());
        gate
    };

    let gate = fresh(&mut f, bundle(chain.clone()));
    assert!(gate.refused().is_empty(), "{:?}", gate.refused());

    // Without the endorsements, or with only the last: not believed.
    for partial in [vec![], chain[1..].to_vec()] {
        let gate = fresh(&mut f, bundle(partial));
        assert_eq!(
            gate.refused()[&f.keys.bundle("aws.test")].refusal.label(),
            "FORGED"
        );
    }
    // azure's root endorsing the third: not believed either.
    let by_azure = vec![endorse(&f.azure.ca, subject, third.cert_der()).unwrap()];
    let gate = fresh(&mut f, bundle(by_azure));
    assert_eq!(
        gate.refused()[&f.keys.bundle("aws.test")].refusal.label(),
        "FORGED"
    );
    // Endorsements for another trust domain's key do not carry over.
    let elsewhere = vec![
        endorse(&f.aws.ca, "bundles/azure.test", second.cert_der()).unwrap(),
        endorse(&second, "bundles/azure.test", third.cert_der()).unwrap(),
    ];
    let gate = fresh(&mut f, bundle(elsewhere));
    assert_eq!(
        gate.refused()[&f.keys.bundle("aws.test")].refusal.label(),
        "FORGED"
    );
}
