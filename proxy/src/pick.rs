//! Choosing within a priority level: power of two choices over a peak-EWMA
//! of latency, scaled by outstanding requests and divided by weight (a
//! remote cluster weighs its healthy capacity). Randomness is passed in,
//! so choices are reproducible in tests.
//!
//! An estimate decays when it is read, not only when a sample arrives: with
//! two candidates p2c compares both every time, so a target whose stored
//! estimate stayed high after a spike would never be chosen, never
//! measured, and starved for good.
//!
//! A faster sample also weighs at least [`PeakEwma::WINDOW`]th: under load a
//! target is sampled every few milliseconds, and a purely time-based weight
//! would hold a seconds-long peak for tens of seconds of fast answers (a
//! healed cluster kept a fifth of its share for 15 s at 1,000 req/s).

use std::time::{Duration, Instant};

/// A latency estimate that jumps to a slow sample at once and decays back
/// over `decay`: a slow endpoint is avoided quickly, and retried slowly.
#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    nanos: f64,
    at: Instant,
}

/// Until an endpoint has answered, it is assumed this fast: new endpoints
/// get traffic, but not all of it.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: now,
        }
    }

    /// An estimate of one sample: what replaces one too old to weigh (see
    /// `BalancerPolicy::probe_after`).
    pub fn sampled(rtt: Duration, now: Instant) -> Self {
        Self {
            nanos: rtt.as_nanos() as f64,
            at: now,
        }
    }

    /// A faster sample weighs at least 1/WINDOW: the estimate follows the
    /// last few dozen answers when they come faster than `decay`.
    pub const WINDOW: f64 = 32.0;

    /// The weight the stored estimate keeps after `now - self.at`.
    fn kept(&self, now: Instant, decay: Duration) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (-elapsed / decay.as_secs_f64().max(1e-9)).exp()
    }

    /// A peak counts at once; a faster sample is blended into the estimate
    /// as read now, weighing more the longer the estimate went unsampled.
    pub fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) {
        let sample = rtt.as_nanos() as f64;
        let current = self.get(now, decay).as_nanos() as f64;
        if sample > current {
            self.nanos = sample;
        } else {
            let w = self.kept(now, decay).min(1.0 - 1.0 / Self::WINDOW);
            self.nanos = current * w + sample * (1.0 - w);
        }
        self.at = now;
    }

    /// The estimate at `now`: the last one, relaxed toward
    /// [`DEFAULT_RTT`] (what is assumed of a target never measured) by the
    /// time since it was taken.
    pub fn get(&self, now: Instant, decay: Duration) -> Duration {
        let w = self.kept(now, decay);
        let prior = DEFAULT_RTT.as_nanos() as f64;
        Duration::from_nanos((self.nanos * w + prior * (1.0 - w)) as u64)
    }

    /// When the last sample was taken.
    pub fn sampled_at(&self) -> Instant {
        self.at
    }
}

/// What the picker knows of one candidate.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub latency: Duration,
    pub pending: u32,
    /// Relative capacity; at least 1.
    pub weight: u32,
}

impl Candidate {
    fn cost(&self) -> f64 {
        self.latency.as_nanos() as f64 * f64::from(self.pending + 1) / f64::from(self.weight.max(1))
    }
}

/// The index of the cheaper of two candidates drawn by `a` and `b` (any
/// numbers; taken modulo the count, and made distinct when there are two or
/// more). `None` when there is no candidate.
pub fn p2c(candidates: &[Candidate], a: usize, b: usize) -> Option<usize> {
    let n = candidates.len();
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let i = a % n;
            // Any other index, uniformly.
            let j = (i + 1 + b % (n - 1)) % n;
            Some(if candidates[j].cost() < candidates[i].cost() {
                j
            } else {
                i
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_sample_counts_at_once_and_fades() {
        let t0 = Instant::now();
        let decay = Duration::from_secs(10);
        let mut e = PeakEwma::new(t0);
        e.observe(100 * MS, t0, decay);
        assert_eq!(e.get(t0, decay), 100 * MS);
        let t1 = t0 + Duration::from_secs(10);
        e.observe(MS, t1, decay);
        // Read at 10 s the peak is 37.4 ms; the sample weighs 1 - e^-1.
        let after = e.get(t1, decay);
        assert!(after < 15 * MS && after > 14 * MS, "{after:?}");
        let t2 = t0 + Duration::from_secs(60);
        e.observe(MS, t2, decay);
        assert!(e.get(t2, decay) < 2 * MS);
    }

    /// A spike with no sample after it fades on its own: the estimate read
    /// later is lower though nothing was observed (it used to stay at the
    /// peak until the next sample, which never came).
    #[test]
    fn an_estimate_fades_without_new_samples() {
        let t0 = Instant::now();
        let decay = Duration::from_secs(10);
        let mut e = PeakEwma::new(t0);
        e.observe(300 * MS, t0, decay);
        let later = e.get(t0 + Duration::from_secs(10), decay);
        assert!(later < 120 * MS && later > 100 * MS, "{later:?}");
        let much_later = e.get(t0 + Duration::from_secs(60), decay);
        assert!(much_later < 2 * MS, "{much_later:?}");
        assert_eq!(e.sampled_at(), t0);
    }

    /// Fast answers a millisecond apart bring a peak down within a few
    /// windows of samples, not a few decays of time (by time alone, 200
    /// samples over 200 ms would keep 98% of the peak).
    #[test]
    fn a_stream_of_fast_answers_brings_a_peak_down() {
        let t0 = Instant::now();
        let decay = Duration::from_secs(10);
        let mut e = PeakEwma::new(t0);
        e.observe(2000 * MS, t0, decay);
        for i in 1..=200u32 {
            e.observe(20 * MS, t0 + i * MS, decay);
        }
        let now = t0 + 200 * MS;
        let got = e.get(now, decay);
        assert!(got < 40 * MS, "{got:?}");
        // A slower answer in the stream still counts at once.
        e.observe(500 * MS, now, decay);
        assert_eq!(e.get(now, decay), 500 * MS);
    }

    fn cand(ms: u32, pending: u32, weight: u32) -> Candidate {
        Candidate {
            latency: ms * MS,
            pending,
            weight,
        }
    }

    #[test]
    fn the_cheaper_of_two_wins() {
        let c = [cand(10, 0, 1), cand(1, 0, 1), cand(1, 50, 1)];
        assert_eq!(p2c(&c, 0, 0), Some(1));
        // Many requests outstanding make a fast endpoint expensive.
        assert_eq!(p2c(&c, 2, 0), Some(0));
        // Weight: a cluster with 10x the capacity takes the load.
        let w = [cand(5, 3, 1), cand(5, 3, 10)];
        assert_eq!(p2c(&w, 0, 0), Some(1));
        assert_eq!(p2c(&[], 1, 2), None);
        assert_eq!(p2c(&[cand(9, 9, 1)], 7, 3), Some(0));
    }

    #[test]
    fn the_two_draws_are_never_the_same_candidate() {
        // If both draws could land on the slow one, it would sometimes be
        // picked; with two candidates the fast one must always win.
        let c = [cand(1, 0, 1), cand(50, 0, 1)];
        for a in 0..20 {
            for b in 0..20 {
                assert_eq!(p2c(&c, a, b), Some(0), "draws {a}, {b}");
            }
        }
    }
}
