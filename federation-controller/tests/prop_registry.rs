//! Property-based test of the registry parser (the file a controller reads
//! its cluster's services from): an edited registry parses, or fails with
//! an error naming the file and what is wrong; never a panic.
//! `PROPTEST_CASES` sets how many cases run (256 by default).

use fedmesh_controller::registry::parse_registry;
use fedmesh_test_support::mutate::mutations;
use proptest::prelude::*;

const REGISTRY: &str = "\
services:
  - namespace: shop
    name: checkout
    ports: [8080, 8443]
    endpoints:
      - address: 127.0.1.10:8080
        zone: az1
      - address: \"[::1]:8080\"
        zone: az2
        healthy: false
  - namespace: shop
    name: payments
    ports: [9090]
    endpoints: []
";

proptest! {
    #[test]
    fn an_edited_registry_parses_or_says_why(doc in mutations(REGISTRY)) {
        if let Err(e) = parse_registry(&doc, "registry.yaml") {
            let text = e.to_string();
            prop_assert!(text.starts_with("registry.yaml") && text.len() > 14, "{text}");
        }
    }
}
