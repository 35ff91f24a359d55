//! What the proxy counts, by destination service, cluster, zone and
//! outcome. Registered into a prometheus-client registry served on the
//! admin port.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            attempts: Family::default(),
            tcp_connections: Family::default(),
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
    }
}
