//! The last good view, kept on disk: static stability across restarts.
//!
//! A controller that starts against an empty or partial zone (etcd wiped,
//! restored from an old snapshot, or unreachable) must not withdraw the
//! remote clusters it served a moment ago. So the watcher writes what its
//! gate believes to a file (a `fedmesh_zone::dump`: records as signed,
//! exports as written, a line each, streamed both ways) at most every few
//! seconds, and a starting controller reads it back through its gate
//! before it reaches etcd. A file damaged part way gives what its good
//! part verifies, and no more. Nothing in the file is
//! believed for being there: every value is judged again, so a stale or
//! tampered file can only offer what its signatures allow, and a newer
//! value in etcd still wins.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fedmesh_zone::dump::{DumpError, DumpHeader, DumpReader, write_lines};
use fedmesh_zone::gate::Gate;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::view::{GlobalView, Listing};

/// Reads the last good view at `path` into `gate` and `view`, as a listing
/// of it, a cluster's exports at a time. Returns how many exports it
/// holds; 0, with a log line, when there is no usable file (the first
/// start, a file from another prefix or version, a damaged one).
pub fn restore(path: &Path, gate: &mut Gate, view: &mut GlobalView, now: SystemTime) -> usize {
    let restored = (|| {
        let mut reader = DumpReader::open(path, view.keys().prefix())?;
        let mut listing = Listing::default();
        let records = gate.admit_records(reader.records()?, now);
        view.list_records(&mut listing, records);
        while let Some((cluster, kvs)) = reader.next_cluster()? {
            let listed = gate.admit_exports(&cluster, kvs);
            view.list_exports(&mut listing, &cluster, listed.kvs, &listed.held);
        }
        Ok::<_, DumpError>((listing, reader.header.taken_at))
    })();
    // What the file held that the gate refused is not this run's news.
    gate.drain_refusals();
    match restored {
        Ok((listing, taken_at)) => {
            view.finish_listing(listing, 0);
            let exports = view.export_count();
            tracing::info!(path = %path.display(), clusters = view.clusters.len(), exports, %taken_at, "restored the last good view from disk; etcd's listing settles it");
            exports
        }
        Err(DumpError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no last good view on disk yet; starting from etcd alone");
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "the last good view on disk is unusable; starting from etcd alone");
            0
        }
    }
}

/// Writes the last good view, at most once every `every`, off the async
/// threads: a change marks it due, the watcher calls [`Keeper::save`] when
/// [`Keeper::due`] fires.
#[derive(Debug)]
pub struct Keeper {
    path: PathBuf,
    every: Duration,
    due: Option<Instant>,
    writing: Option<JoinHandle<()>>,
}

impl Keeper {
    pub fn new(path: PathBuf, every: Duration) -> Self {
        Self {
            path,
            every,
            due: None,
            writing: None,
        }
    }

    /// The view changed: save it within `every`.
    pub fn changed(&mut self) {
        if self.due.is_none() {
            self.due = Some(Instant::now() + self.every);
        }
    }

    /// Resolves when a save is due; never while none is.
    pub async fn due(&self) {
        match self.due {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// Writes what `gate` and `view` hold now (the view is a cheap copy);
    /// with a write still under way, tries again later.
    pub fn save(&mut self, gate: &Gate, view: &GlobalView) {
        if self.writing.as_ref().is_some_and(|w| !w.is_finished()) {
            self.due = Some(Instant::now() + self.every);
            return;
        }
        self.due = None;
        let (records, view, path) = (gate.signed_records(), view.clone(), self.path.clone());
        self.writing = Some(tokio::task::spawn_blocking(move || {
            let header = DumpHeader::new(view.keys().prefix(), SystemTime::now());
            match write_lines(&path, &header, records.into_iter(), view.export_kvs()) {
                Ok(()) => tracing::debug!(path = %path.display(), "saved the last good view"),
                Err(e) => {
                    tracing::warn!(error = %e, "saving the last good view failed; a restart would start from etcd alone")
                }
            }
        }));
    }
}
