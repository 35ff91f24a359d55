//! The proxy's QUIC client towards remote gateways (`egress: direct`): the
//! tunnel's pool ([`fedmesh_tunnel::pool`]) on one UDP socket, with a
//! transport sized for a proxy: a proxy holds a handful of connections and
//! carries one workload's traffic, where a gateway carries a cluster's.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_trust::{BundleSet, Svid};
use fedmesh_tunnel::backoff::BackoffPolicy;
use fedmesh_tunnel::peers::Watched;
use fedmesh_tunnel::pool::{PeerPool, PoolOptions};
use fedmesh_tunnel::quic::{QuicConfigError, Sizing};
use quinn::TransportConfig;
use tokio::sync::watch;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::table::Table;

/// Per-stream receive window: one stream fills a 10 ms × 800 Mbit/s path.
/// A proxy's streams are one app connection each; most carry far less.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Per-connection receive and send windows, shared by all streams to one
/// gateway. Buffers grow only as data waits, so these bound the worst case
/// rather than cost memory up front.
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;

/// A connection to a gateway this proxy has not opened a stream on for
/// this long is let go (after its last stream): a proxy that once called a
/// cluster must not keep pinging its gateways for ever.
pub const IDLE_RELEASE: Duration = Duration::from_secs(300);

/// The proxy's QUIC transport.
pub fn transport(settings: &Settings) -> Result<TransportConfig, QuicConfigError> {
    fedmesh_tunnel::quic::transport(&Sizing {
        keep_alive: settings.quic_keep_alive,
        idle_timeout: settings.quic_idle_timeout,
        // Gateways never open streams towards a proxy.
        incoming_streams: 0,
        stream_window: STREAM_WINDOW,
        connection_window: CONNECTION_WINDOW,
        max_udp_payload: settings.max_udp_payload,
    })
}

/// The pool of QUIC connections to remote gateways, on a UDP socket bound
/// to `settings.sourceAddress` (any address when absent). Where the
/// gateways are is read from the table at each stream.
pub fn pool(
    settings: &Settings,
    transport: TransportConfig,
    table: watch::Receiver<Arc<Table>>,
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    metrics: Arc<Metrics>,
) -> std::io::Result<PeerPool> {
    let ip = settings
        .source_address
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let endpoint =
        fedmesh_tunnel::quic::client_endpoint(SocketAddr::new(ip, 0), settings.max_udp_payload)?;
    Ok(PeerPool::new(
        PoolOptions {
            svid,
            bundles,
            backoff: BackoffPolicy::default(),
            drain_timeout: settings.drain_timeout,
            dns_servers: settings.dns_servers.clone(),
            idle_release: Some(IDLE_RELEASE),
        },
        Arc::new(Watched(table)),
        metrics,
        endpoint,
        Arc::new(transport),
    ))
}
