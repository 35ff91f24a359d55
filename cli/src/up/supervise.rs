//! Processes: starting them in their own process group with a log, waiting
//! until they listen, stopping them (SIGTERM, then SIGKILL), and finding the
//! binaries and free ports they need.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use fedmesh_topology::Plan;
use tokio::time::Instant;

use super::state::BackendState;

/// Whether `pid` is a live process (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat`, field
/// 22): with the pid, it tells a process from a later one given the same
/// pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces and parentheses;
    // the state is field 3, so the start time is the 20th after it.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Every process this one started, until it is reaped.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn children() -> MutexGuard<'static, Vec<Child>> {
    // A panic while holding it cannot leave the list inconsistent.
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Each process this one started, with its start time.
pub fn started() -> Vec<(u32, u64)> {
    children()
        .iter()
        .filter_map(|c| Some((c.id(), start_time(c.id())?)))
        .collect()
}

/// Collects the exit of children that have ended (a process killed by a
/// drill, say), so that none lingers as a zombie.
pub fn reap() {
    children().retain_mut(|c| matches!(c.try_wait(), Ok(None)));
}

/// Stops every child still running: what a start that failed half-way
/// (or was interrupted) had started.
pub async fn stop_children(grace: Duration) {
    reap();
    let pids: Vec<u32> = children().iter().map(Child::id).collect();
    stop_all(&pids, grace).await;
    reap();
}

/// Sends SIGTERM (or SIGKILL) with kill(1): the project stays free of
/// unsafe code.
pub fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM to each, then SIGKILL to those still alive after `grace`.
pub async fn stop_all(pids: &[u32], grace: Duration) {
    for &p in pids {
        signal(p, "TERM");
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for &p in pids.iter().filter(|&&p| alive(p)) {
        signal(p, "KILL");
    }
}

#[derive(Debug)]
pub struct Binaries {
    pub fedmesh: PathBuf,
    pub controller: PathBuf,
    pub gateway: PathBuf,
    pub proxy: PathBuf,
}

pub fn binaries() -> anyhow::Result<Binaries> {
    let fedmesh = std::env::current_exe().context("finding this program")?;
    let dir = fedmesh.parent().unwrap_or(Path::new(".")).to_path_buf();
    let find = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!(
                "{} is missing: build every binary first (`cargo build --release --bins`, as scripts/main.sh does)",
                p.display()
            )
        }
    };
    Ok(Binaries {
        controller: find("fedmesh-controller")?,
        gateway: find("fedmesh-gateway")?,
        proxy: find("fedmesh-proxy")?,
        fedmesh,
    })
}

/// Every address of the plan is free, or an error naming the first taken.
pub fn check_ports(plan: &Plan) -> anyhow::Result<()> {
    let mut tcp: Vec<(SocketAddr, String)> = Vec::new();
    let mut udp: Vec<(SocketAddr, String)> = Vec::new();
    for e in &plan.etcd {
        tcp.push((e.client, format!("{} (clients)", e.name)));
        tcp.push((e.peer, format!("{} (peers)", e.name)));
    }
    for c in &plan.clusters {
        tcp.push((c.controller, format!("{}'s controller", c.name)));
        tcp.push((c.controller_admin, format!("{}'s controller admin", c.name)));
        tcp.push((c.proxy_http, format!("{}'s proxy", c.name)));
        tcp.push((c.proxy_admin, format!("{}'s proxy admin", c.name)));
        for (service, a) in &c.proxy_tcp {
            tcp.push((*a, format!("{}'s proxy listener for {service}", c.name)));
        }
        for (i, g) in c.gateways.iter().enumerate() {
            udp.push((g.quic, format!("{}'s WAN relay for gateway {i}", c.name)));
            udp.push((g.quic_listen, format!("{}'s gateway {i} (QUIC)", c.name)));
            tcp.push((g.egress, format!("{}'s gateway {i} egress", c.name)));
            tcp.push((g.admin, format!("{}'s gateway {i} admin", c.name)));
        }
        for b in &c.backends {
            tcp.push((b.address, format!("backend {}", b.id(&c.name))));
        }
    }
    for (a, what) in tcp {
        std::net::TcpListener::bind(a).with_context(|| {
            format!("{a} is taken; it is {what}. Is a federation already up? (`fedmesh down`)")
        })?;
    }
    for (a, what) in udp {
        std::net::UdpSocket::bind(a).with_context(|| {
            format!("UDP {a} is taken; it is {what}. Is a federation already up? (`fedmesh down`)")
        })?;
    }
    Ok(())
}

/// A command as program and arguments, to keep in the state.
pub fn argv(cmd: &std::process::Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// Starts `cmd` in its own process group, logging to `log`. The child is
/// kept, to be reaped when it ends.
pub fn spawn(mut cmd: std::process::Command, log: &Path) -> anyhow::Result<u32> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id();
    children().push(child);
    Ok(pid)
}

/// Waits until `addr` accepts TCP, or fails naming `what` and its log.
pub async fn listening(addr: SocketAddr, what: &str, pid: u32, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !alive(pid) || Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(8).collect();
            bail!(
                "{what} did not come up on {addr}; the end of {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The command that runs one demo backend.
pub fn backend_cmd(bins: &Binaries, b: &BackendState, cluster: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(&bins.fedmesh);
    cmd.args(["demo-backend", "--listen"])
        .arg(b.address.to_string())
        .args([
            "--cluster",
            cluster,
            "--zone",
            &b.zone,
            "--service",
            &b.service,
        ]);
    if b.tcp {
        cmd.arg("--tcp");
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pid_is_known_by_its_start_time_and_reaped_when_it_ends() {
        let me = start_time(std::process::id()).expect("our own start time");
        assert!(me > 0);
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        let pid = spawn(cmd, &dir.path().join("sleep.log")).unwrap();
        let born = start_time(pid).expect("a live child has a start time");
        assert!(born >= me);
        assert!(started().contains(&(pid, born)));
        stop_all(&[pid], Duration::from_secs(5)).await;
        assert!(!alive(pid), "stopped (a zombie counts as dead)");
        reap();
        assert!(
            !started().iter().any(|(p, _)| *p == pid),
            "reaped, so no longer listed"
        );
        assert_eq!(start_time(pid), None, "no zombie left");
    }
}
