//! How every fedmesh component waits before trying again (etcd, the
//! controller): exponential steps with equal jitter (half of each step
//! fixed, half random), so that the clients of a service that just came
//! back do not all retry in the same instant. I/O-free: the caller passes
//! the randomness.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    /// After a success: the next failure waits the initial step again.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }

    /// The wait before the next try: `jitter` (in [0, 1]) of the way
    /// between half and all of the current step; the step then doubles, up
    /// to the maximum.
    pub fn next(&mut self, jitter: f64) -> Duration {
        let step = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        step / 2 + step.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_to_the_maximum_and_jitter_spreads_each_over_its_upper_half() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(200), ms(1000));
        assert_eq!(b.next(0.0), ms(100));
        assert_eq!(b.next(1.0), ms(400));
        assert_eq!(b.next(0.5), ms(600));
        assert_eq!(b.next(1.0), ms(1000), "capped");
        // Two clients with different draws do not retry together.
        let (mut x, mut y) = (
            Backoff::new(ms(200), ms(1000)),
            Backoff::new(ms(200), ms(1000)),
        );
        assert_ne!(x.next(0.1), y.next(0.9));
        b.reset();
        assert_eq!(b.next(0.0), ms(100));
    }
}
