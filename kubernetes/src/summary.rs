//! From what the API server holds to what fedmesh exports: I/O-free.
//!
//! A Service is exported when a `ServiceExport` of the same name exists in
//! its namespace, and only then. Its port comes from the Service; its
//! endpoints (pod addresses, which stay inside the cluster: only their
//! per-zone counts reach the global zone) from the EndpointSlices labelled
//! with its name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use fedmesh_api::{Endpoint, LocalService, LocalServices, ServiceKey, validate_label};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::mcs::ServiceExport;
use crate::mirror::Mirror;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The zone of an endpoint whose slice names none.
pub const UNKNOWN_ZONE: &str = "unknown";

/// What became of one `ServiceExport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Exported. `note` says what was left out (other ports, endpoints
    /// without a usable address or zone), or is empty.
    Exported { note: String },
    /// Not exported: `reason` is a CamelCase word for the condition,
    /// `message` says what to fix.
    Invalid {
        reason: &'static str,
        message: String,
    },
}

/// The exported services and a verdict per `ServiceExport`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub services: LocalServices,
    pub verdicts: BTreeMap<ServiceKey, Verdict>,
}

/// The three mirrors, read together.
pub fn summarise(
    services: &Mirror<Service>,
    slices: &Mirror<EndpointSlice>,
    exports: &Mirror<ServiceExport>,
) -> Summary {
    // Slices by the Service they belong to.
    let mut by_service: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for ((ns, _), slice) in slices.iter() {
        if let Some(name) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            by_service
                .entry(ServiceKey::new(ns, name))
                .or_default()
                .push(slice);
        }
    }
    let mut out = Summary::default();
    for ((ns, name), _) in exports.iter() {
        let key = ServiceKey::new(ns, name);
        let verdict = match services.get(ns, name) {
            None => Verdict::Invalid {
                reason: "ServiceNotFound",
                message: format!("there is no Service {key} to export"),
            },
            Some(svc) => {
                let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
                match export(&key, svc, slices) {
                    Ok((service, note)) => {
                        out.services.insert(key.clone(), service);
                        Verdict::Exported { note }
                    }
                    Err((reason, message)) => Verdict::Invalid { reason, message },
                }
            }
        };
        out.verdicts.insert(key, verdict);
    }
    out
}

type Refusal = (&'static str, String);

fn export(
    key: &ServiceKey,
    svc: &Service,
    slices: &[&EndpointSlice],
) -> Result<(LocalService, String), Refusal> {
    for (what, v) in [("namespace", &key.namespace), ("service name", &key.name)] {
        validate_label(what, v).map_err(|e| ("InvalidName", e.to_string()))?;
    }
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Err((
            "UnsupportedType",
            format!("{key} is an ExternalName Service: it has no endpoints to export"),
        ));
    }
    // fedmesh carries one port per service (an endpoint is one address):
    // the Service's first TCP port.
    let tcp: Vec<_> = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect();
    let Some(first) = tcp.first() else {
        return Err((
            "NoTCPPort",
            format!("{key} has no TCP port; fedmesh carries TCP only"),
        ));
    };
    let port = u16::try_from(first.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            (
                "InvalidPort",
                format!("{key}: port {} is out of range", first.port),
            )
        })?;
    let mut notes = Vec::new();
    if tcp.len() > 1 {
        let rest: Vec<String> = tcp[1..].iter().map(|p| p.port.to_string()).collect();
        notes.push(format!(
            "exported on port {port} only (one port per service); not exported: {}",
            rest.join(", ")
        ));
    }
    let wanted = first.name.as_deref().unwrap_or("");
    let mut endpoints: Vec<Endpoint> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut skipped = 0usize;
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // The slice's port of the same name as the Service's (both unnamed
        // when the Service has one port).
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == wanted)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            // Consumers use the first address (the others are the same pod).
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                skipped += 1;
                continue;
            };
            let zone = ep.zone.clone().unwrap_or_else(|| UNKNOWN_ZONE.into());
            if validate_label("zone", &zone).is_err() {
                skipped += 1;
                continue;
            }
            let address = SocketAddr::new(ip, target);
            // A pod in two slices (while slices are rebalanced) counts once.
            if !seen.insert(address) {
                continue;
            }
            let c = ep.conditions.as_ref();
            // `ready` unset means ready; a terminating pod takes no new
            // traffic here, even while it still serves what it has.
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(Endpoint {
                address,
                zone,
                healthy: ready && !terminating,
            });
        }
    }
    if skipped > 0 {
        notes.push(format!(
            "{skipped} endpoints left out: no IP address, or a zone that is not a DNS label"
        ));
    }
    endpoints.sort_by_key(|e| e.address);
    Ok((
        LocalService {
            ports: vec![port],
            endpoints,
        },
        notes.join("; "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::watcher::Event;

    fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn service(name: &str, ports: &[(&str, i32, &str)]) -> Service {
        Service {
            metadata: meta(name, &[]),
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(n, p, proto)| ServicePort {
                            name: (!n.is_empty()).then(|| n.to_string()),
                            port: *p,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `(ip, zone, ready, terminating)`
    fn slice(
        name: &str,
        svc: &str,
        port: (&str, i32),
        eps: &[(&str, Option<&str>, bool, bool)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: meta(name, &[(SERVICE_NAME_LABEL, svc)]),
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(port.0.into()),
                port: Some(port.1),
                ..Default::default()
            }]),
            endpoints: eps
                .iter()
                .map(|(ip, zone, ready, terminating)| SliceEndpoint {
                    addresses: vec![ip.to_string()],
                    zone: zone.map(Into::into),
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*ready || *terminating),
                        terminating: Some(*terminating),
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn mirror<K: kube::Resource>(objects: Vec<K>) -> Mirror<K> {
        let mut m = Mirror::default();
        m.apply(Event::Init);
        for o in objects {
            m.apply(Event::InitApply(o));
        }
        m.apply(Event::InitDone);
        m
    }

    fn export(name: &str) -> ServiceExport {
        ServiceExport {
            metadata: meta(name, &[]),
            status: None,
        }
    }

    #[test]
    fn an_export_takes_the_services_port_and_its_slices_endpoints() {
        let services = mirror(vec![
            service("checkout", &[("http", 80, "TCP"), ("metrics", 9090, "TCP")]),
            service("cart", &[("", 8080, "TCP")]),
            service("dns", &[("", 53, "UDP")]),
        ]);
        let slices = mirror(vec![
            slice(
                "checkout-a",
                "checkout",
                ("http", 8080),
                &[
                    ("10.0.0.1", Some("az1"), true, false),
                    ("10.0.0.2", Some("az2"), false, false),
                    ("10.0.0.3", Some("az2"), false, true),
                    ("10.0.0.4", None, true, false),
                    ("10.0.0.5", Some("AZ_3"), true, false),
                ],
            ),
            // The same pod again (slices being rebalanced): counted once.
            slice(
                "checkout-b",
                "checkout",
                ("http", 8080),
                &[("10.0.0.1", Some("az1"), true, false)],
            ),
            // Another port's slice of the same service: not the exported port.
            slice(
                "checkout-m",
                "checkout",
                ("metrics", 9090),
                &[("10.0.0.9", Some("az1"), true, false)],
            ),
            // A Service that is not exported: never appears.
            slice(
                "cart-a",
                "cart",
                ("", 8080),
                &[("10.0.1.1", Some("az1"), true, false)],
            ),
        ]);
        let exports = mirror(vec![export("checkout"), export("ghost"), export("dns")]);
        let s = summarise(&services, &slices, &exports);

        let checkout = &s.services[&ServiceKey::new("shop", "checkout")];
        assert_eq!(checkout.ports, [80]);
        let eps: Vec<(String, &str, bool)> = checkout
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.zone.as_str(), e.healthy))
            .collect();
        assert_eq!(
            eps,
            [
                ("10.0.0.1:8080".to_string(), "az1", true),
                ("10.0.0.2:8080".to_string(), "az2", false),
                ("10.0.0.3:8080".to_string(), "az2", false),
                ("10.0.0.4:8080".to_string(), UNKNOWN_ZONE, true),
            ]
        );
        let Verdict::Exported { note } = &s.verdicts[&ServiceKey::new("shop", "checkout")] else {
            panic!("checkout should be exported");
        };
        assert!(
            note.contains("port 80 only") && note.contains("9090"),
            "{note}"
        );
        assert!(note.contains("1 endpoints left out"), "{note}");

        assert!(!s.services.contains_key(&ServiceKey::new("shop", "cart")));
        assert!(matches!(
            s.verdicts[&ServiceKey::new("shop", "ghost")],
            Verdict::Invalid {
                reason: "ServiceNotFound",
                ..
            }
        ));
        assert!(matches!(
            s.verdicts[&ServiceKey::new("shop", "dns")],
            Verdict::Invalid {
                reason: "NoTCPPort",
                ..
            }
        ));
        assert_eq!(s.services.len(), 1);
    }

    #[test]
    fn an_export_without_endpoints_is_exported_with_none() {
        let services = mirror(vec![service("cart", &[("", 8080, "TCP")])]);
        let s = summarise(&services, &mirror(vec![]), &mirror(vec![export("cart")]));
        let cart = &s.services[&ServiceKey::new("shop", "cart")];
        assert!(cart.endpoints.is_empty());
        assert_eq!(
            s.verdicts[&ServiceKey::new("shop", "cart")],
            Verdict::Exported {
                note: String::new()
            }
        );
    }
}
