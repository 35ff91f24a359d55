//! The gateway's QUIC transport: liveness, stream limits and flow-control
//! windows sized for a gateway. TLS configs and the UDP socket are the
//! tunnel's ([`fedmesh_tunnel::quic`]), shared with every QUIC client.

use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

use crate::config::Settings;

pub use fedmesh_tunnel::quic::{
    QuicConfigError, UDP_BUFFER, bind_udp, client_config, handshake_reason, server_config,
};

/// Per-stream receive window: enough for one stream to fill a
/// 100 ms × 1 Gbit/s path by itself.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-connection receive window, shared by all streams to one peer.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

pub fn transport(settings: &Settings) -> Result<TransportConfig, QuicConfigError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(settings.keep_alive));
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(settings.idle_timeout)
            .map_err(|_| QuicConfigError::IdleTimeout(settings.idle_timeout))?,
    ));
    // Above the per-peer limit, so that the ingress can answer OVERLOADED
    // instead of the opener blocking for stream credit.
    t.max_concurrent_bidi_streams(VarInt::from_u32(
        settings.max_streams_per_peer.saturating_add(64),
    ));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(settings.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}
