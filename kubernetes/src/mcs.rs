//! The Multi-Cluster Services API's two kinds (KEP-1645,
//! `multicluster.x-k8s.io/v1alpha1`), as far as fedmesh reads and writes
//! them. Unknown fields are kept out of our types and left alone on the
//! server: status writes are merge patches of the fields we own.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::Resource;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "multicluster.x-k8s.io";
pub const VERSION: &str = "v1alpha1";

/// `ServiceExport`: "export the Service of this name in this namespace".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceExport {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceExportStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceExportStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// `ServiceImport`: a service of the clusterset, so that
/// `<svc>.<ns>.svc.clusterset.local` names something here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceImport {
    pub metadata: ObjectMeta,
    pub spec: ServiceImportSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceImportStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceImportSpec {
    pub ports: Vec<ServicePort>,
    /// `ClusterSetIP` or `Headless`; fedmesh writes `ClusterSetIP`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: String,
    pub port: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceImportStatus {
    #[serde(default)]
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster: String,
}

macro_rules! mcs_resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

mcs_resource!(ServiceExport, "ServiceExport", "serviceexports");
mcs_resource!(ServiceImport, "ServiceImport", "serviceimports");
