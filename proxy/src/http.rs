//! The outbound HTTP listener: HTTP/1.1 and h2c from local apps, HTTP/1.1
//! with pooled keep-alive connections to targets (directly, or through a
//! tunnel to a remote cluster).
//!
//! One request: find the service by Host / `:authority`; take a pending
//! slot (503 with `x-fedmesh-overloaded` when the breaker trips); then
//! attempts until one answers. A target that cannot be reached, or whose
//! tunnel is refused, is failed over at once, whatever the method: the
//! request never reached it. After the request was sent, an idempotent
//! request without a body is retried on another target, within the retry
//! count and budget. Bodies stream both ways; a request with a body is
//! never replayed, so it fails over only before its first byte.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::config::AccessLog;
use crate::limits::{Failure, may_retry};
use crate::metrics::{AttemptLabels, RequestLabels};
use crate::runtime::{Body, Pool, PoolKey, ServiceState, Shared, stopped};
use crate::table::{Routable, TargetKey};
use crate::trace::RequestSpan;
use crate::upstream::{ConnectError, TunnelAsk};

/// The header a breaker trip names its reason in.
pub const OVERLOADED_HEADER: &str = "x-fedmesh-overloaded";
/// The header a proxy-made error response carries, naming what failed.
pub const ERROR_HEADER: &str = "x-fedmesh-error";

/// Serves HTTP on `listener` until `shutdown` turns true; then stops
/// accepting and lets live connections finish for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stats = fedmesh_admin::AcceptStats::default();
    loop {
        let (tcp, _) = tokio::select! {
            c = fedmesh_admin::accept(&listener, "http", &stats) => c,
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let svc = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, req).await) }
        });
        let conn = server.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "downstream connection ended with an error");
            }
        });
    }
    drop(listener);
    if timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(?drain, "drain deadline passed with requests still live");
    }
}

/// How an attempt failed.
#[derive(Debug)]
enum AttemptError {
    Connect(ConnectError),
    /// Sent, but no response: reset, closed or timed out.
    Send {
        message: String,
        reused: bool,
    },
    TryTimeout,
}

impl AttemptError {
    /// Whether the failure counts against the target's health. A pooled
    /// connection that died (with a gateway, or idle) and a dead local
    /// egress say nothing about the target; they only cost a fresh path.
    fn blames_target(&self) -> bool {
        match self {
            AttemptError::Connect(e) => e.blames_target(),
            AttemptError::Send { reused, .. } => !reused,
            AttemptError::TryTimeout => true,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            AttemptError::Connect(e) => e.label(),
            AttemptError::Send { .. } => "reset",
            AttemptError::TryTimeout => "try_timeout",
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Connect(e) => write!(f, "{e}"),
            AttemptError::Send { message, .. } => write!(f, "upstream: {message}"),
            AttemptError::TryTimeout => {
                write!(f, "upstream: no response within the per-try timeout")
            }
        }
    }
}

/// The service a host names. One the table lacks is asked of the
/// controller (on-demand discovery): the request waits until the controller
/// has sent it or said it does not exist, up to `onDemandTimeout`.
async fn find_service(shared: &Shared, authority: &str) -> Option<Arc<Routable>> {
    if let Some(svc) = shared.table.borrow().by_host(authority) {
        return Some(svc.clone());
    }
    let on_demand = shared.on_demand.as_ref()?;
    let key = crate::table::service_of_host(authority)?;
    on_demand
        .request(key.clone(), shared.settings.on_demand_timeout)
        .await;
    // The discovery client publishes the new table before it answers.
    shared.table.borrow().services.get(&key).cloned()
}

pub async fn handle(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let Some(svc) = find_service(shared, &authority).await else {
        count(shared, "", "", "", "unknown_service", started);
        return local_reply(
            StatusCode::NOT_FOUND,
            "unknown-service",
            format!("fedmesh: no service is named by host {authority:?}\n"),
        );
    };
    let state = shared.state(&svc.key);
    let service = svc.key.to_string();
    let _pending = match state.breakers.pending() {
        Ok(slot) => slot,
        Err(trip) => {
            count(shared, &service, "", "", "overloaded", started);
            return overloaded(&service, trip.reason());
        }
    };
    state.request();

    let downstream_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let replayable = body.is_end_stream();
    let mut body = Some(body);
    prepare_request(&mut parts, &authority, downstream_upgrade.is_some());
    let span = shared
        .tracer
        .as_ref()
        .map(|t| RequestSpan::start(t, &service, &mut parts.headers));
    let done = Done {
        shared,
        method: &parts.method,
        authority: &authority,
        path: parts.uri.path(),
        service: &service,
        span,
        started,
    };
    let traceparent = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    let settings = &shared.settings;
    let deadline = started + settings.request_timeout;
    let mut tried: Vec<TargetKey> = Vec::new();
    let mut retries_left = settings.retries;
    let mut last: Option<(TargetKey, AttemptError)> = None;
    let mut same_again = false;
    let mut fresh_path_used = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let target = match (same_again, &last) {
            (true, Some((t, _))) => {
                state.again(t);
                t.clone()
            }
            _ => match state.choose(&svc, &tried) {
                Some(t) => t,
                None => break,
            },
        };
        same_again = false;
        let attempt_started = Instant::now();
        let ask = TunnelAsk {
            service: &svc.key,
            port: svc.port,
            traceparent: traceparent.as_deref(),
            deadline: deadline - now,
        };
        let (mut tx, reused) = match sender(shared, &state, &target, &ask).await {
            Ok(s) => s,
            Err(Opened::Overloaded(reason)) => {
                state.cancelled(&target);
                done.record(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "",
                    "",
                    "overloaded",
                    tried.len(),
                );
                return overloaded(&service, reason);
            }
            Err(Opened::Failed(e)) => {
                // Never reached the target: always safe to go elsewhere.
                attempt_failed(
                    shared,
                    &svc,
                    &state,
                    &target,
                    &AttemptError::Connect(e.clone()),
                );
                tried.push(target.clone());
                last = Some((target, AttemptError::Connect(e)));
                continue;
            }
        };
        let up_body: Body = if replayable {
            Empty::new().map_err(|never| match never {}).boxed()
        } else {
            match body.take() {
                Some(b) => b.boxed(),
                // Spent on an earlier attempt: nothing can be resent.
                None => break,
            }
        };
        let up_req = Request::from_parts(parts.clone(), up_body);
        let limit = settings
            .per_try_timeout
            .map_or(deadline, |t| deadline.min(Instant::now() + t));
        let result = tokio::time::timeout_at(limit, tx.send_request(up_req)).await;
        let error = match result {
            Ok(Ok(resp)) => {
                let status = resp.status();
                let retry_status = matches!(status.as_u16(), 502..=504);
                if retry_status
                    && replayable
                    && retries_left > 0
                    && may_retry(parts.method.as_str(), Failure::AfterSending, || {
                        state.try_retry()
                    })
                {
                    retries_left -= 1;
                    record_attempt(shared, &svc, &target, "http_5xx");
                    state.finished(&svc, &target, Err(()));
                    tried.push(target.clone());
                    last = Some((
                        target,
                        AttemptError::Send {
                            message: format!("answered {status}"),
                            reused,
                        },
                    ));
                    continue;
                }
                let latency = attempt_started.elapsed();
                if status.is_server_error() {
                    record_attempt(shared, &svc, &target, "http_5xx");
                    state.finished(&svc, &target, Err(()));
                } else {
                    record_attempt(shared, &svc, &target, "ok");
                    state.finished(&svc, &target, Ok(latency));
                }
                let outcome = if status.is_server_error() {
                    "http_5xx"
                } else {
                    "success"
                };
                let zone = zone_of(&svc, &target);
                let cluster = target.cluster(&shared.me.cluster).to_owned();
                done.record(status, &cluster, &zone, outcome, tried.len() + 1);
                return respond(
                    shared,
                    resp,
                    tx,
                    (svc.key.clone(), target),
                    downstream_upgrade,
                );
            }
            Ok(Err(e)) => AttemptError::Send {
                message: e.to_string(),
                reused,
            },
            Err(_) => AttemptError::TryTimeout,
        };
        attempt_failed(shared, &svc, &state, &target, &error);
        // A pooled connection the target had already closed: the request
        // never got there, so try once more on a fresh connection.
        let stale = matches!(error, AttemptError::Send { reused: true, .. }) && replayable;
        let again = replayable
            && (stale
                || (retries_left > 0
                    && may_retry(parts.method.as_str(), Failure::AfterSending, || {
                        state.try_retry()
                    })));
        if !again {
            last = Some((target, error));
            break;
        }
        if stale {
            same_again = true;
        } else {
            retries_left -= 1;
            // A tunnel that died mid-request says more about the gateway it
            // went through than about the cluster: once per request, the
            // same cluster may be tried again, on a fresh path.
            let fresh_path = !fresh_path_used
                && matches!(target, TargetKey::Remote(_))
                && matches!(error, AttemptError::Send { .. });
            if fresh_path {
                fresh_path_used = true;
            } else {
                tried.push(target.clone());
            }
        }
        last = Some((target, error));
    }

    let (status, kind, outcome, message) = match &last {
        _ if Instant::now() >= deadline => (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "timeout",
            format!(
                "fedmesh: {service}: no response within the request timeout ({} ms)",
                settings.request_timeout.as_millis()
            ),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no-healthy-upstream",
            "no_healthy_upstream",
            format!("fedmesh: {service}: no healthy endpoint or cluster"),
        ),
        Some((t, e @ AttemptError::TryTimeout)) => (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "timeout",
            format!("fedmesh: {service}: every attempt failed; the last, to {t}: {e}"),
        ),
        Some((t, e)) => (
            StatusCode::BAD_GATEWAY,
            "upstream-failed",
            "upstream_failed",
            format!("fedmesh: {service}: every attempt failed; the last, to {t}: {e}"),
        ),
    };
    let (cluster, zone) = last
        .as_ref()
        .map(|(t, _)| (t.cluster(&shared.me.cluster).to_owned(), zone_of(&svc, t)))
        .unwrap_or_default();
    done.record(status, &cluster, &zone, outcome, tried.len());
    local_reply(status, kind, format!("{message}\n"))
}

enum Opened {
    Overloaded(&'static str),
    Failed(ConnectError),
}

/// A connection to `target`: a pooled one if one is idle, else a new one.
async fn sender(
    shared: &Shared,
    state: &ServiceState,
    target: &TargetKey,
    ask: &TunnelAsk<'_>,
) -> Result<(SendRequest<Body>, bool), Opened> {
    if let Some(tx) = shared.pool.take(&(ask.service.clone(), target.clone())) {
        return Ok((tx, true));
    }
    let slot = state
        .breakers
        .connection()
        .map_err(|trip| Opened::Overloaded(trip.reason()))?;
    let io = shared
        .connector
        .connect(target, ask)
        .await
        .map_err(Opened::Failed)?;
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| {
            Opened::Failed(ConnectError::Unreachable {
                target: target.to_string(),
                message: e.to_string(),
            })
        })?;
    tokio::spawn(async move {
        // The breaker counts this connection until it closes.
        let _slot = slot;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok((tx, false))
}

fn attempt_failed(
    shared: &Shared,
    svc: &Routable,
    state: &ServiceState,
    target: &TargetKey,
    e: &AttemptError,
) {
    tracing::debug!(service = %svc.key, %target, error = %e, "attempt failed");
    record_attempt(shared, svc, target, e.label());
    if e.blames_target() {
        state.finished(svc, target, Err(()));
    } else {
        state.cancelled(target);
    }
}

fn record_attempt(shared: &Shared, svc: &Routable, target: &TargetKey, result: &'static str) {
    shared
        .metrics
        .attempts
        .get_or_create(&AttemptLabels {
            service: svc.key.to_string(),
            cluster: target.cluster(&shared.me.cluster).to_owned(),
            result,
        })
        .inc();
}

fn zone_of(svc: &Routable, t: &TargetKey) -> String {
    match t {
        TargetKey::Local(a) => svc.zones.get(a).cloned().unwrap_or_default(),
        TargetKey::Remote(_) => String::new(),
    }
}

fn count(
    shared: &Shared,
    service: &str,
    cluster: &str,
    zone: &str,
    outcome: &'static str,
    started: Instant,
) {
    let labels = RequestLabels {
        service: service.into(),
        cluster: cluster.into(),
        zone: zone.into(),
        outcome,
    };
    shared.metrics.requests.get_or_create(&labels).inc();
    shared
        .metrics
        .request_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
}

/// What a request's end records: metrics, its span, and the access log.
struct Done<'a> {
    shared: &'a Shared,
    method: &'a Method,
    authority: &'a str,
    path: &'a str,
    service: &'a str,
    span: Option<RequestSpan>,
    started: Instant,
}

impl Done<'_> {
    fn record(
        &self,
        status: StatusCode,
        cluster: &str,
        zone: &str,
        outcome: &'static str,
        attempts: usize,
    ) {
        count(
            self.shared,
            self.service,
            cluster,
            zone,
            outcome,
            self.started,
        );
        if let Some(s) = &self.span {
            s.finish(cluster, status.as_u16(), attempts);
        }
        if self.shared.settings.access_log == AccessLog::Off {
            return;
        }
        tracing::info!(
            target: "fedmesh_proxy::access",
            method = %self.method,
            authority = self.authority,
            path = self.path,
            status = status.as_u16(),
            service = self.service,
            cluster,
            zone,
            outcome,
            attempts,
            duration_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
        );
    }
}

/// The response to the app: hop-by-hop headers removed, the connection
/// going back to the pool once the body has ended (or bridged, for an
/// upgrade).
fn respond(
    shared: &Shared,
    mut resp: Response<Incoming>,
    tx: SendRequest<Body>,
    target: PoolKey,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        let upstream = hyper::upgrade::on(&mut resp);
        match downstream_upgrade {
            Some(downstream) => {
                tokio::spawn(async move {
                    match tokio::try_join!(downstream, upstream) {
                        Ok((d, u)) => {
                            let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                            let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
                        }
                        Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
                    }
                });
            }
            None => {
                return local_reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream-failed",
                    "fedmesh: the upstream switched protocols without being asked\n".into(),
                );
            }
        }
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgraded);
    let body = if upgraded {
        body.boxed()
    } else if body.is_end_stream() {
        shared.pool.put(target, tx);
        body.boxed()
    } else {
        PooledBody {
            inner: body,
            back: Some((shared.pool.clone(), target, tx)),
        }
        .boxed()
    };
    Response::from_parts(parts, body)
}

/// A response body that hands its connection back to the pool at its end.
struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Pool>, PoolKey, SendRequest<Body>)>,
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if ended && let Some((pool, k, tx)) = self.back.take() {
            pool.put(k, tx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Rewrites a request for an HTTP/1.1 upstream: origin-form target, a
/// Host header, and no hop-by-hop headers (but the upgrade ones, when
/// upgrading).
fn prepare_request(parts: &mut hyper::http::request::Parts, authority: &str, upgrade: bool) {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Ok(uri) = path.parse() {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if !parts.headers.contains_key(header::HOST)
        && let Ok(h) = HeaderValue::from_str(authority)
    {
        parts.headers.insert(header::HOST, h);
    }
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, and any header the
/// Connection header names. An upgrade keeps `Connection: upgrade` and
/// `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
}

/// A breaker's 503, naming its reason in `x-fedmesh-overloaded`.
fn overloaded(service: &str, reason: &'static str) -> Response<Body> {
    let mut r = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("fedmesh: {service} is overloaded: {reason}\n"),
    );
    r.headers_mut()
        .insert(OVERLOADED_HEADER, HeaderValue::from_static(reason));
    r
}

fn local_reply(status: StatusCode, kind: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(kind));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_connection_named_ones_too() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-keep", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        let mut left: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["traceparent", "x-keep"]);

        let mut up = h;
        up.insert("connection", HeaderValue::from_static("Upgrade"));
        assert!(wants_upgrade(&up));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up["connection"], "upgrade");
        assert_eq!(up["upgrade"], "websocket");
    }

    #[test]
    fn requests_are_rewritten_for_an_http1_upstream() {
        let req = Request::builder()
            .uri("http://cart.shop:8080/a/b?c=d")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare_request(&mut parts, "cart.shop:8080", false);
        assert_eq!(parts.uri, "/a/b?c=d");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers[header::HOST], "cart.shop:8080");
    }
}
