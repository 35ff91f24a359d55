//! The state the listeners share: the current service table, each
//! service's balancer, retry budget and breakers (which outlive table
//! updates), the connector, and the HTTP pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fedmesh_api::ServiceKey;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::balancer::{Balancer, Draw};
use crate::budget::RetryBudget;
use crate::config::{Me, Settings};
use crate::http::Pool;
use crate::limits::Breakers;
use crate::metrics::Metrics;
use crate::policy::ServicePolicy;
use crate::table::{Routable, Table, TargetKey};
use crate::upstream::Connector;

/// One service's balancing state.
#[derive(Debug)]
pub struct ServiceState {
    lb: Mutex<Lb>,
    pub breakers: Breakers,
    /// The policy this state was built for, as the latest table holds it
    /// (swapped for an equal one after a table update, so that requests
    /// compare pointers, not whole policies).
    policy: Mutex<Arc<ServicePolicy>>,
}

#[derive(Debug)]
struct Lb {
    balancer: Balancer<TargetKey>,
    budget: RetryBudget,
}

#[derive(Debug)]
pub struct Shared {
    pub me: Me,
    pub settings: Settings,
    pub table: watch::Receiver<Arc<Table>>,
    pub connector: Connector,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    /// Set when spans are exported (OTLP).
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// Asks the controller for a service the table lacks (discovery mode).
    pub on_demand: Option<fedmesh_discovery::OnDemand>,
    states: Mutex<HashMap<ServiceKey, Arc<ServiceState>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these maps inconsistent: every
    // update is a single insert or field write.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(
        me: Me,
        settings: Settings,
        table: watch::Receiver<Arc<Table>>,
        connector: Connector,
        metrics: Arc<Metrics>,
        tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    ) -> Self {
        Self {
            tracer,
            pool: Arc::new(Pool::new(
                settings.pool_max_idle_per_target,
                settings.pool_idle_timeout,
            )),
            me,
            settings,
            table,
            connector,
            metrics,
            on_demand: None,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// The balancing state of `svc`, created on first use and kept across
    /// table updates so that ejections and latency survive them, until the
    /// service's policy changes: then it is built anew, for that service
    /// alone (requests in flight finish on the state they began with).
    pub fn state(&self, svc: &Routable) -> Arc<ServiceState> {
        let mut states = lock(&self.states);
        if let Some(s) = states.get(&svc.key) {
            let mut held = lock(&s.policy);
            if Arc::ptr_eq(&held, &svc.policy) {
                return s.clone();
            }
            // Every table update builds new policies: the first request
            // after one compares values, and keeps the new pointer.
            if **held == *svc.policy {
                *held = svc.policy.clone();
                return s.clone();
            }
        }
        let state = Arc::new(ServiceState::new(svc.policy.clone()));
        states.insert(svc.key.clone(), state.clone());
        state
    }

    /// Forgets the state of services the table no longer has.
    pub fn retain_states(&self, table: &Table) {
        lock(&self.states).retain(|k, _| table.services.contains_key(k));
    }
}

impl ServiceState {
    fn new(p: Arc<ServicePolicy>) -> Self {
        let mut balancer = p.balancer.clone();
        balancer.weights = p.weights.iter().map(|(_, w)| *w).collect();
        Self {
            lb: Mutex::new(Lb {
                balancer: Balancer::new(balancer),
                budget: RetryBudget::new(p.budget.clone(), Instant::now().into_std()),
            }),
            breakers: Breakers::new(p.limits.clone()),
            policy: Mutex::new(p),
        }
    }

    /// Holds the attempt on `k` (already counted as started) outstanding
    /// until [`Outstanding::reported`]; dropped before that (the caller
    /// went away mid-request, and hyper dropped the request's future), it
    /// is released as cancelled. Otherwise each such request would stay
    /// outstanding on `k` for good, and p2c, which scales cost by
    /// outstanding requests, would starve `k`.
    pub fn outstanding(&self, k: &TargetKey) -> Outstanding<'_> {
        Outstanding {
            state: self,
            target: Some(k.clone()),
        }
    }

    /// The next target, counted as started; `None` when nothing usable is
    /// left untried.
    pub fn choose(&self, svc: &Routable, tried: &[TargetKey]) -> Option<TargetKey> {
        let now = Instant::now().into_std();
        let draw = Draw {
            level: fastrand::f64(),
            weight: fastrand::f64(),
            a: fastrand::usize(..),
            b: fastrand::usize(..),
        };
        let mut lb = lock(&self.lb);
        let k = lb.balancer.choose(&svc.targets, tried, draw, now)?;
        lb.balancer.started(&k, now);
        Some(k)
    }

    /// Another attempt on a target chosen before (a stale pooled
    /// connection's retry), counted as started.
    pub fn again(&self, k: &TargetKey) {
        lock(&self.lb)
            .balancer
            .started(k, Instant::now().into_std());
    }

    /// An attempt on `k` was given up before it reached `k`.
    pub fn cancelled(&self, k: &TargetKey) {
        lock(&self.lb).balancer.cancelled(k);
    }

    /// An attempt on `k` ended.
    pub fn finished(&self, svc: &Routable, k: &TargetKey, outcome: Result<Duration, ()>) {
        let now = Instant::now().into_std();
        lock(&self.lb)
            .balancer
            .finished(k, outcome, &svc.targets, now);
    }

    /// Counts a request against the retry budget.
    pub fn request(&self) {
        lock(&self.lb).budget.request(Instant::now().into_std());
    }

    /// Takes a retry from the budget, if one is left.
    pub fn try_retry(&self) -> bool {
        lock(&self.lb).budget.try_retry(Instant::now().into_std())
    }
}

/// An attempt outstanding on its target; see [`ServiceState::outstanding`].
#[derive(Debug)]
#[must_use = "dropped at once, it releases the attempt"]
pub struct Outstanding<'a> {
    state: &'a ServiceState,
    target: Option<TargetKey>,
}

impl Outstanding<'_> {
    /// The attempt reported its end (finished or cancelled) itself.
    pub fn reported(mut self) {
        self.target = None;
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.target.take() {
            self.state.cancelled(&k);
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose caller goes away mid-attempt (its future dropped)
    /// leaves nothing outstanding; one that reports keeps its own count.
    #[test]
    fn a_dropped_attempt_is_no_longer_outstanding() {
        let state = ServiceState::new(Arc::new(ServicePolicy::of(&Settings::default())));
        let azure = TargetKey::Remote("azure-eus".into());
        let pending = |s: &ServiceState| lock(&s.lb).balancer.pending(&azure);
        for _ in 0..3 {
            state.again(&azure);
            drop(state.outstanding(&azure));
        }
        assert_eq!(pending(&state), 0);
        state.again(&azure);
        state.outstanding(&azure).reported();
        assert_eq!(
            pending(&state),
            1,
            "reported: its end is the attempt's to say"
        );
    }
}
