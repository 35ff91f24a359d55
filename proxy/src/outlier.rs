//! Outlier detection: an endpoint (or a remote cluster's virtual endpoint)
//! that fails `consecutive_failures` times in a row is ejected. Each
//! ejection lasts longer than the one before, up to a cap, and each
//! `base_ejection` spent out of ejection forgives one (as Envoy's
//! multiplier decreases while a host stays healthy): a cluster that failed
//! in the morning is not ejected for minutes by one gray failure in the
//! afternoon. Never more than
//! `max_ejection_percent` of a service's endpoints are out at once; and a
//! returning endpoint is on probation, so one more failure ejects it again
//! at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long. As
    /// long again out of ejection forgives one.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Of a service's endpoints, at most this share is ejected at once
    /// (but one may always be, when there are two or more).
    pub max_ejection_percent: u8,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Host {
    consecutive: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the last ejection ended (or ends).
    back_at: Option<Instant>,
    /// Back from an ejection, and not yet proven healthy.
    probation: bool,
}

#[derive(Debug, Clone)]
pub struct Outliers<K> {
    policy: OutlierPolicy,
    hosts: HashMap<K, Host>,
}

impl<K: Hash + Eq + Clone> Outliers<K> {
    pub fn new(policy: OutlierPolicy) -> Self {
        Self {
            policy,
            hosts: HashMap::new(),
        }
    }

    /// When `k`'s ejection ends (`None`: it never was ejected).
    pub fn ejected_until(&self, k: &K) -> Option<Instant> {
        self.hosts.get(k).and_then(|h| h.ejected_until)
    }

    pub fn is_ejected(&self, k: &K, now: Instant) -> bool {
        self.hosts
            .get(k)
            .and_then(|h| h.ejected_until)
            .is_some_and(|until| now < until)
    }

    pub fn success(&mut self, k: &K, now: Instant) {
        let h = self.hosts.entry(k.clone()).or_default();
        h.consecutive = 0;
        h.probation = false;
        // The probe after an ejection succeeded. (A success while still
        // ejected is a request that was in flight; it proves nothing.)
        if h.ejected_until.is_some_and(|u| now >= u) {
            h.ejected_until = None;
        }
    }

    /// Records a failure of `k`, one of `total` endpoints of its service,
    /// of which `others_usable` others are healthy and not ejected.
    /// Returns how long it is ejected for, if this failure ejects it.
    ///
    /// The last usable endpoint is never ejected (Envoy's panic threshold):
    /// serving from a suspect target beats answering 503 to everyone.
    pub fn failure(
        &mut self,
        k: &K,
        total: usize,
        others_usable: usize,
        now: Instant,
    ) -> Option<Duration> {
        let ejected_now = self
            .hosts
            .values()
            .filter(|h| h.ejected_until.is_some_and(|u| now < u))
            .count();
        let policy = &self.policy;
        let h = self.hosts.entry(k.clone()).or_default();
        if h.ejected_until.is_some_and(|u| now < u) {
            return None;
        }
        if h.ejected_until.take().is_some() {
            // Back from an ejection: this is the probe, and it failed.
            h.probation = true;
        }
        h.consecutive += 1;
        if !h.probation && h.consecutive < policy.consecutive_failures {
            return None;
        }
        let cap = (total * usize::from(policy.max_ejection_percent) / 100).max(1);
        if total < 2 {
            return None;
        }
        let (mut others_usable, mut ejected_now) = (others_usable, ejected_now);
        if others_usable == 0 {
            // The last usable target fails now, and what is ejected failed
            // earlier: newer evidence wins. The ejection that ends first is
            // ended (its next failure ejects it again at once), so that
            // traffic has somewhere to go, and this one is ejected instead.
            let earliest = self
                .hosts
                .iter_mut()
                .filter(|(other, o)| *other != k && o.ejected_until.is_some_and(|u| now < u))
                .min_by_key(|(_, o)| o.ejected_until);
            let Some((_, released)) = earliest else {
                // Ejecting would leave too little; the failures still count.
                return None;
            };
            released.ejected_until = Some(now);
            released.back_at = Some(now);
            others_usable += 1;
            ejected_now -= 1;
        }
        if others_usable == 0 || ejected_now >= cap {
            return None;
        }
        let h = self.hosts.entry(k.clone()).or_default();
        if let Some(back) = h.back_at {
            let out = now.saturating_duration_since(back).as_nanos();
            let forgiven = out / policy.base_ejection.as_nanos().max(1);
            h.times_ejected = h
                .times_ejected
                .saturating_sub(u32::try_from(forgiven).unwrap_or(u32::MAX));
        }
        h.times_ejected += 1;
        let length = policy
            .base_ejection
            .saturating_mul(h.times_ejected)
            .min(policy.max_ejection);
        h.ejected_until = Some(now + length);
        h.back_at = h.ejected_until;
        h.consecutive = 0;
        h.probation = false;
        Some(length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn fail_n(
        o: &mut Outliers<&'static str>,
        k: &'static str,
        n: u32,
        total: usize,
        now: Instant,
    ) -> Option<Duration> {
        (0..n)
            .map(|_| o.failure(&k, total, total - 1, now))
            .last()
            .flatten()
    }

    #[test]
    fn consecutive_failures_eject_for_longer_each_time() {
        let t0 = Instant::now();
        let mut o = Outliers::new(OutlierPolicy::default());
        // Four failures and a success: no ejection.
        assert_eq!(fail_n(&mut o, "a", 4, 4, t0), None);
        o.success(&"a", t0);
        assert_eq!(fail_n(&mut o, "a", 4, 4, t0), None);
        assert_eq!(o.failure(&"a", 4, 3, t0), Some(30 * S));
        assert!(o.is_ejected(&"a", t0 + 29 * S));
        assert!(!o.is_ejected(&"a", t0 + 30 * S));
        // The probe after the ejection fails: out again at once, for longer.
        assert_eq!(o.failure(&"a", 4, 3, t0 + 31 * S), Some(60 * S));
        let t1 = t0 + 91 * S;
        assert_eq!(o.failure(&"a", 4, 3, t1), Some(90 * S));
    }

    /// Two remote clusters: azure was ejected for an earlier fault, and
    /// now gcp, the last usable one, fails. Newer evidence wins: azure's
    /// ejection ends so that traffic has somewhere to go, and gcp is out.
    #[test]
    fn the_last_usable_target_failing_ends_an_older_ejection() {
        let t0 = Instant::now();
        let mut o = Outliers::new(OutlierPolicy::default());
        assert_eq!(fail_n(&mut o, "azure", 5, 2, t0), Some(30 * S));
        let t1 = t0 + 10 * S;
        // gcp is all that is usable: before its fifth failure nothing moves.
        for _ in 0..4 {
            assert_eq!(o.failure(&"gcp", 2, 0, t1), None);
        }
        assert!(o.is_ejected(&"azure", t1));
        assert_eq!(o.failure(&"gcp", 2, 0, t1), Some(30 * S));
        assert!(o.is_ejected(&"gcp", t1));
        assert!(!o.is_ejected(&"azure", t1), "released for the newer fault");
        // A lone endpoint is never ejected, whatever else is.
        let mut lone = Outliers::new(OutlierPolicy::default());
        assert_eq!(fail_n(&mut lone, "a", 9, 1, t0), None);
    }

    #[test]
    fn a_successful_probe_ends_probation() {
        let t0 = Instant::now();
        let mut o = Outliers::new(OutlierPolicy::default());
        assert_eq!(fail_n(&mut o, "a", 5, 4, t0), Some(30 * S));
        o.success(&"a", t0 + 30 * S);
        // One failure is no longer enough.
        assert_eq!(o.failure(&"a", 4, 3, t0 + 31 * S), None);
        // Long out of ejection: the next ejection is a first one again
        // (30 s, not 60 s).
        o.success(&"a", t0 + 32 * S);
        assert_eq!(fail_n(&mut o, "a", 5, 4, t0 + 400 * S), Some(30 * S));
    }

    /// Each base ejection's worth of time out of ejection forgives one: a
    /// host ejected three times in a row, then well for a minute, is
    /// ejected next as for its second time, not its fourth.
    #[test]
    fn time_out_of_ejection_forgives_one_ejection_per_base() {
        let t0 = Instant::now();
        let mut o = Outliers::new(OutlierPolicy::default());
        assert_eq!(fail_n(&mut o, "a", 5, 4, t0), Some(30 * S));
        assert_eq!(o.failure(&"a", 4, 3, t0 + 30 * S), Some(60 * S));
        assert_eq!(o.failure(&"a", 4, 3, t0 + 90 * S), Some(90 * S));
        o.success(&"a", t0 + 180 * S);
        // Back at 180 s; 60 s later two of three are forgiven.
        assert_eq!(fail_n(&mut o, "a", 5, 4, t0 + 240 * S), Some(60 * S));
        // 29 s after that one ends forgives nothing.
        o.success(&"a", t0 + 300 * S);
        assert_eq!(fail_n(&mut o, "a", 5, 4, t0 + 329 * S), Some(90 * S));
    }

    #[test]
    fn never_more_than_the_ejection_cap_and_never_a_lone_endpoint() {
        let t0 = Instant::now();
        let mut o = Outliers::new(OutlierPolicy::default());
        // Four endpoints at 50%: two may be out, not a third.
        assert!(fail_n(&mut o, "a", 5, 4, t0).is_some());
        assert!(fail_n(&mut o, "b", 5, 4, t0).is_some());
        assert_eq!(fail_n(&mut o, "c", 5, 4, t0), None);
        assert!(!o.is_ejected(&"c", t0));
        // Once one returns, the next outlier may go.
        assert!(o.failure(&"c", 4, 3, t0 + 31 * S).is_some());
        // A service with one endpoint (one remote cluster) keeps it.
        let mut lone = Outliers::new(OutlierPolicy::default());
        assert_eq!(fail_n(&mut lone, "x", 50, 1, t0), None);
    }

    #[test]
    fn the_last_usable_endpoint_is_never_ejected() {
        let t0 = Instant::now();
        let mut o = Outliers::new(OutlierPolicy::default());
        // Three endpoints, two of them down: the third is all that is left.
        for _ in 0..50 {
            assert_eq!(o.failure(&"x", 3, 0, t0), None);
        }
        assert!(!o.is_ejected(&"x", t0));
        // Once another is usable again, the outlier may go.
        assert_eq!(o.failure(&"x", 3, 1, t0), Some(30 * S));
    }
}
