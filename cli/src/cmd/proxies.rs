//! `fedmesh get proxies`: what every connected proxy and gateway of every
//! cluster runs, from each controller's `/clients` (the version it
//! acknowledged, the policy revisions in it, its last NACK), set against
//! the policies etcd holds now: config skew, visible.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::get::{Output, print_rows};
use super::{EtcdFlags, connect};
use crate::up::probe;

/// One client, as its controller reports it (`ClientStatus`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Client {
    #[serde(default)]
    pub cluster: String,
    pub node: String,
    pub identity: String,
    pub sent_version: String,
    pub acked_version: String,
    pub policies: BTreeMap<String, i64>,
    #[serde(default)]
    pub skipped: Option<String>,
    #[serde(default)]
    pub last_nack: Option<String>,
    /// Whether it runs exactly the policies etcd holds now.
    #[serde(default)]
    pub current: Option<bool>,
}

/// Every client of the controllers at `admins` (cluster, admin address).
pub async fn clients(admins: &[(String, SocketAddr)]) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::new();
    for (cluster, addr) in admins {
        let (status, body) = probe::get(*addr, "admin", "/clients", Duration::from_secs(2))
            .await
            .map_err(|e| anyhow::anyhow!("controller of {cluster} at {addr}: {e:#}"))?;
        anyhow::ensure!(
            status == 200,
            "controller of {cluster} at {addr}: /clients answered {status}"
        );
        let mut cs: Vec<Client> = serde_json::from_str(&body)
            .map_err(|e| anyhow::anyhow!("controller of {cluster} at {addr}: /clients: {e}"))?;
        for c in &mut cs {
            c.cluster = cluster.clone();
        }
        out.extend(cs);
    }
    Ok(out)
}

pub async fn get(
    admins: &[(String, SocketAddr)],
    output: Output,
    flags: &EtcdFlags,
) -> anyhow::Result<()> {
    let mut rows = clients(admins).await?;
    // Without etcd the table still shows what each client runs.
    let stored = match connect(flags).await {
        Ok(mut zone) => Some(zone.policies().await?),
        Err(e) => {
            eprintln!("(etcd not reachable, so CURRENT is unknown: {e:#})");
            None
        }
    };
    if let Some(s) = &stored {
        let now: BTreeMap<String, i64> = s
            .policies
            .iter()
            .filter(|(_, p)| p.policy.is_ok())
            .map(|(n, p)| (n.clone(), p.mod_revision))
            .collect();
        for r in &mut rows {
            r.current = Some(r.policies == now && r.acked_version == r.sent_version);
        }
    }
    rows.sort_by(|a, b| (&a.cluster, &a.node).cmp(&(&b.cluster, &b.node)));
    print_rows(
        output,
        &rows,
        &[
            "CLUSTER",
            "NODE",
            "ACKED",
            "POLICIES",
            "CURRENT",
            "LAST NACK",
        ],
        |r| {
            let policies: Vec<String> =
                r.policies.iter().map(|(n, v)| format!("{n}@{v}")).collect();
            vec![
                r.cluster.clone(),
                r.node.clone(),
                if r.acked_version == r.sent_version {
                    r.acked_version.clone()
                } else {
                    format!("{} (sent {})", r.acked_version, r.sent_version)
                },
                policies.join(","),
                r.current
                    .map_or("?".into(), |c| if c { "yes" } else { "NO" }.to_string()),
                r.last_nack.clone().unwrap_or_default(),
            ]
        },
    )
}
