//! A data-plane process's plumbing: logs on stderr (stdout carries only
//! the one "listening" line that tests and `fedmesh up` read), the admin
//! port, and the signal that starts a drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); as JSON lines
/// when `json`.
pub fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Parses a command-line duration such as `2s` or `500ms`.
pub fn duration_arg(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Serves `/metrics`, `/ready` and `/live` on `addr`; returns the bound
/// address. The server runs until the runtime stops.
pub async fn serve_admin(
    addr: SocketAddr,
    registry: Registry,
    ready: fedmesh_admin::Readiness,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin port {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(fedmesh_admin::serve(listener, Arc::new(registry), ready));
    Ok(bound)
}

/// Resolves at SIGTERM or Ctrl-C.
pub async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
