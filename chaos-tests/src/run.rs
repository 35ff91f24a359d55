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

use crate::drill::{Action, Drill};
use crate::load::{self, Load, Record};
use crate::report::Report;

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
    let mut fault = drill.fault.clone();
    let mut actual = drill.clone();

    // Where the traffic goes in the last second before the fault, for a
    // fault that follows it.
    let second = Duration::from_secs(1);
    wait_until(start + fault.at.saturating_sub(second), || tell("steady")).await;
    let earlier = counters.served();
    wait_until(start + fault.at, || tell("steady")).await;
    if fault.action.follows_traffic() {
        let now = counters.served();
        let serving = now
            .iter()
            .map(|(c, n)| (c, n - earlier.get(c).copied().unwrap_or(0)))
            .max_by_key(|(_, n)| *n)
            .filter(|(_, n)| *n > 0)
            .map(|(c, _)| c.clone());
        let Some(serving) = serving else {
            let _ = running.finish().await;
            bail!("the fault follows the traffic, but nothing was served in the second before it");
        };
        let cloud = fed
            .cloud_of(&serving)
            .with_context(|| format!("{serving} is no cluster of this federation"))?;
        fault.action = fault.action.resolve(&serving, &cloud);
        actual.fault.action = fault.action.clone();
    }
    actual.fault.at = start.elapsed();
    let mut broken = true;
    let mut result = fed
        .inject(&fault.action)
        .await
        .context("injecting the fault");
    let healed = match result.is_ok() && drill.thresholds.healed.is_some() {
        true => time_to_heal(fed, start + drill.duration, || tell("healing")).await,
        false => None,
    }
    .map(|at| {
        at.saturating_duration_since(start)
            .saturating_sub(actual.fault.at)
    });
    if result.is_ok() {
        let until = fault.recover.map_or(drill.duration, |r| r);
        if let Action::Flap(flap) = &fault.action {
            // Down and up again every period until recovery.
            let mut next = start.elapsed() + flap.period;
            while result.is_ok() && next < until {
                wait_until(start + next, || tell("fault")).await;
                result = if broken {
                    fed.recover(&fault.action).await
                } else {
                    fed.inject(&fault.action).await
                };
                broken = !broken;
                next += flap.period;
            }
        }
        if result.is_ok()
            && let Some(at) = fault.recover
        {
            wait_until(start + at, || tell("fault")).await;
            actual.fault.recover = Some(start.elapsed());
            if broken {
                result = fed.recover(&fault.action).await.context("recovering");
                broken = false;
            }
        }
    }
    if result.is_ok() {
        wait_until(start + drill.duration, || tell("recovered")).await;
    }
    let records = running.finish().await?;
    tell("done");
    if broken {
        // Left broken by the drill's design (no `recover`) or by an error:
        // the federation is put right for whatever runs next.
        let undo = fed.recover(&fault.action).await;
        result = result.and(undo.context("recovering after the drill"));
    }
    result?;
    let report = Report::new(&actual, &records).with_healed(healed, &drill.thresholds);
    Ok((report, records))
}

/// When `fed`'s zone was first found whole again, looking every
/// [`HEAL_POLL`] until `end`; a failed look is not a verdict.
async fn time_to_heal<F: Federation>(
    fed: &mut F,
    end: Instant,
    mut tick: impl FnMut(),
) -> Option<Instant> {
    while Instant::now() < end {
        match fed.zone_whole().await {
            Ok(true) => return Some(Instant::now()),
            Ok(false) => {}
            Err(e) => eprintln!("      the zone could not be read ({e:#}); looking again"),
        }
        wait_until(Instant::now() + HEAL_POLL, &mut tick).await;
    }
    None
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
        async fn recover(&mut self, _: &Action) -> anyhow::Result<()> {
            self.broken.store(false, Ordering::Relaxed);
            self.log.push(("recover".into(), self.t0.elapsed()));
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
                        let status = if broken.load(Ordering::Relaxed) {
                            503
                        } else {
                            200
                        };
                        async move {
                            let mut r = hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(br#"{"cluster":"c1","zone":"z1"}"#),
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
            ["inject: kill c1/x", "recover"]
        );
        assert_eq!(report.fault, "kill c1/x", "the report says what was hit");
        // About half a second of 503s, and the drill fails on them.
        assert!(
            report.failed >= 40 && report.failed <= 60,
            "{}",
            report.failed
        );
        assert_eq!(report.failed_by.keys().collect::<Vec<_>>(), ["503"]);
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
