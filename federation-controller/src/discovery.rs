//! The gRPC discovery and identity service for local proxies and gateways,
//! over mutual TLS with SVIDs.
//!
//! Updates are versioned and incremental: the first response on a stream is
//! the whole mesh, later ones carry only the services that changed (found by
//! diffing persistent maps, so a change costs O(change)). A client that
//! reconnects with the version it holds is sent nothing until something
//! changes; a NACKed version is never resent, and the next change goes out as
//! a full snapshot. A partial ACK (the client skipped a few services it could
//! not accept) keeps deltas going: one bad service never costs full resends. Before the controller has a complete view there is no
//! version at all: streams wait rather than receive an empty mesh.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fedmesh_proto::discovery::v1 as pb;
use fedmesh_trust::{Authority, CaError, SpiffeId, TrustDomain};
use pb::discovery_server::{Discovery, DiscoveryServer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::guard::{FailureLimiter, FailurePolicy};
use crate::tokens::{Denied, Tokens};
use tonic::{Request, Response, Status, Streaming};

use crate::mesh::{self, Changed, MeshInputs, Scope};
use fedmesh_api::ServiceKey;
use prost::Message as _;

/// A published version of the mesh: its inputs, cheap to share and to diff.
/// Services are rendered only when they are sent.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// Counts up from 1 within one controller process.
    pub version: u64,
    /// Distinguishes controller processes, so that a client reconnecting to
    /// a restarted controller never mistakes an old version for the current.
    pub epoch: u64,
    pub inputs: MeshInputs,
}

impl Versioned {
    /// The `version_info` on the wire.
    pub fn version_info(&self) -> String {
        format!("{:x}.{}", self.epoch, self.version)
    }

    /// The whole mesh as `scope` sees it. Services are rendered only as
    /// they are cut into chunks, so a large mesh is never held whole.
    pub fn full(&self, scope: &Scope) -> Update {
        let (keys, missing) = match scope {
            Scope::Listed { names, namespaces } => self.inputs.keys_of(&mesh::Subscribed {
                names: names.clone(),
                namespaces: namespaces.clone(),
            }),
            _ => (self.inputs.keys_in(scope), Vec::new()),
        };
        Update {
            version_info: self.version_info(),
            incremental: false,
            frame: self.inputs.frame(),
            services: Services::Keys(keys.into_iter().collect()),
            // Subscribed names that do not exist, so the client knows.
            removed: missing.iter().map(service_ref).collect(),
        }
    }

    /// What changed in `scope` since `base`: upserted services (and the
    /// bundles and peers, if they changed) plus removed services.
    pub fn delta(&self, base: &Versioned, scope: &Scope) -> Update {
        let keys = match mesh::changed(&base.inputs, &self.inputs) {
            Changed::All => {
                let mut all = self.inputs.keys_in(scope);
                all.extend(base.inputs.keys_in(scope));
                all
            }
            Changed::Services(keys) => keys
                .into_iter()
                .filter(|k| scope.contains(k, &self.inputs))
                .collect(),
        };
        let mut upserted = Vec::new();
        let mut removed = Vec::new();
        for k in keys {
            match self.inputs.render(&k) {
                Some(s) => upserted.push(s),
                None if base.inputs.render(&k).is_some() => removed.push(service_ref(&k)),
                None => {}
            }
        }
        let bundles = if self.inputs.bundles_differ(&base.inputs) {
            self.inputs.bundles().into_iter().collect()
        } else {
            HashMap::new()
        };
        let frame = pb::MeshSnapshot {
            cluster: self.inputs.cluster.to_string(),
            services: Vec::new(),
            bundles,
            peers: self
                .inputs
                .peers_differ(&base.inputs)
                .then(|| self.inputs.peers()),
        };
        Update {
            version_info: self.version_info(),
            incremental: true,
            frame,
            services: Services::Rendered(upserted),
            removed,
        }
    }

    /// What a new subscription adds: each newly subscribed service that
    /// exists, and each exact name that does not, as removed (so the client
    /// knows at once).
    pub fn subscribed(&self, new: &mesh::Subscribed) -> Update {
        let (found, missing) = self.inputs.keys_of(new);
        Update {
            version_info: self.version_info(),
            incremental: true,
            frame: pb::MeshSnapshot {
                cluster: self.inputs.cluster.to_string(),
                ..Default::default()
            },
            services: Services::Keys(found.into_iter().collect()),
            removed: missing.iter().map(service_ref).collect(),
        }
    }
}

fn service_ref(k: &ServiceKey) -> pb::ServiceRef {
    pb::ServiceRef {
        namespace: k.namespace.clone(),
        name: k.name.clone(),
    }
}

/// The services of an update: rendered already (a delta), or to be
/// rendered as they are sent (a full snapshot or a subscription).
#[derive(Debug)]
pub enum Services {
    Rendered(Vec<pb::Service>),
    Keys(Vec<ServiceKey>),
}

/// One update for one client, before it is cut into chunks.
#[derive(Debug)]
pub struct Update {
    pub version_info: String,
    pub incremental: bool,
    /// Cluster, bundles and peers; its services are in `services`.
    pub frame: pb::MeshSnapshot,
    pub services: Services,
    pub removed: Vec<pb::ServiceRef>,
}

/// How large a chunk grows before it is sent: far below gRPC's default
/// 4 MiB message limit, whatever the size of the mesh.
pub const CHUNK_BYTES: usize = 1 << 20;

impl Update {
    /// Cuts the update into responses of at most about `chunk_bytes` each
    /// (a single service larger than that travels alone), rendering
    /// services from `inputs` as it goes, and hands each to `send` with its
    /// nonce from `nonce`. Stops early, returning false, when `send` does.
    pub async fn send_chunks<F, Fut>(
        self,
        inputs: &MeshInputs,
        chunk_bytes: usize,
        nonce: &mut u64,
        mut send: F,
    ) -> bool
    where
        F: FnMut(pb::DiscoveryResponse) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let Update {
            version_info,
            incremental,
            frame,
            services,
            removed,
        } = self;
        let empty = pb::MeshSnapshot {
            cluster: frame.cluster.clone(),
            ..Default::default()
        };
        let mut chunk = frame;
        let mut chunk_removed = Vec::new();
        let mut size = chunk.encoded_len();
        let mut first = true;
        let mut rendered = match services {
            Services::Rendered(v) => {
                Box::new(v.into_iter()) as Box<dyn Iterator<Item = pb::Service> + Send>
            }
            Services::Keys(keys) => {
                let inputs = inputs.clone();
                Box::new(keys.into_iter().filter_map(move |k| inputs.render(&k)))
            }
        };
        let mut removed = removed.into_iter();
        loop {
            // Fill this chunk.
            let mut more = true;
            loop {
                if size >= chunk_bytes {
                    break;
                }
                if let Some(s) = rendered.next() {
                    size += s.encoded_len() + 4;
                    chunk.services.push(s);
                } else if let Some(r) = removed.next() {
                    size += r.encoded_len() + 4;
                    chunk_removed.push(r);
                } else {
                    more = false;
                    break;
                }
            }
            *nonce += 1;
            let resp = pb::DiscoveryResponse {
                version_info: version_info.clone(),
                nonce: nonce.to_string(),
                snapshot: Some(std::mem::replace(&mut chunk, empty.clone())),
                incremental: incremental || !first,
                removed: std::mem::take(&mut chunk_removed),
                more,
            };
            if !send(resp).await {
                return false;
            }
            if !more {
                return true;
            }
            first = false;
            size = empty.encoded_len();
        }
    }
}

/// `None` until the controller has a complete view.
pub type Snapshots = watch::Receiver<Option<Arc<Versioned>>>;

/// Counters for the admin port.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    pub connected: AtomicI64,
    pub pushes: AtomicU64,
    pub acks: AtomicU64,
    /// ACKs that name services the client skipped.
    pub partial_acks: AtomicU64,
    pub nacks: AtomicU64,
    pub certified: AtomicU64,
    pub certify_refused: AtomicU64,
    /// The gRPC server is running.
    pub serving: AtomicBool,
    pub accept: fedmesh_admin::AcceptStats,
    /// Every connected proxy and gateway, by stream: what it runs.
    pub clients: Mutex<BTreeMap<u64, ClientStatus>>,
    next_client: AtomicU64,
}

/// One connected client as the controller sees it: config skew is visible
/// here (`/clients` on the admin port, `fedmesh get proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatus {
    /// `proxy/<cluster>/<identity>` or `gateway/...`: what the client says.
    pub node: String,
    /// Its verified SPIFFE ID.
    pub identity: String,
    pub connected_unix_ms: u64,
    /// The last version sent, and the last one it acknowledged.
    pub sent_version: String,
    pub acked_version: String,
    pub acked_unix_ms: u64,
    /// Policy name → etcd revision, as of the acknowledged version.
    pub policies: BTreeMap<String, i64>,
    /// Services it skipped in its last (partial) ACK, with why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Its last NACK, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<String>,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl DiscoveryStats {
    /// Every connected client, as JSON.
    pub fn clients_json(&self) -> String {
        let clients: Vec<ClientStatus> = lock(&self.clients).values().cloned().collect();
        serde_json::to_string_pretty(&clients).unwrap_or_default()
    }

    fn client_update(&self, id: u64, f: impl FnOnce(&mut ClientStatus)) {
        if let Some(c) = lock(&self.clients).get_mut(&id) {
            f(c);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn policy_revisions(v: &Versioned) -> BTreeMap<String, i64> {
    v.inputs
        .global
        .policies
        .iter()
        .map(|(n, p)| (n.clone(), p.revision))
        .collect()
}

impl DiscoveryStats {
    /// Whether the discovery API is taking connections, or why not.
    pub fn serving(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::Relaxed) {
            return Err("the discovery server is not running".into());
        }
        if self.accept.failing.load(Ordering::Relaxed) {
            return Err(
                "the discovery listener cannot accept connections (out of file descriptors?)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The service. `tokens` are the join tokens `Certify` accepts.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    trust_domain: TrustDomain,
    snapshots: Snapshots,
    authority: Arc<Mutex<Authority>>,
    tokens: Tokens,
    stats: Arc<DiscoveryStats>,
    /// How large an update's chunks grow ([`CHUNK_BYTES`]).
    pub chunk_bytes: usize,
    /// Failed `Certify` attempts, per source address.
    failures: Arc<Mutex<FailureLimiter>>,
    /// Checks ServiceAccount tokens (`--kube`); `None` refuses them.
    reviewer: Option<fedmesh_kube::TokenReviewer>,
    /// The ServiceAccount whose tokens are issued the gateway identity
    /// (`--gateway-service-account`), and that identity.
    gateway_account: Option<(fedmesh_kube::ServiceAccount, SpiffeId)>,
}

impl DiscoveryService {
    pub fn new(
        trust_domain: TrustDomain,
        snapshots: Snapshots,
        authority: Arc<Mutex<Authority>>,
        tokens: Tokens,
        stats: Arc<DiscoveryStats>,
    ) -> Self {
        Self {
            trust_domain,
            snapshots,
            authority,
            tokens,
            stats,
            chunk_bytes: CHUNK_BYTES,
            failures: Arc::new(Mutex::new(FailureLimiter::new(FailurePolicy::default()))),
            reviewer: None,
            gateway_account: None,
        }
    }

    /// Accepts projected ServiceAccount tokens, checked by `reviewer`:
    /// `gateway`'s are issued the gateway identity it names, every other
    /// ServiceAccount its workload identity.
    pub fn with_token_review(
        mut self,
        reviewer: fedmesh_kube::TokenReviewer,
        gateway: Option<(fedmesh_kube::ServiceAccount, SpiffeId)>,
    ) -> Self {
        self.reviewer = Some(reviewer);
        self.gateway_account = gateway;
        self
    }

    /// Sets how many failed `Certify` attempts a source may make.
    pub fn with_failure_policy(mut self, p: FailurePolicy) -> Self {
        self.failures = Arc::new(Mutex::new(FailureLimiter::new(p)));
        self
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::DiscoveryResponse, Status>> + Send>>;

/// Decrements the connected-clients gauge, and forgets the client, when a
/// stream ends.
struct Connected(Arc<DiscoveryStats>, u64);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
        lock(&self.0.clients).remove(&self.1);
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
        let peer = fedmesh_trust::peer_spiffe_id(certs.as_deref().map(|v| &v[..]))
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
        let id = stats.next_client.fetch_add(1, Ordering::Relaxed);
        lock(&stats.clients).insert(
            id,
            ClientStatus {
                identity: peer.to_string(),
                connected_unix_ms: unix_ms(),
                ..Default::default()
            },
        );
        let guard = Connected(stats.clone(), id);
        let chunk_bytes = self.chunk_bytes;
        tokio::spawn(async move {
            let _guard = guard;
            let Ok(Some(first)) = inbound.message().await else {
                return;
            };
            let node = first.node.clone();
            stats.client_update(id, |c| c.node = node.clone());
            let mut scope = match pb::Scope::try_from(first.scope) {
                Ok(pb::Scope::Exported) => Scope::Exported,
                Ok(pb::Scope::Listed) => Scope::Listed {
                    names: Default::default(),
                    namespaces: Default::default(),
                },
                _ => Scope::All,
            };
            scope.subscribe(subscriptions(&node, &first.subscribe));
            // What the client holds, as far as we know: the base of deltas.
            let mut base: Option<Arc<Versioned>> = None;
            let mut last_sent: Option<String> = None;
            if let Some(cur) = snapshots.borrow().clone()
                && cur.version_info() == first.version_info
            {
                last_sent = Some(cur.version_info());
                base = Some(cur);
            }
            let mut nonce = 0u64;
            let send = |resp: pb::DiscoveryResponse| {
                let tx = tx.clone();
                let stats = stats.clone();
                async move {
                    stats.pushes.fetch_add(1, Ordering::Relaxed);
                    tx.send(Ok(resp)).await.is_ok()
                }
            };
            loop {
                let current = snapshots.borrow_and_update().clone();
                if let Some(cur) = current
                    && last_sent.as_deref() != Some(cur.version_info().as_str())
                {
                    let update = match &base {
                        Some(b) => cur.delta(b, &scope),
                        None => cur.full(&scope),
                    };
                    if !update
                        .send_chunks(&cur.inputs, chunk_bytes, &mut nonce, send)
                        .await
                    {
                        return;
                    }
                    last_sent = Some(cur.version_info());
                    stats.client_update(id, |c| c.sent_version = cur.version_info());
                    base = Some(cur);
                }
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    msg = inbound.message() => match msg {
                        // On demand: more services for a listed scope.
                        Ok(Some(r)) if r.response_nonce.is_empty() => {
                            let new = scope.subscribe(subscriptions(&node, &r.subscribe));
                            // Before the first update, the first full one
                            // carries them.
                            if let (false, Some(b)) = (new.is_empty(), &base) {
                                let update = b.subscribed(&new);
                                if !update.send_chunks(&b.inputs, chunk_bytes, &mut nonce, send).await {
                                    return;
                                }
                            }
                        }
                        Ok(Some(r)) if r.error_detail.is_empty() => {
                            stats.acks.fetch_add(1, Ordering::Relaxed);
                            acked(&stats, id, &r, base.as_deref(), None);
                        }
                        Ok(Some(r)) if last_sent.as_deref() == Some(r.version_info.as_str()) => {
                            // A partial ACK: the client holds this version
                            // less the services it names, so deltas go on;
                            // a skipped service is resent when it changes.
                            stats.partial_acks.fetch_add(1, Ordering::Relaxed);
                            acked(&stats, id, &r, base.as_deref(), Some(r.error_detail.clone()));
                            tracing::warn!(%node, version = %r.version_info, skipped = %r.error_detail, "client skipped services of an update and applied the rest");
                        }
                        Ok(Some(r)) => {
                            stats.nacks.fetch_add(1, Ordering::Relaxed);
                            stats.client_update(id, |c| c.last_nack = Some(r.error_detail.clone()));
                            // The client kept its last good state, which we
                            // no longer know: the next update goes out whole.
                            base = None;
                            tracing::warn!(%node, nonce = %r.response_nonce, error = %r.error_detail, "client rejected an update; it keeps its last good state");
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
        let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let source = info.and_then(|i| i.get_ref().remote_addr()).map(|a| a.ip());
        let certs = info.and_then(|i| i.peer_certs());
        let req = request.into_inner();
        // Only bootstrap tokens can be guessed (or cost a TokenReview): the
        // limit on failures applies to them, never to a renewal by an SVID
        // (workloads on a node a guesser shares must still renew).
        let by_account = !req.service_account_token.is_empty();
        let by_token = !req.join_token.is_empty() || by_account;
        if by_token
            && let Some(ip) = source
            && let Err(wait) = lock(&self.failures).check(ip, std::time::Instant::now())
        {
            self.stats.certify_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "too many failed join attempts from {ip}; retry in {} s",
                wait.as_secs().max(1)
            )));
        }
        let refused = |status: Status| {
            self.stats.certify_refused.fetch_add(1, Ordering::Relaxed);
            if by_token && let Some(ip) = source {
                lock(&self.failures).failed(ip, std::time::Instant::now());
            }
            status
        };
        let id = if by_account {
            if !req.join_token.is_empty() {
                return Err(refused(Status::invalid_argument(
                    "send a join token or a ServiceAccount token, not both",
                )));
            }
            let Some(reviewer) = &self.reviewer else {
                return Err(refused(Status::permission_denied(
                    "this controller does not accept ServiceAccount tokens (it runs without --kube)",
                )));
            };
            let account =
                reviewer
                    .review(&req.service_account_token)
                    .await
                    .map_err(|e| match e {
                        fedmesh_kube::ReviewError::Refused(_) => {
                            refused(Status::permission_denied(e.to_string()))
                        }
                        fedmesh_kube::ReviewError::Unavailable(_) => {
                            Status::unavailable(e.to_string())
                        }
                    })?;
            match &self.gateway_account {
                Some((gateway, id)) if *gateway == account => id.clone(),
                _ => SpiffeId::workload(&self.trust_domain, &account.namespace, &account.name)
                    .map_err(|e| {
                        refused(Status::permission_denied(format!(
                            "ServiceAccount {}/{} has no SPIFFE ID: {e}",
                            account.namespace, account.name
                        )))
                    })?,
            }
        } else if by_token {
            self.tokens
                .redeem(&req.join_token)
                .await
                .map_err(|e| match e {
                    Denied::Refused(r) => refused(Status::permission_denied(r.to_string())),
                    Denied::Unrecorded(e) => Status::unavailable(e.to_string()),
                })?
        } else {
            // A renewal: the caller proves who it is with the SVID it
            // holds (the TLS layer verified the chain), and may have only
            // that identity again. Join tokens are for the first SVID.
            let peer = fedmesh_trust::peer_spiffe_id(certs.as_deref().map(|v| &v[..])).ok_or_else(
                || {
                    refused(Status::unauthenticated(
                        "Certify needs a join token or a ServiceAccount token, or a client SVID to renew",
                    ))
                },
            )?;
            if !peer.is_member_of(&self.trust_domain) {
                return Err(refused(Status::permission_denied(format!(
                    "{peer} is not of this cluster's trust domain {}",
                    self.trust_domain
                ))));
            }
            peer
        };
        let id = &id;
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
        let (cert, own_bundle) = signed.map_err(|e| match e {
            CaError::CsrRefused(_) => refused(Status::permission_denied(e.to_string())),
            other => {
                self.stats.certify_refused.fetch_add(1, Ordering::Relaxed);
                Status::internal(other.to_string())
            }
        })?;
        self.stats.certified.fetch_add(1, Ordering::Relaxed);
        let mut bundles: HashMap<String, String> = self
            .snapshots
            .borrow()
            .as_ref()
            .map(|s| s.inputs.bundles().into_iter().collect())
            .unwrap_or_default();
        bundles.insert(self.trust_domain.to_string(), own_bundle);
        Ok(Response::new(pb::CertifyResponse {
            chain_der: vec![cert.to_vec()],
            bundles,
        }))
    }
}

/// A client's subscription entries; malformed ones are logged and skipped.
/// Records an ACK of `base` (the version last sent), with what it skipped.
fn acked(
    stats: &DiscoveryStats,
    id: u64,
    r: &pb::DiscoveryRequest,
    base: Option<&Versioned>,
    skipped: Option<String>,
) {
    let Some(b) = base.filter(|b| b.version_info() == r.version_info) else {
        return;
    };
    stats.client_update(id, |c| {
        c.acked_version = r.version_info.clone();
        c.acked_unix_ms = unix_ms();
        c.policies = policy_revisions(b);
        c.skipped = skipped;
    });
}

fn subscriptions(node: &str, entries: &[String]) -> mesh::Subscribed {
    let (sub, bad) = mesh::parse_subscriptions(entries);
    if !bad.is_empty() {
        tracing::warn!(%node, ?bad, "ignoring subscriptions that are not namespace/name or namespace/*");
    }
    sub
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
    let stats = service.stats.clone();
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = fedmesh_admin::accept(&listener, "discovery", &stats.accept).await;
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
    let serving = service.stats.clone();
    serving.serving.store(true, Ordering::Relaxed);
    let result = tonic::transport::Server::builder()
        .add_service(DiscoveryServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    serving.serving.store(false, Ordering::Relaxed);
    accept.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::view::{GlobalView, RawEvent, RawKv};
    use fedmesh_api::KeySpace;
    use fedmesh_discovery::MeshState;

    /// A global view where cluster gcp exports `services` (name, healthy).
    fn versioned(version: u64, services: &[(&str, u32)], bundle_seq: u64) -> Versioned {
        let ks = KeySpace::default();
        let mut g = GlobalView::new(ks.clone());
        let mut rev = 0;
        let mut put = |key: String, value: String| {
            rev += 1;
            g.apply_event(RawEvent::Put(RawKv {
                key,
                value: value.into_bytes(),
                mod_revision: rev,
            }));
        };
        put(
            ks.cluster("gcp"),
            serde_json::json!({
                "name": "gcp", "cloud": "gcp", "region": "r", "zones": ["b"], "trustDomain": "gcp.fedmesh",
                "gateways": [{"address": "127.0.2.1", "port": 15443}], "registeredAt": "2026-11-24T00:00:00Z"
            })
            .to_string(),
        );
        for (name, healthy) in services {
            put(
                ks.export("gcp", "shop", name),
                serde_json::json!({"ports": [8080], "localities": [{"zone": "b", "healthy": healthy, "total": 3, "weight": healthy}], "generation": 1}).to_string(),
            );
        }
        let td = TrustDomain::new("gcp.fedmesh").unwrap();
        let ca = fedmesh_trust::ClusterCa::generate(&td, &Default::default(), SystemTime::now())
            .unwrap();
        let mut bundle = fedmesh_trust::Bundle::with_roots(td, [ca.cert_der().clone()]);
        bundle.sequence = bundle_seq;
        put(ks.bundle("gcp.fedmesh"), bundle.to_document());
        Versioned {
            version,
            epoch: 7,
            inputs: MeshInputs {
                cluster: "aws".into(),
                local: Arc::default(),
                global: Arc::new(g),
                own: None,
            },
        }
    }

    /// `base` with the global view moved on by the given events: the two
    /// share structure, as consecutive versions do.
    fn next(base: &Versioned, version: u64, events: Vec<RawEvent>) -> Versioned {
        let mut g = (*base.inputs.global).clone();
        for e in events {
            g.apply_event(e);
        }
        Versioned {
            version,
            epoch: 7,
            inputs: MeshInputs {
                global: Arc::new(g),
                ..base.inputs.clone()
            },
        }
    }

    fn export_event(name: &str, healthy: u32, rev: i64) -> RawEvent {
        RawEvent::Put(RawKv {
            key: KeySpace::default().export("gcp", "shop", name),
            value: serde_json::json!({"ports": [8080], "localities": [{"zone": "b", "healthy": healthy, "total": 3, "weight": healthy}], "generation": 2}).to_string().into_bytes(),
            mod_revision: rev,
        })
    }

    /// Every chunk of `update`, cut at `chunk_bytes`.
    fn chunks(
        update: Update,
        inputs: &MeshInputs,
        chunk_bytes: usize,
    ) -> Vec<pb::DiscoveryResponse> {
        let out = std::sync::Mutex::new(Vec::new());
        let mut nonce = 0;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(update.send_chunks(inputs, chunk_bytes, &mut nonce, |r| {
            out.lock().unwrap().push(r);
            async { true }
        }));
        out.into_inner().unwrap()
    }

    /// The one response an update makes with the default chunk size.
    fn response(v: &Versioned, base: Option<&Versioned>) -> pb::DiscoveryResponse {
        let update = match base {
            Some(b) => v.delta(b, &Scope::All),
            None => v.full(&Scope::All),
        };
        let mut all = chunks(update, &v.inputs, CHUNK_BYTES);
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    #[test]
    fn deltas_carry_only_changes_and_rebuild_the_same_state() {
        let v1 = versioned(1, &[("a", 3), ("b", 3), ("c", 3)], 1);
        let v2 = next(
            &v1,
            2,
            vec![
                export_event("b", 1, 100),
                export_event("d", 2, 101),
                RawEvent::Delete {
                    key: KeySpace::default().export("gcp", "shop", "c"),
                    mod_revision: 102,
                },
            ],
        );
        let delta = response(&v2, Some(&v1));
        let (snap, removed) = (delta.snapshot.unwrap(), delta.removed);
        let names: Vec<&str> = snap.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].name, "c");
        assert!(snap.bundles.is_empty(), "unchanged bundles are not resent");
        assert!(snap.peers.is_none(), "unchanged peers are not resent");
        let full = response(&v2, None).snapshot.unwrap();
        let peers = full.peers.unwrap().clusters;
        assert_eq!(peers.len(), 1);
        assert_eq!(
            (peers[0].cluster.as_str(), peers[0].trust_domain.as_str()),
            ("gcp", "gcp.fedmesh")
        );
        assert_eq!(peers[0].gateways[0].address, "127.0.2.1");
        assert!(
            full.services.iter().all(|s| !s.exported),
            "aws exports none of gcp's services"
        );

        let mut client = MeshState::default();
        client.apply(&response(&v1, None)).unwrap();
        client.apply(&response(&v2, Some(&v1))).unwrap();
        let mut fresh = MeshState::default();
        fresh.apply(&response(&v2, None)).unwrap();
        assert_eq!(client, fresh);
        assert_eq!(client.version_info, "7.2");
        assert_eq!(client.services.len(), 3);
    }

    #[test]
    fn a_large_update_arrives_in_bounded_chunks_that_rebuild_the_same_state() {
        let names: Vec<String> = (0..300).map(|i| format!("svc{i:03}")).collect();
        let services: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 2)).collect();
        let v = versioned(1, &services, 1);
        let limit = 2_000;
        let parts = chunks(v.full(&Scope::All), &v.inputs, limit);
        assert!(parts.len() > 10, "{} chunks", parts.len());
        let largest = parts.iter().map(|p| p.encoded_len()).max().unwrap();
        assert!(largest < limit + 500, "a chunk of {largest} bytes");
        assert!(parts.iter().all(|p| p.version_info == v.version_info()));
        assert!(!parts[0].incremental && parts[1..].iter().all(|p| p.incremental));
        assert!(parts[0].snapshot.as_ref().unwrap().peers.is_some());
        let last = parts.len() - 1;
        assert!(parts[..last].iter().all(|p| p.more) && !parts[last].more);
        let nonces: std::collections::BTreeSet<&str> =
            parts.iter().map(|p| p.nonce.as_str()).collect();
        assert_eq!(nonces.len(), parts.len(), "each chunk has its own nonce");

        let mut chunked = MeshState::default();
        for p in &parts {
            chunked.apply(p).unwrap();
        }
        let mut whole = MeshState::default();
        whole.apply(&response(&v, None)).unwrap();
        assert_eq!(chunked, whole);
        assert_eq!(chunked.services.len(), 300);
    }

    #[test]
    fn scopes_send_what_a_client_uses() {
        let mut v = versioned(1, &[("cart", 2), ("pay", 2)], 1);
        let svc = || fedmesh_api::LocalService {
            ports: vec![8080],
            endpoints: vec![],
        };
        let mut local = fedmesh_api::LocalServices::new();
        local.insert(ServiceKey::new("shop", "web"), svc());
        local.insert(ServiceKey::new("ops", "db"), svc());
        v.inputs.local = Arc::new(local);
        let names = |u: Update| -> Vec<String> {
            let mut out: Vec<String> = chunks(u, &v.inputs, CHUNK_BYTES)
                .into_iter()
                .flat_map(|r| r.snapshot.unwrap().services)
                .map(|s| format!("{}/{}", s.namespace, s.name))
                .collect();
            out.sort();
            out
        };
        assert_eq!(names(v.full(&Scope::All)).len(), 4);
        assert_eq!(
            names(v.full(&Scope::Exported)),
            ["ops/db", "shop/web"],
            "a gateway gets only what its cluster exports"
        );
        let mut listed = Scope::Listed {
            names: Default::default(),
            namespaces: Default::default(),
        };
        let (sub, bad) = mesh::parse_subscriptions(&[
            "shop/cart".to_string(),
            "shop/ghost".to_string(),
            "nope".to_string(),
        ]);
        assert_eq!(bad, ["nope"]);
        listed.subscribe(sub);
        assert_eq!(names(v.full(&listed)), ["shop/cart"]);
        let missing = chunks(v.full(&listed), &v.inputs, CHUNK_BYTES)[0]
            .removed
            .clone();
        assert_eq!(
            missing[0].name, "ghost",
            "a missing name is said to be absent"
        );

        // On demand: a namespace adds what exists in it, once.
        let (more, _) = mesh::parse_subscriptions(&["shop/*".to_string()]);
        let new = listed.subscribe(more.clone());
        assert_eq!(
            names(v.subscribed(&new)),
            ["shop/cart", "shop/pay", "shop/web"]
        );
        assert!(listed.subscribe(more).is_empty());
        assert!(listed.contains(&ServiceKey::new("shop", "anything"), &v.inputs));
        assert!(!listed.contains(&ServiceKey::new("ops", "db"), &v.inputs));
    }

    #[test]
    fn a_new_cluster_resends_the_peer_list() {
        let v1 = versioned(1, &[("a", 3)], 1);
        let record = serde_json::json!({
            "name": "azure", "cloud": "azure", "region": "r", "zones": ["1"], "trustDomain": "azure.fedmesh",
            "gateways": [{"address": "gw.azure.example", "port": 15443}], "registeredAt": "2026-11-24T00:00:00Z"
        });
        let td = TrustDomain::new("azure.fedmesh").unwrap();
        let ca = fedmesh_trust::ClusterCa::generate(&td, &Default::default(), SystemTime::now())
            .unwrap();
        let bundle = fedmesh_trust::Bundle::with_roots(td, [ca.cert_der().clone()]);
        // As `register` writes them: one transaction, one revision.
        let v2 = next(
            &v1,
            2,
            vec![
                RawEvent::Put(RawKv {
                    key: KeySpace::default().cluster("azure"),
                    value: record.to_string().into_bytes(),
                    mod_revision: 100,
                }),
                RawEvent::Put(RawKv {
                    key: KeySpace::default().bundle("azure.fedmesh"),
                    value: bundle.to_document().into_bytes(),
                    mod_revision: 100,
                }),
            ],
        );
        let snap = response(&v2, Some(&v1)).snapshot.unwrap();
        let mut sent: Vec<&str> = snap.bundles.keys().map(String::as_str).collect();
        sent.sort_unstable();
        assert_eq!(
            sent,
            ["azure.fedmesh", "gcp.fedmesh"],
            "a new trust domain resends the bundles"
        );
        let names: Vec<String> = snap
            .peers
            .expect("the peer list changed")
            .clusters
            .into_iter()
            .map(|p| p.cluster)
            .collect();
        assert_eq!(names, ["azure", "gcp"]);
    }

    #[test]
    fn a_bad_response_changes_nothing() {
        let mut client = MeshState::default();
        client
            .apply(&response(&versioned(1, &[("a", 3)], 1), None))
            .unwrap();
        let before = client.clone();
        let mut bad = response(&versioned(2, &[("a", 1)], 1), None);
        bad.snapshot.as_mut().unwrap().peers = None;
        assert!(
            client.apply(&bad).is_err(),
            "a full snapshot needs its peers"
        );
        bad.snapshot = None;
        assert!(client.apply(&bad).is_err());
        assert_eq!(client, before);
    }
}
