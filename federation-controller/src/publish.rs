//! Publishing this cluster into the global zone: per-zone export summaries,
//! written only when they change, with `seen/<cluster>`, the manifest the
//! controller signs for them (which also dates its liveness); and the
//! `alive/<cluster>` key on a lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use fedmesh_api::retry::Backoff;
use fedmesh_api::{
    AliveRecord, ExportSummary, GlobalKey, KeySpace, LocalServices, SeenRecord, ServiceKey,
    ZoneCapacity,
};
use fedmesh_seal::manifest::digest_hex;
use fedmesh_seal::{
    ExportManifest, ExportSet, Signer, Statement, next_seq, open_by_svid, seal, value_digest,
};
use fedmesh_trust::{Bundle, SpiffeId, Svid};
use tokio::sync::watch;

use fedmesh_zone::{Pager, list_range};

/// Per-zone capacity of every local service; the generation is left at 0
/// for the publisher to fill in. Pure: the same services give the same
/// summaries, so an unchanged registry never causes a write.
pub fn summarize(local: &LocalServices) -> BTreeMap<ServiceKey, ExportSummary> {
    local
        .iter()
        .map(|(key, svc)| {
            let mut zones: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
            for ep in &svc.endpoints {
                let z = zones.entry(ep.zone.as_str()).or_default();
                z.1 += 1;
                if ep.healthy {
                    z.0 += 1;
                }
            }
            let localities = zones
                .into_iter()
                .map(|(zone, (healthy, total))| ZoneCapacity {
                    zone: zone.to_owned(),
                    healthy,
                    total,
                    weight: healthy,
                })
                .collect();
            let summary = ExportSummary {
                ports: svc.ports.clone(),
                localities,
                generation: 0,
            };
            (key.clone(), summary)
        })
        .collect()
}

/// What has to be written to move the global zone from `written` to
/// `desired`: puts (with their new generation) and deletes.
pub fn plan(
    written: &BTreeMap<ServiceKey, ExportSummary>,
    desired: &BTreeMap<ServiceKey, ExportSummary>,
) -> (Vec<(ServiceKey, ExportSummary)>, Vec<ServiceKey>) {
    let puts = desired
        .iter()
        .filter_map(|(k, want)| match written.get(k) {
            Some(have) if have.same_content(want) => None,
            have => Some((
                k.clone(),
                ExportSummary {
                    generation: have.map_or(1, |h| h.generation + 1),
                    ..want.clone()
                },
            )),
        })
        .collect();
    let deletes = written
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    (puts, deletes)
}

#[derive(Debug, Default)]
pub struct PublishStats {
    pub writes: AtomicU64,
    pub etcd_errors: AtomicU64,
}

/// Exports per transaction: etcd's default `--max-txn-ops` is 128, and the
/// manifest rides in the same transaction.
pub const TXN_EXPORTS: usize = 120;

#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("{0}")]
    Seal(#[from] fedmesh_seal::SealError),
}

/// What this cluster has in the global zone, as last read or written.
struct Published {
    written: BTreeMap<ServiceKey, ExportSummary>,
    /// Digests of the export values as they are in etcd.
    set: ExportSet,
    /// The sequence of our last manifest readers may hold.
    seq: Option<u64>,
}

/// Who signs the manifest: the controller's own SVID, checked against its
/// own bundle when our last manifest is read back.
#[derive(Debug)]
pub struct ManifestSigner {
    pub svid: watch::Receiver<Arc<Svid>>,
    pub own_bundle: watch::Receiver<Bundle>,
}

/// Keeps `exports/<cluster>/…` equal to the summaries of `local`, each
/// change written in one transaction with the cluster's signed manifest
/// (`seen/<cluster>`, `fedmesh_seal::manifest`). Starts by reading what
/// this cluster published before, so a restart rewrites nothing that is
/// unchanged and generations keep increasing. Every
/// [`SeenRecord::INTERVAL`] it reads its keys again, rewrites what someone
/// else changed or deleted (and so heals a wiped or restored etcd), and
/// signs the manifest anew, which dates the cluster's liveness.
pub async fn run_exports(
    mut client: Client,
    keys: KeySpace,
    cluster: String,
    mut local: watch::Receiver<Arc<LocalServices>>,
    signer: ManifestSigner,
    stats: Arc<PublishStats>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut published: Option<Published> = None;
    let mut heartbeat = true;
    loop {
        let result = async {
            let p = match &mut published {
                Some(p) => p,
                None => published.insert(read_own(&mut client, &keys, &cluster, &signer).await?),
            };
            let desired = summarize(&local.borrow_and_update());
            let (puts, deletes) = plan(&p.written, &desired);
            let changes: Vec<(ServiceKey, Option<ExportSummary>)> = puts
                .into_iter()
                .map(|(k, s)| (k, Some(s)))
                .chain(deletes.into_iter().map(|k| (k, None)))
                .collect();
            write(
                &mut client,
                &keys,
                &cluster,
                p,
                changes,
                heartbeat,
                &signer,
                &stats,
            )
            .await
        }
        .await;
        match result {
            Ok(()) => {
                backoff.reset();
                heartbeat = false;
                tokio::select! {
                    r = local.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(SeenRecord::INTERVAL) => {
                        // Read our keys again: someone may have changed them.
                        published = None;
                        heartbeat = true;
                    }
                }
            }
            Err(error) => {
                // What we hold may not be what etcd holds: read it again.
                published = None;
                stats.etcd_errors.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next(fastrand::f64());
                tracing::warn!(%error, retry_in = ?wait, "publishing exports failed; will retry");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Writes `changes` in transactions of at most [`TXN_EXPORTS`], each with
/// the manifest of the set it leaves; with none, the manifest alone when
/// `heartbeat` asks for it.
#[allow(clippy::too_many_arguments)]
async fn write(
    client: &mut Client,
    keys: &KeySpace,
    cluster: &str,
    p: &mut Published,
    changes: Vec<(ServiceKey, Option<ExportSummary>)>,
    heartbeat: bool,
    signer: &ManifestSigner,
    stats: &PublishStats,
) -> Result<(), PublishError> {
    if changes.is_empty() && !heartbeat {
        return Ok(());
    }
    let seen_key = keys.seen(cluster);
    let mut chunks: Vec<&[(ServiceKey, Option<ExportSummary>)]> =
        changes.chunks(TXN_EXPORTS).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for chunk in chunks {
        let mut ops = Vec::with_capacity(chunk.len() + 1);
        let mut listed = BTreeMap::new();
        for (k, summary) in chunk {
            let key = keys.export(cluster, &k.namespace, &k.name);
            let service = k.to_string();
            match summary {
                Some(s) => {
                    let bytes = serde_json::to_vec(s).unwrap_or_default();
                    let digest = value_digest(&bytes);
                    listed.insert(service.clone(), Some(digest_hex(&digest)));
                    p.set.insert(service, digest);
                    ops.push(TxnOp::put(key, bytes, None));
                }
                None => {
                    listed.insert(service.clone(), None);
                    p.set.remove(&service);
                    ops.push(TxnOp::delete(key, None));
                }
            }
        }
        let seq = next_seq(SystemTime::now(), p.seq);
        let manifest = p.set.manifest(p.seq.unwrap_or(0), listed);
        let statement = Statement {
            subject: format!("seen/{cluster}"),
            seq,
            value: Some(manifest),
            x5c: vec![],
            endorsements: vec![],
        };
        let svid = signer.svid.borrow().clone();
        let envelope = seal(statement, Signer::Svid(&svid))?;
        ops.push(TxnOp::put(seen_key.as_str(), envelope.to_json(), None));
        client.txn(Txn::new().and_then(ops)).await?;
        p.seq = Some(seq);
        for (k, summary) in chunk {
            match summary {
                Some(s) => p.written.insert(k.clone(), s.clone()),
                None => p.written.remove(k),
            };
        }
        stats
            .writes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// What this cluster has in etcd: its exports, with the digests of their
/// bytes as stored, and the sequence of its last manifest when that
/// verifies against our own bundle (a forged one is not followed).
async fn read_own(
    client: &mut Client,
    keys: &KeySpace,
    cluster: &str,
    signer: &ManifestSigner,
) -> Result<Published, etcd_client::Error> {
    let mut kvs = Vec::new();
    let mut revision = 0;
    list_range(
        client,
        &keys.exports_of(cluster),
        &mut revision,
        &mut Pager::default(),
        &mut kvs,
    )
    .await?;
    let mut written = BTreeMap::new();
    let mut set = ExportSet::default();
    for kv in kvs {
        let Some(GlobalKey::Export {
            namespace, service, ..
        }) = keys.parse(&kv.key)
        else {
            continue;
        };
        let key = ServiceKey::new(&namespace, &service);
        set.insert(key.to_string(), value_digest(&kv.value));
        // An unreadable value (someone else's) is simply rewritten; one
        // rewritten with other content differs from what we want, and is too.
        let summary = serde_json::from_slice::<ExportSummary>(&kv.value).unwrap_or(ExportSummary {
            ports: vec![],
            localities: vec![],
            generation: 0,
        });
        written.insert(key, summary);
    }
    let seen = client
        .get(
            keys.seen(cluster),
            Some(GetOptions::new().with_revision(revision)),
        )
        .await?;
    let seq = seen.kvs().first().and_then(|kv| {
        let bundle = signer.own_bundle.borrow().clone();
        let td = bundle.trust_domain().clone();
        let me = SpiffeId::controller(&td, cluster).ok()?;
        let subject = format!("seen/{cluster}");
        open_by_svid::<ExportManifest>(kv.value(), &subject, &me, &bundle, SystemTime::now())
            .ok()
            .map(|o| o.seq)
    });
    Ok(Published { written, set, seq })
}

/// Keeps `alive/<cluster>` on a lease of `ttl`, renewed every third of it.
/// When the lease is lost (etcd outage longer than the TTL) a new one is
/// granted and the key written again. Ends when `stop` fires.
pub async fn run_alive(
    mut client: Client,
    keys: KeySpace,
    cluster: String,
    record: AliveRecord,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let value = serde_json::to_vec(&record).unwrap_or_default();
    let key = keys.alive(&cluster);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    loop {
        let session = async {
            let lease = client.lease_grant(ttl_secs, None).await?.id();
            client
                .put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
            // `seen`, which dates our liveness once the lease has lapsed,
            // is the signed manifest `run_exports` rewrites.
            loop {
                keeper.keep_alive().await?;
                match responses.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<_, etcd_client::Error>(()), // lease expired
                }
                tokio::time::sleep(ttl / 3).await;
            }
        };
        tokio::select! {
            r = session => {
                if let Err(error) = r {
                    tracing::warn!(%error, "liveness lease lost; re-granting");
                }
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next(fastrand::f64())) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedmesh_api::{Endpoint, LocalService};

    fn local(healthy_az1: usize) -> LocalServices {
        let mut endpoints = Vec::new();
        for i in 0..3 {
            endpoints.push(Endpoint {
                address: format!("127.0.1.{}:8080", 10 + i).parse().unwrap(),
                zone: "az1".into(),
                healthy: i < healthy_az1,
            });
        }
        endpoints.push(Endpoint {
            address: "127.0.1.20:8080".parse().unwrap(),
            zone: "az2".into(),
            healthy: true,
        });
        LocalServices::from([(
            ServiceKey::new("shop", "cart"),
            LocalService {
                ports: vec![8080],
                endpoints,
            },
        )])
    }

    #[test]
    fn summaries_count_healthy_and_total_per_zone() {
        let s = &summarize(&local(2))[&ServiceKey::new("shop", "cart")];
        assert_eq!(s.localities.len(), 2);
        assert_eq!((s.localities[0].healthy, s.localities[0].total), (2, 3));
        assert_eq!((s.localities[1].healthy, s.localities[1].total), (1, 1));
    }

    #[test]
    fn only_real_changes_are_written_with_increasing_generations() {
        let mut written = BTreeMap::new();
        let (puts, dels) = plan(&written, &summarize(&local(3)));
        assert_eq!((puts.len(), dels.len()), (1, 0));
        assert_eq!(puts[0].1.generation, 1);
        written.extend(puts);

        // Same registry: nothing to write.
        assert_eq!(plan(&written, &summarize(&local(3))), (vec![], vec![]));

        // One endpoint turns unhealthy: one write, next generation.
        let (puts, _) = plan(&written, &summarize(&local(2)));
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].1.generation, 2);
        written.extend(puts);

        // The service disappears: one delete.
        let (puts, dels) = plan(&written, &BTreeMap::new());
        assert!(puts.is_empty());
        assert_eq!(dels, vec![ServiceKey::new("shop", "cart")]);
    }
}
