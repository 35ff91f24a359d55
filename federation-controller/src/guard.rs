//! How many failed `Certify` attempts a source may make: a token bucket per
//! source address, spent by failures only. A source that has spent it is
//! refused (even with a good token) until the bucket refills, so guessing
//! join tokens costs an attacker time, while a node whose proxies all
//! start at once (successes) is never slowed. I/O-free; the caller passes
//! `now`. Memory is bounded: full buckets are forgotten, and at most
//! `MAX_SOURCES` are tracked (the fullest are dropped first).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Sources tracked at once.
pub const MAX_SOURCES: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePolicy {
    /// Failures a source may make in a burst.
    pub burst: u32,
    /// One more failure allowed per this long.
    pub refill: Duration,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            burst: 10,
            refill: Duration::from_secs(6),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct FailureLimiter {
    policy: FailurePolicy,
    buckets: HashMap<IpAddr, Bucket>,
}

impl FailureLimiter {
    pub fn new(policy: FailurePolicy) -> Self {
        Self {
            policy,
            buckets: HashMap::new(),
        }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let refilled = now.duration_since(b.at).as_secs_f64() / self.policy.refill.as_secs_f64();
        (b.tokens + refilled).min(f64::from(self.policy.burst))
    }

    /// `Err(wait)` when `source` has no failures left: refuse it, and say
    /// when it may try again.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        match self.buckets.get(&source) {
            Some(b) if self.level(b, now) < 1.0 => {
                let missing = 1.0 - self.level(b, now);
                Err(self.policy.refill.mul_f64(missing))
            }
            _ => Ok(()),
        }
    }

    /// A failed attempt from `source`.
    pub fn failed(&mut self, source: IpAddr, now: Instant) {
        let tokens = match self.buckets.get(&source) {
            Some(b) => self.level(b, now),
            None => f64::from(self.policy.burst),
        };
        self.buckets.insert(
            source,
            Bucket {
                tokens: (tokens - 1.0).max(0.0),
                at: now,
            },
        );
        if self.buckets.len() > MAX_SOURCES {
            let full = f64::from(self.policy.burst);
            let policy = self.policy;
            self.buckets.retain(|_, b| {
                let refilled = now.duration_since(b.at).as_secs_f64() / policy.refill.as_secs_f64();
                b.tokens + refilled < full
            });
            while self.buckets.len() > MAX_SOURCES {
                let fullest = self
                    .buckets
                    .iter()
                    .max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens))
                    .map(|(ip, _)| *ip);
                match fullest {
                    Some(ip) => self.buckets.remove(&ip),
                    None => break,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_that_keeps_failing_is_refused_until_its_bucket_refills() {
        let mut l = FailureLimiter::new(FailurePolicy {
            burst: 3,
            refill: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        let (bad, other): (IpAddr, IpAddr) =
            ("127.0.5.9".parse().unwrap(), "127.0.5.10".parse().unwrap());
        for _ in 0..3 {
            assert!(l.check(bad, t0).is_ok());
            l.failed(bad, t0);
        }
        let wait = l.check(bad, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert!(l.check(other, t0).is_ok(), "other sources are not affected");
        assert!(l.check(bad, t0 + Duration::from_secs(5)).is_err());
        assert!(
            l.check(bad, t0 + Duration::from_secs(10)).is_ok(),
            "one more try"
        );
        l.failed(bad, t0 + Duration::from_secs(10));
        assert!(l.check(bad, t0 + Duration::from_secs(11)).is_err());
    }
}
