//! Policy convergence: `fedmesh apply` of one policy (the same read and
//! revision-guarded transaction the command makes) until a discovery
//! client of every one of 10 clusters, each behind its own real
//! controller, has received the service carrying the new policy and sent
//! its ACK. Also what each update carried: a policy change must resend the
//! one service it names, not the mesh. Side by side, in the same run: a
//! bare etcd put → watch event.
//!
//! Run: `cargo bench -p fedmesh-controller --bench policy`
//! (APPLIES=200 CLUSTERS=10 SERVICES=1000 by default).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use fedmesh_api::policy::parse_documents;
use fedmesh_api::{KeySpace, ServiceKey};
use fedmesh_controller::controller::{Controller, ControllerConfig, LocalSource};
use fedmesh_controller::tokens::Tokens;
use fedmesh_discovery::MeshState;
use fedmesh_proto::discovery::v1 as pb;
use fedmesh_test_support::Etcd;
use fedmesh_trust::{SpiffeId, TrustDomain};
use fedmesh_zone::TokensFile;
use fedmesh_zone::{GlobalZone, PolicyChange};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};

fn env(name: &str, default: usize) -> usize {
    fedmesh_test_support::env_or(name, default)
}

/// One client's stream: requests out, responses in, its mesh state.
struct Client {
    tx: mpsc::Sender<pb::DiscoveryRequest>,
    rx: tonic::Streaming<pb::DiscoveryResponse>,
    state: MeshState,
}

impl Client {
    /// Takes one response, applies it and ACKs it; returns how many
    /// services it carried.
    async fn step(&mut self) -> usize {
        let r = tokio::time::timeout(Duration::from_secs(60), self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        self.state.apply(&r).unwrap();
        self.tx
            .send(pb::DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        r.snapshot.map_or(0, |s| s.services.len())
    }

    fn retries_of(&self, svc: &ServiceKey) -> Option<u32> {
        let p = fedmesh_discovery::service_policy(self.state.services.get(svc)?).ok()??;
        p.retries
    }
}

fn policy(retries: u32) -> fedmesh_api::policy::GlobalTrafficPolicy {
    let doc = format!(
        "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {{name: svc-0}}\nspec:\n  service: bench/svc-0\n  retries: {retries}\n  weights: {{c0: 90, c1: 10}}\n  requestTimeout: 5s\n"
    );
    parse_documents(&doc, "bench").unwrap().remove(0)
}

#[tokio::main]
async fn main() {
    fedmesh_trust::install_default_provider();
    let applies = env("APPLIES", 200);
    let clusters = env("CLUSTERS", 10).max(2);
    let services = env("SERVICES", 1000);

    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await.unwrap();
    let token = "bench-token-0123456789abcdef0123456789".to_string();
    let mut controllers = Vec::new();
    let mut streams = Vec::new();
    for n in 0..clusters {
        let name = format!("c{n}");
        let join = register(&client, &etcd.endpoint(), &name, n).await;
        let td = TrustDomain::new(&join.cluster.trust_domain).unwrap();
        let root = join.ca.cert_der().clone();
        let local = watch::channel(local_services(services, None)).1;
        let ip = 1 + n % 250;
        let mut cfg = ControllerConfig::new(
            join,
            LocalSource::Channel(local),
            format!("127.0.{ip}.2:0").parse().unwrap(),
        );
        cfg.tokens = Tokens::fixed(TokensFile::granting(
            [(
                token.as_str(),
                SpiffeId::workload(&td, "bench", "client").unwrap(),
            )],
            Duration::from_secs(3600),
        ));
        let c = Controller::start(cfg).await.unwrap();
        let (tx, rx) = discovery_client(c.discovery_addr, &td, root, token.clone()).await;
        streams.push(Client {
            tx,
            rx,
            state: MeshState::default(),
        });
        controllers.push(c);
    }

    // Every client holds the whole mesh: every service, from every cluster.
    let setup = Instant::now();
    for s in &mut streams {
        loop {
            s.step().await;
            let complete = s.state.services.len() == services
                && s.state
                    .services
                    .values()
                    .all(|v| v.remote.len() == clusters - 1);
            if complete {
                break;
            }
            assert!(
                setup.elapsed() < Duration::from_secs(300),
                "view never completed"
            );
        }
    }
    println!(
        "policy: {clusters} clusters x {services} services, every client in sync after {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let svc = ServiceKey::new("bench", "svc-0");
    // The operator's handle: every policy signed by the federation anchor,
    // which each controller's join directory pins.
    let mut zone = GlobalZone::new(client.clone(), KeySpace::default())
        .with_anchor(fedmesh_test_support::anchor());
    let mut hist = Histogram::<u64>::new(3).unwrap();
    let mut carried = Histogram::<u64>::new(3).unwrap();
    let started = Instant::now();
    for i in 0..applies {
        let retries = (i % 5) as u32;
        let t0 = Instant::now();
        // What `fedmesh apply` does: read every policy, write in one txn.
        let read = zone.policies().await.unwrap();
        zone.write_policies(&read, &[PolicyChange::Put(Box::new(policy(retries)))])
            .await
            .unwrap();
        // Every client of every cluster: until it has the new policy (and
        // has ACKed the response that brought it).
        // Responses wait in each stream until read, so reading the
        // clients in turn still lets them all converge at once.
        let mut seen = Vec::with_capacity(streams.len());
        for s in &mut streams {
            let mut services_seen = 0;
            while s.retries_of(&svc) != Some(retries) {
                services_seen += s.step().await;
            }
            seen.push(services_seen);
        }
        hist.record(t0.elapsed().as_micros() as u64).unwrap();
        for n in seen {
            carried.record(n as u64).unwrap();
        }
    }
    let run_time = started.elapsed();

    // Baseline: a bare etcd put → watch event, same etcd, same run.
    let raw = bare_put_watch(&mut client, applies).await;

    let (f50, f99) = (percentile(&hist, 0.50), percentile(&hist, 0.99));
    let (r50, r99) = (percentile(&raw, 0.50), percentile(&raw, 0.99));
    println!("{applies} applies in {:.1} s", run_time.as_secs_f64());
    println!("| path | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|");
    println!(
        "| fedmesh apply (read + txn) -> etcd -> {clusters} controllers -> a client of each has it and ACKed | {f50:.2} | {f99:.2} |"
    );
    println!("| bare etcd put -> watch event | {r50:.2} | {r99:.2} |");
    println!("| ratio | {:.1}x | {:.1}x |", f50 / r50, f99 / r99);
    println!(
        "services carried per client per apply: max {} (of {services} in the mesh)",
        carried.max()
    );
    println!(
        "goal: p99 <= 50 ms: {}",
        if f99 <= 50.0 { "met" } else { "NOT met" }
    );
    drop(controllers);
}
