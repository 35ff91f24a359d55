//! fedmesh's local proxy: the data plane next to the apps.
//!
//! The I/O-free core of balancing, each part taking `now` so that it is
//! tested on a virtual clock:
//!
//! - [`locality`]: priority levels (same zone, same region, same cloud, the
//!   rest), and the per-level health that spill-over works from, with
//!   hysteresis on failback;
//! - [`outlier`]: consecutive-failure ejection with a growing ejection time,
//!   a cap on the ejected share, and recovery;
//! - [`pick`]: power of two choices over peak-EWMA latency and load;
//! - [`budget`]: the retry budget;
//! - [`limits`]: circuit breakers;
//! - [`attempts`]: the attempts of one request: failover, retries,
//!   timeouts and giving up;
//! - [`balancer`]: all of the above over one service's targets (local
//!   endpoints, and one virtual endpoint per remote cluster);
//! - [`table`]: services and their targets, from plain data; and
//!   [`discovered`], that data from the controller's discovery stream.
//!
//! The drivers around it: [`upstream`] (direct TCP; QUIC to a remote
//! gateway, [`quic`]; or a tunnel through a local gateway's egress),
//! [`http`] (the HTTP/1.1 + h2c listener, with failover, retries, timeouts
//! and pooled upstream connections), [`tcp`] (TCP listeners), and
//! [`Proxy`], which starts them. Where the table comes
//! from (a static file or the controller: [`config`]) is the caller's
//! business; this crate depends on neither etcd nor kube.

pub mod attempts;
pub mod balancer;
pub mod budget;
pub mod config;
pub mod discovered;
pub mod downstream;
pub mod http;
pub mod limits;
pub mod locality;
pub mod metrics;
pub mod outlier;
pub mod pick;
pub mod policy;
pub mod quic;
pub mod runtime;
pub mod table;
pub mod tcp;
pub mod trace;
pub mod upstream;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_dataplane::handoff::{HandoffError, Inherited, Offering};
use fedmesh_trust::{AllowIds, BundleSet, SpiffeId, Svid};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Common;
use crate::metrics::Metrics;
use crate::runtime::Shared;
use crate::table::Table;
use crate::upstream::Connector;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS towards the egress: {0}")]
    Tls(String),
    #[error("QUIC to remote gateways: {0}")]
    QuicConfig(#[from] fedmesh_tunnel::quic::QuicConfigError),
    #[error("binding the UDP socket for QUIC to remote gateways on {addr}: {source}")]
    Quic {
        addr: String,
        source: std::io::Error,
    },
}

/// What a proxy process adds to [`Proxy::start`].
#[derive(Debug, Default)]
pub struct Extras {
    /// Records a span per request.
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// The discovery client's status, shown on the admin port (skipped
    /// services, each remote cluster's liveness).
    pub discovery: Option<watch::Receiver<Arc<fedmesh_discovery::SyncStatus>>>,
    /// Asks the controller for services the table lacks, at their first
    /// request (discovery with a listed scope).
    pub on_demand: Option<fedmesh_discovery::OnDemand>,
    /// Listeners taken over from the proxy this one replaces: each listen
    /// address found here is served on that very socket, not bound again.
    pub inherited: Option<Inherited>,
}

/// Where the listeners come from: inherited, or bound here. A copy of each
/// is kept to hand over at the next restart.
struct Binder {
    inherited: Option<Inherited>,
    kept: Vec<(SocketAddr, OwnedFd)>,
}

impl Binder {
    async fn bind(
        &mut self,
        what: &'static str,
        addr: SocketAddr,
    ) -> Result<TcpListener, StartError> {
        let e = |source| StartError::Bind { what, addr, source };
        let l = match self.inherited.as_mut().and_then(|i| i.take(addr)) {
            Some(taken) => TcpListener::from_std(taken.map_err(e)?).map_err(e)?,
            None => TcpListener::bind(addr).await.map_err(e)?,
        };
        let local = l.local_addr().map_err(e)?;
        self.kept
            .push((local, l.as_fd().try_clone_to_owned().map_err(e)?));
        Ok(l)
    }
}

/// A running proxy. Dropping it stops its listeners at once; [`Proxy::drain`]
/// stops them gracefully.
#[derive(Debug)]
pub struct Proxy {
    pub http: Option<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// The listeners, which end by themselves on shutdown.
    serving: Vec<JoinHandle<()>>,
    /// Housekeeping, which is stopped.
    background: Vec<JoinHandle<()>>,
    /// The admin port, which stops at a drain: probes then reach the
    /// process that took over, or fail.
    admin_task: Option<JoinHandle<()>>,
    /// A copy of each listener, for [`Proxy::offer`].
    listeners: Vec<(SocketAddr, OwnedFd)>,
    /// Listeners taken over at start, until [`Proxy::accepting`].
    inherited: Option<Inherited>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self
            .serving
            .iter()
            .chain(&self.background)
            .chain(&self.admin_task)
        {
            t.abort();
        }
    }
}

impl Proxy {
    /// Binds every listener, then serves `table`, reaching remote clusters
    /// through `common.gateways` with `svid`, verified by `bundles`.
    pub async fn start(
        common: &Common,
        table: watch::Receiver<Arc<Table>>,
        svid: watch::Receiver<Arc<Svid>>,
        bundles: watch::Receiver<Arc<BundleSet>>,
    ) -> Result<Self, StartError> {
        Self::start_with(common, table, svid, bundles, Extras::default()).await
    }

    /// [`Proxy::start`], with what a full process adds.
    pub async fn start_with(
        common: &Common,
        table: watch::Receiver<Arc<Table>>,
        svid: watch::Receiver<Arc<Svid>>,
        bundles: watch::Receiver<Arc<BundleSet>>,
        extras: Extras,
    ) -> Result<Self, StartError> {
        let Extras {
            tracer,
            discovery,
            on_demand,
            inherited,
        } = extras;
        let me = &common.me;
        let egress_id = SpiffeId::gateway(&me.trust_domain, &me.cluster)
            .map_err(|e| StartError::Tls(e.to_string()))?;
        let tls = fedmesh_trust::client_config(
            svid.clone(),
            bundles.clone(),
            Arc::new(AllowIds::one(egress_id)),
            &[fedmesh_trust::tls::ALPN_TUNNEL],
        )
        .map_err(|e| StartError::Tls(e.to_string()))?;
        let metrics = Arc::new(Metrics::default());
        let settings = &common.settings;
        let transport = quic::transport(settings)?;
        let pool = quic::pool(
            settings,
            transport,
            table.clone(),
            svid,
            bundles,
            metrics.clone(),
        )
        .map_err(|source| StartError::Quic {
            addr: settings
                .source_address
                .map_or("any address".into(), |a| a.to_string()),
            source,
        })?;
        let connector = Connector::new(
            common.gateways.clone(),
            Arc::new(tls),
            settings.connect_timeout,
            table.clone(),
            Arc::new(pool),
        );
        let mut shared = Shared::new(
            me.clone(),
            common.settings.clone(),
            table.clone(),
            connector,
            metrics.clone(),
            tracer,
        );
        shared.on_demand = on_demand;
        let shared = Arc::new(shared);
        let (shutdown, stop) = watch::channel(false);
        let mut binder = Binder {
            inherited,
            kept: Vec::new(),
        };
        let mut tasks = Vec::new();
        let mut background = Vec::new();
        let mut http_addr = None;
        if let Some(addr) = common.listen.http {
            let l = binder.bind("http", addr).await?;
            http_addr = l.local_addr().ok();
            tasks.push(tokio::spawn(http::serve(
                l,
                shared.clone(),
                stop.clone(),
                common.settings.drain_timeout,
            )));
        }
        let mut tcp_addrs = Vec::new();
        for t in &common.listen.tcp {
            let l = binder.bind("tcp", t.address).await?;
            tcp_addrs.push(l.local_addr().unwrap_or(t.address));
            tasks.push(tokio::spawn(tcp::serve(
                l,
                t.service.clone(),
                shared.clone(),
                stop.clone(),
                common.settings.drain_timeout,
            )));
        }
        let mut admin_addr = None;
        let mut admin_task = None;
        if let Some(addr) = common.listen.admin {
            let l = binder.bind("admin", addr).await?;
            admin_addr = l.local_addr().ok();
            let mut registry = prometheus_client::registry::Registry::default();
            metrics.register(&mut registry);
            if let Some(status) = discovery {
                registry.register_collector(Box::new(fedmesh_discovery::StatusMetrics(status)));
            }
            let t = table.clone();
            let ready: fedmesh_admin::Readiness = Arc::new(move || {
                let n = t.borrow().services.len();
                Ok(format!("{n} services"))
            });
            admin_task = Some(tokio::spawn(fedmesh_admin::serve(
                l,
                Arc::new(registry),
                ready,
            )));
        }
        background.push(tokio::spawn(housekeeping(shared.clone(), table)));
        Ok(Self {
            http: http_addr,
            tcp: tcp_addrs,
            admin: admin_addr,
            metrics,
            shared,
            shutdown,
            serving: tasks,
            background,
            admin_task,
            listeners: binder.kept,
            inherited: binder.inherited,
        })
    }

    /// Tells the proxy this one replaced that it accepts on every listener
    /// it took: that one stops accepting and drains. Nothing to do on a
    /// first start.
    pub fn accepting(&mut self) -> std::io::Result<()> {
        self.inherited.take().map_or(Ok(()), Inherited::accepting)
    }

    /// Offers this proxy's listeners on `path` to the one that will
    /// replace it ([`fedmesh_dataplane::handoff`]).
    pub fn offer(&self, path: &std::path::Path) -> Result<Offering, HandoffError> {
        let fds: Vec<_> = self
            .listeners
            .iter()
            .map(|(a, fd)| (*a, fd.as_fd()))
            .collect();
        Offering::bind(path, &fds)
    }

    /// Stops accepting, and lets live requests and TCP connections finish
    /// for up to the drain timeout. Drop the [`Offering`] first if nothing
    /// took over: its copies would keep the sockets open.
    pub async fn drain(mut self) {
        // The serving tasks close their listeners; these copies must not
        // keep them open.
        self.listeners.clear();
        if let Some(admin) = self.admin_task.take() {
            admin.abort();
        }
        let _ = self.shutdown.send(true);
        let deadline = self.shared.settings.drain_timeout;
        // The HTTP task ends once its connections have drained.
        let tasks = std::mem::take(&mut self.serving);
        let _ = tokio::time::timeout(deadline + Duration::from_secs(1), async {
            for t in tasks {
                if !t.is_finished() {
                    let _ = t.await;
                }
            }
        })
        .await;
    }

    /// Idle upstream connections held in the pool.
    pub fn idle_connections(&self) -> usize {
        self.shared.pool.idle_count()
    }
}

/// Drops pooled connections (HTTP, and QUIC to gateways no longer listed)
/// and balancer state that table updates have left behind, on every update
/// and every 30 s.
async fn housekeeping(shared: Arc<Shared>, mut table: watch::Receiver<Arc<Table>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            r = table.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
        let t = table.borrow_and_update().clone();
        shared.pool.sweep(&t);
        shared.retain_states(&t);
        shared.connector.prune();
    }
}
