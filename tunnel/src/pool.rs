//! The QUIC client side of the tunnel, shared by whatever opens streams to
//! other clusters' ingress gateways (the egress gateway; the proxy, in
//! direct mode): one pooled connection per remote gateway, shared by all
//! streams to it; gateways that failed wait out a jittered backoff while
//! streams go to the cluster's next gateway; DNS names resolved and
//! re-resolved when every address they gave fails; peers re-verified when
//! the bundles change. Where the gateways are ([`Directory`]) and what is
//! reported ([`PoolEvents`]) are the caller's.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedmesh_proto::tunnel::v1::{TunnelAccept, TunnelOpen, tunnel_accept::Status};
use fedmesh_trust::{BundleSet, SpiffeId, Svid, TrustDomain};
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use crate::backoff::{BackoffPolicy, PeerHealth, try_order};
use crate::dns::Dns;
use crate::frame::{self, OpenRequest, Refusal};
use crate::io::{ReadFrameError, read_frame, write_frame};
use crate::peers::{Directory, GatewayAddr};
use crate::quic::{self, handshake_reason};

/// A tunnel stream that a peer gateway accepted.
#[derive(Debug)]
pub struct Opened {
    pub send: SendStream,
    pub recv: RecvStream,
    /// The endpoint the peer connected to.
    pub endpoint: String,
    pub gateway: SocketAddr,
}

enum DialFailure {
    Refused(Refusal),
    Unreachable(String),
}

/// What the pool reports, for the caller's metrics.
pub trait PoolEvents: Send + Sync + std::fmt::Debug + 'static {
    /// A connection to `gateway` of `cluster` came up, or went.
    fn peer_up(&self, cluster: &str, gateway: SocketAddr, up: bool);
    /// Its smoothed round trip, about once a second while it lives.
    fn rtt(&self, cluster: &str, gateway: SocketAddr, rtt: Duration);
    /// A handshake with a gateway of `cluster` failed.
    fn handshake_failed(&self, cluster: &str, reason: &'static str);
    /// `gateway` left the directory: forget what was reported of it.
    fn forget(&self, cluster: &str, gateway: SocketAddr);
}

/// Who the pool is, and how it treats failures.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub svid: watch::Receiver<Arc<Svid>>,
    pub bundles: watch::Receiver<Arc<BundleSet>>,
    /// Between reconnection attempts to a gateway that failed.
    pub backoff: BackoffPolicy,
    /// How long live streams may go on over a connection whose peer no
    /// longer verifies.
    pub drain_timeout: Duration,
    /// Name servers for gateways given by DNS name; empty: the system's.
    pub dns_servers: Vec<SocketAddr>,
    /// A connection no stream was opened on for this long is let go at the
    /// next [`PeerPool::prune`] (it closes after its last stream), so that
    /// keep-alives do not run forever to gateways once used. `None`: kept
    /// while the gateway is listed.
    pub idle_release: Option<Duration>,
}

/// What the pool's background tasks (dials, connection watchers) share.
#[derive(Debug)]
struct Ctx {
    options: PoolOptions,
    events: Arc<dyn PoolEvents>,
}

/// One pooled connection per peer gateway, shared by all streams to it.
#[derive(Debug)]
pub struct PeerPool {
    ctx: Arc<Ctx>,
    directory: Arc<dyn Directory>,
    endpoint: quinn::Endpoint,
    transport: Arc<quinn::TransportConfig>,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    configs: Mutex<HashMap<(String, TrustDomain), quinn::ClientConfig>>,
    dns: Dns,
    /// Rotates the start among a cluster's equally good gateways.
    spread: AtomicUsize,
}

#[derive(Debug)]
struct Slot {
    conn: tokio::sync::Mutex<Option<Connection>>,
    health: Mutex<PeerHealth>,
    /// The last connection's round trip, in microseconds (0: none yet).
    rtt_us: std::sync::atomic::AtomicU64,
    /// A reconnection after a failure runs in the background.
    probing: std::sync::atomic::AtomicBool,
    /// Told when it ends.
    probed: tokio::sync::Notify,
    /// The cluster it serves, for reports.
    cluster: String,
    /// Set when the routes no longer name this gateway.
    retired: tokio::sync::Notify,
    /// When a stream last asked for this gateway's connection.
    used: Mutex<Instant>,
}

impl Slot {
    fn rtt(&self) -> Option<Duration> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

/// A pool lock is never held across an await; a poisoned one only means a
/// panic elsewhere, and the map inside is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerPool {
    /// A pool dialling from `endpoint`, with `transport` for its
    /// connections.
    pub fn new(
        options: PoolOptions,
        directory: Arc<dyn Directory>,
        events: Arc<dyn PoolEvents>,
        endpoint: quinn::Endpoint,
        transport: Arc<quinn::TransportConfig>,
    ) -> Self {
        let dns = Dns::new(&options.dns_servers);
        Self {
            ctx: Arc::new(Ctx { options, events }),
            directory,
            endpoint,
            transport,
            slots: Mutex::default(),
            configs: Mutex::default(),
            dns,
            spread: AtomicUsize::new(fastrand::usize(..)),
        }
    }

    /// Whether the pool holds a live connection to `gateway`.
    pub fn connected(&self, gateway: SocketAddr) -> bool {
        let Some(slot) = lock(&self.slots).get(&gateway).cloned() else {
            return false;
        };
        slot.conn
            .try_lock()
            .map(|c| c.as_ref().is_some_and(|c| c.close_reason().is_none()))
            .unwrap_or(false)
    }

    /// Opens a tunnel stream to a gateway of `req.target_cluster`.
    pub async fn open(&self, req: &OpenRequest) -> Result<Opened, Refusal> {
        let (td, gateways) = self.directory.gateways_of(&req.target_cluster)?;
        let now = Instant::now();
        let deadline = now + req.deadline;
        let mut tried = Vec::new();
        let targets = self.resolve(&gateways, deadline, &mut tried).await;
        let addrs: Vec<SocketAddr> = targets.iter().map(|(a, _)| *a).collect();
        let spread = self.spread.fetch_add(1, Ordering::Relaxed);
        let order = try_order(&addrs, |g| self.available(g, now), spread);
        if order.is_empty() {
            let why = if tried.is_empty() {
                "every gateway failed recently and is in reconnect backoff".to_string()
            } else {
                tried.join("; ")
            };
            return Err(Refusal::new(
                Status::Unreachable,
                format!("no gateway of {} to try: {why}", req.target_cluster),
            ));
        }
        let name_of = |gw: SocketAddr| {
            targets
                .iter()
                .find(|(a, _)| *a == gw)
                .and_then(|(_, n)| n.as_deref())
        };
        let mut refusal: Option<Refusal> = None;
        for gw in order {
            if Instant::now() >= deadline {
                tried.push("deadline reached".to_string());
                break;
            }
            match self.attempt(gw, req, &td, deadline).await {
                Ok(o) => return Ok(o),
                Err(DialFailure::Refused(r)) if !r.worth_another_gateway() => return Err(r),
                Err(DialFailure::Refused(r)) => {
                    tried.push(format!("{gw}: {r}"));
                    refusal.get_or_insert(r);
                }
                Err(DialFailure::Unreachable(m)) => {
                    // The name may have moved (a replaced load balancer).
                    if let Some(host) = name_of(gw) {
                        self.dns.expire(host);
                    }
                    tried.push(format!("{gw}: {m}"));
                }
            }
        }
        let tried = tried.join("; ");
        // A peer's own refusal says more than "unreachable"; pass it on.
        Err(match refusal {
            Some(r) => Refusal::new(r.status, tried),
            None => Refusal::new(
                Status::Unreachable,
                format!(
                    "no gateway of {} could be reached ({tried})",
                    req.target_cluster
                ),
            ),
        })
    }

    /// The addresses of `gateways`, in order, each with the DNS name it
    /// came from. A name that cannot be resolved is noted in `tried`.
    async fn resolve(
        &self,
        gateways: &[GatewayAddr],
        deadline: Instant,
        tried: &mut Vec<String>,
    ) -> Vec<(SocketAddr, Option<String>)> {
        let mut out = Vec::with_capacity(gateways.len());
        for g in gateways {
            match g {
                GatewayAddr::Ip(a) => out.push((*a, None)),
                GatewayAddr::Name { host, port } => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut answer = self.dns.resolve(host, left).await;
                    // Every address the name had is failing: it may have
                    // moved (a replaced load balancer). Ask again.
                    let all_down = answer.as_ref().is_ok_and(|ips| {
                        ips.iter()
                            .all(|ip| !self.available(&SocketAddr::new(*ip, *port), Instant::now()))
                    });
                    if all_down {
                        self.dns.expire(host);
                        answer = self.dns.resolve(host, left).await;
                    }
                    match answer {
                        Ok(ips) => out.extend(
                            ips.into_iter()
                                .map(|ip| (SocketAddr::new(ip, *port), Some(host.clone()))),
                        ),
                        Err(e) => tried.push(e),
                    }
                }
            }
        }
        // A name may resolve to an address also listed on its own.
        let mut seen = std::collections::HashSet::new();
        out.retain(|(a, _)| seen.insert(*a));
        out
    }

    /// Forgets the gateways the routes no longer name (a cluster that left,
    /// a gateway it dropped, an address its DNS name no longer gives), and
    /// those unused for `idle_release`. Their live streams finish; each
    /// connection closes after its last stream. Without this, keep-alives
    /// would hold such connections open forever.
    pub fn prune(&self) {
        let keep: HashSet<SocketAddr> = self
            .directory
            .all_gateways()
            .iter()
            .flat_map(|g| match g {
                GatewayAddr::Ip(a) => vec![*a],
                GatewayAddr::Name { host, port } => self
                    .dns
                    .last(host)
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, *port))
                    .collect(),
            })
            .collect();
        let idle_since = self
            .ctx
            .options
            .idle_release
            .and_then(|d| Instant::now().checked_sub(d));
        let gone: Vec<(SocketAddr, Arc<Slot>)> = {
            let mut slots = lock(&self.slots);
            let addrs: Vec<SocketAddr> = slots
                .iter()
                .filter(|(a, slot)| {
                    !keep.contains(a) || idle_since.is_some_and(|t| *lock(&slot.used) < t)
                })
                .map(|(a, _)| *a)
                .collect();
            addrs
                .into_iter()
                .filter_map(|a| slots.remove(&a).map(|s| (a, s)))
                .collect()
        };
        for (gw, slot) in gone {
            slot.retired.notify_one();
            self.ctx.events.forget(&slot.cluster, gw);
            tracing::info!(gateway = %gw, cluster = %slot.cluster, "peer gateway left the routes, or went unused; its connection closes after its last stream");
        }
    }

    fn available(&self, gw: &SocketAddr, now: Instant) -> bool {
        lock(&self.slots)
            .get(gw)
            .is_none_or(|s| lock(&s.health).available(now))
    }

    async fn attempt(
        &self,
        gw: SocketAddr,
        req: &OpenRequest,
        td: &TrustDomain,
        deadline: Instant,
    ) -> Result<Opened, DialFailure> {
        let conn = self
            .connection(gw, &req.target_cluster, td, deadline)
            .await
            .map_err(DialFailure::Unreachable)?;
        let left = || deadline.saturating_duration_since(Instant::now());
        let (mut send, mut recv) = match timeout(left(), conn.open_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(DialFailure::Unreachable(e.to_string())),
            Err(_) => {
                return Err(DialFailure::Unreachable(
                    "no stream credit before the deadline".into(),
                ));
            }
        };
        let mut open: TunnelOpen = req.to_wire();
        open.deadline_ms = u32::try_from(left().as_millis()).unwrap_or(u32::MAX).max(1);
        let exchange = async {
            write_frame(&mut send, &open)
                .await
                .map_err(|e| e.to_string())?;
            read_frame::<TunnelAccept>("TunnelAccept", &mut recv)
                .await
                .map_err(|e| match e {
                    ReadFrameError::Eof => "stream ended before TunnelAccept".to_string(),
                    e => e.to_string(),
                })
        };
        let accept = match timeout(left(), exchange).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                quic::reset_stream(&mut send, &mut recv, quic::code::ABORTED);
                return Err(DialFailure::Unreachable(e));
            }
            Err(_) => {
                quic::reset_stream(&mut send, &mut recv, quic::code::ABORTED);
                return Err(DialFailure::Unreachable(
                    "no TunnelAccept before the deadline".into(),
                ));
            }
        };
        match frame::read_accept(&accept) {
            Ok(endpoint) => Ok(Opened {
                send,
                recv,
                endpoint,
                gateway: gw,
            }),
            Err(r) => Err(DialFailure::Refused(r)),
        }
    }

    fn slot(&self, gw: SocketAddr, cluster: &str) -> Arc<Slot> {
        lock(&self.slots)
            .entry(gw)
            .or_insert_with(|| {
                Arc::new(Slot {
                    conn: tokio::sync::Mutex::new(None),
                    health: Mutex::default(),
                    cluster: cluster.into(),
                    retired: tokio::sync::Notify::new(),
                    rtt_us: Default::default(),
                    probing: Default::default(),
                    probed: tokio::sync::Notify::new(),
                    used: Mutex::new(Instant::now()),
                })
            })
            .clone()
    }

    fn client_config(
        &self,
        cluster: &str,
        td: &TrustDomain,
    ) -> Result<quinn::ClientConfig, String> {
        let key = (cluster.to_string(), td.clone());
        if let Some(c) = lock(&self.configs).get(&key) {
            return Ok(c.clone());
        }
        let peer = SpiffeId::gateway(td, cluster).map_err(|e| e.to_string())?;
        let c = quic::client_config(
            self.ctx.options.svid.clone(),
            self.ctx.options.bundles.clone(),
            peer,
            self.transport.clone(),
        )
        .map_err(|e| e.to_string())?;
        lock(&self.configs).insert(key, c.clone());
        Ok(c)
    }

    /// The live connection to `gw`, or a new one. Concurrent streams to the
    /// same gateway wait for one handshake rather than start their own.
    async fn connection(
        &self,
        gw: SocketAddr,
        cluster: &str,
        td: &TrustDomain,
        deadline: Instant,
    ) -> Result<Connection, String> {
        let slot = self.slot(gw, cluster);
        *lock(&slot.used) = Instant::now();
        let mut held = match timeout(
            deadline.saturating_duration_since(Instant::now()),
            slot.conn.lock(),
        )
        .await
        {
            Ok(h) => h,
            Err(_) => return Err("another stream's handshake outlasted the deadline".into()),
        };
        if let Some(c) = held.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        // A connection the peer lost, before its watcher has said so.
        let lost = held.as_ref().is_some_and(|c| {
            c.close_reason()
                .is_some_and(|r| !matches!(r, ConnectionError::LocallyClosed))
        });
        if !lock(&slot.health).available(Instant::now()) {
            return Err("in reconnect backoff after a failure".into());
        }
        let config = self.client_config(cluster, td)?;
        let dial = |budget| {
            dial(
                self.endpoint.clone(),
                config,
                slot.clone(),
                gw,
                cluster.to_string(),
                self.ctx.clone(),
                budget,
            )
        };
        if !lost && !lock(&slot.health).is_down() {
            let c = dial(deadline.saturating_duration_since(Instant::now())).await?;
            *held = Some(c.clone());
            return Ok(c);
        }
        // It failed before, maybe silently (an idle timeout: frozen,
        // partitioned). Streams must not stall on a handshake that may
        // never finish: the handshake goes on in the background, and this
        // stream waits for it no longer than a few round trips before it
        // is refused (and goes to another gateway or cluster).
        drop(held);
        let probed = slot.probed.notified();
        tokio::pin!(probed);
        probed.as_mut().enable();
        if !slot.probing.swap(true, Ordering::AcqRel) {
            let probe = dial(PROBE_TIMEOUT);
            let slot = slot.clone();
            tokio::spawn(async move {
                if let Ok(c) = probe.await {
                    *slot.conn.lock().await = Some(c);
                }
                slot.probing.store(false, Ordering::Release);
                slot.probed.notify_waiters();
            });
        }
        let wait = probe_wait(slot.rtt()).min(deadline.saturating_duration_since(Instant::now()));
        let _ = timeout(wait, probed).await;
        let conn = slot.conn.lock().await;
        match conn.as_ref().filter(|c| c.close_reason().is_none()) {
            Some(c) => Ok(c.clone()),
            None => Err("reconnecting after it was lost".into()),
        }
    }
}

/// The longest a reconnection to a gateway that failed goes on in the
/// background.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stream waits for a reconnection to a gateway that failed:
/// three round trips as last measured (a restarted gateway answers in one
/// or two), between 50 and 250 ms.
fn probe_wait(rtt: Option<Duration>) -> Duration {
    rtt.map_or(Duration::from_millis(250), |r| r * 3)
        .clamp(Duration::from_millis(50), Duration::from_millis(250))
}

/// One handshake with `gw`, within `budget`; its outcome goes into the
/// slot's health, and a new connection is watched.
async fn dial(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    slot: Arc<Slot>,
    gw: SocketAddr,
    cluster: String,
    ctx: Arc<Ctx>,
    budget: Duration,
) -> Result<Connection, String> {
    let failed = |reason: &'static str, message: String| {
        ctx.events.handshake_failed(&cluster, reason);
        let wait = lock(&slot.health).failed(Instant::now(), &ctx.options.backoff, fastrand::f64());
        tracing::info!(gateway = %gw, cluster, error = %message, retry_in_ms = wait.as_millis() as u64, "cannot connect to peer gateway");
        message
    };
    let connecting = endpoint
        .connect_with(config, gw, "fedmesh-gateway")
        .map_err(|e| e.to_string())?;
    let c = match timeout(budget, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(failed(handshake_reason(&e), format!("handshake: {e}"))),
        Err(_) => {
            return Err(failed(
                "timeout",
                "handshake did not finish before the deadline".into(),
            ));
        }
    };
    lock(&slot.health).succeeded();
    ctx.events.peer_up(&cluster, gw, true);
    tracing::debug!(gateway = %gw, cluster, "connected to peer gateway");
    tokio::spawn(watch_connection(c.clone(), slot, gw, cluster, ctx));
    Ok(c)
}

/// Samples RTT while the connection lives; when it dies (idle timeout after
/// a `kill -9`, a reset, the peer closing), puts the gateway in backoff so
/// new streams go straight to the cluster's other gateways.
async fn watch_connection(
    conn: Connection,
    slot: Arc<Slot>,
    gw: SocketAddr,
    cluster: String,
    ctx: Arc<Ctx>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut bundles = ctx.options.bundles.clone();
    let reason = loop {
        tokio::select! {
            r = conn.closed() => break r,
            _ = tick.tick() => {
                ctx.events.rtt(&cluster, gw, conn.rtt());
                let us = u64::try_from(conn.rtt().as_micros()).unwrap_or(u64::MAX).max(1);
                slot.rtt_us.store(us, Ordering::Relaxed);
            }
            // Pruned: let go of the connection, so that it closes once its
            // streams are done.
            _ = slot.retired.notified() => return,
            // A changed bundle may no longer vouch for this peer.
            r = bundles.changed() => {
                if r.is_err() { return; }
                if let Some(why) = no_longer_verifies(&conn, &ctx.options.bundles) {
                    return revoke(conn, &slot, gw, &cluster, why, &ctx).await;
                }
            }
        }
    };
    ctx.events.peer_up(&cluster, gw, false);
    if matches!(reason, ConnectionError::LocallyClosed) {
        return;
    }
    let wait = lock(&slot.health).failed(Instant::now(), &ctx.options.backoff, fastrand::f64());
    tracing::warn!(
        gateway = %gw,
        cluster,
        reason = %reason,
        retry_in_ms = wait.as_millis() as u64,
        "lost peer gateway; new streams go to the cluster's other gateways"
    );
}

/// Why the peer of `conn` no longer verifies against the current bundles,
/// if it does not.
fn no_longer_verifies(
    conn: &Connection,
    bundles: &watch::Receiver<Arc<BundleSet>>,
) -> Option<String> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    bundles
        .borrow()
        .reverify(
            &chain,
            std::time::SystemTime::now(),
            fedmesh_trust::Usage::Server,
        )
        .err()
        .map(|e| e.to_string())
}

/// New streams to `gw` get a fresh handshake (which the new bundle decides);
/// live ones may finish for up to the drain timeout, then the connection
/// closes.
async fn revoke(
    conn: Connection,
    slot: &Slot,
    gw: SocketAddr,
    cluster: &str,
    why: String,
    ctx: &Ctx,
) {
    tracing::warn!(gateway = %gw, cluster, reason = %why, "peer gateway no longer verifies; its connection closes after its streams");
    ctx.events.peer_up(cluster, gw, false);
    {
        let mut held = slot.conn.lock().await;
        if held
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *held = None;
        }
    }
    tokio::select! {
        _ = conn.closed() => {}
        _ = tokio::time::sleep(ctx.options.drain_timeout) => {
            conn.close(quic::code::REVOKED, why.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_waits_a_few_round_trips_for_a_reconnection() {
        let ms = Duration::from_millis;
        assert_eq!(probe_wait(Some(ms(40))), ms(120));
        assert_eq!(probe_wait(Some(ms(5))), ms(50), "never less than 50 ms");
        assert_eq!(probe_wait(Some(ms(400))), ms(250), "never more than 250 ms");
        assert_eq!(probe_wait(None), ms(250), "no round trip measured yet");
    }
}
