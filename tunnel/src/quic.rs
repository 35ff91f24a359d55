//! QUIC with mutual TLS for the tunnel, on both of its ends: SVIDs read
//! from watch channels at each handshake (rotations apply to new
//! connections, live ones are left alone), the UDP socket, and what a
//! failed handshake is called in metrics. The transport's windows and
//! limits are the caller's (a gateway's are not a proxy's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_trust::tls::ALPN_TUNNEL;
use fedmesh_trust::{AllowIds, Authorizer, BundleSet, SpiffeId, Svid};
use quinn::TransportConfig;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum QuicConfigError {
    #[error(transparent)]
    Tls(#[from] fedmesh_trust::tls::TlsConfigError),
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(String),
    #[error("idle timeout {0:?} is out of range")]
    IdleTimeout(Duration),
}

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

/// How a tunnel end sizes its QUIC connections: a gateway's carry a
/// cluster's traffic, a proxy's one workload's.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub keep_alive: Duration,
    /// A peer silent this long is dead.
    pub idle_timeout: Duration,
    /// Streams the peer may open at once (0: it never opens any).
    pub incoming_streams: u32,
    pub stream_window: u32,
    /// Receive and send windows, shared by a connection's streams.
    pub connection_window: u32,
    /// The ceiling of path MTU discovery.
    pub max_udp_payload: u16,
}

/// The transport `sizing` describes.
pub fn transport(sizing: &Sizing) -> Result<TransportConfig, QuicConfigError> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(sizing.keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(sizing.idle_timeout)
            .map_err(|_| QuicConfigError::IdleTimeout(sizing.idle_timeout))?,
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(sizing.incoming_streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(sizing.stream_window));
    t.receive_window(quinn::VarInt::from_u32(sizing.connection_window));
    t.send_window(u64::from(sizing.connection_window));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(sizing.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// A client-only endpoint (a proxy's): bound to `addr`, serving nothing,
/// receiving UDP payloads of at most `max_udp_payload` bytes. quinn sizes
/// its receive buffer by that (64 KiB a datagram by default, times the
/// datagrams one read may return): a proxy needs a fraction of it.
pub fn client_endpoint(addr: SocketAddr, max_udp_payload: u16) -> std::io::Result<quinn::Endpoint> {
    let socket = bind_udp(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for quinn"))?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(max_udp_payload)
        .map_err(|e| std::io::Error::other(format!("maxUdpPayload: {e}")))?;
    quinn::Endpoint::new(config, None, socket, runtime)
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

/// A short label for why a QUIC handshake failed, from the TLS alert that
/// ended it where there was one.
pub fn handshake_reason(e: &quinn::ConnectionError) -> &'static str {
    use quinn::ConnectionError as E;
    let code = match e {
        E::TimedOut => return "timeout",
        E::VersionMismatch => return "version",
        E::Reset => return "reset",
        E::ApplicationClosed(_) | E::LocallyClosed => return "closed",
        E::CidsExhausted => return "other",
        E::ConnectionClosed(c) => c.error_code,
        E::TransportError(t) => t.code,
    };
    // QUIC carries TLS alerts as transport errors 0x100 + alert (RFC 9001).
    match u64::from(code).checked_sub(0x100) {
        // bad_certificate, unsupported, revoked, expired, unknown, unknown_ca,
        // decrypt_error (a chain signed by the wrong key), certificate_required.
        Some(42..=46 | 48 | 51 | 116) => "certificate",
        Some(120) => "alpn",
        Some(0..=255) => "tls",
        _ => "transport",
    }
}

/// Application error codes for QUIC stream resets and stops.
pub mod code {
    use quinn::VarInt;
    /// The other side of the splice failed.
    pub const ABORTED: VarInt = VarInt::from_u32(1);
    /// No byte either way for the stream idle timeout.
    pub const IDLE: VarInt = VarInt::from_u32(2);
    /// The header was not a valid frame, or did not arrive in time.
    pub const BAD_HEADER: VarInt = VarInt::from_u32(3);
    /// The gateway is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// The stream was refused; its pipelined bytes are not wanted.
    pub const REFUSED: VarInt = VarInt::from_u32(5);
    /// (A connection's) peer no longer verifies: its cluster left, its
    /// bundle changed, or its certificate expired.
    pub const REVOKED: VarInt = VarInt::from_u32(6);
    /// The peer's cluster holds `maxConnectionsPerPeer` connections here
    /// already.
    pub const TOO_MANY: VarInt = VarInt::from_u32(7);
}

/// Refuses a QUIC stream that never sent a valid header: reset both ways.
pub fn reset_stream(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    why: quinn::VarInt,
) {
    let _ = send.reset(why);
    let _ = recv.stop(why);
}
