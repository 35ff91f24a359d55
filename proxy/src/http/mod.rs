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
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::timeout;

pub use forward::handle;
pub use pool::{Pool, PoolKey};

use crate::runtime::{Shared, stopped};

/// The body type both ways: the app's or the upstream's, streamed.
pub type Body = BoxBody<Bytes, hyper::Error>;

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
