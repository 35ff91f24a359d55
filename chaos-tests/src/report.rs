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
//!   cluster and zone that served most before the fault;
//! - **share shift**: the most any cluster's share of the traffic moved, in
//!   any second of the fault, from its share in the two seconds before it
//!   ("no change in traffic" is this, near zero);
//! - **recovered shift**: the same, over the end of the drill from a stated
//!   time after recovery (a cluster starved after a gray failure shows
//!   here).
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

/// The traffic before the fault that shares and the p99 before are taken
/// from: late enough that connections are warm.
pub const BASELINE: Duration = Duration::from_secs(2);

/// Shares are compared over a second, slid by one bucket: one bucket holds
/// 50 requests at 200/s, whose split between two clusters varies by seven
/// points by chance alone; a second, by three and a half.
pub const SHARE_WINDOW: Duration = Duration::from_secs(1);

/// How close to its share before the fault a cluster's share must be to
/// count as back.
pub const RECOVERED_POINTS: f64 = 0.10;

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
    /// The drill's other faults, with their times (not judged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub requests: u64,
    pub failed: u64,
    /// Failed requests due after the fault was detected (a TCP connection
    /// open when its backend dies breaks, as bytes cannot be replayed; one
    /// opened after the fault showed must not).
    #[serde(default)]
    pub failed_after_detect: u64,
    /// Failures by status or kind (`503`, `timeout`, …).
    pub failed_by: BTreeMap<String, u64>,
    /// What the first failed answers said, up to [`FAILED_WHY`] different
    /// ones (a fedmesh proxy names the attempt that failed and why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_why: Vec<String>,
    pub longest_failure_run: Run,
    #[serde(with = "humantime_serde")]
    pub detect: Option<Duration>,
    /// `None`: requests never recovered while the fault lasted.
    #[serde(with = "humantime_serde")]
    pub rto: Option<Duration>,
    /// `None`: traffic never moved, or never came back.
    #[serde(with = "humantime_serde")]
    pub failback: Option<Duration>,
    /// The largest change of any cluster's share of the traffic, in any
    /// [`SHARE_WINDOW`] within the fault, from its share in the
    /// [`BASELINE`] (0.38: a cluster gained or lost 38 points).
    pub share_shift: Option<f64>,
    /// Where that window started.
    #[serde(with = "humantime_serde")]
    pub share_shift_at: Option<Duration>,
    /// The same change over the traffic from `recovered_share` after
    /// recovery to the end (asked for by that threshold).
    #[serde(default)]
    pub recovered_shift: Option<f64>,
    /// Whether any request was served by a cluster or zone that was not
    /// home.
    pub left_home: bool,
    /// Where most requests were served before the fault:
    /// `cluster/zone`.
    pub home: Option<String>,
    /// Over the [`BASELINE`].
    pub before: Percentiles,
    pub during: Percentiles,
    pub after: Percentiles,
    pub timeline: Vec<Bucket>,
    /// From the fault until the global zone was whole again (`None`: not
    /// within the drill, or not asked for).
    #[serde(default, with = "humantime_serde")]
    pub healed: Option<Duration>,
    /// Handshakes refused for trust during the drill (`None`: not asked
    /// for).
    #[serde(default)]
    pub handshakes_failed: Option<u64>,
    pub verdict: Verdict,
}

/// What the runner measured of the federation rather than of the load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observed {
    pub healed: Option<Duration>,
    pub handshakes_failed: Option<u64>,
}

/// How many different failed answers a report keeps.
pub const FAILED_WHY: usize = 3;

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
        let baseline: Vec<&Record> = before
            .iter()
            .copied()
            .filter(|r| r.due + BASELINE >= fault)
            .collect();
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
        let elsewhere = |r: &Record| place(r).is_some_and(|p| !homes.contains_key(&p));

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
        let split_before = split(&baseline);
        let (share_shift, share_shift_at) =
            largest_shift(records, &split_before, fault, end_of_fault);
        let recovered_shift = match (recover, drill.thresholds.recovered_share) {
            (Some(at), Some(within)) => {
                let late: Vec<&Record> = records.iter().filter(|r| r.due >= at + within).collect();
                shift(&split_before, &split(&late))
            }
            _ => None,
        };
        let left_home = records.iter().any(|r| r.outcome.ok() && elsewhere(r));
        let failback = match (recover, &home) {
            (Some(at), Some(home)) if left_home => after
                .iter()
                .find(|r| r.outcome.ok() && place(r).as_ref() == Some(home))
                .map(|r| done(r).saturating_sub(at)),
            _ => None,
        };

        let (failed_by, failed_why) = failures(records);
        let failed = failed_by.values().sum();
        let failed_after_detect = detect.map_or(0, |d| {
            records
                .iter()
                .filter(|r| r.due >= fault + d && !r.outcome.ok())
                .count() as u64
        });

        let mut report = Report {
            drill: drill.name.clone(),
            about: drill.about.clone(),
            client: drill.client.list().join(", "),
            service: drill.service.clone(),
            rate: drill.rate,
            fault: drill.fault.action.to_string(),
            also: also_text(drill),
            fault_at: fault,
            recover_at: recover,
            duration: drill.duration,
            requests: records.len() as u64,
            failed,
            failed_after_detect,
            failed_by,
            failed_why,
            longest_failure_run: longest_run(records),
            detect,
            rto,
            failback,
            share_shift,
            share_shift_at,
            recovered_shift,
            left_home,
            home,
            before: percentiles(&baseline),
            during: percentiles(&during),
            after: percentiles(&after),
            timeline: timeline(records, drill.duration),
            healed: None,
            handshakes_failed: None,
            verdict: Verdict::default(),
        };
        report.verdict = judge(&report, &drill.thresholds);
        report
    }
}

impl Report {
    /// This report with what was measured of the federation, judged
    /// again.
    pub fn with_observed(mut self, o: Observed, t: &Thresholds) -> Report {
        self.healed = o.healed;
        self.handshakes_failed = o.handshakes_failed;
        self.verdict = judge(&self, t);
        self
    }
}

/// Each other fault with its times: `freeze etcd at 3.0 s, undone at
/// 23.0 s`.
fn also_text(drill: &Drill) -> Vec<String> {
    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    drill
        .also
        .iter()
        .map(|f| match f.recover {
            Some(r) => format!("{} at {}, undone at {}", f.action, secs(f.at), secs(r)),
            None => format!("{} at {}", f.action, secs(f.at)),
        })
        .collect()
}

/// Failed requests by label, and the first [`FAILED_WHY`] different
/// answers they got.
fn failures(records: &[Record]) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut by = BTreeMap::new();
    let mut why: Vec<String> = Vec::new();
    for r in records.iter().filter(|r| !r.outcome.ok()) {
        *by.entry(r.outcome.label()).or_default() += 1;
        if let Some(w) = &r.why
            && why.len() < FAILED_WHY
            && !why.contains(w)
        {
            why.push(w.clone());
        }
    }
    (by, why)
}

/// Where a request was served: `cluster/zone`, or the cluster alone.
fn place(r: &Record) -> Option<String> {
    let c = r.cluster.as_deref()?;
    Some(match &r.zone {
        Some(z) => format!("{c}/{z}"),
        None => c.to_string(),
    })
}

/// Each cluster's share of the successes among `records` (`?`: served
/// where the record does not say); empty when none succeeded.
fn split(records: &[&Record]) -> BTreeMap<String, f64> {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r.outcome.ok()) {
        let c = r.cluster.clone().unwrap_or_else(|| "?".into());
        *counts.entry(c).or_default() += 1;
    }
    let total = counts.values().sum::<u64>() as f64;
    counts
        .into_iter()
        .map(|(c, n)| (c, n as f64 / total))
        .collect()
}

/// The largest difference of any cluster's share between two splits;
/// `None` when either has no success to compare.
fn shift(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Option<f64> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let share = |m: &BTreeMap<String, f64>, c: &String| m.get(c).copied().unwrap_or(0.0);
    a.keys()
        .chain(b.keys())
        .map(|c| (share(a, c) - share(b, c)).abs())
        .reduce(f64::max)
}

/// The largest [`shift`] from `before` of any [`SHARE_WINDOW`] in
/// `[from, to)` (the whole span when it is shorter), and where that window
/// starts. `records` are in the order they were due.
fn largest_shift(
    records: &[Record],
    before: &BTreeMap<String, f64>,
    from: Duration,
    to: Duration,
) -> (Option<f64>, Option<Duration>) {
    let window = |start: Duration, end: Duration| {
        let lo = records.partition_point(|r| r.due < start);
        let hi = records.partition_point(|r| r.due < end);
        let rs: Vec<&Record> = records[lo..hi].iter().collect();
        shift(before, &split(&rs))
    };
    let mut starts = vec![from];
    let mut s = from + BUCKET;
    while s + SHARE_WINDOW <= to {
        starts.push(s);
        s += BUCKET;
    }
    let mut best: (Option<f64>, Option<Duration>) = (None, None);
    for start in starts {
        let end = (start + SHARE_WINDOW).min(to);
        if let Some(x) = window(start, end)
            && best.0.is_none_or(|b| x > b)
        {
            best = (Some(x), Some(start));
        }
    }
    best
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
    let mut missed = judge_traffic(r, t);
    missed.extend(judge_recovery(r, t));
    Verdict {
        passed: missed.is_empty(),
        missed,
    }
}

/// Failures, how long they lasted, where traffic went and how slow it was
/// while the fault lasted.
fn judge_traffic(r: &Report, t: &Thresholds) -> Vec<String> {
    let mut missed = Vec::new();
    if let Some(max) = t.failed
        && r.failed > max
    {
        missed.push(format!("{} requests failed (at most {max})", r.failed));
    }
    if let Some(max) = t.failed_after_detect
        && r.failed_after_detect > max
    {
        missed.push(format!(
            "{} requests due after the fault was detected failed (at most {max})",
            r.failed_after_detect
        ));
    }
    if let Some(max) = t.rto {
        match r.rto {
            None => missed.push("requests never recovered while the fault lasted".into()),
            Some(rto) if rto > max => missed.push(format!("RTO {} (at most {})", ms(rto), ms(max))),
            _ => {}
        }
    }
    if let (Some(max), Some(x), Some(at)) = (t.max_share_shift, r.share_shift, r.share_shift_at)
        && x > max
    {
        missed.push(format!(
            "a cluster's share moved {} in the second from {} (at most {})",
            points(x),
            ms(at),
            points(max)
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
    if let (Some(rel), Some(before), Some(during)) = (&t.p99_vs_before, r.before.p99, r.during.p99)
    {
        let max = before.mul_f64(rel.times) + rel.plus;
        if during > max {
            missed.push(format!(
                "p99 during the fault {} (at most {}× the {} before + {} = {})",
                ms(during),
                rel.times,
                ms(before),
                ms(rel.plus),
                ms(max)
            ));
        }
    }
    missed
}

/// What recovery brought back: the shares, the home, the zone.
fn judge_recovery(r: &Report, t: &Thresholds) -> Vec<String> {
    let mut missed = Vec::new();
    if let Some(within) = t.recovered_share {
        match r.recovered_shift {
            None => missed.push(format!(
                "no request succeeded from {} after recovery to compare shares",
                ms(within)
            )),
            Some(x) if x > RECOVERED_POINTS => missed.push(format!(
                "from {} after recovery a cluster's share was still {} from before the fault (at most {})",
                ms(within),
                points(x),
                points(RECOVERED_POINTS)
            )),
            _ => {}
        }
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
    if let Some(max) = t.handshakes_failed {
        match r.handshakes_failed {
            None => missed.push("handshakes were not counted".into()),
            Some(n) if n > max => missed.push(format!(
                "{n} handshakes were refused for trust (at most {max})"
            )),
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
    missed
}

/// A share's change as people read it: `12 points`.
pub fn points(x: f64) -> String {
    format!("{:.0} points", x * 100.0)
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
                    why: None,
                }
            })
            .collect()
    }

    /// A drill with `thresholds` whose traffic all went well, judged with
    /// what was `observed` of the federation.
    fn observed(thresholds: &str, observed: Observed) -> Report {
        let d = drill(thresholds);
        Report::new(&d, &records(|_| Some("aws"))).with_observed(observed, &d.thresholds)
    }

    #[test]
    fn a_zone_that_heals_late_or_never_misses_healed() {
        let judged = |healed| {
            let o = Observed {
                healed,
                ..Observed::default()
            };
            observed("{failed: 0, healed: 10s}", o)
        };
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
        assert!(observed("{failed: 0}", Observed::default()).verdict.passed);
    }

    #[test]
    fn a_refused_handshake_fails_handshakes_failed() {
        let judged = |handshakes_failed| {
            let o = Observed {
                handshakes_failed,
                ..Observed::default()
            };
            observed("{failed: 0, handshakes_failed: 0}", o)
        };
        assert!(judged(Some(0)).verdict.passed);
        assert_eq!(
            judged(Some(1)).verdict.missed,
            ["1 handshakes were refused for trust (at most 0)"]
        );
        // Asked for but not counted: not a pass.
        assert_eq!(judged(None).verdict.missed, ["handshakes were not counted"]);
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
        assert_eq!(r.share_shift, Some(1.0), "all of it went to gcp");
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
        assert_eq!(
            r.failed_after_detect, 59,
            "all but the first, which showed it"
        );
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
        let r = Report::new(&drill("{failed: 0, rto: 1s, max_share_shift: 0.05}"), &recs);
        assert_eq!(r.failed, 0);
        assert_eq!(r.rto, Some(1500 * MS), "until the stalled ones ended");
        assert_eq!(r.during.p99, Some(1480 * MS));
        assert_eq!(r.share_shift, Some(0.0));
        assert_eq!(r.verdict.missed, ["RTO 1.50 s (at most 1.00 s)"]);
        let r = Report::new(&drill("{p99_during: 100ms}"), &recs);
        assert_eq!(
            r.verdict.missed,
            ["p99 during the fault 1.48 s (at most 100 ms)"]
        );
        let r = Report::new(&drill("{p99_vs_before: {times: 2, plus: 5ms}}"), &recs);
        assert_eq!(
            r.verdict.missed,
            ["p99 during the fault 1.48 s (at most 2× the 5 ms before + 5 ms = 15 ms)"]
        );
    }

    #[test]
    fn traffic_that_moves_when_it_must_not_fails_the_drill() {
        let recs = records(|t| Some(if t < 3000 * MS { "aws" } else { "gcp" }));
        let r = Report::new(&drill("{max_share_shift: 0.05}"), &recs);
        assert_eq!(r.share_shift, Some(1.0));
        assert_eq!(
            r.verdict.missed,
            ["a cluster's share moved 100 points in the second from 3.00 s (at most 5 points)"]
        );
    }

    /// Two clusters both serve before the fault (gcp 40%, azure 60%).
    fn split_40_60(i: u128) -> &'static str {
        if i % 5 < 2 { "gcp" } else { "azure" }
    }

    /// The case a count of requests served by clusters new to the traffic
    /// missed: traffic moving between two clusters that both served before.
    #[test]
    fn a_shift_from_gcp_to_azure_fails_no_change_in_traffic() {
        let d = drill("{failed: 0, max_share_shift: 0.05}");
        let steady = records(|t| Some(split_40_60(t.as_millis() / 10)));
        let r = Report::new(&d, &steady);
        assert_eq!(r.share_shift, Some(0.0));
        assert!(r.verdict.passed, "{:?}", r.verdict);
        // From 2.5 s to 3.5 s azure takes everything.
        let shifted = records(|t| {
            Some(if (2500 * MS..3500 * MS).contains(&t) {
                "azure"
            } else {
                split_40_60(t.as_millis() / 10)
            })
        });
        let r = Report::new(&d, &shifted);
        assert_eq!(r.failed, 0);
        let x = r.share_shift.unwrap();
        assert!((x - 0.4).abs() < 1e-9, "{x}");
        assert_eq!(r.share_shift_at, Some(2500 * MS));
        assert_eq!(
            r.verdict.missed,
            ["a cluster's share moved 40 points in the second from 2.50 s (at most 5 points)"]
        );
    }

    /// After a gray failure azure is well again but gets nothing: recovery
    /// of the share is judged, not only of failures.
    #[test]
    fn a_cluster_starved_after_recovery_misses_recovered_share() {
        let d = drill("{failed: 0, recovered_share: 1s}");
        let starved = records(|t| {
            Some(if t < 2000 * MS {
                split_40_60(t.as_millis() / 10)
            } else {
                "gcp"
            })
        });
        let r = Report::new(&d, &starved);
        let x = r.recovered_shift.unwrap();
        assert!((x - 0.6).abs() < 1e-9, "{x}");
        assert_eq!(
            r.verdict.missed,
            [
                "from 1.00 s after recovery a cluster's share was still 60 points from before the fault (at most 10 points)"
            ]
        );
        let back = records(|t| {
            Some(if (2000 * MS..4500 * MS).contains(&t) {
                "gcp"
            } else {
                split_40_60(t.as_millis() / 10)
            })
        });
        let r = Report::new(&d, &back);
        assert_eq!(r.recovered_shift, Some(0.0));
        assert!(r.verdict.passed, "{:?}", r.verdict);
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
        let r = Report::new(&drill("{max_share_shift: 0.05}"), &recs);
        assert_eq!(r.home.as_deref(), Some("aws/z"));
        assert_eq!(r.detect, Some(5 * MS), "gcp is not home");
        assert!(r.left_home);
        assert!(!r.verdict.passed, "gcp served 2% before, all of it after");
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

    /// TCP: the exchanges open when the backend died may break; one due
    /// after the first failure showed the fault must not.
    #[test]
    fn a_failure_after_detection_fails_the_drill() {
        let d = drill("{failed_after_detect: 0}");
        // Only the exchange due at 2 s breaks.
        let broken_then = records(|t| (t != 2000 * MS).then_some("aws"));
        let r = Report::new(&d, &broken_then);
        assert_eq!((r.failed, r.failed_after_detect), (1, 0));
        assert!(r.verdict.passed, "{:?}", r.verdict);
        // And one more, due at 2.5 s: the mesh still sent it to the dead one.
        let late = records(|t| (t != 2000 * MS && t != 2500 * MS).then_some("aws"));
        let r = Report::new(&d, &late);
        assert_eq!((r.failed, r.failed_after_detect), (2, 1));
        assert_eq!(
            r.verdict.missed,
            ["1 requests due after the fault was detected failed (at most 0)"]
        );
    }
}
