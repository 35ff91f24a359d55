//! TCP listeners, each mapped to one service: a connection goes to the
//! first target that accepts it, by the rules of [`crate::attempts`]
//! (every failure here is before the first byte, so every target may be
//! tried until the request timeout), then bytes are copied both ways.

use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::ServiceKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::attempts::{AttemptPolicy, Attempts, Ending, Next, Replay};
use crate::metrics::TcpLabels;
use crate::runtime::{Shared, stopped};
use crate::upstream::{TunnelAsk, Upstream};

/// Serves `service` on `listener` until `shutdown` turns true; then stops
/// accepting and waits up to `drain` for live connections to end (a TCP
/// stream cannot be moved to another process, so it is given time).
pub async fn serve(
    listener: TcpListener,
    service: ServiceKey,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let stats = fedmesh_admin::AcceptStats::default();
    let mut live = JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            c = fedmesh_admin::accept(&listener, "tcp", &stats) => c,
            Some(_) = live.join_next(), if !live.is_empty() => continue,
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let (shared, service) = (shared.clone(), service.clone());
        live.spawn(async move { proxy(&shared, &service, tcp).await });
    }
    drop(listener);
    let ended = tokio::time::timeout(drain, async { while live.join_next().await.is_some() {} });
    if ended.await.is_err() {
        tracing::warn!(service = %service, open = live.len(), ?drain, "drain deadline passed with TCP connections open");
    }
}

async fn proxy(shared: &Shared, key: &ServiceKey, mut down: TcpStream) {
    let outcome = |cluster: &str, outcome: &'static str| {
        shared
            .metrics
            .tcp_connections
            .get_or_create(&TcpLabels {
                service: key.to_string(),
                cluster: cluster.into(),
                outcome,
            })
            .inc();
    };
    let table = shared.table.borrow().clone();
    let Some(svc) = table.services.get(key).cloned() else {
        tracing::warn!(service = %key, "no such service (yet); closing the connection");
        return outcome("", "unknown_service");
    };
    let state = shared.state(&svc);
    let Ok(_slot) = state.breakers.connection() else {
        return outcome("", "overloaded");
    };
    let policy = AttemptPolicy {
        retries: 0,
        per_try_timeout: None,
    };
    let deadline = Instant::now() + svc.policy.request_timeout;
    let mut attempts = Attempts::new(deadline.into_std(), policy, Replay::STREAM);
    let (target, up) = loop {
        let now = Instant::now();
        let target = match attempts.next(now.into_std(), |tried| state.choose(&svc, tried)) {
            Next::Try(t) => t.target,
            Next::GiveUp(ending) => {
                tracing::info!(service = %key, attempts = attempts.made(), "no target accepted the connection");
                let label = match ending {
                    Ending::Deadline => "timeout",
                    _ => "no_healthy_upstream",
                };
                return outcome("", label);
            }
        };
        let ask = TunnelAsk {
            service: key,
            port: svc.port,
            traceparent: None,
            deadline: attempts.remaining(now.into_std()),
        };
        match shared.connector.connect(&target, &ask).await {
            Ok(up) => {
                state.finished(&svc, &target, Ok(now.elapsed()));
                break (target, up);
            }
            Err(e) => {
                tracing::debug!(service = %key, %target, error = %e, "connect failed; next target");
                if e.blames_target() {
                    state.finished(&svc, &target, Err(()));
                } else {
                    state.cancelled(&target);
                }
                attempts.not_sent(e);
            }
        }
    };
    let cluster = target.cluster(&shared.me.cluster).to_owned();
    let copied = match up {
        Upstream::Direct(mut s) => tokio::io::copy_bidirectional(&mut down, &mut s)
            .await
            .is_ok(),
        Upstream::Tunnel(mut s) => tokio::io::copy_bidirectional(&mut down, s.as_mut())
            .await
            .is_ok(),
        // The tunnel's splice: 64 KiB handed to QUIC without a copy, and a
        // stream reset (never a clean end) if the app's side fails.
        Upstream::Quic(s) => {
            let (mut recv, mut send) = s.into_inner();
            let (r, w) = down.split();
            fedmesh_tunnel::splice::splice(r, w, &mut send, &mut recv, QUIC_IDLE, &())
                .await
                .is_ok()
        }
    };
    outcome(&cluster, if copied { "success" } else { "reset" });
}

/// A tunnel that moves no byte either way for this long is closed, as the
/// remote gateway's own stream idle timeout would.
const QUIC_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);
