//! Kubernetes objects as a user would apply them, for tests against
//! [`crate::FakeKube`].

use std::collections::BTreeMap;

use crate::FakeKube;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

fn meta(ns: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name.into()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..Default::default()
    }
}

/// A ClusterIP Service with one TCP port named `http`.
pub fn service(ns: &str, name: &str, port: i32) -> Service {
    Service {
        metadata: meta(ns, name, &[]),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An EndpointSlice of `svc` whose pods listen on `target`:
/// `(ip, zone, ready)`.
pub fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    target: i32,
    pods: &[(&str, &str, bool)],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(ns, name, &[("kubernetes.io/service-name", svc)]),
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(target),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: pods
            .iter()
            .map(|(ip, zone, ready)| Endpoint {
                addresses: vec![ip.to_string()],
                zone: Some(zone.to_string()),
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*ready),
                    terminating: Some(false),
                }),
                ..Default::default()
            })
            .collect(),
    }
}

/// A `ServiceExport` (Multi-Cluster Services API), as its manifest reads.
pub fn export(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1",
        "kind": "ServiceExport",
        "metadata": { "namespace": ns, "name": name },
    })
}

/// A `ServiceExport`'s condition of `type_`, as `(status, reason, message)`.
pub fn condition(
    fake: &FakeKube,
    ns: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let e = fake.get("serviceexports", ns, name)?;
    let c = e["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?
        .clone();
    Some((
        c["status"].as_str()?.into(),
        c["reason"].as_str()?.into(),
        c["message"].as_str()?.into(),
    ))
}
