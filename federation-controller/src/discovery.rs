//! The gRPC discovery and identity service for local proxies and gateways,
//! over mutual TLS with SVIDs.
//!
//! Snapshots are versioned; a client that reconnects with the version it
//! holds is sent nothing until something changes, and a NACKed snapshot is
//! never resent (the client keeps its last good one). Before the controller
//! has a complete view there is no snapshot at all: streams wait rather than
//! receive an empty mesh.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fedmesh_proto::discovery::v1 as pb;
use pb::discovery_server::{Discovery, DiscoveryServer};
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status, Streaming};
use trust_bundle::{Authority, CaError, SpiffeId, TrustDomain};

/// A published snapshot and its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub version: u64,
    pub snapshot: pb::MeshSnapshot,
}

/// `None` until the controller has a complete view.
pub type Snapshots = watch::Receiver<Option<Arc<Versioned>>>;

/// Counters for the admin port.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    pub connected: AtomicI64,
    pub pushes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub certified: AtomicU64,
    pub certify_refused: AtomicU64,
}

/// The service. `tokens` maps each join token to the one identity it allows.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    trust_domain: TrustDomain,
    snapshots: Snapshots,
    authority: Arc<Mutex<Authority>>,
    tokens: Arc<HashMap<String, SpiffeId>>,
    stats: Arc<DiscoveryStats>,
}

impl DiscoveryService {
    pub fn new(
        trust_domain: TrustDomain,
        snapshots: Snapshots,
        authority: Arc<Mutex<Authority>>,
        tokens: HashMap<String, SpiffeId>,
        stats: Arc<DiscoveryStats>,
    ) -> Self {
        Self {
            trust_domain,
            snapshots,
            authority,
            tokens: Arc::new(tokens),
            stats,
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

/// Decrements the connected-clients gauge when a stream ends.
struct Connected(Arc<DiscoveryStats>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        // The TLS layer has verified the chain; here we only read the ID.
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|i| i.peer_certs());
        let peer = trust_bundle::peer_spiffe_id(certs.as_deref().map(|v| &v[..]))
            .ok_or_else(|| Status::unauthenticated("discovery requires a client SVID"))?;
        if !peer.is_member_of(&self.trust_domain) {
            return Err(Status::permission_denied(format!(
                "{peer} is not of this cluster's trust domain {}",
                self.trust_domain
            )));
        }
        let mut inbound = request.into_inner();
        let mut snapshots = self.snapshots.clone();
        let stats = self.stats.clone();
        let (tx, rx) = mpsc::channel(4);
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let guard = Connected(stats.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(Some(first)) = inbound.message().await else {
                return;
            };
            let node = first.node.clone();
            let mut client_version = first.version_info;
            let mut last_sent: Option<u64> = None;
            let mut nonce = 0u64;
            loop {
                let current = snapshots.borrow_and_update().clone();
                if let Some(cur) = current {
                    let is_held = cur.version.to_string() == client_version;
                    if !is_held && last_sent != Some(cur.version) {
                        nonce += 1;
                        let resp = pb::DiscoveryResponse {
                            version_info: cur.version.to_string(),
                            nonce: nonce.to_string(),
                            snapshot: Some(cur.snapshot.clone()),
                        };
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                        stats.pushes.fetch_add(1, Ordering::Relaxed);
                        last_sent = Some(cur.version);
                    }
                }
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    msg = inbound.message() => match msg {
                        Ok(Some(r)) if r.error_detail.is_empty() => {
                            stats.acks.fetch_add(1, Ordering::Relaxed);
                            client_version = r.version_info;
                        }
                        Ok(Some(r)) => {
                            stats.nacks.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%node, nonce = %r.response_nonce, error = %r.error_detail, "client rejected a snapshot; it keeps its last good one");
                        }
                        _ => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let req = request.into_inner();
        let Some(id) = self.tokens.get(&req.join_token) else {
            self.stats.certify_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::permission_denied("unknown join token"));
        };
        let signed = {
            let mut authority = self
                .authority
                .lock()
                .map_err(|_| Status::internal("authority lock poisoned"))?;
            let now = SystemTime::now();
            authority.poll(now);
            authority
                .sign_csr(&req.csr_der, id, now)
                .map(|cert| (cert, authority.bundle().to_document()))
        };
        let (cert, own_bundle) = signed.map_err(|e| {
            self.stats.certify_refused.fetch_add(1, Ordering::Relaxed);
            match e {
                CaError::CsrRefused(_) => Status::permission_denied(e.to_string()),
                other => Status::internal(other.to_string()),
            }
        })?;
        self.stats.certified.fetch_add(1, Ordering::Relaxed);
        let mut bundles: HashMap<String, String> = self
            .snapshots
            .borrow()
            .as_ref()
            .map(|s| s.snapshot.bundles.clone())
            .unwrap_or_default();
        bundles.insert(self.trust_domain.to_string(), own_bundle);
        Ok(Response::new(pb::CertifyResponse {
            chain_der: vec![cert.to_vec()],
            bundles,
        }))
    }
}

/// Serves `service` on `listener` with `tls` (whose ALPN must offer "h2")
/// until `shutdown` completes. TLS handshakes run per connection, so a slow
/// client cannot hold up others.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: DiscoveryService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) =
        mpsc::channel::<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>>(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let accept = tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "discovery TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(%peer, "discovery TLS handshake timed out"),
                }
            });
        }
    });
    let result = tonic::transport::Server::builder()
        .add_service(DiscoveryServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    accept.abort();
    result
}

/// A gRPC channel to a controller at `addr` over TLS with `tls` (ALPN "h2").
pub async fn channel(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_uri| {
        let tls = tls.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("fedmesh-controller.invalid")
                .map_err(std::io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    tonic::transport::Endpoint::from_static("http://fedmesh-controller.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
}
