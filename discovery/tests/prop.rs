//! Property-based tests of how a client applies discovery updates: any
//! update, however malformed, is applied service by service or refused
//! whole; a refused one changes nothing, a skipped service keeps its last
//! good value and is named, and nothing panics.
//! `PROPTEST_CASES` sets how many cases each property runs (256 by default).

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use fedmesh_api::ServiceKey;
use fedmesh_discovery::MeshState;
use fedmesh_proto::discovery::v1 as pb;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("cart".to_string()),
        Just("pay".to_string()),
        Just(String::new()),
        "[a-z]{1,3}",
        any::<String>()
    ]
}

fn service() -> impl Strategy<Value = pb::Service> {
    (
        name(),
        name(),
        prop::collection::vec(prop_oneof![Just(8080u32), any::<u32>()], 0..3),
        prop::collection::vec(
            (
                prop_oneof![Just("127.0.1.10:8080".to_string()), any::<String>()],
                any::<bool>(),
            ),
            0..3,
        ),
        prop::collection::vec(name(), 0..3),
        prop_oneof![
            Just(None),
            Just(Some(r#"{"service":"shop/cart","retries":1}"#.to_string())),
            any::<String>().prop_map(Some)
        ],
    )
        .prop_map(
            |(namespace, name, ports, local, remote, policy)| pb::Service {
                namespace,
                name,
                ports,
                local: local
                    .into_iter()
                    .map(|(address, healthy)| pb::LocalEndpoint {
                        address,
                        zone: "a".into(),
                        healthy,
                    })
                    .collect(),
                remote: remote
                    .into_iter()
                    .map(|cluster| pb::RemoteCluster {
                        cluster,
                        ..Default::default()
                    })
                    .collect(),
                exported: false,
                policy: policy.map(|spec| pb::ServicePolicy {
                    spec,
                    sources: vec![],
                }),
            },
        )
}

fn response() -> impl Strategy<Value = pb::DiscoveryResponse> {
    (
        any::<bool>(),
        prop::collection::vec(service(), 0..6),
        prop::option::of(prop::collection::vec(name(), 0..3)),
        prop::collection::btree_map(name(), any::<String>(), 0..2),
        prop::collection::vec((name(), name()), 0..2),
    )
        .prop_map(
            |(incremental, services, peers, bundles, removed)| pb::DiscoveryResponse {
                version_info: "v".into(),
                nonce: "n".into(),
                incremental,
                more: false,
                removed: removed
                    .into_iter()
                    .map(|(namespace, name)| pb::ServiceRef { namespace, name })
                    .collect(),
                snapshot: Some(pb::MeshSnapshot {
                    cluster: "aws".into(),
                    services,
                    bundles: bundles.into_iter().collect(),
                    peers: peers.map(|names| pb::Peers {
                        clusters: names
                            .into_iter()
                            .map(|cluster| pb::PeerCluster {
                                cluster,
                                ..Default::default()
                            })
                            .collect(),
                        egress: 0,
                    }),
                }),
            },
        )
}

proptest! {
    #[test]
    fn any_sequence_of_updates_applies_by_service_or_changes_nothing(
        updates in prop::collection::vec(response(), 1..5)
    ) {
        let mut state = MeshState::default();
        for r in &updates {
            let before = state.clone();
            match state.apply(r) {
                Ok(skipped) => {
                    for s in &skipped {
                        prop_assert!(s.contains('/') && s.contains(':'), "{s}");
                    }
                    // Every service held passed the checks.
                    for svc in state.services.values() {
                        prop_assert!(fedmesh_discovery::check_service(svc).is_ok());
                    }
                    // A service the update skipped (every copy of it, if it
                    // came twice) kept its last good value.
                    let sent: Vec<&pb::Service> = r.snapshot.iter().flat_map(|s| &s.services).collect();
                    for svc in &sent {
                        let key = ServiceKey::new(&svc.namespace, &svc.name);
                        let all_bad = sent
                            .iter()
                            .filter(|o| o.namespace == svc.namespace && o.name == svc.name)
                            .all(|o| fedmesh_discovery::check_service(o).is_err());
                        let removed = r
                            .removed
                            .iter()
                            .any(|x| x.namespace == svc.namespace && x.name == svc.name);
                        if all_bad && !removed {
                            prop_assert_eq!(state.services.get(&key), before.services.get(&key));
                        }
                    }
                }
                Err(why) => {
                    prop_assert!(!why.is_empty());
                    prop_assert_eq!(&state, &before, "a refused update changed the state");
                }
            }
        }
    }
}
