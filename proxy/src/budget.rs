//! The retry budget: retries may add at most `ratio` of the requests seen
//! over the last `window`, plus `min_per_second` so that a quiet service
//! can still retry. Counts are kept in one-second buckets, so the memory
//! is fixed whatever the request rate.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetPolicy {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window: Duration,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryBudget {
    policy: BudgetPolicy,
    start: Instant,
    /// (second, requests, retries), a ring indexed by second.
    buckets: Vec<(u64, u64, u64)>,
}

impl RetryBudget {
    pub fn new(policy: BudgetPolicy, now: Instant) -> Self {
        let n = policy.window.as_secs().max(1) as usize;
        Self {
            policy,
            start: now,
            buckets: vec![(u64::MAX, 0, 0); n],
        }
    }

    fn bucket(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let n = self.buckets.len();
        let b = &mut self.buckets[(sec % n as u64) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    /// Counts a first attempt.
    pub fn request(&mut self, now: Instant) {
        self.bucket(now).1 += 1;
    }

    /// Takes a retry from the budget, if there is one left.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let n = self.buckets.len() as u64;
        let (requests, retries) = self
            .buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 + n > sec && b.0 <= sec)
            .fold((0, 0), |(q, r), b| (q + b.1, r + b.2));
        let allowed =
            self.policy.ratio * requests as f64 + f64::from(self.policy.min_per_second) * n as f64;
        if (retries as f64) < allowed {
            self.bucket(now).2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn retries_are_a_fifth_of_requests_plus_a_floor() {
        let t0 = Instant::now();
        let policy = BudgetPolicy {
            min_per_second: 1,
            ..Default::default()
        };
        let mut b = RetryBudget::new(policy, t0);
        for _ in 0..1000 {
            b.request(t0);
        }
        // 20% of 1000, plus 1/s over the 10 s window.
        let granted = (0..1000).filter(|_| b.try_retry(t0)).count();
        assert_eq!(granted, 210);
    }

    #[test]
    fn the_budget_refills_as_the_window_moves() {
        let t0 = Instant::now();
        let mut b = RetryBudget::new(BudgetPolicy::default(), t0);
        // A quiet service still gets its floor: 10/s over 10 s.
        assert_eq!((0..500).filter(|_| b.try_retry(t0)).count(), 100);
        assert!(!b.try_retry(t0 + 9 * S), "still inside the window");
        assert!(
            b.try_retry(t0 + 10 * S),
            "the spent second has left the window"
        );
    }
}
