//! fedmesh's protobuf APIs, generated at build time from `proto/`.
//!
//! - `discovery::v1`: the controller's discovery stream and `Certify` RPC,
//!   served to local proxies and gateways.
//! - `tunnel::v1`: the `TunnelOpen`/`TunnelAccept` header of the tunnel
//!   protocol between proxies and gateways.

#![allow(missing_debug_implementations, clippy::all)] // Generated code.

pub mod discovery {
    pub mod v1 {
        tonic::include_proto!("fedmesh.discovery.v1");
    }
}

pub mod tunnel {
    pub mod v1 {
        tonic::include_proto!("fedmesh.tunnel.v1");
    }
}
