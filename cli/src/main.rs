//! `fedmesh`: the operator's command. It joins clusters to the federation,
//! shows what the global zone holds, and runs whole federations on one
//! machine. This file is the clap tree and the dispatch; each command's body
//! is in [`cmd`] (the global zone) or [`up`] (`fedmesh up` and friends).

#![forbid(unsafe_code)]

mod cmd;
mod demo;
mod drill;
mod up;
mod wan;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use cmd::EtcdFlags;
use cmd::get::get;
use cmd::get::{GetWhat, Output};
use cmd::register::{RegisterCluster, deregister, register};

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
    /// Show what the global zone holds, or (proxies) what each
    /// cluster's proxies and gateways run.
    Get {
        what: GetWhat,
        /// One policy, by name (with `policies`).
        name: Option<String>,
        /// With `proxies`: a controller's admin address, as CLUSTER=ADDR
        /// (repeat). Default: every controller `fedmesh up` runs.
        #[arg(long = "controller-admin", value_parser = cluster_addr)]
        controller_admin: Vec<(String, std::net::SocketAddr)>,
        /// With `proxies`: the `fedmesh up` state directory.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, default_value = "table")]
        output: Output,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
    /// Apply global traffic policies: every document of every file is
    /// checked first, then all are written in one etcd transaction (all or
    /// nothing; refused if a policy changed meanwhile).
    Apply {
        /// Files of GlobalTrafficPolicy documents (several per file, `---`).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Print what would change, and change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
    /// Show what `apply -f` would change, as a unified diff. Exit code 0:
    /// no change; 1: changes; 2: an error.
    Diff {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
    /// Delete a global traffic policy.
    Delete {
        #[command(subcommand)]
        what: PolicyWhat,
    },
    /// A policy's revisions, from etcd's history (until etcd compacts it).
    History {
        #[command(subcommand)]
        what: PolicyWhat,
    },
    /// Put a policy back as it was at a revision (`history` lists them).
    Rollback {
        #[command(subcommand)]
        what: RollbackWhat,
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
        /// Move every loopback block up by this many (etcd in 127.0.<9+N>.x,
        /// cluster i in 127.0.<10+N+i>.x), so that a second federation
        /// (tests, say) runs beside one that is up.
        #[arg(long, default_value_t = 0, env = "FEDMESH_BLOCK_OFFSET")]
        block_offset: u8,
        /// How every cluster's proxies reach the others, whatever the
        /// topology says: `direct` or `gateway`.
        #[arg(long, value_parser = str::parse::<fedmesh_api::EgressMode>)]
        egress: Option<fedmesh_api::EgressMode>,
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
    /// Stop demo backends (<cluster>/<namespace>/<name>[@zone]; they are
    /// also marked unhealthy in their cluster's registry) or one of the
    /// federation's processes: etcd-<i>, <cluster>/controller,
    /// <cluster>/proxy, <cluster>/gateway-<i>.
    Stop {
        target: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Start again what `stop` stopped: demo backends
    /// (<cluster>/<namespace>/<name>[@zone]) or a process (etcd-<i>,
    /// <cluster>/controller, <cluster>/proxy, <cluster>/gateway-<i>).
    Start {
        target: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Restart one of the federation's own processes gracefully, as an
    /// upgrade would (etcd-<i>, <cluster>/controller, <cluster>/proxy,
    /// <cluster>/gateway-<i>): a proxy hands its listeners to the new one
    /// and drains, dropping nothing; the rest stop (SIGTERM) and start.
    Restart {
        target: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Back up the global zone as signed, or put back what a wiped or
    /// rolled-back etcd lacks.
    Zone {
        #[command(subcommand)]
        what: cmd::zone::ZoneCommand,
    },
    /// The federation anchor: the operator's key that signs cluster
    /// records and global traffic policies.
    Anchor {
        #[command(subcommand)]
        what: cmd::anchor::AnchorCommand,
    },
    /// Manage a cluster's join tokens: what a proxy or gateway presents for
    /// its first SVID (24 h by default, optionally single-use).
    Token {
        #[command(subcommand)]
        what: cmd::token::TokenCommand,
    },
    /// Rotate a cluster's CA: stage its next CA in the join directory; the
    /// cluster's controller publishes the new root at once and signs with
    /// it after --propagation. Name a cluster `fedmesh up` runs, or give
    /// --join.
    RotateCa {
        /// A cluster of the federation in --state-dir.
        #[arg(required_unless_present = "join")]
        cluster: Option<String>,
        /// The cluster's join directory (as `register cluster --out` wrote it).
        #[arg(long, conflicts_with = "cluster")]
        join: Option<PathBuf>,
        /// How long the new root is published before it signs: long enough
        /// for every peer to have it.
        #[arg(long, default_value = "15m", value_parser = cmd::duration)]
        propagation: std::time::Duration,
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Run failover drills against a federation `fedmesh up` runs (or one
    /// brought up for them with --topology): steady load through a client
    /// cluster's proxy, a fault, recovery, and a report judged against the
    /// drill's thresholds. Exits non-zero when any drill misses one.
    Drill {
        /// Shipped drills by name (--list shows them), `all`, or drill files.
        #[arg(required_unless_present = "list")]
        drills: Vec<String>,
        /// List the shipped drills.
        #[arg(long)]
        list: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Bring this topology up first (in blocks moved by
        /// --block-offset, beside anything already up), and down after.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// With --topology: how far to move its loopback blocks.
        #[arg(long, default_value_t = 60, env = "FEDMESH_DRILL_BLOCK_OFFSET")]
        block_offset: u8,
        /// With --topology: how every cluster's proxies reach the others,
        /// whatever the topology says (`direct` or `gateway`), to drill
        /// both ways.
        #[arg(long, requires = "topology", value_parser = str::parse::<fedmesh_api::EgressMode>)]
        egress: Option<fedmesh_api::EgressMode>,
        #[arg(short, long, default_value = "table")]
        output: drill::Output,
        /// Where each drill's SVG timeline goes [default: <state dir>/drills].
        #[arg(long)]
        svg_dir: Option<PathBuf>,
        /// Requests a second for every drill, instead of each drill's own
        /// rate (200 for the shipped ones).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=5000))]
        rate: Option<u32>,
    },
    /// Change the WAN between two clouds of a running federation, live:
    /// latency, jitter, loss, a blackhole, a bandwidth cap, or a NAT
    /// rebinding. --reset puts the topology's link back.
    Wan {
        /// The cloud traffic leaves.
        from: String,
        /// The cloud traffic goes to.
        to: String,
        /// Only from FROM to TO (a one-way partition, say).
        #[arg(long)]
        one_way: bool,
        #[arg(long, value_parser = cmd::duration)]
        latency: Option<std::time::Duration>,
        #[arg(long, value_parser = cmd::duration)]
        jitter: Option<std::time::Duration>,
        /// Share of datagrams lost, in [0, 1).
        #[arg(long)]
        loss: Option<f64>,
        /// Drop every datagram.
        #[arg(long)]
        blackhole: bool,
        /// Bits a second.
        #[arg(long)]
        bandwidth: Option<u64>,
        /// The topology's link again.
        #[arg(long, conflicts_with_all = ["latency", "jitter", "loss", "blackhole", "bandwidth", "rebind"])]
        reset: bool,
        /// Give every flow a new source address, as a NAT rebinding does.
        #[arg(long, conflicts_with_all = ["latency", "jitter", "loss", "blackhole", "bandwidth"])]
        rebind: bool,
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
enum PolicyWhat {
    /// A global traffic policy.
    Policy {
        name: String,
        #[arg(short, long, default_value = "table")]
        output: Output,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
}

#[derive(Subcommand, Debug)]
enum RollbackWhat {
    /// A global traffic policy.
    Policy {
        name: String,
        /// The revision to go back to.
        #[arg(long)]
        to: i64,
        #[command(flatten)]
        etcd: EtcdFlags,
    },
}

/// `fedmesh diff` found changes: exit code 1, nothing more to say.
#[derive(Debug)]
struct Differs;

impl std::fmt::Display for Differs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("differences found")
    }
}

impl std::error::Error for Differs {}

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

/// `CLUSTER=ADDR`.
fn cluster_addr(s: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (c, a) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not CLUSTER=ADDR"))?;
    let addr = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    Ok((c.to_owned(), addr))
}

/// A duration as people write it: `500ms`, `2s`.
fn main() -> ExitCode {
    fedmesh_trust::install_default_provider();
    let cli = Cli::parse();
    // A drill's load must not queue behind its own fault injection.
    let mut builder = if matches!(cli.command, Command::Drill { .. }) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let diff = matches!(cli.command, Command::Diff { .. });
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Differs>() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            // diff's 1 means "changes", as diff(1)'s does.
            ExitCode::from(if diff { 2 } else { 1 })
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
        Command::Get {
            what: GetWhat::Policies,
            name,
            output,
            etcd,
            ..
        } => cmd::policy::get(name.as_deref(), output, &etcd).await,
        Command::Get {
            what: GetWhat::Proxies,
            output,
            etcd,
            controller_admin,
            state_dir,
            ..
        } => {
            let admins = if controller_admin.is_empty() {
                let s = up::State::load(&up::find_state_dir(state_dir)?)?;
                s.clusters
                    .iter()
                    .filter_map(|c| Some((c.name.clone(), c.controller.admin?)))
                    .collect()
            } else {
                controller_admin
            };
            cmd::proxies::get(&admins, output, &etcd).await
        }
        Command::Get {
            what,
            name: Some(name),
            ..
        } => anyhow::bail!("`get {what:?}` takes no name (got {name:?}); only `get policies` does"),
        Command::Get {
            what,
            name: None,
            output,
            etcd,
            ..
        } => get(what, output, &etcd).await,
        Command::Apply {
            files,
            dry_run,
            etcd,
        } => cmd::policy::apply(&files, dry_run, &etcd).await,
        Command::Diff { files, etcd } => {
            if cmd::policy::diff(&files, &etcd).await? {
                return Err(Differs.into());
            }
            Ok(())
        }
        Command::Delete {
            what: PolicyWhat::Policy { name, etcd, .. },
        } => cmd::policy::delete(&name, &etcd).await,
        Command::History {
            what: PolicyWhat::Policy { name, output, etcd },
        } => cmd::policy::history(&name, output, &etcd).await,
        Command::Rollback {
            what: RollbackWhat::Policy { name, to, etcd },
        } => cmd::policy::rollback(&name, to, &etcd).await,
        Command::Up {
            topology,
            detach,
            state_dir,
            block_offset,
            egress,
        } => {
            let t = up::load_topology(&topology)?;
            let dir = up::state_dir_for(state_dir, &t);
            if detach {
                up::up_detached(&topology, &dir, block_offset, egress, true).await
            } else {
                up::up(&topology, &dir, block_offset, egress).await
            }
        }
        Command::Down { state_dir } => up::down(&up::find_state_dir(state_dir)?, true).await,
        Command::Status { output, state_dir } => {
            let dir = up::find_state_dir(state_dir)?;
            let s = up::State::load(&dir)?;
            match output {
                StatusOutput::Table => up::print_status(&s, &dir).await,
                StatusOutput::Json => {
                    let seen = up::observe(&s, &dir).await;
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&up::status_of(&s, &seen))?
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
        Command::Restart { target, state_dir } => {
            up::restart(&up::find_state_dir(state_dir)?, &target).await
        }
        Command::Zone { what } => cmd::zone::run(what).await,
        Command::Anchor { what } => cmd::anchor::run(what).await,
        Command::Token { what } => cmd::token::run(what),
        Command::RotateCa {
            cluster,
            join,
            propagation,
            state_dir,
        } => match (join, cluster) {
            (Some(join), _) => {
                cmd::rotate::rotate_ca(&join, propagation)?;
                println!(
                    "data planes that start from a bundle file need the new root too: {}",
                    join.join("ca-next/ca.crt").display()
                );
                Ok(())
            }
            (None, Some(c)) => {
                let dir = up::find_state_dir(state_dir)?;
                let join = up::join_dir_of(&dir, &c)?;
                let (td, next) = cmd::rotate::rotate_ca(&join, propagation)?;
                up::add_bootstrap_root(&dir, &c, &td, next.cert_der())
            }
            (None, None) => anyhow::bail!("name a cluster or give --join"),
        },
        Command::Drill {
            drills,
            list,
            state_dir,
            topology,
            block_offset,
            egress,
            output,
            svg_dir,
            rate,
        } => {
            if list {
                for (name, _) in fedmesh_chaos::SHIPPED {
                    let d = fedmesh_chaos::shipped(name).context("a shipped drill")??;
                    println!("{name:<26} {:<16} {}", d.topology, d.about);
                }
                return Ok(());
            }
            let mut chosen = drill::drills(&drills)?;
            if let Some(rate) = rate {
                chosen.iter_mut().for_each(|d| d.rate = rate);
            }
            let all = drills.iter().any(|d| d == "all");
            let passed = match topology {
                None => {
                    let dir = up::find_state_dir(state_dir)?;
                    let svgs = svg_dir.unwrap_or_else(|| dir.join("drills"));
                    drill::run_all(&dir, &chosen, all, output, &svgs).await?
                }
                Some(path) => {
                    let t = up::load_topology(&path)?;
                    let dir = state_dir.unwrap_or_else(|| {
                        PathBuf::from(".fedmesh").join(format!("drill-{}", t.name))
                    });
                    // Stdout is the report's alone (`-o json`).
                    let how =
                        egress.map_or(String::new(), |e| format!(", every cluster's egress {e}"));
                    eprintln!("bringing {} up in {}{how}…", t.name, dir.display());
                    up::up_detached(&path, &dir, block_offset, egress, false).await?;
                    let svgs = svg_dir.unwrap_or_else(|| dir.join("drills"));
                    let result = drill::run_all(&dir, &chosen, all, output, &svgs).await;
                    up::down(&dir, false).await?;
                    eprintln!("{} is down", t.name);
                    result?
                }
            };
            if !passed {
                anyhow::bail!("a drill missed its thresholds");
            }
            Ok(())
        }
        Command::Wan {
            from,
            to,
            one_way,
            latency,
            jitter,
            loss,
            blackhole,
            bandwidth,
            reset,
            rebind,
            state_dir,
        } => {
            let change = if reset {
                wan::Change::Reset
            } else if rebind {
                wan::Change::Rebind
            } else {
                wan::Change::Impair(wan::Impairment {
                    latency,
                    jitter,
                    loss,
                    blackhole,
                    bandwidth,
                })
            };
            let dir = up::find_state_dir(state_dir)?;
            let cmd = wan::WanCommand {
                from,
                to,
                both_ways: !one_way,
                change,
            };
            wan::command(&dir, &cmd).await?;
            println!("{cmd}");
            Ok(())
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::register::plan;

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
