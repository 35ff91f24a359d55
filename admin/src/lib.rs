//! The admin HTTP port of every fedmesh process: Prometheus metrics at
//! `/metrics`, readiness at `/ready` and liveness at `/live`. What is
//! counted, and what "ready" means, is the caller's: this crate only serves.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Says whether the process is ready: `Ok(detail)` or `Err(why not)`.
pub type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: Readiness) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (registry, ready) = (registry.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (registry, ready) = (registry.clone(), ready.clone());
                async move { Ok::<_, Infallible>(route(req.uri().path(), &registry, &*ready)) }
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
