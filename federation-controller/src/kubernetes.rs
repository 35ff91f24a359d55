//! The controller on Kubernetes (`--kube`): what the mesh says, turned into
//! `ServiceImport`s and `ServiceExport` conflicts for `fedmesh-kube`'s
//! writers. [`clusterset`] is I/O-free.

use std::net::IpAddr;
use std::sync::Arc;

use fedmesh_kube::{Conflicts, Import, Imports};
use tokio::sync::watch;

use crate::discovery::Snapshots;
use crate::mesh::MeshInputs;

/// How the controller uses the cluster's API server.
#[derive(Clone)]
pub struct KubeOptions {
    pub client: kube::Client,
    /// The address `ServiceImport`s give for `clusterset.local` names: the
    /// ClusterIP of the proxies' Service. None: imports carry no IP.
    pub clusterset_ip: Option<IpAddr>,
    /// The ServiceAccount the cluster's gateways run as: its tokens are
    /// issued `fedmesh/gateway/<cluster>`. None: gateways use join tokens.
    pub gateway_account: Option<fedmesh_kube::ServiceAccount>,
}

impl std::fmt::Debug for KubeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeOptions")
            .field("clusterset_ip", &self.clusterset_ip)
            .field("gateway_account", &self.gateway_account)
            .finish_non_exhaustive()
    }
}

/// Every service of the clusterset that someone can reach (with its port
/// and the clusters proxies here would use), and, for our own services,
/// the remote exporters left out for exporting other ports.
pub fn clusterset(inputs: &MeshInputs) -> (Imports, Conflicts) {
    let mut imports = Imports::new();
    let mut conflicts = Conflicts::new();
    for key in inputs.keys() {
        let Some(svc) = inputs.render(&key) else {
            continue;
        };
        let mut clusters: Vec<String> = svc.remote.iter().map(|r| r.cluster.clone()).collect();
        if svc.exported {
            clusters.push(inputs.cluster.to_string());
        }
        clusters.sort();
        let ports: Vec<u16> = svc
            .ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect();
        if !clusters.is_empty() && !ports.is_empty() {
            imports.insert(key.clone(), Import { ports, clusters });
        }
        if inputs.local.contains_key(&key) {
            let (_, conflicting) = inputs.ports(&key);
            if !conflicting.is_empty() {
                conflicts.insert(key, conflicting.iter().map(|c| c.to_string()).collect());
            }
        }
    }
    (imports, conflicts)
}

/// Recomputes imports and conflicts on every mesh version, publishing each
/// only when it changed. Runs until the snapshots' sender is dropped.
pub(crate) async fn follow(
    mut snapshots: Snapshots,
    imports: watch::Sender<Arc<Imports>>,
    conflicts: watch::Sender<Arc<Conflicts>>,
) {
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if let Some(s) = snap {
            let (i, c) = clusterset(&s.inputs);
            imports.send_if_modified(|cur| replace_if_new(cur, i));
            conflicts.send_if_modified(|cur| replace_if_new(cur, c));
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

fn replace_if_new<T: PartialEq>(cur: &mut Arc<T>, new: T) -> bool {
    if **cur == new {
        return false;
    }
    *cur = Arc::new(new);
    true
}
