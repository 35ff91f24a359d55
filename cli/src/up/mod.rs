//! `fedmesh up`: a whole federation on this machine, from a topology, made
//! of real processes: etcd, each cluster registered with `fedmesh register
//! cluster`, its controller, gateways and proxy, and the demo backends.
//! Every process logs to the state directory, which also records what runs
//! (`state.json`), so that `down`, `status`, `stop` and `start` work from
//! another shell.
//!
//! The supervisor (`up` in the foreground, or detached with `-d`) also runs
//! the WAN relays in front of each gateway ([`crate::wan`]), and stays
//! until Ctrl-C or `fedmesh down`, then stops everything: proxies and
//! gateways first, etcd last.
//!
//! - [`state`]: what runs, on disk; [`supervise`]: processes;
//! - [`render`]: the files each process reads, from their types;
//! - [`etcd`]: the global zone's TLS, auth and per-cluster users;
//! - [`probe`]: readiness over HTTP and etcd; [`status`]: `fedmesh status`;
//! - [`backends`]: `fedmesh stop` / `start`.

pub mod backends;
pub mod etcd;
pub mod probe;
pub mod render;
pub mod restart;
pub mod state;
pub mod status;
pub mod supervise;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fedmesh_api::EgressMode;
use fedmesh_topology::{Cluster, ClusterPlan, GatewayPlan, Plan, Protocol, Topology};
use fedmesh_trust::{Bundle, SpiffeId, TrustDomain};
use fedmesh_zone::TokensFile;
use fedmesh_zone::join::JoinDir;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use backends::stop_start;
pub use restart::restart;
pub use state::{State, find_state_dir, load_topology, state_dir_for};
pub use status::{observe, print_status, status_of};

use crate::wan::{self, Link, Wan};
use state::{BackendState, ClusterState, Proc, STATE_FILE};
use supervise::{
    Binaries, alive, backend_cmd, binaries, check_ports, listening, signal, spawn, stop_all,
    stop_children,
};

/// The WAN relays, running in the supervisor for as long as it does.
type Relays = Vec<JoinHandle<()>>;

/// What starting a topology needs at every step.
struct Launch<'a> {
    topology: &'a Topology,
    plan: &'a Plan,
    bins: &'a Binaries,
    dir: &'a Path,
    logs: PathBuf,
    /// Every link between clouds, changed live on `wan.sock`.
    wan: Arc<Wan>,
}

/// Brings the topology up, its blocks moved up by `offset`, and supervises
/// it until Ctrl-C or SIGTERM. Either signal is honoured from the first
/// moment: one during the start stops what had started, as a failed start
/// does.
pub async fn up(
    topology_path: &Path,
    dir: &Path,
    offset: u8,
    egress: Option<EgressMode>,
) -> anyhow::Result<()> {
    let mut stop = Box::pin(shutdown_signal()?);
    // The files written for each process name others by absolute path: a
    // relative one would be read against the file's own directory.
    let dir = &std::path::absolute(dir).with_context(|| format!("{}", dir.display()))?;
    let mut topology = load_topology(topology_path)?;
    if let Some(mode) = egress {
        for c in &mut topology.clusters {
            c.egress = mode;
        }
    }
    if let Ok(s) = State::load(dir)
        && s.ours(s.supervisor)
    {
        bail!(
            "{} is already up (supervisor pid {}); `fedmesh down --state-dir {}` first",
            s.topology,
            s.supervisor,
            dir.display()
        );
    }
    let bins = binaries()?;
    if std::process::Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        bail!("etcd is not installed: install Debian's etcd-server (scripts/setup.sh does)");
    }
    let plan = topology
        .plan_at(offset)
        .map_err(|e| anyhow::anyhow!("--block-offset: {e}"))?;
    check_ports(&plan)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let me = std::process::id();
    let mut state = State {
        topology: topology.name.clone(),
        supervisor: me,
        ready: false,
        etcd: Vec::new(),
        clusters: Vec::new(),
        started: supervise::start_time(me)
            .map(|t| (me, t))
            .into_iter()
            .collect(),
    };
    // The WAN relays, and the socket that changes their links, run in
    // this process, for as long as it does.
    let wan = Arc::new(wan_of(&topology));
    let mut relays = vec![wan::serve_control(&wan::control_socket(dir), wan.clone())?];
    let launch = Launch {
        topology: &topology,
        plan: &plan,
        bins: &bins,
        dir,
        logs: logs.clone(),
        wan,
    };
    let result = tokio::select! {
        r = launch.start(&mut state, &mut relays) => r,
        _ = &mut stop => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = result {
        // Every process this one started, whether or not the state lists
        // it yet (a cluster half-way through its start).
        stop_children(Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
        let _ = std::fs::remove_file(wan::control_socket(dir));
        return Err(e);
    }
    state.ready = true;
    state.save(dir)?;
    print_status(&state, dir).await;

    // Supervise: reap what ends (a drill's kill -9) until told to stop.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => supervise::reap(),
        }
    }
    println!("stopping {}…", topology.name);
    // `stop` and `start` may have changed the backends since.
    let latest = State::load(dir).unwrap_or(state);
    stop_all(&latest.live_pids(), Duration::from_secs(10)).await;
    stop_children(Duration::from_secs(5)).await;
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    for r in relays {
        r.abort();
    }
    let _ = std::fs::remove_file(wan::control_socket(dir));
    println!("stopped; logs are in {}", logs.display());
    Ok(())
}

/// Resolves at Ctrl-C or SIGTERM; the handlers are installed at once.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

impl Launch<'_> {
    /// Starts etcd, then each cluster, recording each process in `state`
    /// as it starts; done when every proxy serves.
    async fn start(&self, state: &mut State, relays: &mut Relays) -> anyhow::Result<()> {
        let (topology, plan, logs) = (self.topology, self.plan, &self.logs);
        // etcd, over TLS on both its ports, with auth.
        let pki = etcd::UpPki::create(self.dir)?;
        let initial: Vec<String> = plan
            .etcd
            .iter()
            .map(|e| format!("{}=https://{}", e.name, e.peer))
            .collect();
        for e in &plan.etcd {
            let serving = pki.member(&e.name, e.client, e.peer)?;
            let data = self.dir.join(&e.name);
            let _ = std::fs::remove_dir_all(&data);
            let mut cmd = std::process::Command::new("etcd");
            cmd.args(["--name", &e.name])
                .arg("--data-dir")
                .arg(&data)
                .arg(format!("--listen-client-urls=https://{}", e.client))
                .arg(format!("--advertise-client-urls=https://{}", e.client))
                .arg(format!("--listen-peer-urls=https://{}", e.peer))
                .arg(format!("--initial-advertise-peer-urls=https://{}", e.peer))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                // A bounded zone that compacts itself: one cluster cannot fill
                // it and make it read-only for all (readers hold a budget per
                // cluster too), and `fedmesh history` keeps an hour.
                .arg(format!("--quota-backend-bytes={}", 1u64 << 30))
                .args([
                    "--auto-compaction-mode=periodic",
                    "--auto-compaction-retention=1h",
                ])
                .args(pki.member_args(&serving));
            let log = logs.join(format!("{}.log", e.name));
            let command = supervise::argv(&cmd);
            let pid = spawn(cmd, &log)?;
            state.etcd.push(Proc {
                name: e.name.clone(),
                pid,
                address: e.client,
                admin: None,
                command,
                zone: None,
            });
        }
        for (e, p) in plan.etcd.iter().zip(&state.etcd) {
            listening(
                e.client,
                &e.name,
                p.pid,
                &logs.join(format!("{}.log", e.name)),
            )
            .await?;
        }
        let endpoints: Vec<String> = plan
            .etcd
            .iter()
            .map(|e| format!("https://{}", e.client))
            .collect();
        probe::wait_for_etcd(self.dir, &endpoints).await?;
        pki.enable_auth(&endpoints).await?;
        pki.write_env(self.dir, &endpoints)?;
        let mut c = etcd::client(self.dir, &endpoints, Duration::from_secs(5)).await?;
        if let Some(warning) = fedmesh_zone::rbac_advisories(c.status().await?.version()) {
            println!("warning: {warning}");
        }
        println!(
            "etcd: {} member(s) on {} (TLS, auth; `set -a; . {}` to use it)",
            plan.etcd.len(),
            endpoints.join(","),
            self.dir.join(etcd::ENV_FILE).display()
        );

        for (c, cp) in topology.clusters.iter().zip(&plan.clusters) {
            let cs = self.start_cluster(c, cp, &endpoints, &pki, relays).await?;
            println!(
                "{}: controller, {} gateway(s), proxy on {}, {} backend(s)",
                c.name,
                cs.gateways.len(),
                cs.proxy.address,
                cs.backends.len()
            );
            state.clusters.push(cs);
            state.save(self.dir)?;
        }
        // Ready when every cluster's proxy serves a service it has locally.
        for (cs, cp) in state.clusters.iter().zip(&plan.clusters) {
            if let Some(b) = cp.backends.iter().find(|b| {
                topology
                    .services
                    .iter()
                    .any(|s| s.key == b.service && s.protocol == Protocol::Http)
            }) {
                let host = format!("{}.{}", b.service.name, b.service.namespace);
                probe::wait_http(cs.proxy.address, &host)
                    .await
                    .with_context(|| format!("{}'s proxy never served {host}", cs.name))?;
            }
        }
        Ok(())
    }

    /// One cluster: registered with `fedmesh register cluster`, then its
    /// backends, controller, gateways (each behind its WAN relay) and proxy.
    async fn start_cluster(
        &self,
        c: &Cluster,
        cp: &ClusterPlan,
        etcd: &[String],
        pki: &etcd::UpPki,
        relays: &mut Relays,
    ) -> anyhow::Result<ClusterState> {
        let cdir = self.dir.join(&c.name);
        std::fs::create_dir_all(&cdir)?;
        let td = TrustDomain::new(&format!("{}.fedmesh.local", c.name))?;
        self.register(c, cp, &td, &cdir, etcd, pki)?;
        let mut cs = ClusterState {
            name: c.name.clone(),
            cloud: c.cloud.clone(),
            region: c.region.clone(),
            trust_domain: td.to_string(),
            controller: Proc {
                name: format!("{}-controller", c.name),
                pid: 0,
                address: cp.controller,
                admin: Some(cp.controller_admin),
                command: Vec::new(),
                zone: None,
            },
            gateways: Vec::new(),
            proxy: Proc {
                name: format!("{}-proxy", c.name),
                pid: 0,
                address: cp.proxy_http,
                admin: Some(cp.proxy_admin),
                command: Vec::new(),
                zone: None,
            },
            proxy_tcp: cp
                .proxy_tcp
                .iter()
                .map(|(s, a)| (s.to_string(), *a))
                .collect(),
            registry: cdir.join("registry.yaml"),
            backends: self.backends(c, cp),
        };
        for b in &mut cs.backends {
            b.pid = Some(spawn(
                backend_cmd(self.bins, b, &c.name),
                &self.backend_log(b),
            )?);
        }
        render::write_registry(&cs)?;
        self.start_controller(&mut cs, cp, &cdir).await?;
        for (i, g) in cp.gateways.iter().enumerate() {
            relays.push(self.wan_relay(c, g).await?);
            let zone = &c.zones[i % c.zones.len()];
            let from = from_controller(cp, &cdir, "gateway.token");
            let config = cdir.join(format!("gateway-{i}.yaml"));
            render::write_yaml(&config, &render::gateway(c, td.as_str(), zone, g, &from))?;
            let name = format!("{}-gateway-{i}", c.name);
            let (pid, command) = self
                .run(
                    &self.bins.gateway,
                    &config,
                    &name,
                    g.egress,
                    "a gateway",
                    &[],
                )
                .await?;
            cs.gateways.push(Proc {
                name,
                pid,
                address: g.quic,
                admin: Some(g.admin),
                command,
                zone: Some(zone.clone()),
            });
        }
        let from = from_controller(cp, &cdir, "proxy.token");
        let config = cdir.join("proxy.yaml");
        render::write_yaml(&config, &render::proxy(c, td.as_str(), cp, &from))?;
        let name = cs.proxy.name.clone();
        // `fedmesh restart <cluster>/proxy` starts the same command: the new
        // proxy takes this one's listeners through the handoff socket.
        let handoff = cdir.join(PROXY_HANDOFF);
        let extra = [std::ffi::OsStr::new("--handoff"), handoff.as_os_str()];
        (cs.proxy.pid, cs.proxy.command) = self
            .run(
                &self.bins.proxy,
                &config,
                &name,
                cp.proxy_http,
                "the proxy",
                &extra,
            )
            .await?;
        for b in &cs.backends {
            listening(
                b.address,
                "a backend",
                b.pid.unwrap_or(0),
                &self.backend_log(b),
            )
            .await?;
        }
        Ok(cs)
    }

    /// Registers `c` with the operator's own command, then writes what its
    /// data plane starts from: its bundle, and one join token each for the
    /// gateways and the proxy.
    fn register(
        &self,
        c: &Cluster,
        cp: &ClusterPlan,
        td: &TrustDomain,
        cdir: &Path,
        etcd: &[String],
        pki: &etcd::UpPki,
    ) -> anyhow::Result<()> {
        let join = cdir.join("join");
        let _ = std::fs::remove_dir_all(&join);
        let gateways: Vec<String> = cp.gateways.iter().map(|g| g.quic.to_string()).collect();
        let out = std::process::Command::new(&self.bins.fedmesh)
            .args([
                "register", "cluster", &c.name, "--cloud", &c.cloud, "--region", &c.region,
            ])
            .arg("--zones")
            .arg(c.zones.join(","))
            .arg("--gateway")
            .arg(gateways.join(","))
            .arg("--trust-domain")
            .arg(td.to_string())
            .arg("--egress")
            .arg(c.egress.as_str())
            .arg("--out")
            .arg(&join)
            .arg("--etcd")
            .arg(etcd.join(","))
            .args(pki.register_args(&c.name)?)
            .output()
            .context("running fedmesh register cluster")?;
        std::fs::write(
            self.logs.join(format!("{}-register.log", c.name)),
            [&out.stdout[..], &out.stderr[..]].concat(),
        )?;
        if !out.status.success() {
            bail!(
                "registering {}: {}",
                c.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let joined = JoinDir::load(&join)?;
        let bundle = Bundle::with_roots(td.clone(), [joined.ca.cert_der().clone()]);
        std::fs::write(cdir.join("bundle.json"), bundle.to_document())?;
        // Multi-use, for the life of the run: `up` and drills restart
        // these processes, which then join again.
        let mut tokens = TokensFile::default();
        let now = time::OffsetDateTime::now_utc();
        let gw_id = SpiffeId::gateway(td, &c.name)?;
        let proxy_id = SpiffeId::workload(td, "fedmesh", "proxy")?;
        let gw_token = tokens.create(gw_id, etcd::RUN_LIFETIME, false, now)?;
        let proxy_token = tokens.create(proxy_id, etcd::RUN_LIFETIME, false, now)?;
        tokens.save(&cdir.join("tokens.yaml"))?;
        fedmesh_trust::ca::write_private(&cdir.join("gateway.token"), gw_token.as_bytes())?;
        fedmesh_trust::ca::write_private(&cdir.join("proxy.token"), proxy_token.as_bytes())?;
        Ok(())
    }

    /// The demo backends of `c`, not started yet.
    fn backends(&self, c: &Cluster, cp: &ClusterPlan) -> Vec<BackendState> {
        cp.backends
            .iter()
            .map(|b| BackendState {
                id: b.id(&c.name),
                service: b.service.to_string(),
                zone: b.zone.clone(),
                address: b.address,
                tcp: self
                    .topology
                    .services
                    .iter()
                    .any(|s| s.key == b.service && s.protocol == Protocol::Tcp),
                pid: None,
            })
            .collect()
    }

    async fn start_controller(
        &self,
        cs: &mut ClusterState,
        cp: &ClusterPlan,
        cdir: &Path,
    ) -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(&self.bins.controller);
        cmd.arg("--join")
            .arg(cdir.join("join"))
            .arg("--registry")
            .arg(&cs.registry)
            .arg("--listen")
            .arg(cp.controller.to_string())
            .arg("--admin")
            .arg(cp.controller_admin.to_string())
            .arg("--tokens")
            .arg(cdir.join("tokens.yaml"))
            .arg("--state-dir")
            .arg(cdir.join(CONTROLLER_STATE_DIR));
        let log = self.logs.join(format!("{}.log", cs.controller.name));
        cs.controller.command = supervise::argv(&cmd);
        cs.controller.pid = spawn(cmd, &log)?;
        listening(cp.controller, "the controller", cs.controller.pid, &log).await
    }

    /// The relay in front of gateway `g` of `c`: a datagram from another
    /// cluster takes the live link between their clouds.
    async fn wan_relay(&self, c: &Cluster, g: &GatewayPlan) -> anyhow::Result<JoinHandle<()>> {
        let cloud_of: Arc<dyn Fn(SocketAddr) -> Option<String> + Send + Sync> = {
            let (topology, plan) = (self.topology.clone(), self.plan.clone());
            Arc::new(move |from: SocketAddr| {
                let src = plan.cluster_of(from.ip())?;
                Some(topology.cluster(&src.name)?.cloud.clone())
            })
        };
        wan::relay(
            g.quic,
            g.quic_listen,
            c.cloud.clone(),
            self.wan.clone(),
            cloud_of,
        )
        .await
        .with_context(|| format!("the WAN relay on {}", g.quic))
    }

    /// Starts `bin --config <config>` as `name`; returns its pid and
    /// command once `addr` listens.
    async fn run(
        &self,
        bin: &Path,
        config: &Path,
        name: &str,
        addr: SocketAddr,
        what: &str,
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<(u32, Vec<String>)> {
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--config").arg(config).args(extra);
        let command = supervise::argv(&cmd);
        let log = self.logs.join(format!("{name}.log"));
        let pid = spawn(cmd, &log)?;
        listening(addr, what, pid, &log).await?;
        Ok((pid, command))
    }

    fn backend_log(&self, b: &BackendState) -> PathBuf {
        self.logs
            .join(format!("{}.log", b.id.replace(['/', '@', '#'], "_")))
    }
}

/// The WAN of `topology`: every pair of its clouds, with the link the
/// topology gives them (none within a cloud).
fn wan_of(topology: &Topology) -> Wan {
    let mut clouds: Vec<String> = topology.clusters.iter().map(|c| c.cloud.clone()).collect();
    clouds.sort();
    clouds.dedup();
    Wan::new(&clouds, |a, b| {
        topology
            .wan
            .iter()
            .find(|l| {
                a != b && l.clouds.contains(&a.to_string()) && l.clouds.contains(&b.to_string())
            })
            .map_or(Link::default(), |l| Link {
                latency: l.latency,
                jitter: l.jitter,
                loss: l.loss,
                ..Default::default()
            })
    })
}

/// Where a data-plane process of the cluster finds its controller, from
/// the cluster's directory.
fn from_controller(cp: &ClusterPlan, cdir: &Path, token: &str) -> render::FromController {
    render::FromController {
        controller: cp.controller,
        bundle: cdir.join("bundle.json"),
        join_token_file: cdir.join(token),
    }
}

/// A controller's `--state-dir`, in its cluster's directory.
pub const CONTROLLER_STATE_DIR: &str = "controller-state";

/// The proxy's handoff socket in its cluster's directory: a proxy started
/// while another serves it takes that one's listeners.
pub const PROXY_HANDOFF: &str = "proxy.handoff";

/// The join directory of `cluster` in the federation in `dir`.
pub fn join_dir_of(dir: &Path, cluster: &str) -> anyhow::Result<PathBuf> {
    let s = State::load(dir)?;
    if !s.clusters.iter().any(|c| c.name == cluster) {
        let names: Vec<&str> = s.clusters.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "no cluster {cluster:?} in {}: its clusters are {}",
            s.topology,
            names.join(", ")
        );
    }
    Ok(dir.join(cluster).join("join"))
}

/// Adds `root` to the bundle file `cluster`'s data plane bootstraps from
/// (`<dir>/<cluster>/bundle.json`), as an operator updates the trust bundle
/// their workloads mount: a proxy or gateway started after a CA rotation
/// must trust the new root to reach its controller.
pub fn add_bootstrap_root(
    dir: &Path,
    cluster: &str,
    td: &TrustDomain,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> anyhow::Result<()> {
    let path = dir.join(cluster).join("bundle.json");
    let doc = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let old = Bundle::from_document(td.clone(), &doc, &path.display().to_string())?;
    let mut roots = old.roots().to_vec();
    if !roots.contains(root) {
        roots.push(root.clone());
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, Bundle::with_roots(td.clone(), roots).to_document())?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// `-d`: runs `up` detached in its own process group, logging to
/// `<dir>/up.log`, and returns once it is ready, showing its status when
/// `show`.
pub async fn up_detached(
    topology: &Path,
    dir: &Path,
    offset: u8,
    egress: Option<EgressMode>,
    show: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("up.log");
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("up")
        .arg(topology)
        .arg("--state-dir")
        .arg(dir)
        .arg("--block-offset")
        .arg(offset.to_string());
    if let Some(mode) = egress {
        cmd.arg("--egress").arg(mode.as_str());
    }
    let pid = spawn(cmd, &log)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(s) = State::load(dir)
            && s.ready
            && s.supervisor == pid
        {
            if show {
                print_status(&s, dir).await;
            }
            return Ok(());
        }
        if !alive(pid) || Instant::now() > deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            signal(pid, "TERM");
            bail!(
                "fedmesh up did not come up; its log ({}):\n{text}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fedmesh down`: asks the supervisor to stop everything, and waits;
/// says so when `show`.
pub async fn down(dir: &Path, show: bool) -> anyhow::Result<()> {
    let s = State::load(dir)?;
    if s.ours(s.supervisor) {
        signal(s.supervisor, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.ours(s.supervisor) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A supervisor that died left its children: stop them here (only those
    // still the processes it started: a pid may have been reused since).
    stop_all(&s.live_pids(), Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    if show {
        println!("{} is down", s.topology);
    }
    Ok(())
}
