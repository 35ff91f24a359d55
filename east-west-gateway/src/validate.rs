//! When the ingress asks a new peer to prove its address (a QUIC Retry)
//! before spending a handshake on it. A Retry costs an honest peer one
//! round trip; skipping it lets a flood from spoofed addresses make the
//! gateway do TLS work (and send its certificate, an amplification) for
//! addresses that never asked. `auto` pays the round trip only while new
//! connections arrive faster than a gateway's peers ever open them. I/O-free.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AddressValidation {
    /// A Retry for every new connection.
    Always,
    /// Never a Retry.
    Never,
    /// A Retry while unvalidated attempts exceed the threshold per second.
    #[default]
    Auto,
}

/// Counts unvalidated connection attempts over a sliding second.
#[derive(Debug, Clone)]
pub struct RetryGate {
    mode: AddressValidation,
    per_second: u32,
    window_start: Option<Instant>,
    current: u32,
    previous: u32,
}

const WINDOW: Duration = Duration::from_secs(1);

impl RetryGate {
    pub fn new(mode: AddressValidation, per_second: u32) -> Self {
        Self {
            mode,
            per_second,
            window_start: None,
            current: 0,
            previous: 0,
        }
    }

    /// Whether the attempt arriving at `now`, from an address not yet
    /// validated, gets a Retry. Every unvalidated attempt counts, so that
    /// the rate seen is the offered load, not what got through.
    pub fn retry(&mut self, now: Instant) -> bool {
        match self.mode {
            AddressValidation::Always => return true,
            AddressValidation::Never => return false,
            AddressValidation::Auto => {}
        }
        let start = *self.window_start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= WINDOW * 2 {
            (self.previous, self.current) = (0, 0);
            self.window_start = Some(now);
        } else if elapsed >= WINDOW {
            (self.previous, self.current) = (self.current, 0);
            self.window_start = Some(start + WINDOW);
        }
        self.current = self.current.saturating_add(1);
        // The previous second, weighted by how much of it the sliding
        // window still covers.
        let into = now
            .saturating_duration_since(self.window_start.unwrap_or(now))
            .as_secs_f64();
        let rate = f64::from(self.previous) * (1.0 - into).max(0.0) + f64::from(self.current);
        rate > f64::from(self.per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_retries_only_above_the_rate_and_recovers() {
        let t0 = Instant::now();
        let mut g = RetryGate::new(AddressValidation::Auto, 100);
        // 100 attempts spread over a second: none retried.
        let calm = (0..100)
            .filter(|i| g.retry(t0 + Duration::from_millis(i * 10)))
            .count();
        assert_eq!(calm, 0);
        // A burst of 1,000 in 100 ms: all but the first few are retried.
        let t1 = t0 + Duration::from_secs(1);
        let flood = (0..1000)
            .filter(|i| g.retry(t1 + Duration::from_micros(i * 100)))
            .count();
        assert!(flood >= 990, "{flood}");
        // Two quiet seconds later, a lone attempt goes straight through.
        assert!(!g.retry(t1 + Duration::from_secs(3)));
    }

    #[test]
    fn always_and_never_ignore_the_rate() {
        let t = Instant::now();
        assert!(RetryGate::new(AddressValidation::Always, 1_000_000).retry(t));
        let mut never = RetryGate::new(AddressValidation::Never, 0);
        assert!((0..10_000).all(|_| !never.retry(t)));
    }
}
