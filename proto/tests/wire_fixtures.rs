//! Version skew, on the wire: every discovery, Certify and tunnel message
//! as version 0.1 writes it, kept as a golden fixture
//! (`tests/fixtures/v0.1/<message>.hex`). Every later version must decode
//! each fixture to the same message, and must ignore fields it does not
//! know (a newer peer's). A change that renumbers, retypes or drops a field
//! fails here.
//!
//! Fixtures are written once, when their version is current, with
//! `FEDMESH_WRITE_FIXTURES=1 cargo test -p fedmesh-proto --test wire_fixtures`,
//! which never overwrites one that exists.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use fedmesh_proto::discovery::v1 as d;
use fedmesh_proto::tunnel::v1 as t;
use prost::Message;

fn fixture(version: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(version)
        .join(format!("{name}.hex"))
}

fn hex(bytes: &[u8]) -> String {
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    s
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A field no version defines (number 4000), varint and length-delimited,
/// as a newer writer might add.
fn with_unknown_fields(mut bytes: Vec<u8>) -> Vec<u8> {
    // Tag 4000, wire type 0: (4000 << 3) | 0 as a varint; value 7.
    bytes.extend([0x80, 0xfa, 0x01, 0x07]);
    // Tag 4001, wire type 2, 3 bytes.
    bytes.extend([0x8a, 0xfa, 0x01, 0x03, b'n', b'e', b'w']);
    bytes
}

fn service() -> d::Service {
    d::Service {
        namespace: "shop".into(),
        name: "payments".into(),
        ports: vec![8082, 9090],
        local: vec![d::LocalEndpoint {
            address: "127.0.1.20:8082".into(),
            zone: "use1-az1".into(),
            healthy: true,
        }],
        remote: vec![d::RemoteCluster {
            cluster: "gcp-usc1".into(),
            cloud: "gcp".into(),
            region: "us-central1".into(),
            localities: vec![d::ZoneCapacity {
                zone: "usc1-a".into(),
                healthy: 2,
                total: 3,
                weight: 10,
            }],
            healthy: 2,
            gateways: vec![d::GatewayAddress {
                address: "127.0.2.21".into(),
                port: 15443,
            }],
            trust_domain: "gcp-usc1.fedmesh.local".into(),
            verified: true,
            last_seen_unix_ms: 1_796_000_000_000,
        }],
        exported: true,
        policy: Some(d::ServicePolicy {
            spec: r#"{"retries":2}"#.into(),
            sources: vec![d::PolicySource {
                name: "payments".into(),
                revision: 42,
            }],
        }),
    }
}

fn snapshot() -> d::MeshSnapshot {
    d::MeshSnapshot {
        cluster: "aws-use1".into(),
        services: vec![service()],
        bundles: HashMap::from([(
            "gcp-usc1.fedmesh.local".to_string(),
            r#"{"keys":[]}"#.to_string(),
        )]),
        peers: Some(d::Peers {
            clusters: vec![d::PeerCluster {
                cluster: "gcp-usc1".into(),
                trust_domain: "gcp-usc1.fedmesh.local".into(),
                gateways: vec![d::GatewayAddress {
                    address: "127.0.2.21".into(),
                    port: 15443,
                }],
                cloud: "gcp".into(),
                region: "us-central1".into(),
                verified: true,
                last_seen_unix_ms: 1_796_000_000_000,
            }],
            egress: d::Egress::Gateway as i32,
        }),
    }
}

/// Decodes a message's bytes to its debug form, to compare.
type Decode = fn(&[u8]) -> Result<String, prost::DecodeError>;

/// Every message, with every field set, as its fixture holds it.
fn samples() -> Vec<(&'static str, Vec<u8>, Decode)> {
    fn dbg<M: Message + Default + std::fmt::Debug>(b: &[u8]) -> Result<String, prost::DecodeError> {
        M::decode(b).map(|m| format!("{m:?}"))
    }
    vec![
        (
            "discovery_request",
            d::DiscoveryRequest {
                node: "proxy/aws-use1/web-0".into(),
                version_info: "v7".into(),
                response_nonce: "n7".into(),
                error_detail: "skipped shop/x: bad policy".into(),
                scope: d::Scope::Listed as i32,
                subscribe: vec!["shop/payments".into(), "billing/*".into()],
            }
            .encode_to_vec(),
            dbg::<d::DiscoveryRequest>,
        ),
        (
            "discovery_response",
            d::DiscoveryResponse {
                version_info: "v8".into(),
                nonce: "n8".into(),
                snapshot: Some(snapshot()),
                incremental: true,
                removed: vec![d::ServiceRef {
                    namespace: "shop".into(),
                    name: "old".into(),
                }],
                more: true,
            }
            .encode_to_vec(),
            dbg::<d::DiscoveryResponse>,
        ),
        (
            "certify_request",
            d::CertifyRequest {
                csr_der: vec![0x30, 0x82, 0x01, 0x00],
                join_token: "web-token-0123456789abcdef".into(),
                service_account_token: "eyJhbGciOi.x.y".into(),
            }
            .encode_to_vec(),
            dbg::<d::CertifyRequest>,
        ),
        (
            "certify_response",
            d::CertifyResponse {
                chain_der: vec![vec![0x30, 0x01], vec![0x30, 0x02]],
                bundles: HashMap::from([("aws-use1.fedmesh.local".into(), "{}".into())]),
            }
            .encode_to_vec(),
            dbg::<d::CertifyResponse>,
        ),
        (
            "tunnel_open",
            t::TunnelOpen {
                service: "shop/payments".into(),
                port: 8082,
                target_cluster: "gcp-usc1".into(),
                source_identity: "spiffe://aws-use1.fedmesh.local/ns/shop/sa/web".into(),
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                deadline_ms: 5000,
            }
            .encode_to_vec(),
            dbg::<t::TunnelOpen>,
        ),
        (
            "tunnel_accept",
            t::TunnelAccept {
                status: t::tunnel_accept::Status::Overloaded as i32,
                endpoint: "127.0.2.30:8082".into(),
                message: "gateway is draining before shutdown".into(),
            }
            .encode_to_vec(),
            dbg::<t::TunnelAccept>,
        ),
    ]
}

#[test]
fn every_fixture_decodes_to_the_message_it_was_written_from() {
    let write = std::env::var_os("FEDMESH_WRITE_FIXTURES").is_some();
    for (name, bytes, decode) in samples() {
        let path = fixture("v0.1", name);
        if write && !path.exists() {
            std::fs::write(&path, hex(&bytes)).unwrap();
        }
        let stored = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (a message without a fixture)", path.display()));
        let old = unhex(&stored);
        let want = decode(&bytes).unwrap();
        assert_eq!(
            decode(&old).unwrap(),
            want,
            "{name}: v0.1's bytes decode differently"
        );
        assert_eq!(
            decode(&with_unknown_fields(old)).unwrap(),
            want,
            "{name}: a newer writer's unknown fields are not ignored"
        );
    }
}

/// Map order aside, this version writes exactly what v0.1 wrote: a change
/// in the encoding shows here first (for messages without maps).
#[test]
fn this_version_writes_what_v0_1_wrote() {
    for (name, bytes, _) in samples() {
        if ["discovery_response", "certify_response"].contains(&name) {
            continue;
        }
        let stored = std::fs::read_to_string(fixture("v0.1", name)).unwrap();
        assert_eq!(hex(&bytes), stored, "{name}");
    }
}
