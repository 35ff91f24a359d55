//! What a client's admin port tells of its discovery state: the services it
//! has skipped, and how long ago each remote cluster was last seen alive.
//! The age is computed at scrape time, so it keeps growing while a cluster
//! stays unverified and nothing else changes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::sync::watch;

use crate::state::MeshState;

/// One remote cluster's liveness, as the controller last reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLiveness {
    pub cluster: String,
    /// Its `alive` key is present.
    pub verified: bool,
    /// When unverified: when it was last seen alive, if known.
    pub last_seen: Option<SystemTime>,
}

impl PeerLiveness {
    /// 0 while verified; the time since it was last seen otherwise (`None`
    /// when that is unknown).
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        if self.verified {
            return Some(Duration::ZERO);
        }
        self.last_seen
            .map(|t| now.duration_since(t).unwrap_or_default())
    }
}

/// The discovery state a client's metrics show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStatus {
    /// The version applied last.
    pub version: String,
    /// `namespace/name` → why it was skipped.
    pub rejected: Vec<(String, String)>,
    pub peers: Vec<PeerLiveness>,
}

impl SyncStatus {
    pub fn of(m: &MeshState) -> Self {
        Self {
            version: m.version_info.clone(),
            rejected: m
                .rejected
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            peers: m
                .peers
                .values()
                .map(|p| PeerLiveness {
                    cluster: p.cluster.clone(),
                    verified: p.verified,
                    last_seen: (!p.verified && p.last_seen_unix_ms > 0).then(|| {
                        SystemTime::UNIX_EPOCH + Duration::from_millis(p.last_seen_unix_ms)
                    }),
                })
                .collect(),
        }
    }
}

/// A prometheus-client collector over a client's [`SyncStatus`].
#[derive(Debug)]
pub struct StatusMetrics(pub watch::Receiver<Arc<SyncStatus>>);

impl Collector for StatusMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.0.borrow().clone();
        let now = SystemTime::now();
        let rejected = ConstGauge::new(status.rejected.len() as i64);
        rejected.encode(encoder.encode_descriptor(
            "fedmesh_discovery_rejected_services",
            "Services of the last discovery update that could not be accepted (each keeps its last good value)",
            None,
            rejected.metric_type(),
        )?)?;
        per_cluster(
            &mut encoder,
            "fedmesh_remote_cluster_verified",
            "1 while a remote cluster's liveness key is present; 0 while it is unverified (still served at its last known capacity)",
            status
                .peers
                .iter()
                .map(|p| (&*p.cluster, i64::from(p.verified))),
        )?;
        per_cluster(
            &mut encoder,
            "fedmesh_remote_cluster_liveness_age_seconds",
            "Seconds since a remote cluster was last seen alive: 0 while verified; absent when never seen",
            status
                .peers
                .iter()
                .filter_map(|p| Some((&*p.cluster, p.age(now)?.as_secs_f64()))),
        )?;
        Ok(())
    }
}

/// One gauge family labelled by `cluster`.
fn per_cluster<'a, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a str, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (cluster, v) in values {
        ConstGauge::new(v).encode(family.encode_family(&[("cluster", cluster)])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_proto::discovery::v1 as pb;

    #[test]
    fn a_stale_clusters_age_grows_from_its_last_sighting() {
        let mut m = MeshState::default();
        m.peers.insert(
            "gcp".into(),
            pb::PeerCluster {
                cluster: "gcp".into(),
                verified: false,
                last_seen_unix_ms: 1_000_000,
                ..Default::default()
            },
        );
        m.peers.insert(
            "azure".into(),
            pb::PeerCluster {
                cluster: "azure".into(),
                verified: true,
                ..Default::default()
            },
        );
        m.peers.insert(
            "ghost".into(),
            pb::PeerCluster {
                cluster: "ghost".into(),
                ..Default::default()
            },
        );
        let s = SyncStatus::of(&m);
        let at = |c: &str| s.peers.iter().find(|p| p.cluster == c).unwrap().clone();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_120);
        assert_eq!(at("gcp").age(now), Some(Duration::from_secs(120)));
        assert_eq!(at("azure").age(now), Some(Duration::ZERO));
        assert_eq!(at("ghost").age(now), None);

        let mut registry = prometheus_client::registry::Registry::default();
        let (_tx, rx) = watch::channel(Arc::new(s));
        registry.register_collector(Box::new(StatusMetrics(rx)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("fedmesh_remote_cluster_verified{cluster=\"gcp\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fedmesh_remote_cluster_verified{cluster=\"azure\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fedmesh_remote_cluster_liveness_age_seconds{cluster=\"gcp\"}"),
            "{text}"
        );
        assert!(
            !text.contains("liveness_age_seconds{cluster=\"ghost\"}"),
            "{text}"
        );
    }
}
