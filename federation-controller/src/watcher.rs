//! Keeps a [`GlobalView`] in step with etcd: list once, watch from the list's
//! revision + 1, resume from the last revision seen after a broken watch, and
//! list again (reconciling key by key) when etcd has compacted that revision.
//!
//! Static stability: while etcd is unreachable the last view stays published;
//! a view is only ever replaced by a complete, newer one.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use fedmesh_api::retry::Backoff;
use tokio::sync::watch;

use crate::lastgood::{self, Keeper};
use crate::view::{GlobalView, Listing, RawEvent, RawKv};
use fedmesh_zone::gate::{Gate, Refused};
use fedmesh_zone::{Pager, list_range};

/// Counters for the admin port.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Full listings, including the first.
    pub lists: AtomicU64,
    /// Listings forced by a compacted resume revision.
    pub compaction_relists: AtomicU64,
    pub etcd_errors: AtomicU64,
    pub events: AtomicU64,
    /// Views published to consumers.
    pub publishes: AtomicU64,
    /// Values the gate refused, by (kind, cluster, reason).
    pub refused: std::sync::Mutex<std::collections::BTreeMap<(String, String, String), u64>>,
}

impl WatchStats {
    fn count_refusals(&self, refused: Vec<Refused>) {
        if refused.is_empty() {
            return;
        }
        let mut m = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        for r in refused {
            let key = (
                r.kind.as_str().to_owned(),
                r.cluster,
                r.refusal.label().to_owned(),
            );
            *m.entry(key).or_default() += 1;
        }
    }
}

#[derive(Debug, Clone)]
pub struct WatcherConfig {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Where the last good view is kept ([`crate::lastgood`]); `None`: a
    /// restart starts from etcd alone.
    pub last_good: Option<PathBuf>,
    /// How long a change waits before the last good view is written.
    pub save_every: Duration,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            last_good: None,
            save_every: Duration::from_secs(5),
        }
    }
}

/// Where the loop stands after a watch ends.
enum Resume {
    /// Watch again from the view's revision + 1.
    Watch,
    /// The resume revision is gone: list again.
    List,
    /// etcd's revision is behind the view's: this is another etcd (a new
    /// one, or one restored from a backup). List it as new.
    Replaced,
}

/// Runs until every receiver of `tx` is dropped.
pub async fn run(
    mut client: Client,
    mut view: GlobalView,
    mut gate: Gate,
    tx: watch::Sender<Arc<GlobalView>>,
    config: WatcherConfig,
    stats: Arc<WatchStats>,
) {
    let mut backoff = Backoff::new(config.initial_backoff, config.max_backoff);
    let mut need_list = true;
    let mut keeper = None;
    if let Some(path) = config.last_good {
        // Seconds of file reading at scale: off the async threads.
        let restored = tokio::task::spawn_blocking(move || {
            lastgood::restore(&path, &mut gate, &mut view, std::time::SystemTime::now());
            (path, gate, view)
        })
        .await;
        let Ok((path, g, v)) = restored else {
            tracing::error!("restoring the last good view panicked; the watcher stops");
            return;
        };
        (gate, view) = (g, v);
        keeper = Some(Keeper::new(path, config.save_every));
    }
    // Served at once, etcd or not: a restart keeps what was believed.
    if view.is_complete() {
        publish(&tx, &view, &stats);
    }
    loop {
        if tx.is_closed() {
            return;
        }
        let step = async {
            if need_list {
                list(&mut client, &mut view, &mut gate, &stats).await?;
                need_list = false;
                publish(&tx, &view, &stats);
                if let Some(k) = keeper.as_mut() {
                    k.changed();
                }
            }
            watch_until_broken(&mut client, &mut view, &mut gate, &tx, &stats, &mut keeper).await
        }
        .await;
        match step {
            Ok(Resume::List) => {
                stats.compaction_relists.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    revision = view.revision(),
                    "resume revision compacted; listing again"
                );
                need_list = true;
                backoff.reset();
                continue;
            }
            Ok(Resume::Replaced) => {
                stats.compaction_relists.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    revision = view.revision(),
                    "etcd's revision is behind the view's: a new or restored etcd; listing it as new (what it lacks stays believed)"
                );
                view.rewind();
                need_list = true;
                backoff.reset();
                continue;
            }
            Ok(Resume::Watch) => backoff.reset(),
            Err(error) => {
                stats.etcd_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, revision = view.revision(), "global zone watch interrupted; serving the last view");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next(fastrand::f64())) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Clusters whose exports are fetched ahead of the one being applied.
const FETCH_AHEAD: usize = 3;

/// Lists the whole global zone at one revision.
///
/// Exports are listed cluster by cluster rather than as one range: etcd 3.4
/// walks the whole remaining range to answer each limited page, so paging
/// through one range of N keys costs O(N²/page). Exports of a cluster with
/// no record are unreachable and are not listed (a later watch event still
/// brings them in).
async fn list(
    client: &mut Client,
    view: &mut GlobalView,
    gate: &mut Gate,
    stats: &WatchStats,
) -> Result<(), etcd_client::Error> {
    let started = std::time::Instant::now();
    let mut waited = Duration::ZERO;
    let prefix = view.keys().prefix().to_owned();
    let mut revision = 0;
    let mut listing = Listing::default();
    let mut records = Vec::new();
    for kind in fedmesh_zone::RECORD_KINDS {
        let range = format!("{prefix}{kind}");
        list_range(
            client,
            &range,
            &mut revision,
            &mut Pager::default(),
            &mut records,
        )
        .await?;
    }
    // The gate hands on what it believes, including believed records etcd
    // lost: those clusters' exports are listed too.
    let records = gate.admit_records(records, std::time::SystemTime::now());
    let clusters: Vec<String> = records
        .iter()
        .filter_map(|kv| match view.keys().parse(&kv.key) {
            Some(fedmesh_api::GlobalKey::Cluster(c)) => Some(c),
            _ => None,
        })
        .collect();
    view.list_records(&mut listing, records);
    // Fetch a few clusters ahead while applying, so that etcd and the apply
    // run side by side; applying in listing order keeps appends cheap.
    let mut clusters = clusters.into_iter();
    let mut ahead = VecDeque::new();
    let mut pager = Pager::default();
    let applied = loop {
        while ahead.len() < FETCH_AHEAD
            && let Some(c) = clusters.next()
        {
            let (mut client, prefix) = (client.clone(), view.keys().exports_of(&c));
            // Each fetch starts from what earlier ones learnt of export sizes.
            let mut pager = pager;
            ahead.push_back(tokio::spawn(async move {
                let mut kvs = Vec::new();
                list_range(
                    &mut client,
                    &prefix,
                    &mut { revision },
                    &mut pager,
                    &mut kvs,
                )
                .await?;
                Ok::<_, etcd_client::Error>((c, kvs, pager))
            }));
        }
        let Some(next) = ahead.pop_front() else {
            break Ok(());
        };
        let t = std::time::Instant::now();
        match next.await {
            Ok(Ok((c, kvs, learnt))) => {
                waited += t.elapsed();
                pager = learnt;
                let believed = gate.admit_exports(&c, kvs);
                view.list_exports(&mut listing, &c, believed.kvs, &believed.held);
            }
            Ok(Err(e)) => break Err(e),
            Err(e) => break Err(etcd_client::Error::IoError(std::io::Error::other(e))),
        }
    };
    if let Err(e) = applied {
        ahead.iter().for_each(tokio::task::JoinHandle::abort);
        return Err(e);
    }
    view.finish_listing(listing, revision);
    stats.count_refusals(gate.drain_refusals());
    stats.lists.fetch_add(1, Ordering::Relaxed);
    tracing::info!(
        revision,
        exports = view.export_count(),
        took = ?started.elapsed(),
        waiting_for_etcd = ?waited,
        "listed the global zone"
    );
    Ok(())
}

async fn watch_until_broken(
    client: &mut Client,
    view: &mut GlobalView,
    gate: &mut Gate,
    tx: &watch::Sender<Arc<GlobalView>>,
    stats: &WatchStats,
    keeper: &mut Option<Keeper>,
) -> Result<Resume, etcd_client::Error> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(view.revision() + 1)
        .with_progress_notify();
    let mut stream = client.watch(view.keys().prefix(), Some(opts)).await?;
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = tx.closed() => return Ok(Resume::Watch),
            _ = save_due(keeper.as_ref()) => {
                if let Some(k) = keeper.as_mut() {
                    k.save(gate, view);
                }
                continue;
            }
        };
        let Some(resp) = msg else {
            return Ok(Resume::Watch);
        };
        if resp.compact_revision() > 0 {
            return Ok(Resume::List);
        }
        // Watching from a revision etcd has not reached would wait, silent,
        // until it gets there: only another etcd is behind us.
        if resp.created()
            && let Some(h) = resp.header()
            && h.revision() < view.revision()
        {
            return Ok(Resume::Replaced);
        }
        if resp.canceled() {
            tracing::warn!(reason = resp.cancel_reason(), "etcd cancelled the watch");
            return Ok(Resume::Watch);
        }
        let mut raw = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            raw.push(match ev.event_type() {
                EventType::Put => RawEvent::Put(RawKv {
                    key,
                    value: kv.value().to_vec(),
                    mod_revision: kv.mod_revision(),
                }),
                EventType::Delete => RawEvent::Delete {
                    key,
                    mod_revision: kv.mod_revision(),
                },
            });
        }
        stats.events.fetch_add(raw.len() as u64, Ordering::Relaxed);
        let last = raw.iter().map(RawEvent::revision).max();
        let admitted = gate.admit(raw, std::time::SystemTime::now());
        stats.count_refusals(gate.drain_refusals());
        let mut changed = false;
        for event in admitted.events {
            changed |= view.apply_event(event).is_some();
        }
        // Every event up to the last one delivered has been judged, the
        // refused ones included: resume after them.
        if let Some(last) = last {
            view.advance(last);
        }
        if changed {
            publish(tx, view, stats);
            if let Some(k) = keeper.as_mut() {
                k.changed();
            }
        }
        if admitted.relist {
            return Ok(Resume::List);
        }
        // Only a progress notification promises that every event up to its
        // header revision has been delivered; a catch-up batch's header is
        // ahead of the events still to come.
        if resp.events().is_empty()
            && !resp.created()
            && let Some(h) = resp.header()
        {
            view.advance(h.revision());
        }
    }
}

async fn save_due(keeper: Option<&Keeper>) {
    match keeper {
        Some(k) => k.due().await,
        None => std::future::pending().await,
    }
}

fn publish(tx: &watch::Sender<Arc<GlobalView>>, view: &GlobalView, stats: &WatchStats) {
    stats.publishes.fetch_add(1, Ordering::Relaxed);
    tx.send_replace(Arc::new(view.clone()));
}
