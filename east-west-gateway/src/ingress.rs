//! The ingress: streams from peer gateways over QUIC. Each stream is read
//! for its `TunnelOpen`, admitted or refused (before any application byte),
//! connected to a local endpoint, and spliced.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use fedmesh_proto::tunnel::v1::{TunnelOpen, tunnel_accept::Status};
use quinn::{Connection, RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tracing::Instrument;

use crate::frame::{self, OpenRequest, Refusal};
use crate::gateway::GatewayState;
use crate::metrics::GatewayLabels;
use crate::routes::{Caller, CallerKind};
use crate::splice::{self, ReadFrameError, code, read_frame, write_frame};
use crate::validate::RetryGate;
use fedmesh_tunnel::quic::handshake_reason;

const DIRECTION: &str = "ingress";

/// Accepts connections until the endpoint closes.
pub(crate) async fn serve(endpoint: quinn::Endpoint, sh: Arc<GatewayState>) {
    let mut gate = RetryGate::new(
        sh.settings.address_validation,
        sh.settings.address_validation_above,
    );
    while let Some(incoming) = endpoint.accept().await {
        if sh.draining.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        // An address not yet proven gets a Retry while the gate says so:
        // a spoofed source never sees it, and costs no handshake.
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && gate.retry(std::time::Instant::now())
        {
            sh.metrics.address_validations.inc();
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        tokio::spawn(connection(incoming, sh.clone()));
    }
}

/// A peer connection: its handshake, then its streams, until it ends or
/// stops verifying.
async fn connection(incoming: quinn::Incoming, sh: Arc<GatewayState>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%remote, error = %e, "peer gateway handshake failed");
            sh.metrics
                .handshake_failed(DIRECTION, "unknown", handshake_reason(&e));
            return;
        }
    };
    let Some((peer, chain)) = identify(&conn, &sh) else {
        conn.close(code::BAD_HEADER, b"not a federated gateway or workload");
        return;
    };
    // A cluster's gateways share one cap; each of its workloads connected
    // directly has its own, smaller one.
    let (cap, whose) = match peer.kind {
        CallerKind::Gateway => (sh.settings.max_connections_per_peer, "peer cluster"),
        CallerKind::Workload => (sh.settings.max_connections_per_workload, "workload"),
    };
    let Some(_held) = sh.peer_connections.take(&peer.connection_key(), cap) else {
        tracing::warn!(%remote, peer = %peer.id, cap, "closing a connection over the {whose}'s cap");
        sh.metrics
            .refused(DIRECTION, &peer.cluster, "too_many_connections");
        let why = format!("too many connections from this {whose}");
        conn.close(code::TOO_MANY, why.as_bytes());
        return;
    };
    tracing::debug!(%remote, peer = %peer.id, "peer connected");
    // The connection ends at its peer's certificate's expiry: a renewed
    // SVID takes over with a fresh handshake.
    let expiry = fedmesh_trust::svid::parse_leaf(&chain[0])
        .map(|(_, info)| info.not_after)
        .unwrap_or_else(|_| SystemTime::now());
    let expires = Instant::now() + expiry.duration_since(SystemTime::now()).unwrap_or_default();
    let why = serve_peer(&conn, Arc::new(peer), &chain, expires, &sh).await;
    if let Some((why, peer)) = why {
        tracing::info!(%remote, %peer, reason = %why, "closing a peer connection that no longer verifies");
        conn.close(code::REVOKED, why.as_bytes());
    }
}

/// Removes a connection's RTT series when its serving ends.
struct Forget<'a>(&'a crate::metrics::Metrics, GatewayLabels);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.rtt_seconds.remove(&self.1);
    }
}

/// Serves `conn`'s streams. Returns why, and whose, when the connection
/// must close for no longer verifying; `None` when it simply ended.
async fn serve_peer(
    conn: &Connection,
    peer: Arc<Caller>,
    chain: &[CertificateDer<'static>],
    expires: Instant,
    sh: &Arc<GatewayState>,
) -> Option<(String, String)> {
    let labels = GatewayLabels {
        peer_cluster: peer.cluster.clone(),
        gateway: conn.remote_address().to_string(),
    };
    let rtt = sh.metrics.rtt_seconds.get_or_create(&labels).clone();
    // One series per live connection: peers reconnect from new ports, so
    // a label kept after its connection would grow without bound.
    let _forget = Forget(&sh.metrics, labels);
    let (mut routes, mut bundles) = (sh.routes.clone(), sh.bundles.clone());
    // Held by each of this connection's streams, to know when they are done;
    // a stream that ends says so, so that a revoked connection closes as its
    // last stream ends (not at the next tick).
    let live = Arc::new(());
    let ended = Arc::new(tokio::sync::Notify::new());
    let mut standing = Standing::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let verified = standing.revoked.is_none();
        tokio::select! {
            s = conn.accept_bi() => {
                let Ok((send, recv)) = s else { return None };
                let (peer, sh) = (peer.clone(), sh.clone());
                match standing.refusal() {
                    Some(r) => {
                        let (mut send, mut recv) = (send, recv);
                        tokio::spawn(async move { refuse(&mut send, &mut recv, &peer, &sh, r).await });
                    }
                    None => {
                        let (live, ended) = (live.clone(), ended.clone());
                        tokio::spawn(async move {
                            stream(send, recv, peer, sh).await;
                            drop(live);
                            ended.notify_one();
                        });
                    }
                }
            }
            r = routes.changed(), if verified => {
                r.ok()?;
                standing.check(recheck(sh, &peer, chain), Instant::now());
            }
            r = bundles.changed(), if verified => {
                r.ok()?;
                standing.check(recheck(sh, &peer, chain), Instant::now());
            }
            _ = tokio::time::sleep_until(expires), if verified => {
                standing.check(Err("the peer's certificate has expired".into()), Instant::now());
            }
            _ = tick.tick() => {
                rtt.set(conn.rtt().as_secs_f64());
            }
            _ = ended.notified(), if !verified => {}
        }
        let streams = Arc::strong_count(&live) - 1;
        if let Some(why) = standing.must_close(streams, Instant::now(), sh.settings.drain_timeout) {
            sh.metrics.refused(DIRECTION, &peer.cluster, "revoked");
            return Some((why.to_string(), peer.id.to_string()));
        }
    }
}

/// Whether a peer connection still verifies, and when it must close once
/// it does not. I/O-free: the driver reports each re-check and passes `now`.
/// A revoked connection refuses new streams at once (`FORBIDDEN`); its live
/// streams may finish for up to the drain timeout.
#[derive(Debug, Default)]
struct Standing {
    /// Why it no longer verifies, and since when.
    revoked: Option<(String, Instant)>,
}

impl Standing {
    /// Records a re-check. The first failure is the one reported.
    fn check(&mut self, verified: Result<(), String>, now: Instant) {
        if let (None, Err(why)) = (&self.revoked, verified) {
            self.revoked = Some((why, now));
        }
    }

    /// The refusal for a new stream, when revoked.
    fn refusal(&self) -> Option<Refusal> {
        let (why, _) = self.revoked.as_ref()?;
        Some(Refusal::new(Status::Forbidden, why.clone()))
    }

    /// Why the connection must close now: revoked, and no stream is live or
    /// the drain timeout has passed.
    fn must_close(&self, live_streams: usize, now: Instant, drain: Duration) -> Option<&str> {
        let (why, since) = self.revoked.as_ref()?;
        (live_streams == 0 || now.saturating_duration_since(*since) >= drain).then_some(why)
    }
}

/// Whether a live connection from `peer`, which presented `chain`, still
/// verifies under the current routes and bundles; why not.
fn recheck(
    sh: &GatewayState,
    peer: &Caller,
    chain: &[CertificateDer<'static>],
) -> Result<(), String> {
    sh.routes.borrow().caller(&peer.id)?;
    sh.bundles
        .borrow()
        .reverify(chain, SystemTime::now(), fedmesh_trust::Usage::Client)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The peer's identity. The TLS verifier has already checked the chain and
/// that the ID is a federated gateway; this recovers the cluster name.
fn identify(
    conn: &Connection,
    sh: &GatewayState,
) -> Option<(Caller, Vec<CertificateDer<'static>>)> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let id = fedmesh_trust::peer_spiffe_id(Some(&chain))?;
    let peer = sh.routes.borrow().caller(&id).ok()?;
    (!chain.is_empty()).then_some((peer, *chain))
}

async fn stream(
    mut send: SendStream,
    mut recv: RecvStream,
    peer: Arc<Caller>,
    sh: Arc<GatewayState>,
) {
    let header = timeout(
        sh.settings.header_timeout,
        read_frame::<TunnelOpen>("TunnelOpen", &mut recv),
    )
    .await;
    let open = match header {
        Ok(Ok(open)) => open,
        Ok(Err(ReadFrameError::Frame(e))) => {
            let r = Refusal::new(Status::BadRequest, e.to_string());
            return refuse(&mut send, &mut recv, &peer, &sh, r).await;
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer.id, error = %e, "stream ended before its header");
            return splice::reset_stream(&mut send, &mut recv, code::BAD_HEADER);
        }
        Err(_) => {
            tracing::debug!(peer = %peer.id, "no header within the header timeout");
            sh.metrics
                .refused(DIRECTION, &peer.cluster, "header_timeout");
            return splice::reset_stream(&mut send, &mut recv, code::BAD_HEADER);
        }
    };
    let req = match frame::check_open(&open) {
        Ok(r) => r,
        Err(m) => {
            let r = Refusal::new(Status::BadRequest, m);
            return refuse(&mut send, &mut recv, &peer, &sh, r).await;
        }
    };
    let span = req.span(DIRECTION, &peer.cluster);
    tunnel(send, recv, req, peer, sh).instrument(span).await
}

async fn tunnel(
    mut send: SendStream,
    mut recv: RecvStream,
    req: OpenRequest,
    peer: Arc<Caller>,
    sh: Arc<GatewayState>,
) {
    if sh.draining.load(Ordering::Relaxed) {
        let r = Refusal::new(Status::Overloaded, "gateway is draining before shutdown");
        return refuse(&mut send, &mut recv, &peer, &sh, r).await;
    }
    let Some(guard) = sh
        .streams
        .acquire(&peer.cluster, sh.settings.max_streams_per_peer)
    else {
        let r = Refusal::new(
            Status::Overloaded,
            format!(
                "cluster {} is at its limit of {} concurrent streams",
                peer.cluster, sh.settings.max_streams_per_peer
            ),
        );
        return refuse(&mut send, &mut recv, &peer, &sh, r).await;
    };
    let spread = sh.spread.fetch_add(1, Ordering::Relaxed);
    let admitted = sh.routes.borrow().admit(&req, &peer, spread);
    let connected = match admitted {
        Ok(candidates) => connect_first(&candidates, Instant::now() + req.deadline).await,
        Err(r) => Err(r),
    };
    let (tcp, endpoint) = match connected {
        Ok(c) => c,
        Err(r) => {
            // Free the slot before answering: the opener may retry at once.
            drop(guard);
            return refuse(&mut send, &mut recv, &peer, &sh, r).await;
        }
    };
    let shown = match sh.settings.reveal_endpoint {
        true => endpoint.to_string(),
        false => String::new(),
    };
    if let Err(e) = write_frame(&mut send, &frame::accept_ok(shown)).await {
        tracing::debug!(error = %e, "peer went away before TunnelAccept");
        return;
    }
    let to = endpoint.to_string();
    sh.relay(
        DIRECTION,
        &peer.cluster,
        &to,
        tcp.into_split(),
        &mut send,
        &mut recv,
    )
    .await;
    drop(guard);
}

/// Connects to the first endpoint that answers, trying at most three, and
/// sharing what is left of the deadline among the attempts left, so that
/// one black-holed endpoint cannot use it all.
async fn connect_first(
    candidates: &[SocketAddr],
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    const ATTEMPTS: usize = 3;
    let mut errors = Vec::new();
    let tries = candidates.iter().take(ATTEMPTS);
    let n = tries.len();
    for (i, addr) in tries.enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let share = (left / (n - i) as u32)
            .max(Duration::from_millis(100))
            .min(left);
        match timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok((tcp, *addr));
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!("{addr}: no answer in {} ms", share.as_millis())),
        }
    }
    Err(Refusal::new(
        Status::NoHealthyEndpoints,
        format!("no endpoint accepted a connection ({})", errors.join("; ")),
    ))
}

async fn refuse(
    send: &mut SendStream,
    recv: &mut RecvStream,
    peer: &Caller,
    sh: &GatewayState,
    r: Refusal,
) {
    tracing::debug!(peer = %peer.id, refusal = %r, "refused stream");
    sh.metrics.refused(DIRECTION, &peer.cluster, r.label());
    // Pipelined application bytes are not wanted.
    let _ = recv.stop(code::REFUSED);
    if write_frame(send, &r.to_wire()).await.is_ok() {
        let _ = send.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_verified_connection_takes_streams_and_stays_open() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        s.check(Ok(()), t0);
        assert!(s.refusal().is_none());
        assert_eq!(s.must_close(0, t0 + 3600 * S, 5 * S), None);
    }

    #[test]
    fn a_revoked_connection_refuses_at_once_and_closes_when_drained() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        s.check(Err("bundle rotated out".into()), t0);
        let r = s.refusal().expect("new streams are refused");
        assert_eq!(r.status, Status::Forbidden);
        // Live streams may finish...
        assert_eq!(s.must_close(2, t0 + 4 * S, 5 * S), None);
        // ...and the connection closes once they have,
        assert_eq!(
            s.must_close(0, t0 + 4 * S, 5 * S),
            Some("bundle rotated out")
        );
        // or at the drain timeout, whatever is still live.
        assert_eq!(
            s.must_close(2, t0 + 5 * S, 5 * S),
            Some("bundle rotated out")
        );
    }

    #[test]
    fn the_first_reason_and_its_time_are_kept() {
        let t0 = Instant::now();
        let mut s = Standing::default();
        s.check(Err("no longer a peer".into()), t0);
        s.check(Err("certificate expired".into()), t0 + 4 * S);
        s.check(Ok(()), t0 + 4 * S);
        assert_eq!(
            s.must_close(1, t0 + 5 * S, 5 * S),
            Some("no longer a peer"),
            "the drain counts from the first revocation, which stands"
        );
    }
}
