//! The egress: local proxies connect over TCP+TLS with their SVIDs and send
//! a `TunnelOpen`; the egress forwards it through the tunnel's QUIC client
//! ([`PeerPool`]: a pooled connection to a gateway of the target cluster,
//! the cluster's next gateway when one refuses or cannot be reached), and
//! splices once one accepts.

use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_proto::tunnel::v1::{TunnelAccept, TunnelOpen, tunnel_accept::Status};
use fedmesh_trust::SpiffeId;
use fedmesh_trust::tls::ALPN_TUNNEL;
use fedmesh_tunnel::pool::PeerPool;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::frame::{self, OpenRequest, Refusal};
use crate::gateway::GatewayState;
use crate::splice::{self, ReadFrameError, code, read_frame, write_frame};

const DIRECTION: &str = "egress";

/// Accepts local proxies until `stop` turns true.
pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pool: Arc<PeerPool>,
    sh: Arc<GatewayState>,
    mut stop: watch::Receiver<bool>,
) {
    let stats = fedmesh_admin::AcceptStats::default();
    loop {
        let (tcp, remote) = tokio::select! {
            c = fedmesh_admin::accept(&listener, "egress", &stats) => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        tokio::spawn(connection(
            tcp,
            remote,
            acceptor.clone(),
            pool.clone(),
            sh.clone(),
        ));
    }
}

async fn connection(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    pool: Arc<PeerPool>,
    sh: Arc<GatewayState>,
) {
    let sh = &*sh;
    let _ = tcp.set_nodelay(true);
    let Some(mut tls) = handshake(tcp, remote, acceptor, sh).await else {
        return;
    };
    let (_, session) = tls.get_ref();
    let source = fedmesh_trust::peer_spiffe_id(session.peer_certificates());
    let alpn_ok = session.alpn_protocol() == Some(ALPN_TUNNEL);
    let req = match read_request(&mut tls, source, alpn_ok, sh).await {
        Ok(req) => req,
        Err(None) => return,
        Err(Some(r)) => {
            sh.metrics.refused(DIRECTION, "local", r.label());
            return answer(&mut tls, &r.to_wire()).await;
        }
    };
    // One workload may not take its cluster's whole stream quota at every
    // remote gateway.
    let source_key = req
        .source
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let Some(_source_slot) = sh
        .source_streams
        .take(&source_key, sh.settings.max_streams_per_source)
    else {
        let r = Refusal::new(
            Status::Overloaded,
            format!(
                "{source_key} holds {} streams through this gateway already",
                sh.settings.max_streams_per_source
            ),
        );
        sh.metrics.refused(DIRECTION, "local", r.label());
        return answer(&mut tls, &r.to_wire()).await;
    };
    let span = req.span(DIRECTION, &req.target_cluster);
    async move {
        let _guard = sh.streams.track();
        let mut opened = match pool.open(&req).await {
            Ok(o) => o,
            Err(r) => {
                tracing::debug!(refusal = %r, "stream refused");
                sh.metrics
                    .refused(DIRECTION, &req.target_cluster, r.label());
                return answer(&mut tls, &r.to_wire()).await;
            }
        };
        if let Err(e) = write_frame(&mut tls, &frame::accept_ok(opened.endpoint.clone())).await {
            tracing::debug!(error = %e, "proxy went away before TunnelAccept");
            return splice::reset_stream(&mut opened.send, &mut opened.recv, code::ABORTED);
        }
        let gateway = opened.gateway.to_string();
        let halves = tokio::io::split(tls);
        sh.relay(
            DIRECTION,
            &req.target_cluster,
            &gateway,
            halves,
            &mut opened.send,
            &mut opened.recv,
        )
        .await;
    }
    .instrument(span)
    .await
}

/// Reads and checks the proxy's `TunnelOpen`. `Err(None)`: the proxy went
/// away; nothing to answer.
async fn read_request(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    source: Option<SpiffeId>,
    alpn_ok: bool,
    sh: &GatewayState,
) -> Result<OpenRequest, Option<Refusal>> {
    let bad = |m: String| Some(Refusal::new(Status::BadRequest, m));
    if !alpn_ok {
        return Err(bad(format!(
            "unknown protocol version: negotiate ALPN {:?}",
            String::from_utf8_lossy(ALPN_TUNNEL)
        )));
    }
    let source = source.ok_or_else(|| bad("no client SVID".into()))?;
    let open = match timeout(
        sh.settings.header_timeout,
        read_frame::<TunnelOpen>("TunnelOpen", tls),
    )
    .await
    {
        Ok(Ok(o)) => o,
        Ok(Err(ReadFrameError::Frame(e))) => return Err(bad(e.to_string())),
        Ok(Err(_)) => return Err(None),
        Err(_) => return Err(bad("no TunnelOpen within the header timeout".into())),
    };
    let mut req = frame::check_open(&open).map_err(bad)?;
    // The proxy's own certificate says who is calling; nothing it wrote
    // in the header can change that.
    req.source = Some(source);
    let own = sh.routes.borrow().cluster.clone();
    if req.target_cluster == own {
        return Err(bad(format!(
            "target_cluster {own} is this gateway's own cluster: connect to its endpoints directly"
        )));
    }
    Ok(req)
}

/// A local proxy's TLS handshake, within the header timeout; a failure is
/// counted by its reason.
async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    sh: &GatewayState,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let reason = match timeout(sh.settings.header_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => return Some(tls),
        // Closed before or during the handshake without an alert (a TCP
        // port probe): not a trust failure.
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed",
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "local proxy TLS handshake failed");
            "tls"
        }
        Err(_) => "timeout",
    };
    sh.metrics.handshake_failed(DIRECTION, "local", reason);
    None
}

async fn answer(tls: &mut tokio_rustls::server::TlsStream<TcpStream>, a: &TunnelAccept) {
    if write_frame(tls, a).await.is_ok() {
        let _ = tls.shutdown().await;
    }
}
