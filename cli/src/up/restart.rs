//! `fedmesh restart`: one of the federation's own processes, gracefully,
//! as an upgrade restarts it.
//!
//! - A proxy started with `--handoff` is started again beside the running
//!   one: the new one takes the listening sockets once it is ready, and the
//!   old one drains and exits. No connection is refused and no request is
//!   cut.
//! - Anything else gets SIGTERM, is waited for (then killed), and is
//!   started again: a gateway's peers fail over to another gateway or
//!   cluster meanwhile, and proxies ride out a controller's absence on
//!   what they last heard (static stability).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;

use super::backends::{component, respawn, spawn_again};
use super::probe;
use super::state::{Proc, State};
use super::supervise::{alive, reap, stop_all};

/// How long a stopping process has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long a proxy that handed over has to drain (its drain timeout, 30 s
/// by default, and some).
const DRAIN_WAIT: Duration = Duration::from_secs(45);
/// How long a restarted process has to be ready.
const READY_WAIT: Duration = Duration::from_secs(60);

/// Restarts process `name` of `s` and waits until the new one is ready;
/// returns (old pid, new pid). `s` is updated; the caller saves it.
pub async fn restart_proc(s: &mut State, dir: &Path, name: &str) -> anyhow::Result<(u32, u32)> {
    let started = s.started.clone();
    let topology = s.topology.clone();
    let Some(p) = s.proc_mut(name) else {
        bail!("{name:?} names no process of {topology}");
    };
    let old = p.pid;
    let running = old != 0 && super::state::ours(&started, old);
    let hands_over = p.command.iter().any(|a| a == "--handoff");
    if running && hands_over {
        let new = spawn_again(p, dir)?;
        until_gone(old, new, p, DRAIN_WAIT).await?;
    } else {
        if running {
            stop_all(&[old], STOP_GRACE).await;
        }
        respawn(p, dir).await?;
    }
    if let Some(admin) = p.admin {
        until_ready(admin, p).await?;
    }
    Ok((old, p.pid))
}

/// Waits until `old` has exited after handing over to `new` (which must
/// stay up meanwhile).
async fn until_gone(old: u32, new: u32, p: &Proc, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while alive(old) {
        reap();
        if !alive(new) {
            bail!(
                "the new {} (pid {new}) ended before it took over; see its log",
                p.name
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{} (pid {old}) has not handed over and drained within {limit:?}; both run",
                p.name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn until_ready(admin: std::net::SocketAddr, p: &Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WAIT;
    while !probe::ready(admin).await {
        if !alive(p.pid) || Instant::now() > deadline {
            bail!("{} (pid {}) is not ready on {admin}", p.name, p.pid);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `fedmesh restart <target>`.
pub async fn restart(dir: &Path, target: &str) -> anyhow::Result<()> {
    let Some(name) = component(target) else {
        bail!(
            "{target:?}: restart takes one of the federation's own processes: \
             <cluster>/controller, <cluster>/proxy, <cluster>/gateway-<i> or etcd-<i>"
        );
    };
    let mut s = State::load(dir)?;
    let result = restart_proc(&mut s, dir, &name).await;
    // Saved whatever happened: a process that did start is recorded.
    s.save(dir)?;
    let (old, new) = result.with_context(|| format!("restarting {name}"))?;
    match old {
        0 => println!("{name} was not running; started it (pid {new})"),
        _ => println!("restarted {name} (pid {old} → {new})"),
    }
    Ok(())
}
