//! Property-based test of the gateway's config parser: an edited config
//! parses, or fails with an error naming the file and what is wrong; never
//! a panic.
//! `PROPTEST_CASES` sets how many cases run (256 by default).

use fedmesh_gateway::config::GatewayConfig;
use fedmesh_test_support::mutate::mutations;
use proptest::prelude::*;

const CONFIG: &str = r#"cluster: gcp-usc1
trustDomain: gcp.example
zone: usc1-a
listen: {quic: "127.0.2.1:15443", egress: "127.0.2.1:15001", admin: "127.0.2.1:15020"}
identity: {certificate: gw.pem, key: gw-key.pem}
bundles: {gcp.example: own.json, aws.example: aws.json}
peers:
  - {cluster: aws-use1, trustDomain: aws.example, gateways: ["127.0.1.1:15443", "gw.aws.example:15443"]}
services:
  - name: shop/checkout
    ports: [8080]
    endpoints: [{address: "127.0.2.10:8080", zone: usc1-a}]
    allow: [{cluster: aws-use1, identities: ["spiffe://aws.example/ns/shop/sa/web"]}]
policies:
  - apiVersion: fedmesh.io/v1
    kind: GlobalTrafficPolicy
    metadata: {name: pay}
    spec: {service: shop/pay, export: {allow: [{cluster: aws-use1}]}}
settings: {idleTimeout: 2s, maxStreamsPerPeer: 100, revealEndpoint: false}
"#;

proptest! {
    #[test]
    fn an_edited_config_parses_or_says_why(doc in mutations(CONFIG)) {
        let r = GatewayConfig::parse(&doc, "gw.yaml", |p| Err(format!("no file {}", p.display())));
        if let Err(e) = r {
            let text = e.to_string();
            prop_assert!(text.starts_with("gw.yaml: ") && text.len() > 9, "{text}");
        }
    }
}
