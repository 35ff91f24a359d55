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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fedmesh_topology::{ClusterPlan, Plan, Protocol, Topology};
use fedmesh_trust::{Bundle, SpiffeId, TrustDomain};
use fedmesh_zone::join::JoinDir;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::wan::{self, Link};

pub const STATE_FILE: &str = "state.json";

/// What runs, as `up` started it and `stop`/`start` changed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub topology: String,
    pub supervisor: u32,
    pub ready: bool,
    pub etcd: Vec<Proc>,
    pub clusters: Vec<ClusterState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub address: SocketAddr,
    /// Its admin port (`/ready`), if it has one.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
}

/// A process's health: `down` (not running), `not ready` (running, but its
/// `/ready` does not answer 200), or `up`.
pub fn health(p: &Proc) -> &'static str {
    if !alive(p.pid) {
        return "down";
    }
    let Some(admin) = p.admin else { return "up" };
    let ready = (|| -> std::io::Result<bool> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&admin, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"GET /ready HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.ends_with(b"200"))
    })();
    if ready.unwrap_or(false) {
        "up"
    } else {
        "not ready"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub cloud: String,
    pub region: String,
    pub trust_domain: String,
    pub controller: Proc,
    pub gateways: Vec<Proc>,
    pub proxy: Proc,
    pub registry: PathBuf,
    pub backends: Vec<BackendState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendState {
    /// `cluster/namespace/name@zone#replica`.
    pub id: String,
    pub service: String,
    pub zone: String,
    pub address: SocketAddr,
    pub tcp: bool,
    /// `None` while stopped.
    pub pid: Option<u32>,
}

impl State {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "nothing is up in {} (no {STATE_FILE}); start it with `fedmesh up <topology>`",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))?;
        Ok(())
    }

    fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for c in &self.clusters {
            out.push(c.proxy.pid);
            out.extend(c.gateways.iter().map(|g| g.pid));
            out.extend(c.backends.iter().filter_map(|b| b.pid));
            out.push(c.controller.pid);
        }
        out.extend(self.etcd.iter().map(|e| e.pid));
        out
    }
}

/// Where `up` keeps a topology's state: `--state-dir`, or `.fedmesh/<name>`.
pub fn state_dir_for(given: Option<PathBuf>, topology: &Topology) -> PathBuf {
    given.unwrap_or_else(|| PathBuf::from(".fedmesh").join(&topology.name))
}

/// The state directory the other commands act on: `--state-dir`, or the
/// one federation that is up under `.fedmesh/`.
pub fn find_state_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d);
    }
    let up: Vec<PathBuf> = std::fs::read_dir(".fedmesh")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join(STATE_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    match up.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "nothing is up under .fedmesh/; start one with `fedmesh up <topology>` or pass --state-dir"
        ),
        _ => bail!("several federations are up under .fedmesh/; pick one with --state-dir"),
    }
}

pub fn load_topology(path: &Path) -> anyhow::Result<Topology> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the topology {}", path.display()))?;
    Ok(Topology::parse(&text, &path.display().to_string())?)
}

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// Sends SIGTERM (or SIGKILL) with kill(1): the project stays free of
/// unsafe code.
fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM to each, then SIGKILL to those still alive after `grace`.
pub async fn stop_all(pids: &[u32], grace: Duration) {
    for &p in pids {
        signal(p, "TERM");
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for &p in pids.iter().filter(|&&p| alive(p)) {
        signal(p, "KILL");
    }
}

struct Binaries {
    fedmesh: PathBuf,
    controller: PathBuf,
    gateway: PathBuf,
    proxy: PathBuf,
}

fn binaries() -> anyhow::Result<Binaries> {
    let fedmesh = std::env::current_exe().context("finding this program")?;
    let dir = fedmesh.parent().unwrap_or(Path::new(".")).to_path_buf();
    let find = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!(
                "{} is missing: build every binary first (`cargo build --release --bins`, as scripts/main.sh does)",
                p.display()
            )
        }
    };
    Ok(Binaries {
        controller: find("fedmesh-controller")?,
        gateway: find("fedmesh-gateway")?,
        proxy: find("fedmesh-proxy")?,
        fedmesh,
    })
}

/// Every address of the plan is free, or an error naming the first taken.
fn check_ports(plan: &Plan) -> anyhow::Result<()> {
    let mut tcp: Vec<(SocketAddr, String)> = Vec::new();
    let mut udp: Vec<(SocketAddr, String)> = Vec::new();
    for e in &plan.etcd {
        tcp.push((e.client, format!("{} (clients)", e.name)));
        tcp.push((e.peer, format!("{} (peers)", e.name)));
    }
    for c in &plan.clusters {
        tcp.push((c.controller, format!("{}'s controller", c.name)));
        tcp.push((c.controller_admin, format!("{}'s controller admin", c.name)));
        tcp.push((c.proxy_http, format!("{}'s proxy", c.name)));
        tcp.push((c.proxy_admin, format!("{}'s proxy admin", c.name)));
        for (i, g) in c.gateways.iter().enumerate() {
            udp.push((g.quic, format!("{}'s WAN relay for gateway {i}", c.name)));
            udp.push((g.quic_listen, format!("{}'s gateway {i} (QUIC)", c.name)));
            tcp.push((g.egress, format!("{}'s gateway {i} egress", c.name)));
            tcp.push((g.admin, format!("{}'s gateway {i} admin", c.name)));
        }
        for b in &c.backends {
            tcp.push((b.address, format!("backend {}", b.id(&c.name))));
        }
    }
    for (a, what) in tcp {
        std::net::TcpListener::bind(a).with_context(|| {
            format!("{a} is taken; it is {what}. Is a federation already up? (`fedmesh down`)")
        })?;
    }
    for (a, what) in udp {
        std::net::UdpSocket::bind(a).with_context(|| {
            format!("UDP {a} is taken; it is {what}. Is a federation already up? (`fedmesh down`)")
        })?;
    }
    Ok(())
}

fn token() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Starts `cmd` in its own process group, logging to `log`.
fn spawn(mut cmd: std::process::Command, log: &Path) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(child.id())
}

/// Waits until `addr` accepts TCP, or fails naming `what` and its log.
async fn listening(addr: SocketAddr, what: &str, pid: u32, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !alive(pid) || Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(8).collect();
            bail!(
                "{what} did not come up on {addr}; the end of {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The registry file of a cluster: its backends, healthy unless stopped.
pub fn write_registry(c: &ClusterState) -> anyhow::Result<()> {
    let mut by_service: BTreeMap<&str, (u16, Vec<&BackendState>)> = BTreeMap::new();
    for b in &c.backends {
        by_service
            .entry(&b.service)
            .or_insert((b.address.port(), Vec::new()))
            .1
            .push(b);
    }
    let mut yaml =
        String::from("# Written by fedmesh up: stop and start change `healthy`.\nservices:\n");
    for (service, (port, backends)) in by_service {
        let (ns, name) = service.split_once('/').unwrap_or(("default", service));
        yaml += &format!(
            "  - namespace: {ns}\n    name: {name}\n    ports: [{port}]\n    endpoints:\n"
        );
        for b in backends {
            yaml += &format!(
                "      - {{address: \"{}\", zone: {}, healthy: {}}}\n",
                b.address,
                b.zone,
                b.pid.is_some()
            );
        }
    }
    let tmp = c.registry.with_extension("yaml.tmp");
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, &c.registry)?;
    Ok(())
}

fn backend_cmd(bins: &Binaries, b: &BackendState, cluster: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(&bins.fedmesh);
    cmd.args(["demo-backend", "--listen"])
        .arg(b.address.to_string())
        .args([
            "--cluster",
            cluster,
            "--zone",
            &b.zone,
            "--service",
            &b.service,
        ]);
    if b.tcp {
        cmd.arg("--tcp");
    }
    cmd
}

/// Brings the topology up and supervises it until Ctrl-C or SIGTERM.
pub async fn up(topology_path: &Path, dir: &Path) -> anyhow::Result<()> {
    let topology = load_topology(topology_path)?;
    if let Ok(s) = State::load(dir)
        && alive(s.supervisor)
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
    let plan = topology.plan();
    check_ports(&plan)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut state = State {
        topology: topology.name.clone(),
        supervisor: std::process::id(),
        ready: false,
        etcd: Vec::new(),
        clusters: Vec::new(),
    };
    // The WAN relays run in this process, for as long as it does.
    let mut relays = Vec::new();
    let result = start(&topology, &plan, &bins, dir, &mut state, &mut relays).await;
    // Saved even when a start failed, so that what did start is stopped.
    state.save(dir)?;
    if let Err(e) = result {
        stop_all(&state.pids(), Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
        return Err(e);
    }
    state.ready = true;
    state.save(dir)?;
    print_status(&state, dir).await;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping {}…", topology.name);
    // `stop` and `start` may have changed the backends since.
    let latest = State::load(dir).unwrap_or(state);
    stop_all(&latest.pids(), Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    for r in relays {
        r.abort();
    }
    println!("stopped; logs are in {}", logs.display());
    Ok(())
}

async fn start(
    topology: &Topology,
    plan: &Plan,
    bins: &Binaries,
    dir: &Path,
    state: &mut State,
    relays: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let logs = dir.join("logs");
    // etcd.
    let initial: Vec<String> = plan
        .etcd
        .iter()
        .map(|e| format!("{}=http://{}", e.name, e.peer))
        .collect();
    for e in &plan.etcd {
        let data = dir.join(&e.name);
        let _ = std::fs::remove_dir_all(&data);
        let mut cmd = std::process::Command::new("etcd");
        cmd.args(["--name", &e.name])
            .arg("--data-dir")
            .arg(&data)
            .arg(format!("--listen-client-urls=http://{}", e.client))
            .arg(format!("--advertise-client-urls=http://{}", e.client))
            .arg(format!("--listen-peer-urls=http://{}", e.peer))
            .arg(format!("--initial-advertise-peer-urls=http://{}", e.peer))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new");
        let log = logs.join(format!("{}.log", e.name));
        let pid = spawn(cmd, &log)?;
        state.etcd.push(Proc {
            name: e.name.clone(),
            pid,
            address: e.client,
            admin: None,
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
        .map(|e| format!("http://{}", e.client))
        .collect();
    wait_for_etcd(&endpoints).await?;
    println!(
        "etcd: {} member(s) on {}",
        plan.etcd.len(),
        endpoints.join(",")
    );

    for (c, cp) in topology.clusters.iter().zip(&plan.clusters) {
        let cs = start_cluster(c, cp, topology, plan, bins, dir, &endpoints, relays).await?;
        println!(
            "{}: controller, {} gateway(s), proxy on {}, {} backend(s)",
            c.name,
            cs.gateways.len(),
            cs.proxy.address,
            cs.backends.len()
        );
        state.clusters.push(cs);
        state.save(dir)?;
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
            wait_http(cs.proxy.address, &host)
                .await
                .with_context(|| format!("{}'s proxy never served {host}", cs.name))?;
        }
    }
    Ok(())
}

async fn wait_for_etcd(endpoints: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect(endpoints, None).await
            && c.status().await.is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("etcd did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GETs `host` through `proxy` until it answers 200.
pub async fn wait_http(proxy: SocketAddr, host: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(body) = http_get(proxy, host).await
            && body.0 == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no 200 within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One GET through a proxy on a fresh connection: (status, body).
pub async fn http_get(proxy: SocketAddr, host: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Ok((status, body))
}

#[allow(clippy::too_many_arguments)]
async fn start_cluster(
    c: &fedmesh_topology::Cluster,
    cp: &ClusterPlan,
    topology: &Topology,
    plan: &Plan,
    bins: &Binaries,
    dir: &Path,
    etcd: &[String],
    relays: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<ClusterState> {
    let logs = dir.join("logs");
    let cdir = dir.join(&c.name);
    std::fs::create_dir_all(&cdir)?;
    let td = TrustDomain::new(&format!("{}.fedmesh.local", c.name))?;
    let join = cdir.join("join");
    let _ = std::fs::remove_dir_all(&join);

    // Registration, with the operator's own command.
    let gateways: Vec<String> = cp.gateways.iter().map(|g| g.quic.to_string()).collect();
    let out = std::process::Command::new(&bins.fedmesh)
        .args([
            "register", "cluster", &c.name, "--cloud", &c.cloud, "--region", &c.region,
        ])
        .arg("--zones")
        .arg(c.zones.join(","))
        .arg("--gateway")
        .arg(gateways.join(","))
        .arg("--trust-domain")
        .arg(td.to_string())
        .arg("--out")
        .arg(&join)
        .arg("--etcd")
        .arg(etcd.join(","))
        .output()
        .context("running fedmesh register cluster")?;
    std::fs::write(
        logs.join(format!("{}-register.log", c.name)),
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

    // Join tokens: one for the gateways, one for the proxy.
    let (gw_token, proxy_token) = (token()?, token()?);
    let gw_id = SpiffeId::gateway(&td, &c.name)?;
    let proxy_id = SpiffeId::workload(&td, "fedmesh", "proxy")?;
    std::fs::write(
        cdir.join("tokens.yaml"),
        format!(
            "tokens:\n  - {{token: \"{gw_token}\", spiffeId: \"{gw_id}\"}}\n  - {{token: \"{proxy_token}\", spiffeId: \"{proxy_id}\"}}\n"
        ),
    )?;
    fedmesh_trust::ca::write_private(&cdir.join("gateway.token"), gw_token.as_bytes())?;
    fedmesh_trust::ca::write_private(&cdir.join("proxy.token"), proxy_token.as_bytes())?;

    // Backends, and the registry that lists them.
    let mut backends = Vec::new();
    for b in &cp.backends {
        let tcp = topology
            .services
            .iter()
            .any(|s| s.key == b.service && s.protocol == Protocol::Tcp);
        backends.push(BackendState {
            id: b.id(&c.name),
            service: b.service.to_string(),
            zone: b.zone.clone(),
            address: b.address,
            tcp,
            pid: None,
        });
    }
    for b in &mut backends {
        let log = logs.join(format!("{}.log", b.id.replace(['/', '@', '#'], "_")));
        b.pid = Some(spawn(backend_cmd(bins, b, &c.name), &log)?);
    }
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
        },
        gateways: Vec::new(),
        proxy: Proc {
            name: format!("{}-proxy", c.name),
            pid: 0,
            address: cp.proxy_http,
            admin: Some(cp.proxy_admin),
        },
        registry: cdir.join("registry.yaml"),
        backends,
    };
    write_registry(&cs)?;

    // The controller.
    let mut cmd = std::process::Command::new(&bins.controller);
    cmd.arg("--join")
        .arg(&join)
        .arg("--registry")
        .arg(&cs.registry)
        .arg("--listen")
        .arg(cp.controller.to_string())
        .arg("--admin")
        .arg(cp.controller_admin.to_string())
        .arg("--tokens")
        .arg(cdir.join("tokens.yaml"));
    let log = logs.join(format!("{}-controller.log", c.name));
    cs.controller.pid = spawn(cmd, &log)?;
    listening(cp.controller, "the controller", cs.controller.pid, &log).await?;

    // Gateways, configured by the controller, each behind its WAN relay:
    // a datagram from another cluster takes the link between the clouds.
    let link_of: Arc<dyn Fn(SocketAddr) -> Link + Send + Sync> = {
        let (topology, plan, here) = (topology.clone(), plan.clone(), c.name.clone());
        Arc::new(move |from: SocketAddr| {
            plan.cluster_of(from.ip())
                .and_then(|src| topology.link(&src.name, &here))
                .map_or(Link::default(), |l| Link {
                    latency: l.latency,
                    jitter: l.jitter,
                    loss: l.loss,
                })
        })
    };
    for (i, g) in cp.gateways.iter().enumerate() {
        relays.push(
            wan::relay(g.quic, g.quic_listen, link_of.clone())
                .await
                .with_context(|| format!("the WAN relay on {}", g.quic))?,
        );
        let config = cdir.join(format!("gateway-{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "cluster: {name}\ntrustDomain: {td}\nzone: {zone}\nlisten: {{quic: \"{q}\", egress: \"{e}\", admin: \"{a}\"}}\ncontroller: {{address: \"{ctl}\", bundle: bundle.json, joinTokenFile: gateway.token}}\n",
                name = c.name,
                zone = c.zones[i % c.zones.len()],
                q = g.quic_listen,
                e = g.egress,
                a = g.admin,
                ctl = cp.controller,
            ),
        )?;
        let mut cmd = std::process::Command::new(&bins.gateway);
        cmd.arg("--config").arg(&config);
        let log = logs.join(format!("{}-gateway-{i}.log", c.name));
        let pid = spawn(cmd, &log)?;
        listening(g.egress, "a gateway", pid, &log).await?;
        cs.gateways.push(Proc {
            name: format!("{}-gateway-{i}", c.name),
            pid,
            address: g.quic,
            admin: Some(g.admin),
        });
    }

    // The proxy, configured by the controller too. Drills want to see
    // traffic return soon after a recovery: a 5 s failback window, and
    // 5 s ejections (the production defaults are 30 s for both).
    let egress: Vec<String> = cp
        .gateways
        .iter()
        .map(|g| format!("\"{}\"", g.egress))
        .collect();
    let config = cdir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "cluster: {name}\ntrustDomain: {td}\nlocality: {{cloud: {cloud}, region: {region}, zone: {zone}}}\nlisten: {{http: \"{http}\", admin: \"{admin}\"}}\ngateways: [{egress}]\ncontroller: {{address: \"{ctl}\", bundle: bundle.json, joinTokenFile: proxy.token, namespace: fedmesh, serviceAccount: proxy}}\nsettings: {{failbackHold: 5s, outlier: {{baseEjection: 5s}}}}\n",
            name = c.name,
            cloud = c.cloud,
            region = c.region,
            zone = c.zones[0],
            http = cp.proxy_http,
            admin = cp.proxy_admin,
            egress = egress.join(", "),
            ctl = cp.controller,
        ),
    )?;
    let mut cmd = std::process::Command::new(&bins.proxy);
    cmd.arg("--config").arg(&config);
    let log = logs.join(format!("{}-proxy.log", c.name));
    cs.proxy.pid = spawn(cmd, &log)?;
    listening(cp.proxy_http, "the proxy", cs.proxy.pid, &log).await?;
    for b in &cs.backends {
        let log = logs.join(format!("{}.log", b.id.replace(['/', '@', '#'], "_")));
        listening(b.address, "a backend", b.pid.unwrap_or(0), &log).await?;
    }
    Ok(cs)
}

/// `-d`: runs `up` detached in its own process group, logging to
/// `<dir>/up.log`, and returns once it is ready.
pub async fn up_detached(topology: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("up.log");
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("up").arg(topology).arg("--state-dir").arg(dir);
    let pid = spawn(cmd, &log)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Ok(s) = State::load(dir)
            && s.ready
            && s.supervisor == pid
        {
            print_status(&s, dir).await;
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

/// `fedmesh down`: asks the supervisor to stop everything, and waits.
pub async fn down(dir: &Path) -> anyhow::Result<()> {
    let s = State::load(dir)?;
    if alive(s.supervisor) {
        signal(s.supervisor, "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(s.supervisor) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A supervisor that died left its children: stop them here.
    let left: Vec<u32> = s.pids().into_iter().filter(|&p| alive(p)).collect();
    stop_all(&left, Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(dir.join(STATE_FILE));
    println!("{} is down", s.topology);
    Ok(())
}

/// What `status` reports of one cluster.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub cloud: String,
    pub region: String,
    /// `up`, `not ready` or `down`, from its `/ready`.
    pub controller: &'static str,
    pub gateways_up: usize,
    pub gateways: usize,
    pub proxy: SocketAddr,
    pub proxy_health: &'static str,
    pub backends_up: usize,
    pub backends: usize,
    pub services: BTreeMap<String, String>,
    /// `LIVE`, or `STALE` with its age, from the global zone; absent when
    /// etcd does not answer.
    pub liveness: Option<fedmesh_api::Liveness>,
}

/// Each cluster's liveness in the global zone; empty when etcd does not
/// answer within 2 s (status must work with etcd down).
pub async fn liveness(s: &State) -> BTreeMap<String, fedmesh_api::Liveness> {
    let endpoints: Vec<String> = s
        .etcd
        .iter()
        .map(|e| format!("http://{}", e.address))
        .collect();
    let read = async {
        let client = etcd_client::Client::connect(&endpoints, None).await.ok()?;
        let mut zone = fedmesh_zone::GlobalZone::new(client, Default::default());
        let records = zone.clusters().await.ok()?;
        let live = zone
            .liveness(&records, time::OffsetDateTime::now_utc())
            .await
            .ok()?;
        Some(records.into_iter().map(|r| r.name).zip(live).collect())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn status_of(
    s: &State,
    liveness: &BTreeMap<String, fedmesh_api::Liveness>,
) -> Vec<ClusterStatus> {
    s.clusters
        .iter()
        .map(|c| {
            let mut services: BTreeMap<String, (usize, usize)> = BTreeMap::new();
            for b in &c.backends {
                let e = services.entry(b.service.clone()).or_default();
                e.1 += 1;
                if b.pid.is_some_and(alive) {
                    e.0 += 1;
                }
            }
            ClusterStatus {
                name: c.name.clone(),
                cloud: c.cloud.clone(),
                region: c.region.clone(),
                controller: health(&c.controller),
                gateways_up: c.gateways.iter().filter(|g| health(g) == "up").count(),
                gateways: c.gateways.len(),
                proxy: c.proxy.address,
                proxy_health: health(&c.proxy),
                backends_up: c
                    .backends
                    .iter()
                    .filter(|b| b.pid.is_some_and(alive))
                    .count(),
                backends: c.backends.len(),
                services: services
                    .into_iter()
                    .map(|(k, (up, all))| (k, format!("{up}/{all}")))
                    .collect(),
                liveness: liveness.get(&c.name).copied(),
            }
        })
        .collect()
}

pub async fn print_status(s: &State, dir: &Path) {
    println!(
        "\n{:<20} {:<8} {:<16} {:<10} {:<10} {:<9} {:<22} SERVICES (healthy/total)",
        "CLUSTER", "CLOUD", "REGION", "CONTROLLER", "LIVENESS", "GATEWAYS", "PROXY"
    );
    for c in status_of(s, &liveness(s).await) {
        let services: Vec<String> = c.services.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "{:<20} {:<8} {:<16} {:<10} {:<10} {:<9} {:<22} {}",
            c.name,
            c.cloud,
            c.region,
            c.controller,
            c.liveness.map_or("?".to_string(), |l| l.to_string()),
            format!("{}/{}", c.gateways_up, c.gateways),
            format!("{} {}", c.proxy, c.proxy_health),
            services.join(", ")
        );
    }
    if let Some(c) = s.clusters.first()
        && let Some(b) = c.backends.iter().find(|b| !b.tcp)
    {
        let (ns, name) = b.service.split_once('/').unwrap_or(("", &b.service));
        println!(
            "\nTry it: curl -s -H 'host: {name}.{ns}' http://{}/\nLogs and state: {}\nStop a service's backends: fedmesh stop {}/{}   (and `fedmesh start …`)\n",
            c.proxy.address,
            dir.display(),
            c.name,
            b.service
        );
    }
}

/// `<cluster>/<namespace>/<name>[@zone]`.
fn matches(target: &str, cluster: &str, b: &BackendState) -> anyhow::Result<bool> {
    let (path, zone) = match target.split_once('@') {
        Some((p, z)) => (p, Some(z)),
        None => (target, None),
    };
    let mut parts = path.splitn(2, '/');
    let (Some(c), Some(service)) = (parts.next(), parts.next()) else {
        bail!("{target:?}: expected <cluster>/<namespace>/<name>[@zone]");
    };
    if !service.contains('/') {
        bail!("{target:?}: expected <cluster>/<namespace>/<name>[@zone]");
    }
    Ok(c == cluster && b.service == service && zone.is_none_or(|z| z == b.zone))
}

/// `fedmesh stop` / `fedmesh start`: kills or restarts the demo backends
/// `target` names, and marks them unhealthy or healthy in their cluster's
/// registry, as a readiness probe would.
pub async fn stop_start(dir: &Path, target: &str, start: bool) -> anyhow::Result<()> {
    let mut s = State::load(dir)?;
    let bins = binaries()?;
    let logs = dir.join("logs");
    let mut touched = Vec::new();
    for c in &mut s.clusters {
        let mut changed = false;
        for b in &mut c.backends {
            if !matches(target, &c.name, b)? {
                continue;
            }
            touched.push(b.id.clone());
            match (start, b.pid) {
                (false, Some(pid)) => {
                    stop_all(&[pid], Duration::from_secs(5)).await;
                    b.pid = None;
                    changed = true;
                }
                (true, None) => {
                    let log = logs.join(format!("{}.log", b.id.replace(['/', '@', '#'], "_")));
                    let pid = spawn(backend_cmd(&bins, b, &c.name), &log)?;
                    listening(b.address, "the backend", pid, &log).await?;
                    b.pid = Some(pid);
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            write_registry(c)?;
        }
    }
    if touched.is_empty() {
        bail!("{target:?} names no backend of {}", s.topology);
    }
    s.save(dir)?;
    println!(
        "{} {}",
        if start { "started" } else { "stopped" },
        touched.join(", ")
    );
    Ok(())
}
