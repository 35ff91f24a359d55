//! `fedmesh rotate-ca`: stages a cluster's next CA in its join directory.
//! The cluster's running controller takes it up within a second: it
//! publishes the new root next to the old one at once, signs with it after
//! the propagation delay, and drops the old root from the bundle once the
//! last leaf it signed has expired.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use fedmesh_trust::{CaOptions, ClusterCa, TrustDomain};
use fedmesh_zone::join::{JoinDir, NEXT_CA_DIR};

/// Generates the next CA of the cluster whose join directory is `join` and
/// stages it; returns its trust domain and the new root.
pub fn stage(join: &Path, propagation: Duration) -> anyhow::Result<(TrustDomain, ClusterCa)> {
    let j = JoinDir::load(join)
        .with_context(|| format!("loading the join directory {}", join.display()))?;
    let td = TrustDomain::new(&j.cluster.trust_domain)?;
    let next = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now())?;
    JoinDir::stage_rotation(join, &next, propagation)?;
    Ok((td, next))
}

/// `fedmesh rotate-ca`: stages, then says what happens next.
pub fn rotate_ca(join: &Path, propagation: Duration) -> anyhow::Result<(TrustDomain, ClusterCa)> {
    let (td, next) = stage(join, propagation)?;
    println!(
        "staged the next CA of {td} in {}: its controller publishes the new root within a second, \
         and signs with it {} later",
        join.join(NEXT_CA_DIR).display(),
        humantime_serde::re::humantime::format_duration(propagation)
    );
    Ok((td, next))
}
