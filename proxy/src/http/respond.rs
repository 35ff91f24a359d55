//! What goes back to the app: the upstream's response (hop-by-hop headers
//! removed, the connection returned to the pool when the body ends, or
//! bridged for an upgrade), or one the proxy makes; and what a request's
//! end records (metrics, span, access log).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::headers::strip_hop_by_hop;
use super::pool::{PoolKey, PooledBody};
use super::{Body, ERROR_HEADER, OVERLOADED_HEADER};
use crate::config::AccessLog;
use crate::metrics::RequestLabels;
use crate::runtime::Shared;
use crate::trace::RequestSpan;

/// The upstream's response to the app.
pub(crate) fn respond(
    shared: &Shared,
    mut resp: Response<Incoming>,
    tx: SendRequest<Body>,
    target: PoolKey,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        let Some(downstream) = downstream_upgrade else {
            return local_reply(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "fedmesh: the upstream switched protocols without being asked\n".into(),
            );
        };
        let upstream = hyper::upgrade::on(&mut resp);
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

/// A breaker's 503, naming its reason in `x-fedmesh-overloaded`.
pub(crate) fn overloaded(service: &str, reason: &'static str) -> Response<Body> {
    let mut r = local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!("fedmesh: {service} is overloaded: {reason}\n"),
    );
    r.headers_mut()
        .insert(OVERLOADED_HEADER, HeaderValue::from_static(reason));
    r
}

/// A response the proxy makes, naming what failed in `x-fedmesh-error`.
pub(crate) fn local_reply(status: StatusCode, kind: &'static str, body: String) -> Response<Body> {
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

/// Counts a request in the metrics.
pub(crate) fn count(
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
pub(crate) struct Done<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) method: Method,
    pub(crate) authority: &'a str,
    pub(crate) path: String,
    pub(crate) service: String,
    pub(crate) span: Option<RequestSpan>,
    pub(crate) started: Instant,
}

/// Where a request ended up, for the record.
#[derive(Debug, Default)]
pub(crate) struct Landed {
    pub(crate) cluster: String,
    pub(crate) zone: String,
}

impl Done<'_> {
    pub(crate) fn record(
        &self,
        status: StatusCode,
        at: &Landed,
        outcome: &'static str,
        attempts: usize,
    ) {
        let (cluster, zone) = (at.cluster.as_str(), at.zone.as_str());
        count(
            self.shared,
            &self.service,
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
