//! The federation controller: one per cluster.
//!
//! The global zone's client (registration, roles, typed reads, the join
//! directory) is `fedmesh-zone`, shared with the `fedmesh` command.
//!
//! - [`registry`]: local discovery sources (the file registry).
//! - [`publish`]: this cluster's export summaries and its liveness lease.
//! - [`view`] and [`watcher`]: everyone else's records, listed then watched,
//!   with resume and re-list after compaction. `view` is I/O-free.
//! - [`lastgood`]: the last good view, kept on disk and read back through
//!   the gate at start, so a restart against an empty or partial zone
//!   withdraws nothing.
//! - [`mesh`]: what a local proxy sees, and which services a change touches.
//!   I/O-free.
//! - [`discovery`]: the gRPC discovery stream (incremental, ACK/NACK) and
//!   `Certify`, over mutual TLS; [`admin`]: metrics, `/ready`, `/live`.
//! - [`tokens`]: join tokens, re-read as their file changes, single-use
//!   ones spent on disk first.
//! - [`rotation`]: takes up a CA rotation staged in the join directory,
//!   and publishes the cluster's bundle as its roots change.
//! - [`controller`]: wires these into a running controller.
//!
//! It does not own the data plane: proxies and gateways never talk to etcd,
//! and a controller that loses etcd keeps serving its last view.

pub mod admin;
pub mod controller;
pub mod discovery;
mod follow;
pub mod guard;
pub mod kubernetes;
pub mod lastgood;
pub mod mesh;
pub mod publish;
pub mod registry;
pub mod rotation;
pub mod tokens;
pub mod view;
pub mod watcher;
