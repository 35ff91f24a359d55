//! Proxy fixtures: HTTP echo backends that say where they run, proxies in
//! this process fed a table the test controls, and a bounded GET load that
//! records every answer. Real gateways come from [`crate::gateway`].

pub use crate::gateway as gw;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::EgressMode;
use fedmesh_proxy::Proxy;
use fedmesh_proxy::config::{Common, Listen, Me, Settings};
use fedmesh_proxy::locality::Locality;
use fedmesh_proxy::table::{ServiceSpec, Table};
use fedmesh_trust::{BundleSet, Svid};
use fedmesh_tunnel::peers::Peers;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// An HTTP/1.1 echo backend: answers every request with
/// `{"cluster":…,"zone":…,"service":…}`. `stop` kills it (listener and
/// live connections); `start` brings it back on the same address.
pub struct Backend {
    pub addr: SocketAddr,
    who: String,
    task: Option<JoinHandle<()>>,
}

impl Backend {
    pub async fn new(ip: IpAddr, cluster: &str, zone: &str, service: &str) -> Self {
        let mut b = Self {
            addr: SocketAddr::new(ip, 0),
            who: format!(r#"{{"cluster":"{cluster}","zone":"{zone}","service":"{service}"}}"#),
            task: None,
        };
        b.start().await;
        b
    }

    pub async fn start(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let who = Bytes::from(self.who.clone());
        self.task = Some(tokio::spawn(async move {
            // Dropped with this task: every live connection dies with it.
            let mut conns = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let who = who.clone();
                conns.spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let who = who.clone();
                            async move {
                                // Read the whole request body before answering.
                                let _ = req.into_body().collect().await;
                                Ok::<_, Infallible>(Response::new(Full::new(who)))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where an answer came from, as the echo said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub at: Instant,
    pub cluster: String,
    pub zone: String,
    pub service: String,
}

fn field(json: &str, name: &str) -> String {
    let key = format!("\"{name}\":\"");
    json.split(&key)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_default()
        .to_string()
}

/// One GET through the proxy on a fresh connection.
pub async fn get(proxy: SocketAddr, host: &str) -> Result<Answer, String> {
    let mut c = Client::connect(proxy).await?;
    c.get(host).await
}

/// A keep-alive HTTP/1.1 client of the proxy.
pub struct Client {
    tx: hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
}

impl Client {
    pub async fn connect(proxy: SocketAddr) -> Result<Self, String> {
        let tcp = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Self { tx })
    }

    /// Whether the connection can take another request: false once the
    /// proxy closed it (after a `Connection: close` answer, say), which a
    /// pooling client sees before it sends anything.
    pub async fn usable(&mut self) -> bool {
        self.tx.ready().await.is_ok()
    }

    pub async fn get(&mut self, host: &str) -> Result<Answer, String> {
        self.tx.ready().await.map_err(|e| e.to_string())?;
        let req = Request::get("/")
            .header("host", host)
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = self.tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).to_string();
        if !status.is_success() {
            return Err(format!("{status}: {}", body.trim()));
        }
        Ok(Answer {
            at: Instant::now(),
            cluster: field(&body, "cluster"),
            zone: field(&body, "zone"),
            service: field(&body, "service"),
        })
    }
}

/// Steady GETs from a few keep-alive clients until stopped (or a bound on
/// time is hit), every answer recorded.
pub struct Load {
    pub answers: Arc<Mutex<Vec<Answer>>>,
    pub failures: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` loops, each pausing `pause` between requests; each stops
    /// by itself after two minutes at most.
    pub fn start(proxy: SocketAddr, host: &str, clients: usize, pause: Duration) -> Self {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = watch::channel(false);
        let workers = (0..clients)
            .map(|_| {
                let (answers, failures, stopped) =
                    (answers.clone(), failures.clone(), stopped.clone());
                let host = host.to_string();
                tokio::spawn(async move {
                    let end = Instant::now() + Duration::from_secs(120);
                    let mut client = None;
                    while !*stopped.borrow() && Instant::now() < end {
                        if client.is_none() {
                            client = Some(Client::connect(proxy).await.unwrap());
                        }
                        match client.as_mut().unwrap().get(&host).await {
                            Ok(a) => answers.lock().unwrap().push(a),
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                client = None;
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self {
            answers,
            failures,
            stop,
            workers,
        }
    }

    pub fn count(&self, pred: impl Fn(&Answer) -> bool) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| pred(a))
            .count()
    }

    pub fn answers_since(&self, t: Instant) -> Vec<Answer> {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.at >= t)
            .cloned()
            .collect()
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Waits until `n` more answers satisfying `pred` than now have come.
    pub async fn until(&self, what: &str, n: usize, pred: impl Fn(&Answer) -> bool) {
        let base = self.count(&pred);
        fedmesh_test_support::eventually(what, Duration::from_secs(30), || async {
            (self.count(&pred) >= base + n).then_some(())
        })
        .await;
    }

    pub async fn finish(self) -> (Vec<Answer>, Vec<String>) {
        let _ = self.stop.send(true);
        for w in self.workers {
            w.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (answers, failures)
    }
}

/// The locality `cluster`'s proxies run in: cloud = cluster, region r1.
pub fn me(d: &gw::Domain, zone: &str) -> Me {
    Me {
        cluster: d.cluster.clone(),
        trust_domain: d.td.clone(),
        locality: Locality {
            cloud: d.cluster.clone(),
            region: "r1".into(),
            zone: zone.into(),
        },
    }
}

/// How a test proxy reaches other clusters.
#[derive(Debug, Clone)]
pub enum Reach {
    /// QUIC straight to these peers' gateways (`egress: direct`).
    Direct(Peers),
    /// Through these local egress listeners (`egress: gateway`).
    Egress(Vec<SocketAddr>),
}

impl Reach {
    /// For a proxy with local endpoints only.
    pub fn nowhere() -> Self {
        Reach::Direct(Peers::new())
    }

    fn mode_and_peers(&self) -> (EgressMode, Peers) {
        match self {
            Reach::Direct(p) => (EgressMode::Direct, p.clone()),
            Reach::Egress(_) => (EgressMode::Gateway, Peers::new()),
        }
    }
}

/// The table a test proxy runs: its last specs and reach, rebuilt as the
/// test changes either.
#[derive(Debug)]
pub struct TableFeed {
    tx: watch::Sender<Arc<Table>>,
    settings: Settings,
    me: Me,
    held: Mutex<(Vec<ServiceSpec>, Reach)>,
}

impl TableFeed {
    fn send(&self) {
        let held = self.held.lock().unwrap();
        let (mode, peers) = held.1.mode_and_peers();
        let m = &self.me;
        let t =
            Table::build(&m.cluster, &m.locality, &self.settings, &held.0).reaching(mode, peers);
        self.tx.send_replace(Arc::new(t));
    }

    /// Rebuilds the table from `specs`, as a config reload or discovery
    /// update would.
    pub fn update(&self, specs: &[ServiceSpec]) {
        self.held.lock().unwrap().0 = specs.to_vec();
        self.send();
    }

    /// Changes where remote clusters are (their gateways) or how they are
    /// reached, as a discovery update would. The egress listeners are
    /// fixed at start.
    pub fn reach(&self, reach: Reach) {
        self.held.lock().unwrap().1 = reach;
        self.send();
    }
}

/// A proxy of `d` in this process, its HTTP listener on `d`'s block, fed
/// a table the test changes through the returned feed.
pub async fn start_proxy(
    d: &gw::Domain,
    zone: &str,
    specs: &[ServiceSpec],
    reach: Reach,
    bundles: BundleSet,
    settings: Settings,
) -> (Proxy, TableFeed) {
    let gateways = match &reach {
        Reach::Egress(g) => g.clone(),
        Reach::Direct(_) => vec![],
    };
    let common = Common {
        me: me(d, zone),
        listen: Listen {
            http: Some(SocketAddr::new(d.ip(5), 0)),
            tcp: vec![],
            admin: None,
        },
        gateways,
        settings: Settings {
            // QUIC from the proxy leaves from its cluster's block.
            source_address: Some(d.ip(5)),
            ..settings
        },
    };
    let (table_tx, table_rx) = watch::channel(Arc::new(Table::default()));
    let feed = TableFeed {
        tx: table_tx,
        settings: common.settings.clone(),
        me: common.me.clone(),
        held: Mutex::new((specs.to_vec(), reach)),
    };
    feed.send();
    let svid: Svid = d.workload_svid("shop", "web");
    let (_svid_tx, svid_rx) = watch::channel(Arc::new(svid));
    let (_b_tx, bundles_rx) = watch::channel(Arc::new(bundles));
    let proxy = Proxy::start(&common, table_rx, svid_rx, bundles_rx)
        .await
        .unwrap();
    // The SVID and bundle senders may go: their last values stay.
    (proxy, feed)
}

/// Writes a static config in `dir` for a proxy of `d` (HTTP, and admin if
/// asked, on `d`'s block) serving `shop/cart` at `backend`, with the
/// SVID and bundle files it names. `settings` is a YAML flow map.
pub fn static_config(
    dir: &Path,
    d: &gw::Domain,
    backend: SocketAddr,
    admin: bool,
    settings: &str,
) -> PathBuf {
    let svid = d.workload_svid("shop", "web");
    std::fs::write(dir.join("web.pem"), svid.chain_pem()).unwrap();
    std::fs::write(dir.join("web-key.pem"), svid.key_pem()).unwrap();
    std::fs::write(dir.join("bundle.json"), d.bundle().to_document()).unwrap();
    let ip = d.ip(5);
    let admin = if admin {
        format!(", admin: \"{ip}:0\"")
    } else {
        String::new()
    };
    let yaml = format!(
        "cluster: {cluster}
trustDomain: {td}
locality: {{cloud: {cluster}, region: r1, zone: az1}}
listen: {{http: \"{ip}:0\"{admin}}}
identity: {{certificate: web.pem, key: web-key.pem}}
bundles: {{{td}: bundle.json}}
services:
  - name: shop/cart
    port: 8080
    endpoints: [{{address: \"{backend}\", zone: az1}}]
settings: {settings}
",
        cluster = d.cluster,
        td = d.td,
    );
    let config = dir.join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    config
}

/// Writes a static config in `dir` for a proxy of `d` with one TCP
/// listener per service of `services`, each served only by cluster
/// `remote`, whose gateways are `gateways`. `egress`: through that local
/// egress listener (`egress: gateway`); `None`: QUIC straight to the
/// gateways (`egress: direct`).
pub fn remote_config(
    dir: &Path,
    d: &gw::Domain,
    remote: &gw::Domain,
    gateways: &[SocketAddr],
    egress: Option<SocketAddr>,
    services: &[&str],
    max_udp_payload: u16,
) -> PathBuf {
    use fedmesh_dataplane::peers::PeerFile;
    use fedmesh_proxy::config::{
        IdentityFiles, LocalityFile, ProxyFile, RemoteFile, ServiceFile, TcpListen,
    };
    let svid = d.workload_svid("shop", "web");
    let name = if egress.is_some() { "egress" } else { "direct" };
    let (cert, key) = (format!("{name}.pem"), format!("{name}-key.pem"));
    std::fs::write(dir.join(&cert), svid.chain_pem()).unwrap();
    std::fs::write(dir.join(&key), svid.key_pem()).unwrap();
    let mut bundles = std::collections::BTreeMap::new();
    for b in [d, remote] {
        let file = format!("{}.json", b.td);
        std::fs::write(dir.join(&file), b.bundle().to_document()).unwrap();
        bundles.insert(b.td.to_string(), file.into());
    }
    let keys: Vec<fedmesh_api::ServiceKey> = services.iter().map(|s| s.parse().unwrap()).collect();
    let file = ProxyFile {
        cluster: d.cluster.clone(),
        trust_domain: d.td.to_string(),
        locality: LocalityFile {
            cloud: d.cluster.clone(),
            region: "r1".into(),
            zone: "z1".into(),
        },
        listen: Listen {
            http: None,
            // Port 0 each: one address per listener.
            tcp: keys
                .iter()
                .zip(20..)
                .map(|(k, host)| TcpListen {
                    address: SocketAddr::new(d.ip(host), 0),
                    service: k.clone(),
                })
                .collect(),
            admin: None,
        },
        gateways: egress.into_iter().collect(),
        peers: vec![PeerFile {
            cluster: remote.cluster.clone(),
            trust_domain: remote.td.to_string(),
            gateways: gateways.iter().map(ToString::to_string).collect(),
        }],
        controller: None,
        identity: Some(IdentityFiles {
            certificate: cert.into(),
            key: key.into(),
        }),
        bundles: Some(bundles),
        services: keys
            .iter()
            .map(|k| ServiceFile {
                name: k.clone(),
                port: 8080,
                endpoints: vec![],
                remote: vec![RemoteFile {
                    cluster: remote.cluster.clone(),
                    cloud: remote.cluster.clone(),
                    region: "r1".into(),
                    healthy: 1,
                    total: 1,
                }],
                failover: None,
            })
            .collect(),
        policies: vec![],
        settings: Settings {
            egress: Some(if egress.is_some() {
                EgressMode::Gateway
            } else {
                EgressMode::Direct
            }),
            source_address: Some(d.ip(5)),
            max_udp_payload,
            ..Settings::default()
        },
    };
    let path = dir.join(format!("{name}-proxy.yaml"));
    std::fs::write(&path, serde_saphyr::to_string(&file).unwrap()).unwrap();
    path
}

/// A real `fedmesh-proxy` process, with the addresses its first line gave.
pub struct ProxyProcess {
    pub child: tokio::process::Child,
    pub http: Option<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

impl ProxyProcess {
    /// Starts it on `config` with `RUST_LOG=rust_log`; stderr is piped.
    pub async fn start(config: &Path, rust_log: &str) -> Self {
        let mut cmd = tokio::process::Command::new(crate::binary("fedmesh-proxy"));
        cmd.arg("--config").arg(config);
        Self::spawn(cmd, rust_log).await
    }

    /// [`Self::start`], with more arguments.
    pub async fn start_with_args(config: &Path, rust_log: &str, args: &[&std::ffi::OsStr]) -> Self {
        let mut cmd = tokio::process::Command::new(crate::binary("fedmesh-proxy"));
        cmd.arg("--config").arg(config).args(args);
        Self::spawn(cmd, rust_log).await
    }

    /// [`Self::start`], with the process's file descriptor limit
    /// (`ulimit -n`) set to `fds`.
    pub async fn start_with_fd_limit(config: &Path, rust_log: &str, fds: u32) -> Self {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" --config \"$1\""))
            .arg(crate::binary("fedmesh-proxy"))
            .arg(config);
        Self::spawn(cmd, rust_log).await
    }

    async fn spawn(mut cmd: tokio::process::Command, rust_log: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = cmd
            .env("RUST_LOG", rust_log)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the proxy did not start")
            .unwrap()
            .unwrap();
        // "fedmesh-proxy: http on <addr>, tcp on [...], admin on <addr or ->"
        let after = |key: &str| {
            first
                .split(key)
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        };
        let tcp = first
            .split("tcp on [")
            .nth(1)
            .and_then(|s| s.split(']').next())
            .map(|list| list.split(", ").filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default();
        Self {
            http: after("http on "),
            tcp,
            admin: after("admin on "),
            child,
        }
    }
}
