//! One request, from the app to an answer: find the service, take a
//! pending slot, then drive [`Attempts`] (the I/O-free rules of failover
//! and retries) over real connections until one answers or it gives up.

use std::sync::Arc;

use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::Body;
use super::headers::{prepare_request, wants_upgrade};
use super::respond::{Done, Landed, count, local_reply, overloaded, respond};
use crate::attempts::{AttemptPolicy, Attempts, Ending, Hop, Next, Replay, Sent, Try};
use crate::metrics::AttemptLabels;
use crate::runtime::{ServiceState, Shared};
use crate::table::{Routable, TargetKey};
use crate::trace::RequestSpan;
use crate::upstream::{ConnectError, TunnelAsk};

impl Hop for TargetKey {
    fn has_other_paths(&self) -> bool {
        // A remote cluster is reached through any of its gateways (and any
        // of ours).
        matches!(self, TargetKey::Remote(_))
    }
}

/// How an attempt failed.
#[derive(Debug)]
pub(crate) enum AttemptError {
    Connect(ConnectError),
    /// Sent, but no usable response: reset, closed, or a 502–504 retried.
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
    find_key(shared, crate::table::service_of_host(authority)?).await
}

async fn find_key(shared: &Shared, key: fedmesh_api::ServiceKey) -> Option<Arc<Routable>> {
    if let Some(svc) = shared.table.borrow().services.get(&key) {
        return Some(svc.clone());
    }
    let on_demand = shared.on_demand.as_ref()?;
    on_demand
        .request(key.clone(), shared.settings.on_demand_timeout)
        .await;
    // The discovery client publishes the new table before it answers.
    shared.table.borrow().services.get(&key).cloned()
}

/// Where the service's routes send this request: another service (a
/// canary, a version), or the service itself.
async fn routed(
    shared: &Shared,
    svc: Arc<Routable>,
    req: &Request<Incoming>,
) -> Option<Arc<Routable>> {
    if svc.policy.routes.is_empty() {
        return Some(svc);
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    match svc.policy.route(
        req.method().as_str(),
        req.uri().path(),
        header,
        fastrand::f64(),
    ) {
        Some(dest) if dest != svc.key => find_key(shared, dest).await,
        _ => Some(svc),
    }
}

fn authority_of(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

pub async fn handle(shared: &Shared, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let authority = authority_of(&req);
    let Some(svc) = find_service(shared, &authority).await else {
        count(shared, "", "", "", "unknown_service", started);
        return local_reply(
            StatusCode::NOT_FOUND,
            "unknown-service",
            format!("fedmesh: no service is named by host {authority:?}\n"),
        );
    };
    let Some(svc) = routed(shared, svc, &req).await else {
        count(shared, "", "", "", "unknown_service", started);
        return local_reply(
            StatusCode::NOT_FOUND,
            "unknown-service",
            format!("fedmesh: {authority:?}: a route names a service that does not exist\n"),
        );
    };
    let state = shared.state(&svc);
    let service = svc.key.to_string();
    let _pending = match state.breakers.pending() {
        Ok(slot) => slot,
        Err(trip) => {
            count(shared, &service, "", "", "overloaded", started);
            return overloaded(&service, trip.reason());
        }
    };
    state.request();

    let upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let replay = Replay::of(parts.method.as_str(), body.is_end_stream());
    prepare_request(&mut parts, &authority, upgrade.is_some());
    let span = shared
        .tracer
        .as_ref()
        .map(|t| RequestSpan::start(t, &service, &mut parts.headers));
    let done = Done {
        shared,
        method: parts.method.clone(),
        authority: &authority,
        path: parts.uri.path().to_owned(),
        service,
        span,
        started,
    };
    let knobs = &svc.policy;
    let policy = AttemptPolicy {
        retries: knobs.retries,
        per_try_timeout: knobs.per_try_timeout,
    };
    let forward = Forward {
        shared,
        svc: &svc,
        state: &state,
        traceparent: parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        parts,
        body: (!replay.bodiless).then_some(body),
        attempts: Attempts::new((started + knobs.request_timeout).into_std(), policy, replay),
    };
    forward.run(&done, upgrade).await
}

/// The attempts of one request, over real connections.
struct Forward<'a> {
    shared: &'a Shared,
    svc: &'a Routable,
    state: &'a ServiceState,
    parts: Parts,
    /// The request's body, until an attempt takes it (a bodiless request
    /// sends an empty one each time).
    body: Option<Incoming>,
    traceparent: Option<String>,
    attempts: Attempts<TargetKey, AttemptError>,
}

/// How one attempt ended, short of an answer to pass on.
enum Step {
    Answered(Response<Incoming>, SendRequest<Body>),
    Overloaded(&'static str),
    Failed,
}

impl Forward<'_> {
    async fn run(
        mut self,
        done: &Done<'_>,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        loop {
            let now = Instant::now();
            let (svc, state) = (self.svc, self.state);
            let attempt = match self
                .attempts
                .next(now.into_std(), |tried| state.choose(svc, tried))
            {
                Next::Try(t) => t,
                Next::GiveUp(ending) => return self.give_up(ending, done),
            };
            if attempt.fresh_connection {
                state.again(&attempt.target);
            }
            let outstanding = state.outstanding(&attempt.target);
            let step = self.attempt(&attempt, now).await;
            outstanding.reported();
            match step {
                Step::Failed => continue,
                Step::Overloaded(reason) => {
                    state.cancelled(&attempt.target);
                    let status = StatusCode::SERVICE_UNAVAILABLE;
                    done.record(
                        status,
                        &Landed::default(),
                        "overloaded",
                        self.attempts.made(),
                    );
                    return overloaded(&done.service, reason);
                }
                Step::Answered(resp, tx) => {
                    let status = resp.status();
                    let outcome = if status.is_server_error() {
                        "http_5xx"
                    } else {
                        "success"
                    };
                    let at = self.landed(&attempt.target);
                    done.record(status, &at, outcome, self.attempts.made());
                    let key = (svc.key.clone(), attempt.target);
                    return respond(self.shared, resp, tx, key, upgrade);
                }
            }
        }
    }

    /// One attempt on `t.target`: a connection, the request, and what
    /// came of it, reported to the attempts and the balancer.
    async fn attempt(&mut self, t: &Try<TargetKey>, now: Instant) -> Step {
        let started = Instant::now();
        let (mut tx, reused) = match self.sender(t, now).await {
            Ok(s) => s,
            Err(NoSender::Overloaded(reason)) => return Step::Overloaded(reason),
            Err(NoSender::Failed(e)) => {
                // Never reached the target: always safe to go elsewhere.
                let e = AttemptError::Connect(e);
                self.failed(&t.target, &e);
                self.attempts.not_sent(e);
                return Step::Failed;
            }
        };
        let body: Body = match self.body.take() {
            Some(b) => b.boxed(),
            None => Empty::new().map_err(|never| match never {}).boxed(),
        };
        let req = Request::from_parts(self.parts.clone(), body);
        let (how, error) =
            match tokio::time::timeout_at(Instant::from_std(t.until), tx.send_request(req)).await {
                Ok(Ok(resp)) => return self.answered(t, resp, tx, reused, started),
                Ok(Err(e)) => (
                    Sent::Reset { reused },
                    AttemptError::Send {
                        message: e.to_string(),
                        reused,
                    },
                ),
                Err(_) => (Sent::TryTimeout, AttemptError::TryTimeout),
            };
        self.failed(&t.target, &error);
        let state = self.state;
        self.attempts.sent_failed(how, error, || state.try_retry());
        Step::Failed
    }

    /// A response came: passed on, or (a 502–504 that may be retried)
    /// counted as a failure.
    fn answered(
        &mut self,
        t: &Try<TargetKey>,
        resp: Response<Incoming>,
        tx: SendRequest<Body>,
        reused: bool,
        started: Instant,
    ) -> Step {
        let status = resp.status();
        let state = self.state;
        let message = || AttemptError::Send {
            message: format!("answered {status}"),
            reused,
        };
        if self
            .attempts
            .answered(status.as_u16(), message, || state.try_retry())
        {
            self.record_attempt(&t.target, "http_5xx");
            state.finished(self.svc, &t.target, Err(()));
            return Step::Failed;
        }
        if status.is_server_error() {
            self.record_attempt(&t.target, "http_5xx");
            state.finished(self.svc, &t.target, Err(()));
        } else {
            self.record_attempt(&t.target, "ok");
            state.finished(self.svc, &t.target, Ok(started.elapsed()));
        }
        Step::Answered(resp, tx)
    }

    /// The proxy's own answer when no attempt succeeded.
    fn give_up(&self, ending: Ending, done: &Done<'_>) -> Response<Body> {
        let service = &done.service;
        let last = self.attempts.last();
        let every = |(t, e): (&TargetKey, &AttemptError)| {
            format!("fedmesh: {service}: every attempt failed; the last, to {t}: {e}")
        };
        let (status, kind, outcome, message) = match (ending, last) {
            (Ending::Deadline, _) => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "timeout",
                format!(
                    "fedmesh: {service}: no response within the request timeout ({} ms)",
                    self.svc.policy.request_timeout.as_millis()
                ),
            ),
            (Ending::LastTimedOut, Some(l)) => {
                (StatusCode::GATEWAY_TIMEOUT, "timeout", "timeout", every(l))
            }
            (Ending::LastFailed, Some(l)) => (
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "upstream_failed",
                every(l),
            ),
            (_, _) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no-healthy-upstream",
                "no_healthy_upstream",
                format!("fedmesh: {service}: no healthy endpoint or cluster"),
            ),
        };
        let at = last.map(|(t, _)| self.landed(t)).unwrap_or_default();
        done.record(status, &at, outcome, self.attempts.made());
        local_reply(status, kind, format!("{message}\n"))
    }

    /// A connection to the target: a pooled one if one is idle (unless the
    /// attempt wants a fresh one), else a new one.
    async fn sender(
        &self,
        t: &Try<TargetKey>,
        now: Instant,
    ) -> Result<(SendRequest<Body>, bool), NoSender> {
        let key = (self.svc.key.clone(), t.target.clone());
        if !t.fresh_connection
            && let Some(tx) = self.shared.pool.take(&key)
        {
            return Ok((tx, true));
        }
        let slot = self
            .state
            .breakers
            .connection()
            .map_err(|trip| NoSender::Overloaded(trip.reason()))?;
        let ask = TunnelAsk {
            service: &self.svc.key,
            port: self.svc.port,
            traceparent: self.traceparent.as_deref(),
            deadline: self.attempts.remaining(now.into_std()),
        };
        let io = self
            .shared
            .connector
            .connect(&t.target, &ask)
            .await
            .map_err(NoSender::Failed)?;
        let (tx, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| {
                NoSender::Failed(ConnectError::Unreachable {
                    target: t.target.to_string(),
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

    fn failed(&self, target: &TargetKey, e: &AttemptError) {
        tracing::debug!(service = %self.svc.key, %target, error = %e, "attempt failed");
        self.record_attempt(target, e.label());
        if e.blames_target() {
            self.state.finished(self.svc, target, Err(()));
        } else {
            self.state.cancelled(target);
        }
    }

    fn record_attempt(&self, target: &TargetKey, result: &'static str) {
        let labels = AttemptLabels {
            service: self.svc.key.to_string(),
            cluster: target.cluster(&self.shared.me.cluster).to_owned(),
            result,
        };
        self.shared.metrics.attempts.get_or_create(&labels).inc();
    }

    fn landed(&self, t: &TargetKey) -> Landed {
        Landed {
            cluster: t.cluster(&self.shared.me.cluster).to_owned(),
            zone: match t {
                TargetKey::Local(a) => self.svc.zones.get(a).cloned().unwrap_or_default(),
                TargetKey::Remote(_) => String::new(),
            },
        }
    }
}

enum NoSender {
    Overloaded(&'static str),
    Failed(ConnectError),
}
