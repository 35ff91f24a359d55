//! Configuration: the runtime knobs ([`Settings`]), and the static YAML
//! file that a standalone gateway runs from (for tests and for sites
//! without a controller). Plain data: serde with unknown fields refused,
//! then checks that name the field at fault.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedmesh_api::policy::GlobalTrafficPolicy;
use fedmesh_api::{ListedEndpoint, LocalService, ServiceKey, validate_label};
use fedmesh_trust::{Bundle, BundleSet, SpiffeId, Svid, TrustDomain};
use serde::{Deserialize, Serialize};

use fedmesh_discovery::ControllerAccess;

use crate::backoff::BackoffPolicy;
use crate::discovered::Local;
use crate::routes::{AllowRule, ExportedService, Routes};
use crate::validate::AddressValidation;

/// How the gateway behaves; everything has a production default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Settings {
    /// QUIC keep-alive interval. A few per idle timeout, so that one lost
    /// packet does not end a healthy connection.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// A peer silent for this long is dead: its connection closes, its
    /// streams fail, and new streams go to its cluster's next gateway.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Backoff between reconnection attempts to a dead peer.
    #[serde(with = "humantime_serde")]
    pub reconnect_base: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Concurrent streams one peer cluster may hold open on this gateway;
    /// more are refused with OVERLOADED.
    pub max_streams_per_peer: u32,
    /// A stream whose TunnelOpen has not arrived by then is dropped.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A spliced stream with no byte either way for this long is closed.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// On SIGTERM: how long live streams may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The largest UDP payload path MTU discovery may probe for. 1452 fits
    /// any IPv6 path with some tunnel overhead; raise it only on networks
    /// known to carry jumbo frames.
    pub max_udp_payload: u16,
    /// Name servers (ip:port) for peer gateways given by DNS name. Empty:
    /// the system's (`/etc/resolv.conf`, `/etc/hosts`).
    pub dns_servers: Vec<SocketAddr>,
    /// Inbound connections one peer cluster may hold here at once (a
    /// cluster has a few gateways, each normally on one connection); more
    /// are closed at once, so one peer's flood cannot take the gateway.
    pub max_connections_per_peer: u32,
    /// Inbound connections one workload of a peer cluster, connected
    /// directly (not through its gateway), may hold here at once. Its
    /// streams count towards its cluster's `maxStreamsPerPeer`.
    pub max_connections_per_workload: u32,
    /// Egress streams one local workload (by its SPIFFE ID) may hold open
    /// at once; more are refused with OVERLOADED, so that one workload
    /// cannot take its cluster's quota at every remote gateway.
    pub max_streams_per_source: u32,
    /// Debugging: name the backend's address in `TunnelAccept.endpoint`.
    /// Off, other clusters learn nothing of this cluster's addresses.
    pub reveal_endpoint: bool,
    /// QUIC address validation (Retry) of new peers: `auto` (while more
    /// than `addressValidationAbove` unvalidated attempts arrive per
    /// second), `always`, or `never`.
    pub address_validation: AddressValidation,
    pub address_validation_above: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            // A `kill -9` is noticed within about a second: the idle
            // timeout, plus quinn's floor of three probe timeouts.
            keep_alive: Duration::from_millis(150),
            idle_timeout: Duration::from_millis(700),
            reconnect_base: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            max_streams_per_peer: 4096,
            header_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(30),
            max_udp_payload: 1452,
            dns_servers: Vec::new(),
            max_connections_per_peer: 64,
            // One per gateway address, and room for a reconnection.
            max_connections_per_workload: 4,
            max_streams_per_source: 1024,
            reveal_endpoint: false,
            address_validation: AddressValidation::Auto,
            // Peers open a handful of connections each, on start and after
            // a loss: a hundred new ones a second is a flood, not a mesh.
            address_validation_above: 100,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        let ms = |d: Duration| d.as_millis();
        if self.max_connections_per_peer == 0
            || self.max_connections_per_workload == 0
            || self.max_streams_per_source == 0
        {
            return Err(
                "maxConnectionsPerPeer, maxConnectionsPerWorkload and maxStreamsPerSource must be at least 1"
                    .into(),
            );
        }
        if self.idle_timeout < Duration::from_millis(100) {
            return Err(format!(
                "idleTimeout: {} ms is too short; use at least 100ms",
                ms(self.idle_timeout)
            ));
        }
        if self.keep_alive.is_zero() || self.keep_alive * 2 > self.idle_timeout {
            return Err(format!(
                "keepAlive: {} ms must be non-zero and at most half of idleTimeout ({} ms)",
                ms(self.keep_alive),
                ms(self.idle_timeout)
            ));
        }
        if self.reconnect_base.is_zero() || self.reconnect_max < self.reconnect_base {
            return Err("reconnectBase must be non-zero and at most reconnectMax".into());
        }
        if self.max_streams_per_peer == 0 {
            return Err("maxStreamsPerPeer must be at least 1".into());
        }
        for (name, d) in [
            ("headerTimeout", self.header_timeout),
            ("streamIdleTimeout", self.stream_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be non-zero"));
            }
        }
        if !(1200..=65527).contains(&self.max_udp_payload) {
            return Err(format!(
                "maxUdpPayload: {} is outside 1200-65527",
                self.max_udp_payload
            ));
        }
        Ok(())
    }

    pub fn backoff(&self) -> BackoffPolicy {
        BackoffPolicy {
            base: self.reconnect_base,
            max: self.reconnect_max,
        }
    }
}

/// Where a gateway listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// UDP, for peer gateways.
    pub quic: SocketAddr,
    /// TCP+TLS, for local proxies. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<SocketAddr>,
    /// HTTP: /metrics, /ready, /live. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

/// The gateway's YAML file, as written. `GatewayConfig::parse` checks
/// it; `fedmesh up` writes it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewayFile {
    pub cluster: String,
    pub trust_domain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub listen: Listen,
    /// Discovery mode: everything below comes from the controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundles: Option<BTreeMap<String, PathBuf>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerFile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceFile>,
    /// Global traffic policies, for a gateway without a controller: a
    /// service's `export.allow` says who may call it (unless the service
    /// lists `allow` itself), and `export.clusters` without this cluster
    /// leaves it unexported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<GlobalTrafficPolicy>,
    #[serde(default)]
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControllerFile {
    /// The controller's discovery API.
    pub address: fedmesh_dataplane::files::ControllerAddress,
    /// This cluster's own bundle document: how the gateway verifies the
    /// controller before it has anything else.
    pub bundle: PathBuf,
    /// A file holding the join token that lets `Certify` issue this
    /// gateway's identity; or, on Kubernetes, `serviceAccountTokenFile`:
    /// exactly one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<PathBuf>,
    /// A projected ServiceAccount token (audience `fedmesh`) of the
    /// ServiceAccount the controller maps to its gateways
    /// (`--gateway-service-account`), read at each use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

pub use fedmesh_dataplane::peers::PeerFile;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    pub name: String,
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ListedEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<AllowFile>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AllowFile {
    pub cluster: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// A static config file, read and checked. Its identity and bundle files
/// are read too, so a running gateway can swap all of it at once.
#[derive(Debug)]
pub struct StaticConfig {
    pub listen: Listen,
    pub settings: Settings,
    pub routes: Routes,
    pub svid: Svid,
    pub bundles: BundleSet,
}

/// A gateway that takes its routes, bundles and SVID from the controller.
#[derive(Debug)]
pub struct DiscoveryConfig {
    pub listen: Listen,
    pub settings: Settings,
    pub local: Local,
    pub access: ControllerAccess,
    /// Our own trust domain's bundle, to verify the controller.
    pub bootstrap: BundleSet,
}

/// Either kind of config file.
#[derive(Debug)]
pub enum GatewayConfig {
    Static(Box<StaticConfig>),
    Discovery(Box<DiscoveryConfig>),
}

impl GatewayConfig {
    /// Reads `path` and the files it names (relative to its directory).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        fedmesh_dataplane::files::load_config::<GatewayFile>(path)
    }

    /// Parses a config document; `read` fetches the files it names.
    pub fn parse(
        yaml: &str,
        origin: &str,
        read: impl Fn(&Path) -> Result<Vec<u8>, String>,
    ) -> Result<Self, ConfigError> {
        fedmesh_dataplane::files::parse_config::<GatewayFile>(yaml, origin, read)
    }
}

impl ConfigFile for GatewayFile {
    type Config = GatewayConfig;

    fn check(
        self,
        read: &dyn Fn(&Path) -> Result<Vec<u8>, String>,
    ) -> Result<GatewayConfig, String> {
        match self.controller {
            Some(_) => discovery(self, &read).map(|c| GatewayConfig::Discovery(Box::new(c))),
            None => parse_static(self, &read).map(|c| GatewayConfig::Static(Box::new(c))),
        }
    }
}

fn common(f: &GatewayFile) -> Result<TrustDomain, String> {
    f.settings.validate().map_err(|e| format!("settings.{e}"))?;
    validate_label("cluster", &f.cluster).map_err(|e| e.to_string())?;
    let td = TrustDomain::new(&f.trust_domain).map_err(|e| format!("trustDomain: {e}"))?;
    if let Some(z) = &f.zone {
        validate_label("zone", z).map_err(|e| e.to_string())?;
    }
    Ok(td)
}

fn discovery(
    f: GatewayFile,
    read: &impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<DiscoveryConfig, String> {
    let td = common(&f)?;
    for (present, field) in [
        (f.identity.is_some(), "identity"),
        (f.bundles.is_some(), "bundles"),
        (!f.peers.is_empty(), "peers"),
        (!f.services.is_empty(), "services"),
        (!f.policies.is_empty(), "policies"),
    ] {
        if present {
            return Err(format!(
                "{field}: comes from the controller when `controller` is set; remove one of them"
            ));
        }
    }
    let Some(c) = f.controller else {
        return Err("controller: missing".into());
    };
    let (bootstrap, credential) = fedmesh_dataplane::files::credential(
        &td,
        &c.bundle,
        c.join_token_file.as_deref(),
        c.service_account_token_file.as_deref(),
        read,
    )?;
    let identity = SpiffeId::gateway(&td, &f.cluster).map_err(|e| e.to_string())?;
    let controller = SpiffeId::controller(&td, &f.cluster).map_err(|e| e.to_string())?;
    Ok(DiscoveryConfig {
        access: ControllerAccess {
            address: c.address.resolve()?,
            controller,
            node: identity.to_string(),
            identity,
            credential,
        },
        local: Local {
            cluster: f.cluster,
            trust_domain: td,
            zone: f.zone,
        },
        listen: f.listen,
        settings: f.settings,
        bootstrap,
    })
}

pub use fedmesh_dataplane::ConfigError;
use fedmesh_dataplane::ConfigFile;

impl StaticConfig {
    /// Reads a static config; a discovery-mode file is an error here.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::only(GatewayConfig::load(path)?, &path.display().to_string())
    }

    /// Parses a static config document; `read` fetches the files it names.
    pub fn parse(
        yaml: &str,
        origin: &str,
        read: impl Fn(&Path) -> Result<Vec<u8>, String>,
    ) -> Result<Self, ConfigError> {
        Self::only(GatewayConfig::parse(yaml, origin, read)?, origin)
    }

    fn only(c: GatewayConfig, origin: &str) -> Result<Self, ConfigError> {
        match c {
            GatewayConfig::Static(s) => Ok(*s),
            GatewayConfig::Discovery(_) => Err(ConfigError {
                origin: origin.into(),
                message: "controller: this file configures discovery mode, not a static gateway"
                    .into(),
            }),
        }
    }
}

fn parse_static(
    f: GatewayFile,
    read: &impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<StaticConfig, String> {
    let td = common(&f)?;
    let mut routes = Routes::new(&f.cluster, td.clone());
    routes.zone = f.zone;

    let mut bundles = BundleSet::new();
    let Some(bundle_files) = &f.bundles else {
        return Err(
            "bundles: missing (or set `controller` to take them from the controller)".into(),
        );
    };
    for (name, file) in bundle_files {
        let at = format!("bundles.{name}");
        let btd = TrustDomain::new(name).map_err(|e| format!("{at}: {e}"))?;
        let doc = read(file).map_err(|e| format!("{at}: {e}"))?;
        let b = Bundle::from_document(btd, &doc, &file.display().to_string())
            .map_err(|e| format!("{at}: {e}"))?;
        bundles.insert(b);
    }
    if bundles.get(&td).is_none() {
        return Err(format!(
            "bundles: no bundle for this cluster's own trust domain {td}"
        ));
    }

    routes.peers = fedmesh_dataplane::peers::check(&routes.cluster, &f.peers, &bundles)?;

    let policies = fedmesh_api::policy::by_service(&f.policies)?;
    for (i, s) in f.services.into_iter().enumerate() {
        let at = format!("services[{i}]");
        let key: ServiceKey = s.name.parse().map_err(|e| format!("{at}.name: {e}"))?;
        let policy = fedmesh_api::policy::effective(
            &s.name,
            policies.get(&s.name),
            policies.get(fedmesh_api::policy::DEFAULT_SERVICE),
        );
        if policy.as_ref().is_some_and(|p| !p.exported_by(&f.cluster)) {
            continue; // Its policy's export.clusters leaves this cluster out.
        }
        let from_policy = policy.as_ref().and_then(crate::discovered::allow_rules);
        if s.allow.is_some() && from_policy.is_some() {
            return Err(format!(
                "{at}.allow: its policy's export.allow says who may call it too; keep one"
            ));
        }
        let at = format!("{at} ({key})");
        validate_label("namespace", &key.namespace).map_err(|e| format!("{at}: {e}"))?;
        validate_label("service name", &key.name).map_err(|e| format!("{at}: {e}"))?;
        let listed =
            LocalService::from_listed(s.ports, s.endpoints).map_err(|e| format!("{at}.{e}"))?;
        let allow = match s.allow {
            None => from_policy,
            Some(rules) => {
                let mut out = Vec::with_capacity(rules.len());
                for (j, r) in rules.into_iter().enumerate() {
                    let at = format!("{at}.allow[{j}]");
                    if !routes.peers.contains_key(&r.cluster) {
                        return Err(format!(
                            "{at}.cluster: {:?} is not one of the peers",
                            r.cluster
                        ));
                    }
                    let identities = r
                        .identities
                        .iter()
                        .enumerate()
                        .map(|(k, id)| {
                            SpiffeId::parse(id).map_err(|e| format!("{at}.identities[{k}]: {e}"))
                        })
                        .collect::<Result<_, _>>()?;
                    out.push(AllowRule {
                        cluster: r.cluster,
                        identities,
                    });
                }
                Some(out)
            }
        };
        let svc = ExportedService {
            ports: listed.ports,
            endpoints: listed.endpoints,
            allow,
        };
        if routes.services.insert(key.clone(), svc).is_some() {
            return Err(format!("{at}: service {key} is listed twice"));
        }
    }

    let Some(identity) = &f.identity else {
        return Err("identity: missing (or set `controller` to get it from the controller)".into());
    };
    let cert = read(&identity.certificate).map_err(|e| format!("identity.certificate: {e}"))?;
    let key = read(&identity.key).map_err(|e| format!("identity.key: {e}"))?;
    let svid = Svid::from_pem(&cert, &key, &identity.certificate.display().to_string())
        .map_err(|e| format!("identity: {e}"))?;
    let want = SpiffeId::gateway(&td, &routes.cluster).map_err(|e| e.to_string())?;
    if svid.spiffe_id() != &want {
        return Err(format!(
            "identity.certificate: the SVID is {}, but this gateway is {want}",
            svid.spiffe_id()
        ));
    }
    Ok(StaticConfig {
        listen: f.listen,
        settings: f.settings,
        routes,
        svid,
        bundles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_trust::{CaOptions, ClusterCa, SvidPolicy};
    use std::collections::HashMap;
    use std::time::SystemTime;

    /// A valid document, and the files it names.
    fn fixture() -> (String, HashMap<PathBuf, Vec<u8>>) {
        let td = TrustDomain::new("gcp.example").unwrap();
        let peer = TrustDomain::new("aws.example").unwrap();
        let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
        let pca = ClusterCa::generate(&peer, &CaOptions::default(), SystemTime::now()).unwrap();
        let id = SpiffeId::gateway(&td, "gcp-usc1").unwrap();
        let svid = ca
            .issue(&id, &SvidPolicy::default(), SystemTime::now())
            .unwrap();
        let files = HashMap::from([
            (PathBuf::from("gw.pem"), svid.chain_pem().into_bytes()),
            (PathBuf::from("gw-key.pem"), svid.key_pem().into_bytes()),
            (
                PathBuf::from("own.json"),
                Bundle::with_roots(td, [ca.cert_der().clone()])
                    .to_document()
                    .into_bytes(),
            ),
            (
                PathBuf::from("aws.json"),
                Bundle::with_roots(peer, [pca.cert_der().clone()])
                    .to_document()
                    .into_bytes(),
            ),
        ]);
        let yaml = r#"cluster: gcp-usc1
trustDomain: gcp.example
zone: usc1-a
listen: {quic: "127.0.2.1:15443"}
identity: {certificate: gw.pem, key: gw-key.pem}
bundles: {gcp.example: own.json, aws.example: aws.json}
peers:
  - {cluster: aws-use1, trustDomain: aws.example, gateways: ["127.0.1.1:15443"]}
services:
  - name: shop/checkout
    ports: [8080]
    endpoints: [{address: "127.0.2.10:8080", zone: usc1-a}]
    allow: [{cluster: aws-use1}]
settings: {idleTimeout: 2s}
"#;
        (yaml.to_string(), files)
    }

    fn parse(yaml: &str, files: &HashMap<PathBuf, Vec<u8>>) -> Result<StaticConfig, ConfigError> {
        StaticConfig::parse(yaml, "gw.yaml", |p| {
            files
                .get(p)
                .cloned()
                .ok_or_else(|| format!("no file {}", p.display()))
        })
    }

    #[test]
    fn a_full_document_loads() {
        let (yaml, files) = fixture();
        let c = parse(&yaml, &files).unwrap();
        assert_eq!(c.routes.cluster, "gcp-usc1");
        assert_eq!(c.routes.peers["aws-use1"].gateways.len(), 1);
        assert_eq!(c.settings.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.settings.keep_alive, Settings::default().keep_alive);
        assert_eq!(c.bundles.len(), 2);
    }

    #[test]
    fn discovery_mode_takes_only_the_controller() {
        let (_, mut files) = fixture();
        files.insert(
            PathBuf::from("token"),
            b"gateway-token-0123456789\n".to_vec(),
        );
        let yaml = r#"cluster: gcp-usc1
trustDomain: gcp.example
zone: usc1-a
listen: {quic: "127.0.2.1:15443", egress: "127.0.2.1:15001"}
controller: {address: "127.0.2.2:15010", bundle: own.json, joinTokenFile: token}
"#;
        let read = |p: &Path| {
            files
                .get(p)
                .cloned()
                .ok_or_else(|| format!("no file {}", p.display()))
        };
        let GatewayConfig::Discovery(c) = GatewayConfig::parse(yaml, "gw.yaml", read).unwrap()
        else {
            panic!("a static config")
        };
        assert_eq!(
            c.access.credential,
            fedmesh_discovery::Credential::JoinToken("gateway-token-0123456789".into())
        );
        assert_eq!(
            c.access.identity.to_string(),
            "spiffe://gcp.example/fedmesh/gateway/gcp-usc1"
        );
        assert_eq!(
            c.access.controller.to_string(),
            "spiffe://gcp.example/fedmesh/controller/gcp-usc1"
        );
        assert_eq!(c.bootstrap.len(), 1);

        // On Kubernetes: a projected ServiceAccount token, read at each use.
        let on_kube = yaml.replace(
            "joinTokenFile: token",
            "serviceAccountTokenFile: /var/run/secrets/fedmesh/token",
        );
        let GatewayConfig::Discovery(c) = GatewayConfig::parse(&on_kube, "gw.yaml", read).unwrap()
        else {
            panic!("a discovery config")
        };
        assert_eq!(
            c.access.credential,
            fedmesh_discovery::Credential::ServiceAccountToken(
                "/var/run/secrets/fedmesh/token".into()
            )
        );
        let both = yaml.replace(
            "joinTokenFile: token",
            "joinTokenFile: token, serviceAccountTokenFile: t",
        );
        let err = GatewayConfig::parse(&both, "gw.yaml", read)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("exactly one of joinTokenFile"), "{err}");

        for (extra, want) in [
            (
                "peers: [{cluster: aws, trustDomain: aws.example, gateways: []}]\n",
                "peers:",
            ),
            ("bundles: {gcp.example: own.json}\n", "bundles:"),
        ] {
            let err = GatewayConfig::parse(&format!("{yaml}{extra}"), "gw.yaml", read)
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains(want) && err.contains("controller"), "{err}");
        }
        let missing = yaml.replace("bundle: own.json", "bundle: gone.json");
        let err = GatewayConfig::parse(&missing, "gw.yaml", read)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("controller.bundle"), "{err}");
        assert!(
            StaticConfig::parse(yaml, "gw.yaml", read)
                .err()
                .unwrap()
                .to_string()
                .contains("discovery mode")
        );
    }

    #[test]
    fn each_mistake_is_named() {
        let (yaml, files) = fixture();
        let cases = [
            ("zone: usc1-a", "zone: USC1", "zone"),
            (
                "idleTimeout: 2s",
                "idleTimeout: 50ms",
                "settings.idleTimeout",
            ),
            ("idleTimeout: 2s", "idleTimeuot: 2s", "idleTimeuot"),
            ("\"127.0.1.1:15443\"", "\"nowhere\"", "peers[0].gateways[0]"),
            (
                "aws.example: aws.json",
                "aws.example: missing.json",
                "bundles.aws.example",
            ),
            ("gcp.example: own.json, ", "", "own trust domain"),
            ("name: shop/checkout", "name: checkout", "services[0].name"),
            (
                "ports: [8080]",
                "ports: []",
                "services[0] (shop/checkout).ports",
            ),
            ("\"127.0.2.10:8080\"", "\"x\"", "endpoints[0].address"),
            (
                "allow: [{cluster: aws-use1}]",
                "allow: [{cluster: azure}]",
                "allow[0].cluster",
            ),
            (
                "cluster: gcp-usc1",
                "cluster: gcp-other",
                "but this gateway is",
            ),
        ];
        for (from, to, want) in cases {
            let bad = yaml.replacen(from, to, 1);
            assert_ne!(bad, yaml, "{from}");
            let err = parse(&bad, &files).err().unwrap().to_string();
            assert!(err.starts_with("gw.yaml: "), "{err}");
            assert!(err.contains(want), "{err:?} should name {want:?}");
        }
    }

    #[test]
    fn a_static_file_takes_allow_rules_and_export_clusters_from_policies() {
        let (yaml, files) = fixture();
        let policy = |spec: &str| {
            format!(
                "policies:\n  - apiVersion: fedmesh.io/v1\n    kind: GlobalTrafficPolicy\n    metadata: {{name: checkout}}\n    spec: {{service: shop/checkout, {spec}}}\nsettings:"
            )
        };
        let own_allow = "    allow: [{cluster: aws-use1}]\n";
        let without = yaml.replace(own_allow, "");
        let id = "spiffe://aws.example/ns/shop/sa/web";
        let with = without.replacen(
            "settings:",
            &policy(&format!(
                "export: {{allow: [{{cluster: aws-use1, identities: [\"{id}\"]}}]}}"
            )),
            1,
        );
        let c = parse(&with, &files).unwrap();
        let svc = &c.routes.services[&ServiceKey::new("shop", "checkout")];
        let rules = svc.allow.as_ref().unwrap();
        assert_eq!(rules[0].cluster, "aws-use1");
        assert_eq!(rules[0].identities[0].to_string(), id);

        // export.clusters without this cluster: not exported here.
        let elsewhere = without.replacen("settings:", &policy("export: {clusters: [aws-use1]}"), 1);
        assert!(
            parse(&elsewhere, &files)
                .unwrap()
                .routes
                .services
                .is_empty()
        );

        // Both the service and its policy say who may call: refused.
        let both = yaml.replacen("settings:", &policy("export: {allow: []}"), 1);
        let err = parse(&both, &files).err().unwrap().to_string();
        assert!(
            err.contains("services[0].allow: its policy's export.allow"),
            "{err}"
        );
        let bad = without.replacen("settings:", &policy("retries: 99"), 1);
        let err = parse(&bad, &files).err().unwrap().to_string();
        assert!(err.contains("policies[0].spec.retries"), "{err}");
    }
}
