//! Connecting to a target: a local endpoint directly over TCP; a remote
//! cluster with a QUIC stream straight to one of its gateways (`egress:
//! direct`, on the pooled connection of [`fedmesh_tunnel::pool`]), or
//! through a local gateway's egress (`egress: gateway`: TCP + TLS with this
//! proxy's SVID). Both then send `TunnelOpen` and wait for `TunnelAccept`.
//! Every error here happens before the first application byte, so the
//! caller may always try the next target.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use fedmesh_api::{EgressMode, ServiceKey};
use fedmesh_proto::tunnel::v1::{TunnelAccept, TunnelOpen};
use fedmesh_tunnel::frame::{self, OpenRequest, Refusal};
use fedmesh_tunnel::pool::PeerPool;
use fedmesh_tunnel::{read_frame, write_frame};
use quinn::{RecvStream, SendStream};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, Join, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use crate::table::{Table, TargetKey};

/// A connected upstream byte stream.
#[derive(Debug)]
pub enum Upstream {
    Direct(TcpStream),
    /// Through a local egress gateway.
    Tunnel(Box<TlsStream<TcpStream>>),
    /// A QUIC stream to a remote cluster's gateway.
    Quic(Box<Join<RecvStream, SendStream>>),
}

/// Why a target could not be reached. Always before the first byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {target}: {message}")]
    Unreachable { target: String, message: String },
    #[error("connecting to {target}: no answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    /// The remote cluster's gateways refused the tunnel.
    #[error("{target} refused the tunnel: {refusal}")]
    Refused { target: String, refusal: Refusal },
    #[error("{target}: no local gateway is configured to reach other clusters")]
    NoGateway { target: String },
    /// No local egress could be reached: a fault on our side of the WAN,
    /// which says nothing about the remote cluster.
    #[error("connecting to {target}: no local egress answered ({message})")]
    Egress { target: String, message: String },
}

impl ConnectError {
    /// The outcome label of metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::Unreachable { .. } => "unreachable",
            ConnectError::Timeout { .. } => "connect_timeout",
            ConnectError::Refused { refusal, .. } => refusal.label(),
            ConnectError::NoGateway { .. } => "no_gateway",
            ConnectError::Egress { .. } => "egress_unreachable",
        }
    }

    /// Whether the failure says something about the target itself, and so
    /// counts towards ejecting it. A dead local egress does not: one
    /// gateway's trouble must never take a whole remote cluster away.
    pub fn blames_target(&self) -> bool {
        !matches!(
            self,
            ConnectError::Egress { .. } | ConnectError::NoGateway { .. }
        )
    }
}

/// Opens connections to targets.
#[derive(Debug)]
pub struct Connector {
    /// The local gateways' egress listeners.
    pub gateways: Vec<SocketAddr>,
    pub tls: Arc<rustls::ClientConfig>,
    pub connect_timeout: Duration,
    /// Says which way remote clusters are reached, as it changes.
    table: watch::Receiver<Arc<Table>>,
    /// QUIC connections to remote gateways, for `egress: direct`.
    quic: Arc<PeerPool>,
    /// Spreads tunnels over the egress listeners.
    next: AtomicUsize,
}

/// What a tunnel asks for.
#[derive(Debug, Clone)]
pub struct TunnelAsk<'a> {
    pub service: &'a ServiceKey,
    pub port: u16,
    pub traceparent: Option<&'a str>,
    pub deadline: Duration,
}

impl Connector {
    pub fn new(
        gateways: Vec<SocketAddr>,
        tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        table: watch::Receiver<Arc<Table>>,
        quic: Arc<PeerPool>,
    ) -> Self {
        Self {
            gateways,
            tls,
            connect_timeout,
            table,
            quic,
            next: AtomicUsize::new(0),
        }
    }

    pub async fn connect(
        &self,
        target: &TargetKey,
        ask: &TunnelAsk<'_>,
    ) -> Result<Upstream, ConnectError> {
        match target {
            TargetKey::Local(addr) => self.direct(*addr).await.map(Upstream::Direct),
            TargetKey::Remote(cluster) => {
                let egress = self.table.borrow().egress;
                match egress {
                    EgressMode::Direct => self.quic(cluster, ask).await,
                    EgressMode::Gateway => self.tunnel(cluster, ask).await,
                }
            }
        }
    }

    /// Lets go of QUIC connections to gateways the table no longer lists.
    pub fn prune(&self) {
        self.quic.prune();
    }

    /// A stream straight to a gateway of `cluster`. The pool tries the
    /// cluster's gateways in turn (a refusal before the first byte, or a
    /// gateway that cannot be reached, moves to the next), so what comes
    /// back is the cluster's answer.
    async fn quic(&self, cluster: &str, ask: &TunnelAsk<'_>) -> Result<Upstream, ConnectError> {
        let req = OpenRequest {
            service: ask.service.clone(),
            port: ask.port,
            target_cluster: cluster.into(),
            // The ingress takes our identity from our certificate.
            source: None,
            traceparent: ask
                .traceparent
                .filter(|t| frame::valid_traceparent(t))
                .map(str::to_owned),
            deadline: ask.deadline.min(self.connect_timeout),
        };
        match self.quic.open(&req).await {
            Ok(o) => Ok(Upstream::Quic(Box::new(tokio::io::join(o.recv, o.send)))),
            Err(refusal) => Err(ConnectError::Refused {
                target: format!("cluster {cluster}"),
                refusal,
            }),
        }
    }

    async fn direct(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        let tcp = match timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(ConnectError::Timeout {
                    target: addr.to_string(),
                    timeout: self.connect_timeout,
                });
            }
            Ok(r) => r.map_err(|e| ConnectError::Unreachable {
                target: addr.to_string(),
                message: e.to_string(),
            })?,
        };
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    /// Tries each egress once, starting at the next in turn. A refusal
    /// comes from the remote side (the egress has already tried that
    /// cluster's other gateways), so it is final; an egress that cannot be
    /// reached is not.
    async fn tunnel(&self, cluster: &str, ask: &TunnelAsk<'_>) -> Result<Upstream, ConnectError> {
        let target = format!("cluster {cluster}");
        let n = self.gateways.len();
        if n == 0 {
            return Err(ConnectError::NoGateway { target });
        }
        let open = TunnelOpen {
            service: ask.service.to_string(),
            port: u32::from(ask.port),
            target_cluster: cluster.into(),
            // The egress fills it in from our SVID.
            source_identity: String::new(),
            traceparent: ask
                .traceparent
                .filter(|t| frame::valid_traceparent(t))
                .unwrap_or_default()
                .into(),
            deadline_ms: u32::try_from(ask.deadline.as_millis()).unwrap_or(u32::MAX),
        };
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let egress = self.gateways[(first + i) % n];
            match timeout(self.connect_timeout, self.open(egress, &open)).await {
                Ok(Ok(s)) => return Ok(Upstream::Tunnel(Box::new(s))),
                Ok(Err(Opening::Refused(refusal))) => {
                    return Err(ConnectError::Refused { target, refusal });
                }
                Ok(Err(Opening::Egress(e))) => {
                    tracing::debug!(%egress, error = %e, "egress unreachable; trying the next");
                    last = Some(ConnectError::Egress {
                        target: target.clone(),
                        message: format!("egress {egress}: {e}"),
                    });
                }
                Err(_) => {
                    last = Some(ConnectError::Timeout {
                        target: target.clone(),
                        timeout: self.connect_timeout,
                    });
                }
            }
        }
        Err(last.unwrap_or(ConnectError::NoGateway { target }))
    }

    async fn open(
        &self,
        egress: SocketAddr,
        open: &TunnelOpen,
    ) -> Result<TlsStream<TcpStream>, Opening> {
        let tcp = TcpStream::connect(egress).await.map_err(Opening::Egress)?;
        let _ = tcp.set_nodelay(true);
        // The verifier checks the SPIFFE ID; the name is not used.
        let name = ServerName::try_from("fedmesh-gateway").map_err(|e| {
            Opening::Egress(io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
        })?;
        let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(Opening::Egress)?;
        write_frame(&mut tls, open).await.map_err(Opening::Egress)?;
        let accept: TunnelAccept = read_frame("TunnelAccept", &mut tls)
            .await
            .map_err(|e| Opening::Egress(io::Error::other(e.to_string())))?;
        // UNREACHABLE (the egress could not reach that cluster) is a
        // refusal like any other: the caller moves on to its next target.
        frame::read_accept(&accept)
            .map(|_| tls)
            .map_err(Opening::Refused)
    }
}

enum Opening {
    Egress(io::Error),
    Refused(Refusal),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Direct(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tunnel(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Upstream::Quic(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Direct(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tunnel(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Upstream::Quic(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Direct(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tunnel(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Upstream::Quic(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Direct(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tunnel(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Upstream::Quic(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Direct(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tunnel(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Upstream::Quic(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Direct(s) => s.is_write_vectored(),
            Upstream::Tunnel(s) => s.is_write_vectored(),
            Upstream::Quic(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_of_the_target_itself_blame_it() {
        let t = || "cluster gcp".to_string();
        let egress = ConnectError::Egress {
            target: t(),
            message: "egress 127.0.10.1:4143: connection refused".into(),
        };
        assert!(!egress.blames_target());
        assert_eq!(egress.label(), "egress_unreachable");
        assert!(!ConnectError::NoGateway { target: t() }.blames_target());
        let refused = ConnectError::Refused {
            target: t(),
            refusal: Refusal {
                status: fedmesh_proto::tunnel::v1::tunnel_accept::Status::NoHealthyEndpoints,
                message: String::new(),
            },
        };
        assert!(refused.blames_target(), "a refusal speaks for the service");
        let timeout = ConnectError::Timeout {
            target: t(),
            timeout: Duration::from_secs(1),
        };
        assert!(timeout.blames_target());
    }
}
