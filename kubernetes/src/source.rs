//! The controller's Kubernetes source: watches `ServiceExport`s, Services
//! and EndpointSlices, and publishes what they export as the cluster's
//! local services; writes each `ServiceExport`'s `Valid` and `Conflict`
//! conditions.
//!
//! kube's watcher lists, then watches from the listing's resourceVersion
//! with bookmarks, and lists again after `410 Gone`, a dropped connection
//! or a restarted API server; [`Mirror`] takes each relist in whole.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fedmesh_api::{LocalServices, ServiceKey};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::conditions;
use crate::mcs::ServiceExport;
use crate::mirror::Mirror;
use crate::summary::{Summary, Verdict, summarise};

/// Remote clusters that export a local service on other ports than ours,
/// by service (the controller's mesh works this out).
pub type Conflicts = BTreeMap<ServiceKey, Vec<String>>;

/// How often conditions that could not be written are tried again.
const STATUS_RETRY: Duration = Duration::from_secs(15);

/// Counters for the admin port.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Watch errors (each is retried with backoff, then listed again).
    pub watch_errors: AtomicU64,
    /// Completed listings, the first included.
    pub listings: AtomicU64,
    pub status_writes: AtomicU64,
    pub status_errors: AtomicU64,
}

/// A running source. Dropping it stops the watches.
#[derive(Debug)]
pub struct KubeSource {
    services: watch::Receiver<Arc<LocalServices>>,
    pub stats: Arc<SourceStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeSource {
    /// Starts the watches and returns once all three kinds have been
    /// listed: until then nothing is known, and publishing an empty set
    /// would withdraw every export of the cluster.
    pub async fn start(
        client: Client,
        conflicts: watch::Receiver<Arc<Conflicts>>,
        stats: Arc<SourceStats>,
    ) -> Self {
        let (tx, services) = watch::channel(Arc::new(LocalServices::new()));
        let (listed_tx, mut listed) = watch::channel(false);
        let task = tokio::spawn(run(client, conflicts, tx, listed_tx, stats.clone()));
        let mut waiting = tokio::time::interval(Duration::from_secs(10));
        waiting.tick().await;
        loop {
            tokio::select! {
                // Either listed, or the task is gone (and the API is too).
                _ = listed.wait_for(|l| *l) => break,
                _ = waiting.tick() => tracing::warn!("still waiting for a first listing of ServiceExports, Services and EndpointSlices from the Kubernetes API server"),
            }
        }
        Self {
            services,
            stats,
            task,
        }
    }

    /// This cluster's exported services; updates as the cluster changes.
    pub fn services(&self) -> watch::Receiver<Arc<LocalServices>> {
        self.services.clone()
    }
}

fn events<K>(
    client: &Client,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + use<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff()
}

fn apply<K: Resource>(
    mirror: &mut Mirror<K>,
    ev: Option<Result<Event<K>, watcher::Error>>,
    kind: &str,
    stats: &SourceStats,
) -> bool {
    match ev {
        Some(Ok(ev)) => {
            let done = matches!(ev, Event::InitDone);
            let changed = mirror.apply(ev);
            if done {
                stats.listings.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(kind, objects = mirror.len(), "listed");
            }
            changed
        }
        Some(Err(error)) => {
            stats.watch_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(kind, %error, "Kubernetes watch failed; retrying, the last objects stay in force");
            false
        }
        None => false,
    }
}

async fn run(
    client: Client,
    mut conflicts: watch::Receiver<Arc<Conflicts>>,
    tx: watch::Sender<Arc<LocalServices>>,
    listed: watch::Sender<bool>,
    stats: Arc<SourceStats>,
) {
    let mut svc_events = std::pin::pin!(events::<Service>(&client));
    let mut slice_events = std::pin::pin!(events::<EndpointSlice>(&client));
    let mut export_events = std::pin::pin!(events::<ServiceExport>(&client));
    let (mut services, mut slices, mut exports) =
        (Mirror::default(), Mirror::default(), Mirror::default());
    let mut retry = tokio::time::interval(STATUS_RETRY);
    let mut summary = Summary::default();
    loop {
        let mut recompute = false;
        let mut statuses = false;
        tokio::select! {
            ev = svc_events.next() => recompute = apply(&mut services, ev, "Service", &stats),
            ev = slice_events.next() => recompute = apply(&mut slices, ev, "EndpointSlice", &stats),
            ev = export_events.next() => {
                recompute = apply(&mut exports, ev, "ServiceExport", &stats);
                statuses = recompute;
            }
            r = conflicts.changed() => {
                if r.is_err() {
                    // The controller is gone.
                    return;
                }
                statuses = true;
            }
            _ = retry.tick() => statuses = true,
            _ = tx.closed() => return,
        }
        if !(services.listed() && slices.listed() && exports.listed()) {
            continue;
        }
        if recompute {
            let next = summarise(&services, &slices, &exports);
            statuses |= next.verdicts != summary.verdicts;
            summary = next;
            tx.send_if_modified(|cur| {
                let changed = **cur != summary.services;
                if changed {
                    *cur = Arc::new(summary.services.clone());
                }
                changed
            });
            listed.send_if_modified(|l| !std::mem::replace(l, true));
        }
        if statuses {
            let conflicts = conflicts.borrow_and_update().clone();
            write_conditions(&client, &exports, &summary, &conflicts, &stats).await;
        }
    }
}

/// Patches the conditions of each `ServiceExport` whose conditions say
/// something else than they should. A failed write is tried again later.
async fn write_conditions(
    client: &Client,
    exports: &Mirror<ServiceExport>,
    summary: &Summary,
    conflicts: &Conflicts,
    stats: &SourceStats,
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    for ((ns, name), export) in exports.iter() {
        let key = ServiceKey::new(ns, name);
        let Some(verdict) = summary.verdicts.get(&key) else {
            continue;
        };
        let ports = summary
            .services
            .get(&key)
            .map(|s| s.ports.clone())
            .unwrap_or_default();
        let conflicting = match verdict {
            Verdict::Exported { .. } => conflicts.get(&key).map(Vec::as_slice).unwrap_or_default(),
            Verdict::Invalid { .. } => &[],
        };
        let existing = export
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let Some(want) = conditions::desired(
            existing,
            verdict,
            conflicting,
            &ports,
            export.metadata.generation,
            &now,
        ) else {
            continue;
        };
        let api = Api::<ServiceExport>::namespaced(client.clone(), ns);
        let patch = serde_json::json!({ "status": { "conditions": want } });
        let written = tokio::time::timeout(
            Duration::from_secs(10),
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await;
        match written {
            Ok(Ok(_)) => {
                stats.status_writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                stats.status_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %key, %error, "writing the ServiceExport's conditions failed; trying again later");
            }
            Err(_) => {
                stats.status_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(service = %key, "writing the ServiceExport's conditions timed out; trying again later");
            }
        }
    }
}
