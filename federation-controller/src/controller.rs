//! The controller's runtime: wires the discovery source, the global-zone
//! watcher, the publisher, the mesh builder, the gRPC server and the admin
//! port together. Each part is its own task; this module only connects them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::Client;
use fedmesh_api::{AliveRecord, KeySpace, LocalServices};
use fedmesh_trust::{
    AllowTrustDomains, Authority, Bundle, BundleSet, RenewError, RenewalPolicy, RotationPolicy,
    SpiffeId, Svid, SvidPolicy, SvidSource, SystemClock, TrustDomain,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, ControllerMetrics};
use crate::discovery::{self, DiscoveryService, Versioned};
use crate::kubernetes::KubeOptions;
use crate::mesh;
use crate::publish;
use crate::registry::{self, DiscoverySource, FileRegistry, RegistryError};
use crate::rotation;
use crate::tokens::Tokens;
use crate::view::GlobalView;
use crate::watcher::{self, WatcherConfig};
use fedmesh_zone::gate::{Gate, GateConfig};
use fedmesh_zone::join::JoinDir;

/// How a controller runs. Fields are public and documented; the binary fills
/// them from flags.
#[derive(Debug)]
pub struct ControllerConfig {
    /// What `fedmesh register cluster` wrote.
    pub join: JoinDir,
    /// Where this cluster's own services come from.
    pub source: LocalSource,
    /// Where proxies and gateways reach the discovery and Certify API.
    pub discovery_addr: SocketAddr,
    /// Metrics, `/ready` and `/live`; `None` to disable.
    pub admin_addr: Option<SocketAddr>,
    /// The join tokens `Certify` accepts (none by default).
    pub tokens: Tokens,
    /// The life of the SVIDs `Certify` signs (24 h by default).
    pub svid: SvidPolicy,
    /// TTL of the `alive/<cluster>` lease.
    pub alive_ttl: Duration,
    pub watcher: WatcherConfig,
    /// How large discovery updates' chunks grow
    /// ([`discovery::CHUNK_BYTES`] by default).
    pub discovery_chunk_bytes: usize,
    /// Where `join` was read from, to take up CA rotations staged there
    /// (`fedmesh rotate-ca`); `None`: no rotation.
    pub join_dir: Option<PathBuf>,
    /// The cluster's Kubernetes API (`--kube`): `ServiceExport`s as a
    /// second local source, `ServiceImport`s, and ServiceAccount tokens
    /// for `Certify`. `None`: no Kubernetes.
    pub kube: Option<KubeOptions>,
    /// Believe unsigned values in the global zone (and obey raw deletes of
    /// them): the one step of upgrading a federation created before
    /// records were signed (`--trust-unsigned`). Off by default.
    pub trust_unsigned: bool,
    /// What must outlive a restart (`--state-dir`): the last good view of
    /// the global zone ([`LAST_GOOD_FILE`]), with the cluster's newest
    /// signed record. `None`: a restart starts from etcd alone.
    pub state_dir: Option<PathBuf>,
}

pub use fedmesh_zone::dump::LAST_GOOD_FILE;

impl ControllerConfig {
    pub fn new(join: JoinDir, source: LocalSource, discovery_addr: SocketAddr) -> Self {
        Self {
            join,
            source,
            discovery_addr,
            admin_addr: None,
            tokens: Tokens::default(),
            svid: SvidPolicy::default(),
            alive_ttl: Duration::from_secs(10),
            watcher: WatcherConfig::default(),
            discovery_chunk_bytes: discovery::CHUNK_BYTES,
            join_dir: None,
            kube: None,
            trust_unsigned: false,
            state_dir: None,
        }
    }
}

/// The local discovery source.
#[derive(Debug)]
pub enum LocalSource {
    /// The file registry, checked for changes every `poll`.
    File { path: PathBuf, poll: Duration },
    /// Services fed by the embedder (another source, a benchmark, a test).
    Channel(watch::Receiver<Arc<LocalServices>>),
    /// None besides Kubernetes, if set: with neither, the cluster exports
    /// nothing and only consumes.
    None,
}

impl LocalSource {
    pub fn file(path: PathBuf) -> Self {
        Self::File {
            path,
            poll: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("etcd client: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the global zone's access in the join directory: {0}")]
    Access(#[from] fedmesh_zone::AccessError),
    #[error("issuing the controller's SVID: {0}")]
    Identity(#[from] fedmesh_trust::CaError),
    #[error("trust domain: {0}")]
    TrustDomain(#[from] fedmesh_trust::SpiffeIdError),
    #[error("TLS: {0}")]
    Tls(#[from] fedmesh_trust::tls::TlsConfigError),
    #[error(
        "the join directory pins no federation anchor (anchor.pub), so no record of the global zone can be believed; register the cluster again with the anchor (fedmesh register cluster --anchor-dir), or pass --trust-unsigned for the one step of upgrading an unsigned federation"
    )]
    NoAnchor,
}

/// A running controller. Dropping it stops every task.
#[derive(Debug)]
pub struct Controller {
    pub discovery_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Arc<ControllerMetrics>,
    pub snapshots: discovery::Snapshots,
    pub bundles: watch::Receiver<Arc<BundleSet>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Issues SVIDs from this cluster's own authority.
struct LocalIssuer {
    authority: Arc<Mutex<Authority>>,
    id: SpiffeId,
}

impl SvidSource for LocalIssuer {
    async fn fetch(&self) -> Result<Svid, RenewError> {
        let mut a = self
            .authority
            .lock()
            .map_err(|_| RenewError("authority lock poisoned".into()))?;
        let now = SystemTime::now();
        a.poll(now);
        a.issue(&self.id, now).map_err(|e| RenewError(e.into()))
    }
}

impl Controller {
    pub async fn start(config: ControllerConfig) -> Result<Self, ControllerError> {
        let JoinDir {
            cluster,
            etcd,
            ca,
            anchor,
        } = config.join;
        if anchor.is_none() && !config.trust_unsigned {
            return Err(ControllerError::NoAnchor);
        }
        if config.trust_unsigned {
            tracing::warn!(
                "believing unsigned global-zone values (--trust-unsigned): any cluster's etcd credentials can forge them; sign the zone (fedmesh anchor adopt) and drop the flag"
            );
        }
        let gate = Gate::new(
            KeySpace::new(&etcd.prefix),
            GateConfig {
                anchors: anchor.iter().cloned().collect(),
                trust_unsigned: config.trust_unsigned,
                budget: Default::default(),
            },
        );
        let td = TrustDomain::new(&cluster.trust_domain)?;
        let keys = KeySpace::new(&etcd.prefix);
        let mut tasks = JoinSet::new();
        let (stop, stop_rx) = watch::channel(false);
        let metrics = Arc::new(ControllerMetrics::default());

        // Identity: our authority, and the controller's own SVID, renewed.
        let now = SystemTime::now();
        let mut authority = Authority::new(ca, config.svid.clone(), RotationPolicy::default(), now);
        // A rotation finished before a restart: the root it replaced still
        // vouches for leaves it signed, for one leaf lifetime after it
        // stopped signing.
        if let Some(dir) = &config.join_dir
            && let Some((previous, retired)) = JoinDir::previous_ca(dir, &td)
        {
            let drop_at = retired + config.svid.lifetime;
            if drop_at > now {
                authority = authority.retiring(previous, drop_at);
            }
        }
        let authority = Arc::new(Mutex::new(authority));
        // Our own bundle: what the authority says, changed by a rotation.
        let (own_tx, own_rx) = watch::channel(lock(&authority).bundle());
        let controller_id = SpiffeId::controller(&td, &cluster.name)?;
        let svid = lock(&authority).issue(&controller_id, now)?;
        let issuer = LocalIssuer {
            authority: authority.clone(),
            id: controller_id,
        };
        let (svid_rx, renewer) =
            fedmesh_trust::spawn_renewer(issuer, svid, RenewalPolicy::default(), SystemClock);
        tasks.spawn(async move {
            let _ = renewer.await;
        });

        // etcd: connects lazily, so a controller starts even while etcd is down.
        let opts = fedmesh_zone::connect_options(&etcd, Duration::from_secs(2))?
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect(&etcd.endpoints, Some(opts)).await?;

        // Local discovery: the file registry or the embedder's channel,
        // Kubernetes, or both together.
        let (listed, registry) = match config.source {
            LocalSource::File { path, poll } => {
                let registry = FileRegistry::start(path, poll).await?;
                (Some(registry.services()), Some(registry))
            }
            LocalSource::Channel(rx) => (Some(rx), None),
            LocalSource::None => (None, None),
        };
        let (conflicts_tx, conflicts_rx) = watch::channel(Arc::new(fedmesh_kube::Conflicts::new()));
        let kube_source = match &config.kube {
            Some(k) => Some(
                fedmesh_kube::KubeSource::start(
                    k.client.clone(),
                    conflicts_rx,
                    metrics.kube.clone(),
                )
                .await,
            ),
            None => None,
        };
        let local = match (listed, &kube_source) {
            (Some(l), Some(k)) => registry::merged(l, k.services()),
            (Some(l), None) => l,
            (None, Some(k)) => k.services(),
            // Exports nothing; the sender stays with the registry task below.
            (None, None) => watch::channel(Arc::new(LocalServices::new())).1,
        };

        // The global zone.
        let (view_tx, view_rx) = watch::channel(Arc::new(GlobalView::new(keys.clone())));
        let mut watcher_config = config.watcher;
        if let Some(dir) = &config.state_dir {
            watcher_config.last_good = Some(dir.join(LAST_GOOD_FILE));
        }
        tasks.spawn(watcher::run(
            client.clone(),
            GlobalView::new(keys.clone()),
            gate,
            view_tx,
            watcher_config,
            metrics.watch.clone(),
        ));
        tasks.spawn(publish::run_exports(
            client.clone(),
            keys.clone(),
            cluster.name.clone(),
            local.clone(),
            publish::ManifestSigner {
                svid: svid_rx.clone(),
                own_bundle: own_rx.clone(),
            },
            metrics.publish.clone(),
        ));
        let alive = AliveRecord {
            controller: format!("fedmesh-controller/{}", cluster.name),
            started_at: time::OffsetDateTime::now_utc(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        tasks.spawn(publish::run_alive(
            client.clone(),
            keys.clone(),
            cluster.name.clone(),
            alive,
            config.alive_ttl,
            stop_rx.clone(),
        ));
        if let Some(dir) = config.join_dir.clone() {
            let own_record = rotation::OwnRecord {
                cluster: cluster.name.clone(),
                join_dir: dir,
                last_good: config.state_dir.as_ref().map(|d| d.join(LAST_GOOD_FILE)),
                anchor: anchor.clone(),
            };
            tasks.spawn(rotation::run(
                own_record,
                authority.clone(),
                own_tx,
                client.clone(),
                keys.clone(),
            ));
        }
        tasks.spawn(sample_lag(client, view_rx.clone(), metrics.clone()));

        // The mesh: rebuilt on every change, versioned, published only once
        // the global zone has been listed at least once.
        let (snap_tx, snap_rx) = watch::channel::<Option<Arc<Versioned>>>(None);
        let first = bundle_set(&own_rx.borrow(), None);
        let (bundles_tx, bundles_rx) = watch::channel(Arc::new(first));
        tasks.spawn(build_mesh(
            cluster.name.clone(),
            own_rx,
            local,
            view_rx,
            snap_tx,
            bundles_tx,
            metrics.clone(),
        ));
        // Keep the local sources alive as long as the controller.
        tasks.spawn(async move {
            let _sources = (registry, kube_source);
            std::future::pending::<()>().await;
        });
        if let Some(k) = &config.kube {
            let (imports_tx, imports_rx) = watch::channel(Arc::new(fedmesh_kube::Imports::new()));
            tasks.spawn(crate::kubernetes::follow(
                snap_rx.clone(),
                imports_tx,
                conflicts_tx,
            ));
            tasks.spawn(fedmesh_kube::imports::run(
                k.client.clone(),
                imports_rx,
                k.clusterset_ip,
                metrics.imports.clone(),
            ));
        }

        // Discovery and Certify.
        let tls = fedmesh_trust::server_config_optional_client_auth(
            svid_rx,
            bundles_rx.clone(),
            Arc::new(AllowTrustDomains([td.clone()].into())),
            &[b"h2"],
        )?;
        let listener = TcpListener::bind(config.discovery_addr)
            .await
            .map_err(|source| ControllerError::Bind {
                what: "the discovery API",
                addr: config.discovery_addr,
                source,
            })?;
        let discovery_addr = listener
            .local_addr()
            .map_err(|source| ControllerError::Bind {
                what: "the discovery API",
                addr: config.discovery_addr,
                source,
            })?;
        let gateway_id = SpiffeId::gateway(&td, &cluster.name)?;
        let mut service = DiscoveryService::new(
            td,
            snap_rx.clone(),
            authority,
            config.tokens.clone(),
            metrics.discovery.clone(),
        );
        service.chunk_bytes = config.discovery_chunk_bytes;
        if let Some(k) = &config.kube {
            let gateway = k.gateway_account.as_ref().map(|a| (a.clone(), gateway_id));
            service = service
                .with_token_review(fedmesh_kube::TokenReviewer::new(k.client.clone()), gateway);
        }
        tasks.spawn(config.tokens.watch(Duration::from_secs(1), stop_rx.clone()));
        let mut stop_grpc = stop_rx.clone();
        tasks.spawn(async move {
            let shutdown = async move {
                let _ = stop_grpc.changed().await;
            };
            if let Err(e) = discovery::serve(listener, Arc::new(tls), service, shutdown).await {
                tracing::error!(error = %e, "discovery server failed");
            }
        });

        let admin_addr = match config.admin_addr {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ControllerError::Bind {
                        what: "the admin port",
                        addr,
                        source,
                    })?;
                let bound = l.local_addr().ok();
                tasks.spawn(admin::serve(l, metrics.clone(), snap_rx.clone()));
                bound
            }
            None => None,
        };
        tracing::info!(cluster = %cluster.name, %discovery_addr, ?admin_addr, "controller started");
        Ok(Self {
            discovery_addr,
            admin_addr,
            metrics,
            snapshots: snap_rx,
            bundles: bundles_rx,
            stop,
            tasks,
        })
    }

    /// Stops serving; the alive lease is left to expire.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

fn lock(a: &Mutex<Authority>) -> std::sync::MutexGuard<'_, Authority> {
    // A poisoned authority lock means a panic mid-issuance elsewhere; the
    // data inside is still consistent (issuance is a single push).
    a.lock().unwrap_or_else(|p| p.into_inner())
}

fn bundle_set(own: &Bundle, global: Option<&GlobalView>) -> BundleSet {
    let mut set = BundleSet::new();
    if let Some(g) = global {
        for b in g.bundles.values() {
            set.insert(b.clone());
        }
    }
    // Our own roots come from our authority, whatever etcd says.
    set.insert(own.clone());
    set
}

async fn build_mesh(
    cluster: String,
    mut own_bundle: watch::Receiver<Bundle>,
    mut local: watch::Receiver<Arc<LocalServices>>,
    mut global: watch::Receiver<Arc<GlobalView>>,
    snapshots: watch::Sender<Option<Arc<Versioned>>>,
    bundles: watch::Sender<Arc<BundleSet>>,
    metrics: Arc<ControllerMetrics>,
) {
    let mut version = 0u64;
    let epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let cluster: Arc<str> = cluster.into();
    let mut last: Option<mesh::MeshInputs> = None;
    let mut local_open = true;
    // Without a rotation driver the sender is gone at once: nothing changes.
    let mut own_open = true;
    loop {
        let g = global.borrow_and_update().clone();
        let l = local.borrow_and_update().clone();
        metrics.view_revision.store(g.revision(), Ordering::Relaxed);
        // Never publish before the first complete listing (of etcd, or the
        // last good view on disk): an empty mesh would tell proxies that
        // nothing exists anywhere.
        if g.is_complete() {
            let own = Arc::new(own_bundle.borrow_and_update().clone());
            let inputs = mesh::MeshInputs {
                cluster: cluster.clone(),
                local: l,
                global: g.clone(),
                own: Some(own.clone()),
            };
            let foreign = inputs.foreign_own_bundle();
            if foreign
                && !last
                    .as_ref()
                    .is_some_and(mesh::MeshInputs::foreign_own_bundle)
            {
                tracing::warn!(trust_domain = %own.trust_domain(), "etcd holds a bundle for our own trust domain with other roots than our CA files; ignoring it (proxies and gateways get ours)");
            }
            metrics.foreign_own_bundle.store(foreign, Ordering::Relaxed);
            let changed = last.as_ref().map(|prev| mesh::changed(prev, &inputs));
            if let Some(mesh::Changed::Services(keys)) = &changed {
                report_port_conflicts(&inputs, keys);
            }
            let publish = match (&changed, &last) {
                (Some(c), Some(prev)) => !c.is_empty() || inputs.bundles_differ(prev),
                _ => true,
            };
            if publish {
                version += 1;
                snapshots.send_replace(Some(Arc::new(Versioned {
                    version,
                    epoch,
                    inputs: inputs.clone(),
                })));
            }
            let set = bundle_set(&own, Some(&g));
            bundles.send_if_modified(|cur| {
                if **cur == set {
                    return false;
                }
                *cur = Arc::new(set);
                true
            });
            last = Some(inputs);
        }
        // A local source that has gone away leaves its last services in
        // force; the global zone keeps the mesh moving.
        tokio::select! {
            r = local.changed(), if local_open => local_open = r.is_ok(),
            r = own_bundle.changed(), if own_open => own_open = r.is_ok(),
            r = global.changed() => if r.is_err() { return },
        }
    }
}

/// Says which exporters of the changed services disagree on ports, and so
/// are left out of them (the rule is [`mesh::MeshInputs::ports`]).
fn report_port_conflicts(
    inputs: &mesh::MeshInputs,
    keys: &std::collections::BTreeSet<fedmesh_api::ServiceKey>,
) {
    for key in keys {
        let (ports, conflicting) = inputs.ports(key);
        if !conflicting.is_empty() {
            let conflicting: Vec<&str> = conflicting.iter().map(|c| &**c).collect();
            tracing::warn!(service = %key, ?ports, ?conflicting, "clusters export this service on other ports and are left out of it");
        }
    }
}

/// Samples how far the view trails etcd, for the admin port.
async fn sample_lag(
    mut client: Client,
    view: watch::Receiver<Arc<GlobalView>>,
    metrics: Arc<ControllerMetrics>,
) {
    loop {
        if let Ok(status) = client.status().await
            && let Some(h) = status.header()
        {
            let lag = (h.revision() - view.borrow().revision()).max(0);
            metrics.watch_lag_revisions.store(lag, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
