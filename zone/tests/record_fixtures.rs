//! Version skew, in the global zone: every record kind as version 0.1
//! writes it, kept as a golden fixture (`tests/fixtures/v0.1/`). Every
//! later version must read each one to the same value, and must ignore
//! fields it does not know (a newer writer's). A record signed by the
//! federation anchor in 0.1's envelope must still open. A change that
//! renames, retypes or drops a field fails here.
//!
//! Fixtures are written once, when their version is current, with
//! `FEDMESH_WRITE_FIXTURES=1 cargo test -p fedmesh-zone --test record_fixtures`,
//! which never overwrites one that exists.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use fedmesh_api::{
    AliveRecord, ClusterRecord, EgressMode, ExportSummary, GatewayAddress, SeenRecord, ZoneCapacity,
};
use fedmesh_seal::{AnchorKey, AnchorPublic, ExportManifest, Signer, Statement};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v0.1")
}

fn write() -> bool {
    std::env::var_os("FEDMESH_WRITE_FIXTURES").is_some()
}

fn at(s: &str) -> time::OffsetDateTime {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
}

fn cluster_record() -> ClusterRecord {
    ClusterRecord {
        name: "aws-use1".into(),
        cloud: "aws".into(),
        region: "us-east-1".into(),
        zones: vec!["use1-az1".into(), "use1-az2".into()],
        trust_domain: "aws-use1.fedmesh.local".into(),
        gateways: vec![GatewayAddress {
            address: "127.0.1.21".into(),
            port: 15443,
        }],
        labels: BTreeMap::from([("team".into(), "payments".into())]),
        registered_at: at("2026-12-07T12:00:00Z"),
        egress: EgressMode::Gateway,
    }
}

fn export() -> ExportSummary {
    ExportSummary {
        ports: vec![8082],
        localities: vec![ZoneCapacity {
            zone: "use1-az1".into(),
            healthy: 2,
            total: 3,
            weight: 2,
        }],
        generation: 7,
    }
}

fn manifest() -> ExportManifest {
    ExportManifest {
        prev: 1_796_000_000_000,
        count: 1,
        buckets: BTreeMap::from([(3, "ab".repeat(32))]),
        changes: BTreeMap::from([("shop/payments".into(), Some("cd".repeat(32)))]),
    }
}

/// Reads `name` as `T`, as written and with a field no version defines.
fn read_both_ways<T, F>(name: &str, want: &T, value: F)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
    F: Fn() -> T,
{
    let path = dir().join(name);
    if write() && !path.exists() {
        std::fs::write(&path, serde_json::to_string_pretty(&value()).unwrap()).unwrap();
    }
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let read: T = serde_json::from_slice(&stored).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(&read, want, "{name}: v0.1's record reads differently");
    let mut newer: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    newer
        .as_object_mut()
        .unwrap()
        .insert("addedByANewerVersion".into(), serde_json::json!({"x": 1}));
    let read: T = serde_json::from_value(newer)
        .unwrap_or_else(|e| panic!("{name}: a newer writer's field is refused: {e}"));
    assert_eq!(&read, want, "{name}");
}

#[test]
fn every_record_of_v0_1_reads_the_same_and_unknown_fields_are_ignored() {
    read_both_ways("cluster-record.json", &cluster_record(), cluster_record);
    read_both_ways("export.json", &export(), export);
    read_both_ways("export-manifest.json", &manifest(), manifest);
    let alive = || AliveRecord {
        controller: "aws-use1-controller-0".into(),
        started_at: at("2026-12-07T12:00:01Z"),
        version: "0.1.0".into(),
    };
    read_both_ways("alive.json", &alive(), alive);
    let seen = || SeenRecord {
        at: at("2026-12-07T12:00:30Z"),
    };
    read_both_ways("seen.json", &seen(), seen);
}

/// The signed envelope of 0.1 (DSSE, the statement's fields) still opens
/// with the anchor that signed it.
#[test]
fn an_anchor_signed_record_of_v0_1_still_opens() {
    let (pub_path, env_path) = (
        dir().join("anchor.pub.pem"),
        dir().join("cluster-record.signed.json"),
    );
    if write() && !env_path.exists() {
        let key = AnchorKey::generate().unwrap();
        std::fs::write(&pub_path, key.public().to_pem()).unwrap();
        let statement = Statement {
            subject: "clusters/aws-use1".into(),
            seq: 1_796_000_000_000,
            value: Some(cluster_record()),
            x5c: Vec::new(),
            endorsements: Vec::new(),
        };
        let envelope = fedmesh_seal::seal(statement, Signer::Anchor(&key)).unwrap();
        std::fs::write(&env_path, serde_json::to_vec_pretty(&envelope).unwrap()).unwrap();
    }
    let anchor =
        AnchorPublic::from_pem(&std::fs::read(&pub_path).unwrap(), "anchor.pub.pem").unwrap();
    let raw = std::fs::read(&env_path).unwrap();
    let opened = fedmesh_seal::open_anchored::<ClusterRecord>(
        &raw,
        "clusters/aws-use1",
        std::slice::from_ref(&anchor),
    )
    .unwrap();
    assert_eq!(opened.seq, 1_796_000_000_000);
    assert_eq!(opened.value, Some(cluster_record()));
    // And only there: the subject is part of what was signed.
    assert!(
        fedmesh_seal::open_anchored::<ClusterRecord>(&raw, "clusters/gcp-usc1", &[anchor]).is_err()
    );
}
