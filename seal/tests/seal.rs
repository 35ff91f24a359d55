//! Every signer and every refusal, on real keys: the anchor (Ed25519), a
//! cluster CA (ECDSA P-256) and a controller's SVID issued by it.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::{Duration, SystemTime};

use fedmesh_seal::*;
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, SpiffeId, SvidPolicy, TrustDomain};
use proptest::prelude::*;
use serde_json::{Value, json};

fn statement(subject: &str, seq: u64, value: Option<Value>) -> Statement<Value> {
    Statement {
        subject: subject.into(),
        seq,
        value,
        x5c: vec![],
        endorsements: vec![],
    }
}

struct Cluster {
    td: TrustDomain,
    ca: ClusterCa,
}

fn cluster(name: &str) -> Cluster {
    fedmesh_trust::install_default_provider();
    let td = TrustDomain::new(&format!("{name}.test")).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    Cluster { td, ca }
}

fn bundle(c: &Cluster) -> Bundle {
    Bundle::with_roots(c.td.clone(), [c.ca.cert_der().clone()])
}

#[test]
fn the_anchor_signs_and_only_the_anchor_opens() {
    let anchor = AnchorKey::generate().unwrap();
    let other = AnchorKey::generate().unwrap();
    let env = seal(
        statement("policies/p", 7, Some(json!({"a": 1}))),
        Signer::Anchor(&anchor),
    )
    .unwrap();
    let raw = env.to_json();
    let opened: Opened<Value> =
        open_anchored(raw.as_bytes(), "policies/p", &[anchor.public()]).unwrap();
    assert_eq!((opened.seq, opened.value), (7, Some(json!({"a": 1}))));
    assert_eq!(opened.signer, anchor.keyid());

    // Another key, even one that signs correctly, is not the anchor.
    let forged = seal(
        statement("policies/p", 8, Some(json!({"a": 2}))),
        Signer::Anchor(&other),
    )
    .unwrap()
    .to_json();
    let err = open_anchored::<Value>(forged.as_bytes(), "policies/p", &[anchor.public()]);
    assert_eq!(err.unwrap_err().label(), "FORGED");

    // A genuine value copied to another key.
    let err = open_anchored::<Value>(raw.as_bytes(), "policies/q", &[anchor.public()]);
    assert!(matches!(err, Err(Refusal::Forged(m)) if m.contains("policies/p")));

    // A plain value, as written before signing.
    let err = open_anchored::<Value>(br#"{"name":"p"}"#, "policies/p", &[anchor.public()]);
    assert_eq!(err.unwrap_err().label(), "UNSIGNED");

    // An envelope with the anchor's keyid but another key's signature.
    let mut env2 = seal(
        statement("policies/p", 9, Some(json!({}))),
        Signer::Anchor(&other),
    )
    .unwrap();
    env2.signatures[0].keyid = anchor.keyid();
    let err = open_anchored::<Value>(env2.to_json().as_bytes(), "policies/p", &[anchor.public()]);
    assert_eq!(err.unwrap_err().label(), "FORGED");

    // An envelope stripped of its signatures.
    let mut bare = env.clone();
    bare.signatures.clear();
    let err = open_anchored::<Value>(bare.to_json().as_bytes(), "policies/p", &[anchor.public()]);
    assert_eq!(err.unwrap_err().label(), "UNSIGNED");
}

#[test]
fn a_signed_payload_that_is_not_a_statement_is_invalid() {
    let anchor = AnchorKey::generate().unwrap();
    let env = Envelope::seal(b"[1,2,3]", anchor.keyid(), |m| Ok::<_, ()>(anchor.sign(m))).unwrap();
    let err = open_anchored::<Value>(env.to_json().as_bytes(), "policies/p", &[anchor.public()]);
    assert_eq!(err.unwrap_err().label(), "INVALID");
}

#[test]
fn sequences_only_rise() {
    assert!(check_seq(None, 1).is_ok());
    assert!(check_seq(Some(5), 5).is_ok(), "the same statement again");
    assert!(check_seq(Some(5), 6).is_ok());
    assert_eq!(
        check_seq(Some(5), 4),
        Err(Refusal::Rollback { held: 5, got: 4 })
    );
    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_000);
    assert_eq!(next_seq(now, None), 1_000);
    assert_eq!(next_seq(now, Some(999)), 1_000);
    assert_eq!(next_seq(now, Some(5_000)), 5_001, "a clock behind the last");
}

#[test]
fn a_bundle_opens_only_with_a_trusted_root() {
    let aws = cluster("aws");
    let azure = cluster("azure");
    let trusted = vec![root_keyid(aws.ca.cert_der()).unwrap()];
    let doc: Value = serde_json::from_str(&bundle(&aws).to_document()).unwrap();
    let subject = "bundles/aws.test";
    let raw = seal(
        statement(subject, 1, Some(doc.clone())),
        Signer::Root(&aws.ca),
    )
    .unwrap()
    .to_json();
    let certs = [aws.ca.cert_der().clone()];
    let opened = open_by_root::<Value>(raw.as_bytes(), subject, &trusted, &certs).unwrap();
    assert_eq!(opened.value, Some(doc));

    // azure's CA signs a bundle of its own root for aws's trust domain: its
    // root is in the document, but is not trusted for aws.
    let forged_doc: Value = serde_json::from_str(
        &Bundle::with_roots(aws.td.clone(), [azure.ca.cert_der().clone()]).to_document(),
    )
    .unwrap();
    let forged = seal(
        statement(subject, 2, Some(forged_doc)),
        Signer::Root(&azure.ca),
    )
    .unwrap()
    .to_json();
    let certs = [aws.ca.cert_der().clone(), azure.ca.cert_der().clone()];
    let err = open_by_root::<Value>(forged.as_bytes(), subject, &trusted, &certs).unwrap_err();
    assert_eq!(err.label(), "FORGED", "{err}");

    // azure's signature under aws's root keyid.
    let mut env = Envelope::parse(forged.as_bytes()).unwrap();
    env.signatures[0].keyid = trusted[0].clone();
    let err = open_by_root::<Value>(env.to_json().as_bytes(), subject, &trusted, &certs);
    assert_eq!(err.unwrap_err().label(), "FORGED");
}

#[test]
fn a_manifest_opens_only_with_its_controllers_svid() {
    let aws = cluster("aws");
    let azure = cluster("azure");
    let now = SystemTime::now();
    let controller = SpiffeId::controller(&aws.td, "aws-use1").unwrap();
    let svid = aws
        .ca
        .issue(&controller, &SvidPolicy::default(), now)
        .unwrap();
    let subject = "seen/aws-use1";
    let manifest = ExportSet::default().manifest(0, Default::default());
    let seq = next_seq(now, None);
    let raw = seal(
        Statement {
            subject: subject.into(),
            seq,
            value: Some(manifest.clone()),
            x5c: vec![],
            endorsements: vec![],
        },
        Signer::Svid(&svid),
    )
    .unwrap()
    .to_json();
    let opened =
        open_by_svid::<ExportManifest>(raw.as_bytes(), subject, &controller, &bundle(&aws), now)
            .unwrap();
    assert_eq!(opened.value, Some(manifest.clone()));

    let refused = |raw: &str, bundle: &Bundle| {
        open_by_svid::<ExportManifest>(raw.as_bytes(), subject, &controller, bundle, now)
            .unwrap_err()
    };
    // Checked against another trust domain's bundle.
    assert_eq!(refused(&raw, &bundle(&azure)).label(), "FORGED");

    // Another identity of the same cluster (its gateway) may not sign it.
    let gateway = SpiffeId::gateway(&aws.td, "aws-use1").unwrap();
    let gw = aws.ca.issue(&gateway, &SvidPolicy::default(), now).unwrap();
    let by_gateway = seal(
        Statement {
            subject: subject.into(),
            seq,
            value: Some(manifest.clone()),
            x5c: vec![],
            endorsements: vec![],
        },
        Signer::Svid(&gw),
    )
    .unwrap()
    .to_json();
    let err = refused(&by_gateway, &bundle(&aws));
    assert!(err.to_string().contains("only"), "{err}");

    // azure's CA minting aws's controller identity.
    let minted = azure.ca.issue(&controller, &SvidPolicy::default(), now);
    assert!(
        minted.is_err(),
        "a CA cannot issue outside its trust domain"
    );

    // Dated far in the future, it would outrank every genuine manifest.
    let future = seal(
        Statement {
            subject: subject.into(),
            seq: next_seq(now + Duration::from_secs(3600), None),
            value: Some(manifest),
            x5c: vec![],
            endorsements: vec![],
        },
        Signer::Svid(&svid),
    )
    .unwrap()
    .to_json();
    assert!(
        refused(&future, &bundle(&aws))
            .to_string()
            .contains("future")
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A flipped byte anywhere in a stored envelope is refused, or, where
    /// it lands in JSON whitespace-equivalent encoding, opens to exactly
    /// the value that was signed.
    #[test]
    fn a_flipped_byte_never_opens_to_another_value(at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let anchor = AnchorKey::generate().unwrap();
        let value = json!({"service": "shop/cart", "allow": ["aws"]});
        let raw = seal(statement("policies/p", 42, Some(value.clone())), Signer::Anchor(&anchor))
            .unwrap()
            .to_json()
            .into_bytes();
        let mut bad = raw.clone();
        let i = at.index(bad.len());
        bad[i] ^= 1 << bit;
        match open_anchored::<Value>(&bad, "policies/p", &[anchor.public()]) {
            Err(_) => {}
            Ok(o) => prop_assert_eq!((o.seq, o.value), (42, Some(value))),
        }
    }
}
