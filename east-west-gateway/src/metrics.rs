//! What the gateway counts, labelled by peer cluster. Registered into a
//! prometheus-client registry served on the admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fedmesh_tunnel::pool::PoolEvents;

/// `ingress`: streams from peer gateways; `egress`: streams from local
/// proxies towards peers.
pub type Direction = &'static str;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StreamLabels {
    pub direction: Direction,
    pub peer_cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub peer_cluster: String,
    pub status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BytesLabels {
    pub peer_cluster: String,
    /// `to_peer` or `from_peer`: over QUIC, as this gateway sees it.
    pub flow: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GatewayLabels {
    pub peer_cluster: String,
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: Direction,
    /// "unknown" for an inbound handshake that failed before the peer's
    /// certificate was verified.
    pub peer_cluster: String,
    pub reason: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub streams_opened: Family<StreamLabels, Counter>,
    pub streams_active: Family<StreamLabels, Gauge>,
    pub streams_refused: Family<RefusalLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub rtt_seconds: Family<GatewayLabels, Gauge<f64, AtomicU64>>,
    pub peer_up: Family<GatewayLabels, Gauge>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub address_validations: Counter,
}

impl Metrics {
    pub fn register(self: &std::sync::Arc<Self>, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("fedmesh_gateway");
        r.register(
            "streams_opened",
            "Tunnel streams opened (accepted), by direction and peer cluster",
            self.streams_opened.clone(),
        );
        r.register(
            "streams_active",
            "Tunnel streams open now",
            self.streams_active.clone(),
        );
        r.register(
            "streams_refused",
            "Tunnel streams refused, by TunnelAccept status",
            self.streams_refused.clone(),
        );
        r.register(
            "bytes",
            "Application bytes relayed over QUIC, by peer cluster",
            self.bytes.clone(),
        );
        r.register(
            "rtt_seconds",
            "Smoothed RTT of the QUIC connection to each peer gateway",
            self.rtt_seconds.clone(),
        );
        r.register(
            "peer_up",
            "1 while the egress holds a live connection to the peer gateway",
            self.peer_up.clone(),
        );
        r.register(
            "handshake_failures",
            "QUIC/TLS handshakes that failed, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "address_validations",
            "New connections sent a QUIC Retry to prove their address",
            self.address_validations.clone(),
        );
    }

    pub fn refused(&self, direction: Direction, peer_cluster: &str, status: &'static str) {
        self.streams_refused
            .get_or_create(&RefusalLabels {
                direction,
                peer_cluster: peer_cluster.into(),
                status,
            })
            .inc();
    }

    pub fn handshake_failed(&self, direction: Direction, peer_cluster: &str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                direction,
                peer_cluster: peer_cluster.into(),
                reason,
            })
            .inc();
    }
}

/// The egress's QUIC client reports into the gateway's metrics.
impl PoolEvents for Metrics {
    fn peer_up(&self, cluster: &str, gateway: SocketAddr, up: bool) {
        self.peer_up
            .get_or_create(&GatewayLabels::of(cluster, gateway))
            .set(i64::from(up));
    }

    fn rtt(&self, cluster: &str, gateway: SocketAddr, rtt: Duration) {
        self.rtt_seconds
            .get_or_create(&GatewayLabels::of(cluster, gateway))
            .set(rtt.as_secs_f64());
    }

    fn handshake_failed(&self, cluster: &str, reason: &'static str) {
        Metrics::handshake_failed(self, "egress", cluster, reason);
    }

    fn forget(&self, cluster: &str, gateway: SocketAddr) {
        let labels = GatewayLabels::of(cluster, gateway);
        self.peer_up.remove(&labels);
        self.rtt_seconds.remove(&labels);
    }
}

impl GatewayLabels {
    fn of(cluster: &str, gateway: SocketAddr) -> Self {
        Self {
            peer_cluster: cluster.into(),
            gateway: gateway.to_string(),
        }
    }
}
