//! fedmesh's east-west gateway: carries traffic between clusters as mutual
//! TLS over QUIC.
//!
//! - **Ingress**: peer gateways connect over QUIC with their gateway SVIDs,
//!   each verified against its own trust domain's bundle. Every
//!   bidirectional stream opens with a `TunnelOpen`; the gateway admits or
//!   refuses it before any application byte flows, connects to a healthy
//!   local endpoint (own zone first) and splices.
//! - **Egress**: local proxies connect over TCP+TLS with their SVIDs; the
//!   egress forwards their `TunnelOpen` on a pooled QUIC connection to a
//!   gateway of the target cluster, moving to the cluster's next gateway
//!   when one refuses or is dead.
//!
//! The protocol logic is I/O-free: [`frame`] (the header), [`routes`]
//! (admission and endpoint ranking) and [`backoff`] (reconnect backoff).
//! The egress's QUIC client is the tunnel crate's [`PeerPool`], which the
//! proxy uses too; the gateway gives it its routes and metrics.
//! [`Gateway`] drives them with tokio and quinn. Where routes come from
//! (the controller's discovery stream, or a static file: [`config`]) is the
//! caller's business; this crate depends on neither etcd nor kube.

pub mod config;
pub mod discovered;
mod egress;
mod gateway;
mod ingress;
pub mod metrics;
pub mod quic;
pub mod routes;
pub mod splice;
pub mod validate;

/// The tunnel header, and the QUIC client's backoff and DNS, shared with
/// the proxy.
pub use fedmesh_tunnel::{backoff, dns, frame};

pub use config::{Settings, StaticConfig};
pub use fedmesh_tunnel::pool::{Opened, PeerPool};
pub use gateway::{DRAIN_IDLE, Gateway, GatewayOptions, StartError};
pub use metrics::Metrics;
pub use routes::Routes;
