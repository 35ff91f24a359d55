//! fedmesh's shared domain types: what a cluster record, an export summary and
//! a liveness record look like in the global zone, and where each one lives in
//! etcd. Values are JSON (camelCase) so that `etcdctl get` shows them readably.
//!
//! I/O-free by design: no etcd client, no sockets. The controller and the
//! operator's command do the I/O; everything else depends on these types.

pub mod keys;
pub mod local;
pub mod names;
pub mod policy;
pub mod records;
pub mod retry;

pub use keys::{DEFAULT_PREFIX, GlobalKey, KeySpace};
pub use local::{
    Endpoint, ListedEndpoint, ListedService, LocalService, LocalServices, RegistryFile, ServiceKey,
};
pub use names::{NameError, validate_label};
pub use records::{
    AliveRecord, ClusterRecord, EgressMode, ExportSummary, GatewayAddress, Liveness, SeenRecord,
    ZoneCapacity, validate_locality, validate_ports,
};
