//! Property-based test of the proxy's config parser: an edited config
//! parses, or fails with an error naming the file and what is wrong; never
//! a panic.
//! `PROPTEST_CASES` sets how many cases run (256 by default).

use fedmesh_proxy::config::ProxyConfig;
use fedmesh_test_support::mutate::mutations;
use proptest::prelude::*;

const CONFIG: &str = r#"cluster: aws
trustDomain: aws.fedmesh.test
locality: {cloud: aws, region: use1, zone: az1}
listen: {http: "127.0.1.5:4140", admin: "127.0.1.5:4191", tcp: [{address: "127.0.1.5:5432", service: shop/db}]}
gateways: ["127.0.1.1:15001"]
peers: [{cluster: gcp, trustDomain: gcp.fedmesh.test, gateways: ["127.0.2.1:15443", "gw.gcp.example:15443"]}]
identity: {certificate: c.pem, key: k.pem}
bundles: {aws.fedmesh.test: b.json, gcp.fedmesh.test: g.json}
services:
  - name: shop/db
    port: 5432
    endpoints: [{address: "127.0.1.10:5432", zone: az1}]
    remote: [{cluster: gcp, cloud: gcp, region: usc1, healthy: 2, total: 3}]
    failover: {clusters: [gcp]}
policies:
  - apiVersion: fedmesh.io/v1
    kind: GlobalTrafficPolicy
    metadata: {name: db}
    spec: {service: shop/db, retries: 1, weights: {aws: 9, gcp: 1}}
settings: {retries: 1, failoverThreshold: 0.7, outlier: {consecutiveFailures: 3}, downstreamIdleTimeout: 1m}
"#;

proptest! {
    #[test]
    fn an_edited_config_parses_or_says_why(doc in mutations(CONFIG)) {
        let r = ProxyConfig::parse(&doc, "proxy.yaml", |p| Err(format!("no file {}", p.display())));
        if let Err(e) = r {
            let text = e.to_string();
            prop_assert!(text.starts_with("proxy.yaml: ") && text.len() > 12, "{text}");
        }
    }
}
