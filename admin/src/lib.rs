//! The admin HTTP port of every fedmesh process: Prometheus metrics at
//! `/metrics`, readiness at `/ready` and liveness at `/live`. What is
//! counted, and what "ready" means, is the caller's: this crate only serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsFd;
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
                // Readiness must not wait for a client to prove accepting
                // works again: a descriptor that can be had now is enough.
                if let Ok(probe) = listener.as_fd().try_clone_to_owned() {
                    drop(probe);
                    stats.failing.store(false, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A JSON page of the admin port (`/clients`, say), rendered per request.
pub type JsonPage = (&'static str, Arc<dyn Fn() -> String + Send + Sync>);

/// What one admin port lets its clients hold: scrapers and probes make
/// short requests, so a slow or idle client is dropped early and a flood of
/// them cannot take the process's descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request's headers must arrive within this (and a kept-alive
    /// connection's next request's too).
    pub header_timeout: Duration,
    /// Connections at once; more are closed as they come.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: Readiness) {
    serve_with(listener, registry, ready, Vec::new(), Limits::default()).await
}

/// [`serve`], with JSON pages of the caller's, within `limits`.
pub async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: Readiness,
    pages: Vec<JsonPage>,
    limits: Limits,
) {
    let stats = AcceptStats::default();
    let pages = Arc::new(pages);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (tcp, _) = accept(&listener, "admin", &stats).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp); // At the cap: closed at once, never queued.
            continue;
        };
        let (registry, ready, pages) = (registry.clone(), ready.clone(), pages.clone());
        tokio::spawn(async move {
            let _slot = slot;
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
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
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

    #[tokio::test]
    async fn a_silent_client_is_dropped_and_the_cap_holds() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ready: Readiness = Arc::new(|| Ok("ok".into()));
        let limits = Limits {
            header_timeout: Duration::from_millis(200),
            max_connections: 2,
        };
        let server = tokio::spawn(serve_with(
            l,
            Arc::new(Registry::default()),
            ready,
            vec![],
            limits,
        ));
        let read_to_end = |mut s: tokio::net::TcpStream| async move {
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
                .await
                .map(|_| String::from_utf8_lossy(&buf).into_owned())
        };
        // Silent: closed at the header timeout.
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = std::time::Instant::now();
        assert!(read_to_end(silent).await.is_ok(), "still open");
        assert!(t.elapsed() >= Duration::from_millis(150));
        // Two held: a third is closed at once; once they go, one is served.
        let (a, b) = (
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = std::time::Instant::now();
        assert_eq!(read_to_end(third).await.unwrap(), "");
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "closed at once, not by the timeout"
        );
        drop((a, b));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /live HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            if read_to_end(s).await.unwrap().contains("200 OK") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.abort();
    }
}
