//! What the proxy counts, by destination service, cluster, zone and
//! outcome. Registered into a prometheus-client registry served on the
//! admin port.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use fedmesh_tunnel::pool::PoolEvents;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/name`.
    pub service: String,
    /// Where the final attempt went: a cluster name, or "" when no attempt
    /// was made (unknown service, breaker tripped, nothing healthy).
    pub cluster: String,
    /// The local endpoint's zone; "" for a remote cluster.
    pub zone: String,
    /// `success` (below 500), `http_5xx` (the upstream's 5xx), or what the
    /// proxy answered for: `unknown_service`, `overloaded`,
    /// `no_healthy_upstream`, `upstream_failed`, `timeout`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AttemptLabels {
    pub service: String,
    pub cluster: String,
    /// `ok`, or why the attempt failed (`unreachable`, `connect_timeout`,
    /// a tunnel refusal such as `no_healthy_endpoints`, `reset`,
    /// `try_timeout`, `http_5xx`).
    pub result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    pub service: String,
    pub cluster: String,
    pub outcome: &'static str,
}

/// A remote cluster's gateway this proxy holds a QUIC connection to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GatewayLabels {
    pub cluster: String,
    pub gateway: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub cluster: String,
    /// `timeout`, `refused`, `certificate`, ... (a failed QUIC handshake).
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~26 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 19,
    ))
}

#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    /// Direct egress: 1 while a QUIC connection to a remote gateway lives.
    pub gateway_up: Family<GatewayLabels, Gauge>,
    pub gateway_rtt: Family<GatewayLabels, Gauge<f64, AtomicU64>>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            attempts: Family::default(),
            tcp_connections: Family::default(),
            gateway_up: Family::default(),
            gateway_rtt: Family::default(),
            handshake_failures: Family::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("fedmesh_proxy");
        r.register(
            "requests",
            "HTTP requests by destination and outcome",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency until the response headers, retries included",
            self.request_seconds.clone(),
        );
        r.register(
            "attempts",
            "Attempts (first tries, failovers and retries) by target cluster and result",
            self.attempts.clone(),
        );
        r.register(
            "tcp_connections",
            "Proxied TCP connections by destination and outcome",
            self.tcp_connections.clone(),
        );
        r.register(
            "gateway_up",
            "1 while a QUIC connection to a remote cluster's gateway is up (direct egress)",
            self.gateway_up.clone(),
        );
        r.register(
            "gateway_rtt_seconds",
            "Smoothed round trip to a remote cluster's gateway (direct egress)",
            self.gateway_rtt.clone(),
        );
        r.register(
            "gateway_handshake_failures",
            "Failed QUIC handshakes with remote gateways, by cluster and reason",
            self.handshake_failures.clone(),
        );
    }
}

/// The QUIC pool (direct egress) reports here.
impl PoolEvents for Metrics {
    fn peer_up(&self, cluster: &str, gateway: SocketAddr, up: bool) {
        self.gateway_up
            .get_or_create(&GatewayLabels::of(cluster, gateway))
            .set(i64::from(up));
    }

    fn rtt(&self, cluster: &str, gateway: SocketAddr, rtt: Duration) {
        self.gateway_rtt
            .get_or_create(&GatewayLabels::of(cluster, gateway))
            .set(rtt.as_secs_f64());
    }

    fn handshake_failed(&self, cluster: &str, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                cluster: cluster.into(),
                reason,
            })
            .inc();
    }

    fn forget(&self, cluster: &str, gateway: SocketAddr) {
        let labels = GatewayLabels::of(cluster, gateway);
        self.gateway_up.remove(&labels);
        self.gateway_rtt.remove(&labels);
    }
}

impl GatewayLabels {
    fn of(cluster: &str, gateway: SocketAddr) -> Self {
        Self {
            cluster: cluster.into(),
            gateway: gateway.to_string(),
        }
    }
}
