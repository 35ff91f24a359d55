//! The global zone's client, shared by the controller and the `fedmesh`
//! command without either linking the other's servers:
//!
//! - [`access`]: how every process reaches etcd (TLS, or plaintext to a
//!   loopback etcd only when asked), one set of rules and errors;
//! - [`client`]: [`GlobalZone`], registration and deregistration (each one
//!   etcd transaction guarded by revisions), per-cluster etcd roles, typed
//!   reads and liveness;
//! - [`join`]: the join directory `fedmesh register cluster` writes and
//!   `fedmesh-controller --join` reads;
//! - [`tokens`]: join tokens (hashed, expiring, optionally single-use);
//! - [`gate`]: what a reader believes of the signed global zone, I/O-free;
//! - [`dump`]: the zone written down as signed (a controller's last good
//!   view, `fedmesh zone backup`), believed only through a gate;
//! - [`backup`]: `fedmesh zone backup|restore` on a live etcd;
//!   [`adopt`]: `fedmesh anchor adopt`, every record signed again.
//!
//! The key layout is in `fedmesh-api` (ARCHITECTURE.md §3.1).

pub mod access;
pub mod adopt;
pub mod backup;
pub mod client;
pub mod dump;
pub mod gate;
pub mod join;
pub mod policies;
pub mod tokens;

pub use access::{AccessError, EtcdTls, check_endpoints, connect_options, rbac_advisories};
pub use client::{
    Believed, GlobalZone, Pager, RECORD_KINDS, RawEvent, RawKv, RegisterOutcome, ZoneError,
    cluster_role, decode_bundle, list_range,
};
pub use join::{EtcdAccess, JoinDir};
pub use policies::{HistoryEntry, PolicyChange, PolicyHistory, StoredPolicies, StoredPolicy};
pub use tokens::{Refusal, TokenEntry, TokensError, TokensFile};
