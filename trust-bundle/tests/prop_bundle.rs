//! Property-based test of SPIFFE bundle documents (what etcd and the
//! discovery API carry): an edited document is read, or refused with an
//! error naming where it came from and what is wrong; never a panic.
//! `PROPTEST_CASES` sets how many cases run (256 by default).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::time::SystemTime;

use fedmesh_test_support::mutate::mutations;
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, TrustDomain};
use proptest::prelude::*;

fn document() -> String {
    let td = TrustDomain::new("aws.fedmesh.test").unwrap();
    let a = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let b = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    Bundle::with_roots(td, [a.cert_der().clone(), b.cert_der().clone()]).to_document()
}

proptest! {
    #[test]
    fn an_edited_bundle_is_read_or_refused_with_a_reason(doc in mutations(&document())) {
        let td = TrustDomain::new("aws.fedmesh.test").unwrap();
        match Bundle::from_document(td, doc.as_bytes(), "bundles/aws") {
            Ok(b) => prop_assert!(b.roots().len() <= 2),
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.contains("bundles/aws") && text.len() > 12, "{text}");
            }
        }
    }
}
