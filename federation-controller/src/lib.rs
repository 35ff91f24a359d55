//! The federation controller: one per cluster.
//!
//! - [`zone`]: the global zone's schema on etcd: registration (one
//!   transaction), deregistration, per-cluster etcd roles, paginated reads.
//! - [`registry`]: local discovery sources (the file registry).
//! - [`publish`]: this cluster's export summaries and its liveness lease.
//! - [`view`] and [`watcher`]: everyone else's records, listed then watched,
//!   with resume and re-list after compaction. `view` is I/O-free.
//! - [`mesh`]: what a local proxy sees, and which services a change touches.
//!   I/O-free.
//! - [`discovery`]: the gRPC discovery stream (incremental, ACK/NACK) and
//!   `Certify`, over mutual TLS; [`admin`]: metrics, `/ready`, `/live`.
//! - [`controller`]: wires these into a running controller; [`join`]: the
//!   join directory `fedmesh register cluster` writes.
//!
//! It does not own the data plane: proxies and gateways never talk to etcd,
//! and a controller that loses etcd keeps serving its last view.

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
