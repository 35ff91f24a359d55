//! `fedmesh status`: what runs, and how it is. [`observe`] asks (process
//! table, admin ports, the global zone); [`status_of`] judges what was
//! observed, without I/O, so that its rules are unit-tested.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::probe;
use super::state::{Proc, State};

/// A process's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Stopped (by `fedmesh stop`).
    Down,
    /// Started, and no longer running: it crashed or was killed.
    Dead,
    /// Running, but its `/ready` does not answer 200.
    NotReady,
    /// Running, and ready (or running, for one without an admin port).
    Up,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Down => "down",
            Health::Dead => "dead",
            Health::NotReady => "not ready",
            Health::Up => "up",
        }
    }
}

/// What [`observe`] saw.
#[derive(Debug, Default)]
pub struct Observed {
    /// By process name.
    pub health: HashMap<String, Health>,
    /// Backend processes still running.
    pub alive: HashSet<u32>,
    /// Each cluster's liveness in the global zone; empty when etcd did not
    /// answer.
    pub liveness: BTreeMap<String, fedmesh_api::Liveness>,
}

async fn health(s: &State, p: &Proc) -> Health {
    if p.pid == 0 {
        return Health::Down;
    }
    if !s.ours(p.pid) {
        return Health::Dead;
    }
    match p.admin {
        None => Health::Up,
        Some(admin) if probe::ready(admin).await => Health::Up,
        Some(_) => Health::NotReady,
    }
}

/// Looks at everything `s` lists.
pub async fn observe(s: &State, dir: &Path) -> Observed {
    let mut o = Observed {
        liveness: liveness(s, dir).await,
        ..Default::default()
    };
    for c in &s.clusters {
        for p in std::iter::once(&c.controller)
            .chain(&c.gateways)
            .chain(std::iter::once(&c.proxy))
        {
            o.health.insert(p.name.clone(), health(s, p).await);
        }
        o.alive.extend(
            c.backends
                .iter()
                .filter_map(|b| b.pid)
                .filter(|&p| s.ours(p)),
        );
    }
    o
}

/// What `status` reports of one cluster.
#[derive(Debug, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub cloud: String,
    pub region: String,
    /// `up`, `not ready` (from its `/ready`), `down` (stopped) or `dead`.
    pub controller: &'static str,
    pub gateways_up: usize,
    pub gateways: usize,
    pub proxy: SocketAddr,
    pub proxy_health: &'static str,
    /// The proxy's listener for each TCP service.
    pub proxy_tcp: BTreeMap<String, SocketAddr>,
    pub backends_up: usize,
    /// Started and no longer running (stopped ones are not dead).
    pub backends_dead: usize,
    pub backends: usize,
    pub services: BTreeMap<String, String>,
    /// `LIVE`, or `STALE` with its age, from the global zone; absent when
    /// etcd does not answer.
    pub liveness: Option<fedmesh_api::Liveness>,
}

/// Each cluster's liveness in the global zone; empty when etcd does not
/// answer within 2 s (status must work with etcd down).
pub async fn liveness(s: &State, dir: &Path) -> BTreeMap<String, fedmesh_api::Liveness> {
    let endpoints = s.etcd_endpoints();
    let read = async {
        let client = super::etcd::client(dir, &endpoints, Duration::from_secs(2))
            .await
            .ok()?;
        let anchor = dir
            .join(super::etcd::ANCHOR_DIR)
            .join(fedmesh_seal::ANCHOR_PUB_FILE);
        let trust = fedmesh_zone::gate::GateConfig {
            anchors: vec![fedmesh_seal::AnchorPublic::load(&anchor).ok()?],
            trust_unsigned: false,
            budget: Default::default(),
        };
        let mut zone = fedmesh_zone::GlobalZone::new(client, Default::default()).trusting(trust);
        let records = zone.clusters().await.ok()?;
        let live = zone
            .liveness(&records, time::OffsetDateTime::now_utc())
            .await
            .ok()?;
        Some(records.into_iter().map(|r| r.name).zip(live).collect())
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Each cluster's status from what was observed.
pub fn status_of(s: &State, o: &Observed) -> Vec<ClusterStatus> {
    let health = |p: &Proc| o.health.get(&p.name).copied().unwrap_or(Health::Down);
    let running = |pid: Option<u32>| pid.is_some_and(|p| o.alive.contains(&p));
    let dead = |pid: Option<u32>| pid.is_some() && !running(pid);
    s.clusters
        .iter()
        .map(|c| {
            // Running, dead, all.
            let mut services: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
            for b in &c.backends {
                let e = services.entry(b.service.clone()).or_default();
                e.2 += 1;
                if running(b.pid) {
                    e.0 += 1;
                } else if dead(b.pid) {
                    e.1 += 1;
                }
            }
            ClusterStatus {
                name: c.name.clone(),
                cloud: c.cloud.clone(),
                region: c.region.clone(),
                controller: health(&c.controller).label(),
                gateways_up: c
                    .gateways
                    .iter()
                    .filter(|g| health(g) == Health::Up)
                    .count(),
                gateways: c.gateways.len(),
                proxy: c.proxy.address,
                proxy_health: health(&c.proxy).label(),
                proxy_tcp: c.proxy_tcp.clone(),
                backends_up: c.backends.iter().filter(|b| running(b.pid)).count(),
                backends_dead: c.backends.iter().filter(|b| dead(b.pid)).count(),
                backends: c.backends.len(),
                services: services
                    .into_iter()
                    .map(|(k, (up, dead, all))| match dead {
                        0 => (k, format!("{up}/{all}")),
                        _ => (k, format!("{up}/{all} ({dead} dead)")),
                    })
                    .collect(),
                liveness: o.liveness.get(&c.name).copied(),
            }
        })
        .collect()
}

pub async fn print_status(s: &State, dir: &Path) {
    println!(
        "\n{:<20} {:<8} {:<16} {:<10} {:<10} {:<9} {:<22} SERVICES (healthy/total)",
        "CLUSTER", "CLOUD", "REGION", "CONTROLLER", "LIVENESS", "GATEWAYS", "PROXY"
    );
    for c in status_of(s, &observe(s, dir).await) {
        let services: Vec<String> = c.services.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "{:<20} {:<8} {:<16} {:<10} {:<10} {:<9} {:<22} {}",
            c.name,
            c.cloud,
            c.region,
            c.controller,
            c.liveness.map_or("?".to_string(), |l| l.to_string()),
            format!("{}/{}", c.gateways_up, c.gateways),
            format!("{} {}", c.proxy, c.proxy_health),
            services.join(", ")
        );
    }
    if let Some(c) = s.clusters.first()
        && let Some(b) = c.backends.iter().find(|b| !b.tcp)
    {
        let (ns, name) = b.service.split_once('/').unwrap_or(("", &b.service));
        println!(
            "\nTry it: curl -s -H 'host: {name}.{ns}' http://{}/\nLogs and state: {}\nStop a service's backends: fedmesh stop {}/{}   (and `fedmesh start …`)\n",
            c.proxy.address,
            dir.display(),
            c.name,
            b.service
        );
        for (service, at) in &c.proxy_tcp {
            println!("TCP service {service}: through {}'s proxy at {at}", c.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::state::{BackendState, ClusterState};

    fn proc(name: &str, pid: u32) -> Proc {
        Proc {
            name: name.into(),
            pid,
            address: "127.0.1.1:1".parse().unwrap(),
            admin: None,
            command: Vec::new(),
            zone: None,
        }
    }

    fn backend(service: &str, pid: Option<u32>) -> BackendState {
        BackendState {
            id: format!("aws/{service}@az1#{pid:?}"),
            service: service.into(),
            zone: "az1".into(),
            address: "127.0.1.50:8080".parse().unwrap(),
            tcp: false,
            pid,
        }
    }

    fn state() -> State {
        State {
            topology: "t".into(),
            supervisor: 1,
            ready: true,
            etcd: vec![],
            started: BTreeMap::new(),
            clusters: vec![ClusterState {
                name: "aws".into(),
                cloud: "aws".into(),
                region: "r".into(),
                trust_domain: "aws.fedmesh.local".into(),
                controller: proc("aws-controller", 10),
                gateways: vec![proc("aws-gateway-0", 11), proc("aws-gateway-1", 12)],
                proxy: proc("aws-proxy", 13),
                proxy_tcp: BTreeMap::new(),
                registry: "registry.yaml".into(),
                backends: vec![
                    backend("shop/cart", Some(20)),
                    backend("shop/cart", Some(21)),
                    backend("shop/cart", None),
                    backend("shop/web", Some(22)),
                ],
            }],
        }
    }

    #[test]
    fn status_counts_ready_gateways_and_running_backends() {
        let o = Observed {
            health: [
                ("aws-controller", Health::Up),
                ("aws-gateway-0", Health::Up),
                ("aws-gateway-1", Health::Dead),
                ("aws-proxy", Health::NotReady),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            // 21 died; the stopped one has no pid.
            alive: [20, 22].into(),
            liveness: BTreeMap::new(),
        };
        let [c] = status_of(&state(), &o).try_into().unwrap();
        assert_eq!(c.controller, "up");
        assert_eq!((c.gateways_up, c.gateways), (1, 2), "dead is not up");
        assert_eq!(c.proxy_health, "not ready");
        assert_eq!((c.backends_up, c.backends_dead, c.backends), (2, 1, 4));
        assert_eq!(
            c.services["shop/cart"], "1/3 (1 dead)",
            "21 died, one stopped"
        );
        assert_eq!(c.services["shop/web"], "1/1");
        assert_eq!(c.liveness, None, "etcd did not answer");
    }

    #[test]
    fn a_process_nobody_could_ask_about_is_down() {
        let [c] = status_of(&state(), &Observed::default())
            .try_into()
            .unwrap();
        assert_eq!((c.controller, c.proxy_health), ("down", "down"));
        assert_eq!(c.gateways_up, 0);
        assert_eq!(c.backends_up, 0);
    }

    /// A process `fedmesh stop` stopped has pid 0 and is down; one that is
    /// gone without being stopped is dead (no process has a pid above
    /// Linux's limit of 2^22).
    #[tokio::test]
    async fn a_stopped_process_is_down_and_a_vanished_one_dead() {
        let s = state();
        let mut stopped = proc("aws-proxy", 0);
        stopped.admin = Some("127.0.1.1:9".parse().unwrap());
        assert_eq!(health(&s, &stopped).await.label(), "down");
        let gone = proc("aws-proxy", u32::MAX - 1);
        assert_eq!(health(&s, &gone).await.label(), "dead");
    }
}
