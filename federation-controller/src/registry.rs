//! Local discovery sources. Every source produces the same thing: a `watch`
//! channel of this cluster's services with their endpoints. The file registry
//! lives here; the Kubernetes source (`fedmesh-kube`) plugs into the same
//! seam, and [`merged`] runs both at once.
//!
//! The file registry serves VMs and the local runner: a YAML list of services
//! and endpoints, re-read when the file changes. A bad edit is reported with
//! its line and column, and the last good version stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedmesh_api::{LocalService, LocalServices, RegistryFile, ServiceKey, validate_label};
use tokio::sync::watch;

use crate::follow::{Missing, follow};

/// A source of this cluster's services.
pub trait DiscoverySource {
    /// The current services; the channel updates whenever they change.
    fn services(&self) -> watch::Receiver<Arc<LocalServices>>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct RegistryError {
    pub path: String,
    /// Includes the line and column where the YAML parser knows them.
    pub message: String,
}

/// Parses and validates a registry document. `origin` names the file.
pub fn parse_registry(yaml: &str, origin: &str) -> Result<LocalServices, RegistryError> {
    let err = |message: String| RegistryError {
        path: origin.into(),
        message,
    };
    let doc: RegistryFile = if yaml.trim().is_empty() {
        RegistryFile::default()
    } else {
        serde_saphyr::from_str(yaml).map_err(|e| err(e.to_string()))?
    };
    let mut out = LocalServices::new();
    for (i, svc) in doc.services.into_iter().enumerate() {
        let at = format!("services[{i}] ({}/{})", svc.namespace, svc.name);
        validate_label("namespace", &svc.namespace).map_err(|e| err(format!("{at}: {e}")))?;
        validate_label("service name", &svc.name).map_err(|e| err(format!("{at}: {e}")))?;
        let service = LocalService::from_listed(svc.ports, svc.endpoints)
            .map_err(|e| err(format!("{at}.{e}")))?;
        let key = ServiceKey::new(&svc.namespace, &svc.name);
        if out.insert(key.clone(), service).is_some() {
            return Err(err(format!("{at}: service {key} is listed twice")));
        }
    }
    Ok(out)
}

/// The file registry: reads `path` now, then polls it for changes.
#[derive(Debug)]
pub struct FileRegistry {
    rx: watch::Receiver<Arc<LocalServices>>,
    errors: watch::Receiver<Option<RegistryError>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FileRegistry {
    /// Fails if the file cannot be read or is invalid at start-up: there is
    /// no last good version to fall back on yet.
    pub async fn start(path: PathBuf, poll: Duration) -> Result<Self, RegistryError> {
        let (first, stamp) = load(&path).await?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let (err_tx, errors) = watch::channel(None);
        let task = tokio::spawn(follow_registry(path, poll, stamp, tx, err_tx));
        Ok(Self {
            rx,
            errors,
            _task: task,
        })
    }

    /// The most recent reload error, or `None` when the file is good.
    pub fn last_error(&self) -> Option<RegistryError> {
        self.errors.borrow().clone()
    }
}

impl DiscoverySource for FileRegistry {
    fn services(&self) -> watch::Receiver<Arc<LocalServices>> {
        self.rx.clone()
    }
}

async fn load(path: &Path) -> Result<(LocalServices, Vec<u8>), RegistryError> {
    let raw = tokio::fs::read(path).await.map_err(|e| RegistryError {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok((parse_bytes(&raw, path)?, raw))
}

fn parse_bytes(raw: &[u8], path: &Path) -> Result<LocalServices, RegistryError> {
    let origin = path.display().to_string();
    let text = std::str::from_utf8(raw).map_err(|e| RegistryError {
        path: origin.clone(),
        message: format!("not UTF-8: {e}"),
    })?;
    parse_registry(text, &origin)
}

/// Applies each settled edit of `path` (see [`follow`]); a bad one is
/// reported and the last good version kept.
async fn follow_registry(
    path: PathBuf,
    poll: Duration,
    stamp: Vec<u8>,
    tx: watch::Sender<Arc<LocalServices>>,
    errors: watch::Sender<Option<RegistryError>>,
) {
    follow(&path, poll, stamp, Missing::Retry, tx.closed(), |raw| {
        match parse_bytes(raw, &path) {
            Ok(services) => {
                errors.send_replace(None);
                tx.send_if_modified(|cur| {
                    if **cur == services {
                        return false;
                    }
                    *cur = Arc::new(services);
                    true
                });
                tracing::info!(path = %path.display(), "registry reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "registry edit rejected; keeping the last good version");
                errors.send_replace(Some(e));
            }
        }
    })
    .await;
}

/// The services of two sources together (VMs in the file registry beside
/// Kubernetes, say). A service in both is one service: its endpoints are
/// both sources' when their ports agree; otherwise the second source's
/// version stands, and the clash is logged.
pub fn merge(first: &LocalServices, second: &LocalServices) -> LocalServices {
    let mut out = second.clone();
    for (key, svc) in first {
        match out.get_mut(key) {
            None => {
                out.insert(key.clone(), svc.clone());
            }
            Some(both) if both.ports == svc.ports => {
                for e in &svc.endpoints {
                    if !both.endpoints.iter().any(|x| x.address == e.address) {
                        both.endpoints.push(e.clone());
                    }
                }
            }
            Some(both) => {
                tracing::warn!(service = %key, file = ?svc.ports, kubernetes = ?both.ports, "the file registry and Kubernetes give this service different ports; Kubernetes' stands");
            }
        }
    }
    out
}

/// Follows two sources, publishing their [`merge`] whenever either changes.
/// A source that stops leaves its last services in force.
pub fn merged(
    mut first: watch::Receiver<Arc<LocalServices>>,
    mut second: watch::Receiver<Arc<LocalServices>>,
) -> watch::Receiver<Arc<LocalServices>> {
    let now = merge(&first.borrow_and_update(), &second.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(now));
    tokio::spawn(async move {
        let (mut a_open, mut b_open) = (true, true);
        while a_open || b_open {
            tokio::select! {
                r = first.changed(), if a_open => a_open = r.is_ok(),
                r = second.changed(), if b_open => b_open = r.is_ok(),
                _ = tx.closed() => return,
            }
            let next = merge(&first.borrow_and_update(), &second.borrow_and_update());
            tx.send_if_modified(|cur| {
                if **cur == next {
                    return false;
                }
                *cur = Arc::new(next);
                true
            });
        }
        // Both gone: keep the last merge until nobody listens.
        tx.closed().await;
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
services:
  - namespace: shop
    name: checkout
    ports: [8080]
    endpoints:
      - address: 127.0.1.10:8080
        zone: az1
      - address: 127.0.1.11:8080
        zone: az2
        healthy: false
";

    #[test]
    fn parses_services_and_endpoints() {
        let s = parse_registry(GOOD, "registry.yaml").unwrap();
        let svc = &s[&ServiceKey::new("shop", "checkout")];
        assert_eq!(svc.ports, [8080]);
        assert_eq!(svc.endpoints.len(), 2);
        assert!(svc.endpoints[0].healthy, "healthy defaults to true");
        assert!(!svc.endpoints[1].healthy);
        assert!(parse_registry("", "r").unwrap().is_empty());
    }

    #[test]
    fn yaml_errors_carry_line_and_column() {
        let bad = GOOD.replace("ports: [8080]", "ports: [8080");
        let e = parse_registry(&bad, "registry.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("registry.yaml:"), "{e}");
        assert!(e.contains("line") && e.contains("column"), "{e}");

        let unknown = GOOD.replace("zone: az1", "zone: az1\n        weight: 3");
        let e = parse_registry(&unknown, "registry.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("weight") && e.contains("line"), "{e}");
    }

    #[test]
    fn merging_two_sources_joins_endpoints_of_a_service_with_the_same_ports() {
        let file = parse_registry(GOOD, "r").unwrap();
        let other = GOOD
            .replace("127.0.1.10:8080", "10.1.0.1:8080")
            .replace("127.0.1.11:8080", "127.0.1.10:8080");
        let kube = parse_registry(&other, "k").unwrap();
        let both = merge(&file, &kube);
        let eps: Vec<String> = both[&ServiceKey::new("shop", "checkout")]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(eps, ["10.1.0.1:8080", "127.0.1.10:8080", "127.0.1.11:8080"]);

        let clash = parse_registry(&other.replace("ports: [8080]", "ports: [9090]"), "k").unwrap();
        let both = merge(&file, &clash);
        assert_eq!(both[&ServiceKey::new("shop", "checkout")].ports, [9090]);
        assert_eq!(
            both[&ServiceKey::new("shop", "checkout")].endpoints.len(),
            2
        );

        let cart = GOOD.replace("checkout", "cart");
        let both = merge(&file, &parse_registry(&cart, "k").unwrap());
        assert_eq!(both.len(), 2, "services of either source are kept");
    }

    #[test]
    fn semantic_errors_name_the_entry() {
        let cases = [
            (
                GOOD.replace("127.0.1.10:8080", "not-an-address"),
                "services[0] (shop/checkout).endpoints[0].address",
            ),
            (GOOD.replace("zone: az1", "zone: AZ_1"), "zone \"AZ_1\""),
            (GOOD.replace("ports: [8080]", "ports: []"), "ports"),
            (
                GOOD.replace("127.0.1.11:8080", "127.0.1.10:8080"),
                "listed twice",
            ),
            (
                format!("{GOOD}{}", &GOOD["services:\n".len()..]),
                "shop/checkout is listed twice",
            ),
        ];
        for (doc, want) in cases {
            let e = parse_registry(&doc, "r.yaml").unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
