//! The gateway's QUIC transport: liveness, stream limits and flow-control
//! windows sized for a gateway. TLS configs and the UDP socket are the
//! tunnel's ([`fedmesh_tunnel::quic`]), shared with every QUIC client.

use fedmesh_tunnel::quic::Sizing;
use quinn::TransportConfig;

use crate::config::Settings;

pub use fedmesh_tunnel::quic::{QuicConfigError, bind_udp, client_config, server_config};

/// Per-stream receive window: enough for one stream to fill a
/// 100 ms × 1 Gbit/s path by itself.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-connection receive window, shared by all streams to one peer.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

pub fn transport(settings: &Settings) -> Result<TransportConfig, QuicConfigError> {
    fedmesh_tunnel::quic::transport(&Sizing {
        keep_alive: settings.keep_alive,
        idle_timeout: settings.idle_timeout,
        // Above the per-peer limit, so that the ingress can answer
        // OVERLOADED instead of the opener blocking for stream credit.
        incoming_streams: settings.max_streams_per_peer.saturating_add(64),
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_udp_payload: settings.max_udp_payload,
    })
}
