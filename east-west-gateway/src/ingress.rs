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
use crate::metrics::{GatewayLabels, handshake_reason};
use crate::routes::PeerGateway;
use crate::splice::{self, ReadFrameError, code, read_frame, write_frame};

const DIRECTION: &str = "ingress";

/// Accepts connections until the endpoint closes.
pub(crate) async fn serve(endpoint: quinn::Endpoint, sh: Arc<GatewayState>) {
    while let Some(incoming) = endpoint.accept().await {
        if sh.draining.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        tokio::spawn(connection(incoming, sh.clone()));
    }
}

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
        conn.close(code::BAD_HEADER, b"not a federated gateway");
        return;
    };
    let peer = Arc::new(peer);
    tracing::debug!(%remote, peer = %peer.id, "peer gateway connected");
    let rtt = sh
        .metrics
        .rtt_seconds
        .get_or_create(&GatewayLabels {
            peer_cluster: peer.cluster.clone(),
            gateway: remote.to_string(),
        })
        .clone();
    // The connection ends at its peer's certificate's expiry: a renewed
    // SVID takes over with a fresh handshake.
    let expiry = fedmesh_trust::svid::parse_leaf(&chain[0])
        .map(|(_, info)| info.not_after)
        .unwrap_or_else(|_| SystemTime::now());
    let expires = Instant::now() + expiry.duration_since(SystemTime::now()).unwrap_or_default();
    let (mut routes, mut bundles) = (sh.routes.clone(), sh.bundles.clone());
    // Held by each of this connection's streams, to know when they are done.
    let live = Arc::new(());
    let mut revoked: Option<(String, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((mut send, mut recv)) => {
                    if let Some((why, _)) = &revoked {
                        let r = Refusal::new(Status::Forbidden, why.clone());
                        let (peer, sh) = (peer.clone(), sh.clone());
                        tokio::spawn(async move { refuse(&mut send, &mut recv, &peer, &sh, r).await });
                        continue;
                    }
                    let live = live.clone();
                    let (peer, sh) = (peer.clone(), sh.clone());
                    tokio::spawn(async move {
                        let _live = live;
                        stream(send, recv, peer, sh).await
                    });
                }
                Err(e) => {
                    tracing::debug!(%remote, peer = %peer.id, error = %e, "peer gateway connection ended");
                    return;
                }
            },
            r = routes.changed(), if revoked.is_none() => {
                if r.is_err() { return; }
                revoked = recheck(&sh, &peer, &chain);
            }
            r = bundles.changed(), if revoked.is_none() => {
                if r.is_err() { return; }
                revoked = recheck(&sh, &peer, &chain);
            }
            _ = tokio::time::sleep_until(expires), if revoked.is_none() => {
                revoked = Some(("the peer's certificate has expired".into(), Instant::now()));
            }
            _ = tick.tick() => {
                rtt.set(conn.rtt().as_secs_f64());
            }
        }
        if let Some((why, since)) = &revoked {
            // New streams are refused at once; live ones may finish for up
            // to the drain timeout, then the connection closes.
            let drained = Arc::strong_count(&live) == 1;
            if drained || since.elapsed() >= sh.settings.drain_timeout {
                tracing::info!(%remote, peer = %peer.id, reason = %why, "closing a peer connection that no longer verifies");
                sh.metrics.refused(DIRECTION, &peer.cluster, "revoked");
                conn.close(code::REVOKED, why.as_bytes());
                return;
            }
        }
    }
}

/// Whether a live connection from `peer`, which presented `chain`, still
/// verifies under the current routes and bundles; why not, with when.
fn recheck(
    sh: &GatewayState,
    peer: &PeerGateway,
    chain: &[CertificateDer<'static>],
) -> Option<(String, Instant)> {
    let why = if let Err(e) = sh.routes.borrow().peer_gateway(&peer.id) {
        e
    } else {
        match sh
            .bundles
            .borrow()
            .reverify(chain, SystemTime::now(), fedmesh_trust::Usage::Client)
        {
            Ok(_) => return None,
            Err(e) => e.to_string(),
        }
    };
    Some((why, Instant::now()))
}

/// The peer's identity. The TLS verifier has already checked the chain and
/// that the ID is a federated gateway; this recovers the cluster name.
fn identify(
    conn: &Connection,
    sh: &GatewayState,
) -> Option<(PeerGateway, Vec<CertificateDer<'static>>)> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let id = fedmesh_trust::peer_spiffe_id(Some(&chain))?;
    let peer = sh.routes.borrow().peer_gateway(&id).ok()?;
    (!chain.is_empty()).then_some((peer, *chain))
}

async fn stream(
    mut send: SendStream,
    mut recv: RecvStream,
    peer: Arc<PeerGateway>,
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
    peer: Arc<PeerGateway>,
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
    if let Err(e) = write_frame(&mut send, &frame::accept_ok(endpoint.to_string())).await {
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
    peer: &PeerGateway,
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
