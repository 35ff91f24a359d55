//! The outbound HTTP listener: HTTP/1.1 and h2c from local apps, HTTP/1.1
//! with pooled keep-alive connections to targets (directly, or through a
//! tunnel to a remote cluster).
//!
//! - [`serve`] (here): the listener, and graceful drain;
//! - [`forward`]: one request, driving [`crate::attempts`] over real
//!   connections (a 503 with `x-fedmesh-overloaded` when a breaker trips);
//! - [`respond`]: what goes back to the app, and what is recorded;
//! - [`headers`]: hop-by-hop headers and HTTP/1.1 rewriting;
//! - [`pool`]: idle upstream connections.
//!
//! Bodies stream both ways; a request with a body is never replayed, so it
//! fails over only before its first byte.

mod forward;
mod headers;
mod pool;
mod respond;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

pub use forward::handle;
pub use pool::{Pool, PoolKey};

use crate::downstream::{Downstream, connection_cap};
use crate::runtime::{Shared, stopped};

/// The body type both ways: the app's or the upstream's, streamed.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The header a breaker trip names its reason in.
pub const OVERLOADED_HEADER: &str = "x-fedmesh-overloaded";
/// The header a proxy-made error response carries, naming what failed.
pub const ERROR_HEADER: &str = "x-fedmesh-error";

type Conns = Arc<Mutex<Downstream<Arc<Notify>>>>;

fn lock(c: &Conns) -> std::sync::MutexGuard<'_, Downstream<Arc<Notify>>> {
    // Every update is one map operation: a panic cannot leave it torn.
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends a request's hold on its connection when its response body is
/// done (sent or dropped): until then the connection is busy.
struct InFlight(Conns, u64);

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.0).finished(self.1, std::time::Instant::now());
    }
}

/// Closes the connections [`Downstream::expired`] names, a few times per
/// timeout.
async fn sweep(conns: Conns, header: Duration, idle: Duration) {
    let every = (header.min(idle) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let gone = lock(&conns).expired(std::time::Instant::now(), header, idle);
        for close in gone {
            close.notify_one();
        }
    }
}

/// While draining, a downstream connection idle this long is closed. A
/// client's pool reuses its most recent connections first, so the ones it
/// leaves idle are those it is least likely to be sending on as they close.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// Serves HTTP on `listener` until `shutdown` turns true; then stops
/// accepting and drains for up to `drain`:
///
/// - every HTTP/1 response from then on says `Connection: close`, so a
///   client learns of the close with an answer instead of racing its next
///   request against it, and the connection ends after it;
/// - a connection idle for [`DRAIN_IDLE`] is closed;
/// - what is left at the deadline is shut down (h2: GOAWAY).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let settings = &shared.settings;
    let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    server
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.downstream_header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stats = fedmesh_admin::AcceptStats::default();
    let conns: Conns = Arc::new(Mutex::new(Downstream::new(connection_cap(
        settings.max_downstream_connections,
    ))));
    let sweeper = tokio::spawn(sweep(
        conns.clone(),
        settings.downstream_header_timeout,
        settings.downstream_idle_timeout,
    ));
    let draining = Arc::new(AtomicBool::new(false));
    loop {
        let (tcp, _) = tokio::select! {
            c = fedmesh_admin::accept(&listener, "http", &stats) => c,
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let close = Arc::new(Notify::new());
        let (id, victim) = lock(&conns).open(close.clone(), std::time::Instant::now());
        if let Some(v) = victim {
            v.notify_one();
        }
        let (shared, held, draining) = (shared.clone(), conns.clone(), draining.clone());
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let (shared, held, draining) = (shared.clone(), held.clone(), draining.clone());
            async move {
                lock(&held).started(id);
                let guard = InFlight(held, id);
                let h1 = req.version() < hyper::Version::HTTP_2;
                let mut resp = handle(&shared, req).await;
                if h1 && draining.load(Ordering::Relaxed) {
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                let resp = resp.map(|b| {
                    b.map_frame(move |f| {
                        let _held = &guard;
                        f
                    })
                    .boxed()
                });
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = server.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
        let conn = graceful.watch(conn.into_owned());
        let conns = conns.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "downstream connection ended with an error");
                },
                // Idle past its timeout, or the oldest idle one at the cap:
                // nothing is in flight on it, so dropping it cuts nothing.
                _ = close.notified() => {}
            }
            lock(&conns).closed(id);
        });
    }
    drop(listener);
    draining.store(true, Ordering::Relaxed);
    sweeper.abort();
    drain_connections(conns, graceful, drain).await;
}

/// The drain after accepting stopped (`Connection: close` is already on):
/// idle connections close after [`DRAIN_IDLE`]; what is left at the
/// deadline is shut down.
async fn drain_connections(
    conns: Conns,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    drain: Duration,
) {
    let deadline = tokio::time::Instant::now() + drain;
    let sweeper = tokio::spawn(sweep(conns.clone(), DRAIN_IDLE, DRAIN_IDLE));
    while !lock(&conns).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sweeper.abort();
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "drain deadline passed with requests still live");
    }
}
