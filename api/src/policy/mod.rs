//! The global traffic policy: one `GlobalTrafficPolicy` resource per service
//! (and at most one mesh-wide default, `service: "*"`), written once by an
//! operator and enforced by every proxy and gateway of the federation.
//!
//! These types are the one definition of the resource: the YAML an operator
//! applies, the JSON stored in etcd (`policies/<name>`), the effective
//! policy the discovery API carries to proxies and gateways, and the
//! published JSON Schema (generated from them) are all this shape. I/O-free.
//!
//! Every field is optional except `service`. A service's effective policy
//! is its own policy over the default, field by field ([`PolicySpec::over`]);
//! what neither sets is the proxy's own setting of the same name.

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ServiceKey, validate_label};

pub const API_VERSION: &str = "fedmesh.io/v1";
pub const KIND: &str = "GlobalTrafficPolicy";
/// `spec.service` of the mesh-wide default.
pub const DEFAULT_SERVICE: &str = "*";

/// Bounds that keep one policy small enough for every proxy to hold.
pub const MAX_ROUTES: usize = 64;
pub const MAX_DESTINATIONS: usize = 16;
pub const MAX_HEADER_MATCHES: usize = 16;
pub const MAX_ALLOW_RULES: usize = 256;
pub const MAX_RETRIES: u32 = 10;
pub const MAX_WEIGHTED_CLUSTERS: usize = 64;

/// A global traffic policy, as applied with `fedmesh apply -f`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(
    title = "GlobalTrafficPolicy",
    description = "How traffic to one service (or, with service \"*\", to every service) flows across the federation."
)]
pub struct GlobalTrafficPolicy {
    /// Always "fedmesh.io/v1".
    pub api_version: String,
    /// Always "GlobalTrafficPolicy".
    pub kind: String,
    pub metadata: Metadata,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The policy's name: a DNS label, unique in the federation; its etcd key
    /// is `policies/<name>`.
    pub name: String,
}

/// What a policy says. Every field but `service` is optional: unset fields
/// come from the mesh-wide default policy, then from the proxy's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    /// The service, "namespace/name", or "*" for the mesh-wide default.
    pub service: String,
    /// Which clusters export the service, and who may call it across
    /// clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportPolicy>,
    /// The order of priorities: "locality" (zone, region, cloud, other),
    /// {levels: [...]} or {clusters: [...]}. Default: locality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverOrder>,
    /// A priority keeps all its traffic while this share of it is healthy;
    /// below, the rest spills to the next. In (0, 1]. Default: 1/1.4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_threshold: Option<f64>,
    /// How long a recovered priority (or weighted cluster) must stay
    /// recovered before traffic returns to it. Default: 30s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub failback_hold: Option<Duration>,
    /// Steady traffic shares between clusters, by cluster name. A weighted
    /// cluster that fails gives its share to the others by the failover
    /// order, and takes it back after failbackHold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BTreeMap<String, u32>>,
    /// HTTP routes, first match wins; a request no route matches goes to
    /// the service itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<Route>>,
    /// The whole request, retries included, until the response headers.
    /// Default: 15s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub request_timeout: Option<Duration>,
    /// One attempt, until its response headers. Default: off.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub per_try_timeout: Option<Duration>,
    /// Retries once a request was sent (idempotent, bodiless requests
    /// only). Default: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Retries may add this share of the last 10 s of requests. Default: 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_ratio: Option<f64>,
    /// ...plus this many retries a second. Default: 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_min_per_second: Option<u32>,
    /// Outlier detection; each field on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierSpec>,
    /// Upstream connections at once, per proxy. Default: 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting or in flight, per proxy. Default: 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportPolicy {
    /// The clusters that export the service. Absent: every cluster that
    /// runs it. A cluster not listed does not export it (its gateways
    /// answer UNKNOWN_SERVICE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<Vec<String>>,
    /// Who may call the service from other clusters. Absent: every
    /// workload of every federated cluster. Present: only those listed
    /// (an empty list closes the service to other clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<AllowRule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// A calling cluster.
    pub cluster: String,
    /// Its workloads allowed, as SPIFFE IDs. Absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Route {
    /// What a request must match; absent matches every request.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RouteMatch>,
    /// Where matching requests go, split by weight.
    pub to: Vec<Destination>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    /// Every header listed must match (names in lower case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, HeaderMatch>>,
    /// The path starts with this ("/v2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The method, in upper case ("GET").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// How one header must look.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum HeaderMatch {
    Exact(String),
    Prefix(String),
    /// true: the header is there; false: it is not.
    Present(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    /// "namespace/name".
    pub service: String,
    /// Relative share among the route's destinations. Default: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierSpec {
    /// Failures in a row that eject a target. Default: 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// The first ejection's length; each next one is longer. Default: 30s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub base_ejection: Option<Duration>,
    /// The longest ejection. Default: 300s.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub max_ejection: Option<Duration>,
    /// At most this share of a service's targets is ejected. Default: 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u8>,
}

/// A field that failed its checks: where (`spec.weights.gcp`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

fn bad(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        path: path.into(),
        message: message.into(),
    }
}

impl GlobalTrafficPolicy {
    /// Checks the whole resource; the error's path starts at the document
    /// (`spec.routes[1].to`).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.api_version != API_VERSION {
            return Err(bad(
                "apiVersion",
                format!("expected {API_VERSION:?}, got {:?}", self.api_version),
            ));
        }
        if self.kind != KIND {
            return Err(bad(
                "kind",
                format!("expected {KIND:?}, got {:?}", self.kind),
            ));
        }
        validate_label("name", &self.metadata.name)
            .map_err(|e| bad("metadata.name", e.to_string()))?;
        self.spec
            .validate()
            .map_err(|e| bad(format!("spec.{}", e.path), e.message))
    }
}

impl PolicySpec {
    pub fn is_default(&self) -> bool {
        self.service == DEFAULT_SERVICE
    }

    /// The service this policy is for; `None` for the default.
    pub fn service_key(&self) -> Option<ServiceKey> {
        if self.is_default() {
            return None;
        }
        self.service.parse().ok()
    }

    /// Checks every field; the error's path is relative to `spec`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !self.is_default() {
            check_service("service", &self.service)?;
        }
        if let Some(e) = &self.export {
            if let Some(cs) = &e.clusters {
                check_clusters("export.clusters", cs)?;
            }
            if let Some(rules) = &e.allow {
                if rules.len() > MAX_ALLOW_RULES {
                    return Err(bad(
                        "export.allow",
                        format!("at most {MAX_ALLOW_RULES} rules"),
                    ));
                }
                for (i, r) in rules.iter().enumerate() {
                    let at = format!("export.allow[{i}]");
                    validate_label("cluster", &r.cluster)
                        .map_err(|e| bad(format!("{at}.cluster"), e.to_string()))?;
                    for (j, id) in r.identities.iter().flatten().enumerate() {
                        check_spiffe_id(id).map_err(|m| bad(format!("{at}.identities[{j}]"), m))?;
                    }
                }
            }
        }
        if let Some(f) = &self.failover {
            f.validate().map_err(|m| bad("failover", m))?;
        }
        if let Some(t) = self.failover_threshold
            && !(t > 0.0 && t <= 1.0)
        {
            return Err(bad("failoverThreshold", format!("{t} is outside (0, 1]")));
        }
        if let Some(w) = &self.weights {
            if w.is_empty() || w.len() > MAX_WEIGHTED_CLUSTERS {
                return Err(bad(
                    "weights",
                    format!("list 1 to {MAX_WEIGHTED_CLUSTERS} clusters"),
                ));
            }
            for c in w.keys() {
                validate_label("cluster", c)
                    .map_err(|e| bad(format!("weights.{c}"), e.to_string()))?;
            }
            if w.values().all(|v| *v == 0) {
                return Err(bad(
                    "weights",
                    "every weight is 0; give at least one cluster a share",
                ));
            }
        }
        if let Some(routes) = &self.routes {
            if self.is_default() {
                return Err(bad(
                    "routes",
                    "the mesh-wide default cannot route: routes belong to one service's policy",
                ));
            }
            check_routes(routes)?;
        }
        for (name, d) in [
            ("failbackHold", self.failback_hold),
            ("requestTimeout", self.request_timeout),
            ("perTryTimeout", self.per_try_timeout),
        ] {
            if let Some(d) = d
                && d.is_zero()
                && name != "failbackHold"
            {
                return Err(bad(name, "must be longer than 0s"));
            }
        }
        if let (Some(t), Some(r)) = (self.per_try_timeout, self.request_timeout)
            && t > r
        {
            return Err(bad(
                "perTryTimeout",
                format!("{t:?} is longer than requestTimeout ({r:?})"),
            ));
        }
        if let Some(r) = self.retries
            && r > MAX_RETRIES
        {
            return Err(bad("retries", format!("{r} is more than {MAX_RETRIES}")));
        }
        if let Some(r) = self.retry_budget_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(bad("retryBudgetRatio", format!("{r} is outside [0, 1]")));
        }
        if let Some(o) = &self.outlier {
            if o.consecutive_failures == Some(0) {
                return Err(bad("outlier.consecutiveFailures", "must be at least 1"));
            }
            if let Some(p) = o.max_ejection_percent
                && p > 100
            {
                return Err(bad(
                    "outlier.maxEjectionPercent",
                    format!("{p} is more than 100"),
                ));
            }
            if o.base_ejection.is_some_and(|d| d.is_zero()) {
                return Err(bad("outlier.baseEjection", "must be longer than 0s"));
            }
            if let (Some(b), Some(m)) = (o.base_ejection, o.max_ejection)
                && m < b
            {
                return Err(bad(
                    "outlier.maxEjection",
                    "is shorter than outlier.baseEjection",
                ));
            }
        }
        for (name, v) in [
            ("maxConnections", self.max_connections),
            ("maxPendingRequests", self.max_pending_requests),
        ] {
            if v == Some(0) {
                return Err(bad(name, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// This policy over `default`, field by field: what this one sets
    /// wins; `export` and `outlier` merge per field inside them too.
    pub fn over(&self, default: &PolicySpec) -> PolicySpec {
        fn pick<T: Clone>(a: &Option<T>, b: &Option<T>) -> Option<T> {
            a.as_ref().or(b.as_ref()).cloned()
        }
        let export = match (&self.export, &default.export) {
            (Some(a), Some(b)) => Some(ExportPolicy {
                clusters: pick(&a.clusters, &b.clusters),
                allow: pick(&a.allow, &b.allow),
            }),
            (a, b) => pick(a, b),
        };
        let outlier = match (&self.outlier, &default.outlier) {
            (Some(a), Some(b)) => Some(OutlierSpec {
                consecutive_failures: a.consecutive_failures.or(b.consecutive_failures),
                base_ejection: a.base_ejection.or(b.base_ejection),
                max_ejection: a.max_ejection.or(b.max_ejection),
                max_ejection_percent: a.max_ejection_percent.or(b.max_ejection_percent),
            }),
            (a, b) => pick(a, b),
        };
        PolicySpec {
            service: self.service.clone(),
            export,
            failover: pick(&self.failover, &default.failover),
            failover_threshold: self.failover_threshold.or(default.failover_threshold),
            failback_hold: self.failback_hold.or(default.failback_hold),
            weights: pick(&self.weights, &default.weights),
            // The default has none.
            routes: self.routes.clone(),
            request_timeout: self.request_timeout.or(default.request_timeout),
            per_try_timeout: self.per_try_timeout.or(default.per_try_timeout),
            retries: self.retries.or(default.retries),
            retry_budget_ratio: self.retry_budget_ratio.or(default.retry_budget_ratio),
            retry_budget_min_per_second: self
                .retry_budget_min_per_second
                .or(default.retry_budget_min_per_second),
            outlier,
            max_connections: self.max_connections.or(default.max_connections),
            max_pending_requests: self.max_pending_requests.or(default.max_pending_requests),
        }
    }

    /// Whether `cluster` exports the service under this policy.
    pub fn exported_by(&self, cluster: &str) -> bool {
        match self.export.as_ref().and_then(|e| e.clusters.as_ref()) {
            Some(cs) => cs.iter().any(|c| c == cluster),
            None => true,
        }
    }

    /// The services this policy's routes send traffic to, other than its own.
    pub fn route_targets(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .flatten()
            .flat_map(|r| &r.to)
            .map(|d| d.service.as_str())
            .filter(move |s| *s != self.service)
    }
}

/// The policies of a config file (`policies:`), each checked, by service
/// ("*" for the default); errors start at `policies[i]`.
pub fn by_service(
    policies: &[GlobalTrafficPolicy],
) -> Result<BTreeMap<String, PolicySpec>, String> {
    for (i, p) in policies.iter().enumerate() {
        p.validate().map_err(|e| format!("policies[{i}].{e}"))?;
    }
    check_set(policies.iter().map(|p| (p.metadata.name.as_str(), &p.spec)))
        .map_err(|e| format!("policies: {e}"))?;
    Ok(policies
        .iter()
        .map(|p| (p.spec.service.clone(), p.spec.clone()))
        .collect())
}

/// A service's effective policy: its own over the default, field by
/// field; `None` when neither exists.
pub fn effective(
    service: &str,
    own: Option<&PolicySpec>,
    default: Option<&PolicySpec>,
) -> Option<PolicySpec> {
    let empty = PolicySpec::default();
    let spec = match (own, default) {
        (None, None) => return None,
        (Some(p), d) => p.over(d.unwrap_or(&empty)),
        (None, Some(d)) => d.over(&empty),
    };
    Some(PolicySpec {
        service: service.to_owned(),
        ..spec
    })
}

/// Checks policies that live together (what etcd would hold after an
/// apply): at most one default, and at most one policy per service.
pub fn check_set<'a>(
    set: impl IntoIterator<Item = (&'a str, &'a PolicySpec)>,
) -> Result<(), String> {
    let mut by_service: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, spec) in set {
        if let Some(other) = by_service.insert(&spec.service, name) {
            let what = if spec.is_default() {
                "the mesh-wide default (service \"*\")".to_string()
            } else {
                format!("service {}", spec.service)
            };
            let (a, b) = if other < name {
                (other, name)
            } else {
                (name, other)
            };
            return Err(format!(
                "policies {a:?} and {b:?} are both for {what}; there can be one"
            ));
        }
    }
    Ok(())
}

fn check_service(path: &str, s: &str) -> Result<ServiceKey, PolicyError> {
    let key: ServiceKey = s
        .parse()
        .map_err(|e| bad(path, format!("{e} (expected \"namespace/name\" or \"*\")")))?;
    validate_label("namespace", &key.namespace).map_err(|e| bad(path, e.to_string()))?;
    validate_label("name", &key.name).map_err(|e| bad(path, e.to_string()))?;
    Ok(key)
}

fn check_clusters(path: &str, cs: &[String]) -> Result<(), PolicyError> {
    if cs.is_empty() {
        return Err(bad(path, "list at least one cluster"));
    }
    for (i, c) in cs.iter().enumerate() {
        validate_label("cluster", c).map_err(|e| bad(format!("{path}[{i}]"), e.to_string()))?;
        if cs[..i].contains(c) {
            return Err(bad(format!("{path}[{i}]"), format!("{c} is listed twice")));
        }
    }
    Ok(())
}

fn check_spiffe_id(id: &str) -> Result<(), String> {
    let rest = id
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{id:?} is not a SPIFFE ID (spiffe://<trust domain>/<path>)"))?;
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    if td.is_empty()
        || path.is_empty()
        || id
            .chars()
            .any(|c| c.is_whitespace() || c == '?' || c == '#')
    {
        return Err(format!(
            "{id:?} is not a workload SPIFFE ID (spiffe://<trust domain>/<path>)"
        ));
    }
    Ok(())
}

fn check_routes(routes: &[Route]) -> Result<(), PolicyError> {
    if routes.is_empty() || routes.len() > MAX_ROUTES {
        return Err(bad("routes", format!("list 1 to {MAX_ROUTES} routes")));
    }
    for (i, r) in routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if let Some(j) = routes[..i].iter().position(|p| p.matches_everything()) {
            return Err(bad(
                at,
                format!("never reached: routes[{j}] matches every request"),
            ));
        }
        if let Some(m) = &r.matches {
            let headers = m.headers.iter().flatten();
            if headers.clone().count() > MAX_HEADER_MATCHES {
                return Err(bad(
                    format!("{at}.match.headers"),
                    format!("at most {MAX_HEADER_MATCHES} headers"),
                ));
            }
            for (name, _) in headers {
                let token = !name.is_empty()
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                    });
                if !token {
                    return Err(bad(
                        format!("{at}.match.headers.{name}"),
                        "a header name in lower case (letters, digits, '-', '_', '.')",
                    ));
                }
            }
            if let Some(p) = &m.path_prefix
                && !p.starts_with('/')
            {
                return Err(bad(
                    format!("{at}.match.pathPrefix"),
                    format!("{p:?} does not start with '/'"),
                ));
            }
            if let Some(method) = &m.method
                && (method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(bad(
                    format!("{at}.match.method"),
                    format!("{method:?} is not a method in upper case"),
                ));
            }
        }
        if r.to.is_empty() || r.to.len() > MAX_DESTINATIONS {
            return Err(bad(
                format!("{at}.to"),
                format!("list 1 to {MAX_DESTINATIONS} destinations"),
            ));
        }
        for (j, d) in r.to.iter().enumerate() {
            check_service(&format!("{at}.to[{j}].service"), &d.service)?;
        }
        if r.to.iter().all(|d| d.weight == Some(0)) {
            return Err(bad(format!("{at}.to"), "every weight is 0"));
        }
    }
    Ok(())
}

impl Route {
    pub fn matches_everything(&self) -> bool {
        self.matches
            .as_ref()
            .is_none_or(|m| *m == RouteMatch::default())
    }
}

/// How close a target is to us; lower is preferred.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Zone = 0,
    Region = 1,
    Cloud = 2,
    Other = 3,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Zone, Level::Region, Level::Cloud, Level::Other];
}

/// How a service's targets are ordered into priorities: the policy's
/// override of the locality order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum FailoverOrder {
    /// Zone, region, cloud, then the rest.
    #[default]
    Locality,
    /// The four levels in this order.
    Levels(Vec<Level>),
    /// Clusters in this order. Our own cluster counts as two priorities
    /// (our zone, then its other zones) and comes first unless listed;
    /// clusters not listed share one priority after every listed one.
    Clusters(Vec<String>),
}

impl FailoverOrder {
    /// The priority of a target in `cluster` at `level` (lower first),
    /// for a proxy in `ours`.
    pub fn priority(&self, ours: &str, cluster: &str, level: Level) -> u8 {
        match self {
            FailoverOrder::Locality => level as u8,
            FailoverOrder::Levels(order) => order
                .iter()
                .position(|l| *l == level)
                .map_or(Level::ALL.len(), |i| i) as u8,
            FailoverOrder::Clusters(list) => {
                let own_listed = list.iter().any(|c| c == ours);
                let mut next = if own_listed { 0 } else { 2 };
                for c in list {
                    if c == cluster {
                        return if c == ours {
                            next + u8::from(level != Level::Zone)
                        } else {
                            next
                        };
                    }
                    next += if c == ours { 2 } else { 1 };
                }
                if cluster == ours {
                    u8::from(level != Level::Zone)
                } else {
                    next
                }
            }
        }
    }

    /// Checks an order from a config; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            FailoverOrder::Locality => Ok(()),
            FailoverOrder::Levels(order) => {
                let mut sorted = order.clone();
                sorted.sort();
                if sorted != Level::ALL {
                    return Err(format!(
                        "levels: list each of zone, region, cloud and other once (got {order:?})"
                    ));
                }
                Ok(())
            }
            FailoverOrder::Clusters(list) => {
                if list.is_empty() || list.len() > 12 {
                    return Err("clusters: list 1 to 12 clusters".into());
                }
                for (i, c) in list.iter().enumerate() {
                    if list[..i].contains(c) {
                        return Err(format!("clusters[{i}]: {c} is listed twice"));
                    }
                }
                Ok(())
            }
        }
    }
}

mod yaml;
pub use yaml::{parse_documents, schema_json};

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &[(&str, &str)] = &[
        (
            "mesh-default.yaml",
            include_str!("../../../policies/examples/mesh-default.yaml"),
        ),
        (
            "checkout.yaml",
            include_str!("../../../policies/examples/checkout.yaml"),
        ),
    ];

    fn doc(spec: &str) -> String {
        format!(
            "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn the_published_schema_is_the_one_the_types_generate() {
        let published = include_str!("../../../policies/global-traffic-policy.schema.json");
        assert!(
            published == schema_json(),
            "policies/global-traffic-policy.schema.json is stale: regenerate it with \
             `cargo run -p fedmesh-api --example policy-schema > policies/global-traffic-policy.schema.json`"
        );
    }

    /// Each document of `text` as written (YAML read as plain data, not
    /// through the types the schema is generated from), checked by an
    /// independent JSON Schema validator: what an editor or CI linter
    /// using the published schema would say.
    fn schema_errors(text: &str) -> Vec<String> {
        let schema: serde_json::Value = serde_json::from_str(&schema_json()).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).unwrap();
        assert!(!docs.is_empty());
        docs.iter()
            .flat_map(|d| {
                validator
                    .iter_errors(d)
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn the_shipped_examples_parse_and_match_the_schema() {
        for (name, text) in SHIPPED {
            parse_documents(text, name).unwrap();
            let errors = schema_errors(text);
            assert!(errors.is_empty(), "{name}: {errors:?}");
        }
        // And the schema is not vacuous: a misspelt field, or a weight
        // written as a word, fails it.
        for bad in [
            "  service: a/b\n  wieghts: {aws: 1}\n",
            "  service: a/b\n  weights: {aws: ten}\n",
        ] {
            assert!(!schema_errors(&doc(bad)).is_empty(), "{bad}");
        }
    }

    #[test]
    fn errors_name_the_line_column_and_field() {
        for (spec, want) in [
            (
                "  service: shop/cart\n  failoverThreshold: 1.5\n",
                "f.yaml: line 6 column 22: spec.failoverThreshold: 1.5 is outside (0, 1]",
            ),
            (
                "  service: shop/cart\n  weights: {aws: 0, gcp: 0}\n",
                "line 6 column 12: spec.weights: every weight is 0",
            ),
            (
                "  service: shop/cart\n  routes:\n    - to: [{service: shop/v2}]\n    - match: {pathPrefix: /a}\n      to: [{service: Shop}]\n",
                "line 8 column 7: spec.routes[1]: never reached: routes[0] matches every request",
            ),
            (
                "  service: shop/cart\n  routes:\n    - match: {pathPrefix: a}\n      to: [{service: shop/v2}]\n",
                "line 7 column 27: spec.routes[0].match.pathPrefix",
            ),
            (
                "  service: shop/cart\n  export: {allow: [{cluster: aws, identities: [web]}]}\n",
                "spec.export.allow[0].identities[0]: \"web\" is not a SPIFFE ID",
            ),
            (
                "  service: \"*\"\n  routes: [{to: [{service: a/b}]}]\n",
                "spec.routes: the mesh-wide default cannot route",
            ),
            ("  service: shop\n", "line 5 column 12: spec.service"),
            ("  service: shop/cart\n  wieghts: {}\n", "wieghts"),
            (
                "  service: shop/cart\n  failbackHold: soon\n",
                "failbackHold",
            ),
        ] {
            let e = parse_documents(&doc(spec), "f.yaml").unwrap_err();
            assert!(e.starts_with("f.yaml: "), "{e}");
            assert!(e.contains(want), "{spec}\n got: {e}");
        }
        let two = format!(
            "{}\n---\n{}",
            doc("  service: a/b\n"),
            doc("  service: a/c\n")
        );
        let e = parse_documents(&two, "f.yaml").unwrap_err();
        assert!(
            e.contains("line 10 column 18: metadata.name: \"p\" is already the name of document 1"),
            "{e}"
        );
    }

    #[test]
    fn a_service_policy_wins_field_by_field_over_the_default() {
        let default = PolicySpec {
            service: "*".into(),
            failover_threshold: Some(0.5),
            retries: Some(3),
            export: Some(ExportPolicy {
                clusters: None,
                allow: Some(vec![]),
            }),
            outlier: Some(OutlierSpec {
                consecutive_failures: Some(7),
                base_ejection: Some(Duration::from_secs(5)),
                ..Default::default()
            }),
            ..Default::default()
        };
        let svc = PolicySpec {
            service: "shop/cart".into(),
            retries: Some(0),
            export: Some(ExportPolicy {
                clusters: Some(vec!["aws".into()]),
                allow: None,
            }),
            outlier: Some(OutlierSpec {
                consecutive_failures: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = svc.over(&default);
        assert_eq!(e.service, "shop/cart");
        assert_eq!(
            e.retries,
            Some(0),
            "the service's own 0 is a value, not a gap"
        );
        assert_eq!(e.failover_threshold, Some(0.5));
        let export = e.export.unwrap();
        assert_eq!(export.clusters, Some(vec!["aws".to_string()]));
        assert_eq!(
            export.allow,
            Some(vec![]),
            "the default's allow list fills the gap"
        );
        let o = e.outlier.unwrap();
        assert_eq!(o.consecutive_failures, Some(2));
        assert_eq!(o.base_ejection, Some(Duration::from_secs(5)));
        assert!(svc.exported_by("aws") && !svc.exported_by("gcp"));
        assert!(default.exported_by("gcp"));
    }

    #[test]
    fn the_wire_form_round_trips() {
        for (name, text) in SHIPPED {
            for p in parse_documents(text, name).unwrap() {
                let json = serde_json::to_string(&p.spec).unwrap();
                let back: PolicySpec = serde_json::from_str(&json).unwrap();
                assert_eq!(back, p.spec);
            }
        }
    }
}
