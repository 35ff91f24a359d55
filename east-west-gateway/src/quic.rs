//! quinn configuration: mutual TLS with SVIDs, liveness, stream limits and
//! flow-control windows. Certificates and bundles are read from watch
//! channels at each handshake, so rotations apply to new connections
//! without a restart, and live connections are left alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_trust::tls::ALPN_TUNNEL;
use fedmesh_trust::{AllowIds, Authorizer, BundleSet, SpiffeId, Svid};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use tokio::sync::watch;

use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum QuicConfigError {
    #[error(transparent)]
    Tls(#[from] fedmesh_trust::tls::TlsConfigError),
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(String),
    #[error("idle timeout {0:?} is out of range")]
    IdleTimeout(Duration),
}

/// Per-stream receive window: enough for one stream to fill a
/// 100 ms × 1 Gbit/s path by itself.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-connection receive window, shared by all streams to one peer.
const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// UDP socket buffers. The kernel's default (about 208 KiB) overflows at a
/// few Gbit/s: every datagram it drops is a loss to QUIC's congestion
/// control, which halves the window. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`.
pub const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// The gateway's UDP socket, with large buffers. Smaller buffers than asked
/// for are reported once, with the sysctl that raises them.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Best effort: a small buffer costs throughput, not correctness.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    // Linux reports double what it grants (its bookkeeping overhead).
    let granted = |size: std::io::Result<usize>| size.unwrap_or(0) / 2;
    for (what, got, sysctl) in [
        (
            "receive",
            granted(socket.recv_buffer_size()),
            "net.core.rmem_max",
        ),
        (
            "send",
            granted(socket.send_buffer_size()),
            "net.core.wmem_max",
        ),
    ] {
        if got < UDP_BUFFER / 2 {
            tracing::warn!(
                wanted = UDP_BUFFER,
                got,
                "small UDP {what} buffer: expect drops, and lower throughput, above a few Gbit/s; raise {sysctl}"
            );
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

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

/// The ingress side: presents our SVID, requires a peer SVID that verifies
/// against its own trust domain's bundle and passes `authorizer`.
pub fn server_config(
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    authorizer: Arc<dyn Authorizer>,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, QuicConfigError> {
    let tls = fedmesh_trust::server_config(svid, bundles, authorizer, &[ALPN_TUNNEL])?;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| QuicConfigError::Quic(e.to_string()))?;
    let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    c.transport_config(transport);
    // Peers behind NATs rebind; clouds move addresses. Keep streams alive.
    c.migration(true);
    Ok(c)
}

/// The egress side, towards one peer gateway: accepts exactly `peer`.
pub fn client_config(
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    peer: SpiffeId,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ClientConfig, QuicConfigError> {
    let tls =
        fedmesh_trust::client_config(svid, bundles, Arc::new(AllowIds::one(peer)), &[ALPN_TUNNEL])?;
    let crypto =
        QuicClientConfig::try_from(tls).map_err(|e| QuicConfigError::Quic(e.to_string()))?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport);
    Ok(c)
}
