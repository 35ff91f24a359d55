//! `fedmesh-controller`: the federation controller of one cluster.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_controller::tokens::Tokens;
use fedmesh_zone::join::JoinDir;

#[derive(Parser, Debug)]
#[command(
    name = "fedmesh-controller",
    version,
    about = "The federation controller of one cluster: publishes its services to the global zone, watches everyone else's, and serves the mesh to local proxies and gateways."
)]
struct Args {
    /// The join directory written by `fedmesh register cluster`.
    #[arg(long)]
    join: PathBuf,
    /// The file registry of local services (YAML), re-read when it changes.
    #[arg(long)]
    registry: PathBuf,
    /// Address of the discovery and Certify API (gRPC over mutual TLS).
    #[arg(long, default_value = "127.0.0.1:15010")]
    listen: SocketAddr,
    /// Address of the admin port (/metrics, /ready, /live).
    #[arg(long, default_value = "127.0.0.1:15014")]
    admin: SocketAddr,
    /// The join tokens file `fedmesh token create|list|revoke` manages
    /// (hashes, expiries, single-use). Re-read when it changes.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// TTL of this cluster's liveness key, in seconds.
    #[arg(long, default_value_t = 10)]
    alive_ttl: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    fedmesh_trust::install_default_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let join = JoinDir::load(&args.join)
        .with_context(|| format!("loading the join directory {}", args.join.display()))?;
    let mut config = ControllerConfig::new(join, LocalSource::file(args.registry), args.listen);
    config.admin_addr = Some(args.admin);
    config.join_dir = Some(args.join.clone());
    config.alive_ttl = Duration::from_secs(args.alive_ttl.max(2));
    if let Some(path) = &args.tokens {
        config.tokens = Tokens::from_file(path.clone())?;
    }
    let controller = Controller::start(config).await?;
    println!(
        "fedmesh-controller: discovery on {}, admin on {}",
        controller.discovery_addr,
        controller
            .admin_addr
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    controller.shutdown().await;
    Ok(())
}
