//! `fedmesh stop` / `fedmesh start`: demo backends by
//! `<cluster>/<namespace>/<name>[@zone]`, and the federation's own processes
//! by `etcd-<i>`, `<cluster>/controller`, `<cluster>/proxy` or
//! `<cluster>/gateway-<i>`.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use super::render;
use super::state::{BackendState, Proc, State};
use super::supervise::{Binaries, backend_cmd, binaries, listening, spawn, stop_all};

/// `<cluster>/<namespace>/<name>[@zone]`.
pub fn matches(target: &str, cluster: &str, b: &BackendState) -> anyhow::Result<bool> {
    let (path, zone) = match target.split_once('@') {
        Some((p, z)) => (p, Some(z)),
        None => (target, None),
    };
    let mut parts = path.splitn(2, '/');
    let (Some(c), Some(service)) = (parts.next(), parts.next()) else {
        bail!("{target:?}: expected <cluster>/<namespace>/<name>[@zone]");
    };
    if !service.contains('/') {
        bail!("{target:?}: expected <cluster>/<namespace>/<name>[@zone]");
    }
    Ok(c == cluster && b.service == service && zone.is_none_or(|z| z == b.zone))
}

/// The name of the process a component target names (`etcd-0`,
/// `aws/controller`, `aws/proxy`, `aws/gateway-1`), as the state lists it;
/// `None` for anything else (a backend target).
pub fn component(target: &str) -> Option<String> {
    if target.starts_with("etcd-") && !target.contains('/') {
        return Some(target.to_string());
    }
    let (cluster, what) = target.split_once('/')?;
    let known = what == "controller"
        || what == "proxy"
        || what
            .strip_prefix("gateway-")
            .is_some_and(|i| i.parse::<u8>().is_ok());
    (known && !cluster.is_empty()).then(|| format!("{cluster}-{what}"))
}

/// What `stop` or `start` did to one process, as it tells the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Did {
    Started,
    Stopped,
    WasRunning,
    WasNotRunning,
}

impl Did {
    /// `started aws/shop/cart@az1#0`, `aws-proxy was already running`, …
    pub fn say(self, what: &str) -> String {
        match self {
            Did::Started => format!("started {what}"),
            Did::Stopped => format!("stopped {what}"),
            Did::WasRunning => format!("{what} was already running"),
            Did::WasNotRunning => format!("{what} was not running"),
        }
    }
}

/// What to do with a process of recorded `pid` (0 or `None`: stopped) that
/// is or is not `alive`: a process that died is started again whatever
/// stopped it, and stopping one not running does nothing.
fn plan(start: bool, recorded: bool, alive: bool) -> Did {
    match (start, recorded && alive) {
        (true, true) => Did::WasRunning,
        (true, false) => Did::Started,
        (false, true) => Did::Stopped,
        (false, false) => Did::WasNotRunning,
    }
}

/// Stops or starts again one of the federation's own processes, from the
/// command it was first started with. Started, it is waited for until it
/// listens (a gateway: its admin port).
async fn stop_start_process(
    s: &mut State,
    dir: &Path,
    name: &str,
    start: bool,
) -> anyhow::Result<Did> {
    let started = s.started.clone();
    let ours = |pid| super::state::ours(&started, pid);
    let topology = s.topology.clone();
    let Some(p) = s.proc_mut(name) else {
        bail!("{name:?} names no process of {topology}");
    };
    let did = plan(start, p.pid != 0, ours(p.pid));
    match did {
        Did::Stopped => stop_all(&[p.pid], Duration::from_secs(10)).await,
        Did::Started => respawn(p, dir).await?,
        Did::WasRunning | Did::WasNotRunning => {}
    }
    if !start {
        p.pid = 0;
    }
    Ok(did)
}

/// Starts `p` again from the command it was first started with; returns
/// once it listens (a gateway: its admin port).
pub async fn respawn(p: &mut Proc, dir: &Path) -> anyhow::Result<()> {
    let pid = spawn_again(p, dir)?;
    let log = log_of(dir, &p.name);
    listening(p.admin.unwrap_or(p.address), &p.name, pid, &log).await
}

fn log_of(dir: &Path, name: &str) -> std::path::PathBuf {
    dir.join("logs").join(format!("{name}.log"))
}

/// Starts `p` from the command it was first started with, without waiting
/// for it, and records its pid. The log of the run before is kept as
/// `<name>.log.1`.
pub fn spawn_again(p: &mut Proc, dir: &Path) -> anyhow::Result<u32> {
    let Some((program, args)) = p.command.split_first() else {
        bail!(
            "{} was started by an older fedmesh that did not record how; bring the federation down and up again",
            p.name
        );
    };
    let log = log_of(dir, &p.name);
    let _ = std::fs::rename(&log, log.with_extension("log.1"));
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    let pid = spawn(cmd, &log)?;
    p.pid = pid;
    Ok(pid)
}

/// Starts demo backend `b` of `cluster` again; returns once it listens.
pub async fn respawn_backend(
    b: &mut BackendState,
    cluster: &str,
    bins: &Binaries,
    dir: &Path,
) -> anyhow::Result<()> {
    let log = dir
        .join("logs")
        .join(format!("{}.log", b.id.replace(['/', '@', '#'], "_")));
    let pid = spawn(backend_cmd(bins, b, cluster), &log)?;
    b.pid = Some(pid);
    listening(b.address, "the backend", pid, &log).await
}

/// `fedmesh stop` / `fedmesh start`: kills or restarts what `target`
/// names. Demo backends are also marked unhealthy or healthy in their
/// cluster's registry, as a readiness probe would.
pub async fn stop_start(dir: &Path, target: &str, start: bool) -> anyhow::Result<()> {
    let mut s = State::load(dir)?;
    if let Some(name) = component(target) {
        let result = stop_start_process(&mut s, dir, &name, start).await;
        s.save(dir)?;
        println!("{}", result?.say(&name));
        return Ok(());
    }
    let started = s.started.clone();
    let ours = |pid| super::state::ours(&started, pid);
    let bins = binaries()?;
    let mut said = Vec::new();
    let mut failed = None;
    for c in &mut s.clusters {
        let mut changed = false;
        for b in &mut c.backends {
            if !matches(target, &c.name, b)? {
                continue;
            }
            let did = plan(start, b.pid.is_some(), b.pid.is_some_and(ours));
            match did {
                Did::Stopped => {
                    stop_all(
                        &b.pid.into_iter().collect::<Vec<_>>(),
                        Duration::from_secs(5),
                    )
                    .await
                }
                Did::Started => {
                    if let Err(e) = respawn_backend(b, &c.name, &bins, dir).await {
                        failed = Some(e.context(format!("starting {}", b.id)));
                        break;
                    }
                }
                Did::WasRunning | Did::WasNotRunning => {}
            }
            if !start {
                b.pid = None;
            }
            changed |= did != Did::WasRunning;
            said.push(did.say(&b.id));
        }
        // Also after a failure: what did start is healthy in the registry.
        if changed {
            render::write_registry(c)?;
        }
        if failed.is_some() {
            break;
        }
    }
    if said.is_empty() && failed.is_none() {
        bail!("{target:?} names no backend of {}", s.topology);
    }
    s.save(dir)?;
    for line in &said {
        println!("{line}");
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(service: &str, zone: &str) -> BackendState {
        BackendState {
            id: format!("aws/{service}@{zone}#0"),
            service: service.into(),
            zone: zone.into(),
            address: "127.0.1.50:8080".parse().unwrap(),
            tcp: false,
            pid: None,
        }
    }

    #[test]
    fn start_restarts_whatever_is_not_running_and_stop_says_what_was_not() {
        // start, a pid recorded, that pid alive.
        assert_eq!(plan(true, true, true), Did::WasRunning);
        assert_eq!(plan(true, true, false), Did::Started, "it crashed");
        assert_eq!(plan(true, false, false), Did::Started, "it was stopped");
        assert_eq!(plan(false, true, true), Did::Stopped);
        assert_eq!(plan(false, true, false), Did::WasNotRunning, "it crashed");
        assert_eq!(plan(false, false, false), Did::WasNotRunning);
        assert_eq!(
            Did::WasNotRunning.say("aws-proxy"),
            "aws-proxy was not running"
        );
    }

    #[test]
    fn a_target_names_a_cluster_a_service_and_maybe_a_zone() {
        let b = backend("shop/cart", "az1");
        assert!(matches("aws/shop/cart", "aws", &b).unwrap());
        assert!(matches("aws/shop/cart@az1", "aws", &b).unwrap());
        assert!(!matches("aws/shop/cart@az2", "aws", &b).unwrap());
        assert!(!matches("gcp/shop/cart", "aws", &b).unwrap());
        assert!(!matches("aws/shop/web", "aws", &b).unwrap());
        assert!(
            !matches("aws/shop/car", "aws", &b).unwrap(),
            "no prefix match"
        );
    }

    #[test]
    fn component_targets_name_the_federations_own_processes() {
        assert_eq!(component("etcd-0").as_deref(), Some("etcd-0"));
        assert_eq!(
            component("aws/controller").as_deref(),
            Some("aws-controller")
        );
        assert_eq!(component("aws/proxy").as_deref(), Some("aws-proxy"));
        assert_eq!(component("aws/gateway-1").as_deref(), Some("aws-gateway-1"));
        for other in [
            "aws/shop/cart",
            "aws/gateway-x",
            "aws/gateway",
            "/proxy",
            "aws",
        ] {
            assert_eq!(component(other), None, "{other}");
        }
    }

    #[test]
    fn a_malformed_target_is_an_error_that_shows_the_form() {
        let b = backend("shop/cart", "az1");
        for bad in ["aws", "aws/cart", "aws/cart@az1", ""] {
            let e = matches(bad, "aws", &b).unwrap_err().to_string();
            assert!(
                e.contains("<cluster>/<namespace>/<name>[@zone]"),
                "{bad:?}: {e}"
            );
        }
    }
}
