//! Topologies: YAML descriptions of whole federations on one machine
//! (etcd, clusters with their clouds, regions, zones and gateways, the
//! services each runs, and the WAN links between clouds), checked, and the
//! loopback address plan that `fedmesh up` starts them on. I/O-free: the
//! caller reads the file.
//!
//! Every error names the file, the field, and the line and column where
//! the YAML has them: `three-clouds.yaml: line 14 column 7:
//! services[0].replicas.gcp: cluster gcp has no zone "usc1-z"`.
//!
//! The schema is `topology.schema.json`, beside the shipped topologies.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use fedmesh_api::{EgressMode, ServiceKey, validate_label};
use serde::Deserialize;
use serde_saphyr::Spanned;

pub const API_VERSION: &str = "fedmesh.io/v1";
pub const KIND: &str = "Topology";
/// Clusters use loopback blocks 127.0.<FIRST_BLOCK + i>.x.
pub const FIRST_BLOCK: u8 = 10;
pub const MAX_CLUSTERS: usize = 200;
pub const MAX_GATEWAYS: u8 = 4;
/// The proxy's HTTP and admin ports (host .5 of each block); its TCP
/// listeners take their services' own ports there.
pub const PROXY_HTTP_PORT: u16 = 4140;
pub const PROXY_ADMIN_PORT: u16 = 4191;
/// Backends of a cluster use hosts 100 and up of its block.
pub const MAX_BACKENDS_PER_CLUSTER: usize = 150;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct TopologyError {
    pub origin: String,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

/// A checked topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub name: String,
    pub etcd_members: u8,
    pub clusters: Vec<Cluster>,
    pub services: Vec<Service>,
    pub wan: Vec<WanLink>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub cloud: String,
    pub region: String,
    pub zones: Vec<String>,
    pub gateways: u8,
    /// How its proxies reach other clusters (its registration's `egress`).
    pub egress: EgressMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub port: u16,
    pub protocol: Protocol,
    /// cluster → zone → replicas.
    pub replicas: BTreeMap<String, BTreeMap<String, u8>>,
}

/// The network between two clouds, both ways.
#[derive(Debug, Clone, PartialEq)]
pub struct WanLink {
    pub clouds: [String; 2],
    pub latency: Duration,
    pub jitter: Duration,
    /// Share of packets lost, in [0, 1).
    pub loss: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    api_version: Spanned<String>,
    kind: Spanned<String>,
    name: Spanned<String>,
    #[serde(default)]
    etcd: Option<Spanned<EtcdFile>>,
    clusters: Vec<Spanned<ClusterFile>>,
    #[serde(default)]
    services: Vec<Spanned<ServiceFile>>,
    #[serde(default)]
    wan: Vec<Spanned<WanFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdFile {
    members: u8,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    name: String,
    cloud: String,
    region: String,
    zones: Vec<String>,
    #[serde(default = "one")]
    gateways: u8,
    #[serde(default)]
    egress: EgressMode,
}

fn one() -> u8 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    /// `namespace/name`.
    name: String,
    port: u16,
    #[serde(default = "http")]
    protocol: Protocol,
    replicas: BTreeMap<String, BTreeMap<String, u8>>,
}

fn http() -> Protocol {
    Protocol::Http
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WanFile {
    between: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    latency: Duration,
    #[serde(default, with = "humantime_serde")]
    jitter: Duration,
    #[serde(default)]
    loss: f64,
}

fn at<T>(s: &Spanned<T>) -> String {
    format!(
        "line {} column {}",
        s.referenced.line(),
        s.referenced.column()
    )
}

impl Topology {
    /// Parses and checks a topology document; `origin` names the file.
    pub fn parse(yaml: &str, origin: &str) -> Result<Self, TopologyError> {
        let err = |message: String| TopologyError {
            origin: origin.into(),
            message,
        };
        let f: File = serde_saphyr::from_str(yaml).map_err(|e| err(e.to_string()))?;
        check(f).map_err(err)
    }

    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The WAN link between the clouds of two clusters, if the topology
    /// names one.
    pub fn link(&self, a: &str, b: &str) -> Option<&WanLink> {
        let (ca, cb) = (&self.cluster(a)?.cloud, &self.cluster(b)?.cloud);
        self.wan.iter().find(|l| {
            (&l.clouds[0] == ca && &l.clouds[1] == cb) || (&l.clouds[0] == cb && &l.clouds[1] == ca)
        })
    }
}

fn check(f: File) -> Result<Topology, String> {
    if f.api_version.value != API_VERSION {
        return Err(format!(
            "{}: apiVersion: expected {API_VERSION:?}, got {:?}",
            at(&f.api_version),
            f.api_version.value
        ));
    }
    if f.kind.value != KIND {
        return Err(format!(
            "{}: kind: expected {KIND:?}, got {:?}",
            at(&f.kind),
            f.kind.value
        ));
    }
    validate_label("name", &f.name.value).map_err(|e| format!("{}: {e}", at(&f.name)))?;
    let etcd_members = match &f.etcd {
        None => 1,
        Some(e) if matches!(e.value.members, 1 | 3) => e.value.members,
        Some(e) => {
            return Err(format!(
                "{}: etcd.members: {} is not 1 or 3",
                at(e),
                e.value.members
            ));
        }
    };

    if f.clusters.is_empty() || f.clusters.len() > MAX_CLUSTERS {
        return Err(format!("clusters: list 1 to {MAX_CLUSTERS} clusters"));
    }
    let mut clusters: Vec<Cluster> = Vec::new();
    for (i, c) in f.clusters.iter().enumerate() {
        let here = format!("{}: clusters[{i}]", at(c));
        let v = &c.value;
        for (field, value) in [
            ("name", &v.name),
            ("cloud", &v.cloud),
            ("region", &v.region),
        ] {
            validate_label(field, value).map_err(|e| format!("{here}.{field}: {e}"))?;
        }
        if clusters.iter().any(|x| x.name == v.name) {
            return Err(format!("{here}.name: {} is listed twice", v.name));
        }
        if v.zones.is_empty() {
            return Err(format!("{here}.zones: list at least one zone"));
        }
        for (j, z) in v.zones.iter().enumerate() {
            validate_label("zone", z).map_err(|e| format!("{here}.zones[{j}]: {e}"))?;
            if v.zones[..j].contains(z) {
                return Err(format!("{here}.zones[{j}]: {z} is listed twice"));
            }
        }
        if !(1..=MAX_GATEWAYS).contains(&v.gateways) {
            return Err(format!(
                "{here}.gateways: {} is outside 1-{MAX_GATEWAYS}",
                v.gateways
            ));
        }
        clusters.push(Cluster {
            name: v.name.clone(),
            cloud: v.cloud.clone(),
            region: v.region.clone(),
            zones: v.zones.clone(),
            gateways: v.gateways,
            egress: v.egress,
        });
    }

    let mut services: Vec<Service> = Vec::new();
    let mut backends: BTreeMap<String, usize> = BTreeMap::new();
    for (i, s) in f.services.iter().enumerate() {
        let here = format!("{}: services[{i}]", at(s));
        let v = &s.value;
        let key: ServiceKey = v.name.parse().map_err(|e| format!("{here}.name: {e}"))?;
        validate_label("namespace", &key.namespace).map_err(|e| format!("{here}.name: {e}"))?;
        validate_label("service name", &key.name).map_err(|e| format!("{here}.name: {e}"))?;
        if services.iter().any(|x| x.key == key) {
            return Err(format!("{here}.name: {key} is listed twice"));
        }
        if v.port == 0 {
            return Err(format!("{here}.port: 0 is not a port"));
        }
        if v.protocol == Protocol::Tcp {
            // Each proxy listens for a TCP service on the service's port.
            if [PROXY_HTTP_PORT, PROXY_ADMIN_PORT].contains(&v.port) {
                return Err(format!(
                    "{here}.port: {} is the proxy's own (HTTP {PROXY_HTTP_PORT}, admin {PROXY_ADMIN_PORT}); a TCP service's proxy listener takes its port",
                    v.port
                ));
            }
            if let Some(other) = services
                .iter()
                .find(|x| x.protocol == Protocol::Tcp && x.port == v.port)
            {
                return Err(format!(
                    "{here}.port: {} is also TCP service {}'s; the proxy listens for each on its port",
                    v.port, other.key
                ));
            }
        }
        for (cluster, zones) in &v.replicas {
            let Some(c) = clusters.iter().find(|c| &c.name == cluster) else {
                return Err(format!(
                    "{here}.replicas.{cluster}: no cluster of that name"
                ));
            };
            for (zone, n) in zones {
                if !c.zones.contains(zone) {
                    return Err(format!(
                        "{here}.replicas.{cluster}: cluster {cluster} has no zone {zone:?}"
                    ));
                }
                if *n > 16 {
                    return Err(format!("{here}.replicas.{cluster}.{zone}: {n} is over 16"));
                }
                *backends.entry(cluster.clone()).or_default() += usize::from(*n);
            }
        }
        services.push(Service {
            key,
            port: v.port,
            protocol: v.protocol,
            replicas: v.replicas.clone(),
        });
    }
    for (cluster, n) in backends {
        if n > MAX_BACKENDS_PER_CLUSTER {
            return Err(format!(
                "services: cluster {cluster} runs {n} backends, over {MAX_BACKENDS_PER_CLUSTER}"
            ));
        }
    }

    let clouds: Vec<&str> = clusters.iter().map(|c| c.cloud.as_str()).collect();
    let mut wan: Vec<WanLink> = Vec::new();
    for (i, l) in f.wan.iter().enumerate() {
        let here = format!("{}: wan[{i}]", at(l));
        let v = &l.value;
        let [a, b] = v.between.as_slice() else {
            return Err(format!("{here}.between: name exactly two clouds"));
        };
        for c in [a, b] {
            if !clouds.contains(&c.as_str()) {
                return Err(format!("{here}.between: no cluster runs in cloud {c:?}"));
            }
        }
        if a == b {
            return Err(format!("{here}.between: a link joins two different clouds"));
        }
        if wan
            .iter()
            .any(|w| w.clouds.contains(a) && w.clouds.contains(b))
        {
            return Err(format!("{here}: {a} and {b} are linked twice"));
        }
        if !(0.0..1.0).contains(&v.loss) {
            return Err(format!("{here}.loss: {} is outside [0, 1)", v.loss));
        }
        if v.jitter > v.latency {
            return Err(format!("{here}.jitter: more than the latency"));
        }
        wan.push(WanLink {
            clouds: [a.clone(), b.clone()],
            latency: v.latency,
            jitter: v.jitter,
            loss: v.loss,
        });
    }
    Ok(Topology {
        name: f.name.value,
        etcd_members,
        clusters,
        services,
        wan,
    })
}

/// Where everything of a topology listens, on loopback: etcd in
/// 127.0.<9 + offset>.x, cluster i in 127.0.<10 + offset + i>.x. The
/// offset (0 by default) lets a second federation (tests beside a running
/// demo) take other blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub etcd: Vec<EtcdMember>,
    pub clusters: Vec<ClusterPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdMember {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    pub name: String,
    pub block: u8,
    /// Discovery and Certify (gRPC), and the controller's admin port.
    pub controller: SocketAddr,
    pub controller_admin: SocketAddr,
    pub gateways: Vec<GatewayPlan>,
    pub proxy_http: SocketAddr,
    pub proxy_admin: SocketAddr,
    /// The proxy's listener for each TCP service of the topology, on the
    /// service's port.
    pub proxy_tcp: Vec<(ServiceKey, SocketAddr)>,
    pub backends: Vec<BackendPlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPlan {
    /// What the cluster's record advertises: the WAN relay in front of the
    /// gateway, which applies the topology's links.
    pub quic: SocketAddr,
    /// Where the gateway itself listens.
    pub quic_listen: SocketAddr,
    pub egress: SocketAddr,
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    pub service: ServiceKey,
    pub zone: String,
    /// 0, 1, … within (service, zone).
    pub replica: u8,
    pub address: SocketAddr,
}

impl BackendPlan {
    /// `cluster/namespace/name@zone#replica`: how operators name one.
    pub fn id(&self, cluster: &str) -> String {
        format!("{cluster}/{}@{}#{}", self.service, self.zone, self.replica)
    }
}

fn addr(block: u8, host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, block, host)), port)
}

impl Plan {
    /// The cluster whose block `ip` is in, if any.
    pub fn cluster_of(&self, ip: IpAddr) -> Option<&ClusterPlan> {
        let IpAddr::V4(v4) = ip else { return None };
        let [a, b, block, _] = v4.octets();
        (a == 127 && b == 0)
            .then(|| self.clusters.iter().find(|c| c.block == block))
            .flatten()
    }
}

impl Topology {
    /// The address plan in the default blocks (a topology's clusters always
    /// fit there).
    pub fn plan(&self) -> Plan {
        self.blocks(0)
    }

    /// The address plan with every block moved up by `offset`; an error
    /// when the last cluster's block would pass 127.0.255.x.
    pub fn plan_at(&self, offset: u8) -> Result<Plan, String> {
        let last = usize::from(FIRST_BLOCK) + usize::from(offset) + self.clusters.len() - 1;
        if last > usize::from(u8::MAX) {
            let most = usize::from(u8::MAX) + 1 - usize::from(FIRST_BLOCK) - self.clusters.len();
            return Err(format!(
                "a block offset of {offset} would put the last of {} clusters in 127.0.{last}.x; \
                 use at most {most}",
                self.clusters.len()
            ));
        }
        Ok(self.blocks(offset))
    }

    fn blocks(&self, offset: u8) -> Plan {
        let etcd = (0..self.etcd_members)
            .map(|i| EtcdMember {
                name: format!("etcd-{i}"),
                client: addr((FIRST_BLOCK - 1).saturating_add(offset), 1 + i, 2379),
                peer: addr((FIRST_BLOCK - 1).saturating_add(offset), 1 + i, 2380),
            })
            .collect();
        let clusters = self
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // `plan_at` checked that every block fits.
                let i = u8::try_from(i).unwrap_or(u8::MAX);
                let block = FIRST_BLOCK.saturating_add(offset).saturating_add(i);
                let gateways = (0..c.gateways)
                    .map(|g| GatewayPlan {
                        quic: addr(block, 11 + g, 15443),
                        quic_listen: addr(block, 21 + g, 15443),
                        egress: addr(block, 11 + g, 15001),
                        admin: addr(block, 11 + g, 15020),
                    })
                    .collect();
                let mut backends = Vec::new();
                let mut host: u8 = 100;
                for s in &self.services {
                    for (zone, n) in s.replicas.get(&c.name).into_iter().flatten() {
                        for replica in 0..*n {
                            backends.push(BackendPlan {
                                service: s.key.clone(),
                                zone: zone.clone(),
                                replica,
                                address: addr(block, host, s.port),
                            });
                            host = host.saturating_add(1);
                        }
                    }
                }
                ClusterPlan {
                    name: c.name.clone(),
                    block,
                    controller: addr(block, 2, 15010),
                    controller_admin: addr(block, 2, 15014),
                    gateways,
                    proxy_http: addr(block, 5, PROXY_HTTP_PORT),
                    proxy_admin: addr(block, 5, PROXY_ADMIN_PORT),
                    proxy_tcp: self
                        .services
                        .iter()
                        .filter(|s| s.protocol == Protocol::Tcp)
                        .map(|s| (s.key.clone(), addr(block, 5, s.port)))
                        .collect(),
                    backends,
                }
            })
            .collect();
        Plan { etcd, clusters }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: fedmesh.io/v1
kind: Topology
name: two
clusters:
  - {name: aws, cloud: aws, region: use1, zones: [a, b]}
  - {name: gcp, cloud: gcp, region: usc1, zones: [a], gateways: 2, egress: gateway}
services:
  - name: shop/checkout
    port: 8080
    replicas:
      aws: {a: 2, b: 1}
      gcp: {a: 1}
wan:
  - {between: [aws, gcp], latency: 30ms, jitter: 2ms, loss: 0.001}
";

    fn parse(y: &str) -> Result<Topology, TopologyError> {
        Topology::parse(y, "t.yaml")
    }

    #[test]
    fn an_offset_moves_every_block_and_nothing_else() {
        let t = Topology::parse(GOOD, "t.yaml").unwrap();
        let (base, moved) = (t.plan(), t.plan_at(100).unwrap());
        assert_eq!(moved.etcd[0].client.to_string(), "127.0.109.1:2379");
        for (b, m) in base.clusters.iter().zip(&moved.clusters) {
            assert_eq!(m.block, b.block + 100);
            assert_eq!(m.proxy_http.port(), b.proxy_http.port());
            assert_eq!(m.backends.len(), b.backends.len());
            assert!(
                moved
                    .cluster_of(m.proxy_http.ip())
                    .is_some_and(|c| c.name == b.name),
                "the moved plan knows its own blocks"
            );
            assert!(moved.cluster_of(b.proxy_http.ip()).is_none());
        }
        // The last block may be 127.0.255.x, not past it.
        let n = t.clusters.len() as u16;
        let most = u8::try_from(256 - u16::from(FIRST_BLOCK) - n).unwrap();
        let top = t.plan_at(most).unwrap();
        assert_eq!(top.clusters.last().unwrap().block, u8::MAX);
        let err = t.plan_at(most + 1).unwrap_err();
        assert!(err.contains(&format!("use at most {most}")), "{err}");
    }

    #[test]
    fn a_good_topology_parses_and_plans_one_block_per_cluster() {
        let t = parse(GOOD).unwrap();
        assert_eq!(t.etcd_members, 1);
        assert_eq!(t.clusters[1].gateways, 2);
        assert_eq!(
            (t.clusters[0].egress, t.clusters[1].egress),
            (EgressMode::Direct, EgressMode::Gateway),
            "direct unless said"
        );
        assert_eq!(
            t.link("gcp", "aws").unwrap().latency,
            Duration::from_millis(30)
        );
        let p = t.plan();
        assert_eq!(p.etcd[0].client.to_string(), "127.0.9.1:2379");
        let aws = &p.clusters[0];
        assert_eq!(aws.block, 10);
        assert_eq!(aws.proxy_http.to_string(), "127.0.10.5:4140");
        let ids: Vec<String> = aws.backends.iter().map(|b| b.id("aws")).collect();
        assert_eq!(
            ids,
            [
                "aws/shop/checkout@a#0",
                "aws/shop/checkout@a#1",
                "aws/shop/checkout@b#0"
            ]
        );
        assert_eq!(aws.backends[2].address.to_string(), "127.0.10.102:8080");
        let gcp = &p.clusters[1];
        assert_eq!(gcp.gateways[1].quic.to_string(), "127.0.11.12:15443");
        assert_eq!(gcp.gateways[1].quic_listen.to_string(), "127.0.11.22:15443");
        assert_eq!(
            p.cluster_of("127.0.11.22".parse().unwrap()).unwrap().name,
            "gcp"
        );
        assert!(p.cluster_of("127.0.99.1".parse().unwrap()).is_none());
    }

    #[test]
    fn every_proxy_listens_for_every_tcp_service_on_its_port() {
        let db =
            "  - name: shop/db\n    port: 5432\n    protocol: tcp\n    replicas: {gcp: {a: 1}}\n";
        let y = GOOD.replace("wan:\n", &format!("{db}wan:\n"));
        let p = parse(&y).unwrap().plan();
        for c in &p.clusters {
            let [(svc, addr)] = c.proxy_tcp.as_slice() else {
                panic!("{}: {:?}", c.name, c.proxy_tcp);
            };
            assert_eq!(svc.to_string(), "shop/db");
            assert_eq!(*addr, SocketAddr::new(c.proxy_http.ip(), 5432));
        }
        // No HTTP service gets one.
        assert!(parse(GOOD).unwrap().plan().clusters[0].proxy_tcp.is_empty());
    }

    #[test]
    fn a_tcp_service_may_not_take_the_proxys_ports_or_anothers() {
        let tcp = |name: &str, port: u16| {
            format!(
                "  - name: {name}\n    port: {port}\n    protocol: tcp\n    replicas: {{gcp: {{a: 1}}}}\n"
            )
        };
        let with = |extra: String| GOOD.replace("wan:\n", &format!("{extra}wan:\n"));
        let e = parse(&with(tcp("shop/db", 4140))).unwrap_err().to_string();
        assert!(
            e.contains("services[1].port: 4140 is the proxy's own"),
            "{e}"
        );
        let e = parse(&with(tcp("shop/db", 4191))).unwrap_err().to_string();
        assert!(e.contains("services[1].port: 4191"), "{e}");
        let two = tcp("shop/db", 5432) + &tcp("shop/cache", 5432);
        let e = parse(&with(two)).unwrap_err().to_string();
        assert!(
            e.contains("services[2].port: 5432 is also TCP service shop/db's"),
            "{e}"
        );
        // An HTTP service on a TCP one's port is fine: it has no listener.
        let http = "  - name: shop/web\n    port: 5432\n    replicas: {gcp: {a: 1}}\n";
        parse(&with(tcp("shop/db", 5432) + http)).unwrap();
    }

    #[test]
    fn errors_name_the_field_with_its_line_and_column() {
        for (from, to, want) in [
            (
                "kind: Topology",
                "kind: Mesh",
                "line 2 column 7: kind: expected \"Topology\"",
            ),
            (
                "gcp: {a: 1}",
                "gcp: {z: 1}",
                "line 8 column 5: services[0].replicas.gcp: cluster gcp has no zone \"z\"",
            ),
            (
                "gateways: 2",
                "gateways: 9",
                "line 6 column 5: clusters[1].gateways: 9 is outside 1-4",
            ),
            (
                "[aws, gcp], latency",
                "[aws, oci], latency",
                "wan[0].between: no cluster runs in cloud \"oci\"",
            ),
            ("loss: 0.001", "loss: 1.5", "wan[0].loss"),
            ("port: 8080", "port: http", "line 9"),
            ("name: shop/checkout", "name: checkout", "services[0].name"),
            (
                "zones: [a], gateways",
                "zones: [a, a], gateways",
                "clusters[1].zones[1]: a is listed twice",
            ),
            ("region: usc1", "region: usc1, colour: red", "colour"),
            (
                "egress: gateway",
                "egress: relay",
                "line 6 column 76: unknown variant `relay`, expected one of direct, gateway",
            ),
        ] {
            let y = GOOD.replace(from, to);
            assert_ne!(y, GOOD, "{from}");
            let e = parse(&y).unwrap_err().to_string();
            assert!(e.starts_with("t.yaml: "), "{e}");
            assert!(e.contains(want), "{to}: {e}");
        }
    }

    #[test]
    fn the_shipped_topologies_parse() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let t = Topology::parse(&text, &path.display().to_string()).unwrap();
                t.plan();
                n += 1;
            }
        }
        assert!(n >= 3, "three topologies ship");
    }

    #[test]
    fn the_schema_is_json_and_names_every_top_level_field() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/topology.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let props = schema["properties"].as_object().unwrap();
        for field in [
            "apiVersion",
            "kind",
            "name",
            "etcd",
            "clusters",
            "services",
            "wan",
        ] {
            assert!(props.contains_key(field), "{field}");
        }
    }
}
