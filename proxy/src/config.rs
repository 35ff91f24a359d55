//! Configuration: the knobs ([`Settings`], each with a production
//! default), and the YAML file a proxy runs from. With `controller:` the
//! proxy takes its identity, bundles and services from the controller;
//! without, everything is in the file (standalone tests, sites without a
//! controller). Plain data: serde with unknown fields refused, then checks
//! that name the field at fault.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use fedmesh_api::policy::{GlobalTrafficPolicy, PolicySpec};
use fedmesh_api::{EgressMode, ListedEndpoint, LocalService, ServiceKey, validate_label};
use fedmesh_dataplane::peers::PeerFile;
use fedmesh_discovery::ControllerAccess;
use fedmesh_trust::{Bundle, BundleSet, SpiffeId, Svid, TrustDomain};
use fedmesh_tunnel::peers::Peers;
use serde::{Deserialize, Serialize};

use crate::balancer::BalancerPolicy;
use crate::budget::BudgetPolicy;
use crate::limits::Limits;
use crate::locality::{DEFAULT_FAILOVER_THRESHOLD, FailoverOrder, Locality};
use crate::outlier::OutlierPolicy;
use crate::table::{RemoteCluster, ServiceSpec};

/// How the proxy behaves. Every field has a production default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Settings {
    /// Connecting to an endpoint, or opening a tunnel through the egress.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The whole request, retries included, until the response headers.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// One attempt, until its response headers. Off when absent.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Retries after a failure once the request was sent (idempotent
    /// requests without a body only). Failover before the first byte is
    /// not counted: it tries every target once.
    pub retries: u32,
    /// Retries may add this share of the last 10 s of requests...
    pub retry_budget_ratio: f64,
    /// ...plus this many per second.
    pub retry_budget_min_per_second: u32,
    /// A level keeps all its traffic while this share of it is healthy.
    pub failover_threshold: f64,
    /// The order of priorities for every service: `locality` (zone,
    /// region, cloud, the rest), `{levels: [...]}` or `{clusters: [...]}`.
    pub failover: FailoverOrder,
    /// How long a recovered level must stay recovered before traffic
    /// returns to it.
    #[serde(with = "humantime_serde")]
    pub failback_hold: Duration,
    pub outlier: OutlierSettings,
    /// Per service: upstream connections, and requests waiting.
    pub max_connections: u32,
    pub max_pending_requests: u32,
    /// An idle upstream connection is closed after this long.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle upstream connections kept per target.
    pub pool_max_idle_per_target: usize,
    /// One line per request through tracing: `off`, `text` or `json`.
    pub access_log: AccessLog,
    /// On SIGTERM: how long live requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// OTLP/gRPC collector for traces (`http://host:4317`). Off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// A request for a service the proxy does not hold yet waits this long
    /// for the controller to send it (on-demand discovery), then is a 404.
    #[serde(with = "humantime_serde")]
    pub on_demand_timeout: Duration,
    /// An app's connection must send its first request's headers within
    /// this (and each request's headers, once begun, within this too).
    #[serde(with = "humantime_serde")]
    pub downstream_header_timeout: Duration,
    /// An app's connection with nothing in flight for this long is closed.
    #[serde(with = "humantime_serde")]
    pub downstream_idle_timeout: Duration,
    /// App connections to the HTTP listener at once; at most three quarters
    /// of the process's file descriptor limit. At the cap a new connection
    /// closes the oldest idle one, so idle connections never starve a real
    /// request.
    pub max_downstream_connections: u32,
    /// How remote clusters are reached: `direct` (QUIC from this proxy to
    /// their ingress gateways, with its own SVID) or `gateway` (through the
    /// local egress gateways listed under `gateways`). Absent: what the
    /// cluster's registration says (from the controller), or `direct` in a
    /// static file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressMode>,
    /// The local address QUIC to remote gateways is sent from. Absent: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_address: Option<IpAddr>,
    /// QUIC keep-alive towards remote gateways...
    #[serde(with = "humantime_serde")]
    pub quic_keep_alive: Duration,
    /// ...and the silence after which one is dead: its connection closes,
    /// and new streams go to its cluster's next gateway.
    #[serde(with = "humantime_serde")]
    pub quic_idle_timeout: Duration,
    /// Name servers (ip:port) for remote gateways given by DNS name. Empty:
    /// the system's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<SocketAddr>,
    /// The largest UDP payload QUIC's path MTU discovery may probe for, as
    /// a gateway's `maxUdpPayload`: raise it only on networks known to
    /// carry jumbo frames.
    pub max_udp_payload: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    pub max_ejection_percent: u8,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        let p = OutlierPolicy::default();
        Self {
            consecutive_failures: p.consecutive_failures,
            base_ejection: p.base_ejection,
            max_ejection: p.max_ejection,
            max_ejection_percent: p.max_ejection_percent,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        let budget = BudgetPolicy::default();
        let limits = Limits::default();
        Self {
            connect_timeout: Duration::from_secs(1),
            // Envoy's and Istio's route timeout.
            request_timeout: Duration::from_secs(15),
            per_try_timeout: None,
            retries: 2,
            retry_budget_ratio: budget.ratio,
            retry_budget_min_per_second: budget.min_per_second,
            failover_threshold: DEFAULT_FAILOVER_THRESHOLD,
            failover: FailoverOrder::Locality,
            failback_hold: BalancerPolicy::default().failback_hold,
            outlier: OutlierSettings::default(),
            max_connections: limits.max_connections,
            max_pending_requests: limits.max_pending,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_target: 32,
            access_log: AccessLog::Off,
            drain_timeout: Duration::from_secs(30),
            otlp_endpoint: None,
            on_demand_timeout: Duration::from_secs(2),
            downstream_header_timeout: Duration::from_secs(10),
            downstream_idle_timeout: Duration::from_secs(300),
            max_downstream_connections: 10_000,
            egress: None,
            source_address: None,
            // As a gateway's: a frozen remote gateway is noticed within a
            // second, so that failover meets its RTO.
            quic_keep_alive: Duration::from_millis(150),
            quic_idle_timeout: Duration::from_millis(700),
            dns_servers: Vec::new(),
            max_udp_payload: 1452,
        }
    }
}

impl Settings {
    pub fn validate(&self) -> Result<(), String> {
        for (name, d) in [
            ("connectTimeout", self.connect_timeout),
            ("requestTimeout", self.request_timeout),
            ("poolIdleTimeout", self.pool_idle_timeout),
            ("outlier.baseEjection", self.outlier.base_ejection),
            ("downstreamHeaderTimeout", self.downstream_header_timeout),
            ("downstreamIdleTimeout", self.downstream_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be non-zero"));
            }
        }
        if let Some(t) = self.per_try_timeout
            && (t.is_zero() || t > self.request_timeout)
        {
            return Err(format!(
                "perTryTimeout: {} ms must be non-zero and at most requestTimeout ({} ms)",
                t.as_millis(),
                self.request_timeout.as_millis()
            ));
        }
        if !(self.failover_threshold > 0.0 && self.failover_threshold <= 1.0) {
            return Err(format!(
                "failoverThreshold: {} is outside (0, 1]",
                self.failover_threshold
            ));
        }
        self.failover
            .validate()
            .map_err(|e| format!("failover.{e}"))?;
        if !(0.0..=1.0).contains(&self.retry_budget_ratio) {
            return Err(format!(
                "retryBudgetRatio: {} is outside [0, 1]",
                self.retry_budget_ratio
            ));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!(
                "otlpEndpoint: {e:?} must be an http:// or https:// URL"
            ));
        }
        if self.outlier.max_ejection < self.outlier.base_ejection {
            return Err("outlier.maxEjection must be at least outlier.baseEjection".into());
        }
        if self.outlier.max_ejection_percent > 100 {
            return Err("outlier.maxEjectionPercent must be at most 100".into());
        }
        if self.outlier.consecutive_failures == 0 {
            return Err("outlier.consecutiveFailures must be at least 1".into());
        }
        if self.max_downstream_connections == 0 {
            return Err("maxDownstreamConnections must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_pending_requests == 0 {
            return Err("maxConnections and maxPendingRequests must be at least 1".into());
        }
        if !(1200..=65527).contains(&self.max_udp_payload) {
            return Err(format!(
                "maxUdpPayload: {} is outside 1200-65527",
                self.max_udp_payload
            ));
        }
        if self.quic_idle_timeout < Duration::from_millis(100) {
            return Err(format!(
                "quicIdleTimeout: {} ms is too short; use at least 100ms",
                self.quic_idle_timeout.as_millis()
            ));
        }
        if self.quic_keep_alive.is_zero() || self.quic_keep_alive * 2 > self.quic_idle_timeout {
            return Err(format!(
                "quicKeepAlive: {} ms must be non-zero and at most half of quicIdleTimeout ({} ms)",
                self.quic_keep_alive.as_millis(),
                self.quic_idle_timeout.as_millis()
            ));
        }
        Ok(())
    }

    /// The fields of `new` that differ from these and only take effect at
    /// a restart (listeners, pools, logs, tracing). Every other field is
    /// per service, and applies when a static file is re-read.
    pub fn restart_only_changes(&self, new: &Settings) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut differs = |name, changed: bool| {
            if changed {
                out.push(name);
            }
        };
        differs(
            "connectTimeout",
            self.connect_timeout != new.connect_timeout,
        );
        differs(
            "poolIdleTimeout",
            self.pool_idle_timeout != new.pool_idle_timeout,
        );
        differs(
            "poolMaxIdlePerTarget",
            self.pool_max_idle_per_target != new.pool_max_idle_per_target,
        );
        differs("accessLog", self.access_log != new.access_log);
        differs("drainTimeout", self.drain_timeout != new.drain_timeout);
        differs("otlpEndpoint", self.otlp_endpoint != new.otlp_endpoint);
        differs(
            "onDemandTimeout",
            self.on_demand_timeout != new.on_demand_timeout,
        );
        differs("sourceAddress", self.source_address != new.source_address);
        differs("quicKeepAlive", self.quic_keep_alive != new.quic_keep_alive);
        differs(
            "quicIdleTimeout",
            self.quic_idle_timeout != new.quic_idle_timeout,
        );
        differs("dnsServers", self.dns_servers != new.dns_servers);
        differs("maxUdpPayload", self.max_udp_payload != new.max_udp_payload);
        out
    }

    pub fn balancer(&self) -> BalancerPolicy {
        BalancerPolicy {
            failover_threshold: self.failover_threshold,
            failback_hold: self.failback_hold,
            outlier: OutlierPolicy {
                consecutive_failures: self.outlier.consecutive_failures,
                base_ejection: self.outlier.base_ejection,
                max_ejection: self.outlier.max_ejection,
                max_ejection_percent: self.outlier.max_ejection_percent,
            },
            ..BalancerPolicy::default()
        }
    }

    pub fn budget(&self) -> BudgetPolicy {
        BudgetPolicy {
            ratio: self.retry_budget_ratio,
            min_per_second: self.retry_budget_min_per_second,
            ..BudgetPolicy::default()
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections,
            max_pending: self.max_pending_requests,
        }
    }
}

/// Where the proxy listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Outbound HTTP/1.1 and h2c. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// One listener per TCP service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpListen>,
    /// HTTP: /metrics, /ready, /live. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListen {
    pub address: SocketAddr,
    /// `namespace/name`.
    pub service: ServiceKey,
}

/// The proxy's YAML file, as written. `ProxyConfig::parse` checks it;
/// `fedmesh up` writes it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyFile {
    pub cluster: String,
    pub trust_domain: String,
    pub locality: LocalityFile,
    pub listen: Listen,
    /// The local gateways' egress listeners, for remote targets when
    /// `settings.egress` is `gateway`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<SocketAddr>,
    /// Other clusters and their ingress gateways, for remote targets when
    /// `settings.egress` is `direct` (a static file; the controller sends
    /// them otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityFiles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundles: Option<BTreeMap<String, PathBuf>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceFile>,
    /// Global traffic policies (the resource `fedmesh apply` takes), for a
    /// proxy without a controller: each applies to its service, the
    /// default (`service: "*"`) to every service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<GlobalTrafficPolicy>,
    #[serde(default)]
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityFile {
    pub cloud: String,
    pub region: String,
    pub zone: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ControllerFile {
    pub address: fedmesh_dataplane::files::ControllerAddress,
    /// This cluster's own bundle document, to verify the controller.
    pub bundle: PathBuf,
    /// A join token, for the first SVID; or, on Kubernetes,
    /// `serviceAccountTokenFile`: exactly one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<PathBuf>,
    /// A projected ServiceAccount token (audience `fedmesh`), read at each
    /// use since the kubelet rotates it. The controller checks it with a
    /// TokenReview; the identity must be that ServiceAccount's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_token_file: Option<PathBuf>,
    /// The workload identity to ask for: `ns/<namespace>/sa/<account>`.
    pub namespace: String,
    pub service_account: String,
    /// The services to hold from the start (`namespace/name`,
    /// `namespace/*`), or `["*"]` for every service of the mesh. Others
    /// come on demand, at their first request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// `namespace/name`.
    pub name: ServiceKey,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ListedEndpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<RemoteFile>,
    /// Overrides `settings.failover` for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverOrder>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteFile {
    pub cluster: String,
    pub cloud: String,
    pub region: String,
    pub healthy: u64,
    pub total: u64,
}

/// Who this proxy is, in both modes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub locality: Locality,
}

/// What both modes share.
#[derive(Debug, Clone)]
pub struct Common {
    pub me: Me,
    pub listen: Listen,
    pub gateways: Vec<SocketAddr>,
    pub settings: Settings,
}

#[derive(Debug)]
pub struct StaticConfig {
    pub common: Common,
    pub services: Vec<ServiceSpec>,
    pub peers: Peers,
    pub svid: Svid,
    pub bundles: BundleSet,
}

#[derive(Debug)]
pub struct DiscoveryConfig {
    pub common: Common,
    pub access: ControllerAccess,
    pub bootstrap: BundleSet,
    /// What to ask the controller for: every service (`["*"]`), or a
    /// subscription that grows on demand (the default, empty at first).
    pub scope: fedmesh_proto::discovery::v1::Scope,
    pub subscribe: Vec<String>,
}

#[derive(Debug)]
pub enum ProxyConfig {
    Static(Box<StaticConfig>),
    Discovery(Box<DiscoveryConfig>),
}

pub use fedmesh_dataplane::ConfigError;
use fedmesh_dataplane::ConfigFile;

impl ProxyConfig {
    /// Reads `path` and the files it names (relative to its directory).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        fedmesh_dataplane::files::load_config::<ProxyFile>(path)
    }

    /// Parses a config document; `read` fetches the files it names.
    pub fn parse(
        yaml: &str,
        origin: &str,
        read: impl Fn(&Path) -> Result<Vec<u8>, String>,
    ) -> Result<Self, ConfigError> {
        fedmesh_dataplane::files::parse_config::<ProxyFile>(yaml, origin, read)
    }

    pub fn common(&self) -> &Common {
        match self {
            ProxyConfig::Static(s) => &s.common,
            ProxyConfig::Discovery(d) => &d.common,
        }
    }
}

impl ConfigFile for ProxyFile {
    type Config = ProxyConfig;

    fn check(self, read: &dyn Fn(&Path) -> Result<Vec<u8>, String>) -> Result<ProxyConfig, String> {
        let common = common(&self)?;
        match self.controller {
            Some(_) if !self.policies.is_empty() => Err(
                "policies: come from the controller when `controller` is set (`fedmesh apply`); remove them".into(),
            ),
            Some(_) if !self.peers.is_empty() => Err(
                "peers: come from the controller when `controller` is set; remove them".into(),
            ),
            Some(c) => discovery(common, c, self.identity, self.bundles, self.services, &read)
                .map(|c| ProxyConfig::Discovery(Box::new(c))),
            None => {
                let policies = fedmesh_api::policy::by_service(&self.policies)?;
                let files = StaticFiles {
                    identity: self.identity,
                    bundles: self.bundles,
                    services: self.services,
                    peers: self.peers,
                };
                parse_static(common, files, &policies, &read)
                    .map(|c| ProxyConfig::Static(Box::new(c)))
            }
        }
    }
}

fn common(f: &ProxyFile) -> Result<Common, String> {
    f.settings.validate().map_err(|e| format!("settings.{e}"))?;
    validate_label("cluster", &f.cluster).map_err(|e| e.to_string())?;
    let trust_domain =
        TrustDomain::new(&f.trust_domain).map_err(|e| format!("trustDomain: {e}"))?;
    for (field, v) in [
        ("cloud", &f.locality.cloud),
        ("region", &f.locality.region),
        ("zone", &f.locality.zone),
    ] {
        validate_label(field, v).map_err(|e| format!("locality.{field}: {e}"))?;
    }
    if f.listen.http.is_none() && f.listen.tcp.is_empty() {
        return Err("listen: give `http`, `tcp` or both; the proxy would serve nothing".into());
    }
    let mut seen = Vec::new();
    for (i, t) in f.listen.tcp.iter().enumerate() {
        if Some(t.address) == f.listen.http || Some(t.address) == f.listen.admin {
            return Err(format!(
                "listen.tcp[{i}].address: {} is already the http or admin listener",
                t.address
            ));
        }
        if seen.contains(&t.address) {
            return Err(format!(
                "listen.tcp[{i}].address: {} is listed twice",
                t.address
            ));
        }
        seen.push(t.address);
    }
    Ok(Common {
        me: Me {
            cluster: f.cluster.clone(),
            trust_domain,
            locality: Locality {
                cloud: f.locality.cloud.clone(),
                region: f.locality.region.clone(),
                zone: f.locality.zone.clone(),
            },
        },
        listen: f.listen.clone(),
        gateways: f.gateways.clone(),
        settings: f.settings.clone(),
    })
}

fn discovery(
    common: Common,
    c: ControllerFile,
    identity: Option<IdentityFiles>,
    bundles: Option<BTreeMap<String, PathBuf>>,
    services: Vec<ServiceFile>,
    read: &impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<DiscoveryConfig, String> {
    for (present, field) in [
        (identity.is_some(), "identity"),
        (bundles.is_some(), "bundles"),
        (!services.is_empty(), "services"),
    ] {
        if present {
            return Err(format!(
                "{field}: comes from the controller when `controller` is set; remove one of them"
            ));
        }
    }
    let td = common.me.trust_domain.clone();
    let (bootstrap, credential) = fedmesh_dataplane::files::credential(
        &td,
        &c.bundle,
        c.join_token_file.as_deref(),
        c.service_account_token_file.as_deref(),
        read,
    )?;
    let identity = SpiffeId::workload(&td, &c.namespace, &c.service_account)
        .map_err(|e| format!("controller.namespace / serviceAccount: {e}"))?;
    let controller = SpiffeId::controller(&td, &common.me.cluster).map_err(|e| e.to_string())?;
    let (scope, subscribe) = subscription(&c.services, &common.listen)?;
    Ok(DiscoveryConfig {
        scope,
        subscribe,
        access: ControllerAccess {
            address: c.address.resolve()?,
            controller,
            node: format!("proxy/{}/{}", common.me.cluster, identity),
            identity,
            credential,
        },
        common,
        bootstrap,
    })
}

/// The scope a proxy asks for: `["*"]` is everything; otherwise the listed
/// services, plus those its TCP listeners map, and more on demand.
fn subscription(
    services: &[String],
    listen: &Listen,
) -> Result<(fedmesh_proto::discovery::v1::Scope, Vec<String>), String> {
    use fedmesh_proto::discovery::v1::Scope;
    if services.iter().any(|s| s == "*") {
        if services.len() > 1 {
            return Err("controller.services: \"*\" (every service) stands alone".into());
        }
        return Ok((Scope::All, Vec::new()));
    }
    for (i, s) in services.iter().enumerate() {
        let ok = match s.split_once('/') {
            Some((ns, name)) => {
                validate_label("namespace", ns).is_ok()
                    && (name == "*" || validate_label("name", name).is_ok())
            }
            None => false,
        };
        if !ok {
            return Err(format!(
                "controller.services[{i}]: {s:?} is not namespace/name, namespace/* or \"*\""
            ));
        }
    }
    let mut subscribe = services.to_vec();
    subscribe.extend(listen.tcp.iter().map(|t| t.service.to_string()));
    Ok((Scope::Listed, subscribe))
}

/// A service's effective policy in a static file: its own over the default.
fn effective(policies: &BTreeMap<String, PolicySpec>, key: &ServiceKey) -> Option<PolicySpec> {
    let service = key.to_string();
    fedmesh_api::policy::effective(
        &service,
        policies.get(&service),
        policies.get(fedmesh_api::policy::DEFAULT_SERVICE),
    )
}

/// What a static file adds to the common fields.
struct StaticFiles {
    identity: Option<IdentityFiles>,
    bundles: Option<BTreeMap<String, PathBuf>>,
    services: Vec<ServiceFile>,
    peers: Vec<PeerFile>,
}

fn parse_static(
    common: Common,
    files: StaticFiles,
    policies: &BTreeMap<String, PolicySpec>,
    read: &impl Fn(&Path) -> Result<Vec<u8>, String>,
) -> Result<StaticConfig, String> {
    let StaticFiles {
        identity,
        bundles: bundle_files,
        services,
        peers,
    } = files;
    let mut bundles = BundleSet::new();
    for (name, file) in bundle_files.iter().flatten() {
        let at = format!("bundles.{name}");
        let td = TrustDomain::new(name).map_err(|e| format!("{at}: {e}"))?;
        let doc = read(file).map_err(|e| format!("{at}: {e}"))?;
        let b = Bundle::from_document(td, &doc, &file.display().to_string())
            .map_err(|e| format!("{at}: {e}"))?;
        bundles.insert(b);
    }
    let Some(id) = identity else {
        return Err(
            "identity: missing (or set `controller` to take it from the controller)".into(),
        );
    };
    let cert = read(&id.certificate).map_err(|e| format!("identity.certificate: {e}"))?;
    let key = read(&id.key).map_err(|e| format!("identity.key: {e}"))?;
    let svid = Svid::from_pem(&cert, &key, &id.certificate.display().to_string())
        .map_err(|e| format!("identity: {e}"))?;
    if svid.spiffe_id().trust_domain() != common.me.trust_domain {
        return Err(format!(
            "identity: {} is not of this cluster's trust domain {}",
            svid.spiffe_id(),
            common.me.trust_domain
        ));
    }
    if bundles.get(&common.me.trust_domain).is_none() {
        return Err(format!(
            "bundles: no bundle for this cluster's own trust domain {} (the gateway's egress is verified with it)",
            common.me.trust_domain
        ));
    }
    let peers = fedmesh_dataplane::peers::check(&common.me.cluster, &peers, &bundles)?;
    let egress = common.settings.egress.unwrap_or_default();

    let mut specs: Vec<ServiceSpec> = Vec::new();
    for (i, s) in services.into_iter().enumerate() {
        let at = format!("services[{i}] ({})", s.name);
        if specs.iter().any(|x| x.key == s.name) {
            return Err(format!("{at}: listed twice"));
        }
        let listed = LocalService::from_listed(vec![s.port], s.endpoints)
            .map_err(|e| format!("{at}.{e}"))?;
        let mut remote = Vec::with_capacity(s.remote.len());
        for (j, r) in s.remote.into_iter().enumerate() {
            let rat = format!("{at}.remote[{j}]");
            for (field, v) in [
                ("cluster", &r.cluster),
                ("cloud", &r.cloud),
                ("region", &r.region),
            ] {
                validate_label(field, v).map_err(|e| format!("{rat}.{field}: {e}"))?;
            }
            if r.cluster == common.me.cluster {
                return Err(format!("{rat}.cluster: {} is this cluster", r.cluster));
            }
            if r.healthy > r.total {
                return Err(format!(
                    "{rat}: healthy ({}) is more than total ({})",
                    r.healthy, r.total
                ));
            }
            if egress == EgressMode::Direct && !peers.contains_key(&r.cluster) {
                return Err(format!(
                    "{rat}.cluster: {} is not under `peers`; list its gateways there, or set `settings.egress: gateway` to reach it through the local egress",
                    r.cluster
                ));
            }
            remote.push(RemoteCluster {
                cluster: r.cluster,
                cloud: r.cloud,
                region: r.region,
                healthy: r.healthy,
                total: r.total,
            });
        }
        if !remote.is_empty() && egress == EgressMode::Gateway && common.gateways.is_empty() {
            return Err(format!(
                "{at}.remote: with `settings.egress: gateway` remote clusters need a local gateway; list its egress under `gateways`"
            ));
        }
        // The service's own `failover` fills its policy's, when that has none.
        let mut policy = effective(policies, &s.name);
        if let Some(f) = s.failover {
            f.validate().map_err(|e| format!("{at}.failover.{e}"))?;
            let p = policy.get_or_insert_with(|| PolicySpec {
                service: s.name.to_string(),
                ..Default::default()
            });
            p.failover.get_or_insert(f);
        }
        specs.push(ServiceSpec {
            key: s.name,
            port: s.port,
            policy: policy.map(Arc::new),
            local: listed.endpoints,
            remote,
        });
    }
    for (i, t) in common.listen.tcp.iter().enumerate() {
        if !specs.iter().any(|s| s.key == t.service) {
            return Err(format!(
                "listen.tcp[{i}].service: {} is not under `services`",
                t.service
            ));
        }
    }
    Ok(StaticConfig {
        common,
        services: specs,
        peers,
        svid,
        bundles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_discovery::Credential;

    const BASE: &str = "
cluster: aws
trustDomain: aws.fedmesh.test
locality: {cloud: aws, region: use1, zone: az1}
listen: {http: 127.0.1.5:4140}
";

    fn parse(extra: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::parse(&format!("{BASE}{extra}"), "proxy.yaml", |p| {
            Err(format!("no file {}", p.display()))
        })
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::default();
        assert!(s.validate().is_ok());
        assert_eq!(s.connect_timeout, Duration::from_secs(1));
        assert_eq!(s.request_timeout, Duration::from_secs(15));
        assert_eq!(s.retries, 2);
        assert_eq!(s.max_connections, 1024);
        assert!((s.failover_threshold - 1.0 / 1.4).abs() < 1e-9);
    }

    #[test]
    fn bad_fields_are_named() {
        for (extra, want) in [
            ("settings: {retries: -1}\n", "retries"),
            ("settings: {failoverThreshold: 1.5}\n", "failoverThreshold"),
            (
                "settings: {perTryTimeout: 20s}\n",
                "settings.perTryTimeout: 20000 ms",
            ),
            ("settings: {colour: blue}\n", "colour"),
            (
                "settings: {failover: {levels: [zone, zone]}}\n",
                "settings.failover.levels",
            ),
            (
                "identity: {certificate: c.pem, key: k.pem}\n",
                "identity.certificate: no file c.pem",
            ),
            ("", "identity: missing"),
            (
                "controller: {address: 127.0.1.2:15010, bundle: b.json, joinTokenFile: t, namespace: shop, serviceAccount: web}\nservices: [{name: shop/cart, port: 80}]\n",
                "services: comes from the controller",
            ),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.starts_with("proxy.yaml: "), "{e}");
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let e = ProxyConfig::parse(
            &BASE.replace("listen: {http: 127.0.1.5:4140}", "listen: {}"),
            "p.yaml",
            |_| Ok(vec![]),
        )
        .unwrap_err();
        assert!(e.message.contains("would serve nothing"), "{e}");
        let e = ProxyConfig::parse(&BASE.replace("zone: az1", "zone: Az_1"), "p.yaml", |_| {
            Ok(vec![])
        })
        .unwrap_err();
        assert!(e.message.starts_with("locality.zone"), "{e}");
    }

    /// A static file's files: an SVID of aws, and the bundles of aws and
    /// gcp (both from the same CA: only their presence matters here).
    fn static_files() -> impl Fn(&Path) -> Result<Vec<u8>, String> {
        let d = fedmesh_trust::TrustDomain::new("aws.fedmesh.test").unwrap();
        let now = std::time::SystemTime::now();
        let ca = fedmesh_trust::ClusterCa::generate(&d, &Default::default(), now).unwrap();
        let id = SpiffeId::workload(&d, "shop", "web").unwrap();
        let svid = ca.issue(&id, &Default::default(), now).unwrap();
        let gcp = fedmesh_trust::TrustDomain::new("gcp.fedmesh.test").unwrap();
        let gcp_ca = fedmesh_trust::ClusterCa::generate(&gcp, &Default::default(), now).unwrap();
        let (chain, key) = (svid.chain_pem(), svid.key_pem());
        let aws = Bundle::with_roots(d, [ca.cert_der().clone()]).to_document();
        let gcp = Bundle::with_roots(gcp, [gcp_ca.cert_der().clone()]).to_document();
        move |p: &Path| {
            Ok(match p.to_str().unwrap_or("") {
                "c.pem" => &chain,
                "k.pem" => &key,
                "gcp.json" => &gcp,
                _ => &aws,
            }
            .as_bytes()
            .to_vec())
        }
    }

    #[test]
    fn remote_clusters_need_peers_when_direct_and_an_egress_when_through_a_gateway() {
        let files = static_files();
        let head = format!(
            "{BASE}identity: {{certificate: c.pem, key: k.pem}}\nbundles: {{aws.fedmesh.test: b.json, gcp.fedmesh.test: gcp.json}}\nservices:\n  - {{name: shop/cart, port: 80, remote: [{{cluster: gcp, cloud: gcp, region: r1, healthy: 1, total: 1}}]}}\n"
        );
        let parse = |extra: &str| ProxyConfig::parse(&format!("{head}{extra}"), "p.yaml", &files);
        let peers = "peers: [{cluster: gcp, trustDomain: gcp.fedmesh.test, gateways: [\"127.0.2.1:15443\", \"gw.gcp.example:15443\"]}]\n";
        let ProxyConfig::Static(c) = parse(peers).unwrap() else {
            panic!("a static config")
        };
        assert_eq!(c.common.settings.egress, None, "direct unless said");
        assert_eq!(c.peers["gcp"].gateways.len(), 2);

        for (extra, want) in [
            (
                "",
                "services[0] (shop/cart).remote[0].cluster: gcp is not under `peers`",
            ),
            (
                "settings: {egress: gateway}\n",
                "remote clusters need a local gateway; list its egress under `gateways`",
            ),
            (
                "peers: [{cluster: gcp, trustDomain: azure.fedmesh.test, gateways: []}]\n",
                "peers[0] (gcp): no bundle for its trust domain azure.fedmesh.test",
            ),
            (
                "peers: [{cluster: aws, trustDomain: aws.fedmesh.test, gateways: []}]\n",
                "peers[0]: aws is this cluster",
            ),
            (
                "peers: [{cluster: gcp, trustDomain: gcp.fedmesh.test, gateways: [\"127.0.2.1:0\"]}]\n",
                "peers[0].gateways[0]",
            ),
            ("settings: {egress: relay}\n", "egress"),
            (
                "settings: {quicKeepAlive: 500ms}\n",
                "settings.quicKeepAlive: 500 ms must be non-zero and at most half of quicIdleTimeout (700 ms)",
            ),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
        let ProxyConfig::Static(c) =
            parse("gateways: [\"127.0.1.1:15001\"]\nsettings: {egress: gateway}\n").unwrap()
        else {
            panic!("a static config")
        };
        assert_eq!(c.common.settings.egress, Some(EgressMode::Gateway));

        let controller = "controller: {address: 127.0.1.2:15010, bundle: b.json, joinTokenFile: t, namespace: shop, serviceAccount: web}\n";
        let e = ProxyConfig::parse(&format!("{BASE}{controller}{peers}"), "p.yaml", &files)
            .unwrap_err();
        assert!(e.message.contains("peers: come from the controller"), "{e}");
        let moved = Settings {
            source_address: Some("127.0.1.5".parse().unwrap()),
            egress: Some(EgressMode::Gateway),
            ..Settings::default()
        };
        assert_eq!(
            Settings::default().restart_only_changes(&moved),
            ["sourceAddress"],
            "the egress mode applies on a reload; the socket's address does not"
        );
    }

    #[test]
    fn a_controller_is_reached_with_a_join_token_or_a_service_account_token() {
        // b.json is aws's bundle; t a join token.
        let others = static_files();
        let files = move |p: &Path| match p.to_str() {
            Some("t") => Ok(b"proxy-token-0123456789".to_vec()),
            _ => others(p),
        };
        let parse = |controller: &str| {
            ProxyConfig::parse(
                &format!(
                    "{BASE}controller: {{address: 127.0.1.2:15010, bundle: b.json, {controller}namespace: shop, serviceAccount: web}}\n"
                ),
                "p.yaml",
                &files,
            )
        };
        let ProxyConfig::Discovery(d) =
            parse("serviceAccountTokenFile: /var/run/secrets/fedmesh/token, ").unwrap()
        else {
            panic!("a controller config");
        };
        assert_eq!(
            d.access.credential,
            Credential::ServiceAccountToken("/var/run/secrets/fedmesh/token".into()),
            "the token file is read at each use, not now"
        );
        let ProxyConfig::Discovery(d) = parse("joinTokenFile: t, ").unwrap() else {
            panic!("a controller config");
        };
        assert_eq!(
            d.access.credential,
            Credential::JoinToken("proxy-token-0123456789".into())
        );
        for both_or_neither in ["", "joinTokenFile: t, serviceAccountTokenFile: s, "] {
            let e = parse(both_or_neither).unwrap_err();
            assert!(e.message.contains("exactly one of joinTokenFile"), "{e}");
        }
    }

    #[test]
    fn a_static_file_carries_policies_and_says_which_settings_need_a_restart() {
        let files = static_files();
        let policy = |name: &str, service: &str, body: &str| {
            format!(
                "  - apiVersion: fedmesh.io/v1\n    kind: GlobalTrafficPolicy\n    metadata: {{name: {name}}}\n    spec: {{service: {service}, {body}}}\n"
            )
        };
        let file = format!(
            "{BASE}identity: {{certificate: c.pem, key: k.pem}}\nbundles: {{aws.fedmesh.test: b.json}}\nservices:\n  - {{name: shop/cart, port: 80, failover: {{clusters: [gcp]}}}}\n  - {{name: shop/pay, port: 81}}\npolicies:\n{}{}",
            policy("cart", "shop/cart", "retries: 0"),
            policy("all", "\"*\"", "retries: 4, requestTimeout: 3s"),
        );
        let ProxyConfig::Static(c) = ProxyConfig::parse(&file, "p.yaml", &files).unwrap() else {
            panic!("a static config")
        };
        let cart = c.services[0].policy.as_deref().unwrap();
        assert_eq!(cart.retries, Some(0));
        assert_eq!(cart.request_timeout, Some(Duration::from_secs(3)));
        assert_eq!(
            cart.failover,
            Some(FailoverOrder::Clusters(vec!["gcp".into()])),
            "the service's own failover fills the policy's gap"
        );
        assert_eq!(c.services[1].policy.as_deref().unwrap().retries, Some(4));

        let bad = file.replace("retries: 0", "retries: 0, failoverThreshold: 2");
        let e = ProxyConfig::parse(&bad, "p.yaml", &files).unwrap_err();
        assert!(
            e.message.contains("policies[0].spec.failoverThreshold"),
            "{e}"
        );
        let two = file.replace("\"*\"", "shop/cart");
        let e = ProxyConfig::parse(&two, "p.yaml", &files).unwrap_err();
        assert!(e.message.contains("both for service shop/cart"), "{e}");

        let s = Settings::default();
        let changed = Settings {
            retries: 7,
            access_log: AccessLog::Json,
            ..Settings::default()
        };
        assert_eq!(s.restart_only_changes(&changed), ["accessLog"]);
    }
}
