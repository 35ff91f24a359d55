//! What `fedmesh up` started, in `<state dir>/state.json`, so that `down`,
//! `status`, `stop` and `start` work from another shell; and where that
//! directory is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedmesh_topology::Topology;
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "state.json";

/// What runs, as `up` started it and `stop`/`start` changed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub topology: String,
    pub supervisor: u32,
    pub ready: bool,
    pub etcd: Vec<Proc>,
    pub clusters: Vec<ClusterState>,
    /// When each process was started (pid → clock ticks since boot): a pid
    /// the system has since given to another process is never signalled.
    #[serde(default)]
    pub started: BTreeMap<u32, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub address: SocketAddr,
    /// Its admin port (`/ready`), if it has one.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// How it was started (program, then arguments), so that `fedmesh
    /// start` can start it again. Its pid is 0 while it is stopped.
    #[serde(default)]
    pub command: Vec<String>,
    /// The zone it runs in (gateways), which a zone outage takes down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub cloud: String,
    pub region: String,
    pub trust_domain: String,
    pub controller: Proc,
    pub gateways: Vec<Proc>,
    pub proxy: Proc,
    /// The proxy's listener for each TCP service.
    #[serde(default)]
    pub proxy_tcp: BTreeMap<String, SocketAddr>,
    pub registry: PathBuf,
    pub backends: Vec<BackendState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendState {
    /// `cluster/namespace/name@zone#replica`.
    pub id: String,
    pub service: String,
    pub zone: String,
    pub address: SocketAddr,
    pub tcp: bool,
    /// `None` while stopped.
    pub pid: Option<u32>,
}

impl State {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "nothing is up in {} (no {STATE_FILE}); start it with `fedmesh up <topology>`",
                dir.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
    }

    /// Saves the state, with the start time of every process this process
    /// started.
    pub fn save(&mut self, dir: &Path) -> anyhow::Result<()> {
        self.started.extend(super::supervise::started());
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))?;
        Ok(())
    }

    /// Whether `pid` is still the process that was started under it.
    pub fn ours(&self, pid: u32) -> bool {
        ours(&self.started, pid)
    }

    /// Every process listed that is still the one started, as `down` and
    /// the supervisor's exit stop them.
    pub fn live_pids(&self) -> Vec<u32> {
        self.pids().into_iter().filter(|&p| self.ours(p)).collect()
    }

    /// The client URLs of etcd's members.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd
            .iter()
            .map(|e| format!("https://{}", e.address))
            .collect()
    }

    /// The federation's own processes: etcd, then each cluster's
    /// controller, gateways and proxy (not the demo backends).
    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.etcd.iter().chain(self.clusters.iter().flat_map(|c| {
            std::iter::once(&c.controller)
                .chain(&c.gateways)
                .chain(std::iter::once(&c.proxy))
        }))
    }

    /// The process the state calls `name`.
    pub fn proc_mut(&mut self, name: &str) -> Option<&mut Proc> {
        self.etcd
            .iter_mut()
            .chain(self.clusters.iter_mut().flat_map(|c| {
                std::iter::once(&mut c.controller)
                    .chain(c.gateways.iter_mut())
                    .chain(std::iter::once(&mut c.proxy))
            }))
            .find(|p| p.name == name)
    }

    fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for c in &self.clusters {
            out.push(c.proxy.pid);
            out.extend(c.gateways.iter().map(|g| g.pid));
            out.extend(c.backends.iter().filter_map(|b| b.pid));
            out.push(c.controller.pid);
        }
        out.extend(self.etcd.iter().map(|e| e.pid));
        out
    }
}

/// Whether `pid` is alive and still the process `started` recorded for it
/// (a pid with no record, from an older state file, is taken as it is).
pub fn ours(started: &BTreeMap<u32, u64>, pid: u32) -> bool {
    use super::supervise::{alive, start_time};
    alive(pid)
        && started
            .get(&pid)
            .is_none_or(|&t| start_time(pid) == Some(t))
}

/// Where `up` keeps a topology's state: `--state-dir`, or `.fedmesh/<name>`.
pub fn state_dir_for(given: Option<PathBuf>, topology: &Topology) -> PathBuf {
    given.unwrap_or_else(|| PathBuf::from(".fedmesh").join(&topology.name))
}

/// The state directory the other commands act on: `--state-dir`, or the
/// one federation that is up under `.fedmesh/`.
pub fn find_state_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d);
    }
    let up: Vec<PathBuf> = std::fs::read_dir(".fedmesh")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join(STATE_FILE).is_file())
                .collect()
        })
        .unwrap_or_default();
    match up.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "nothing is up under .fedmesh/; start one with `fedmesh up <topology>` or pass --state-dir"
        ),
        _ => bail!("several federations are up under .fedmesh/; pick one with --state-dir"),
    }
}

pub fn load_topology(path: &Path) -> anyhow::Result<Topology> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the topology {}", path.display()))?;
    Ok(Topology::parse(&text, &path.display().to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::up::supervise::start_time;

    #[test]
    fn a_pid_is_ours_only_while_its_start_time_matches() {
        let me = std::process::id();
        let born = start_time(me).unwrap();
        assert!(ours(&BTreeMap::from([(me, born)]), me));
        // The same pid, given since to another process: never signalled.
        assert!(!ours(&BTreeMap::from([(me, born + 1)]), me));
        // No record (an older state file): taken as it is.
        assert!(ours(&BTreeMap::new(), me));
        // No such process at all.
        let gone = u32::MAX - 1;
        assert!(!ours(&BTreeMap::new(), gone));
    }
}
