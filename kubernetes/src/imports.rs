//! Writes a `ServiceImport` for each service of the clusterset, so that
//! `<svc>.<ns>.svc.clusterset.local` names something in this cluster
//! (KEP-1645's namespace sameness: only where the namespace exists).
//! fedmesh owns the imports it labels, and deletes them when their service
//! leaves the clusterset; it never touches another's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fedmesh_api::ServiceKey;
use futures_util::StreamExt;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::watch;

use crate::mcs::{ClusterStatus, GROUP, ServiceImport, VERSION};
use crate::mirror::Mirror;

/// The label on every `ServiceImport` fedmesh writes.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "fedmesh");
/// Our field manager for server-side apply.
const MANAGER: &str = "fedmesh-controller";
/// How often imports that could not be written are tried again.
const RETRY: Duration = Duration::from_secs(15);
/// How long a namespace found missing is not asked about again: a
/// federation's services in namespaces this cluster lacks would otherwise
/// cost one failed write each, at every event.
const MISSING_NAMESPACE_RECHECK: Duration = Duration::from_secs(60);

/// One service of the clusterset: its port and who exports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub ports: Vec<u16>,
    pub clusters: Vec<String>,
}

pub type Imports = BTreeMap<ServiceKey, Import>;

#[derive(Debug, Default)]
pub struct ImportStats {
    pub written: AtomicU64,
    pub deleted: AtomicU64,
    pub errors: AtomicU64,
}

/// What a `ServiceImport` of ours should hold (spec and status).
pub fn manifest(key: &ServiceKey, import: &Import, ip: Option<IpAddr>) -> serde_json::Value {
    let ports: Vec<_> = import
        .ports
        .iter()
        .map(|p| serde_json::json!({ "protocol": "TCP", "port": p }))
        .collect();
    let clusters: Vec<_> = import
        .clusters
        .iter()
        .map(|c| ClusterStatus { cluster: c.clone() })
        .collect();
    let mut spec = serde_json::json!({ "type": "ClusterSetIP", "ports": ports });
    if let Some(ip) = ip {
        spec["ips"] = serde_json::json!([ip.to_string()]);
    }
    serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "ServiceImport",
        "metadata": {
            "name": key.name,
            "namespace": key.namespace,
            "labels": { MANAGED_BY.0: MANAGED_BY.1 },
        },
        "spec": spec,
        "status": { "clusters": clusters },
    })
}

/// True when `have` already says what `want` would.
fn up_to_date(have: &ServiceImport, import: &Import, ip: Option<IpAddr>) -> bool {
    let ports: Vec<i32> = have.spec.ports.iter().map(|p| p.port).collect();
    let want_ports: Vec<i32> = import.ports.iter().map(|p| i32::from(*p)).collect();
    let clusters: BTreeSet<&str> = have
        .status
        .iter()
        .flat_map(|s| &s.clusters)
        .map(|c| c.cluster.as_str())
        .collect();
    let want_ips: Vec<String> = ip.iter().map(ToString::to_string).collect();
    ports == want_ports
        && have.spec.type_ == "ClusterSetIP"
        && have.spec.ips == want_ips
        && clusters == import.clusters.iter().map(String::as_str).collect()
}

/// Keeps this cluster's `ServiceImport`s in step with `imports`; `ip` is the
/// clusterset IP to give them (the proxies' Service), if any. Runs until
/// the sender of `imports` is dropped.
pub async fn run(
    client: Client,
    mut imports: watch::Receiver<Arc<Imports>>,
    ip: Option<IpAddr>,
    stats: Arc<ImportStats>,
) {
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let all: Api<ServiceImport> = Api::all(client.clone());
    let mut events = std::pin::pin!(
        watcher::watcher(all, watcher::Config::default().labels(&selector)).default_backoff()
    );
    let mut ours: Mirror<ServiceImport> = Mirror::default();
    let mut retry = tokio::time::interval(RETRY);
    let mut state = Reconciler::default();
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ev)) => { ours.apply(ev); }
                Some(Err(error)) => tracing::warn!(%error, "watching ServiceImports failed; retrying"),
                None => return,
            },
            r = imports.changed() => if r.is_err() { return },
            _ = retry.tick() => {}
        }
        if !ours.listed() {
            continue;
        }
        let want = imports.borrow_and_update().clone();
        reconcile(&client, &ours, &want, ip, &stats, &mut state).await;
    }
}

/// What the writer remembers between rounds.
#[derive(Default)]
struct Reconciler {
    /// Namespaces found missing, and when.
    missing: BTreeMap<String, tokio::time::Instant>,
    /// The resourceVersions our own writes left each import at, the last
    /// (after its status write) at the back. The watch echoes each of them
    /// in turn: a state we wrote on the way to the last must not be
    /// "corrected" by writing again (resourceVersions are opaque: only
    /// equality is used).
    written: BTreeMap<ServiceKey, VecDeque<String>>,
}

impl Reconciler {
    /// `rv` is an earlier state of our own making: its newer echo is coming.
    fn passing(&self, key: &ServiceKey, rv: Option<&String>) -> bool {
        let (Some(rv), Some(ours)) = (rv, self.written.get(key)) else {
            return false;
        };
        ours.back() != Some(rv) && ours.contains(rv)
    }

    fn wrote(&mut self, key: &ServiceKey, rvs: impl IntoIterator<Item = String>) {
        let ours = self.written.entry(key.clone()).or_default();
        for rv in rvs {
            ours.push_back(rv);
        }
        while ours.len() > 16 {
            ours.pop_front();
        }
    }
}

async fn reconcile(
    client: &Client,
    ours: &Mirror<ServiceImport>,
    want: &Imports,
    ip: Option<IpAddr>,
    stats: &ImportStats,
    state: &mut Reconciler,
) {
    let apply = PatchParams::apply(MANAGER).force();
    let now = tokio::time::Instant::now();
    state
        .missing
        .retain(|_, since| now.duration_since(*since) < MISSING_NAMESPACE_RECHECK);
    state.written.retain(|key, _| want.contains_key(key));
    for (key, import) in want {
        if state.missing.contains_key(&key.namespace) {
            continue;
        }
        let have = ours.get(&key.namespace, &key.name);
        if state.passing(key, have.and_then(|h| h.metadata.resource_version.as_ref())) {
            continue;
        }
        if have.is_some_and(|have| up_to_date(have, import, ip)) {
            continue;
        }
        let api = Api::<ServiceImport>::namespaced(client.clone(), &key.namespace);
        let body = manifest(key, import, ip);
        let written = async {
            let spec = api.patch(&key.name, &apply, &Patch::Apply(&body)).await?;
            let status = api
                .patch_status(&key.name, &apply, &Patch::Apply(&body))
                .await?;
            Ok::<_, kube::Error>([spec, status].map(|o| o.metadata.resource_version))
        };
        // Whatever happens, a failed round compares afresh next time.
        let done = tokio::time::timeout(Duration::from_secs(10), written).await;
        if !matches!(done, Ok(Ok(_))) {
            state.written.remove(key);
        }
        match done {
            Ok(Ok(rvs)) => {
                stats.written.fetch_add(1, Ordering::Relaxed);
                state.wrote(key, rvs.into_iter().flatten());
            }
            // Namespace sameness: no namespace here, no import.
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {
                tracing::debug!(service = %key, "no such namespace here; no ServiceImport");
                state.missing.insert(key.namespace.clone(), now);
            }
            Ok(Err(error)) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %key, %error, "writing the ServiceImport failed; trying again later");
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %key, "writing the ServiceImport timed out; trying again later");
            }
        }
    }
    for ((ns, name), _) in ours.iter() {
        if want.contains_key(&ServiceKey::new(ns, name)) {
            continue;
        }
        let api = Api::<ServiceImport>::namespaced(client.clone(), ns);
        let deleted = tokio::time::timeout(
            Duration::from_secs(10),
            api.delete(name, &DeleteParams::default()),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => {
                stats.deleted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => {}
            Ok(Err(error)) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(namespace = %ns, name = %name, %error, "deleting a ServiceImport failed; trying again later");
            }
            Err(_) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(namespace = %ns, name = %name, "deleting a ServiceImport timed out; trying again later");
            }
        }
    }
}
