//! Property-based test of the topology parser: the shipped topologies with
//! random edits parse, or fail with an error that names the file and says
//! what is wrong; never a panic.
//! `PROPTEST_CASES` sets how many cases run (256 by default).

use fedmesh_test_support::mutate::mutations;
use fedmesh_topology::Topology;
use proptest::prelude::*;

const THREE_CLOUDS: &str = include_str!("../three-clouds.yaml");
const HA: &str = include_str!("../two-clusters-ha.yaml");

proptest! {
    #[test]
    fn an_edited_topology_parses_or_says_why(
        doc in prop_oneof![mutations(THREE_CLOUDS), mutations(HA)]
    ) {
        if let Err(e) = Topology::parse(&doc, "t.yaml") {
            let text = e.to_string();
            prop_assert!(text.starts_with("t.yaml: ") && text.len() > "t.yaml: ".len(), "{text}");
        }
    }
}
