//! Gateway fixtures: per-cluster CAs and SVIDs, real gateways on their
//! cluster's loopback block (127.0.<n>.x), echo backends, and a minimal
//! local proxy that opens tunnels through an egress.

pub use crate::sites;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use fedmesh_api::{Endpoint, ServiceKey};
use fedmesh_gateway::routes::{ExportedService, Peer};
use fedmesh_gateway::splice::{read_frame, write_frame};
use fedmesh_gateway::{Gateway, GatewayOptions, Metrics, Routes, Settings};
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_proto::tunnel::v1::{TunnelAccept, TunnelOpen};
use fedmesh_trust::tls::ALPN_TUNNEL;
use fedmesh_trust::{
    AllowIds, Bundle, BundleSet, CaOptions, ClusterCa, SpiffeId, Svid, SvidPolicy, TrustDomain,
};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

/// One simulated cluster: its name, trust domain, CA and loopback block.
pub struct Domain {
    pub cluster: String,
    pub td: TrustDomain,
    pub ca: ClusterCa,
    pub block: u8,
}

impl Domain {
    pub fn new(cluster: &str, td: &str, block: u8) -> Self {
        fedmesh_trust::install_default_provider();
        init_tracing();
        let td = TrustDomain::new(td).unwrap();
        let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
        Self {
            cluster: cluster.into(),
            td,
            ca,
            block,
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, self.block, host))
    }

    pub fn gateway_id(&self) -> SpiffeId {
        SpiffeId::gateway(&self.td, &self.cluster).unwrap()
    }

    pub fn gateway_svid(&self) -> Svid {
        self.ca
            .issue(
                &self.gateway_id(),
                &SvidPolicy::default(),
                SystemTime::now(),
            )
            .unwrap()
    }

    /// A gateway SVID that expires after `lifetime`.
    pub fn short_gateway_svid(&self, lifetime: std::time::Duration) -> Svid {
        let policy = SvidPolicy {
            lifetime,
            ..SvidPolicy::default()
        };
        self.ca
            .issue(&self.gateway_id(), &policy, SystemTime::now())
            .unwrap()
    }

    pub fn workload_id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(&self.td, ns, sa).unwrap()
    }

    pub fn workload_svid(&self, ns: &str, sa: &str) -> Svid {
        self.ca
            .issue(
                &self.workload_id(ns, sa),
                &SvidPolicy::default(),
                SystemTime::now(),
            )
            .unwrap()
    }

    pub fn bundle(&self) -> Bundle {
        Bundle::with_roots(self.td.clone(), [self.ca.cert_der().clone()])
    }

    /// Routes with no peers and no services yet.
    pub fn routes(&self, zone: &str) -> Routes {
        let mut r = Routes::new(&self.cluster, self.td.clone());
        r.zone = Some(zone.into());
        r
    }

    pub fn as_peer(&self, gateways: Vec<SocketAddr>) -> (String, Peer) {
        (
            self.cluster.clone(),
            Peer {
                trust_domain: self.td.clone(),
                gateways: gateways.into_iter().map(Into::into).collect(),
            },
        )
    }
}

pub fn bundles(domains: &[&Domain]) -> BundleSet {
    let mut set = BundleSet::new();
    for d in domains {
        set.insert(d.bundle());
    }
    set
}

pub fn export(routes: &mut Routes, service: &str, port: u16, endpoints: &[(SocketAddr, &str)]) {
    routes.services.insert(
        service.parse::<ServiceKey>().unwrap(),
        ExportedService {
            ports: vec![port],
            endpoints: endpoints
                .iter()
                .map(|(a, z)| Endpoint {
                    address: *a,
                    zone: (*z).into(),
                    healthy: true,
                })
                .collect(),
            allow: None,
        },
    );
}

/// A gateway in this process, with the senders that feed it.
pub struct Gw {
    pub gateway: Gateway,
    pub routes: watch::Sender<Arc<Routes>>,
    pub svid: watch::Sender<Arc<Svid>>,
    pub bundles: watch::Sender<Arc<BundleSet>>,
    pub metrics: Arc<Metrics>,
}

impl Gw {
    pub fn quic(&self) -> SocketAddr {
        self.gateway.quic_addr()
    }

    pub fn egress(&self) -> SocketAddr {
        self.gateway.egress_addr().unwrap()
    }

    pub fn update(&self, f: impl FnOnce(&mut Routes)) {
        self.routes.send_modify(|r| f(Arc::make_mut(r)));
    }

    /// Prometheus text of this gateway's metrics.
    pub fn scrape(&self) -> String {
        let mut reg = prometheus_client::registry::Registry::default();
        self.metrics.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    }

    /// The value of the sample whose line starts with `prefix`, or 0.
    pub fn sample(&self, prefix: &str) -> f64 {
        self.scrape()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .map(|v| v.parse().unwrap())
            .unwrap_or(0.0)
    }
}

pub async fn start_gateway(
    d: &Domain,
    host: u8,
    egress: bool,
    bundles: BundleSet,
    routes: Routes,
    settings: Settings,
) -> Gw {
    let quic = SocketAddr::new(d.ip(host), 0);
    start_gateway_at(d, quic, egress, bundles, routes, settings).await
}

/// Like [`start_gateway`], with the QUIC port chosen.
pub async fn start_gateway_at(
    d: &Domain,
    quic: SocketAddr,
    egress: bool,
    bundles: BundleSet,
    routes: Routes,
    settings: Settings,
) -> Gw {
    let (routes_tx, routes_rx) = watch::channel(Arc::new(routes));
    let (svid_tx, svid_rx) = watch::channel(Arc::new(d.gateway_svid()));
    let (bundles_tx, bundles_rx) = watch::channel(Arc::new(bundles));
    let metrics = Arc::new(Metrics::default());
    let options = GatewayOptions {
        quic,
        egress: egress.then(|| SocketAddr::new(quic.ip(), 0)),
        settings,
    };
    let gateway = Gateway::start(options, routes_rx, svid_rx, bundles_rx, metrics.clone())
        .await
        .unwrap();
    Gw {
        gateway,
        routes: routes_tx,
        svid: svid_tx,
        bundles: bundles_tx,
        metrics,
    }
}

/// A TCP echo server; counts the connections it accepted.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start(ip: IpAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                while let Ok((mut tcp, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        let (mut r, mut w) = tcp.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                    });
                }
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A local proxy's TLS client: presents `svid`, accepts only `egress_of`'s
/// gateway identity.
pub fn proxy_tls(svid: Svid, bundles: BundleSet, egress_of: &Domain) -> Arc<rustls::ClientConfig> {
    let (_s, svid) = watch::channel(Arc::new(svid));
    let (_b, bundles) = watch::channel(Arc::new(bundles));
    let authz = Arc::new(AllowIds::one(egress_of.gateway_id()));
    Arc::new(fedmesh_trust::client_config(svid, bundles, authz, &[ALPN_TUNNEL]).unwrap())
}

pub fn open_msg(service: &str, port: u32, target: &str) -> TunnelOpen {
    TunnelOpen {
        service: service.into(),
        port,
        target_cluster: target.into(),
        source_identity: String::new(),
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        deadline_ms: 0,
    }
}

/// Connects to an egress, sends `open`, and reads the answer.
pub async fn open_tunnel(
    egress: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    open: &TunnelOpen,
) -> std::io::Result<(TlsStream<TcpStream>, TunnelAccept)> {
    let tcp = TcpStream::connect(egress).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("fedmesh-gateway").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    write_frame(&mut s, open).await?;
    let accept = read_frame::<TunnelAccept>("TunnelAccept", &mut s)
        .await
        .map_err(std::io::Error::other)?;
    Ok((s, accept))
}

/// Opens a tunnel to `service` (port 8080) in `target` and echoes `msg`
/// through it; the refusal status otherwise (UNREACHABLE when the egress
/// cannot be reached at all).
pub async fn echo_through(
    egress: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    service: &str,
    target: &str,
    msg: &[u8],
) -> Result<(), Status> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, accept) = open_tunnel(egress, tls, &open_msg(service, 8080, target))
        .await
        .map_err(|_| Status::Unreachable)?;
    if accept.status() != Status::Ok {
        return Err(accept.status());
    }
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, msg);
    Ok(())
}

/// Deterministic bytes, so that both ends can check what went through.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16).wrapping_mul(31)) as u8;
    }
}

/// Logs to the test's output when RUST_LOG is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A real `fedmesh-gateway` process on a static config.
pub struct GatewayProcess {
    pub child: tokio::process::Child,
    pub quic: SocketAddr,
    pub egress: Option<SocketAddr>,
}

impl GatewayProcess {
    /// Starts a gateway of `d` on 127.0.<block>.<host>: it knows `peers`
    /// (each with its gateways), exports `services` (name, one endpoint),
    /// and has an egress when asked. Its file is written from the gateway's
    /// own `GatewayFile`. Returns once it listens.
    pub async fn spawn(
        dir: &std::path::Path,
        d: &Domain,
        host: u8,
        peers: &[(&Domain, Vec<SocketAddr>)],
        services: &[(&str, SocketAddr)],
        egress: bool,
        settings: Settings,
    ) -> Self {
        use fedmesh_gateway::config::{GatewayFile, IdentityFiles, Listen, PeerFile, ServiceFile};
        let svid = d.gateway_svid();
        let name = format!("{}-gw{host}", d.cluster);
        let (cert, key) = (format!("{name}.pem"), format!("{name}-key.pem"));
        std::fs::write(dir.join(&cert), svid.chain_pem()).unwrap();
        std::fs::write(dir.join(&key), svid.key_pem()).unwrap();
        let mut bundles = std::collections::BTreeMap::new();
        for b in std::iter::once(d).chain(peers.iter().map(|(p, _)| *p)) {
            let file = format!("{}.json", b.td);
            std::fs::write(dir.join(&file), b.bundle().to_document()).unwrap();
            bundles.insert(b.td.to_string(), file.into());
        }
        let file = GatewayFile {
            cluster: d.cluster.clone(),
            trust_domain: d.td.to_string(),
            zone: Some("z1".into()),
            listen: Listen {
                quic: SocketAddr::new(d.ip(host), 0),
                egress: egress.then(|| SocketAddr::new(d.ip(host), 0)),
                admin: None,
            },
            controller: None,
            identity: Some(IdentityFiles {
                certificate: cert.into(),
                key: key.into(),
            }),
            bundles: Some(bundles),
            peers: peers
                .iter()
                .map(|(p, gws)| PeerFile {
                    cluster: p.cluster.clone(),
                    trust_domain: p.td.to_string(),
                    gateways: gws.iter().map(|g| g.to_string()).collect(),
                })
                .collect(),
            services: services
                .iter()
                .map(|(svc, endpoint)| ServiceFile {
                    name: (*svc).into(),
                    ports: vec![8080],
                    endpoints: vec![fedmesh_api::ListedEndpoint {
                        address: endpoint.to_string(),
                        zone: "z1".into(),
                        healthy: true,
                    }],
                    allow: None,
                })
                .collect(),
            policies: Vec::new(),
            settings,
        };
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, serde_saphyr::to_string(&file).unwrap()).unwrap();
        Self::start(&config).await
    }

    /// Starts `fedmesh-gateway --config <config>`; returns once it listens.
    pub async fn start(config: &std::path::Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(crate::binary("fedmesh-gateway"))
            .arg("--config")
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("gateway did not start")
            .unwrap()
            .unwrap();
        // "fedmesh-gateway: quic on <addr>, egress on <addr or ->"
        let after = |key: &str| first.split(key).nth(1).and_then(|s| s.split(',').next());
        let quic = after("quic on ").unwrap().parse().unwrap();
        let egress = after("egress on ").and_then(|s| s.trim().parse().ok());
        Self {
            child,
            quic,
            egress,
        }
    }
}
