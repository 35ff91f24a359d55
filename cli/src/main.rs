//! `fedmesh`: the operator's command. It joins clusters to the federation and
//! shows what the global zone holds.

#![forbid(unsafe_code)]

mod demo;
mod up;
mod wan;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use etcd_client::{Client, ConnectOptions};
use fedmesh_api::{ClusterRecord, DEFAULT_PREFIX, GatewayAddress, KeySpace, validate_label};
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, TrustDomain};
use fedmesh_zone::client::cluster_role;
use fedmesh_zone::join::{EtcdAccess, JoinDir};
use fedmesh_zone::{GlobalZone, RegisterOutcome};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "fedmesh",
    version,
    about = "Operate a fedmesh federation: join clusters, inspect the global zone.",
    after_help = "To join a cluster:\n  fedmesh register cluster aws-use1 --cloud aws --region us-east-1 \\\n      --zones use1-az1,use1-az2 --gateway 127.0.1.1:15443 --etcd http://127.0.0.1:2379\n  fedmesh-controller --join ./fedmesh-join-aws-use1 --registry services.yaml"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct EtcdFlags {
    /// etcd endpoints of the global zone, comma-separated.
    #[arg(
        long,
        env = "FEDMESH_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// etcd user with rights to register clusters (needed when etcd runs with auth).
    #[arg(long, env = "FEDMESH_ETCD_USER")]
    etcd_user: Option<String>,
    /// Password of --etcd-user.
    #[arg(long, env = "FEDMESH_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// Key prefix of the global zone.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join a cluster to the federation.
    Register {
        #[command(subcommand)]
        what: RegisterWhat,
    },
    /// Remove a cluster from the federation: its record, bundle, exports and etcd role.
    Deregister {
        #[command(subcommand)]
        what: DeregisterWhat,
    },
    /// Show what the global zone holds.
    Get {
        what: GetWhat,
        /// Output format.
        #[arg(short, long, default_value = "table")]
        output: Output,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
    /// Run a whole federation on this machine from a topology file: etcd,
    /// each cluster's registration, controller, gateways and proxy, and demo
    /// backends. Stays in the foreground until Ctrl-C.
    Up {
        /// The topology (see topologies/README.md).
        topology: PathBuf,
        /// Run in the background; `fedmesh down` stops it.
        #[arg(short = 'd', long)]
        detach: bool,
        /// Where logs, pids and state go [default: .fedmesh/<topology name>].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Stop what `fedmesh up` started.
    Down {
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Live health of what `fedmesh up` started.
    Status {
        #[arg(short, long, default_value = "table")]
        output: StatusOutput,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Stop demo backends: <cluster>/<namespace>/<name>[@zone]. They are
    /// also marked unhealthy in their cluster's registry.
    Stop {
        target: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Start stopped demo backends again: <cluster>/<namespace>/<name>[@zone].
    Start {
        target: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// A demo backend (started by `fedmesh up`).
    #[command(hide = true)]
    DemoBackend {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        zone: String,
        #[arg(long)]
        service: String,
        #[arg(long)]
        tcp: bool,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum StatusOutput {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum RegisterWhat {
    /// Create (or import) the cluster's CA, publish its record and trust
    /// bundle in one etcd transaction, and write its join directory.
    /// Running it again with the same values changes nothing.
    Cluster(Box<RegisterCluster>),
}

#[derive(Subcommand, Debug)]
enum DeregisterWhat {
    /// Remove a cluster.
    Cluster {
        /// The cluster's name.
        name: String,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
}

#[derive(Args, Debug)]
struct RegisterCluster {
    /// Cluster name: an RFC 1123 label (lowercase letters, digits, '-'; at most 63).
    name: String,
    /// Cloud the cluster runs in (aws, gcp, azure, onprem, ...).
    #[arg(long)]
    cloud: String,
    /// Region within the cloud (us-east-1, europe-west1, ...).
    #[arg(long)]
    region: String,
    /// Zones of the cluster, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    zones: Vec<String>,
    /// East-west gateway addresses peers dial, host:port, comma-separated.
    #[arg(long = "gateway", value_delimiter = ',', required = true)]
    gateways: Vec<String>,
    /// SPIFFE trust domain of the cluster [default: <name>.fedmesh].
    #[arg(long)]
    trust_domain: Option<String>,
    /// Extra labels, key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Import an existing CA certificate (PEM) instead of creating one.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key (PEM) of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Where to write the join directory [default: ./fedmesh-join-<name>].
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    etcd: EtcdFlags,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum GetWhat {
    Clusters,
    Services,
    Bundles,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Output {
    Table,
    Json,
    Yaml,
}

fn main() -> ExitCode {
    fedmesh_trust::install_default_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Register {
            what: RegisterWhat::Cluster(args),
        } => register(*args).await,
        Command::Deregister {
            what: DeregisterWhat::Cluster { name, etcd },
        } => deregister(&name, &etcd).await,
        Command::Get { what, output, etcd } => get(what, output, &etcd).await,
        Command::Up {
            topology,
            detach,
            state_dir,
        } => {
            let t = up::load_topology(&topology)?;
            let dir = up::state_dir_for(state_dir, &t);
            if detach {
                up::up_detached(&topology, &dir).await
            } else {
                up::up(&topology, &dir).await
            }
        }
        Command::Down { state_dir } => up::down(&up::find_state_dir(state_dir)?).await,
        Command::Status { output, state_dir } => {
            let dir = up::find_state_dir(state_dir)?;
            let s = up::State::load(&dir)?;
            match output {
                StatusOutput::Table => up::print_status(&s, &dir).await,
                StatusOutput::Json => {
                    let live = up::liveness(&s).await;
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&up::status_of(&s, &live))?
                    )
                }
            }
            Ok(())
        }
        Command::Stop { target, state_dir } => {
            up::stop_start(&up::find_state_dir(state_dir)?, &target, false).await
        }
        Command::Start { target, state_dir } => {
            up::stop_start(&up::find_state_dir(state_dir)?, &target, true).await
        }
        Command::DemoBackend {
            listen,
            cluster,
            zone,
            service,
            tcp,
        } => demo::run(listen, cluster, zone, service, tcp).await,
    }
}

/// Everything `register` needs, checked before any I/O.
struct Plan {
    record: ClusterRecord,
    trust_domain: TrustDomain,
    out: PathBuf,
}

fn plan(args: &RegisterCluster) -> anyhow::Result<Plan> {
    validate_label("cluster name", &args.name)?;
    let td_name = args
        .trust_domain
        .clone()
        .unwrap_or_else(|| format!("{}.fedmesh", args.name));
    let trust_domain =
        TrustDomain::new(&td_name).with_context(|| format!("--trust-domain {td_name:?}"))?;
    let gateways = args
        .gateways
        .iter()
        .map(|g| g.parse::<GatewayAddress>())
        .collect::<Result<Vec<_>, _>>()
        .context("--gateway")?;
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected key=value"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let record = ClusterRecord {
        name: args.name.clone(),
        cloud: args.cloud.clone(),
        region: args.region.clone(),
        zones: args.zones.clone(),
        trust_domain: trust_domain.to_string(),
        gateways,
        labels,
        registered_at: time::OffsetDateTime::now_utc(),
    };
    record.validate()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("fedmesh-join-{}", args.name)));
    Ok(Plan {
        record,
        trust_domain,
        out,
    })
}

async fn connect(flags: &EtcdFlags) -> anyhow::Result<GlobalZone> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10));
    if let (Some(u), Some(p)) = (&flags.etcd_user, &flags.etcd_password) {
        opts = opts.with_user(u.as_str(), p.as_str());
    }
    let endpoints = flags.etcd.join(",");
    let mut client = Client::connect(&flags.etcd, Some(opts))
        .await
        .with_context(|| format!("connecting to etcd at {endpoints}"))?;
    // The client connects lazily; ask once so that an unreachable etcd is
    // reported as such, before anything else is attempted.
    client
        .status()
        .await
        .with_context(|| format!("connecting to etcd at {endpoints}"))?;
    Ok(GlobalZone::new(client, KeySpace::new(&flags.prefix)))
}

fn load_or_create_ca(args: &RegisterCluster, plan: &Plan) -> anyhow::Result<ClusterCa> {
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        return Ok(ClusterCa::from_pem(
            &plan.trust_domain,
            &read(cert)?,
            &read(key)?,
            &cert.display().to_string(),
            &key.display().to_string(),
        )?);
    }
    if let Some(ca) = JoinDir::existing_ca(&plan.out, &plan.trust_domain) {
        return Ok(ca);
    }
    Ok(ClusterCa::generate(
        &plan.trust_domain,
        &CaOptions::default(),
        SystemTime::now(),
    )?)
}

async fn register(args: RegisterCluster) -> anyhow::Result<()> {
    let plan = plan(&args)?;
    let ca = load_or_create_ca(&args, &plan)?;
    let bundle = Bundle::with_roots(plan.trust_domain.clone(), [ca.cert_der().clone()]);
    let mut zone = connect(&args.etcd).await?;
    let outcome = zone
        .register(&plan.record, &bundle)
        .await
        .with_context(|| format!("registering cluster {:?}", plan.record.name))?;

    // With auth, the cluster gets its own etcd user, allowed to write only its keys.
    let mut access = EtcdAccess {
        endpoints: args.etcd.etcd.clone(),
        prefix: zone.keys().prefix().to_owned(),
        user: None,
        password: None,
    };
    if args.etcd.etcd_user.is_some() {
        let previous = JoinDir::existing_etcd(&plan.out).and_then(|e| e.password);
        let password = match previous {
            Some(p) => p,
            None => random_password()?,
        };
        zone.ensure_cluster_access(&plan.record.name, &plan.record.trust_domain, &password)
            .await
            .context("creating the cluster's etcd user and role")?;
        access.user = Some(cluster_role(&plan.record.name));
        access.password = Some(password);
    }
    let join = JoinDir {
        cluster: plan.record.clone(),
        etcd: access,
        ca,
    };
    join.write(&plan.out)
        .with_context(|| format!("writing the join directory {}", plan.out.display()))?;

    let verb = match outcome {
        RegisterOutcome::Created => "registered",
        RegisterOutcome::Updated => "updated",
        RegisterOutcome::Unchanged => "already registered, unchanged:",
    };
    println!(
        "cluster {} {verb} (trust domain {}, {} zone(s), {} gateway(s))",
        plan.record.name,
        plan.record.trust_domain,
        plan.record.zones.len(),
        plan.record.gateways.len()
    );
    println!("join directory: {}", plan.out.display());
    println!(
        "next: fedmesh-controller --join {} --registry <services.yaml>",
        plan.out.display()
    );
    Ok(())
}

fn random_password() -> anyhow::Result<String> {
    let mut bytes = [0u8; 18];
    fedmesh_trust::crypto_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn deregister(name: &str, flags: &EtcdFlags) -> anyhow::Result<()> {
    validate_label("cluster name", name)?;
    let mut zone = connect(flags).await?;
    let record = zone
        .deregister(name)
        .await
        .with_context(|| format!("deregistering cluster {name:?}"))?;
    if flags.etcd_user.is_some() {
        zone.remove_cluster_access(name)
            .await
            .context("removing the cluster's etcd user and role")?;
    }
    println!(
        "cluster {name} deregistered (trust domain {} and its exports removed)",
        record.trust_domain
    );
    Ok(())
}

/// A cluster's record with its liveness: `LIVE`, or `STALE` with the time
/// since its controller was last seen (it is still served).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterRow {
    #[serde(flatten)]
    record: fedmesh_api::ClusterRecord,
    liveness: fedmesh_api::Liveness,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceRow {
    cluster: String,
    namespace: String,
    service: String,
    ports: Vec<u16>,
    healthy: u64,
    total: u64,
    generation: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleRow {
    trust_domain: String,
    roots: usize,
    sequence: u64,
    document: serde_json::Value,
}

async fn get(what: GetWhat, output: Output, flags: &EtcdFlags) -> anyhow::Result<()> {
    let mut zone = connect(flags).await?;
    match what {
        GetWhat::Clusters => {
            let records = zone.clusters().await?;
            let liveness = zone
                .liveness(&records, time::OffsetDateTime::now_utc())
                .await?;
            let rows: Vec<ClusterRow> = records
                .into_iter()
                .zip(liveness)
                .map(|(record, liveness)| ClusterRow { record, liveness })
                .collect();
            print_rows(
                output,
                &rows,
                &[
                    "NAME",
                    "LIVENESS",
                    "CLOUD",
                    "REGION",
                    "ZONES",
                    "TRUST DOMAIN",
                    "GATEWAYS",
                ],
                |ClusterRow {
                     record: c,
                     liveness,
                 }| {
                    vec![
                        c.name.clone(),
                        liveness.to_string(),
                        c.cloud.clone(),
                        c.region.clone(),
                        c.zones.join(","),
                        c.trust_domain.clone(),
                        c.gateways
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                },
            )
        }
        GetWhat::Services => {
            let rows: Vec<ServiceRow> = zone
                .exports()
                .await?
                .into_iter()
                .map(|(cluster, namespace, service, s)| ServiceRow {
                    cluster,
                    namespace,
                    service,
                    ports: s.ports.clone(),
                    healthy: s.healthy(),
                    total: s.localities.iter().map(|l| u64::from(l.total)).sum(),
                    generation: s.generation,
                })
                .collect();
            print_rows(
                output,
                &rows,
                &["CLUSTER", "NAMESPACE", "SERVICE", "PORTS", "HEALTHY"],
                |r| {
                    vec![
                        r.cluster.clone(),
                        r.namespace.clone(),
                        r.service.clone(),
                        r.ports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("{}/{}", r.healthy, r.total),
                    ]
                },
            )
        }
        GetWhat::Bundles => {
            let rows: Vec<BundleRow> = zone
                .bundles()
                .await?
                .into_iter()
                .map(|b| BundleRow {
                    trust_domain: b.trust_domain().to_string(),
                    roots: b.roots().len(),
                    sequence: b.sequence,
                    document: serde_json::from_str(&b.to_document()).unwrap_or_default(),
                })
                .collect();
            print_rows(output, &rows, &["TRUST DOMAIN", "ROOTS", "SEQUENCE"], |r| {
                vec![
                    r.trust_domain.clone(),
                    r.roots.to_string(),
                    r.sequence.to_string(),
                ]
            })
        }
    }
}

fn print_rows<T: Serialize>(
    output: Output,
    rows: &[T],
    headers: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&rows)?),
        Output::Table => {
            let body: Vec<Vec<String>> = rows.iter().map(&cells).collect();
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for row in &body {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.len());
                }
            }
            let line = |cols: Vec<&str>| {
                let s: Vec<String> = cols
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", s.join("  ").trim_end());
            };
            line(headers.to_vec());
            for row in &body {
                line(row.iter().map(String::as_str).collect());
            }
            if body.is_empty() {
                eprintln!("(none)");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RegisterCluster {
        let mut argv = vec!["fedmesh", "register", "cluster"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Register {
                what: RegisterWhat::Cluster(a),
            } => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plan_defaults_and_validates_before_any_io() {
        let p = plan(&args(&[
            "aws-use1",
            "--cloud",
            "aws",
            "--region",
            "us-east-1",
            "--zones",
            "a1,a2",
            "--gateway",
            "127.0.1.1:15443,[::1]:15443",
            "--label",
            "env=prod",
        ]))
        .unwrap();
        assert_eq!(p.record.trust_domain, "aws-use1.fedmesh");
        assert_eq!(p.record.zones, ["a1", "a2"]);
        assert_eq!(p.record.gateways.len(), 2);
        assert_eq!(p.record.labels["env"], "prod");
        assert_eq!(p.out, PathBuf::from("fedmesh-join-aws-use1"));

        let bad = |extra: &[&str], want: &str| {
            let err = format!("{:#}", plan(&args(extra)).err().unwrap());
            assert!(err.contains(want), "{extra:?}: {err}");
        };
        let base = [
            "--cloud",
            "aws",
            "--region",
            "r",
            "--zones",
            "z",
            "--gateway",
            "h:1",
        ];
        let with = |name: &'static str, more: &[&'static str]| {
            let mut v = vec![name];
            v.extend_from_slice(&base);
            v.extend_from_slice(more);
            v
        };
        let long = "x".repeat(64);
        bad(&with("Bad_Name", &[]), "cluster name");
        let mut too_long = with("placeholder", &[]);
        too_long[0] = &long;
        bad(&too_long, "63");
        bad(&with("ok", &["--gateway", "nohost"]), "--gateway");
        bad(&with("ok", &["--trust-domain", "Bad.TD"]), "--trust-domain");
        bad(&with("ok", &["--label", "novalue"]), "--label");
    }

    #[test]
    fn an_empty_zone_list_is_refused_by_the_parser() {
        let err = Cli::try_parse_from([
            "fedmesh",
            "register",
            "cluster",
            "a",
            "--cloud",
            "c",
            "--region",
            "r",
            "--gateway",
            "h:1",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--zones"), "{err}");
    }
}
