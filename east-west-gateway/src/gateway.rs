//! Assembles a gateway: one UDP socket for QUIC (ingress from peers, and
//! the egress's pooled connections to them, so peers see our registered
//! address), the egress TCP+TLS listener, and graceful drain.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_trust::tls::ALPN_TUNNEL;
use fedmesh_trust::{AuthorizeFn, BundleSet, Svid};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::Settings;
use crate::egress;
use crate::metrics::{BytesLabels, Direction, Metrics, StreamLabels};
use crate::routes::Routes;
use crate::splice::{self, Counters, code};
use crate::{ingress, quic};
use fedmesh_tunnel::peers::Watched;
use fedmesh_tunnel::pool::{PeerPool, PoolOptions};

/// What the ingress and egress share.
#[derive(Debug)]
pub(crate) struct GatewayState {
    pub routes: watch::Receiver<Arc<Routes>>,
    pub bundles: watch::Receiver<Arc<BundleSet>>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub streams: Arc<Streams>,
    pub draining: AtomicBool,
    /// Turns true at the drain: idle tunnels close after [`DRAIN_IDLE`].
    pub drain_signal: watch::Sender<bool>,
    /// Rotates choices among equals (endpoints, gateways).
    pub spread: AtomicUsize,
    /// Live inbound connections, per peer cluster.
    pub peer_connections: Counts,
    /// Live egress streams, per local workload (source identity).
    pub source_streams: Counts,
}

/// Live things (connections, streams) per key, each under a cap.
#[derive(Debug, Default)]
pub(crate) struct Counts(std::sync::Mutex<std::collections::HashMap<String, u32>>);

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One more for `key`, unless it holds `cap` already; given back when
    /// the returned guard drops.
    pub fn take(&self, key: &str, cap: u32) -> Option<Held<'_>> {
        let mut all = self.lock();
        let n = all.entry(key.to_owned()).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Held(self, key.to_owned()))
    }
}

pub(crate) struct Held<'a>(&'a Counts, String);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut all = self.0.lock();
        if let Some(n) = all.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                all.remove(&self.1);
            }
        }
    }
}

impl GatewayState {
    /// Splices an accepted tunnel with `to` (the endpoint or gateway on the
    /// far side, for the log), counting it and its bytes for `peer_cluster`.
    pub async fn relay(
        &self,
        direction: Direction,
        peer_cluster: &str,
        to: &str,
        (r, w): (impl AsyncRead + Unpin, impl AsyncWrite + Unpin),
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) {
        let m = &self.metrics;
        let labels = StreamLabels {
            direction,
            peer_cluster: peer_cluster.into(),
        };
        m.streams_opened.get_or_create(&labels).inc();
        let active = m.streams_active.get_or_create(&labels).clone();
        let bytes = |flow| {
            m.bytes
                .get_or_create(&BytesLabels {
                    peer_cluster: peer_cluster.into(),
                    flow,
                })
                .clone()
        };
        let counters = Counters {
            to_peer: bytes("to_peer"),
            from_peer: bytes("from_peer"),
        };
        active.inc();
        let idle = fedmesh_tunnel::splice::IdleLimit {
            idle: self.settings.stream_idle_timeout,
            drain: Some(fedmesh_tunnel::splice::Drain {
                draining: self.drain_signal.subscribe(),
                idle: DRAIN_IDLE,
                opened_by_peer: direction == "ingress",
            }),
        };
        let result = splice::splice(r, w, send, recv, idle, &counters).await;
        active.dec();
        match result {
            Ok(s) => tracing::debug!(
                to,
                to_peer = s.to_peer,
                from_peer = s.from_peer,
                "tunnel closed"
            ),
            Err(e) => tracing::debug!(to, error = %e, "tunnel aborted"),
        }
    }
}

/// While draining, a tunnel quiet for this long since its last answer is
/// closed: a client's pooled upstream connection, busy or idle, would
/// otherwise go on carrying requests (nothing in a raw tunnel can tell it
/// the gateway is going) and hold the drain to its deadline. A tunnel whose
/// request awaits its answer is never closed. A request that races the
/// close fails before any answer; the proxy replays a bodiless request
/// whose reused connection was reset, through another path.
pub const DRAIN_IDLE: Duration = Duration::from_millis(20);

/// Live streams: per peer cluster (for the limit) and in all (for drain).
#[derive(Debug, Default)]
pub(crate) struct Streams {
    per_peer: Mutex<HashMap<String, u32>>,
    total: AtomicUsize,
    changed: Notify,
}

/// Counts a stream until dropped.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    streams: Arc<Streams>,
    peer: Option<String>,
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.per_peer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more stream from `peer`, unless it holds `limit`.
    pub fn acquire(self: &Arc<Self>, peer: &str, limit: u32) -> Option<StreamGuard> {
        {
            let mut map = self.lock();
            let n = map.entry(peer.to_string()).or_default();
            if *n >= limit {
                return None;
            }
            *n += 1;
        }
        self.total.fetch_add(1, Ordering::SeqCst);
        Some(StreamGuard {
            streams: self.clone(),
            peer: Some(peer.to_string()),
        })
    }

    /// Counts a stream that has no per-peer limit here (egress).
    pub fn track(self: &Arc<Self>) -> StreamGuard {
        self.total.fetch_add(1, Ordering::SeqCst);
        StreamGuard {
            streams: self.clone(),
            peer: None,
        }
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(peer) = &self.peer {
            let mut map = self.streams.lock();
            if let Some(n) = map.get_mut(peer) {
                *n -= 1;
                if *n == 0 {
                    map.remove(peer);
                }
            }
        }
        self.streams.total.fetch_sub(1, Ordering::SeqCst);
        self.streams.changed.notify_waiters();
    }
}

/// Where a gateway listens, and how it behaves.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub quic: SocketAddr,
    pub egress: Option<SocketAddr>,
    pub settings: Settings,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Quic(#[from] quic::QuicConfigError),
    #[error("egress TLS: {0}")]
    Tls(#[from] fedmesh_trust::tls::TlsConfigError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    quic_addr: SocketAddr,
    egress_addr: Option<SocketAddr>,
    shared: Arc<GatewayState>,
    endpoint: quinn::Endpoint,
    pool: Arc<PeerPool>,
    stop_egress: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds and starts serving. Routes, SVID and bundles are followed
    /// live: a change applies to the next stream or handshake.
    pub async fn start(
        options: GatewayOptions,
        routes: watch::Receiver<Arc<Routes>>,
        svid: watch::Receiver<Arc<Svid>>,
        bundles: watch::Receiver<Arc<BundleSet>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        options.settings.validate().map_err(StartError::Settings)?;
        let shared = Arc::new(GatewayState {
            routes: routes.clone(),
            bundles: bundles.clone(),
            settings: options.settings.clone(),
            metrics,
            streams: Arc::default(),
            draining: AtomicBool::new(false),
            drain_signal: watch::Sender::new(false),
            spread: AtomicUsize::new(fastrand::usize(..)),
            peer_connections: Counts::default(),
            source_streams: Counts::default(),
        });
        let transport = Arc::new(quic::transport(&options.settings)?);

        // Peers: registered gateway identities of federated clusters, and
        // workloads of their trust domains connecting directly, each
        // verified against its own trust domain's bundle.
        let peer_routes = routes.clone();
        let peers = Arc::new(AuthorizeFn(move |id: &fedmesh_trust::SpiffeId| {
            peer_routes.borrow().caller(id).map(|_| ())
        }));
        let server = quic::server_config(svid.clone(), bundles.clone(), peers, transport.clone())?;
        let bind = |source| StartError::Bind {
            what: "QUIC",
            addr: options.quic,
            source,
        };
        let socket = quic::bind_udp(options.quic).map_err(bind)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind(std::io::Error::other("no async runtime for quinn")))?;
        // The payload size we advertise caps the peer's path MTU discovery.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(options.settings.max_udp_payload)
            .map_err(|e| StartError::Settings(format!("maxUdpPayload: {e}")))?;
        let endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime).map_err(bind)?;
        let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            what: "QUIC",
            addr: options.quic,
            source,
        })?;
        let pool = Arc::new(PeerPool::new(
            PoolOptions {
                svid: svid.clone(),
                bundles: bundles.clone(),
                backoff: options.settings.backoff(),
                drain_timeout: options.settings.drain_timeout,
                dns_servers: options.settings.dns_servers.clone(),
                // A gateway keeps its few peer connections warm.
                idle_release: None,
            },
            Arc::new(Watched(routes.clone())),
            shared.metrics.clone(),
            endpoint.clone(),
            transport,
        ));
        let mut tasks = vec![
            tokio::spawn(ingress::serve(endpoint.clone(), shared.clone())),
            tokio::spawn(prune(pool.clone(), routes.clone())),
        ];

        let (stop_egress, stop_rx) = watch::channel(false);
        let mut egress_addr = None;
        if let Some(addr) = options.egress {
            // Local proxies: workloads of this cluster's own trust domain.
            let own = routes.clone();
            let locals = Arc::new(AuthorizeFn(move |id: &fedmesh_trust::SpiffeId| {
                let td = own.borrow().trust_domain.clone();
                if id.is_member_of(&td) {
                    Ok(())
                } else {
                    Err(format!("{id} is not in this cluster's trust domain {td}"))
                }
            }));
            let tls = fedmesh_trust::server_config(svid, bundles, locals, &[ALPN_TUNNEL])?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "egress",
                    addr,
                    source,
                })?;
            egress_addr = Some(listener.local_addr().map_err(|source| StartError::Bind {
                what: "egress",
                addr,
                source,
            })?);
            tasks.push(tokio::spawn(egress::serve(
                listener,
                TlsAcceptor::from(Arc::new(tls)),
                pool.clone(),
                shared.clone(),
                stop_rx,
            )));
        }
        tracing::info!(quic = %quic_addr, egress = ?egress_addr, "gateway serving");
        Ok(Self {
            quic_addr,
            egress_addr,
            shared,
            endpoint,
            pool,
            stop_egress,
            tasks,
        })
    }

    /// QUIC connections open now, both directions.
    pub fn open_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    pub fn egress_addr(&self) -> Option<SocketAddr> {
        self.egress_addr
    }

    /// The egress's connection pool (for tests and status).
    pub fn pool(&self) -> &PeerPool {
        &self.pool
    }

    /// Streams being served now, both ways.
    pub fn active_streams(&self) -> usize {
        self.shared.streams.total()
    }

    /// Graceful shutdown: stop accepting connections and refuse new
    /// streams (OVERLOADED, which openers retry elsewhere), let live
    /// streams finish for up to the drain timeout, then close. Returns how
    /// many streams were still live at the deadline.
    pub async fn shutdown(self) -> usize {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.drain_signal.send_replace(true);
        self.endpoint.set_server_config(None);
        let _ = self.stop_egress.send(true);
        let streams = &self.shared.streams;
        let deadline = tokio::time::Instant::now() + self.shared.settings.drain_timeout;
        loop {
            let changed = streams.changed.notified();
            let live = streams.total();
            if live == 0 {
                break;
            }
            tracing::info!(live, "draining");
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let left = streams.total();
        if left > 0 {
            tracing::warn!(left, "drain deadline reached; closing live streams");
        }
        self.endpoint
            .close(code::SHUTDOWN, b"gateway shutting down");
        for t in &self.tasks {
            t.abort();
        }
        // Let the CONNECTION_CLOSE frames go out, briefly.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        left
    }
}

/// Drops pooled connections to gateways that left the routes: at every
/// routes change, and every 30 s for DNS answers that moved.
async fn prune(pool: Arc<PeerPool>, mut routes: watch::Receiver<Arc<Routes>>) {
    loop {
        tokio::select! {
            changed = routes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        pool.prune();
    }
}
