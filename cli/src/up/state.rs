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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub address: SocketAddr,
    /// Its admin port (`/ready`), if it has one.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
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

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))?;
        Ok(())
    }

    pub fn pids(&self) -> Vec<u32> {
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
