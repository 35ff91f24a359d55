//! A drill's timeline as one SVG picture: success rate, p99 latency and the
//! serving cluster against time, with the fault and the recovery marked.

use std::fmt::Write as _;
use std::time::Duration;

use crate::report::{BUCKET, Report, ms};

const WIDTH: f64 = 960.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 150.0;
const PLOT: f64 = WIDTH - LEFT - RIGHT;
/// Top and height of each of the three panels.
const RATE: (f64, f64) = (70.0, 110.0);
const LATENCY: (f64, f64) = (215.0, 110.0);
const SERVING: (f64, f64) = (360.0, 40.0);
const HEIGHT: f64 = 440.0;

/// Fill colours for serving clusters, in the order they first appear.
const PALETTE: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
];

/// The timeline of `report`, as a standalone SVG document.
pub fn render(report: &Report) -> String {
    let mut s = String::new();
    let total = report.duration.as_secs_f64().max(0.001);
    let x = |t: Duration| LEFT + PLOT * t.as_secs_f64() / total;
    let step = PLOT * BUCKET.as_secs_f64() / total;

    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
"##
    );
    let verdict = if report.verdict.passed {
        ("PASS", "#2e7d32")
    } else {
        ("FAIL", "#c62828")
    };
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{} <tspan fill="{}">{}</tspan><tspan dx="12" font-size="13" font-weight="normal" fill="#444">{} at {:.1} s</tspan></text>"##,
        esc(&report.drill),
        verdict.1,
        verdict.0,
        esc(&report.fault),
        report.fault_at.as_secs_f64()
    );
    let figures = format!(
        "{} → {} at {}/s · {} requests, {} failed · RTO {} · p99 before {} / during {} / after {}",
        report.client,
        report.service,
        report.rate,
        report.requests,
        report.failed,
        report.rto.map_or("never".into(), ms),
        report.before.p99.map_or("-".into(), ms),
        report.during.p99.map_or("-".into(), ms),
        report.after.p99.map_or("-".into(), ms),
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="44" fill="#444">{}</text>"##,
        esc(&figures)
    );

    // Panel 1: success rate.
    panel(&mut s, RATE, "success");
    for (pct, label) in [(1.0, "100%"), (0.5, "50%"), (0.0, "0%")] {
        let y = RATE.0 + RATE.1 * (1.0 - pct);
        axis_label(&mut s, y, label);
    }
    let mut line = String::new();
    for b in &report.timeline {
        let n = b.requests();
        if n == 0 {
            continue;
        }
        let ok = (n - b.failed) as f64 / n as f64;
        let y = RATE.0 + RATE.1 * (1.0 - ok);
        let _ = write!(line, "{:.1},{:.1} ", x(b.at) + step / 2.0, y);
        if b.failed > 0 {
            let h = RATE.1 * (1.0 - ok);
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#e15759" opacity="0.5"/>"##,
                x(b.at),
                RATE.0,
                step.max(1.0)
            );
        }
    }
    let _ = writeln!(
        s,
        r##"<polyline points="{line}" fill="none" stroke="#2e7d32" stroke-width="2"/>"##
    );

    // Panel 2: p99 latency, on a log scale from 1 ms to 10 s.
    panel(&mut s, LATENCY, "p99 latency");
    let ly = |d: Duration| {
        let ms = (d.as_secs_f64() * 1000.0).clamp(1.0, 10_000.0);
        LATENCY.0 + LATENCY.1 * (1.0 - ms.log10() / 4.0)
    };
    for (d, label) in [
        (1, "1 ms"),
        (10, "10 ms"),
        (100, "100 ms"),
        (1000, "1 s"),
        (10_000, "10 s"),
    ] {
        let y = ly(Duration::from_millis(d));
        axis_label(&mut s, y, label);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#eeeeee"/>"##,
            LEFT + PLOT
        );
    }
    let mut line = String::new();
    for b in &report.timeline {
        if let Some(p99) = b.p99 {
            let _ = write!(line, "{:.1},{:.1} ", x(b.at) + step / 2.0, ly(p99));
        }
    }
    let _ = writeln!(
        s,
        r##"<polyline points="{line}" fill="none" stroke="#4e79a7" stroke-width="2"/>"##
    );

    // Panel 3: who served, each step's successes split by cluster.
    panel(&mut s, SERVING, "served by");
    let mut clusters: Vec<&str> = Vec::new();
    for b in &report.timeline {
        for c in b.served.keys() {
            if !clusters.contains(&c.as_str()) {
                clusters.push(c);
            }
        }
    }
    let colour = |c: &str| {
        let i = clusters.iter().position(|k| *k == c).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    for b in &report.timeline {
        let n = b.requests();
        if n == 0 {
            continue;
        }
        let mut y = SERVING.0;
        let parts = b
            .served
            .iter()
            .map(|(c, k)| (colour(c), *k))
            .chain(std::iter::once(("#e15759", b.failed)));
        for (fill, k) in parts {
            let h = SERVING.1 * k as f64 / n as f64;
            if h > 0.0 {
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}" fill="{fill}"/>"#,
                    x(b.at),
                    step.max(1.0) + 0.3
                );
            }
            y += h;
        }
    }
    for (i, c) in clusters
        .iter()
        .chain(std::iter::once(&"failed"))
        .enumerate()
    {
        let y = SERVING.0 + 14.0 * i as f64;
        let fill = if *c == "failed" { "#e15759" } else { colour(c) };
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{fill}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + PLOT + 12.0,
            y,
            LEFT + PLOT + 26.0,
            y + 9.0,
            esc(c)
        );
    }

    // The time axis, and the fault and recovery across every panel.
    let bottom = SERVING.0 + SERVING.1;
    let secs = report.duration.as_secs();
    let every = (secs / 10).max(1);
    for t in (0..=secs).step_by(every as usize) {
        let tx = x(Duration::from_secs(t));
        let _ = writeln!(
            s,
            r##"<text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#444">{t} s</text>"##,
            bottom + 16.0
        );
    }
    mark(&mut s, x(report.fault_at), "fault", "#c62828");
    if let Some(at) = report.recover_at {
        mark(&mut s, x(at), "recovery", "#2e7d32");
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, (top, height): (f64, f64), title: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{PLOT}" height="{height}" fill="#fafafa" stroke="#cccccc"/>
<text x="{LEFT}" y="{:.1}" font-weight="bold" fill="#333">{title}</text>"##,
        top - 6.0
    );
}

fn axis_label(s: &mut String, y: f64, label: &str) {
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#666">{label}</text>"##,
        LEFT - 6.0,
        y + 4.0
    );
}

fn mark(s: &mut String, x: f64, label: &str, colour: &str) {
    let _ = writeln!(
        s,
        r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="1.5" stroke-dasharray="5,3"/>
<text x="{:.1}" y="{:.1}" fill="{colour}">{label}</text>"#,
        RATE.0 - 4.0,
        SERVING.0 + SERVING.1,
        x + 3.0,
        RATE.0 + 12.0
    );
}

/// Text as XML character data.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::Drill;
    use crate::load::{Outcome, Record};

    fn report() -> Report {
        let drill = Drill::parse(
            "name: cloud-outage
topology: three-clouds
client: aws-use1
service: shop/<payments> & co
rate: 100
duration: 6s
fault: {kill: cloud:gcp, at: 2s, recover: 4s}
thresholds: {failed: 0, rto: 1s}
",
            "t.yaml",
        )
        .unwrap();
        let ms = Duration::from_millis;
        let records: Vec<Record> = (0..600u64)
            .map(|i| {
                let due = ms(10 * i);
                let (outcome, cluster) = match due {
                    d if d < ms(2000) => (Outcome::Ok, Some("gcp-usc1")),
                    d if d < ms(2100) => (Outcome::Status(503), None),
                    d if d < ms(4300) => (Outcome::Ok, Some("azure-eus")),
                    _ => (Outcome::Ok, Some("gcp-usc1")),
                };
                Record {
                    due,
                    latency: ms(20 + i % 7),
                    outcome,
                    cluster: cluster.map(str::to_string),
                    zone: cluster.map(|_| "a".to_string()),
                    why: None,
                }
            })
            .collect();
        Report::new(&drill, &records)
    }

    #[test]
    fn the_timeline_marks_the_fault_names_the_clusters_and_escapes_text() {
        let svg = render(&report());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains(">FAIL<"), "ten requests failed");
        for text in [
            ">fault<",
            ">recovery<",
            ">gcp-usc1/a<",
            ">azure-eus/a<",
            ">failed<",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        assert!(svg.contains("shop/&lt;payments&gt; &amp; co"));
        assert!(!svg.contains("<payments>"));
    }

    /// The SVG is one a real renderer draws: librsvg (Debian's
    /// `librsvg2-bin`, which `scripts/setup.sh` installs) turns it into a
    /// PNG of the size it says.
    #[test]
    fn the_timeline_renders() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("t.svg");
        let png = dir.path().join("t.png");
        std::fs::write(&svg, render(&report())).unwrap();
        let out = std::process::Command::new("rsvg-convert")
            .arg("-o")
            .arg(&png)
            .arg(&svg)
            .output()
            .expect("rsvg-convert runs (scripts/setup.sh installs librsvg2-bin)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let png = std::fs::read(&png).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, at bytes 16..24.
        let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
        assert_eq!((width, height), (WIDTH as u32, HEIGHT as u32));
    }
}
