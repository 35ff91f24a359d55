//! Property-based test of the policy parser: the shipped examples with
//! random edits parse, or fail with an error naming the file and what is
//! wrong; never a panic. What parses also survives its JSON form (etcd's,
//! and the discovery API's) unchanged.
//! `PROPTEST_CASES` sets how many cases run (256 by default).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use fedmesh_api::policy::{PolicySpec, parse_documents};
use fedmesh_test_support::mutate::mutations;
use proptest::prelude::*;

const CHECKOUT: &str = include_str!("../../policies/examples/checkout.yaml");
const DEFAULT: &str = include_str!("../../policies/examples/mesh-default.yaml");

proptest! {
    #[test]
    fn an_edited_policy_parses_or_says_why(
        doc in prop_oneof![mutations(CHECKOUT), mutations(DEFAULT)]
    ) {
        match parse_documents(&doc, "p.yaml") {
            Ok(policies) => {
                for p in policies {
                    let json = serde_json::to_string(&p.spec).unwrap();
                    let back: PolicySpec = serde_json::from_str(&json).unwrap();
                    prop_assert_eq!(&back, &p.spec);
                    prop_assert!(back.validate().is_ok());
                }
            }
            Err(e) => prop_assert!(e.starts_with("p.yaml: ") && e.len() > 8, "{e}"),
        }
    }

    #[test]
    fn any_json_spec_is_taken_or_refused_with_a_field(json in mutations(r#"{"service":"shop/cart","retries":2,"weights":{"aws":90,"gcp":10},"failoverThreshold":0.7,"routes":[{"match":{"headers":{"x":{"exact":"1"}}},"to":[{"service":"shop/v2","weight":5}]}]}"#)) {
        // What a discovery client does with the policy a controller sent.
        if let Ok(spec) = serde_json::from_str::<PolicySpec>(&json)
            && let Err(e) = spec.validate()
        {
            prop_assert!(!e.path.is_empty() || !e.message.is_empty());
        }
    }
}
