//! The admin port: Prometheus metrics, `/ready` and `/live`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::discovery::{DiscoveryStats, Snapshots};
use crate::publish::PublishStats;
use crate::watcher::WatchStats;

/// Everything the controller counts, read at scrape time.
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    pub watch: Arc<WatchStats>,
    pub publish: Arc<PublishStats>,
    pub discovery: Arc<DiscoveryStats>,
    /// etcd's latest revision minus the view's, sampled periodically.
    pub watch_lag_revisions: AtomicI64,
    pub view_revision: AtomicI64,
    /// etcd holds a bundle for our own trust domain with other roots than
    /// our CA files (ignored; a rewrite, or a rotation being published).
    pub foreign_own_bundle: std::sync::atomic::AtomicBool,
    /// The Kubernetes source and `ServiceImport` writer (zero without `--kube`).
    pub kube: Arc<fedmesh_kube::source::SourceStats>,
    pub imports: Arc<fedmesh_kube::imports::ImportStats>,
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for ControllerMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let w = &self.watch;
        counter(
            &mut e,
            "fedmesh_controller_watch_events",
            "etcd watch events received",
            r(&w.events),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_watch_lists",
            "full listings of the global zone",
            r(&w.lists),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_watch_compaction_relists",
            "listings forced by a compacted resume revision",
            r(&w.compaction_relists),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_etcd_errors",
            "failed etcd operations (watch and publish)",
            r(&w.etcd_errors) + r(&self.publish.etcd_errors),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_export_writes",
            "export summaries written or deleted",
            r(&self.publish.writes),
        )?;
        {
            use prometheus_client::metrics::MetricType;
            let refused = w.refused.lock().unwrap_or_else(|p| p.into_inner());
            let mut family = e.encode_descriptor(
                "fedmesh_controller_refused_records",
                "global-zone values the controller did not believe (unsigned, forged, rolled back, invalid, over budget); the last believed value stayed",
                None,
                MetricType::Counter,
            )?;
            for ((kind, cluster, reason), n) in refused.iter() {
                let labels = [
                    ("kind", kind.as_str()),
                    ("cluster", cluster.as_str()),
                    ("reason", reason.as_str()),
                ];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "fedmesh_controller_watch_lag_revisions",
            "etcd's revision minus the last revision applied",
            self.watch_lag_revisions.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut e,
            "fedmesh_controller_view_revision",
            "last etcd revision applied to the view",
            self.view_revision.load(Ordering::Relaxed),
        )?;
        let k = &self.kube;
        for (name, help, v) in [
            (
                "fedmesh_controller_kube_watch_errors",
                "failed Kubernetes watches (each retried, then relisted)",
                r(&k.watch_errors),
            ),
            (
                "fedmesh_controller_kube_listings",
                "completed listings of ServiceExports, Services or EndpointSlices",
                r(&k.listings),
            ),
            (
                "fedmesh_controller_kube_status_writes",
                "ServiceExport conditions written",
                r(&k.status_writes),
            ),
            (
                "fedmesh_controller_kube_status_errors",
                "ServiceExport condition writes that failed",
                r(&k.status_errors),
            ),
            (
                "fedmesh_controller_kube_imports_written",
                "ServiceImports created or updated",
                r(&self.imports.written),
            ),
            (
                "fedmesh_controller_kube_imports_deleted",
                "ServiceImports deleted",
                r(&self.imports.deleted),
            ),
            (
                "fedmesh_controller_kube_import_errors",
                "ServiceImport writes that failed",
                r(&self.imports.errors),
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        let d = &self.discovery;
        counter(
            &mut e,
            "fedmesh_controller_discovery_pushes",
            "snapshots pushed to clients",
            r(&d.pushes),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_discovery_acks",
            "snapshots acknowledged",
            r(&d.acks),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_discovery_partial_acks",
            "updates acknowledged less services the client skipped",
            r(&d.partial_acks),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_discovery_nacks",
            "snapshots rejected by clients",
            r(&d.nacks),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_discovery_accept_errors",
            "failed accepts on the discovery listener (each retried)",
            r(&d.accept.errors),
        )?;
        gauge(
            &mut e,
            "fedmesh_controller_foreign_own_bundle",
            "1 while etcd holds other roots than ours for our own trust domain (ignored)",
            i64::from(self.foreign_own_bundle.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut e,
            "fedmesh_controller_discovery_connected_clients",
            "open discovery streams",
            d.connected.load(Ordering::Relaxed),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_certify_issued",
            "SVIDs issued through Certify",
            r(&d.certified),
        )?;
        counter(
            &mut e,
            "fedmesh_controller_certify_refused",
            "Certify requests refused",
            r(&d.certify_refused),
        )?;
        Ok(())
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
/// Ready once there is a complete view to serve and the discovery API is
/// taking connections.
pub async fn serve(listener: TcpListener, metrics: Arc<ControllerMetrics>, snapshots: Snapshots) {
    let discovery = metrics.discovery.clone();
    let discovery_for_pages = metrics.discovery.clone();
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics));
    let ready = move || {
        discovery.serving()?;
        match snapshots.borrow().as_ref() {
            Some(s) => Ok(format!("version {}", s.version)),
            None => Err("no complete view of the global zone yet".into()),
        }
    };
    let clients = metrics_discovery_clients(&discovery_for_pages);
    fedmesh_admin::serve_with(
        listener,
        Arc::new(registry),
        Arc::new(ready),
        vec![("/clients", clients)],
        fedmesh_admin::Limits::default(),
    )
    .await
}

/// `/clients`: every connected proxy and gateway, and what it runs.
fn metrics_discovery_clients(
    d: &Arc<crate::discovery::DiscoveryStats>,
) -> Arc<dyn Fn() -> String + Send + Sync> {
    let d = d.clone();
    Arc::new(move || d.clients_json())
}
