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
//!   restarted controller signs with it too;
//! - at start and every [`HEAL`], puts the cluster's own record (as the
//!   anchor signed it: the newest of the join directory's and the one in
//!   the last good view, which follows the operator's re-signing, `fedmesh
//!   anchor adopt`) and its bundle back when the zone has lost them or
//!   holds something older or unsigned (an etcd wiped or restored from an
//!   old backup, a raw delete): the owners rebuild the zone.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::Client;
use fedmesh_api::KeySpace;
use fedmesh_seal::{AnchorPublic, open_anchored, open_by_root, root_keyid};
use fedmesh_trust::{Authority, Bundle};
use fedmesh_zone::dump::DumpReader;
use fedmesh_zone::gate::current_anchor;
use fedmesh_zone::join::JoinDir;
use tokio::sync::watch;

/// How often the join directory is looked at, and a failed publication
/// retried.
pub const POLL: Duration = Duration::from_secs(1);

/// How often the cluster's own record and bundle are checked in etcd.
pub const HEAL: Duration = Duration::from_secs(30);

/// Where the cluster's own signed record is kept, and who signs it.
#[derive(Debug, Clone)]
pub struct OwnRecord {
    pub cluster: String,
    pub join_dir: PathBuf,
    /// The last good view ([`crate::lastgood`]), which holds the newest
    /// signed record of the cluster a reader believed. `None`: only the
    /// join directory's.
    pub last_good: Option<PathBuf>,
    /// The anchor the join directory pins: without it the record is not
    /// checked.
    pub anchor: Option<AnchorPublic>,
}

/// Runs until the task is dropped.
pub async fn run(
    own_record: OwnRecord,
    authority: Arc<Mutex<Authority>>,
    own: watch::Sender<Bundle>,
    mut etcd: Client,
    keys: KeySpace,
) {
    let join_dir = own_record.join_dir.clone();
    let lock = || authority.lock().unwrap_or_else(|p| p.into_inner());
    let mut signing = lock().active().cert_der().clone();
    let mut unpublished = false;
    // The sequence of the bundle we last signed: each one rises past it.
    let mut signed_seq: Option<u64> = None;
    // The roots last published. Certify polls the authority too, so a root
    // dropped there is seen here only as a bundle that differs.
    let mut published = lock().bundle().roots().to_vec();
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A (re)started controller looks at once: it may be starting on a
    // zone that lost its keys.
    let mut heal_due = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now = SystemTime::now();
        let td = lock().trust_domain().clone();
        if tokio::time::Instant::now() >= heal_due {
            heal_due += HEAL;
            if let Some(anchor) = &own_record.anchor {
                heal_record(&mut etcd, &keys, &own_record, anchor).await;
            }
            let bundle = lock().bundle();
            if !holds_our_bundle(&mut etcd, &keys, &bundle).await {
                tracing::info!(trust_domain = %td, "the global zone lacks our bundle; publishing it again");
                unpublished = true;
            }
        }
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
            unpublished |= bundle.roots() != published.as_slice();
            // Signed by the root that signs now, which readers already
            // trust: the old one while the new is only published, then the
            // new one, which they hold by then.
            let signed = match unpublished {
                // With the endorsements that lead a reader who pins only
                // the first root to this one.
                true => Some(fedmesh_zone::client::signed_bundle(
                    &keys,
                    &bundle,
                    a.active(),
                    signed_seq,
                    JoinDir::endorsements(&join_dir),
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
                    published = bundle.roots().to_vec();
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

/// Puts the cluster's newest signed record back at `clusters/<cluster>`
/// when etcd has none, or one the anchor did not sign, or an older one. A
/// newer one, or a signed deletion at least as new, stays.
async fn heal_record(etcd: &mut Client, keys: &KeySpace, own: &OwnRecord, anchor: &AnchorPublic) {
    let key = keys.cluster(&own.cluster);
    let subject = format!("clusters/{}", own.cluster);
    // The records of the last good view only: they come first.
    let view = own.last_good.as_deref().and_then(|path| {
        DumpReader::open(path, keys.prefix())
            .and_then(|mut r| r.records())
            .ok()
    });
    let stored_in_view = |k: &str| {
        let kv = view.as_ref()?.iter().find(|r| r.key == k)?;
        Some(kv.value.clone())
    };
    // The anchor chain (a rotated anchor) from the last good view, else
    // from etcd: records count from its newest key.
    let chain = match stored_in_view(&keys.anchor_chain()) {
        Some(raw) => Some(raw),
        None => etcd
            .get(keys.anchor_chain(), None)
            .await
            .ok()
            .and_then(|r| r.kvs().first().map(|kv| kv.value().to_vec())),
    };
    let current = chain
        .and_then(|raw| current_anchor(std::slice::from_ref(anchor), &raw).ok())
        .map_or_else(|| anchor.clone(), |(_, k)| k);
    let anchors = std::slice::from_ref(&current);
    // (seq, whether it registers) of a value the anchor signed.
    let open = |raw: &[u8]| {
        open_anchored::<serde_json::Value>(raw, &subject, anchors)
            .ok()
            .map(|o| (o.seq, o.value.is_some()))
    };
    let from_view = stored_in_view(&key);
    let kept = JoinDir::signed_record(&own.join_dir)
        .into_iter()
        .chain(from_view)
        .filter_map(|raw| {
            open(&raw)
                .filter(|(_, live)| *live)
                .map(|(seq, _)| (seq, raw))
        })
        .max_by_key(|(seq, _)| *seq);
    let Some((ours, raw)) = kept else { return };
    let stored = match etcd.get(key.as_str(), None).await {
        Ok(r) => r.kvs().first().map(|kv| kv.value().to_vec()),
        Err(_) => return, // etcd away: next time
    };
    if stored
        .as_deref()
        .and_then(open)
        .is_some_and(|(theirs, _)| theirs >= ours)
    {
        return;
    }
    match etcd.put(key.as_str(), raw, None).await {
        Ok(_) => tracing::info!(%key, "wrote the cluster's signed record back"),
        Err(e) => tracing::warn!(%key, error = %e, "writing the cluster's record back failed"),
    }
}

/// Whether etcd holds `bundle`, signed by one of its own roots.
async fn holds_our_bundle(etcd: &mut Client, keys: &KeySpace, bundle: &Bundle) -> bool {
    let key = keys.bundle(bundle.trust_domain().as_str());
    let Ok(resp) = etcd.get(key.as_str(), None).await else {
        return true; // etcd away: nothing to tell
    };
    let Some(raw) = resp.kvs().first().map(|kv| kv.value().to_vec()) else {
        return false;
    };
    let trusted: Vec<String> = bundle.roots().iter().filter_map(root_keyid).collect();
    let subject = key.strip_prefix(keys.prefix()).unwrap_or(&key);
    open_by_root::<serde_json::Value>(&raw, subject, &trusted, bundle.roots())
        .ok()
        .and_then(|o| o.value)
        .and_then(|doc| {
            Bundle::from_document(
                bundle.trust_domain().clone(),
                doc.to_string().as_bytes(),
                &key,
            )
            .ok()
        })
        .is_some_and(|b| b.roots() == bundle.roots())
}

/// Logs `msg` unless it is what was logged last: a bad staged CA is looked
/// at every second.
fn warn_once(last: &mut String, msg: String) {
    if *last != msg {
        tracing::warn!("{msg}");
        *last = msg;
    }
}
