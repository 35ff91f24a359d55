//! `fedmesh get clusters|services|bundles`.

use clap::ValueEnum;
use serde::Serialize;

use fedmesh_api::KeySpace;
use fedmesh_zone::Believed;
use fedmesh_zone::gate::Kind;

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
    trust: String,
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
    trust: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BundleRow {
    trust_domain: String,
    roots: usize,
    sequence: u64,
    document: serde_json::Value,
    trust: String,
}

/// `ok`, or why the value stored now is not believed (the row shows the
/// last believed one): `FORGED`, `UNSIGNED`, `ROLLBACK`, `INVALID`,
/// `BUDGET`.
fn trust(believed: &Believed, key: &str) -> String {
    believed
        .refused
        .get(key)
        .map_or("ok", |r| r.refusal.label())
        .to_owned()
}

/// Says, on stderr, which stored values of `kinds` are not believed at
/// all, and why: a forged key that never held a believed value has no row.
fn report_refused(believed: &Believed, kinds: &[Kind], shown: &[String]) {
    for (key, r) in &believed.refused {
        if kinds.contains(&r.kind) && !shown.contains(key) {
            eprintln!("not believed: {key}: {}", r.refusal);
        }
    }
}

pub async fn get(what: GetWhat, output: Output, flags: &EtcdFlags) -> anyhow::Result<()> {
    let show = match what {
        GetWhat::Policies => return super::policy::get(None, output, flags).await,
        GetWhat::Proxies => anyhow::bail!("`get proxies` needs its controllers' admin ports"),
        GetWhat::Clusters => clusters,
        GetWhat::Services => services,
        GetWhat::Bundles => bundles,
    };
    let mut zone = connect(flags).await?;
    let keys = zone.keys().clone();
    show(&zone.believed().await?, &keys, output)
}

/// `get clusters`: records, liveness, trust.
fn clusters(believed: &Believed, keys: &KeySpace, output: Output) -> anyhow::Result<()> {
    let records = believed.clusters()?;
    let liveness = believed.liveness(&records, time::OffsetDateTime::now_utc())?;
    let rows: Vec<ClusterRow> = records
        .into_iter()
        .zip(liveness)
        .map(|(record, liveness)| ClusterRow {
            trust: trust(believed, &keys.cluster(&record.name)),
            record,
            liveness,
        })
        .collect();
    let shown: Vec<String> = rows.iter().map(|r| keys.cluster(&r.record.name)).collect();
    report_refused(believed, &[Kind::Cluster, Kind::Manifest], &shown);
    print_rows(
        output,
        &rows,
        &[
            "NAME",
            "TRUST",
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
             trust,
         }| {
            vec![
                c.name.clone(),
                trust.clone(),
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

/// `get services`: every believed export.
fn services(believed: &Believed, keys: &KeySpace, output: Output) -> anyhow::Result<()> {
    let rows: Vec<ServiceRow> = believed
        .exports()?
        .into_iter()
        .map(|(cluster, namespace, service, s)| ServiceRow {
            trust: trust(believed, &keys.export(&cluster, &namespace, &service)),
            cluster,
            namespace,
            service,
            ports: s.ports.clone(),
            healthy: s.healthy(),
            total: s.localities.iter().map(|l| u64::from(l.total)).sum(),
            generation: s.generation,
        })
        .collect();
    let shown: Vec<String> = rows
        .iter()
        .map(|r| keys.export(&r.cluster, &r.namespace, &r.service))
        .collect();
    report_refused(believed, &[Kind::Export], &shown);
    print_rows(
        output,
        &rows,
        &[
            "CLUSTER",
            "NAMESPACE",
            "SERVICE",
            "TRUST",
            "PORTS",
            "HEALTHY",
        ],
        |r| {
            vec![
                r.cluster.clone(),
                r.namespace.clone(),
                r.service.clone(),
                r.trust.clone(),
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

/// `get bundles`.
fn bundles(believed: &Believed, keys: &KeySpace, output: Output) -> anyhow::Result<()> {
    let rows: Vec<BundleRow> = believed
        .bundles()?
        .into_iter()
        .map(|b| BundleRow {
            trust: trust(believed, &keys.bundle(b.trust_domain().as_str())),
            trust_domain: b.trust_domain().to_string(),
            roots: b.roots().len(),
            sequence: b.sequence,
            document: serde_json::from_str(&b.to_document()).unwrap_or_default(),
        })
        .collect();
    let shown: Vec<String> = rows.iter().map(|r| keys.bundle(&r.trust_domain)).collect();
    report_refused(believed, &[Kind::Bundle], &shown);
    print_rows(
        output,
        &rows,
        &["TRUST DOMAIN", "TRUST", "ROOTS", "SEQUENCE"],
        |r| {
            vec![
                r.trust_domain.clone(),
                r.trust.clone(),
                r.roots.to_string(),
                r.sequence.to_string(),
            ]
        },
    )
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
