//! Two controllers against one real etcd: discovery across clusters, Certify,
//! ACK/NACK, reconnects, static stability, and the admin port.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fedmesh_api::{ClusterRecord, KeySpace};
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_controller::kubernetes::KubeOptions;
use fedmesh_controller::tokens::Tokens;
use fedmesh_controller::watcher::WatcherConfig;
use fedmesh_discovery::MeshState;
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_test_support::{Etcd, FakeKube, eventually, kube_objects};
use fedmesh_trust::{
    AllowAnyVerified, Bundle, BundleSet, CaOptions, ClusterCa, SpiffeId, Svid, TrustDomain, Usage,
};
use fedmesh_zone::GlobalZone;
use fedmesh_zone::TokensFile;
use fedmesh_zone::join::{EtcdAccess, JoinDir};
use fedmesh_zone::tokens::DEFAULT_TTL;
use pb::discovery_client::DiscoveryClient;
use rustls_pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

const TOKEN: &str = "web-token-0123456789abcdef0123456789";

fn registry_doc(healthy: usize) -> String {
    let mut s = String::from(
        "services:\n  - namespace: shop\n    name: cart\n    ports: [8080]\n    endpoints:\n",
    );
    for i in 0..3 {
        s.push_str(&format!(
            "      - address: 127.0.1.{}:8080\n        zone: az1\n        healthy: {}\n",
            10 + i,
            i < healthy
        ));
    }
    s
}

struct Cluster {
    name: String,
    n: u8,
    td: TrustDomain,
    ca_bundle: Bundle,
    registry: PathBuf,
    controller: Controller,
    _dir: tempfile::TempDir,
}

async fn cluster(etcd: &Etcd, name: &str, n: u8, services: &str) -> Cluster {
    cluster_with(etcd, name, n, services, None, |_| {}).await
}

/// `source` replaces the file registry when given.
async fn cluster_with(
    etcd: &Etcd,
    name: &str,
    n: u8,
    services: &str,
    source: Option<LocalSource>,
    tune: impl FnOnce(&mut ControllerConfig),
) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new(&format!("{name}.fedmesh.test")).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let ca_bundle = Bundle::with_roots(td.clone(), [ca.cert_der().clone()]);
    let record = ClusterRecord {
        name: name.into(),
        cloud: name.into(),
        region: "r1".into(),
        zones: vec!["az1".into()],
        trust_domain: td.to_string(),
        gateways: vec![format!("127.0.{n}.1:15443").parse().unwrap()],
        labels: BTreeMap::new(),
        registered_at: time::OffsetDateTime::now_utc(),
        egress: Default::default(),
    };
    let anchor = fedmesh_test_support::anchor();
    let mut zone = GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .with_anchor(anchor.clone());
    zone.register(&record, &ca).await.unwrap();
    let join = JoinDir {
        cluster: record,
        etcd: EtcdAccess {
            endpoints: vec![etcd.endpoint()],
            prefix: KeySpace::default().prefix().into(),
            user: None,
            password: None,
            tls: None,
        },
        ca,
        anchor: Some(anchor.public()),
    };
    // On disk too, as `fedmesh register cluster` leaves it: the controller
    // takes up CA rotations staged there.
    let join_dir = dir.path().join("join");
    join.write(&join_dir).unwrap();
    let signed = zone
        .stored(&KeySpace::default().cluster(name))
        .await
        .unwrap()
        .unwrap();
    JoinDir::save_signed_record(&join_dir, &signed).unwrap();
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, services).unwrap();
    let source = source.unwrap_or(LocalSource::File {
        path: registry.clone(),
        poll: Duration::from_millis(20),
    });
    let mut config = ControllerConfig::new(join, source, format!("127.0.{n}.2:0").parse().unwrap());
    config.admin_addr = Some(format!("127.0.{n}.2:0").parse().unwrap());
    config.join_dir = Some(join_dir);
    config.tokens = Tokens::fixed(TokensFile::granting(
        [(TOKEN, SpiffeId::workload(&td, "shop", "web").unwrap())],
        Duration::from_secs(3600),
    ));
    config.watcher = WatcherConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    };
    tune(&mut config);
    let controller = Controller::start(config).await.unwrap();
    Cluster {
        name: name.into(),
        n,
        td,
        ca_bundle,
        registry,
        controller,
        _dir: dir,
    }
}

fn own_bundles(c: &Cluster) -> watch::Receiver<Arc<BundleSet>> {
    let mut set = BundleSet::new();
    set.insert(c.ca_bundle.clone());
    watch::channel(Arc::new(set)).1
}

/// Bootstraps an SVID through Certify, as a proxy would.
async fn certify(c: &Cluster, token: &str, id: &SpiffeId) -> Result<Svid, tonic::Status> {
    let tls = fedmesh_trust::client_config_without_svid(
        own_bundles(c),
        Arc::new(AllowAnyVerified),
        &[b"h2"],
    )
    .unwrap();
    call_certify(c, tls, token, "", id).await
}

/// Bootstraps through Certify with a ServiceAccount token, as a proxy on
/// Kubernetes would.
async fn certify_by_account(
    c: &Cluster,
    account_token: &str,
    id: &SpiffeId,
) -> Result<Svid, tonic::Status> {
    let tls = fedmesh_trust::client_config_without_svid(
        own_bundles(c),
        Arc::new(AllowAnyVerified),
        &[b"h2"],
    )
    .unwrap();
    call_certify(c, tls, "", account_token, id).await
}

/// Renews through Certify with no token, presenting `held`, asking for `id`.
async fn renew(c: &Cluster, held: &Svid, id: &SpiffeId) -> Result<Svid, tonic::Status> {
    let tls = fedmesh_trust::client_config(
        watch::channel(Arc::new(held.clone())).1,
        own_bundles(c),
        Arc::new(AllowAnyVerified),
        &[b"h2"],
    )
    .unwrap();
    call_certify(c, tls, "", "", id).await
}

async fn call_certify(
    c: &Cluster,
    tls: rustls::ClientConfig,
    token: &str,
    account_token: &str,
    id: &SpiffeId,
) -> Result<Svid, tonic::Status> {
    let channel = fedmesh_discovery::channel(c.controller.discovery_addr, Arc::new(tls))
        .await
        .unwrap();
    let (csr, key) = fedmesh_trust::certificate_request(id).unwrap();
    let resp = DiscoveryClient::new(channel)
        .certify(pb::CertifyRequest {
            csr_der: csr,
            join_token: token.into(),
            service_account_token: account_token.into(),
        })
        .await?
        .into_inner();
    assert!(resp.bundles.contains_key(c.td.as_str()));
    let chain = resp.chain_der.into_iter().map(Into::into).collect();
    Ok(Svid::new(chain, key).unwrap())
}

/// An open discovery stream.
struct Stream {
    requests: mpsc::Sender<pb::DiscoveryRequest>,
    responses: tonic::Streaming<pb::DiscoveryResponse>,
    /// The client's copy of the mesh, as a proxy keeps it.
    state: MeshState,
}

impl Stream {
    async fn open(c: &Cluster, svid: Svid, version: &str) -> Result<Self, tonic::Status> {
        let (_tx, svid_rx) = watch::channel(Arc::new(svid));
        std::mem::forget(_tx);
        let tls = fedmesh_trust::client_config(
            svid_rx,
            own_bundles(c),
            Arc::new(AllowAnyVerified),
            &[b"h2"],
        )
        .unwrap();
        let channel = fedmesh_discovery::channel(c.controller.discovery_addr, Arc::new(tls))
            .await
            .unwrap();
        let (requests, rx) = mpsc::channel(8);
        requests
            .send(pb::DiscoveryRequest {
                node: "test".into(),
                version_info: version.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let responses = DiscoveryClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
            state: MeshState::default(),
        })
    }

    async fn next(&mut self) -> pb::DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(15), self.responses.message())
            .await
            .expect("no response in time")
            .unwrap()
            .expect("stream ended")
    }

    /// Applies and ACKs responses until the client's state satisfies `want`;
    /// returns the response that got it there.
    async fn until(&mut self, want: impl Fn(&MeshState) -> bool) -> pb::DiscoveryResponse {
        loop {
            let r = self.next().await;
            self.state.apply(&r).unwrap();
            self.ack(&r).await;
            if want(&self.state) {
                return r;
            }
        }
    }

    async fn ack(&self, r: &pb::DiscoveryResponse) {
        self.requests
            .send(pb::DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn nack(&self, r: &pb::DiscoveryResponse, held: &str) {
        self.requests
            .send(pb::DiscoveryRequest {
                version_info: held.into(),
                response_nonce: r.nonce.clone(),
                error_detail: "rejected by test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Whether anything arrives within `wait`. Used only to show that
    /// nothing is resent; every positive expectation polls instead.
    async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.responses.message())
            .await
            .is_err()
    }
}

fn remote_healthy<'a>(
    services: impl IntoIterator<Item = &'a pb::Service>,
    cluster: &str,
) -> Option<u64> {
    services
        .into_iter()
        .find(|svc| svc.namespace == "shop" && svc.name == "cart")?
        .remote
        .iter()
        .find(|r| r.cluster == cluster)
        .map(|r| r.healthy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_one_cluster_reaches_anothers_discovery_stream() {
    let etcd = Etcd::start().await.unwrap();
    let a = cluster(&etcd, "aws", 1, &registry_doc(3)).await;
    let b = cluster(&etcd, "gcp", 2, "").await;
    let web = SpiffeId::workload(&b.td, "shop", "web").unwrap();
    let svid = certify(&b, TOKEN, &web).await.unwrap();
    assert_eq!(svid.spiffe_id(), &web);

    let mut s = Stream::open(&b, svid.clone(), "").await.unwrap();
    s.until(|m| remote_healthy(m.services.values(), "aws") == Some(3))
        .await;
    let snap = s.state.clone();
    assert_eq!(snap.cluster, "gcp");
    let remote = &snap.services.values().next().unwrap().remote[0];
    assert_eq!(
        (
            remote.cloud.as_str(),
            remote.gateways[0].address.as_str(),
            remote.gateways[0].port
        ),
        ("aws", "127.0.1.1", 15443)
    );
    assert!(remote.verified, "aws's alive key is present");
    assert!(
        snap.bundles.contains_key("aws.fedmesh.test")
            && snap.bundles.contains_key("gcp.fedmesh.test")
    );

    // One endpoint in aws turns unhealthy: gcp's stream gets an incremental
    // update carrying just that service.
    fedmesh_test_support::write_atomically(&a.registry, registry_doc(2)).unwrap();
    let second = s
        .until(|m| remote_healthy(m.services.values(), "aws") == Some(2))
        .await;
    assert!(second.incremental);
    assert_eq!(second.snapshot.as_ref().unwrap().services.len(), 1);

    // A NACK is not answered by resending the same version...
    fedmesh_test_support::write_atomically(&a.registry, registry_doc(1)).unwrap();
    let third = s.next().await;
    s.nack(&third, &second.version_info).await;
    assert!(
        s.quiet_for(Duration::from_millis(500)).await,
        "a NACKed version was resent"
    );
    let nacks = b
        .controller
        .metrics
        .discovery
        .nacks
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(nacks, 1);
    // ...and the next update is whole, since the server no longer knows
    // what the client holds.
    fedmesh_test_support::write_atomically(&a.registry, registry_doc(3)).unwrap();
    let fourth = s.next().await;
    assert!(
        !fourth.incremental,
        "after a NACK the next update must be full"
    );
    s.state.apply(&fourth).unwrap();
    s.ack(&fourth).await;
    assert_eq!(remote_healthy(s.state.services.values(), "aws"), Some(3));

    // Reconnecting with the version held: nothing is sent until a change,
    // and then only the change.
    let held = s.state.clone();
    drop(s);
    let mut s = Stream::open(&b, svid, &fourth.version_info).await.unwrap();
    s.state = held;
    assert!(
        s.quiet_for(Duration::from_millis(500)).await,
        "a held version was resent"
    );
    fedmesh_test_support::write_atomically(&a.registry, registry_doc(2)).unwrap();
    let r = s
        .until(|m| remote_healthy(m.services.values(), "aws") == Some(2))
        .await;
    assert!(r.incremental);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_signs_only_what_the_token_allows_and_discovery_needs_an_svid() {
    let etcd = Etcd::start().await.unwrap();
    let b = cluster(&etcd, "gcp", 2, "").await;
    let web = SpiffeId::workload(&b.td, "shop", "web").unwrap();
    let admin = SpiffeId::workload(&b.td, "shop", "admin").unwrap();
    let held = certify(&b, TOKEN, &web).await.unwrap();

    let err = certify(&b, "not-a-token-0000000000", &web)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = certify(&b, TOKEN, &admin).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("sa/admin"), "{}", err.message());

    // Guessing tokens from one source: after its burst of failures (10, two
    // spent above) it is refused even with a good token, and told when to
    // come back.
    for _ in 0..8 {
        let err = certify(&b, "guess-0000000000000000", &web)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
    let err = certify(&b, TOKEN, &web).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("too many failed join attempts from 127."),
        "{}",
        err.message()
    );
    // Renewals by SVID from that same source are not held up: the limit
    // is on guessing tokens.
    assert_eq!(renew(&b, &held, &web).await.unwrap().spiffe_id(), &web);

    // Discovery without a client certificate is refused.
    let tls = fedmesh_trust::client_config_without_svid(
        own_bundles(&b),
        Arc::new(AllowAnyVerified),
        &[b"h2"],
    )
    .unwrap();
    let channel = fedmesh_discovery::channel(b.controller.discovery_addr, Arc::new(tls))
        .await
        .unwrap();
    let (_tx, rx) = mpsc::channel(1);
    let err = DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_down_discovery_keeps_serving_the_last_view_and_resyncs() {
    let mut etcd = Etcd::start().await.unwrap();
    let a = cluster(&etcd, "aws", 1, &registry_doc(3)).await;
    let b = cluster(&etcd, "gcp", 2, "").await;
    let svid = certify(
        &b,
        TOKEN,
        &SpiffeId::workload(&b.td, "shop", "web").unwrap(),
    )
    .await
    .unwrap();
    let mut s = Stream::open(&b, svid.clone(), "").await.unwrap();
    s.until(|m| remote_healthy(m.services.values(), "aws") == Some(3))
        .await;

    // Liveness keys may still move the version after that; what
    // counts is that nothing is published once etcd is gone.
    let at_kill = b
        .controller
        .snapshots
        .borrow()
        .clone()
        .unwrap()
        .version_info();
    etcd.kill();
    let stats = b.controller.metrics.clone();
    eventually(
        "gcp's controller to notice the outage",
        Duration::from_secs(15),
        || {
            let n = stats
                .watch
                .etcd_errors
                .load(std::sync::atomic::Ordering::Relaxed);
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    // The snapshot in force is the last good one, not an empty view.
    let current = b.controller.snapshots.borrow().clone().unwrap();
    assert_eq!(current.version_info(), at_kill);
    assert_eq!(
        remote_healthy(current.inputs.snapshot().services.iter(), "aws"),
        Some(3)
    );
    // A proxy connecting now is served that view.
    let mut late = Stream::open(&b, svid.clone(), "").await.unwrap();
    let served = late.next().await;
    assert_eq!(served.version_info, at_kill);
    // A local change while etcd is down still reaches aws's own proxies...
    fedmesh_test_support::write_atomically(&a.registry, registry_doc(1)).unwrap();
    let snaps = a.controller.snapshots.clone();
    eventually(
        "aws's local view to change during the outage",
        Duration::from_secs(10),
        || {
            let local_healthy = snaps.borrow().as_ref().map(|s| {
                s.inputs
                    .snapshot()
                    .services
                    .first()
                    .map_or(0, |svc| svc.local.iter().filter(|e| e.healthy).count())
            });
            async move { (local_healthy == Some(1)).then_some(()) }
        },
    )
    .await;

    // ...and reaches gcp once etcd is back.
    etcd.restart().await.unwrap();
    s.until(|m| remote_healthy(m.services.values(), "aws") == Some(1))
        .await;
}

#[tokio::test]
async fn admin_port_reports_readiness_and_metrics() {
    let etcd = Etcd::start().await.unwrap();
    let a = cluster(&etcd, "aws", 1, &registry_doc(3)).await;
    let addr = a.controller.admin_addr.unwrap();
    let get = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/live").await.starts_with("HTTP/1.1 200"));
    eventually("/ready", Duration::from_secs(10), || async {
        get("/ready")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    let metrics = get("/metrics").await;
    for name in [
        "fedmesh_controller_watch_events_total",
        "fedmesh_controller_etcd_errors_total",
        "fedmesh_controller_discovery_pushes_total",
        "fedmesh_controller_discovery_connected_clients",
        "fedmesh_controller_watch_lag_revisions",
        // Zero without --kube, but always exposed.
        "fedmesh_controller_kube_watch_errors_total 0",
        "fedmesh_controller_kube_imports_written_total 0",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    let _ = a.name;
}

#[tokio::test]
async fn a_local_source_that_goes_away_leaves_the_mesh_following_the_global_zone() {
    // Regression: the mesh builder used to stop when its local source's
    // sender was dropped, so no snapshot was ever published.
    let etcd = Etcd::start().await.unwrap();
    let (tx, rx) = watch::channel(Arc::new(fedmesh_api::LocalServices::new()));
    drop(tx);
    let b = cluster_with(&etcd, "gcp", 2, "", Some(LocalSource::Channel(rx)), |_| {}).await;
    let _a = cluster(&etcd, "aws", 1, &registry_doc(3)).await;
    let snaps = b.controller.snapshots.clone();
    eventually(
        "aws's export in gcp's snapshot",
        Duration::from_secs(15),
        || {
            let h = snaps
                .borrow()
                .as_ref()
                .and_then(|s| remote_healthy(s.inputs.snapshot().services.iter(), "aws"));
            async move { (h == Some(3)).then_some(()) }
        },
    )
    .await;
}

/// A CA staged in the join directory, as `fedmesh rotate-ca` stages it, is
/// taken up by the running controller: the cluster's bundle in the global
/// zone gains the new root at once; Certify signs with the old root until
/// the propagation delay has passed and with the new one after; then the
/// join directory's CA is the new one, for a controller that restarts.
#[tokio::test]
async fn a_staged_ca_is_published_then_signs_and_becomes_the_join_directorys_ca() {
    let etcd = Etcd::start().await.unwrap();
    let c = cluster(&etcd, "aws", 44, &registry_doc(1)).await;
    let join = c._dir.path().join("join");
    let next = ClusterCa::generate(&c.td, &CaOptions::default(), SystemTime::now()).unwrap();
    let web = SpiffeId::workload(&c.td, "shop", "web").unwrap();
    let signed_by = |svid: &Svid, root: &CertificateDer<'static>| {
        let mut only = BundleSet::new();
        only.insert(Bundle::with_roots(c.td.clone(), [root.clone()]));
        only.reverify(svid.chain(), SystemTime::now(), Usage::Client)
            .is_ok()
    };
    let old_root = c.ca_bundle.roots()[0].clone();
    let new_root = next.cert_der().clone();

    JoinDir::stage_rotation(&join, &next, Duration::from_secs(3)).unwrap();
    let mut kv = etcd.client().await.unwrap();
    let key = KeySpace::default().bundle(c.td.as_str());
    eventually(
        "the bundle in etcd has both roots",
        Duration::from_secs(10),
        || {
            let (mut kv, key, td, old_root) =
                (kv.clone(), key.clone(), c.td.clone(), old_root.clone());
            async move {
                let resp = kv.get(key.as_str(), None).await.ok()?;
                let raw = resp.kvs().first()?.value().to_vec();
                let b = signed_by_root(td.as_str(), &key, &raw, &old_root)?;
                (b.roots().len() == 2).then_some(())
            }
        },
    )
    .await;
    // Published, not signing yet.
    let during = certify(&c, TOKEN, &web).await.unwrap();
    assert!(signed_by(&during, &old_root) && !signed_by(&during, &new_root));

    eventually(
        "Certify signs with the new root",
        Duration::from_secs(15),
        || {
            let (c, web, new_root) = (&c, web.clone(), new_root.clone());
            async move {
                let svid = certify(c, TOKEN, &web).await.ok()?;
                let mut only = BundleSet::new();
                only.insert(Bundle::with_roots(c.td.clone(), [new_root]));
                only.reverify(svid.chain(), SystemTime::now(), Usage::Client)
                    .ok()
                    .map(drop)
            }
        },
    )
    .await;
    eventually(
        "the join directory's CA is the new one",
        Duration::from_secs(5),
        || {
            let (join, td, new_root) = (join.clone(), c.td.clone(), new_root.clone());
            async move {
                let ca = ClusterCa::load(&join.join("ca"), &td).ok()?;
                (ca.cert_der() == &new_root).then_some(())
            }
        },
    )
    .await;
    // The old root stays published while leaves it signed live.
    let resp = kv.get(key.as_str(), None).await.unwrap();
    let raw = resp.kvs()[0].value().to_vec();
    // Signed by the root readers trusted when it was published: the old one.
    let b = signed_by_root(c.td.as_str(), &key, &raw, &old_root)
        .expect("the bundle is signed by the old root");
    assert!(signed_by_root(c.td.as_str(), &key, &raw, &new_root).is_none());
    assert!(b.roots().contains(&old_root) && b.roots().contains(&new_root));
}

/// The bundle stored at `key`, if `root` signed it (what a reader that
/// trusts `root` believes).
fn signed_by_root(
    td: &str,
    key: &str,
    raw: &[u8],
    root: &CertificateDer<'static>,
) -> Option<Bundle> {
    let trusted = [fedmesh_seal::root_keyid(root)?];
    let subject = key.strip_prefix(KeySpace::default().prefix())?;
    let opened = fedmesh_seal::open_by_root::<serde_json::Value>(
        raw,
        subject,
        &trusted,
        std::slice::from_ref(root),
    )
    .ok()?;
    let doc = serde_json::to_vec(&opened.value?).ok()?;
    Bundle::from_document(TrustDomain::new(td).ok()?, &doc, key).ok()
}

/// `fedmesh deregister cluster gcp`: aws's controller stops trusting gcp's
/// root (the bundle set its TLS and its clients verify with), though the
/// deregistration's raw delete of the bundle is, like any raw delete, not
/// what it obeys: the signed deletion of the record is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_deregistration_revokes_the_clusters_root() {
    let etcd = Etcd::start().await.unwrap();
    let aws = cluster(&etcd, "aws", 46, &registry_doc(1)).await;
    let gcp = cluster(&etcd, "gcp", 47, &registry_doc(1)).await;
    let mut bundles = aws.controller.bundles.clone();
    bundles
        .wait_for(|b| b.get(&gcp.td).is_some())
        .await
        .unwrap();
    GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .with_anchor(fedmesh_test_support::anchor())
        .deregister("gcp")
        .await
        .unwrap();
    // Revocation's bound: within a second.
    tokio::time::timeout(
        Duration::from_secs(1),
        bundles.wait_for(|b| b.get(&gcp.td).is_none()),
    )
    .await
    .expect("gcp's root is still trusted a second after its deregistration")
    .unwrap();
}

/// The zone loses aws's record and bundle (a raw delete, an etcd wiped or
/// restored from an old backup): aws's controller writes both back, signed
/// as before, within a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_writes_back_its_record_and_bundle_when_the_zone_loses_them() {
    let etcd = Etcd::start().await.unwrap();
    let c = cluster(&etcd, "aws", 45, &registry_doc(1)).await;
    let keys = KeySpace::default();
    let (ck, bk) = (keys.cluster("aws"), keys.bundle(c.td.as_str()));
    let mut kv = etcd.client().await.unwrap();
    let record = kv.get(ck.as_str(), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    kv.delete(ck.as_str(), None).await.unwrap();
    kv.delete(bk.as_str(), None).await.unwrap();
    let root = c.ca_bundle.roots()[0].clone();
    eventually(
        "aws's record and bundle back",
        Duration::from_secs(70),
        || {
            let (mut kv, ck, bk, root) = (kv.clone(), ck.clone(), bk.clone(), root.clone());
            let (td, record) = (c.td.clone(), record.clone());
            async move {
                let back = kv
                    .get(ck.as_str(), None)
                    .await
                    .ok()?
                    .kvs()
                    .first()?
                    .value()
                    .to_vec();
                let raw = kv
                    .get(bk.as_str(), None)
                    .await
                    .ok()?
                    .kvs()
                    .first()?
                    .value()
                    .to_vec();
                let bundle = signed_by_root(td.as_str(), &bk, &raw, &root)?;
                (back == record && bundle.roots() == [root]).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_expire_are_revoked_and_spent_and_renewal_takes_the_svid() {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    let td = TrustDomain::new("gcp.fedmesh.test").unwrap();
    let web = SpiffeId::workload(&td, "shop", "web").unwrap();
    let db = SpiffeId::workload(&td, "shop", "db").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let (single, long, short) = TokensFile::update(&file, |f| {
        Ok((
            f.create(web.clone(), DEFAULT_TTL, true, now)?,
            f.create(web.clone(), DEFAULT_TTL, false, now)?,
            f.create(web.clone(), Duration::from_secs(2), false, now)?,
        ))
    })
    .unwrap();
    let tokens = Tokens::from_file(file.clone()).unwrap();
    let b = cluster_with(&etcd, "gcp", 2, "", None, |c| c.tokens = tokens).await;

    // Single-use: once, and the file says so.
    let svid = certify(&b, &single, &web).await.unwrap();
    let again = certify(&b, &single, &web).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(
        again.message().contains("single-use"),
        "{}",
        again.message()
    );
    let on_disk = TokensFile::load(&file).unwrap();
    assert!(on_disk.tokens[0].used_at.is_some());

    // Renewal presents the SVID, no token, and gets only its own identity.
    let renewed = renew(&b, &svid, &web).await.unwrap();
    assert_eq!(renewed.spiffe_id(), &web);
    assert!(renewed.not_after() >= svid.not_after());
    let other = renew(&b, &svid, &db).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::PermissionDenied);

    // Expired: refused, saying when.
    eventually("the short token to expire", Duration::from_secs(10), || {
        let f = TokensFile::load(&file).unwrap();
        let expired = f.admit(&short, time::OffsetDateTime::now_utc()).is_err();
        async move { expired.then_some(()) }
    })
    .await;
    let expired = certify(&b, &short, &web).await.unwrap_err();
    assert!(
        expired.message().contains("expired at"),
        "{}",
        expired.message()
    );

    // Revoked: the controller re-reads the file, no restart.
    certify(&b, &long, &web).await.unwrap();
    let id = TokensFile::load(&file).unwrap().tokens[1].id().to_owned();
    TokensFile::update(&file, |f| f.revoke(&id)).unwrap();
    eventually("the revocation to take", Duration::from_secs(10), || {
        let (b, long, web) = (&b, long.clone(), web.clone());
        async move {
            match certify(b, &long, &web).await {
                Err(e) if e.message().contains("unknown join token") => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_client_renews_by_its_svid_after_its_single_use_token_is_spent() {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    let td = TrustDomain::new("gcp.fedmesh.test").unwrap();
    let web = SpiffeId::workload(&td, "shop", "web").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let token =
        TokensFile::update(&file, |f| f.create(web.clone(), DEFAULT_TTL, true, now)).unwrap();
    let tokens = Tokens::from_file(file).unwrap();
    let b = cluster_with(&etcd, "gcp", 2, "", None, |c| {
        c.tokens = tokens;
        // Renewed at half-life: every 2 s.
        c.svid = fedmesh_trust::SvidPolicy {
            lifetime: Duration::from_secs(4),
            clock_skew: Duration::ZERO,
        };
    })
    .await;
    let access = fedmesh_discovery::ControllerAccess {
        address: b.controller.discovery_addr,
        controller: SpiffeId::controller(&td, "gcp").unwrap(),
        identity: web.clone(),
        credential: fedmesh_discovery::Credential::JoinToken(token),
        node: "web".into(),
    };
    let mut bootstrap = BundleSet::new();
    bootstrap.insert(b.ca_bundle.clone());
    let client = fedmesh_discovery::start(
        access,
        bootstrap,
        fedmesh_discovery::ClientPolicy::default(),
        |_: &MeshState, _: &BundleSet| Ok(()),
    )
    .await
    .unwrap();
    let first = client.svid.borrow().not_after();
    // Two renewals: the token was spent by the first SVID, so both present
    // the SVID held.
    let mut svid = client.svid.clone();
    eventually("two renewals", Duration::from_secs(20), || {
        let latest = svid.borrow_and_update().not_after();
        async move { (latest >= first + Duration::from_secs(3)).then_some(()) }
    })
    .await;
    assert_eq!(client.svid.borrow().spiffe_id(), &web);
    let stats = &b.controller.metrics.discovery;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert!(load(&stats.certified) >= 3, "one join and two renewals");
    // A renewal by the spent token would have been refused.
    assert_eq!(load(&stats.certify_refused), 0);
}

// --- On Kubernetes, against test-support's FakeKube (a fake API server:
// there is no real one on these machines) and a real etcd.

fn kube_options(fake: &FakeKube, clusterset_ip: &str) -> KubeOptions {
    KubeOptions {
        client: kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap(),
        clusterset_ip: Some(clusterset_ip.parse().unwrap()),
        gateway_account: Some(fedmesh_kube::ServiceAccount {
            namespace: "fedmesh-system".into(),
            name: "fedmesh-gateway".into(),
        }),
    }
}

/// `(ports, clusters, ips)` of a ServiceImport in `fake`.
fn service_import(fake: &FakeKube, ns: &str, name: &str) -> Option<(String, String, String)> {
    let i = fake.get("serviceimports", ns, name)?;
    Some((
        i["spec"]["ports"].to_string(),
        i["status"]["clusters"].to_string(),
        i["spec"]["ips"].to_string(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_export_in_one_cluster_reaches_etcd_and_anothers_proxies_and_imports() {
    let etcd = Etcd::start().await.unwrap();
    let (kube_a, kube_b) = (
        FakeKube::start("127.0.1.60", Duration::from_millis(500))
            .await
            .unwrap(),
        FakeKube::start("127.0.2.60", Duration::from_millis(500))
            .await
            .unwrap(),
    );
    kube_a.put(&kube_objects::service("shop", "cart", 8080));
    // cart's pods: two in az1, one in az2.
    let cart_pods = |az1_ready: bool| {
        kube_objects::slice(
            "shop",
            "cart-1",
            "cart",
            9376,
            &[
                ("10.1.0.1", "az1", az1_ready),
                ("10.1.0.2", "az1", az1_ready),
                ("10.1.0.3", "az2", true),
            ],
        )
    };
    kube_a.put(&cart_pods(true));
    kube_b.add_namespace("shop");
    // aws runs on Kubernetes alone; gcp has a file registry beside it.
    let a = cluster_with(&etcd, "aws", 1, "", Some(LocalSource::None), |c| {
        c.kube = Some(kube_options(&kube_a, "127.0.1.99"));
    })
    .await;
    let b = cluster_with(&etcd, "gcp", 2, "", None, |c| {
        c.kube = Some(kube_options(&kube_b, "127.0.2.99"));
    })
    .await;
    let web = SpiffeId::workload(&b.td, "shop", "web").unwrap();
    let mut s = Stream::open(&b, certify(&b, TOKEN, &web).await.unwrap(), "")
        .await
        .unwrap();

    // Exported by its ServiceExport: in etcd as a summary (no pod
    // address), in gcp's discovery stream, and as a ServiceImport in gcp.
    kube_a.put(&kube_objects::export("shop", "cart"));
    s.until(|m| remote_healthy(m.services.values(), "aws") == Some(3))
        .await;
    let client = etcd.client().await.unwrap();
    // aws's export summaries, as etcd holds them.
    let aws_exports = || {
        let mut client = client.clone();
        async move {
            let prefix = Some(etcd_client::GetOptions::new().with_prefix());
            let r = client
                .get(KeySpace::default().exports_of("aws"), prefix)
                .await
                .unwrap();
            r.kvs()
                .iter()
                .map(|kv| kv.value_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let summaries = aws_exports().await;
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0];
    assert!(
        summary.contains("az1") && !summary.contains("10.1.0."),
        "{summary}"
    );
    // Its spec and its status are two writes: wait for both.
    let import = eventually("gcp's ServiceImport", Duration::from_secs(30), || async {
        service_import(&kube_b, "shop", "cart").filter(|i| i.1 != "null")
    })
    .await;
    assert_eq!(
        import,
        (
            r#"[{"port":8080,"protocol":"TCP"}]"#.into(),
            r#"[{"cluster":"aws"}]"#.into(),
            r#"["127.0.2.99"]"#.into()
        )
    );
    let valid = eventually("aws's Valid condition", Duration::from_secs(30), || async {
        kube_objects::condition(&kube_a, "shop", "cart", "Valid")
    })
    .await;
    assert_eq!(valid.0, "True");

    // A zone's pods turn not-ready: the summary and gcp's view follow.
    kube_a.put(&cart_pods(false));
    s.until(|m| remote_healthy(m.services.values(), "aws") == Some(1))
        .await;

    // gcp's file registry exports the same service on another port: aws's
    // ServiceExport says so, and gcp's import lists gcp only.
    fedmesh_test_support::write_atomically(
        &b.registry,
        registry_doc(3).replace("[8080]", "[9090]"),
    )
    .unwrap();
    let conflict = eventually(
        "aws's Conflict condition",
        Duration::from_secs(30),
        || async {
            kube_objects::condition(&kube_a, "shop", "cart", "Conflict").filter(|c| c.0 == "True")
        },
    )
    .await;
    assert!(conflict.2.contains("gcp"), "{}", conflict.2);
    eventually(
        "gcp's import, its own cluster only",
        Duration::from_secs(30),
        || async {
            service_import(&kube_b, "shop", "cart").filter(|i| i.1 == r#"[{"cluster":"gcp"}]"#)
        },
    )
    .await;
    fedmesh_test_support::write_atomically(&b.registry, "").unwrap();
    eventually("the conflict cleared", Duration::from_secs(30), || async {
        kube_objects::condition(&kube_a, "shop", "cart", "Conflict").filter(|c| c.0 == "False")
    })
    .await;

    // Deleting the ServiceExport withdraws it everywhere.
    assert!(kube_a.delete("serviceexports", "shop", "cart"));
    s.until(|m| remote_healthy(m.services.values(), "aws").is_none())
        .await;
    eventually(
        "gcp's ServiceImport deleted",
        Duration::from_secs(30),
        || async {
            service_import(&kube_b, "shop", "cart")
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(
        aws_exports().await.is_empty(),
        "the export summary is deleted"
    );
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (ka, kb) = (&a.controller.metrics.kube, &b.controller.metrics.imports);
    assert!(
        load(&ka.listings) >= 3 && load(&ka.status_writes) >= 3,
        "{ka:?}"
    );
    assert!(load(&kb.written) >= 2, "{kb:?}");
    // Counted once the API server's answer is back.
    eventually("the deletion counted", Duration::from_secs(10), || async {
        (load(&kb.deleted) >= 1).then_some(())
    })
    .await;
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_takes_a_service_account_token_that_the_api_server_vouches_for() {
    let etcd = Etcd::start().await.unwrap();
    let kube = FakeKube::start("127.0.2.61", Duration::from_secs(1))
        .await
        .unwrap();
    kube.add_token("sa-web", "system:serviceaccount:shop:web", &["fedmesh"]);
    kube.add_token("sa-vault", "system:serviceaccount:shop:web", &["vault"]);
    let b = cluster_with(&etcd, "gcp", 2, "", None, |c| {
        c.kube = Some(kube_options(&kube, "127.0.2.99"));
    })
    .await;
    let web = SpiffeId::workload(&b.td, "shop", "web").unwrap();
    let admin = SpiffeId::workload(&b.td, "shop", "admin").unwrap();
    let svid = certify_by_account(&b, "sa-web", &web).await.unwrap();
    assert_eq!(svid.spiffe_id(), &web);

    for (token, id, why) in [
        ("sa-web", &admin, "sa/admin"),
        ("sa-vault", &web, "audience"),
        ("forged", &web, "invalid bearer token"),
    ] {
        let err = certify_by_account(&b, token, id).await.unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{token}: {err:?}"
        );
        assert!(err.message().contains(why), "{token}: {}", err.message());
    }
    // The gateways' ServiceAccount is issued the gateway identity, and only that.
    kube.add_token(
        "sa-gw",
        "system:serviceaccount:fedmesh-system:fedmesh-gateway",
        &["fedmesh"],
    );
    let gateway = SpiffeId::gateway(&b.td, "gcp").unwrap();
    let svid = certify_by_account(&b, "sa-gw", &gateway).await.unwrap();
    assert_eq!(svid.spiffe_id(), &gateway);
    let as_workload = SpiffeId::workload(&b.td, "fedmesh-system", "fedmesh-gateway").unwrap();
    let err = certify_by_account(&b, "sa-gw", &as_workload)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let reviews = kube
        .stats()
        .token_reviews
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(reviews >= 6, "{reviews}");

    // The data plane's own client, reading the token from a file as the
    // projected volume leaves it.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "sa-web\n").unwrap();
    let access = fedmesh_discovery::ControllerAccess {
        address: b.controller.discovery_addr,
        controller: SpiffeId::controller(&b.td, "gcp").unwrap(),
        identity: web.clone(),
        credential: fedmesh_discovery::Credential::ServiceAccountToken(token_file),
        node: "web".into(),
    };
    let svid = fedmesh_discovery::certify(&access, own_bundles(&b), None)
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id(), &web);

    // A controller without --kube refuses such tokens, saying why.
    let c = cluster(&etcd, "azure", 3, "").await;
    let err = certify_by_account(
        &c,
        "sa-web",
        &SpiffeId::workload(&c.td, "shop", "web").unwrap(),
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("--kube"), "{}", err.message());
}

/// `c`'s controller stopped and started again on its join directory,
/// with `state_dir` as its `--state-dir`.
async fn restart(c: &mut Cluster, state_dir: Option<PathBuf>) {
    let join_dir = c._dir.path().join("join");
    let join = JoinDir::load(&join_dir).unwrap();
    let source = LocalSource::File {
        path: c.registry.clone(),
        poll: Duration::from_millis(20),
    };
    let addr = format!("127.0.{}.2:0", c.n).parse().unwrap();
    let mut config = ControllerConfig::new(join, source, addr);
    config.join_dir = Some(join_dir);
    config.state_dir = state_dir;
    config.watcher = WatcherConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        save_every: Duration::from_millis(50),
        ..Default::default()
    };
    let old = std::mem::replace(&mut c.controller, Controller::start(config).await.unwrap());
    old.shutdown().await;
}

/// Whether `c` serves gcp's shop/cart in its first mesh built on a listing
/// of etcd (a view from disk alone has revision 0).
async fn serves_gcp_cart_after_listing(c: &Cluster) -> bool {
    let snaps = c.controller.snapshots.clone();
    eventually(
        "a mesh built on etcd's listing",
        Duration::from_secs(15),
        || {
            let s = snaps.borrow().clone();
            async move { s.filter(|s| s.inputs.global.revision() > 0) }
        },
    )
    .await
    .inputs
    .global
    .export("gcp", "shop", "cart")
    .is_some()
}

/// etcd is wiped while gcp's controller is away (so nothing heals it):
/// aws's controller restarted with its state directory still serves gcp's
/// service, from its last good view on disk, judged again by its gate;
/// restarted without one, it serves nothing of gcp (what the state
/// directory is for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restarted_on_a_wiped_zone_keeps_what_it_believed() {
    let mut etcd = Etcd::start().await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let gcp = cluster(&etcd, "gcp", 51, &registry_doc(2)).await;
    let mut aws = cluster(&etcd, "aws", 52, "").await;
    restart(&mut aws, Some(state.path().to_path_buf())).await;
    let file = state
        .path()
        .join(fedmesh_controller::controller::LAST_GOOD_FILE);
    let cart = KeySpace::default().export("gcp", "shop", "cart");
    eventually(
        "gcp's cart in aws's last good view",
        Duration::from_secs(15),
        || {
            let holds = std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&cart));
            async move { holds.then_some(()) }
        },
    )
    .await;
    assert!(serves_gcp_cart_after_listing(&aws).await);
    gcp.controller.shutdown().await;

    // A new, empty etcd on the same address.
    etcd.wipe().await.unwrap();
    let mut kv = etcd.client().await.unwrap();
    let listed = kv
        .get(
            KeySpace::default().prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(listed.kvs().len(), 0, "etcd is empty");

    restart(&mut aws, None).await;
    assert!(
        !serves_gcp_cart_after_listing(&aws).await,
        "without its state directory, aws starts from the empty etcd"
    );
    restart(&mut aws, Some(state.path().to_path_buf())).await;
    assert!(
        serves_gcp_cart_after_listing(&aws).await,
        "with it, aws keeps serving gcp's cart"
    );
}

/// After aws's CA rotation is over (the old root gone from its bundle, the
/// bundle signed by the new one), a reader that has never seen aws's bundle
/// trusts only the first root, pinned in aws's record, and still believes
/// it: the old root's endorsement of the new one, kept in the join
/// directory when the rotation was staged, travels with the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_reader_believes_a_bundle_whose_pinned_root_has_rotated_away() {
    let etcd = Etcd::start().await.unwrap();
    let c = cluster_with(&etcd, "aws", 53, &registry_doc(1), None, |config| {
        config.svid = fedmesh_trust::SvidPolicy {
            lifetime: Duration::from_secs(3),
            clock_skew: Duration::ZERO,
        };
    })
    .await;
    let join = c._dir.path().join("join");
    let next = ClusterCa::generate(&c.td, &CaOptions::default(), SystemTime::now()).unwrap();
    JoinDir::stage_rotation(&join, &next, Duration::from_secs(1)).unwrap();
    let new_root = next.cert_der().clone();
    let kv = etcd.client().await.unwrap();
    let key = KeySpace::default().bundle(c.td.as_str());
    eventually(
        "the bundle holds the new root alone, signed by it",
        Duration::from_secs(30),
        || {
            let (mut kv, key, td, new_root) =
                (kv.clone(), key.clone(), c.td.clone(), new_root.clone());
            async move {
                let resp = kv.get(key.as_str(), None).await.ok()?;
                let raw = resp.kvs().first()?.value().to_vec();
                let b = signed_by_root(td.as_str(), &key, &raw, &new_root)?;
                (b.roots() == [new_root]).then_some(())
            }
        },
    )
    .await;
    let mut fresh = GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .with_anchor(fedmesh_test_support::anchor());
    let believed = fresh.believed().await.unwrap();
    assert!(
        !believed.refused.contains_key(&key),
        "{:?}",
        believed.refused
    );
    let bundles = believed.bundles().unwrap();
    assert!(
        bundles
            .iter()
            .any(|b| b.trust_domain() == &c.td && b.roots() == [new_root.clone()]),
        "{bundles:?}"
    );
}
