//! Priority levels by locality, and how traffic spills from one level to
//! the next as a level loses health.
//!
//! A level keeps all its traffic while at least `failover_threshold` of its
//! capacity is healthy (Envoy's overprovisioning factor of 1.4 makes that
//! about 71%). Below, it keeps `healthy_fraction / threshold` of it, and the
//! rest goes to the next level. Losses apply at once; recoveries apply only
//! after a level has held them for the failback window ([`Failback`]), so a
//! flapping zone does not swing traffic back and forth.

use std::time::{Duration, Instant};

pub use fedmesh_api::policy::{FailoverOrder, Level};

/// Where an endpoint (or a remote cluster) runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Locality {
    pub cloud: String,
    pub region: String,
    pub zone: String,
}

impl Locality {
    /// The level `target` is at, seen from here.
    pub fn level_of(&self, target: &Locality) -> Level {
        if self.cloud != target.cloud {
            Level::Other
        } else if self.region != target.region {
            Level::Cloud
        } else if self.zone != target.zone {
            Level::Region
        } else {
            Level::Zone
        }
    }
}

/// Healthy and total capacity of one priority level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub healthy: u64,
    pub total: u64,
}

/// Default `failoverThreshold`: 1 / 1.4, Envoy's overprovisioning factor.
pub const DEFAULT_FAILOVER_THRESHOLD: f64 = 1.0 / 1.4;

/// Each level's health in [0, 1]: its healthy fraction over `threshold`,
/// capped at 1. An empty level has none.
pub fn health(levels: &[Capacity], threshold: f64) -> Vec<f64> {
    levels
        .iter()
        .map(|c| {
            if c.total == 0 {
                0.0
            } else {
                (c.healthy as f64 / c.total as f64 / threshold).min(1.0)
            }
        })
        .collect()
}

/// The share of traffic for each level, from their health, best level
/// first. Shares sum to 1, or are all 0 when nothing is healthy anywhere
/// (the caller then decides: fail, or try everything). When the levels'
/// health adds up to less than 1, it is scaled up, so that all traffic
/// still goes somewhere, in the same proportions.
pub fn shares(health: &[f64]) -> Vec<f64> {
    let total: f64 = health.iter().sum();
    if total <= 0.0 {
        return vec![0.0; health.len()];
    }
    let scale = if total < 1.0 { 1.0 / total } else { 1.0 };
    let mut left = 1.0f64;
    health
        .iter()
        .map(|h| {
            let take = (h * scale).min(left);
            left -= take;
            take
        })
        .collect()
}

/// Hysteresis on failback: a level's health may drop at once, but a rise
/// counts only after it has held for `hold`, and then only as far as its
/// lowest value over that time.
#[derive(Debug, Clone)]
pub struct Failback {
    hold: Duration,
    levels: Vec<Held>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    effective: f64,
    /// A rise in progress: the lowest health seen since it began, and when.
    rising: Option<(f64, Instant)>,
}

impl Failback {
    pub fn new(levels: usize, hold: Duration) -> Self {
        Self {
            hold,
            levels: vec![
                Held {
                    effective: 1.0,
                    rising: None,
                };
                levels
            ],
        }
    }

    /// Takes the observed health of each level and returns the health to
    /// balance on.
    pub fn update(&mut self, observed: &[f64], now: Instant) -> Vec<f64> {
        self.levels.resize(
            observed.len(),
            Held {
                effective: 1.0,
                rising: None,
            },
        );
        for (held, &seen) in self.levels.iter_mut().zip(observed) {
            if seen <= held.effective {
                held.effective = seen;
                held.rising = None;
                continue;
            }
            let (low, since) = match held.rising {
                Some((low, since)) => (low.min(seen), since),
                None => (seen, now),
            };
            if now.duration_since(since) >= self.hold {
                held.effective = low;
                // Still higher than what was held: start the next hold.
                held.rising = (seen > low).then_some((seen, now));
            } else {
                held.rising = Some((low, since));
            }
        }
        self.levels.iter().map(|h| h.effective).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_orders_rank_targets() {
        use Level::*;
        let loc = FailoverOrder::Locality;
        assert_eq!(loc.priority("aws", "gcp", Other), 3);
        let levels = FailoverOrder::Levels(vec![Zone, Cloud, Region, Other]);
        assert!(levels.validate().is_ok());
        assert_eq!(
            [Zone, Region, Cloud, Other].map(|l| levels.priority("aws", "x", l)),
            [0, 2, 1, 3]
        );
        assert!(FailoverOrder::Levels(vec![Zone, Zone]).validate().is_err());

        // Our zone, our other zones, then azure before gcp, then the rest.
        let clusters = FailoverOrder::Clusters(vec!["azure".into(), "gcp".into()]);
        let p = |c: &str, l| clusters.priority("aws", c, l);
        assert_eq!(
            [
                p("aws", Zone),
                p("aws", Region),
                p("azure", Other),
                p("gcp", Cloud),
                p("oci", Other)
            ],
            [0, 1, 2, 3, 4]
        );
        // Listed after another, our own cluster waits its turn.
        let late = FailoverOrder::Clusters(vec!["gcp".into(), "aws".into()]);
        assert_eq!(
            [
                late.priority("aws", "gcp", Other),
                late.priority("aws", "aws", Zone),
                late.priority("aws", "aws", Region)
            ],
            [0, 1, 2]
        );
        assert!(
            FailoverOrder::Clusters(vec!["a".into(), "a".into()])
                .validate()
                .unwrap_err()
                .contains("clusters[1]")
        );
    }

    fn loc(cloud: &str, region: &str, zone: &str) -> Locality {
        Locality {
            cloud: cloud.into(),
            region: region.into(),
            zone: zone.into(),
        }
    }

    fn cap(healthy: u64, total: u64) -> Capacity {
        Capacity { healthy, total }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn levels_go_zone_region_cloud_other() {
        let me = loc("aws", "use1", "use1-a");
        assert_eq!(me.level_of(&loc("aws", "use1", "use1-a")), Level::Zone);
        assert_eq!(me.level_of(&loc("aws", "use1", "use1-b")), Level::Region);
        assert_eq!(me.level_of(&loc("aws", "usw2", "usw2-a")), Level::Cloud);
        assert_eq!(me.level_of(&loc("gcp", "use1", "use1-a")), Level::Other);
    }

    #[test]
    fn a_level_keeps_its_traffic_down_to_the_threshold_then_spills() {
        let t = DEFAULT_FAILOVER_THRESHOLD;
        // 3 of 4 healthy (75%) is above ~71%: no spill.
        assert!(close(
            &shares(&health(&[cap(3, 4), cap(4, 4)], t)),
            &[1.0, 0.0]
        ));
        // Half healthy: keeps 0.5 * 1.4 = 70%, spills 30%.
        assert!(close(
            &shares(&health(&[cap(2, 4), cap(4, 4)], t)),
            &[0.7, 0.3]
        ));
        // Zone loss: everything to the next level.
        assert!(close(
            &shares(&health(&[cap(0, 4), cap(4, 4), cap(4, 4)], t)),
            &[0.0, 1.0, 0.0]
        ));
        // Zone and region lost, cloud half healthy: cloud 70%, the rest 30%.
        let s = shares(&health(&[cap(0, 2), cap(0, 2), cap(1, 2), cap(9, 9)], t));
        assert!(close(&s, &[0.0, 0.0, 0.7, 0.3]), "{s:?}");
    }

    #[test]
    fn partial_degradation_everywhere_is_scaled_not_dropped() {
        // Both levels at 20% healthy: health 0.28 each, 0.56 in all; scaled
        // up, traffic still all goes somewhere, the better level first.
        let s = shares(&health(&[cap(1, 5), cap(1, 5)], DEFAULT_FAILOVER_THRESHOLD));
        assert!(close(&s, &[0.5, 0.5]), "{s:?}");
        // Nothing healthy anywhere: no shares; the caller decides.
        assert!(close(
            &shares(&health(&[cap(0, 3), cap(0, 0)], 0.7)),
            &[0.0, 0.0]
        ));
    }

    #[test]
    fn losses_apply_at_once_and_recoveries_after_the_hold() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut f = Failback::new(2, 30 * s);
        assert_eq!(f.update(&[1.0, 1.0], t0), [1.0, 1.0]);
        // The local zone fails: traffic moves now.
        assert_eq!(f.update(&[0.0, 1.0], t0 + s), [0.0, 1.0]);
        // It comes back: held at 0 until it has been back for 30 s.
        assert_eq!(f.update(&[1.0, 1.0], t0 + 2 * s), [0.0, 1.0]);
        assert_eq!(f.update(&[1.0, 1.0], t0 + 31 * s), [0.0, 1.0]);
        assert_eq!(f.update(&[1.0, 1.0], t0 + 32 * s), [1.0, 1.0]);
    }

    #[test]
    fn a_flapping_level_does_not_swing_traffic_back() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut f = Failback::new(1, 10 * s);
        f.update(&[0.0], t0);
        // Up and down every 4 s for a minute: never counted as recovered.
        for i in 1..15u32 {
            let seen = if i % 2 == 1 { 1.0 } else { 0.0 };
            assert_eq!(f.update(&[seen], t0 + 4 * i * s), [0.0], "at {}s", 4 * i);
        }
        // A rise that dipped on the way is credited only its low point.
        let t1 = t0 + 100 * s;
        f.update(&[0.8], t1);
        f.update(&[0.5], t1 + 5 * s);
        assert_eq!(f.update(&[1.0], t1 + 10 * s), [0.5]);
        // ...and the rest after another hold.
        assert_eq!(f.update(&[1.0], t1 + 20 * s), [1.0]);
    }
}
