//! The drill runner: steady load, the fault at `at`, recovery at
//! `recover`, load until the end; then the report. What a fault does to
//! a federation is the [`Federation`]'s business (`fedmesh drill` acts on
//! what `fedmesh up` runs); the runner only keeps time.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use crate::drill::{Action, Drill, Fault};
use crate::load::{self, Load, Record};
use crate::report::{Observed, Report};

/// A running federation that faults can be injected into.
pub trait Federation {
    /// Where each client cluster's proxy takes the drill's service.
    fn entries(&self, drill: &Drill) -> anyhow::Result<Vec<SocketAddr>>;
    /// The cloud a cluster runs in.
    fn cloud_of(&self, cluster: &str) -> Option<String>;
    /// Breaks what `action` names; returns once it is broken.
    fn inject(&mut self, action: &Action) -> impl Future<Output = anyhow::Result<()>>;
    /// Undoes `action`; returns once what it broke runs again.
    fn recover(&mut self, action: &Action) -> impl Future<Output = anyhow::Result<()>>;
    /// Whether the global zone holds again all it held before the last
    /// injected fault (for the `healed` threshold).
    fn zone_whole(&mut self) -> impl Future<Output = anyhow::Result<bool>> {
        async { Ok(true) }
    }
    /// QUIC handshakes refused for trust (a certificate or TLS alert) so
    /// far, summed over every gateway and proxy, counting those of
    /// processes since restarted (for the `handshakes_failed` threshold).
    fn handshake_failures(&mut self) -> impl Future<Output = anyhow::Result<u64>> {
        async { bail!("this federation does not count handshakes") }
    }
}

/// How often the zone is looked at for the `healed` threshold.
const HEAL_POLL: Duration = Duration::from_millis(500);

/// Where a drill is, for a progress line.
#[derive(Debug, Clone)]
pub struct Progress {
    pub elapsed: Duration,
    pub phase: &'static str,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
}

/// A request unanswered this long is a failure.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `drill` against `fed`: first waits until the service answers
/// steadily, then loads it through the fault and judges the result. The
/// fault is undone before this returns, whatever happens.
pub async fn run<F: Federation>(
    drill: &Drill,
    fed: &mut F,
    mut progress: impl FnMut(&Progress),
) -> anyhow::Result<(Report, Vec<Record>)> {
    let targets = fed.entries(drill)?;
    let (namespace, name) = drill.service.split_once('/').unwrap_or(("", ""));
    let load = Load {
        targets,
        host: format!("{name}.{namespace}"),
        protocol: drill.protocol,
        rate: drill.rate,
        duration: drill.duration,
        timeout: TIMEOUT,
    };
    steady(&load).await?;

    let running = load::start(load);
    let start = running.start;
    let counters = running.counters.clone();
    let mut tell = |phase| {
        progress(&Progress {
            elapsed: start.elapsed(),
            phase,
            sent: counters.sent.load(Ordering::Relaxed),
            ok: counters.ok.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
        })
    };
    let handshakes_before = match drill.thresholds.handshakes_failed {
        Some(_) => Some(
            fed.handshake_failures()
                .await
                .context("counting handshakes")?,
        ),
        None => None,
    };
    let mut actual = drill.clone();
    if let Err(e) = follow_traffic(&mut actual, fed, start, &counters, &mut tell).await {
        let _ = running.finish().await;
        return Err(e);
    }
    let mut faults = Faults::new(&actual);
    let mut healing = Healing::new(drill.thresholds.healed.is_some());
    let end = start + drill.duration;
    let mut result = faults
        .drive(fed, &mut actual.fault, &mut healing, start, end, &mut tell)
        .await;
    if result.is_ok() {
        healing.wait(fed, end, end, || tell("recovered")).await;
    }
    let records = running.finish().await?;
    tell("done");
    result = result.and(faults.undo(fed).await);
    result?;
    let handshakes_failed = match handshakes_before {
        Some(before) => {
            let after = fed
                .handshake_failures()
                .await
                .context("counting handshakes")?;
            Some(after.saturating_sub(before))
        }
        None => None,
    };
    let observed = Observed {
        healed: healing.took(start, actual.fault.at),
        handshakes_failed,
    };
    let report = Report::new(&actual, &records).with_observed(observed, &drill.thresholds);
    Ok((report, records))
}

/// Waits until the first fault and, if any fault names `{serving}` or
/// `{serving-cloud}`, resolves every one to the cluster that served most
/// in the second before it.
async fn follow_traffic<F: Federation>(
    drill: &mut Drill,
    fed: &F,
    start: Instant,
    counters: &load::Counters,
    tell: &mut impl FnMut(&'static str),
) -> anyhow::Result<()> {
    let first = drill.faults().map(|f| f.at).min().unwrap_or(drill.fault.at);
    let second = Duration::from_secs(1);
    wait_until(start + first.saturating_sub(second), || tell("steady")).await;
    let earlier = counters.served();
    wait_until(start + first, || tell("steady")).await;
    if !drill.faults().any(|f| f.action.follows_traffic()) {
        return Ok(());
    }
    let serving = counters
        .served()
        .into_iter()
        .map(|(c, n)| {
            let before = earlier.get(&c).copied().unwrap_or(0);
            (c, n - before)
        })
        .max_by_key(|(_, n)| *n)
        .filter(|(_, n)| *n > 0)
        .map(|(c, _)| c)
        .context("the fault follows the traffic, but nothing was served in the second before it")?;
    let cloud = fed
        .cloud_of(&serving)
        .with_context(|| format!("{serving} is no cluster of this federation"))?;
    for f in std::iter::once(&mut drill.fault).chain(&mut drill.also) {
        f.action = f.action.resolve(&serving, &cloud);
    }
    Ok(())
}

/// A drill's faults (the judged one first) and which are in effect.
struct Faults {
    list: Vec<Fault>,
    broken: Vec<bool>,
}

impl Faults {
    fn new(drill: &Drill) -> Self {
        let list: Vec<Fault> = drill.faults().cloned().collect();
        let broken = vec![false; list.len()];
        Self { list, broken }
    }

    /// Runs the timeline until `end`, recording in `judged` when the judged
    /// fault was injected and recovered; stops at the first error.
    async fn drive<F: Federation>(
        &mut self,
        fed: &mut F,
        judged: &mut Fault,
        healing: &mut Healing,
        start: Instant,
        end: Instant,
        tell: &mut impl FnMut(&'static str),
    ) -> anyhow::Result<()> {
        for (at, i, step) in timeline(&self.list, end - start) {
            let phase = self.phase();
            healing.wait(fed, start + at, end, || tell(phase)).await;
            let action = &self.list[i].action;
            match step {
                Step::Break if !self.broken[i] => {
                    if i == 0 {
                        judged.at = start.elapsed();
                        healing.start();
                    }
                    self.broken[i] = true;
                    fed.inject(action)
                        .await
                        .with_context(|| format!("injecting {action}"))?;
                }
                Step::Recover | Step::Mend if self.broken[i] => {
                    self.broken[i] = false;
                    fed.recover(action)
                        .await
                        .with_context(|| format!("recovering from {action}"))?;
                }
                _ => {}
            }
            if i == 0 && step == Step::Recover {
                judged.recover = Some(start.elapsed());
            }
        }
        Ok(())
    }

    /// Undoes what is still in effect, left so by the drill's design (no
    /// `recover`) or by an error, last fault first: the federation is put
    /// right for whatever runs next.
    async fn undo<F: Federation>(&mut self, fed: &mut F) -> anyhow::Result<()> {
        let mut result = Ok(());
        for (f, broken) in self.list.iter().zip(&mut self.broken).rev() {
            if std::mem::take(broken) {
                let undo = fed.recover(&f.action).await;
                result = result.and(
                    undo.with_context(|| format!("recovering from {} after the drill", f.action)),
                );
            }
        }
        result
    }

    /// The progress phase: while any fault is in effect, "fault".
    fn phase(&self) -> &'static str {
        if self.broken.iter().any(|&b| b) {
            "fault"
        } else {
            "steady"
        }
    }
}

/// What the runner does to one fault at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Injects it, unless it is in effect.
    Break,
    /// A flap's way up: recovers it, if it is in effect.
    Mend,
    /// Its `recover` time: recovers it, if it is in effect.
    Recover,
}

/// Every step of `faults`, in the order they happen (a tie in the order
/// the drill lists them): each fault at its `at`, a flap's every period
/// until recovery, each recovery at its `recover`.
fn timeline(faults: &[Fault], duration: Duration) -> Vec<(Duration, usize, Step)> {
    let mut steps = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        steps.push((f.at, i, Step::Break));
        let until = f.recover.unwrap_or(duration);
        if let Action::Flap(flap) = &f.action {
            let (mut next, mut down) = (f.at + flap.period, true);
            while next < until {
                steps.push((next, i, if down { Step::Mend } else { Step::Break }));
                (next, down) = (next + flap.period, !down);
            }
        }
        if let Some(r) = f.recover {
            steps.push((r, i, Step::Recover));
        }
    }
    steps.sort_by_key(|&(at, i, _)| (at, i));
    steps
}

/// Looks at the zone every [`HEAL_POLL`] after the judged fault, for the
/// `healed` threshold, until it is found whole; a failed look is not a
/// verdict.
struct Healing {
    asked: bool,
    looking: bool,
    found: Option<Instant>,
}

impl Healing {
    fn new(asked: bool) -> Self {
        Self {
            asked,
            looking: false,
            found: None,
        }
    }

    fn start(&mut self) {
        self.looking = self.asked;
    }

    /// Waits until `at`, looking at the zone meanwhile (never after `end`).
    async fn wait<F: Federation>(
        &mut self,
        fed: &mut F,
        at: Instant,
        end: Instant,
        mut tick: impl FnMut(),
    ) {
        while self.looking && self.found.is_none() && Instant::now() < at.min(end) {
            match fed.zone_whole().await {
                Ok(true) => self.found = Some(Instant::now()),
                Ok(false) => {}
                Err(e) => eprintln!("      the zone could not be read ({e:#}); looking again"),
            }
            if self.found.is_none() {
                wait_until(at.min(Instant::now() + HEAL_POLL), &mut tick).await;
            }
        }
        wait_until(at, tick).await;
    }

    /// From the fault (`fault_at` after `start`) until the zone was found
    /// whole.
    fn took(&self, start: Instant, fault_at: Duration) -> Option<Duration> {
        let at = self.found?;
        Some(at.saturating_duration_since(start).saturating_sub(fault_at))
    }
}

/// Sleeps until `at`, calling `tick` every half second.
async fn wait_until(at: Instant, mut tick: impl FnMut()) {
    while Instant::now() < at {
        tick();
        tokio::time::sleep_until(at.min(Instant::now() + Duration::from_millis(500))).await;
    }
}

/// Waits (up to a minute) until half a second of load at a low rate all
/// succeeds: a drill starts from a federation that works, not from the
/// tail of the previous drill's recovery.
pub async fn steady(load: &Load) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe = Load {
        rate: 40,
        duration: Duration::from_millis(500),
        ..load.clone()
    };
    loop {
        let records = load::start(probe.clone()).finish().await?;
        let bad = records.iter().find(|r| !r.outcome.ok());
        let Some(bad) = bad else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!(
                "{} through {:?} does not answer steadily before the fault (for example: {})",
                load.host,
                load.targets,
                bad.outcome.label()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// A loopback HTTP server whose answers fail while it is "broken"; the
    /// federation around it breaks it on inject and mends it on recover.
    struct OneServer {
        addr: SocketAddr,
        broken: Arc<AtomicBool>,
        log: Vec<(String, Duration)>,
        t0: Instant,
    }

    impl Federation for OneServer {
        fn entries(&self, _: &Drill) -> anyhow::Result<Vec<SocketAddr>> {
            Ok(vec![self.addr])
        }
        fn cloud_of(&self, cluster: &str) -> Option<String> {
            (cluster == "c1").then(|| "cloud1".to_string())
        }
        async fn inject(&mut self, action: &Action) -> anyhow::Result<()> {
            self.broken.store(true, Ordering::Relaxed);
            self.log
                .push((format!("inject: {action}"), self.t0.elapsed()));
            Ok(())
        }
        async fn recover(&mut self, action: &Action) -> anyhow::Result<()> {
            self.broken.store(false, Ordering::Relaxed);
            self.log
                .push((format!("recover: {action}"), self.t0.elapsed()));
            Ok(())
        }
    }

    impl OneServer {
        async fn start() -> Self {
            let broken = Arc::new(AtomicBool::new(false));
            OneServer {
                addr: server(broken.clone()).await,
                broken,
                log: Vec::new(),
                t0: Instant::now(),
            }
        }
    }

    async fn server(broken: Arc<AtomicBool>) -> SocketAddr {
        use std::convert::Infallible;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let broken = broken.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_| {
                        let (status, body) = if broken.load(Ordering::Relaxed) {
                            (503, &b"broken: c1 is down\nmore\n"[..])
                        } else {
                            (200, &br#"{"cluster":"c1","zone":"z1"}"#[..])
                        };
                        async move {
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(body),
                            ));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn drill(fault: &str) -> Drill {
        Drill::parse(
            &format!(
                "name: t
topology: x
client: c1
service: shop/frontend
rate: 100
duration: 2s
fault: {fault}
thresholds: {{failed: 0}}
"
            ),
            "t.yaml",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_fault_lands_at_its_time_and_the_report_sees_it() {
        let mut fed = OneServer::start().await;
        let d = drill("{kill: \"{serving}/x\", at: 500ms, recover: 1s}");
        let mut ticks = 0;
        let (report, records) = run(&d, &mut fed, |_| ticks += 1).await.unwrap();
        assert!(ticks >= 3, "progress is told while the drill runs");
        assert_eq!(records.len(), 200);
        assert_eq!(
            fed.log.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(),
            ["inject: kill c1/x", "recover: kill c1/x"]
        );
        assert_eq!(report.fault, "kill c1/x", "the report says what was hit");
        // About half a second of 503s, and the drill fails on them.
        assert!(
            report.failed >= 40 && report.failed <= 60,
            "{}",
            report.failed
        );
        assert_eq!(report.failed_by.keys().collect::<Vec<_>>(), ["503"]);
        assert_eq!(
            report.failed_why,
            ["broken: c1 is down"],
            "the answer's first line"
        );
        assert!(!report.verdict.passed);
        assert!(report.fault_at >= Duration::from_millis(500));
        assert!(report.recover_at.unwrap() >= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_flap_goes_down_and_up_until_recovery_and_ends_up() {
        let mut fed = OneServer::start().await;
        let broken = fed.broken.clone();
        let d = drill("{flap: {target: c1/x, period: 300ms}, at: 400ms, recover: 1500ms}");
        run(&d, &mut fed, |_| {}).await.unwrap();
        let steps: Vec<&str> = fed
            .log
            .iter()
            .map(|(w, _)| w.split(':').next().unwrap())
            .collect();
        // Down at 0.4, up 0.7, down 1.0, up 1.3; at 1.5 it is already up.
        assert_eq!(steps, ["inject", "recover", "inject", "recover"]);
        assert!(!broken.load(Ordering::Relaxed));
    }

    /// Other faults run on the same timeline, follow the traffic too, are
    /// named in the report, and are undone after the drill, last first.
    #[tokio::test]
    async fn other_faults_interleave_and_are_undone_after() {
        let mut fed = OneServer::start().await;
        let d = drill(
            "{kill: c1/x, at: 1s, recover: 1500ms}\nalso: [{freeze: \"{serving}/y\", at: 500ms}, {kill: c1/z, at: 1200ms}]",
        );
        let (report, _) = run(&d, &mut fed, |_| {}).await.unwrap();
        let steps: Vec<&str> = fed.log.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(
            steps,
            [
                "inject: freeze c1/y",
                "inject: kill c1/x",
                "inject: kill c1/z",
                "recover: kill c1/x",
                "recover: kill c1/z",
                "recover: freeze c1/y",
            ]
        );
        assert_eq!(report.fault, "kill c1/x");
        assert_eq!(report.also, ["freeze c1/y at 0.5 s", "kill c1/z at 1.2 s"]);
        // The judged fault's times are its own.
        assert!(report.fault_at >= Duration::from_secs(1));
        assert!(report.recover_at.unwrap() >= Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn a_fault_without_recovery_is_undone_after_the_drill() {
        let mut fed = OneServer::start().await;
        let broken = fed.broken.clone();
        let d = drill("{kill: c1/x, at: 1s}");
        let (report, _) = run(&d, &mut fed, |_| {}).await.unwrap();
        assert_eq!(report.rto, None, "never recovered within the drill");
        assert!(!broken.load(Ordering::Relaxed), "but undone after it");
    }
}
