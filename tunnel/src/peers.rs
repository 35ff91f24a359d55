//! Other clusters, as whoever opens tunnels to them sees them: each
//! cluster's trust domain and gateways, read from the controller's peer
//! list or a static file, and looked up by the [`crate::pool`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use fedmesh_proto::discovery::v1 as pb;
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_trust::{BundleSet, TrustDomain};
use tokio::sync::watch;

use crate::frame::Refusal;

/// Where a peer gateway is reached: an address, or a DNS name (a cloud
/// load balancer's, say) that the egress resolves when it connects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GatewayAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl GatewayAddr {
    /// `host` is an IP address or a DNS name; a trailing dot is allowed.
    pub fn new(host: &str, port: u16) -> Result<Self, String> {
        if port == 0 {
            return Err("port 0 is not a port".into());
        }
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(Self::Ip(SocketAddr::new(ip, port)));
        }
        let name = host.strip_suffix('.').unwrap_or(host);
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!("{host:?} is neither an IP address nor a DNS name"));
        }
        Ok(Self::Name {
            host: name.to_ascii_lowercase(),
            port,
        })
    }

    /// `ip:port`, `[v6]:port` or `name:port`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            return Self::new(&a.ip().to_string(), a.port());
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port = port
            .parse()
            .map_err(|_| format!("{s:?}: {port:?} is not a port"))?;
        Self::new(host, port)
    }
}

impl From<SocketAddr> for GatewayAddr {
    fn from(a: SocketAddr) -> Self {
        Self::Ip(a)
    }
}

impl std::fmt::Display for GatewayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(a) => a.fmt(f),
            Self::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Another cluster: the only trust domain that may speak for it, and its
/// gateways in the order it registered them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub trust_domain: TrustDomain,
    pub gateways: Vec<GatewayAddr>,
}

/// Peer clusters by name.
pub type Peers = HashMap<String, Peer>;

/// The peers a controller sent. One unusable peer or gateway address is
/// skipped and logged; the rest still apply.
pub fn from_discovery(sent: &BTreeMap<String, pb::PeerCluster>, bundles: &BundleSet) -> Peers {
    let mut peers = Peers::with_capacity(sent.len());
    for (name, p) in sent {
        let td = match fedmesh_api::validate_label("cluster", name)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                TrustDomain::new(&p.trust_domain).map_err(|e| format!("trust domain: {e}"))
            }) {
            Ok(td) => td,
            Err(error) => {
                tracing::error!(peer = %name, %error, "skipping a peer cluster that cannot be used");
                continue;
            }
        };
        if bundles.get(&td).is_none() {
            // Without its bundle no gateway of the cluster can be verified;
            // the rest of the mesh still works.
            tracing::warn!(cluster = %name, trust_domain = %td, "no bundle for a peer's trust domain yet; its gateways will fail verification");
        }
        let gateways = p
            .gateways
            .iter()
            .enumerate()
            .filter_map(|(i, g)| match gateway_address(g) {
                Ok(a) => Some(a),
                Err(error) => {
                    tracing::error!(peer = %name, gateway = i, %error, "skipping a peer gateway address");
                    None
                }
            })
            .collect();
        peers.insert(
            name.clone(),
            Peer {
                trust_domain: td,
                gateways,
            },
        );
    }
    peers
}

fn gateway_address(g: &pb::GatewayAddress) -> Result<GatewayAddr, String> {
    let port = u16::try_from(g.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {} is out of range", g.port))?;
    GatewayAddr::new(&g.address, port)
}

/// Where other clusters' gateways are, for the pool.
pub trait Directory: Send + Sync + std::fmt::Debug + 'static {
    /// `cluster`'s trust domain and gateways, in order, or why there are
    /// none (a refusal to pass on).
    fn gateways_of(&self, cluster: &str) -> Result<(TrustDomain, Vec<GatewayAddr>), Refusal>;
    /// Every gateway named now, to let go of the others.
    fn all_gateways(&self) -> Vec<GatewayAddr>;
}

/// What holds the peers: the gateway's routes, the proxy's table.
pub trait HasPeers: Send + Sync + std::fmt::Debug + 'static {
    /// The cluster the holder belongs to, for refusals.
    fn cluster(&self) -> &str;
    fn peers(&self) -> &Peers;
}

/// A [`Directory`] that reads the latest peers at each lookup.
#[derive(Debug)]
pub struct Watched<T>(pub watch::Receiver<Arc<T>>);

impl<T: HasPeers> Directory for Watched<T> {
    fn gateways_of(&self, cluster: &str) -> Result<(TrustDomain, Vec<GatewayAddr>), Refusal> {
        let held = self.0.borrow();
        let peer = held.peers().get(cluster).ok_or_else(|| {
            Refusal::new(
                Status::Unreachable,
                format!(
                    "cluster {cluster:?} is not federated with {}",
                    held.cluster()
                ),
            )
        })?;
        if peer.gateways.is_empty() {
            return Err(Refusal::new(
                Status::Unreachable,
                format!("cluster {cluster:?} has no gateways"),
            ));
        }
        Ok((peer.trust_domain.clone(), peer.gateways.clone()))
    }

    fn all_gateways(&self) -> Vec<GatewayAddr> {
        self.0
            .borrow()
            .peers()
            .values()
            .flat_map(|p| p.gateways.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    #[test]
    fn gateway_addresses_are_ips_or_dns_names() {
        assert_eq!(
            GatewayAddr::parse("127.0.1.1:15443").unwrap(),
            GatewayAddr::Ip("127.0.1.1:15443".parse().unwrap())
        );
        assert_eq!(
            GatewayAddr::parse("[::1]:15443").unwrap(),
            GatewayAddr::Ip("[::1]:15443".parse().unwrap())
        );
        assert_eq!(
            GatewayAddr::parse("GW-1.elb.Example.com.:15443").unwrap(),
            GatewayAddr::Name {
                host: "gw-1.elb.example.com".into(),
                port: 15443
            }
        );
        for bad in [
            "gw:0",
            "127.0.1.1:0",
            "[::1]:0",
            "gw",
            "gw:http",
            "-gw:1",
            "a..b:1",
            "g_w:1",
            ":1",
        ] {
            assert!(GatewayAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[derive(Debug, Clone)]
    struct Held(Peers);

    impl HasPeers for Held {
        fn cluster(&self) -> &str {
            "gcp"
        }
        fn peers(&self) -> &Peers {
            &self.0
        }
    }

    #[test]
    fn unknown_clusters_and_clusters_without_gateways_are_unreachable() {
        let aws = Peer {
            trust_domain: td("aws.fedmesh"),
            gateways: vec![GatewayAddr::parse("127.0.1.1:15443").unwrap()],
        };
        let (tx, rx) = watch::channel(Arc::new(Held(Peers::from([("aws".into(), aws)]))));
        let d = Watched(rx);
        assert_eq!(d.gateways_of("aws").unwrap().0, td("aws.fedmesh"));
        let e = d.gateways_of("azure").unwrap_err();
        assert_eq!(e.status, Status::Unreachable);
        assert!(e.message.contains("not federated with gcp"), "{e}");
        tx.send_modify(|h| Arc::make_mut(h).0.get_mut("aws").unwrap().gateways.clear());
        assert_eq!(
            d.gateways_of("aws").unwrap_err().status,
            Status::Unreachable
        );
        assert!(d.all_gateways().is_empty());
    }

    #[test]
    fn an_unusable_peer_or_gateway_is_skipped_and_the_rest_applies() {
        let gw = |address: &str, port| pb::GatewayAddress {
            address: address.into(),
            port,
        };
        let sent = BTreeMap::from([
            (
                "aws".to_string(),
                pb::PeerCluster {
                    cluster: "aws".into(),
                    trust_domain: "aws.fedmesh".into(),
                    gateways: vec![gw("127.0.1.1", 15443), gw("127.0.1.2", 70000)],
                    ..Default::default()
                },
            ),
            (
                "evil".to_string(),
                pb::PeerCluster {
                    cluster: "evil".into(),
                    trust_domain: "not a trust domain".into(),
                    ..Default::default()
                },
            ),
        ]);
        let peers = from_discovery(&sent, &BundleSet::new());
        assert!(!peers.contains_key("evil"));
        assert_eq!(peers["aws"].trust_domain, td("aws.fedmesh"));
        assert_eq!(
            peers["aws"].gateways,
            [GatewayAddr::parse("127.0.1.1:15443").unwrap()]
        );
    }
}
