//! A report as a person reads it in a terminal.

use std::fmt::Write as _;

use crate::report::{Report, ms, points};

/// A few lines per drill: the verdict first, then the figures.
pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let verdict = if r.verdict.passed { "PASS" } else { "FAIL" };
    let _ = writeln!(s, "{verdict}  {}  {}", r.drill, r.about);
    let recovered = r.recover_at.map_or(String::new(), |t| {
        format!(", undone at {:.1} s", t.as_secs_f64())
    });
    let _ = writeln!(
        s,
        "      fault: {} at {:.1} s{recovered}",
        r.fault,
        r.fault_at.as_secs_f64()
    );
    for a in &r.also {
        let _ = writeln!(s, "      also: {a}");
    }
    let opt = |d: Option<std::time::Duration>, none: &str| d.map_or(none.to_string(), ms);
    let failures = if r.failed_by.is_empty() {
        String::new()
    } else {
        let by: Vec<String> = r
            .failed_by
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        format!(" ({})", by.join(", "))
    };
    let _ = writeln!(
        s,
        "      {} → {} at {}/s: {} requests, {} failed{failures}, longest failure run {} ({})",
        r.client,
        r.service,
        r.rate,
        r.requests,
        r.failed,
        r.longest_failure_run.requests,
        ms(r.longest_failure_run.lasted),
    );
    let _ = writeln!(
        s,
        "      detect {}  RTO {}  failback {}  share shift {}",
        opt(r.detect, "-"),
        opt(r.rto, "never"),
        match (r.left_home, r.failback) {
            (false, _) => "-".to_string(),
            (true, None) => "never".to_string(),
            (true, Some(d)) => ms(d),
        },
        r.share_shift.map_or("-".into(), points),
    );
    let _ = writeln!(
        s,
        "      p50/p99 before {}/{}  during {}/{}  after {}/{}",
        opt(r.before.p50, "-"),
        opt(r.before.p99, "-"),
        opt(r.during.p50, "-"),
        opt(r.during.p99, "-"),
        opt(r.after.p50, "-"),
        opt(r.after.p99, "-"),
    );
    let _ = writeln!(s, "      served by: {}", serving(r));
    if let Some(h) = r.healed {
        let _ = writeln!(s, "      zone whole again {} after the fault", ms(h));
    }
    if let Some(n) = r.handshakes_failed {
        let _ = writeln!(s, "      handshakes refused for trust: {n}");
    }
    for why in &r.failed_why {
        let _ = writeln!(s, "      a failed answer: {why}");
    }
    for m in &r.verdict.missed {
        let _ = writeln!(s, "      missed: {m}");
    }
    s
}

/// The serving cluster over time, compressed: `aws-use1 0–3.0 s, gcp-usc1
/// 3.0–6.5 s, …` (a step's majority; `failing` when most failed).
fn serving(r: &Report) -> String {
    let mut spans: Vec<(String, std::time::Duration, std::time::Duration)> = Vec::new();
    for b in &r.timeline {
        let top = b
            .served
            .iter()
            .max_by_key(|(_, n)| **n)
            .filter(|(_, n)| **n >= b.failed)
            .map_or_else(
                || {
                    if b.failed > 0 {
                        "failing".to_string()
                    } else {
                        "-".to_string()
                    }
                },
                |(c, _)| c.clone(),
            );
        let end = b.at + crate::report::BUCKET;
        match spans.last_mut() {
            Some((c, _, until)) if *c == top => *until = end,
            _ => spans.push((top, b.at, end)),
        }
    }
    spans
        .iter()
        .map(|(c, from, to)| format!("{c} {:.1}–{:.1} s", from.as_secs_f64(), to.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line for a whole run of drills.
pub fn summary(reports: &[Report]) -> String {
    let passed = reports.iter().filter(|r| r.verdict.passed).count();
    format!("{passed} of {} drills passed", reports.len())
}
