//! TCP listeners, each mapped to one service: a connection goes to the
//! first target that accepts it (every failure here is before the first
//! byte, so every target may be tried), then bytes are copied both ways.

use std::sync::Arc;

use fedmesh_api::ServiceKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::TcpLabels;
use crate::runtime::{Shared, stopped};
use crate::table::TargetKey;
use crate::upstream::{TunnelAsk, Upstream};

/// Serves `service` on `listener` until `shutdown` turns true. Live
/// connections are left to end by themselves, bounded by the caller's
/// drain deadline.
pub async fn serve(
    listener: TcpListener,
    service: ServiceKey,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stats = fedmesh_admin::AcceptStats::default();
    loop {
        let (tcp, _) = tokio::select! {
            c = fedmesh_admin::accept(&listener, "tcp", &stats) => c,
            _ = stopped(&mut shutdown) => return,
        };
        let _ = tcp.set_nodelay(true);
        let (shared, service) = (shared.clone(), service.clone());
        tokio::spawn(async move { proxy(&shared, &service, tcp).await });
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
    let state = shared.state(key);
    let Ok(_slot) = state.breakers.connection() else {
        return outcome("", "overloaded");
    };
    let deadline = Instant::now() + shared.settings.request_timeout;
    let mut tried: Vec<TargetKey> = Vec::new();
    let (target, mut up) = loop {
        let Some(target) = state.choose(&svc, &tried) else {
            tracing::info!(service = %key, tried = tried.len(), "no target accepted the connection");
            return outcome("", "no_healthy_upstream");
        };
        let started = Instant::now();
        let ask = TunnelAsk {
            service: key,
            port: svc.port,
            traceparent: None,
            deadline: deadline.saturating_duration_since(started),
        };
        match shared.connector.connect(&target, &ask).await {
            Ok(up) => {
                state.finished(&svc, &target, Ok(started.elapsed()));
                break (target, up);
            }
            Err(e) => {
                tracing::debug!(service = %key, %target, error = %e, "connect failed; next target");
                if e.blames_target() {
                    state.finished(&svc, &target, Err(()));
                } else {
                    state.cancelled(&target);
                }
                tried.push(target);
            }
        }
    };
    let cluster = target.cluster(&shared.me.cluster).to_owned();
    let copied = match &mut up {
        Upstream::Direct(s) => tokio::io::copy_bidirectional(&mut down, s).await,
        Upstream::Tunnel(s) => tokio::io::copy_bidirectional(&mut down, s.as_mut()).await,
    };
    outcome(&cluster, if copied.is_ok() { "success" } else { "reset" });
}
