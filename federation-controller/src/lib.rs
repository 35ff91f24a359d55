//! The federation controller: one per cluster. It owns the global zone's
//! schema on etcd ([`zone`]): registering clusters, their trust bundles and
//! per-cluster etcd roles, and reading everyone's records back.
//!
//! It does not own the data plane: proxies and gateways never talk to etcd.

pub mod admin;
pub mod controller;
pub mod discovery;
pub mod join;
pub mod mesh;
pub mod publish;
pub mod registry;
pub mod view;
pub mod watcher;
pub mod zone;

pub use zone::{GlobalZone, RegisterOutcome, ZoneError};
