//! A cluster's own services, as its local discovery sources report them.
//! Unlike the global zone's summaries, these carry every endpoint.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `namespace/name` of a service. Serialised as that string, so that it can
/// key a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::str::FromStr for ServiceKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(format!("service {s:?}: expected namespace/name")),
        }
    }
}

impl Serialize for ServiceKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServiceKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One backend instance of a local service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub zone: String,
    pub healthy: bool,
}

/// A local service with all its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalService {
    pub ports: Vec<u16>,
    pub endpoints: Vec<Endpoint>,
}

/// An endpoint as a config file lists it, before its checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedEndpoint {
    pub address: String,
    pub zone: String,
    #[serde(default = "healthy_by_default")]
    pub healthy: bool,
}

fn healthy_by_default() -> bool {
    true
}

/// The file registry's document (`fedmesh-controller --registry`): a
/// cluster's services, as an operator or `fedmesh up` writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    #[serde(default)]
    pub services: Vec<ListedService>,
}

/// One service of a [`RegistryFile`], before its checks
/// ([`LocalService::from_listed`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedService {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<u16>,
    #[serde(default)]
    pub endpoints: Vec<ListedEndpoint>,
}

impl LocalService {
    /// Checks a service's listed ports and endpoints. An error names the
    /// field relative to the service: `ports: …`, `endpoints[1].address: …`.
    pub fn from_listed(
        ports: Vec<u16>,
        listed: impl IntoIterator<Item = ListedEndpoint>,
    ) -> Result<Self, String> {
        if ports.is_empty() || ports.contains(&0) {
            return Err("ports: list one or more ports from 1 to 65535".into());
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (j, e) in listed.into_iter().enumerate() {
            let at = format!("endpoints[{j}]");
            let address: SocketAddr = e
                .address
                .parse()
                .map_err(|_| format!("{at}.address: {:?} is not an ip:port address", e.address))?;
            crate::validate_label("zone", &e.zone).map_err(|err| format!("{at}: {err}"))?;
            if endpoints.iter().any(|x| x.address == address) {
                return Err(format!("{at}.address: {address} is listed twice"));
            }
            endpoints.push(Endpoint {
                address,
                zone: e.zone,
                healthy: e.healthy,
            });
        }
        Ok(Self { ports, endpoints })
    }
}

/// Everything a local discovery source reports, by service.
pub type LocalServices = BTreeMap<ServiceKey, LocalService>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_are_namespace_slash_name_strings() {
        let k = ServiceKey::new("shop", "cart");
        assert_eq!(serde_json::to_string(&k).unwrap(), "\"shop/cart\"");
        let map = BTreeMap::from([(k.clone(), 1)]);
        assert_eq!(serde_json::to_string(&map).unwrap(), "{\"shop/cart\":1}");
        assert_eq!(
            serde_json::from_str::<ServiceKey>("\"shop/cart\"").unwrap(),
            k
        );
        for bad in ["\"shop\"", "\"/cart\"", "\"a/b/c\""] {
            assert!(serde_json::from_str::<ServiceKey>(bad).is_err(), "{bad}");
        }
    }
}
