//! Publishing this cluster into the global zone: per-zone export summaries,
//! written only when they change, the `alive/<cluster>` key on a lease, and
//! `seen/<cluster>`, which dates that liveness.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use fedmesh_api::retry::Backoff;
use fedmesh_api::{
    AliveRecord, ExportSummary, GlobalKey, KeySpace, LocalServices, SeenRecord, ServiceKey,
    ZoneCapacity,
};
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

/// Keeps `exports/<cluster>/…` equal to the summaries of `local`. Starts by
/// reading what this cluster published before, so a restart rewrites nothing
/// that is unchanged and generations keep increasing.
pub async fn run_exports(
    mut client: Client,
    keys: KeySpace,
    cluster: String,
    mut local: watch::Receiver<Arc<LocalServices>>,
    stats: Arc<PublishStats>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut written: Option<BTreeMap<ServiceKey, ExportSummary>> = None;
    loop {
        let result = async {
            let written = match &mut written {
                Some(w) => w,
                None => written.insert(read_own(&mut client, &keys, &cluster).await?),
            };
            let desired = summarize(&local.borrow_and_update());
            let (puts, deletes) = plan(written, &desired);
            for (k, s) in puts {
                let key = keys.export(&cluster, &k.namespace, &k.name);
                client
                    .put(key, serde_json::to_vec(&s).unwrap_or_default(), None)
                    .await?;
                stats.writes.fetch_add(1, Ordering::Relaxed);
                written.insert(k, s);
            }
            for k in deletes {
                client
                    .delete(keys.export(&cluster, &k.namespace, &k.name), None)
                    .await?;
                stats.writes.fetch_add(1, Ordering::Relaxed);
                written.remove(&k);
            }
            Ok::<_, etcd_client::Error>(())
        }
        .await;
        match result {
            Ok(()) => {
                backoff.reset();
                if local.changed().await.is_err() {
                    return;
                }
            }
            Err(error) => {
                stats.etcd_errors.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next(fastrand::f64());
                tracing::warn!(%error, retry_in = ?wait, "publishing exports failed; will retry");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn read_own(
    client: &mut Client,
    keys: &KeySpace,
    cluster: &str,
) -> Result<BTreeMap<ServiceKey, ExportSummary>, etcd_client::Error> {
    let mut kvs = Vec::new();
    list_range(
        client,
        &keys.exports_of(cluster),
        &mut 0,
        &mut Pager::default(),
        &mut kvs,
    )
    .await?;
    let mut out = BTreeMap::new();
    for kv in kvs {
        let Some(GlobalKey::Export {
            namespace, service, ..
        }) = keys.parse(&kv.key)
        else {
            continue;
        };
        // An unreadable old summary is simply rewritten.
        let summary = serde_json::from_slice(&kv.value).unwrap_or(ExportSummary {
            ports: vec![],
            localities: vec![],
            generation: 0,
        });
        out.insert(ServiceKey::new(&namespace, &service), summary);
    }
    Ok(out)
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
    let (key, seen_key) = (keys.alive(&cluster), keys.seen(&cluster));
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
            // `seen` dates our last liveness for when the lease has lapsed;
            // it is on no lease, so it is rewritten on its own slow clock.
            let mut seen_due = tokio::time::Instant::now();
            loop {
                keeper.keep_alive().await?;
                match responses.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<_, etcd_client::Error>(()), // lease expired
                }
                if tokio::time::Instant::now() >= seen_due {
                    let seen = SeenRecord {
                        at: time::OffsetDateTime::now_utc(),
                    };
                    let raw = serde_json::to_vec(&seen).unwrap_or_default();
                    client.put(seen_key.as_str(), raw, None).await?;
                    seen_due += SeenRecord::INTERVAL;
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
