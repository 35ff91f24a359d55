//! Shared set-up for the controller benchmarks.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Client, Txn, TxnOp};
use fedmesh_api::{ClusterRecord, Endpoint, KeySpace, LocalService, LocalServices, ServiceKey};
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, TrustDomain};
use fedmesh_zone::GlobalZone;
use fedmesh_zone::join::{EtcdAccess, JoinDir};

pub fn record(name: &str, n: usize) -> ClusterRecord {
    ClusterRecord {
        name: name.into(),
        cloud: format!("cloud{}", n % 3),
        region: format!("region{}", n % 7),
        zones: vec!["az1".into(), "az2".into()],
        trust_domain: format!("{name}.fedmesh.bench"),
        gateways: vec![format!("127.0.{}.1:15443", 1 + n % 250).parse().unwrap()],
        labels: BTreeMap::new(),
        registered_at: time::OffsetDateTime::now_utc(),
        egress: Default::default(),
    }
}

/// Registers a cluster and returns its join directory contents.
pub async fn register(client: &Client, endpoint: &str, name: &str, n: usize) -> JoinDir {
    let rec = record(name, n);
    let td = TrustDomain::new(&rec.trust_domain).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    GlobalZone::new(client.clone(), KeySpace::default())
        .with_anchor(fedmesh_test_support::anchor())
        .register(&rec, &ca)
        .await
        .unwrap();
    JoinDir {
        cluster: rec,
        etcd: EtcdAccess {
            endpoints: vec![endpoint.into()],
            prefix: KeySpace::default().prefix().into(),
            user: None,
            password: None,
            tls: None,
        },
        ca,
        anchor: Some(fedmesh_test_support::anchor().public()),
    }
}

pub fn summary(healthy: u32) -> String {
    serde_json::json!({
        "ports": [8080],
        "localities": [
            {"zone": "az1", "healthy": healthy, "total": 3, "weight": healthy},
            {"zone": "az2", "healthy": 3, "total": 3, "weight": 3}
        ],
        "generation": 1
    })
    .to_string()
}

/// Writes `services` exports for `cluster` straight into etcd, 128 per txn
/// (etcd's default limit of operations per transaction), unsigned: what a
/// federation from before signing holds.
pub async fn load_unsigned_exports(client: &mut Client, cluster: &str, services: usize) {
    let keys = KeySpace::default();
    let value = summary(3);
    let all: Vec<usize> = (0..services).collect();
    for chunk in all.chunks(128) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| {
                TxnOp::put(
                    keys.export(cluster, "bench", &format!("svc-{i}")),
                    value.clone(),
                    None,
                )
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
}

/// Signs a cluster's export manifests as its controller would.
pub struct Publisher {
    cluster: String,
    svid: fedmesh_trust::Svid,
    set: fedmesh_seal::ExportSet,
    seq: Option<u64>,
}

impl Publisher {
    /// The controller identity of `join`'s cluster, from its CA.
    pub fn new(join: &JoinDir) -> Self {
        let td = join.ca.trust_domain().clone();
        let id = fedmesh_trust::SpiffeId::controller(&td, &join.cluster.name).unwrap();
        let svid = join
            .ca
            .issue(
                &id,
                &fedmesh_trust::SvidPolicy::default(),
                SystemTime::now(),
            )
            .unwrap();
        Self {
            cluster: join.cluster.name.clone(),
            svid,
            set: Default::default(),
            seq: None,
        }
    }

    /// The put of `service`'s export with `value`, and the signed manifest
    /// that vouches for it: one transaction's operations.
    pub fn put(&mut self, service: &str, value: &str) -> Vec<TxnOp> {
        let keys = KeySpace::default();
        let digest = fedmesh_seal::value_digest(value.as_bytes());
        self.set.insert(format!("bench/{service}"), digest);
        let changes = BTreeMap::from([(
            format!("bench/{service}"),
            Some(fedmesh_seal::manifest::digest_hex(&digest)),
        )]);
        vec![
            TxnOp::put(keys.export(&self.cluster, "bench", service), value, None),
            self.manifest(changes),
        ]
    }

    fn manifest(&mut self, changes: BTreeMap<String, Option<String>>) -> TxnOp {
        let seq = fedmesh_seal::next_seq(SystemTime::now(), self.seq);
        let statement = fedmesh_seal::Statement {
            subject: format!("seen/{}", self.cluster),
            seq,
            value: Some(self.set.manifest(self.seq.unwrap_or(0), changes)),
            x5c: vec![],
            endorsements: vec![],
        };
        self.seq = Some(seq);
        let env = fedmesh_seal::seal(statement, fedmesh_seal::Signer::Svid(&self.svid)).unwrap();
        TxnOp::put(KeySpace::default().seen(&self.cluster), env.to_json(), None)
    }
}

/// Writes `services` exports for `join`'s cluster straight into etcd, 127
/// per txn, and then the manifest its controller signs for them all.
/// Returns the publisher, to sign later changes with.
pub async fn load_exports(client: &mut Client, join: &JoinDir, services: usize) -> Publisher {
    let mut publisher = Publisher::new(join);
    let keys = KeySpace::default();
    let value = summary(3);
    let digest = fedmesh_seal::value_digest(value.as_bytes());
    let all: Vec<usize> = (0..services).collect();
    for chunk in all.chunks(127) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| {
                let service = format!("svc-{i}");
                publisher.set.insert(format!("bench/{service}"), digest);
                TxnOp::put(
                    keys.export(&join.cluster.name, "bench", &service),
                    value.clone(),
                    None,
                )
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    let manifest = publisher.manifest(BTreeMap::new());
    client.txn(Txn::new().and_then([manifest])).await.unwrap();
    publisher
}

/// Registers a cluster as a federation from before signing did: plain
/// record and bundle.
pub async fn register_unsigned(client: &Client, endpoint: &str, name: &str, n: usize) -> JoinDir {
    let rec = record(name, n);
    let td = TrustDomain::new(&rec.trust_domain).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let keys = KeySpace::default();
    let bundle = Bundle::with_roots(td.clone(), [ca.cert_der().clone()]);
    let ops = [
        TxnOp::put(keys.cluster(name), serde_json::to_vec(&rec).unwrap(), None),
        TxnOp::put(keys.bundle(td.as_str()), bundle.to_document(), None),
    ];
    client.clone().txn(Txn::new().and_then(ops)).await.unwrap();
    JoinDir {
        cluster: rec,
        etcd: EtcdAccess {
            endpoints: vec![endpoint.into()],
            prefix: keys.prefix().into(),
            user: None,
            password: None,
            tls: None,
        },
        ca,
        anchor: None,
    }
}

/// `services` local services with three endpoints in az1 (`healthy` of them
/// healthy for service `flip`, all three elsewhere) and three in az2.
pub fn local_services(services: usize, flip: Option<(usize, usize)>) -> Arc<LocalServices> {
    let mut out = LocalServices::new();
    for i in 0..services {
        let healthy_az1 = match flip {
            Some((svc, h)) if svc == i => h,
            _ => 3,
        };
        let mut endpoints = Vec::with_capacity(6);
        for j in 0..6u16 {
            let zone = if j < 3 { "az1" } else { "az2" };
            endpoints.push(Endpoint {
                address: std::net::SocketAddr::from((
                    [127, 0, 1, 10],
                    20000 + (i as u16 % 4000) * 8 + j,
                )),
                zone: zone.into(),
                healthy: j >= 3 || (j as usize) < healthy_az1,
            });
        }
        out.insert(
            ServiceKey::new("bench", &format!("svc-{i}")),
            LocalService {
                ports: vec![8080],
                endpoints,
            },
        );
    }
    Arc::new(out)
}

pub fn percentile(h: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// A bare etcd put → watch event, `n` times on one key: the floor any
/// etcd-based design sits on.
pub async fn bare_put_watch(client: &mut Client, n: usize) -> hdrhistogram::Histogram<u64> {
    use etcd_client::{EventType, WatchOptions};
    let mut raw = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut ws = client
        .watch("/bench-raw/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    for i in 0..n {
        let t0 = std::time::Instant::now();
        client
            .put("/bench-raw/k", i.to_string(), None)
            .await
            .unwrap();
        loop {
            let m = ws.message().await.unwrap().unwrap();
            if m.events().iter().any(|e| e.event_type() == EventType::Put) {
                break;
            }
        }
        raw.record(t0.elapsed().as_micros() as u64).unwrap();
    }
    raw
}

/// The request side and the response side of a discovery stream.
pub type Stream = (
    tokio::sync::mpsc::Sender<pb::DiscoveryRequest>,
    tonic::Streaming<pb::DiscoveryResponse>,
);

/// A discovery client of the controller at `addr` (trust domain `td`,
/// root `root`), as a proxy is one: an SVID through `Certify` with `token`
/// (which the controller maps to `ns/bench/sa/client`), then the stream,
/// scope everything.
pub async fn discovery_client(
    addr: std::net::SocketAddr,
    td: &TrustDomain,
    root: rustls_pki_types::CertificateDer<'static>,
    token: String,
) -> Stream {
    use fedmesh_trust::{AllowAnyVerified, BundleSet, SpiffeId, Svid};
    use pb::discovery_client::DiscoveryClient;
    use tokio::sync::{mpsc, watch};
    let mut set = BundleSet::new();
    set.insert(Bundle::with_roots(td.clone(), [root]));
    let bundles = watch::channel(Arc::new(set)).1;
    let boot = fedmesh_trust::client_config_without_svid(
        bundles.clone(),
        Arc::new(AllowAnyVerified),
        &[b"h2"],
    )
    .unwrap();
    let ch = fedmesh_discovery::channel(addr, Arc::new(boot))
        .await
        .unwrap();
    let id = SpiffeId::workload(td, "bench", "client").unwrap();
    let (csr, key) = fedmesh_trust::certificate_request(&id).unwrap();
    let resp = DiscoveryClient::new(ch)
        .certify(pb::CertifyRequest {
            csr_der: csr,
            join_token: token,
            service_account_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let svid = Svid::new(resp.chain_der.into_iter().map(Into::into).collect(), key).unwrap();
    let svid_rx = watch::channel(Arc::new(svid)).1;
    let tls = fedmesh_trust::client_config(svid_rx, bundles, Arc::new(AllowAnyVerified), &[b"h2"])
        .unwrap();
    let ch = fedmesh_discovery::channel(addr, Arc::new(tls))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::DiscoveryRequest {
        node: format!("proxy/bench/{id}"),
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = DiscoveryClient::new(ch)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}
