//! fedmesh on Kubernetes, for the federation controller:
//!
//! - [`source`]: a local discovery source from the Multi-Cluster Services
//!   API (`ServiceExport`) with Services and EndpointSlices, and each
//!   export's `Valid` and `Conflict` conditions;
//! - [`imports`]: a `ServiceImport` per service of the clusterset;
//! - [`review`]: ServiceAccount tokens checked by `TokenReview`, so that
//!   proxies bootstrap without join tokens.
//!
//! The cores are I/O-free: [`mirror`] (a kind's objects across relists),
//! [`summary`] (objects to exports), [`conditions`]. The data plane never
//! links this crate.

pub mod conditions;
pub mod imports;
pub mod mcs;
pub mod mirror;
pub mod review;
pub mod source;
pub mod summary;

pub use imports::{Import, Imports};
pub use review::{ReviewError, ServiceAccount, TokenReviewer};
pub use source::{Conflicts, KubeSource};

/// A client from the in-cluster configuration or a kubeconfig (`KUBECONFIG`,
/// then `~/.kube/config`), as kubectl finds one.
pub async fn client() -> Result<kube::Client, kube::Error> {
    kube::Client::try_default().await
}
