//! `fedmesh-gateway --config gateway.yaml`: an east-west gateway. With
//! `controller:` in the file it takes its SVID, bundles and routes from the
//! cluster's controller; without, it runs standalone from the file, which
//! is re-read when it (or a file it names) changes. SIGTERM or Ctrl-C
//! drains it gracefully.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedmesh_dataplane::process::{duration_arg, init_logs, serve_admin, shutdown_signal};
use fedmesh_dataplane::{ConfigSource, Snapshot};
use fedmesh_gateway::config::{GatewayConfig, Listen};
use fedmesh_gateway::{
    Gateway, GatewayOptions, Metrics, Routes, Settings, StaticConfig, discovered,
};

#[derive(Parser)]
#[command(version, about = "fedmesh east-west gateway")]
struct Args {
    /// The gateway's YAML config (see east-west-gateway/README.md).
    #[arg(long, short)]
    config: PathBuf,
    /// How often to look for changes to the config and the files it names.
    #[arg(long, default_value = "2s", value_parser = duration_arg)]
    reload_interval: Duration,
}

fn main() -> ExitCode {
    fedmesh_trust::install_default_provider();
    init_logs(false);
    let args = Args::parse();
    let result = tokio::runtime::Runtime::new()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (listen, settings, (source, feeds)) = match GatewayConfig::load(&args.config)? {
        GatewayConfig::Static(first) => {
            let fixed = (first.listen.clone(), first.settings.clone());
            let (listen, settings) = fixed.clone();
            let first = snapshot(*first);
            let load = move |p: &Path| reload(&fixed, p);
            let source = ConfigSource::file(args.config.clone(), args.reload_interval, first, load);
            (listen, settings, source)
        }
        GatewayConfig::Discovery(c) => {
            tracing::info!(controller = %c.access.address, "getting routes from the controller");
            let d = discovered::connect(&c, Default::default())
                .await
                .context("starting from the controller")?;
            (c.listen, c.settings, ConfigSource::controller(d))
        }
    };
    let options = GatewayOptions {
        quic: listen.quic,
        egress: listen.egress,
        settings,
    };
    let gateway = Gateway::start(
        options,
        feeds.config,
        feeds.svid,
        feeds.bundles,
        metrics.clone(),
    )
    .await?;
    println!(
        "fedmesh-gateway: quic on {}, egress on {}",
        gateway.quic_addr(),
        gateway
            .egress_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(addr) = listen.admin {
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        if let Some(status) = source.status() {
            registry.register_collector(Box::new(fedmesh_discovery::StatusMetrics(status)));
        }
        serve_admin(addr, registry, Arc::new(|| Ok("serving".to_string()))).await?;
    }
    shutdown_signal().await?;
    tracing::info!("draining");
    let left = gateway.shutdown().await;
    drop(source);
    tracing::info!(cut_short = left, "stopped");
    Ok(())
}

fn snapshot(c: StaticConfig) -> Snapshot<Routes> {
    Snapshot {
        config: c.routes,
        svid: c.svid,
        bundles: c.bundles,
    }
}

/// The config re-read. Only routes, SVID and bundles change a running
/// gateway.
fn reload(fixed: &(Listen, Settings), path: &Path) -> Result<Snapshot<Routes>, String> {
    let c = StaticConfig::load(path).map_err(|e| e.to_string())?;
    if (c.listen.clone(), c.settings.clone()) != *fixed {
        tracing::warn!("`listen` and `settings` changes take effect only at restart");
    }
    Ok(snapshot(c))
}
