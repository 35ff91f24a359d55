//! Whether the egress should try a peer gateway now: a failed connection
//! puts it in exponential backoff with jitter, so that a dead peer costs new
//! streams nothing (they go straight to the next gateway) and a flapping one
//! is not hammered. Free of I/O; the caller passes `now` and the jitter.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The wait after the first failure.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PeerHealth {
    failures: u32,
    retry_at: Option<Instant>,
}

impl PeerHealth {
    /// Whether a connection may be attempted (or used) at `now`.
    pub fn available(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }

    pub fn is_down(&self) -> bool {
        self.failures > 0
    }

    /// Records a failure; returns the wait before the next attempt. The
    /// wait is `jitter` (0.0–1.0) of the way between half and all of the
    /// exponential step, so that many egresses do not retry in lockstep.
    pub fn failed(&mut self, now: Instant, policy: &BackoffPolicy, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let step = policy
            .base
            .saturating_mul(1 << (self.failures - 1).min(16))
            .min(policy.max);
        let wait = step / 2 + step.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
        self.retry_at = Some(now + wait);
        wait
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }
}

/// The order in which to try a cluster's gateways: those not in backoff,
/// starting at `spread` (so that streams spread over active-active
/// gateways). Gateways in backoff are left out: a stream fails fast rather
/// than wait for a peer that was just found dead.
pub fn try_order(
    gateways: &[SocketAddr],
    available: impl Fn(&SocketAddr) -> bool,
    spread: usize,
) -> Vec<SocketAddr> {
    let n = gateways.len();
    (0..n)
        .map(|i| gateways[(spread + i) % n])
        .filter(|g| available(g))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let p = BackoffPolicy::default();
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        assert!(h.available(t0));
        let waits: Vec<Duration> = (0..8).map(|_| h.failed(t0, &p, 1.0)).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[1], Duration::from_millis(200));
        assert_eq!(waits[7], Duration::from_secs(2));
        assert!(h.is_down());
        assert!(!h.available(t0 + Duration::from_millis(1999)));
        assert!(h.available(t0 + Duration::from_secs(2)));
        h.succeeded();
        assert!(h.available(t0) && !h.is_down());
        // No jitter: half the step.
        assert_eq!(h.failed(t0, &p, 0.0), Duration::from_millis(50));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut h = PeerHealth::default();
        let p = BackoffPolicy::default();
        for _ in 0..100 {
            h.failed(Instant::now(), &p, 0.5);
        }
        assert!(h.is_down());
    }

    #[test]
    fn gateways_in_backoff_are_skipped_and_the_rest_rotate() {
        let g: Vec<SocketAddr> = ["127.0.2.1:1", "127.0.2.2:1", "127.0.2.3:1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(try_order(&g, |_| true, 1), vec![g[1], g[2], g[0]]);
        assert_eq!(try_order(&g, |a| *a != g[1], 1), vec![g[2], g[0]]);
        assert!(try_order(&g, |_| false, 0).is_empty());
    }
}
