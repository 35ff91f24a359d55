//! The admin HTTP port of every fedmesh process: Prometheus metrics at
//! `/metrics`, readiness at `/ready` and liveness at `/live`. What is
//! counted, and what "ready" means, is the caller's: this crate only serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

/// Says whether the process is ready: `Ok(detail)` or `Err(why not)`.
pub type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Counts a listener's failed accepts; `failing` holds while the last one
/// failed, so readiness can say the listener is not serving.
#[derive(Debug, Default)]
pub struct AcceptStats {
    pub errors: AtomicU64,
    pub failing: std::sync::atomic::AtomicBool,
}

/// The next connection on `listener`. A failed accept (out of descriptors,
/// a connection aborted before it was taken) is logged, counted and retried
/// with backoff, never returned: a listener whose loop ends on the first
/// error is a silent outage that `/ready` would not show.
pub async fn accept(
    listener: &TcpListener,
    what: &'static str,
    stats: &AcceptStats,
) -> (TcpStream, SocketAddr) {
    let mut backoff = Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(c) => {
                stats.failing.store(false, Ordering::Relaxed);
                return c;
            }
            Err(error) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                stats.failing.store(true, Ordering::Relaxed);
                tracing::warn!(listener = what, %error, retry_in = ?backoff, "accept failed; still listening");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A JSON page of the admin port (`/clients`, say), rendered per request.
pub type JsonPage = (&'static str, Arc<dyn Fn() -> String + Send + Sync>);

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: Readiness) {
    serve_with(listener, registry, ready, Vec::new()).await
}

/// [`serve`], with JSON pages of the caller's.
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    pages: Vec<JsonPage>,
) {
    let stats = AcceptStats::default();
    let pages = Arc::new(pages);
    loop {
        let (tcp, _) = accept(&listener, "admin", &stats).await;
        let (registry, ready, pages) = (registry.clone(), ready.clone(), pages.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (registry, ready, pages) = (registry.clone(), ready.clone(), pages.clone());
                async move {
                    let path = req.uri().path();
                    if let Some((_, page)) = pages.iter().find(|(p, _)| *p == path) {
                        let mut r = text(StatusCode::OK, page());
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        return Ok::<_, Infallible>(r);
                    }
                    Ok::<_, Infallible>(route(path, &registry, &*ready))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn route(
    path: &str,
    registry: &Registry,
    ready: &(dyn Fn() -> Result<String, String> + Send + Sync),
) -> Response<Full<Bytes>> {
    match path {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => match ready() {
            Ok(detail) => text(StatusCode::OK, format!("ready: {detail}\n")),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_answer_as_documented() {
        let registry = Registry::default();
        let ready = |r: Result<String, String>| move || r.clone();
        let ok = ready(Ok("v1".into()));
        let not = ready(Err("no view".into()));
        assert_eq!(route("/live", &registry, &ok).status(), StatusCode::OK);
        assert_eq!(route("/ready", &registry, &ok).status(), StatusCode::OK);
        assert_eq!(
            route("/ready", &registry, &not).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(route("/metrics", &registry, &ok).status(), StatusCode::OK);
        assert_eq!(
            route("/nope", &registry, &ok).status(),
            StatusCode::NOT_FOUND
        );
    }
}
