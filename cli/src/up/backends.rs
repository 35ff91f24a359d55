//! `fedmesh stop` / `fedmesh start`: demo backends by
//! `<cluster>/<namespace>/<name>[@zone]`.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use super::render;
use super::state::{BackendState, State};
use super::supervise::{backend_cmd, binaries, listening, spawn, stop_all};

/// `<cluster>/<namespace>/<name>[@zone]`.
pub fn matches(target: &str, cluster: &str, b: &BackendState) -> anyhow::Result<bool> {
    let (path, zone) = match target.split_once('@') {
        Some((p, z)) => (p, Some(z)),
        None => (target, None),
    };
    let mut parts = path.splitn(2, '/');
    let (Some(c), Some(service)) = (parts.next(), parts.next()) else {
        bail!("{target:?}: expected <cluster>/<namespace>/<name>[@zone]");
    };
    if !service.contains('/') {
        bail!("{target:?}: expected <cluster>/<namespace>/<name>[@zone]");
    }
    Ok(c == cluster && b.service == service && zone.is_none_or(|z| z == b.zone))
}

/// `fedmesh stop` / `fedmesh start`: kills or restarts the demo backends
/// `target` names, and marks them unhealthy or healthy in their cluster's
/// registry, as a readiness probe would.
pub async fn stop_start(dir: &Path, target: &str, start: bool) -> anyhow::Result<()> {
    let mut s = State::load(dir)?;
    let started = s.started.clone();
    let ours = |pid| super::state::ours(&started, pid);
    let bins = binaries()?;
    let logs = dir.join("logs");
    let mut touched = Vec::new();
    for c in &mut s.clusters {
        let mut changed = false;
        for b in &mut c.backends {
            if !matches(target, &c.name, b)? {
                continue;
            }
            touched.push(b.id.clone());
            match (start, b.pid) {
                (false, Some(pid)) => {
                    if ours(pid) {
                        stop_all(&[pid], Duration::from_secs(5)).await;
                    }
                    b.pid = None;
                    changed = true;
                }
                (true, None) => {
                    let log = logs.join(format!("{}.log", b.id.replace(['/', '@', '#'], "_")));
                    let pid = spawn(backend_cmd(&bins, b, &c.name), &log)?;
                    listening(b.address, "the backend", pid, &log).await?;
                    b.pid = Some(pid);
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            render::write_registry(c)?;
        }
    }
    if touched.is_empty() {
        bail!("{target:?} names no backend of {}", s.topology);
    }
    s.save(dir)?;
    println!(
        "{} {}",
        if start { "started" } else { "stopped" },
        touched.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(service: &str, zone: &str) -> BackendState {
        BackendState {
            id: format!("aws/{service}@{zone}#0"),
            service: service.into(),
            zone: zone.into(),
            address: "127.0.1.50:8080".parse().unwrap(),
            tcp: false,
            pid: None,
        }
    }

    #[test]
    fn a_target_names_a_cluster_a_service_and_maybe_a_zone() {
        let b = backend("shop/cart", "az1");
        assert!(matches("aws/shop/cart", "aws", &b).unwrap());
        assert!(matches("aws/shop/cart@az1", "aws", &b).unwrap());
        assert!(!matches("aws/shop/cart@az2", "aws", &b).unwrap());
        assert!(!matches("gcp/shop/cart", "aws", &b).unwrap());
        assert!(!matches("aws/shop/web", "aws", &b).unwrap());
        assert!(
            !matches("aws/shop/car", "aws", &b).unwrap(),
            "no prefix match"
        );
    }

    #[test]
    fn a_malformed_target_is_an_error_that_shows_the_form() {
        let b = backend("shop/cart", "az1");
        for bad in ["aws", "aws/cart", "aws/cart@az1", ""] {
            let e = matches(bad, "aws", &b).unwrap_err().to_string();
            assert!(
                e.contains("<cluster>/<namespace>/<name>[@zone]"),
                "{bad:?}: {e}"
            );
        }
    }
}
