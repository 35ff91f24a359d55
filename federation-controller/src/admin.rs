//! The admin port: Prometheus metrics, `/ready` and `/live`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
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
            "fedmesh_controller_discovery_nacks",
            "snapshots rejected by clients",
            r(&d.nacks),
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
pub async fn serve(listener: TcpListener, metrics: Arc<ControllerMetrics>, snapshots: Snapshots) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics));
    let registry = Arc::new(registry);
    while let Ok((tcp, _)) = listener.accept().await {
        let (registry, snapshots) = (registry.clone(), snapshots.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (registry, snapshots) = (registry.clone(), snapshots.clone());
                async move { Ok::<_, Infallible>(route(req.uri().path(), &registry, &snapshots)) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn route(path: &str, registry: &Registry, snapshots: &Snapshots) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    match path {
        "/live" => text(StatusCode::OK, "live\n".into()),
        // Ready once there is a complete view to serve.
        "/ready" => match snapshots.borrow().as_ref() {
            Some(s) => text(StatusCode::OK, format!("ready: version {}\n", s.version)),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no complete view of the global zone yet\n".into(),
            ),
        },
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics, /ready or /live\n".into(),
        ),
    }
}
