//! Shared set-up for the controller benchmarks.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Client, Txn, TxnOp};
use fedmesh_api::{ClusterRecord, Endpoint, KeySpace, LocalService, LocalServices, ServiceKey};
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
    }
}

/// Registers a cluster and returns its join directory contents.
pub async fn register(client: &Client, endpoint: &str, name: &str, n: usize) -> JoinDir {
    let rec = record(name, n);
    let td = TrustDomain::new(&rec.trust_domain).unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    GlobalZone::new(client.clone(), KeySpace::default())
        .register(&rec, &Bundle::with_roots(td, [ca.cert_der().clone()]))
        .await
        .unwrap();
    JoinDir {
        cluster: rec,
        etcd: EtcdAccess {
            endpoints: vec![endpoint.into()],
            prefix: KeySpace::default().prefix().into(),
            user: None,
            password: None,
        },
        ca,
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
/// (etcd's default limit of operations per transaction).
pub async fn load_exports(client: &mut Client, cluster: &str, services: usize) {
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
