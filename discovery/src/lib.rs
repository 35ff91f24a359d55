//! The data plane's client of its controller: [`start`] gets an SVID
//! through `Certify`, keeps it renewed, follows the discovery stream, and
//! publishes the last good config as a `watch` channel. Gateways and
//! proxies use it; it never talks to etcd.
//!
//! - [`state`]: the client's copy of the mesh. I/O-free.
//! - [`client`]: the drivers.
//! - [`files`]: what a component's config file needs from disk to reach
//!   its controller.
//! - [`status`]: the metrics a client shows of its discovery state.

pub mod client;
pub mod state;
pub mod status;

pub use client::{
    ClientError, ClientPolicy, ControllerAccess, Convert, Credential, Discovered, OnDemand,
    certify, channel, start,
};
pub use state::{MeshState, check_service, local_endpoints, service_policy, service_ports};
pub use status::{PeerLiveness, StatusMetrics, SyncStatus};
