//! `fedmesh-controller`: the federation controller of one cluster.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_controller::kubernetes::KubeOptions;
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
    /// With `--kube` too, both sources are followed (VMs beside pods).
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Use this cluster's Kubernetes API: export the Services that have a
    /// `ServiceExport`, write `ServiceImport`s for the clusterset, and
    /// accept ServiceAccount tokens in Certify. Connects with the
    /// in-cluster config, else `$KUBECONFIG` or `~/.kube/config`.
    #[arg(long)]
    kube: bool,
    /// The kubeconfig to use (implies `--kube`).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The address `ServiceImport`s carry for `clusterset.local` names:
    /// the ClusterIP of the fedmesh-proxy Service.
    #[arg(long, value_name = "IP")]
    clusterset_ip: Option<std::net::IpAddr>,
    /// With `--kube`: the ServiceAccount (namespace/name) the cluster's
    /// gateways run as; its projected tokens are issued the gateway
    /// identity. `none` leaves gateways to join tokens.
    #[arg(
        long,
        value_name = "NS/NAME",
        default_value = "fedmesh-system/fedmesh-gateway"
    )]
    gateway_service_account: String,
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
    /// Where the controller keeps what must outlive a restart: its last
    /// good view of the global zone, and the cluster's newest signed
    /// record. With it, a controller restarted while etcd is down, empty or
    /// restored from an old backup keeps serving every remote cluster it
    /// served; without it, a restart starts from etcd alone. Created 0700.
    #[arg(long, value_name = "DIR", env = "FEDMESH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Believe unsigned values in the global zone, for the one step of
    /// upgrading a federation created before records were signed (then
    /// `fedmesh anchor adopt`, and restart without it). Any cluster's etcd
    /// credentials can forge what this believes.
    #[arg(long)]
    trust_unsigned: bool,
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
    let kube = args.kube || args.kubeconfig.is_some();
    if args.registry.is_none() && !kube {
        anyhow::bail!(
            "no local source: give --registry (the file registry), --kube (Kubernetes), or both"
        );
    }
    if args.clusterset_ip.is_some() && !kube {
        anyhow::bail!("--clusterset-ip needs --kube: it is written into ServiceImports");
    }
    let gateway_account = match args.gateway_service_account.as_str() {
        "none" => None,
        other => Some(service_account(other)?),
    };
    let join = JoinDir::load(&args.join)
        .with_context(|| format!("loading the join directory {}", args.join.display()))?;
    let source = match &args.registry {
        Some(path) => LocalSource::file(path.clone()),
        None => LocalSource::None,
    };
    let mut config = ControllerConfig::new(join, source, args.listen);
    if kube {
        let client = kube_client(args.kubeconfig.as_deref()).await?;
        config.kube = Some(KubeOptions {
            client,
            clusterset_ip: args.clusterset_ip,
            gateway_account,
        });
    }
    config.admin_addr = Some(args.admin);
    config.join_dir = Some(args.join.clone());
    config.trust_unsigned = args.trust_unsigned;
    match &args.state_dir {
        Some(dir) => {
            create_private_dir(dir)
                .with_context(|| format!("--state-dir: creating {}", dir.display()))?;
            config.state_dir = Some(dir.clone());
        }
        None => tracing::warn!(
            "no --state-dir: a restart while etcd is down, empty or restored from an old backup starts from what etcd holds, and may withdraw remote clusters until their owners publish again"
        ),
    }
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

/// A client from `path`, or as kubectl finds one.
async fn kube_client(path: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match path {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: not in a pod, and no $KUBECONFIG or ~/.kube/config",
        )?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// `namespace/name`, read by the rule service keys follow.
fn service_account(s: &str) -> anyhow::Result<fedmesh_kube::ServiceAccount> {
    let key: fedmesh_api::ServiceKey = s.parse().map_err(|_| {
        anyhow::anyhow!("--gateway-service-account {s:?}: expected namespace/name, or none")
    })?;
    Ok(fedmesh_kube::ServiceAccount {
        namespace: key.namespace,
        name: key.name,
    })
}

/// `dir` (and its parents), private to this user when it is ours to make
/// so: a mounted volume (a Kubernetes emptyDir) belongs to root, and the
/// files written in it are 0600 anyway.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), error = %e, "the state directory cannot be made private; its files are written 0600");
        }
    }
    Ok(())
}
