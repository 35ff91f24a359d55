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
use fedmesh_discovery::Discovered;
use fedmesh_gateway::config::GatewayConfig;
use fedmesh_gateway::{Gateway, GatewayOptions, Metrics, StaticConfig, discovered};
use fedmesh_trust::{BundleSet, Svid};
use tokio::sync::watch;

#[derive(Parser)]
#[command(version, about = "fedmesh east-west gateway")]
struct Args {
    /// The gateway's YAML config (see east-west-gateway/README.md).
    #[arg(long, short)]
    config: PathBuf,
    /// How often to look for changes to the config and the files it names.
    #[arg(long, default_value = "2s", value_parser = humantime_parse)]
    reload_interval: Duration,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    fedmesh_trust::install_default_provider();
    // Logs go to stderr; stdout carries only the one "listening" line.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
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
    // What keeps the routes, SVID and bundles current: the file poller, or
    // the discovery client. Dropped (stopped) at shutdown.
    let (listen, settings, routes, svid, bundles, source) = match GatewayConfig::load(&args.config)?
    {
        GatewayConfig::Static(first) => {
            let first = *first;
            let (routes_tx, routes) = watch::channel(Arc::new(first.routes));
            let (svid_tx, svid) = watch::channel(Arc::new(first.svid));
            let (bundles_tx, bundles) = watch::channel(Arc::new(first.bundles));
            let poller = tokio::spawn(reload(
                args.config.clone(),
                args.reload_interval,
                (first.listen.clone(), first.settings.clone()),
                routes_tx,
                svid_tx,
                bundles_tx,
            ));
            let source = Source::File(AbortOnDrop(poller));
            (first.listen, first.settings, routes, svid, bundles, source)
        }
        GatewayConfig::Discovery(c) => {
            tracing::info!(controller = %c.access.address, "getting routes from the controller");
            let d = discovered::connect(&c, Default::default())
                .await
                .context("starting from the controller")?;
            let (routes, svid, bundles) = (d.config.clone(), d.svid.clone(), d.bundles.clone());
            (
                c.listen,
                c.settings,
                routes,
                svid,
                bundles,
                Source::Controller(d),
            )
        }
    };
    let options = GatewayOptions {
        quic: listen.quic,
        egress: listen.egress,
        settings,
    };
    let gateway = Gateway::start(options, routes, svid, bundles, metrics.clone()).await?;
    println!(
        "fedmesh-gateway: quic on {}, egress on {}",
        gateway.quic_addr(),
        gateway
            .egress_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "-".into())
    );
    if let Some(addr) = listen.admin {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the admin port {addr}"))?;
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        if let Source::Controller(d) = &source {
            let status = fedmesh_discovery::StatusMetrics(d.status.clone());
            registry.register_collector(Box::new(status));
        }
        let ready = Arc::new(|| Ok("serving".to_string()));
        tokio::spawn(fedmesh_admin::serve(listener, Arc::new(registry), ready));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("draining");
    let left = gateway.shutdown().await;
    tracing::info!(cut_short = left, "stopped");
    Ok(())
}

/// Where the running config comes from.
#[allow(dead_code)] // Held only for its Drop.
enum Source {
    File(AbortOnDrop),
    Controller(Discovered<fedmesh_gateway::Routes>),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls the config; applies routes, SVID and bundles when they change. A
/// bad edit is logged and the running config stays.
async fn reload(
    path: PathBuf,
    every: Duration,
    fixed: (fedmesh_gateway::config::Listen, fedmesh_gateway::Settings),
    routes: watch::Sender<Arc<fedmesh_gateway::Routes>>,
    svid: watch::Sender<Arc<Svid>>,
    bundles: watch::Sender<Arc<BundleSet>>,
) {
    let mut warned = false;
    loop {
        tokio::time::sleep(every).await;
        let path2: PathBuf = path.clone();
        let loaded =
            tokio::task::spawn_blocking(move || StaticConfig::load(Path::new(&path2))).await;
        let c = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "config not reloaded; keeping the running one");
                continue;
            }
            Err(_) => continue,
        };
        if (c.listen.clone(), c.settings.clone()) != fixed && !warned {
            tracing::warn!("`listen` and `settings` changes take effect only at restart");
            warned = true;
        }
        routes.send_if_modified(|r| {
            let changed = **r != c.routes;
            if changed {
                tracing::info!("routes reloaded");
                *r = Arc::new(c.routes);
            }
            changed
        });
        fedmesh_discovery::files::publish_identity(&svid, c.svid, &bundles, c.bundles);
    }
}
