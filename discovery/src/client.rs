//! The drivers around [`MeshState`]: `Certify` for the first SVID and its
//! renewals, and the discovery stream with ACK/NACK, reconnection and the
//! last good config.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_api::retry::Backoff;
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_trust::{
    AllowIds, BundleSet, RenewError, RenewalPolicy, SpiffeId, Svid, SvidSource, SystemClock,
};
use pb::discovery_client::DiscoveryClient;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::state::MeshState;
use crate::status::SyncStatus;

/// How a data-plane component reaches its cluster's controller.
#[derive(Debug, Clone)]
pub struct ControllerAccess {
    pub address: SocketAddr,
    /// The identity the controller must present:
    /// `spiffe://<our trust domain>/fedmesh/controller/<our cluster>`.
    pub controller: SpiffeId,
    /// The identity to ask `Certify` for; the credential must allow it.
    pub identity: SpiffeId,
    /// For the first SVID only: renewals present the SVID held.
    pub credential: Credential,
    /// Our name in the controller's logs.
    pub node: String,
}

/// What proves a component's identity for its first SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A join token (`fedmesh token create`).
    JoinToken(String),
    /// A projected Kubernetes ServiceAccount token (audience `fedmesh`),
    /// read from this file at each use: the kubelet rotates it.
    ServiceAccountToken(std::path::PathBuf),
    /// None: renewals only.
    None,
}

/// Which services a client asks for, and how it reconnects: backoff
/// doubles per consecutive failure, with jitter.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub renewal: RenewalPolicy,
    /// Everything, this cluster's exports (a gateway), or a subscription.
    pub scope: pb::Scope,
    /// With `Scope::Listed`: the services to hold from the start,
    /// "namespace/name" or "namespace/*". More come on demand.
    pub subscribe: Vec<String>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            renewal: RenewalPolicy::default(),
            scope: pb::Scope::All,
            subscribe: Vec::new(),
        }
    }
}

/// Asks the controller for a service on demand (a listed scope), then says
/// whether the client holds it now.
#[derive(Debug, Clone)]
pub struct OnDemand(mpsc::Sender<(ServiceKey, oneshot::Sender<()>)>);

impl OnDemand {
    /// Subscribes to `key` and waits, up to `wait`, until the controller
    /// has answered: with the service, or saying it does not exist. Returns
    /// whether the controller answered in time.
    pub async fn request(&self, key: ServiceKey, wait: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.0.send((key, tx)).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("the controller refused Certify for {id}: {status}")]
    Refused { id: SpiffeId, status: tonic::Status },
    #[error("the controller's reply is unusable: {0}")]
    BadReply(String),
    #[error("discovery RPC failed: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("building the TLS config: {0}")]
    Tls(#[from] fedmesh_trust::TlsConfigError),
    /// The bootstrap credential's file could not be read (yet: the kubelet
    /// may not have written a projected token); retried.
    #[error("reading the ServiceAccount token: {0}")]
    Credential(String),
}

impl ClientError {
    /// Whether trying again later can help. A refused join token or a
    /// misconfigured identity will not fix itself.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ClientError::Refused { .. } | ClientError::Tls(_))
    }
}

/// A gRPC channel to a controller at `addr` over TLS with `tls` (whose
/// ALPN must offer "h2"). The server's name is not checked by hostname:
/// `tls` verifies its SPIFFE ID.
pub async fn channel(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tower::service_fn(move |_uri| {
        let tls = tls.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
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
        // A controller that vanishes without closing the connection (a
        // crashed host, a partition) is noticed, and the stream redialled.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
}

/// Asks the controller to sign a fresh key for `access.identity`: with
/// the join token, or, to renew, by presenting `held` (an SVID of that
/// identity, still valid). The controller is verified against `bundles`.
pub async fn certify(
    access: &ControllerAccess,
    bundles: watch::Receiver<Arc<BundleSet>>,
    held: Option<Arc<Svid>>,
) -> Result<Svid, ClientError> {
    let controller = Arc::new(AllowIds::one(access.controller.clone()));
    let (tls, credential) = match held {
        Some(svid) => (
            fedmesh_trust::client_config(watch::channel(svid).1, bundles, controller, &[b"h2"])?,
            &Credential::None,
        ),
        None => (
            fedmesh_trust::client_config_without_svid(bundles, controller, &[b"h2"])?,
            &access.credential,
        ),
    };
    let (join_token, service_account_token) = match credential {
        Credential::JoinToken(t) => (t.clone(), String::new()),
        Credential::ServiceAccountToken(path) => {
            let raw = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| ClientError::Credential(format!("{}: {e}", path.display())))?;
            (String::new(), raw.trim().to_string())
        }
        Credential::None => (String::new(), String::new()),
    };
    let ch = channel(access.address, Arc::new(tls))
        .await
        .map_err(|source| ClientError::Connect {
            addr: access.address,
            source,
        })?;
    let (csr, key) = fedmesh_trust::certificate_request(&access.identity)
        .map_err(|e| ClientError::BadReply(format!("making a CSR: {e}")))?;
    let reply = DiscoveryClient::new(ch)
        .certify(pb::CertifyRequest {
            csr_der: csr,
            join_token,
            service_account_token,
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => ClientError::Refused {
                id: access.identity.clone(),
                status,
            },
            _ => ClientError::Rpc(status),
        })?
        .into_inner();
    let chain = reply.chain_der.into_iter().map(Into::into).collect();
    let svid = Svid::new(chain, key).map_err(|e| ClientError::BadReply(e.to_string()))?;
    if svid.spiffe_id() != &access.identity {
        return Err(ClientError::BadReply(format!(
            "asked for {}, was issued {}",
            access.identity,
            svid.spiffe_id()
        )));
    }
    Ok(svid)
}

/// Renews the SVID through `Certify`, presenting the one held; the join
/// token (which may have expired, or been single-use) only once the held
/// SVID has expired or is refused.
#[derive(Debug, Clone)]
struct CertifySource {
    access: Arc<ControllerAccess>,
    bundles: watch::Receiver<Arc<BundleSet>>,
    held: Arc<std::sync::Mutex<Arc<Svid>>>,
}

impl SvidSource for CertifySource {
    fn fetch(&self) -> impl Future<Output = Result<Svid, RenewError>> + Send {
        let this = self.clone();
        async move {
            let held = this.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let expired = held.not_after() <= std::time::SystemTime::now();
            let renewed = if expired {
                Err(ClientError::BadReply("the SVID held has expired".into()))
            } else {
                certify(&this.access, this.bundles.clone(), Some(held)).await
            };
            let svid = match renewed {
                Ok(svid) => svid,
                // A controller away for a moment: renew with the SVID later,
                // rather than spend a failed token attempt now.
                Err(e) if !expired && e.is_retryable() => return Err(RenewError(Box::new(e))),
                Err(e) if this.access.credential == Credential::None => {
                    return Err(RenewError(Box::new(e)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing with the SVID held failed; trying the bootstrap credential");
                    certify(&this.access, this.bundles, None)
                        .await
                        .map_err(|e| RenewError(Box::new(e)))?
                }
            };
            *this.held.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(svid.clone());
            Ok(svid)
        }
    }
}

/// A running client: the SVID it holds, the bundles it trusts, and the
/// last good config. Dropping it stops its tasks.
#[derive(Debug)]
pub struct Discovered<T> {
    pub svid: watch::Receiver<Arc<Svid>>,
    pub bundles: watch::Receiver<Arc<BundleSet>>,
    pub config: watch::Receiver<Arc<T>>,
    /// Skipped services and peer liveness, for the admin port.
    pub status: watch::Receiver<Arc<SyncStatus>>,
    /// Subscribes to more services (with a listed scope).
    pub on_demand: OnDemand,
    tasks: Vec<JoinHandle<()>>,
}

impl<T> Drop for Discovered<T> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Turns a mesh state into the component's own config, or says why it
/// cannot (the update is then NACKed).
pub trait Convert<T>:
    Fn(&MeshState, &BundleSet) -> Result<T, String> + Send + Sync + 'static
{
}
impl<T, F: Fn(&MeshState, &BundleSet) -> Result<T, String> + Send + Sync + 'static> Convert<T>
    for F
{
}

/// Gets an SVID, opens the discovery stream, and returns once the first
/// config has been applied. Until then, failures that may pass (the
/// controller not up yet, a mesh it rejects) are retried with backoff;
/// a refused join token is returned at once.
///
/// `bootstrap` must hold our own trust domain's bundle, to verify the
/// controller before we have anything else.
pub async fn start<T, F>(
    access: ControllerAccess,
    bootstrap: BundleSet,
    policy: ClientPolicy,
    convert: F,
) -> Result<Discovered<T>, ClientError>
where
    T: Send + Sync + 'static,
    F: Convert<T>,
{
    let access = Arc::new(access);
    let (bundles_tx, bundles) = watch::channel(Arc::new(bootstrap));
    let mut backoff = Backoff::new(policy.initial_backoff, policy.max_backoff);
    let first_svid = loop {
        match certify(&access, bundles.clone(), None).await {
            Ok(svid) => break svid,
            Err(e) if e.is_retryable() => {
                let wait = backoff.next(fastrand::f64());
                tracing::warn!(error = %e, retry_in = ?wait, "no SVID yet; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(id = %first_svid.spiffe_id(), not_after = ?first_svid.not_after(), "SVID issued by the controller");
    let source = CertifySource {
        access: access.clone(),
        bundles: bundles.clone(),
        held: Arc::new(std::sync::Mutex::new(Arc::new(first_svid.clone()))),
    };
    let (svid, renewer) =
        fedmesh_trust::spawn_renewer(source, first_svid, policy.renewal.clone(), SystemClock);
    let (first_tx, first_rx) = oneshot::channel();
    let (status_tx, status) = watch::channel(Arc::new(SyncStatus::default()));
    let (asks_tx, asks) = mpsc::channel(64);
    let subscribed = policy.subscribe.iter().cloned().collect();
    let driver = Driver {
        asks,
        subscribed,
        waiters: Vec::new(),
        absent: BTreeSet::new(),
        access,
        policy,
        svid: svid.clone(),
        bundles: bundles_tx,
        status: status_tx,
        state: MeshState::default(),
        out: Output::First(first_tx),
    };
    let streams = tokio::spawn(driver.run(convert));
    let mut tasks = vec![renewer, streams];
    let config = match first_rx.await {
        Ok(c) => c,
        Err(_) => {
            for t in tasks.drain(..) {
                t.abort();
            }
            return Err(ClientError::BadReply(
                "the discovery task stopped before the first config".into(),
            ));
        }
    };
    Ok(Discovered {
        svid,
        bundles,
        config,
        status,
        on_demand: OnDemand(asks_tx),
        tasks,
    })
}

enum Output<T> {
    /// Before the first config: hands its receiver to `start`.
    First(oneshot::Sender<watch::Receiver<Arc<T>>>),
    Running(watch::Sender<Arc<T>>),
    Gone,
}

/// The most services a client subscribes to on demand.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

struct Driver<T> {
    /// On-demand subscriptions from the component.
    asks: mpsc::Receiver<(ServiceKey, oneshot::Sender<()>)>,
    /// Every subscription so far: resent on each new stream.
    subscribed: BTreeSet<String>,
    /// Waiting for the controller's answer about a service.
    waiters: Vec<(ServiceKey, oneshot::Sender<()>)>,
    /// Subscribed services the controller says do not exist, so a repeated
    /// ask is answered at once. Only ever subscribed names, so bounded.
    absent: BTreeSet<ServiceKey>,
    access: Arc<ControllerAccess>,
    policy: ClientPolicy,
    svid: watch::Receiver<Arc<Svid>>,
    bundles: watch::Sender<Arc<BundleSet>>,
    status: watch::Sender<Arc<SyncStatus>>,
    /// The last good state: kept across reconnections, and its version is
    /// offered on each new stream so an unchanged mesh is not resent.
    state: MeshState,
    out: Output<T>,
}

impl<T: Send + Sync + 'static> Driver<T> {
    async fn run(mut self, convert: impl Convert<T>) {
        let mut backoff = Backoff::new(self.policy.initial_backoff, self.policy.max_backoff);
        loop {
            let (applied, result) = self.stream_once(&convert).await;
            if applied {
                backoff.reset();
            }
            if matches!(self.out, Output::Gone) {
                return;
            }
            let wait = backoff.next(fastrand::f64());
            match result {
                Ok(()) => {
                    tracing::info!(retry_in = ?wait, "the controller ended the discovery stream")
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?wait, "discovery stream failed; keeping the last good config")
                }
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One stream, until it ends. Returns whether it applied anything.
    async fn stream_once(&mut self, convert: &impl Convert<T>) -> (bool, Result<(), ClientError>) {
        let mut applied = false;
        let result = async {
            let tls = fedmesh_trust::client_config(
                self.svid.clone(),
                self.bundles.subscribe(),
                Arc::new(AllowIds::one(self.access.controller.clone())),
                &[b"h2"],
            )?;
            let ch = channel(self.access.address, Arc::new(tls))
                .await
                .map_err(|source| ClientError::Connect {
                    addr: self.access.address,
                    source,
                })?;
            let (requests, rx) = mpsc::channel(4);
            let hello = pb::DiscoveryRequest {
                node: self.access.node.clone(),
                version_info: self.state.version_info.clone(),
                scope: self.policy.scope as i32,
                subscribe: self.subscribed.iter().cloned().collect(),
                ..Default::default()
            };
            // The channel has room: this cannot block or fail.
            let _ = requests.try_send(hello);
            let mut responses = DiscoveryClient::new(ch)
                .stream(ReceiverStream::new(rx))
                .await?
                .into_inner();
            // Chunks of an update, held until its last arrives.
            let mut chunks: Vec<pb::DiscoveryResponse> = Vec::new();
            loop {
                let r = tokio::select! {
                    r = responses.message() => match r? {
                        Some(r) => r,
                        None => return Ok(()),
                    },
                    Some((key, done)) = self.asks.recv() => {
                        if let Some(ask) = self.ask(key, done)
                            && requests.send(ask).await.is_err()
                        {
                            return Ok(());
                        }
                        continue;
                    }
                };
                if r.more {
                    chunks.push(r);
                    continue;
                }
                chunks.push(r);
                let update = std::mem::take(&mut chunks);
                let r = update.last().cloned().unwrap_or_default();
                let reply = match self.accept(&update, convert) {
                    Ok(skipped) => {
                        applied = true;
                        if !skipped.is_empty() {
                            tracing::warn!(version = %r.version_info, skipped = %skipped.join("; "), "skipped services of a discovery update; each keeps its last good value, the rest applied");
                        }
                        // A partial ACK: the version is ours, minus what it names.
                        pb::DiscoveryRequest {
                            node: self.access.node.clone(),
                            version_info: r.version_info.clone(),
                            response_nonce: r.nonce.clone(),
                            error_detail: skipped.join("; "),
                            ..Default::default()
                        }
                    }
                    Err(detail) => {
                        tracing::error!(version = %r.version_info, error = %detail, "rejected a discovery update; keeping the last good config");
                        pb::DiscoveryRequest {
                            node: self.access.node.clone(),
                            version_info: self.state.version_info.clone(),
                            response_nonce: r.nonce.clone(),
                            error_detail: detail,
                            ..Default::default()
                        }
                    }
                };
                if matches!(self.out, Output::Gone) || requests.send(reply).await.is_err() {
                    return Ok(());
                }
            }
        }
        .await;
        (applied, result)
    }

    /// An on-demand subscription: answered at once when the client already
    /// knows the service (held, or known not to exist); otherwise the
    /// request to send, and the waiter is resolved by the answer.
    fn ask(&mut self, key: ServiceKey, done: oneshot::Sender<()>) -> Option<pb::DiscoveryRequest> {
        // Callers that gave up waiting (the controller was away).
        self.waiters.retain(|(_, w)| !w.is_closed());
        let name = key.to_string();
        let known = self.state.services.contains_key(&key) || self.absent.contains(&key);
        // A bound on what arbitrary Host headers can make a proxy hold.
        let full = self.subscribed.len() >= MAX_SUBSCRIPTIONS && !self.subscribed.contains(&name);
        if known || full {
            if full {
                tracing::warn!(service = %key, "not subscribing: the subscription limit is reached");
            }
            let _ = done.send(());
            return None;
        }
        self.waiters.push((key, done));
        self.subscribed
            .insert(name.clone())
            .then(|| pb::DiscoveryRequest {
                node: self.access.node.clone(),
                version_info: self.state.version_info.clone(),
                subscribe: vec![name],
                ..Default::default()
            })
    }

    /// Applies one response, less the services it skips (returned, each
    /// with why); or nothing, when what is wrong cannot be split.
    fn accept(
        &mut self,
        update: &[pb::DiscoveryResponse],
        convert: &impl Convert<T>,
    ) -> Result<Vec<String>, String> {
        let mut next = self.state.clone();
        let mut skipped = Vec::new();
        for r in update {
            skipped.extend(next.apply(r)?);
        }
        let bundles = next.bundle_set()?;
        let own = self.access.identity.trust_domain();
        if bundles.get(&own).is_none() {
            return Err(format!("no bundle for our own trust domain {own}"));
        }
        let config = Arc::new(convert(&next, &bundles)?);
        self.state = next;
        self.bundles.send_if_modified(|b| {
            let changed = **b != bundles;
            if changed {
                *b = Arc::new(bundles);
            }
            changed
        });
        self.out = match std::mem::replace(&mut self.out, Output::Gone) {
            Output::First(tx) => {
                let (config_tx, config_rx) = watch::channel(config);
                if tx.send(config_rx).is_ok() {
                    Output::Running(config_tx)
                } else {
                    Output::Gone
                }
            }
            Output::Running(tx) => {
                if tx.send(config).is_ok() {
                    Output::Running(tx)
                } else {
                    Output::Gone
                }
            }
            Output::Gone => Output::Gone,
        };
        self.status
            .send_replace(Arc::new(SyncStatus::of(&self.state)));
        // What the update says of subscribed names: here, or absent.
        for r in update {
            if !r.incremental {
                self.absent.clear();
            }
            for k in &r.removed {
                let key = ServiceKey::new(&k.namespace, &k.name);
                if self.subscribed.contains(&key.to_string()) {
                    self.absent.insert(key);
                }
            }
        }
        let state = &self.state;
        self.absent.retain(|k| !state.services.contains_key(k));
        let answered: Vec<_> = std::mem::take(&mut self.waiters);
        for (k, done) in answered {
            if state.services.contains_key(&k) || self.absent.contains(&k) {
                let _ = done.send(());
            } else {
                self.waiters.push((k, done));
            }
        }
        tracing::debug!(version = %self.state.version_info, "discovery update applied");
        Ok(skipped)
    }
}
