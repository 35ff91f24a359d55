//! What a drill showed, from its records alone: I/O-free, so every figure
//! is tested on made-up records.
//!
//! - **detect**: from the fault until the first request that shows it
//!   (failed, slow, or served away from home: a cluster and zone that did
//!   not serve a twentieth of the second before the fault);
//! - **RTO**: from the fault until every bad request has ended and a good
//!   one due after the last of them has its answer (0 when no request was
//!   ever bad);
//! - **failback**: from recovery until a request is served again by the
//!   cluster and zone that served most before the fault.
//!
//! A request is *good* when it succeeded within the drill's `slow` bound.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::drill::{Drill, Thresholds};
use crate::load::Record;

/// How long before the fault traffic is looked at to say where home is.
pub const HOME_WINDOW: Duration = Duration::from_secs(1);

/// The width of one step of the timeline.
pub const BUCKET: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub drill: String,
    pub about: String,
    pub client: String,
    pub service: String,
    pub rate: u32,
    /// What was broken, as it was resolved at the fault.
    pub fault: String,
    #[serde(with = "humantime_serde")]
    pub fault_at: Duration,
    #[serde(with = "humantime_serde")]
    pub recover_at: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub requests: u64,
    pub failed: u64,
    /// Failures by status or kind (`503`, `timeout`, …).
    pub failed_by: BTreeMap<String, u64>,
    pub longest_failure_run: Run,
    #[serde(with = "humantime_serde")]
    pub detect: Option<Duration>,
    /// `None`: requests never recovered while the fault lasted.
    #[serde(with = "humantime_serde")]
    pub rto: Option<Duration>,
    /// `None`: traffic never moved, or never came back.
    #[serde(with = "humantime_serde")]
    pub failback: Option<Duration>,
    /// Requests served, while the fault lasted, by a cluster that served
    /// none before it.
    pub moved: u64,
    /// Whether any request was served by a cluster or zone that was not
    /// home.
    pub left_home: bool,
    /// Where most requests were served before the fault:
    /// `cluster/zone`.
    pub home: Option<String>,
    pub before: Percentiles,
    pub during: Percentiles,
    pub after: Percentiles,
    pub timeline: Vec<Bucket>,
    /// From the fault until the global zone was whole again (`None`: not
    /// within the drill, or not asked for).
    #[serde(default, with = "humantime_serde")]
    pub healed: Option<Duration>,
    pub verdict: Verdict,
}

/// Consecutive failed requests, in the order they were due.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub requests: u64,
    #[serde(with = "humantime_serde")]
    pub from: Duration,
    #[serde(with = "humantime_serde")]
    pub lasted: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub requests: u64,
    #[serde(with = "humantime_serde")]
    pub p50: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub p99: Option<Duration>,
}

/// One step of the timeline: requests due in `[at, at + BUCKET)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Successes by where they were served (`cluster/zone`; `?` when
    /// unknown: TCP).
    pub served: BTreeMap<String, u64>,
    pub failed: u64,
    #[serde(with = "humantime_serde")]
    pub p99: Option<Duration>,
}

impl Bucket {
    pub fn requests(&self) -> u64 {
        self.served.values().sum::<u64>() + self.failed
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    /// Each threshold missed, said plainly.
    pub missed: Vec<String>,
}

impl Report {
    /// Judges `records` (in the order they were due) of a run of `drill`.
    pub fn new(drill: &Drill, records: &[Record]) -> Report {
        let fault = drill.fault.at;
        let recover = drill.fault.recover;
        let end_of_fault = drill.recovery();
        let slow = drill.thresholds.slow();
        let good = |r: &Record| r.outcome.ok() && r.latency <= slow;
        let done = |r: &Record| r.due + r.latency;

        let before: Vec<&Record> = records.iter().filter(|r| r.due < fault).collect();
        let during: Vec<&Record> = records
            .iter()
            .filter(|r| r.due >= fault && r.due < end_of_fault)
            .collect();
        let after: Vec<&Record> = records
            .iter()
            .filter(|r| recover.is_some_and(|at| r.due >= at))
            .collect();

        // Home: where (cluster and zone) traffic went in the last second
        // before the fault, each place with at least a twentieth of it (a
        // balancer's occasional probe elsewhere is not home).
        let last_second = before
            .iter()
            .filter(|r| r.outcome.ok() && r.due + HOME_WINDOW >= fault);
        let mut homes: BTreeMap<String, u64> = BTreeMap::new();
        let mut counted = 0u64;
        for r in last_second {
            if let Some(p) = place(r) {
                *homes.entry(p).or_default() += 1;
                counted += 1;
            }
        }
        let home = homes
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(p, _)| p.clone());
        homes.retain(|_, n| *n * 20 >= counted);
        // Every cluster that served anything before the fault: traffic
        // going to one of them has not moved.
        let served_before: Vec<&str> = before
            .iter()
            .filter(|r| r.outcome.ok())
            .filter_map(|r| r.cluster.as_deref())
            .collect();
        let elsewhere = |r: &Record| place(r).is_some_and(|p| !homes.contains_key(&p));
        let other_cluster = |r: &Record| {
            r.cluster
                .as_deref()
                .is_some_and(|c| !served_before.contains(&c))
        };

        let detect = during
            .iter()
            .find(|r| !good(r) || elsewhere(r))
            .map(|r| done(r).saturating_sub(fault));
        // Recovered once every bad request has ended and a good one after
        // the last of them has its answer.
        let rto = match during.iter().rposition(|r| !good(r)) {
            None => Some(Duration::ZERO),
            Some(last_bad) => {
                let bad_ended = during.iter().filter(|r| !good(r)).map(|r| done(r)).max();
                during[last_bad + 1..].iter().find(|r| good(r)).map(|r| {
                    done(r)
                        .max(bad_ended.unwrap_or_default())
                        .saturating_sub(fault)
                })
            }
        };
        // While the fault lasts: what recovery itself does is failback's.
        let moved = during
            .iter()
            .filter(|r| r.outcome.ok() && other_cluster(r))
            .count() as u64;
        let left_home = records.iter().any(|r| r.outcome.ok() && elsewhere(r));
        let failback = match (recover, &home) {
            (Some(at), Some(home)) if left_home => after
                .iter()
                .find(|r| r.outcome.ok() && place(r).as_ref() == Some(home))
                .map(|r| done(r).saturating_sub(at)),
            _ => None,
        };

        let mut failed_by = BTreeMap::new();
        for r in records.iter().filter(|r| !r.outcome.ok()) {
            *failed_by.entry(r.outcome.label()).or_default() += 1;
        }
        let failed = failed_by.values().sum();

        let mut report = Report {
            drill: drill.name.clone(),
            about: drill.about.clone(),
            client: drill.client.clone(),
            service: drill.service.clone(),
            rate: drill.rate,
            fault: drill.fault.action.to_string(),
            fault_at: fault,
            recover_at: recover,
            duration: drill.duration,
            requests: records.len() as u64,
            failed,
            failed_by,
            longest_failure_run: longest_run(records),
            detect,
            rto,
            failback,
            moved,
            left_home,
            home,
            before: percentiles(&before),
            during: percentiles(&during),
            after: percentiles(&after),
            timeline: timeline(records, drill.duration),
            healed: None,
            verdict: Verdict::default(),
        };
        report.verdict = judge(&report, &drill.thresholds);
        report
    }
}

impl Report {
    /// This report with the time the zone took to heal, judged again.
    pub fn with_healed(mut self, healed: Option<Duration>, t: &Thresholds) -> Report {
        self.healed = healed;
        self.verdict = judge(&self, t);
        self
    }
}

/// Where a request was served: `cluster/zone`, or the cluster alone.
fn place(r: &Record) -> Option<String> {
    let c = r.cluster.as_deref()?;
    Some(match &r.zone {
        Some(z) => format!("{c}/{z}"),
        None => c.to_string(),
    })
}

fn longest_run(records: &[Record]) -> Run {
    let mut best = Run::default();
    let mut current: Option<(usize, usize)> = None;
    for (i, r) in records.iter().enumerate() {
        if r.outcome.ok() {
            current = None;
            continue;
        }
        let (start, _) = *current.get_or_insert((i, i));
        current = Some((start, i));
        let n = (i - start + 1) as u64;
        if n > best.requests {
            best = Run {
                requests: n,
                from: records[start].due,
                lasted: (r.due + r.latency).saturating_sub(records[start].due),
            };
        }
    }
    best
}

fn percentiles(records: &[&Record]) -> Percentiles {
    let mut latencies: Vec<Duration> = records.iter().map(|r| r.latency).collect();
    latencies.sort();
    let at = |q: f64| {
        (!latencies.is_empty()).then(|| {
            let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
            latencies[i - 1]
        })
    };
    Percentiles {
        requests: records.len() as u64,
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn timeline(records: &[Record], duration: Duration) -> Vec<Bucket> {
    let steps = duration.as_millis().div_ceil(BUCKET.as_millis()) as usize;
    let mut buckets: Vec<Bucket> = (0..steps)
        .map(|i| Bucket {
            at: BUCKET * i as u32,
            ..Default::default()
        })
        .collect();
    let mut latencies: Vec<Vec<&Record>> = vec![Vec::new(); steps];
    for r in records {
        let i = (r.due.as_millis() / BUCKET.as_millis()) as usize;
        let Some(b) = buckets.get_mut(i) else {
            continue;
        };
        if r.outcome.ok() {
            let c = place(r).unwrap_or_else(|| "?".into());
            *b.served.entry(c).or_default() += 1;
        } else {
            b.failed += 1;
        }
        latencies[i].push(r);
    }
    for (b, rs) in buckets.iter_mut().zip(&latencies) {
        b.p99 = percentiles(rs).p99;
    }
    buckets
}

fn judge(r: &Report, t: &Thresholds) -> Verdict {
    let mut missed = Vec::new();
    if let Some(max) = t.failed
        && r.failed > max
    {
        missed.push(format!("{} requests failed (at most {max})", r.failed));
    }
    if let Some(max) = t.rto {
        match r.rto {
            None => missed.push("requests never recovered while the fault lasted".into()),
            Some(rto) if rto > max => missed.push(format!("RTO {} (at most {})", ms(rto), ms(max))),
            _ => {}
        }
    }
    if let Some(max) = t.moved
        && r.moved > max
    {
        missed.push(format!(
            "{} requests moved to another cluster (at most {max})",
            r.moved
        ));
    }
    if let (Some(max), Some(p99)) = (t.p99_during, r.during.p99)
        && p99 > max
    {
        missed.push(format!(
            "p99 during the fault {} (at most {})",
            ms(p99),
            ms(max)
        ));
    }
    if let Some(max) = t.failback
        && r.left_home
    {
        match r.failback {
            None => missed.push("traffic never came back after recovery".into()),
            Some(fb) if fb > max => {
                missed.push(format!("failback {} (at most {})", ms(fb), ms(max)))
            }
            _ => {}
        }
    }
    if let Some(max) = t.healed {
        match r.healed {
            None => missed.push("the global zone was not whole again within the drill".into()),
            Some(h) if h > max => missed.push(format!(
                "the zone healed in {} (at most {})",
                ms(h),
                ms(max)
            )),
            _ => {}
        }
    }
    Verdict {
        passed: missed.is_empty(),
        missed,
    }
}

/// A duration as people read it in a report: `0 ms`, `840 ms`, `2.31 s`.
pub fn ms(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Outcome;

    const MS: Duration = Duration::from_millis(1);

    fn drill(thresholds: &str) -> Drill {
        Drill::parse(
            &format!(
                "name: t
topology: three-clouds
client: aws
service: shop/frontend
rate: 100
duration: 6s
fault: {{kill: aws@az1, at: 2s, recover: 4s}}
thresholds: {thresholds}
"
            ),
            "t.yaml",
        )
        .unwrap()
    }

    /// 100 requests a second for 6 s, each 5 ms, served by what `serve`
    /// says at its due time (`None`: failed with a 503).
    fn records(serve: impl Fn(Duration) -> Option<&'static str>) -> Vec<Record> {
        (0..600)
            .map(|i| {
                let due = 10 * MS * i;
                let at = serve(due);
                Record {
                    due,
                    latency: 5 * MS,
                    outcome: at.map_or(Outcome::Status(503), |_| Outcome::Ok),
                    cluster: at.map(str::to_string),
                    zone: at.map(|_| "z".to_string()),
                }
            })
            .collect()
    }

    #[test]
    fn a_zone_that_heals_late_or_never_misses_healed() {
        let d = drill("{failed: 0, healed: 10s}");
        let recs = records(|_| Some("aws"));
        let judged = |h| Report::new(&d, &recs).with_healed(h, &d.thresholds);
        assert!(judged(Some(Duration::from_secs(4))).verdict.passed);
        let late = judged(Some(Duration::from_secs(12)));
        assert_eq!(
            late.verdict.missed,
            ["the zone healed in 12.00 s (at most 10.00 s)"]
        );
        let never = judged(None);
        assert_eq!(
            never.verdict.missed,
            ["the global zone was not whole again within the drill"]
        );
        // Not asked for: not judged.
        let d = drill("{failed: 0}");
        assert!(
            Report::new(&d, &recs)
                .with_healed(None, &d.thresholds)
                .verdict
                .passed
        );
    }

    #[test]
    fn a_clean_failover_and_failback() {
        // Served by aws until 2.3 s, by gcp until 4.5 s, then by aws again.
        let recs = records(|t| {
            Some(if t < 2300 * MS || t >= 4500 * MS {
                "aws"
            } else {
                "gcp"
            })
        });
        let r = Report::new(&drill("{failed: 0, rto: 1s, failback: 1s}"), &recs);
        assert_eq!((r.requests, r.failed), (600, 0));
        assert_eq!(r.home.as_deref(), Some("aws/z"));
        assert_eq!(r.detect, Some(305 * MS));
        assert_eq!(r.rto, Some(Duration::ZERO), "no request was ever bad");
        assert_eq!(r.moved, 170, "while the fault lasted");
        assert_eq!(r.failback, Some(505 * MS));
        assert!(r.verdict.passed, "{:?}", r.verdict);
        assert_eq!(r.timeline.len(), 24);
        assert_eq!(r.timeline[0].served.get("aws/z"), Some(&25));
    }

    #[test]
    fn failures_make_the_rto_the_longest_run_and_the_verdict() {
        // Failing from 2 s to 2.6 s, then gcp; never back.
        let recs = records(|t| match t {
            t if t < 2000 * MS => Some("aws"),
            t if t < 2600 * MS => None,
            _ => Some("gcp"),
        });
        let r = Report::new(&drill("{failed: 0, rto: 500ms, failback: 1s}"), &recs);
        assert_eq!(r.failed, 60);
        assert_eq!(r.failed_by.get("503"), Some(&60));
        assert_eq!(r.longest_failure_run.requests, 60);
        assert_eq!(r.longest_failure_run.from, 2000 * MS);
        assert_eq!(r.detect, Some(5 * MS));
        assert_eq!(r.rto, Some(605 * MS));
        assert_eq!(r.failback, None);
        assert!(!r.verdict.passed);
        assert_eq!(
            r.verdict.missed,
            [
                "60 requests failed (at most 0)",
                "RTO 605 ms (at most 500 ms)",
                "traffic never came back after recovery",
            ]
        );
        assert_eq!(r.timeline[8].failed, 25);
    }

    #[test]
    fn a_stall_counts_as_down_even_when_it_ends_in_success() {
        let mut recs = records(|_| Some("aws"));
        // Requests due from 2 s to 2.5 s wait until 3.5 s.
        for r in recs
            .iter_mut()
            .filter(|r| r.due >= 2000 * MS && r.due < 2500 * MS)
        {
            r.latency = 3500 * MS - r.due;
        }
        let r = Report::new(&drill("{failed: 0, rto: 1s, moved: 0}"), &recs);
        assert_eq!(r.failed, 0);
        assert_eq!(r.rto, Some(1500 * MS), "until the stalled ones ended");
        assert_eq!(r.during.p99, Some(1480 * MS));
        assert_eq!(r.moved, 0);
        assert_eq!(r.verdict.missed, ["RTO 1.50 s (at most 1.00 s)"]);
        let r = Report::new(&drill("{p99_during: 100ms}"), &recs);
        assert_eq!(
            r.verdict.missed,
            ["p99 during the fault 1.48 s (at most 100 ms)"]
        );
    }

    #[test]
    fn traffic_that_moves_when_it_must_not_fails_the_drill() {
        let recs = records(|t| Some(if t < 3000 * MS { "aws" } else { "gcp" }));
        let r = Report::new(&drill("{moved: 0}"), &recs);
        assert_eq!(r.moved, 100);
        assert_eq!(
            r.verdict.missed,
            ["100 requests moved to another cluster (at most 0)"]
        );
    }

    /// A balancer's occasional request elsewhere before the fault does not
    /// make that cluster home: traffic going there shows the fault. It is
    /// not a cluster new to the traffic, though.
    #[test]
    fn a_probe_elsewhere_is_not_home() {
        let recs = records(|t| {
            let probe = (t.as_millis() / 10) % 50 == 0;
            Some(if t < 2000 * MS && !probe {
                "aws"
            } else {
                "gcp"
            })
        });
        let r = Report::new(&drill("{moved: 0}"), &recs);
        assert_eq!(r.home.as_deref(), Some("aws/z"));
        assert_eq!(r.detect, Some(5 * MS), "gcp is not home");
        assert!(r.left_home);
        assert_eq!(r.moved, 0, "but it had served before: no cluster is new");
    }

    #[test]
    fn a_fault_never_recovered_from_has_no_rto() {
        let recs = records(|t| (t < 2000 * MS).then_some("aws"));
        let r = Report::new(&drill("{rto: 1s}"), &recs);
        assert_eq!(r.rto, None);
        assert_eq!(
            r.verdict.missed,
            ["requests never recovered while the fault lasted"]
        );
    }
}
