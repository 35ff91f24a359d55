//! `fedmesh get clusters|services|bundles`.

use clap::ValueEnum;
use serde::Serialize;

use super::{EtcdFlags, connect};

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum GetWhat {
    Clusters,
    Services,
    Bundles,
    /// Global traffic policies (`fedmesh get policies [NAME]`).
    Policies,
    /// Every connected proxy and gateway: the policies it runs, whether
    /// they are etcd's current ones, its last NACK.
    Proxies,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// A cluster's record with its liveness: `LIVE`, or `STALE` with the time
/// since its controller was last seen (it is still served).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterRow {
    #[serde(flatten)]
    record: fedmesh_api::ClusterRecord,
    liveness: fedmesh_api::Liveness,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceRow {
    cluster: String,
    namespace: String,
    service: String,
    ports: Vec<u16>,
    healthy: u64,
    total: u64,
    generation: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleRow {
    trust_domain: String,
    roots: usize,
    sequence: u64,
    document: serde_json::Value,
}

pub async fn get(what: GetWhat, output: Output, flags: &EtcdFlags) -> anyhow::Result<()> {
    let mut zone = connect(flags).await?;
    match what {
        GetWhat::Clusters => {
            let records = zone.clusters().await?;
            let liveness = zone
                .liveness(&records, time::OffsetDateTime::now_utc())
                .await?;
            let rows: Vec<ClusterRow> = records
                .into_iter()
                .zip(liveness)
                .map(|(record, liveness)| ClusterRow { record, liveness })
                .collect();
            print_rows(
                output,
                &rows,
                &[
                    "NAME",
                    "LIVENESS",
                    "CLOUD",
                    "REGION",
                    "ZONES",
                    "TRUST DOMAIN",
                    "GATEWAYS",
                    "EGRESS",
                ],
                |ClusterRow {
                     record: c,
                     liveness,
                 }| {
                    vec![
                        c.name.clone(),
                        liveness.to_string(),
                        c.cloud.clone(),
                        c.region.clone(),
                        c.zones.join(","),
                        c.trust_domain.clone(),
                        c.gateways
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        c.egress.to_string(),
                    ]
                },
            )
        }
        GetWhat::Services => {
            let rows: Vec<ServiceRow> = zone
                .exports()
                .await?
                .into_iter()
                .map(|(cluster, namespace, service, s)| ServiceRow {
                    cluster,
                    namespace,
                    service,
                    ports: s.ports.clone(),
                    healthy: s.healthy(),
                    total: s.localities.iter().map(|l| u64::from(l.total)).sum(),
                    generation: s.generation,
                })
                .collect();
            print_rows(
                output,
                &rows,
                &["CLUSTER", "NAMESPACE", "SERVICE", "PORTS", "HEALTHY"],
                |r| {
                    vec![
                        r.cluster.clone(),
                        r.namespace.clone(),
                        r.service.clone(),
                        r.ports
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        format!("{}/{}", r.healthy, r.total),
                    ]
                },
            )
        }
        GetWhat::Policies => super::policy::get(None, output, flags).await,
        GetWhat::Proxies => anyhow::bail!("`get proxies` needs its controllers' admin ports"),
        GetWhat::Bundles => {
            let rows: Vec<BundleRow> = zone
                .bundles()
                .await?
                .into_iter()
                .map(|b| BundleRow {
                    trust_domain: b.trust_domain().to_string(),
                    roots: b.roots().len(),
                    sequence: b.sequence,
                    document: serde_json::from_str(&b.to_document()).unwrap_or_default(),
                })
                .collect();
            print_rows(output, &rows, &["TRUST DOMAIN", "ROOTS", "SEQUENCE"], |r| {
                vec![
                    r.trust_domain.clone(),
                    r.roots.to_string(),
                    r.sequence.to_string(),
                ]
            })
        }
    }
}

pub(crate) fn print_rows<T: Serialize>(
    output: Output,
    rows: &[T],
    headers: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&rows)?),
        Output::Table => {
            let body: Vec<Vec<String>> = rows.iter().map(&cells).collect();
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for row in &body {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.len());
                }
            }
            let line = |cols: Vec<&str>| {
                let s: Vec<String> = cols
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", s.join("  ").trim_end());
            };
            line(headers.to_vec());
            for row in &body {
                line(row.iter().map(String::as_str).collect());
            }
            if body.is_empty() {
                eprintln!("(none)");
            }
        }
    }
    Ok(())
}
