//! `fedmesh-proxy --config proxy.yaml`: the local proxy. With `controller:`
//! in the file it takes its SVID, bundles and services from the cluster's
//! controller; without, it runs standalone from the file, which is re-read
//! when it (or a file it names) changes. SIGTERM or Ctrl-C drains it.
//! With `--handoff`, a proxy started with the same path takes over its
//! listeners, and it drains: a restart that drops nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedmesh_dataplane::process::{duration_arg, init_logs, shutdown_signal};
use fedmesh_dataplane::{ConfigSource, Snapshot};
use fedmesh_proxy::Proxy;
use fedmesh_proxy::config::{AccessLog, Me, ProxyConfig, Settings, StaticConfig};
use fedmesh_proxy::table::Table;

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
    #[arg(long, default_value = "2s", value_parser = duration_arg)]
    reload_interval: Duration,
    /// A Unix socket for restarts that drop nothing: a proxy started while
    /// another serves this path takes that one's listening sockets once it
    /// is ready, and that one drains; then it serves the path itself.
    #[arg(long)]
    handoff: Option<PathBuf>,
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
    init_logs(config.common().settings.access_log == AccessLog::Json);
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
    let (source, on_demand) = match config {
        ProxyConfig::Static(first) => {
            let me = common.me.clone();
            let started = common.settings.clone();
            let first = snapshot(&me, *first);
            let load = move |p: &Path| reload(&me, &started, p);
            (
                ConfigSource::file(args.config.clone(), args.reload_interval, first, load),
                false,
            )
        }
        ProxyConfig::Discovery(c) => {
            tracing::info!(controller = %c.access.address, "getting services from the controller");
            let me = common.me.clone();
            let settings = common.settings.clone();
            let policy = fedmesh_discovery::ClientPolicy {
                scope: c.scope,
                subscribe: c.subscribe.clone(),
                ..Default::default()
            };
            let d = fedmesh_discovery::start(
                c.access.clone(),
                c.bootstrap.clone(),
                policy,
                move |m, bundles| fedmesh_proxy::discovered::table(&me, &settings, m, bundles),
            )
            .await
            .context("starting from the controller")?;
            let listed = c.scope == fedmesh_proto::discovery::v1::Scope::Listed;
            (ConfigSource::controller(d), listed)
        }
    };
    // The source keeps the feeds current until it is dropped, at exit.
    let (source, feeds) = source;
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
        discovery: source.status(),
        on_demand: source.on_demand().filter(|_| on_demand),
        inherited: take_over(args.handoff.as_deref()).await?,
    };
    let mut proxy =
        Proxy::start_with(&common, feeds.config, feeds.svid, feeds.bundles, extras).await?;
    proxy
        .accepting()
        .context("telling the proxy taken over from that this one accepts")?;
    let show = |a: Option<std::net::SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
    let tcp: Vec<String> = proxy.tcp.iter().map(|a| a.to_string()).collect();
    println!(
        "fedmesh-proxy: http on {}, tcp on [{}], admin on {}",
        show(proxy.http),
        tcp.join(", "),
        show(proxy.admin)
    );
    until_stopped(&proxy, args.handoff.as_deref()).await?;
    tracing::info!("draining");
    proxy.drain().await;
    if let Some(p) = provider {
        // Flushes the last spans; its exports need this runtime's thread.
        let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
    }
    drop(source);
    tracing::info!("stopped");
    Ok(())
}

/// The listeners of the proxy serving `handoff`, if one does; taken once
/// this one is ready (its config is loaded by now).
async fn take_over(
    handoff: Option<&Path>,
) -> anyhow::Result<Option<fedmesh_dataplane::handoff::Inherited>> {
    let Some(path) = handoff.map(Path::to_path_buf) else {
        return Ok(None);
    };
    let taken = tokio::task::spawn_blocking(move || fedmesh_dataplane::handoff::take_over(&path))
        .await
        .context("taking over the listeners")??;
    if let Some(t) = &taken {
        tracing::info!(listeners = ?t.addresses(), "taking over the running proxy's listeners");
    }
    Ok(taken)
}

/// Until SIGTERM or Ctrl-C, or until a proxy started with the same
/// `handoff` path has taken the listeners and accepts on them.
async fn until_stopped(proxy: &Proxy, handoff: Option<&Path>) -> anyhow::Result<()> {
    let Some(path) = handoff else {
        return shutdown_signal().await;
    };
    let offering = match proxy.offer(path) {
        Ok(o) => o,
        Err(e) => {
            // Serving matters more than a graceful next restart.
            tracing::warn!(error = %e, "cannot offer the listeners to a successor; a restart will drop connections");
            return shutdown_signal().await;
        }
    };
    tokio::select! {
        // The offering, dropped here, lets the sockets close as the drain
        // stops accepting.
        r = shutdown_signal() => r,
        r = offering.wait() => {
            r?;
            tracing::info!("a new proxy took over the listeners");
            Ok(())
        }
    }
}

/// A static config's table, its services' policies over the file's
/// settings (per-service settings apply on every read).
fn snapshot(me: &Me, c: StaticConfig) -> Snapshot<Table> {
    let settings = &c.common.settings;
    let table = Table::build(&me.cluster, &me.locality, settings, &c.services)
        .reaching(settings.egress.unwrap_or_default(), c.peers);
    Snapshot {
        config: table,
        svid: c.svid,
        bundles: c.bundles,
    }
}

/// A static config re-read: services, their policies and the per-service
/// settings apply at once; what takes a restart is said so.
fn reload(me: &Me, started: &Settings, path: &Path) -> Result<Snapshot<Table>, String> {
    match ProxyConfig::load(path).map_err(|e| e.to_string())? {
        ProxyConfig::Static(c) => {
            if c.common.me != *me {
                tracing::warn!(
                    "cluster, trust domain and locality changes take effect only at restart"
                );
            }
            let pending = started.restart_only_changes(&c.common.settings);
            if !pending.is_empty() {
                tracing::warn!(fields = ?pending, "settings changed that take effect only at restart; the rest of the file applies now");
            }
            Ok(snapshot(me, *c))
        }
        ProxyConfig::Discovery(_) => {
            Err("the config now names a controller; that takes a restart".into())
        }
    }
}
