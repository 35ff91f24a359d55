//! Bad input never panics: every truncation and many bit flips of valid
//! bundles, PEM files, certificates and IDs give an error, not a crash.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::SystemTime;

use fedmesh_trust::{Bundle, CaOptions, ClusterCa, SpiffeId, Svid, SvidPolicy, TrustDomain};

/// Deterministic bit flips: (byte index, bit) pairs spread over the input.
fn flips(len: usize) -> impl Iterator<Item = (usize, u8)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..400).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x as usize) % len.max(1), 1u8 << (x % 8))
    })
}

fn mutations(valid: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..valid.len()).map(|n| valid[..n].to_vec()).collect();
    for (i, bit) in flips(valid.len()) {
        let mut m = valid.to_vec();
        m[i] ^= bit;
        out.push(m);
    }
    out
}

fn fixture() -> (TrustDomain, ClusterCa, Svid) {
    let td = TrustDomain::new("aws.example").unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let id = SpiffeId::workload(&td, "shop", "web").unwrap();
    let svid = ca
        .issue(&id, &SvidPolicy::default(), SystemTime::now())
        .unwrap();
    (td, ca, svid)
}

#[test]
fn truncated_or_corrupted_bundle_documents_are_errors() {
    let (td, ca, _) = fixture();
    let doc = Bundle::with_roots(td.clone(), [ca.cert_der().clone()]).to_document();
    let mut ok = 0;
    for m in mutations(doc.as_bytes()) {
        match Bundle::from_document(td.clone(), &m, "bundles/aws.example") {
            Ok(_) => ok += 1,
            Err(e) => assert!(e.to_string().starts_with("bundles/aws.example"), "{e}"),
        }
    }
    // Every strict truncation is an error; only some flips (inside the
    // sequence number, say) still decode.
    assert!(ok < 400, "{ok} mutations decoded");
}

#[test]
fn truncated_or_corrupted_ca_pem_is_an_error_naming_the_file() {
    let (td, ca, _) = fixture();
    let (cert, key) = (ca.cert_pem(), ca.key_pem());
    for m in mutations(cert.as_bytes()) {
        if let Err(e) = ClusterCa::from_pem(&td, &m, key.as_bytes(), "ca.crt", "ca.key") {
            assert!(e.to_string().starts_with("ca."), "{e}");
        }
    }
    for m in mutations(key.as_bytes()).into_iter().step_by(3) {
        if let Err(e) = ClusterCa::from_pem(&td, cert.as_bytes(), &m, "ca.crt", "ca.key") {
            assert!(e.to_string().starts_with("ca."), "{e}");
        }
    }
}

#[test]
fn truncated_or_corrupted_svids_are_errors() {
    let (_, _, svid) = fixture();
    let leaf = svid.leaf().as_ref().to_vec();
    for n in 0..leaf.len() {
        assert!(
            fedmesh_trust::svid::parse_leaf(&leaf[..n]).is_err(),
            "truncated at {n}"
        );
    }
    for m in mutations(&leaf) {
        let _ = fedmesh_trust::svid::parse_leaf(&m);
    }
    let (chain, key) = (svid.chain_pem(), svid.key_pem());
    for m in mutations(chain.as_bytes()) {
        let _ = Svid::from_pem(&m, key.as_bytes(), "svid");
    }
}

#[test]
fn arbitrary_strings_are_not_spiffe_ids_unless_valid() {
    let valid = "spiffe://aws.example/ns/shop/sa/web";
    for m in mutations(valid.as_bytes()) {
        if let Ok(s) = String::from_utf8(m)
            && let Ok(id) = SpiffeId::parse(&s)
        {
            assert_eq!(id.as_str(), s);
        }
    }
}
