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
