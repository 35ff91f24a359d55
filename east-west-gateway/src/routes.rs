//! What a gateway knows about the mesh, and the decisions it makes from it:
//! which peer gateways are who they claim, whether a stream is admitted, and
//! which local endpoints to try in which order. Free of I/O; the drivers read
//! the current [`Routes`] from a watch channel for every stream.

use std::collections::HashMap;
use std::net::SocketAddr;

use fedmesh_api::{Endpoint, ServiceKey};
use fedmesh_proto::tunnel::v1::tunnel_accept::Status;
use fedmesh_trust::{SpiffeId, TrustDomain};

use crate::frame::{OpenRequest, Refusal};

/// The routing state of one gateway. Replaced as a whole on every update,
/// so a stream always sees one consistent version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    /// This gateway's cluster and trust domain.
    pub cluster: String,
    pub trust_domain: TrustDomain,
    /// This gateway's zone: its endpoints are tried first.
    pub zone: Option<String>,
    /// Services this cluster exports, with their local endpoints.
    pub services: HashMap<ServiceKey, ExportedService>,
    /// Other clusters, by name.
    pub peers: Peers,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedService {
    pub ports: Vec<u16>,
    pub endpoints: Vec<Endpoint>,
    /// Who may reach the service. `None`: any workload of any federated
    /// cluster (the mesh default until a traffic policy says otherwise).
    pub allow: Option<Vec<AllowRule>>,
}

/// Workloads of `cluster`; with `identities` set, only those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub cluster: String,
    pub identities: Vec<SpiffeId>,
}

pub use fedmesh_tunnel::peers::{GatewayAddr, Peer, Peers};

/// Who is on the other end of an ingress connection, as its verified
/// certificate names it: a federated cluster's gateway, which vouches for
/// the workloads of its trust domain, or one of its workloads, connected
/// directly, which speaks only for itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub cluster: String,
    pub id: SpiffeId,
    pub kind: CallerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    Gateway,
    Workload,
}

impl Caller {
    /// The key its connections are counted under: a gateway's cluster, or
    /// a workload's own identity (a cluster has many).
    pub fn connection_key(&self) -> String {
        match self.kind {
            CallerKind::Gateway => self.cluster.clone(),
            CallerKind::Workload => self.id.to_string(),
        }
    }
}

impl Routes {
    pub fn new(cluster: &str, trust_domain: TrustDomain) -> Self {
        Self {
            cluster: cluster.into(),
            trust_domain,
            zone: None,
            services: HashMap::new(),
            peers: HashMap::new(),
        }
    }

    /// Whether `id` is the gateway identity of a federated cluster:
    /// `spiffe://<that cluster's trust domain>/fedmesh/gateway/<cluster>`.
    /// The chain has already been verified against that trust domain's
    /// bundle; this checks that the name and the domain belong together.
    /// The caller `id` is, if it is a gateway of a federated cluster, or a
    /// workload (`/ns/<ns>/sa/<sa>`) of a federated cluster's trust domain.
    pub fn caller(&self, id: &SpiffeId) -> Result<Caller, String> {
        if let Some(cluster) = id.path().strip_prefix("/fedmesh/gateway/") {
            if cluster.is_empty() || cluster.contains('/') {
                return Err(format!("{id} is not a gateway identity"));
            }
            let peer = self
                .peers
                .get(cluster)
                .ok_or_else(|| format!("{id}: cluster {cluster:?} is not federated with us"))?;
            if !id.is_member_of(&peer.trust_domain) {
                return Err(format!(
                    "{id}: cluster {cluster:?} has trust domain {}",
                    peer.trust_domain
                ));
            }
            return Ok(Caller {
                cluster: cluster.into(),
                id: id.clone(),
                kind: CallerKind::Gateway,
            });
        }
        let workload = id
            .path()
            .strip_prefix("/ns/")
            .and_then(|rest| rest.split_once("/sa/"))
            .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
        if !workload {
            return Err(format!("{id} is neither a gateway nor a workload identity"));
        }
        let cluster = self
            .peers
            .iter()
            .find(|(_, p)| id.is_member_of(&p.trust_domain))
            .map(|(name, _)| name.clone())
            .ok_or_else(|| format!("{id}: no federated cluster has its trust domain"))?;
        Ok(Caller {
            cluster,
            id: id.clone(),
            kind: CallerKind::Workload,
        })
    }

    /// Admits a stream that arrived from `from`, or says why not. On
    /// success, the endpoints to try, best first; `spread` rotates the
    /// choice among equally good endpoints (pass a counter).
    pub fn admit(
        &self,
        open: &OpenRequest,
        from: &Caller,
        spread: usize,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let forbidden = |m: String| Refusal::new(Status::Forbidden, m);
        // Identified at the handshake; it may have left the routes since.
        self.caller(&from.id).map_err(forbidden)?;
        if open.target_cluster != self.cluster {
            return Err(forbidden(format!(
                "stream for cluster {:?} reached a gateway of {:?}",
                open.target_cluster, self.cluster
            )));
        }
        let source = match from.kind {
            CallerKind::Gateway => {
                let source = open.source.as_ref().ok_or_else(|| {
                    Refusal::new(
                        Status::BadRequest,
                        "source_identity is required between gateways",
                    )
                })?;
                // A gateway vouches only for workloads of its own trust domain.
                if source.trust_domain_name() != from.id.trust_domain_name() {
                    return Err(forbidden(format!(
                        "gateway {} may not speak for {source}",
                        from.id
                    )));
                }
                source
            }
            // A workload is who its certificate says, whatever it wrote.
            CallerKind::Workload => match &open.source {
                Some(claimed) if claimed != &from.id => {
                    return Err(forbidden(format!(
                        "{} may speak only for itself, not {claimed}",
                        from.id
                    )));
                }
                _ => &from.id,
            },
        };
        let svc = self.services.get(&open.service).ok_or_else(|| {
            Refusal::new(
                Status::UnknownService,
                format!("{} does not export {}", self.cluster, open.service),
            )
        })?;
        if !svc.ports.contains(&open.port) {
            return Err(Refusal::new(
                Status::UnknownService,
                format!(
                    "{} exports {} on ports {:?}, not {}",
                    self.cluster, open.service, svc.ports, open.port
                ),
            ));
        }
        if let Some(rules) = &svc.allow {
            let allowed = rules.iter().any(|r| {
                r.cluster == from.cluster
                    && (r.identities.is_empty() || r.identities.contains(source))
            });
            if !allowed {
                return Err(forbidden(format!(
                    "{source} of cluster {} may not reach {}",
                    from.cluster, open.service
                )));
            }
        }
        let ranked = self.rank(&svc.endpoints, spread);
        if ranked.is_empty() {
            return Err(Refusal::new(
                Status::NoHealthyEndpoints,
                format!(
                    "{} has no healthy endpoint in {}",
                    open.service, self.cluster
                ),
            ));
        }
        Ok(ranked)
    }

    /// Healthy endpoints, best first: this gateway's zone, then the other
    /// zones by how many healthy endpoints they have (more capacity takes
    /// the spill-over better), ties by name. Within a zone the start
    /// rotates with `spread`, so that load spreads.
    pub fn rank(&self, endpoints: &[Endpoint], spread: usize) -> Vec<SocketAddr> {
        let mut zones: Vec<(&str, Vec<SocketAddr>)> = Vec::new();
        for e in endpoints.iter().filter(|e| e.healthy) {
            match zones.iter_mut().find(|(z, _)| *z == e.zone) {
                Some((_, v)) => v.push(e.address),
                None => zones.push((&e.zone, vec![e.address])),
            }
        }
        let own = self.zone.as_deref();
        zones.sort_by(|(za, a), (zb, b)| {
            (Some(*zb) == own)
                .cmp(&(Some(*za) == own))
                .then(b.len().cmp(&a.len()))
                .then(za.cmp(zb))
        });
        zones
            .into_iter()
            .flat_map(|(_, mut v)| {
                let n = v.len();
                v.rotate_left(spread % n);
                v
            })
            .collect()
    }
}

impl fedmesh_tunnel::peers::HasPeers for Routes {
    fn cluster(&self) -> &str {
        &self.cluster
    }

    fn peers(&self) -> &Peers {
        &self.peers
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DEFAULT_DEADLINE;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn ep(addr: &str, zone: &str, healthy: bool) -> Endpoint {
        Endpoint {
            address: addr.parse().unwrap(),
            zone: zone.into(),
            healthy,
        }
    }

    fn routes() -> Routes {
        let mut r = Routes::new("gcp-usc1", td("gcp.example"));
        r.zone = Some("usc1-a".into());
        r.peers.insert(
            "aws-use1".into(),
            Peer {
                trust_domain: td("aws.example"),
                gateways: vec![GatewayAddr::parse("127.0.1.1:15443").unwrap()],
            },
        );
        r.services.insert(
            ServiceKey::new("shop", "checkout"),
            ExportedService {
                ports: vec![8080],
                endpoints: vec![
                    ep("127.0.2.10:8080", "usc1-b", true),
                    ep("127.0.2.11:8080", "usc1-a", true),
                    ep("127.0.2.12:8080", "usc1-a", false),
                    ep("127.0.2.13:8080", "usc1-c", true),
                    ep("127.0.2.14:8080", "usc1-c", true),
                ],
                allow: None,
            },
        );
        r
    }

    fn from_aws() -> Caller {
        routes()
            .caller(&SpiffeId::parse("spiffe://aws.example/fedmesh/gateway/aws-use1").unwrap())
            .unwrap()
    }

    fn open() -> OpenRequest {
        OpenRequest {
            service: ServiceKey::new("shop", "checkout"),
            port: 8080,
            target_cluster: "gcp-usc1".into(),
            source: Some(SpiffeId::parse("spiffe://aws.example/ns/shop/sa/web").unwrap()),
            traceparent: None,
            deadline: DEFAULT_DEADLINE,
        }
    }

    fn addrs(v: &[&str]) -> Vec<SocketAddr> {
        v.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn endpoints_rank_own_zone_first_then_by_capacity() {
        let got = routes().admit(&open(), &from_aws(), 0).unwrap();
        assert_eq!(
            got,
            addrs(&[
                "127.0.2.11:8080",
                "127.0.2.13:8080",
                "127.0.2.14:8080",
                "127.0.2.10:8080"
            ])
        );
        // Spreading rotates within a zone, never across the zone order.
        let got = routes().admit(&open(), &from_aws(), 1).unwrap();
        assert_eq!(
            got,
            addrs(&[
                "127.0.2.11:8080",
                "127.0.2.14:8080",
                "127.0.2.13:8080",
                "127.0.2.10:8080"
            ])
        );
    }

    #[test]
    fn callers_are_registered_gateways_or_workloads_of_federated_domains() {
        let r = routes();
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let gw = r
            .caller(&id("spiffe://aws.example/fedmesh/gateway/aws-use1"))
            .unwrap();
        assert_eq!(
            (gw.kind, gw.connection_key()),
            (CallerKind::Gateway, "aws-use1".into())
        );
        let web = r
            .caller(&id("spiffe://aws.example/ns/shop/sa/web"))
            .unwrap();
        assert_eq!(web.cluster, "aws-use1");
        assert_eq!(web.kind, CallerKind::Workload);
        assert_eq!(web.connection_key(), "spiffe://aws.example/ns/shop/sa/web");
        for bad in [
            // Not a workload path: a controller, anything else of fedmesh.
            "spiffe://aws.example/fedmesh/controller/aws-use1",
            "spiffe://aws.example/ns/shop",
            "spiffe://aws.example/ns/shop/sa/web/extra",
            // A workload of no federated cluster.
            "spiffe://evil.example/ns/shop/sa/web",
            "spiffe://aws.example/fedmesh/gateway/unknown",
            // Right name, someone else's trust domain.
            "spiffe://evil.example/fedmesh/gateway/aws-use1",
            "spiffe://aws.example/fedmesh/gateway/aws-use1/x",
        ] {
            assert!(r.caller(&id(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_workload_speaks_only_for_itself_and_allow_rules_see_it() {
        let mut r = routes();
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        let web = r
            .caller(&id("spiffe://aws.example/ns/shop/sa/web"))
            .unwrap();
        let mut req = open();
        // Empty or its own: admitted.
        req.source = None;
        assert!(r.admit(&req, &web, 0).is_ok());
        req.source = Some(web.id.clone());
        assert!(r.admit(&req, &web, 0).is_ok());
        // Claiming another identity: refused, whatever the claim.
        req.source = Some(id("spiffe://aws.example/ns/shop/sa/admin"));
        let e = r.admit(&req, &web, 0).unwrap_err();
        assert_eq!(e.status, Status::Forbidden);
        assert!(e.message.contains("only for itself"), "{e}");
        // Allow rules apply to the certificate's identity.
        r.services
            .get_mut(&ServiceKey::new("shop", "checkout"))
            .unwrap()
            .allow = Some(vec![AllowRule {
            cluster: "aws-use1".into(),
            identities: vec![id("spiffe://aws.example/ns/shop/sa/admin")],
        }]);
        req.source = None;
        let e = r.admit(&req, &web, 0).unwrap_err();
        assert_eq!(e.status, Status::Forbidden);
        let admin = r
            .caller(&id("spiffe://aws.example/ns/shop/sa/admin"))
            .unwrap();
        assert!(r.admit(&req, &admin, 0).is_ok());
    }

    #[test]
    fn every_refusal_has_its_status() {
        let r = routes();
        let from = from_aws();
        let status = |o: OpenRequest, r: &Routes| r.admit(&o, &from, 0).unwrap_err().status;

        let mut o = open();
        o.target_cluster = "azure-weu".into();
        assert_eq!(status(o, &r), Status::Forbidden);

        let mut o = open();
        o.source = Some(SpiffeId::parse("spiffe://gcp.example/ns/shop/sa/web").unwrap());
        assert_eq!(
            status(o, &r),
            Status::Forbidden,
            "aws gateway speaking for gcp"
        );

        let mut o = open();
        o.source = None;
        assert_eq!(status(o, &r), Status::BadRequest);

        let mut o = open();
        o.service = ServiceKey::new("shop", "cart");
        assert_eq!(status(o, &r), Status::UnknownService);

        let mut o = open();
        o.port = 9090;
        assert_eq!(status(o, &r), Status::UnknownService);

        let mut r2 = r.clone();
        let svc = r2.services.values_mut().next().unwrap();
        svc.endpoints.iter_mut().for_each(|e| e.healthy = false);
        assert_eq!(status(open(), &r2), Status::NoHealthyEndpoints);

        let mut r3 = r.clone();
        let svc = r3.services.values_mut().next().unwrap();
        svc.allow = Some(vec![AllowRule {
            cluster: "aws-use1".into(),
            identities: vec![SpiffeId::parse("spiffe://aws.example/ns/shop/sa/api").unwrap()],
        }]);
        assert_eq!(status(open(), &r3), Status::Forbidden);
        let svc = r3.services.values_mut().next().unwrap();
        svc.allow = Some(vec![AllowRule {
            cluster: "aws-use1".into(),
            identities: vec![],
        }]);
        assert!(r3.admit(&open(), &from, 0).is_ok());
    }
}
