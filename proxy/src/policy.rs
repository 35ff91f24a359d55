//! One service's knobs: the proxy's [`Settings`] with the service's global
//! traffic policy over them, field by field, and the HTTP route decision.
//! I/O-free. A table update that changes a service's policy rebuilds only
//! that service's balancing state; requests in flight keep the state they
//! started with.

use std::time::Duration;

use fedmesh_api::ServiceKey;
use fedmesh_api::policy::{HeaderMatch, PolicySpec, Route};

use crate::balancer::BalancerPolicy;
use crate::budget::BudgetPolicy;
use crate::config::Settings;
use crate::limits::Limits;
use crate::locality::FailoverOrder;
use crate::outlier::OutlierPolicy;

#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    pub failover: FailoverOrder,
    pub balancer: BalancerPolicy,
    pub budget: BudgetPolicy,
    pub limits: Limits,
    pub request_timeout: Duration,
    pub per_try_timeout: Option<Duration>,
    pub retries: u32,
    /// Steady shares by cluster; empty: by locality alone.
    pub weights: Vec<(String, u32)>,
    /// HTTP routes, first match wins.
    pub routes: Vec<Route>,
}

impl ServicePolicy {
    /// `settings` alone: a service no policy names.
    pub fn of(settings: &Settings) -> Self {
        Self {
            failover: settings.failover.clone(),
            balancer: settings.balancer(),
            budget: settings.budget(),
            limits: settings.limits(),
            request_timeout: settings.request_timeout,
            per_try_timeout: settings.per_try_timeout,
            retries: settings.retries,
            weights: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// `spec` (already checked) over `settings`. A per-try timeout longer
    /// than the request's is cut to it.
    pub fn resolve(settings: &Settings, spec: Option<&PolicySpec>) -> Self {
        let mut p = Self::of(settings);
        let Some(s) = spec else { return p };
        if let Some(f) = &s.failover {
            p.failover = f.clone();
        }
        if let Some(t) = s.failover_threshold {
            p.balancer.failover_threshold = t;
        }
        if let Some(h) = s.failback_hold {
            p.balancer.failback_hold = h;
        }
        if let Some(o) = &s.outlier {
            let d = &mut p.balancer.outlier;
            *d = OutlierPolicy {
                consecutive_failures: o.consecutive_failures.unwrap_or(d.consecutive_failures),
                base_ejection: o.base_ejection.unwrap_or(d.base_ejection),
                max_ejection: o.max_ejection.unwrap_or(d.max_ejection),
                max_ejection_percent: o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
            };
            d.max_ejection = d.max_ejection.max(d.base_ejection);
        }
        if let Some(r) = s.retry_budget_ratio {
            p.budget.ratio = r;
        }
        if let Some(m) = s.retry_budget_min_per_second {
            p.budget.min_per_second = m;
        }
        if let Some(c) = s.max_connections {
            p.limits.max_connections = c;
        }
        if let Some(c) = s.max_pending_requests {
            p.limits.max_pending = c;
        }
        if let Some(t) = s.request_timeout {
            p.request_timeout = t;
        }
        if let Some(t) = s.per_try_timeout {
            p.per_try_timeout = Some(t);
        }
        p.per_try_timeout = p.per_try_timeout.map(|t| t.min(p.request_timeout));
        if let Some(r) = s.retries {
            p.retries = r;
        }
        if let Some(w) = &s.weights {
            p.weights = w.iter().map(|(c, w)| (c.clone(), *w)).collect();
        }
        if let Some(r) = &s.routes {
            p.routes = r.clone();
        }
        p
    }

    /// The service a request goes to: the first matching route's
    /// destination (split by weight with `draw` in [0, 1)), or `None` to
    /// stay on the service itself.
    pub fn route<'h>(
        &self,
        method: &str,
        path: &str,
        header: impl Fn(&str) -> Option<&'h str>,
        draw: f64,
    ) -> Option<ServiceKey> {
        let route = self.routes.iter().find(|r| {
            r.matches.as_ref().is_none_or(|m| {
                m.method.as_deref().is_none_or(|x| x == method)
                    && m.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
                    && m.headers.iter().flatten().all(|(name, want)| {
                        let got = header(name);
                        match want {
                            HeaderMatch::Exact(v) => got == Some(v.as_str()),
                            HeaderMatch::Prefix(v) => {
                                got.is_some_and(|g| g.starts_with(v.as_str()))
                            }
                            HeaderMatch::Present(p) => got.is_some() == *p,
                        }
                    })
            })
        })?;
        let weight = |w: Option<u32>| f64::from(w.unwrap_or(1));
        let total: f64 = route.to.iter().map(|d| weight(d.weight)).sum();
        let mut at = draw * total;
        let dest = route
            .to
            .iter()
            .find(|d| {
                at -= weight(d.weight);
                at < 0.0
            })
            .or(route.to.last())?;
        dest.service.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PolicySpec {
        let text = format!(
            "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {{name: p}}\nspec:\n  service: shop/cart\n{yaml}"
        );
        fedmesh_api::policy::parse_documents(&text, "t")
            .unwrap()
            .remove(0)
            .spec
    }

    #[test]
    fn a_policy_overrides_only_what_it_sets() {
        let settings = Settings::default();
        let base = ServicePolicy::of(&settings);
        assert_eq!(ServicePolicy::resolve(&settings, None), base);
        let p = ServicePolicy::resolve(
            &settings,
            Some(&spec(
                "  retries: 0\n  requestTimeout: 2s\n  outlier: {consecutiveFailures: 2}\n  maxPendingRequests: 7\n",
            )),
        );
        assert_eq!(p.retries, 0);
        assert_eq!(p.request_timeout, Duration::from_secs(2));
        assert_eq!(p.balancer.outlier.consecutive_failures, 2);
        assert_eq!(
            p.balancer.outlier.base_ejection,
            base.balancer.outlier.base_ejection
        );
        assert_eq!(p.limits.max_pending, 7);
        assert_eq!(p.limits.max_connections, base.limits.max_connections);
        assert_eq!(p.budget, base.budget);
    }

    #[test]
    fn routes_match_in_order_and_split_by_weight() {
        let p = ServicePolicy::resolve(
            &Settings::default(),
            Some(&spec(
                "  routes:\n    - match: {headers: {x-canary: {exact: \"1\"}}}\n      to: [{service: shop/v2}]\n    - match: {pathPrefix: /api, method: GET}\n      to: [{service: shop/cart, weight: 3}, {service: shop/v2, weight: 1}]\n",
            )),
        );
        let none = |_: &str| None;
        let canary = |h: &str| (h == "x-canary").then_some("1");
        let v2 = Some(ServiceKey::new("shop", "v2"));
        assert_eq!(p.route("POST", "/", canary, 0.9), v2);
        assert_eq!(p.route("POST", "/api", none, 0.1), None);
        assert_eq!(p.route("GET", "/x", none, 0.1), None);
        let to_v2 = (0..100)
            .filter(|i| p.route("GET", "/api/x", none, f64::from(*i) / 100.0) == v2)
            .count();
        assert_eq!(to_v2, 25);
    }
}
