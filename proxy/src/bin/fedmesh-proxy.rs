//! `fedmesh-proxy --config proxy.yaml`: the local proxy. With `controller:`
//! in the file it takes its SVID, bundles and services from the cluster's
//! controller; without, it runs standalone from the file, which is re-read
//! when it (or a file it names) changes. SIGTERM or Ctrl-C drains it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedmesh_proxy::Proxy;
use fedmesh_proxy::config::{AccessLog, Me, ProxyConfig, StaticConfig};
use fedmesh_proxy::table::Table;
use fedmesh_trust::{BundleSet, Svid};
use tokio::sync::watch;

#[derive(Parser)]
#[command(version, about = "fedmesh local proxy")]
struct Args {
    /// The proxy's YAML config (see proxy/README.md).
    #[arg(long, short)]
    config: PathBuf,
    /// Worker threads. One (the default, as for Linkerd's proxy) keeps a
    /// sidecar's latency and memory lowest; raise it for a proxy that is
    /// CPU-bound.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// How often a static config is checked for changes.
    #[arg(long, default_value = "2s", value_parser = humantime_parse)]
    reload_interval: Duration,
}

fn humantime_parse(s: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    fedmesh_trust::install_default_provider();
    let args = Args::parse();
    // The log format follows `settings.accessLog`, so the file is read
    // before logging starts; its errors go to stderr as plain text.
    let config = match ProxyConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if config.common().settings.access_log == AccessLog::Json {
        logs.json().init();
    } else {
        logs.init();
    }
    let runtime = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(usize::from(n));
            b
        }
    }
    .enable_all()
    .build();
    let result = runtime
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(args, config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, config: ProxyConfig) -> anyhow::Result<()> {
    let common = config.common().clone();
    // What keeps the table, SVID and bundles current; dropped at shutdown.
    let (table, svid, bundles, _source, discovery, on_demand) = match config {
        ProxyConfig::Static(first) => {
            let first = *first;
            let t = Table::build(&common.me.cluster, &common.me.locality, &first.services);
            let (table_tx, table) = watch::channel(Arc::new(t));
            let (svid_tx, svid) = watch::channel(Arc::new(first.svid));
            let (bundles_tx, bundles) = watch::channel(Arc::new(first.bundles));
            let poller = tokio::spawn(reload(
                args.config.clone(),
                args.reload_interval,
                common.me.clone(),
                table_tx,
                svid_tx,
                bundles_tx,
            ));
            (
                table,
                svid,
                bundles,
                Source::File(AbortOnDrop(poller)),
                None,
                None,
            )
        }
        ProxyConfig::Discovery(c) => {
            tracing::info!(controller = %c.access.address, "getting services from the controller");
            let me = common.me.clone();
            let failover = common.settings.failover.clone();
            let policy = fedmesh_discovery::ClientPolicy {
                scope: c.scope,
                subscribe: c.subscribe.clone(),
                ..Default::default()
            };
            let d = fedmesh_discovery::start(
                c.access.clone(),
                c.bootstrap.clone(),
                policy,
                move |m, _| {
                    let specs = fedmesh_proxy::discovered::services(&me.cluster, m, &failover)?;
                    Ok(Table::build(&me.cluster, &me.locality, &specs))
                },
            )
            .await
            .context("starting from the controller")?;
            let (t, s, b) = (d.config.clone(), d.svid.clone(), d.bundles.clone());
            let status = Some(d.status.clone());
            let on_demand = (c.scope == fedmesh_proto::discovery::v1::Scope::Listed)
                .then(|| d.on_demand.clone());
            (t, s, b, Source::Controller(d), status, on_demand)
        }
    };
    let provider = match &common.settings.otlp_endpoint {
        Some(endpoint) => {
            let p = fedmesh_proxy::trace::otlp(endpoint, "fedmesh-proxy")
                .map_err(anyhow::Error::msg)?;
            tracing::info!(%endpoint, "exporting traces over OTLP");
            Some(p)
        }
        None => None,
    };
    let tracer = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        p.tracer("fedmesh-proxy")
    });
    let extras = fedmesh_proxy::Extras {
        tracer,
        discovery,
        on_demand,
    };
    let proxy = Proxy::start_with(&common, table, svid, bundles, extras).await?;
    let show = |a: Option<std::net::SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
    let tcp: Vec<String> = proxy.tcp.iter().map(|a| a.to_string()).collect();
    println!(
        "fedmesh-proxy: http on {}, tcp on [{}], admin on {}",
        show(proxy.http),
        tcp.join(", "),
        show(proxy.admin)
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("draining");
    proxy.drain().await;
    if let Some(p) = provider {
        // Flushes the last spans; its exports need this runtime's thread.
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Where the running config comes from.
#[allow(dead_code)] // Held only for its Drop.
enum Source {
    File(AbortOnDrop),
    Controller(fedmesh_discovery::Discovered<Table>),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls a static config; applies services, SVID and bundles when they
/// change. A bad edit is logged and the running config stays.
async fn reload(
    path: PathBuf,
    every: Duration,
    me: Me,
    table: watch::Sender<Arc<Table>>,
    svid: watch::Sender<Arc<Svid>>,
    bundles: watch::Sender<Arc<BundleSet>>,
) {
    loop {
        tokio::time::sleep(every).await;
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || ProxyConfig::load(Path::new(&p))).await;
        let c: StaticConfig = match loaded {
            Ok(Ok(ProxyConfig::Static(c))) => *c,
            Ok(Ok(ProxyConfig::Discovery(_))) => {
                tracing::error!("the config now names a controller; that takes a restart");
                continue;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "config not reloaded; keeping the running one");
                continue;
            }
            Err(_) => continue,
        };
        if c.common.me != me {
            tracing::warn!(
                "cluster, trust domain and locality changes take effect only at restart"
            );
        }
        let t = Table::build(&me.cluster, &me.locality, &c.services);
        table.send_if_modified(|cur| {
            let changed = **cur != t;
            if changed {
                tracing::info!(services = t.services.len(), "services reloaded");
                *cur = Arc::new(t);
            }
            changed
        });
        fedmesh_discovery::files::publish_identity(&svid, c.svid, &bundles, c.bundles);
    }
}
