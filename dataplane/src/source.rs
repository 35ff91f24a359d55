//! Where a data-plane process's config comes from. Either way the process
//! gets the same three watch channels ([`Feeds`]): its config (a gateway's
//! routes, a proxy's table), its SVID, and the trust bundles.
//!
//! - A static file is polled; a change is re-read whole and applied only if
//!   it parses, so a bad edit is logged and the running config stays.
//! - The controller's discovery stream ([`fedmesh_discovery::Discovered`])
//!   keeps the last good config while the controller is away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_discovery::{Discovered, SyncStatus};
use fedmesh_trust::{BundleSet, Svid};
use tokio::sync::watch;

/// One reading of a static config.
#[derive(Debug, Clone)]
pub struct Snapshot<T> {
    pub config: T,
    pub svid: Svid,
    pub bundles: BundleSet,
}

/// What the process runs on, kept current by its [`ConfigSource`].
#[derive(Debug, Clone)]
pub struct Feeds<T> {
    pub config: watch::Receiver<Arc<T>>,
    pub svid: watch::Receiver<Arc<Svid>>,
    pub bundles: watch::Receiver<Arc<BundleSet>>,
}

/// Keeps [`Feeds`] current until dropped.
#[derive(Debug)]
pub enum ConfigSource<T> {
    File(AbortOnDrop),
    Controller(Discovered<T>),
}

/// A task that stops when its handle is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T: PartialEq + Send + Sync + 'static> ConfigSource<T> {
    /// Starts from `first` and re-reads `path` every `every` with `load`
    /// (which runs on a blocking thread). What changed is published; a
    /// file that fails to load is logged and changes nothing.
    pub fn file<F>(path: PathBuf, every: Duration, first: Snapshot<T>, load: F) -> (Self, Feeds<T>)
    where
        F: Fn(&std::path::Path) -> Result<Snapshot<T>, String> + Send + Sync + 'static,
    {
        let (config_tx, config) = watch::channel(Arc::new(first.config));
        let (svid_tx, svid) = watch::channel(Arc::new(first.svid));
        let (bundles_tx, bundles) = watch::channel(Arc::new(first.bundles));
        let load = Arc::new(load);
        let poller = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let (p, load) = (path.clone(), load.clone());
                let read = match tokio::task::spawn_blocking(move || load(&p)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "config not reloaded; keeping the running one");
                        continue;
                    }
                    Err(_) => continue,
                };
                config_tx.send_if_modified(|cur| {
                    let changed = **cur != read.config;
                    if changed {
                        tracing::info!("config reloaded");
                        *cur = Arc::new(read.config);
                    }
                    changed
                });
                crate::files::publish_identity(&svid_tx, read.svid, &bundles_tx, read.bundles);
            }
        });
        let feeds = Feeds {
            config,
            svid,
            bundles,
        };
        (ConfigSource::File(AbortOnDrop(poller)), feeds)
    }

    /// Runs on what the controller sends.
    pub fn controller(d: Discovered<T>) -> (Self, Feeds<T>) {
        let feeds = Feeds {
            config: d.config.clone(),
            svid: d.svid.clone(),
            bundles: d.bundles.clone(),
        };
        (ConfigSource::Controller(d), feeds)
    }

    /// The discovery client's status (skipped services, each remote
    /// cluster's liveness), when the controller is the source.
    pub fn status(&self) -> Option<watch::Receiver<Arc<SyncStatus>>> {
        match self {
            ConfigSource::File(_) => None,
            ConfigSource::Controller(d) => Some(d.status.clone()),
        }
    }

    /// The handle that asks the controller for services at their first
    /// use, when the controller is the source.
    pub fn on_demand(&self) -> Option<fedmesh_discovery::OnDemand> {
        match self {
            ConfigSource::File(_) => None,
            ConfigSource::Controller(d) => Some(d.on_demand.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_trust::{CaOptions, ClusterCa, SpiffeId, SvidPolicy, TrustDomain};
    use std::time::SystemTime;

    fn identity() -> (Svid, BundleSet) {
        fedmesh_trust::install_default_provider();
        let td = TrustDomain::new("a.test").unwrap();
        let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
        let id = SpiffeId::gateway(&td, "a").unwrap();
        let svid = ca
            .issue(&id, &SvidPolicy::default(), SystemTime::now())
            .unwrap();
        let mut b = BundleSet::new();
        b.insert(fedmesh_trust::Bundle::with_roots(
            td,
            [ca.cert_der().clone()],
        ));
        (svid, b)
    }

    /// The file says a number; "bad" does not parse.
    fn load(p: &std::path::Path, svid: &Svid, b: &BundleSet) -> Result<Snapshot<u32>, String> {
        let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
        let config = text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is no number"))?;
        Ok(Snapshot {
            config,
            svid: svid.clone(),
            bundles: b.clone(),
        })
    }

    #[tokio::test]
    async fn a_file_source_applies_good_edits_and_keeps_the_config_over_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, "1").unwrap();
        let (svid, b) = identity();
        let first = load(&path, &svid, &b).unwrap();
        let (s2, b2) = (svid.clone(), b.clone());
        let (source, mut feeds) =
            ConfigSource::file(path.clone(), Duration::from_millis(10), first, move |p| {
                load(p, &s2, &b2)
            });
        assert!(source.status().is_none());
        std::fs::write(&path, "bad").unwrap();
        std::fs::write(&path, "2").unwrap();
        let deadline = Duration::from_secs(10);
        tokio::time::timeout(deadline, feeds.config.wait_for(|c| **c == 2))
            .await
            .expect("the edit is applied")
            .unwrap();
        std::fs::write(&path, "bad").unwrap();
        // Several polls see the bad file; the config stays, unchanged.
        let polls = tokio::time::timeout(Duration::from_millis(200), feeds.config.changed()).await;
        assert!(polls.is_err(), "a bad file publishes nothing");
        assert_eq!(**feeds.config.borrow(), 2);
        drop(source);
        std::fs::write(&path, "3").unwrap();
        let after = tokio::time::timeout(Duration::from_millis(200), feeds.config.changed()).await;
        assert!(
            !matches!(after, Ok(Ok(()))),
            "a dropped source stops polling"
        );
    }
}
