//! CA rotation of a running controller. An operator stages the cluster's
//! next CA in the join directory (`fedmesh rotate-ca`); this driver takes it
//! up. The schedule is the I/O-free [`Authority`]; the driver only:
//!
//! - starts the rotation when a new CA is staged;
//! - publishes the cluster's bundle to the global zone whenever its roots
//!   change (the new root at once, the old one dropped once its last leaf
//!   has expired), retrying until etcd takes it;
//! - tells the controller's own TLS (and Certify) the new bundle;
//! - once the new root signs, makes it the join directory's CA, so that a
//!   restarted controller signs with it too.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::Client;
use fedmesh_api::KeySpace;
use fedmesh_trust::{Authority, Bundle};
use fedmesh_zone::join::JoinDir;
use tokio::sync::watch;

/// How often the join directory is looked at, and a failed publication
/// retried.
pub const POLL: Duration = Duration::from_secs(1);

/// Runs until the task is dropped.
pub async fn run(
    join_dir: PathBuf,
    authority: Arc<Mutex<Authority>>,
    own: watch::Sender<Bundle>,
    mut etcd: Client,
    keys: KeySpace,
) {
    let lock = || authority.lock().unwrap_or_else(|p| p.into_inner());
    let mut signing = lock().active().cert_der().clone();
    let mut unpublished = false;
    // The sequence of the bundle we last signed: each one rises past it.
    let mut signed_seq: Option<u64> = None;
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = SystemTime::now();
        let td = lock().trust_domain().clone();
        match JoinDir::staged_rotation(&join_dir, &td) {
            Ok(Some((next, delay))) => {
                let mut a = lock();
                if !a.has_root(next.cert_der()) {
                    match a.begin_rotation_in(next, now, delay) {
                        Ok(()) => {
                            tracing::info!(trust_domain = %td, ?delay, "CA rotation: the new root is published and signs after the delay");
                            unpublished = true;
                        }
                        Err(e) => warn_once(&mut last_error, format!("the staged CA: {e}")),
                    }
                }
            }
            Ok(None) => {}
            Err(e) => warn_once(
                &mut last_error,
                format!("the staged CA cannot be read: {e}"),
            ),
        }
        let (bundle, signed) = {
            let mut a = lock();
            // Certify may have moved it on already; either way, look.
            unpublished |= a.poll(now);
            if a.active().cert_der() != &signing {
                signing = a.active().cert_der().clone();
                tracing::info!(trust_domain = %td, "CA rotation: the new root signs");
                if let Err(e) = JoinDir::promote_staged(&join_dir) {
                    tracing::warn!(error = %e, "the new CA signs, but it could not be made the join directory's CA; a restart would sign with the old one");
                }
            }
            let bundle = a.bundle();
            // Signed by the root that signs now, which readers already
            // trust: the old one while the new is only published, then the
            // new one, which they hold by then.
            let signed = match unpublished {
                true => Some(fedmesh_zone::client::signed_bundle(
                    &keys,
                    &bundle,
                    a.active(),
                    signed_seq,
                )),
                false => None,
            };
            (bundle, signed)
        };
        own.send_if_modified(|cur| {
            let changed = cur.roots() != bundle.roots();
            if changed {
                *cur = bundle.clone();
            }
            changed
        });
        if let Some(signed) = signed {
            let bundle_key = keys.bundle(td.as_str());
            let result = match signed {
                Ok((value, seq)) => etcd
                    .put(bundle_key.as_str(), value, None)
                    .await
                    .map(|_| seq)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(seq) => {
                    tracing::info!(key = %bundle_key, roots = bundle.roots().len(), sequence = bundle.sequence, "published the cluster's bundle");
                    signed_seq = Some(seq);
                    unpublished = false;
                }
                Err(e) => warn_once(
                    &mut last_error,
                    format!("publishing the bundle (retried every second): {e}"),
                ),
            }
        }
    }
}

/// Logs `msg` unless it is what was logged last: a bad staged CA is looked
/// at every second.
fn warn_once(last: &mut String, msg: String) {
    if *last != msg {
        tracing::warn!("{msg}");
        *last = msg;
    }
}
