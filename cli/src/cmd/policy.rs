//! `fedmesh apply | diff | delete policy | history policy | rollback policy`
//! and `fedmesh get policies`: the global traffic policy in etcd.
//!
//! Every command that writes reads all policies at one revision, checks the
//! whole resulting set (each document, then at most one default and one
//! policy per service), and writes in one etcd transaction that fails if
//! any policy changed after the read: all or nothing, and a concurrent
//! change is refused, never overwritten.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use fedmesh_api::policy::{GlobalTrafficPolicy, check_set, parse_documents};
use fedmesh_zone::{GlobalZone, PolicyChange, StoredPolicies};
use serde::Serialize;

use super::get::{Output, print_rows};
use super::{EtcdFlags, connect};

/// Reads and checks every document of every file: nothing is sent to etcd
/// unless all of them pass.
pub fn load_files(files: &[PathBuf]) -> anyhow::Result<Vec<GlobalTrafficPolicy>> {
    let mut out: Vec<(GlobalTrafficPolicy, String)> = Vec::new();
    for f in files {
        let origin = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {origin}"))?;
        for p in parse_documents(&text, &origin).map_err(anyhow::Error::msg)? {
            if let Some((_, first)) = out.iter().find(|(q, _)| q.metadata.name == p.metadata.name) {
                bail!(
                    "{origin}: policy {:?} is also in {first}; apply each policy once",
                    p.metadata.name
                );
            }
            out.push((p, origin.clone()));
        }
    }
    Ok(out.into_iter().map(|(p, _)| p).collect())
}

/// What applying `new` to what etcd holds would change.
fn plan(stored: &StoredPolicies, new: &[GlobalTrafficPolicy]) -> anyhow::Result<Vec<PolicyChange>> {
    let changes: Vec<PolicyChange> = new
        .iter()
        .filter(|p| {
            stored
                .policies
                .get(&p.metadata.name)
                .is_none_or(|s| s.policy.as_ref().ok() != Some(*p))
        })
        .cloned()
        .map(|p| PolicyChange::Put(Box::new(p)))
        .collect();
    check_after(stored, &changes)?;
    Ok(changes)
}

/// Checks the set of policies etcd would hold after `changes`.
fn check_after(stored: &StoredPolicies, changes: &[PolicyChange]) -> anyhow::Result<()> {
    let mut after: BTreeMap<&str, &GlobalTrafficPolicy> = stored
        .policies
        .iter()
        .filter_map(|(n, s)| Some((n.as_str(), s.policy.as_ref().ok()?)))
        .collect();
    for c in changes {
        match c {
            PolicyChange::Put(p) => after.insert(&p.metadata.name, p),
            PolicyChange::Delete(n) => after.remove(n.as_str()),
        };
    }
    check_set(after.iter().map(|(n, p)| (*n, &p.spec))).map_err(anyhow::Error::msg)
}

fn yaml(p: &GlobalTrafficPolicy) -> String {
    serde_saphyr::to_string(p).unwrap_or_default()
}

/// A unified diff of one policy, `old` to `new` (either may be absent).
fn render_diff(name: &str, old: Option<&str>, new: Option<&str>) -> String {
    let diff = similar::TextDiff::from_lines(old.unwrap_or(""), new.unwrap_or(""));
    let mut out = String::new();
    let header = |side: Option<&str>, which: &str| match side {
        Some(_) => format!("{which}/policies/{name}"),
        None => "/dev/null".to_string(),
    };
    out.push_str(
        &diff
            .unified_diff()
            .context_radius(3)
            .header(&header(old, "a"), &header(new, "b"))
            .to_string(),
    );
    out
}

fn describe(stored: &StoredPolicies, changes: &[PolicyChange]) -> String {
    let mut out = String::new();
    for c in changes {
        let old = stored.policies.get(c.name()).map(|s| match &s.policy {
            Ok(p) => yaml(p),
            Err(e) => format!("# unreadable: {e}\n"),
        });
        let new = match c {
            PolicyChange::Put(p) => Some(yaml(p)),
            PolicyChange::Delete(_) => None,
        };
        out.push_str(&render_diff(c.name(), old.as_deref(), new.as_deref()));
    }
    out
}

fn verb(stored: &StoredPolicies, c: &PolicyChange) -> &'static str {
    match c {
        PolicyChange::Delete(_) => "deleted",
        PolicyChange::Put(_) if stored.policies.contains_key(c.name()) => "configured",
        PolicyChange::Put(_) => "created",
    }
}

async fn write(
    zone: &mut GlobalZone,
    stored: &StoredPolicies,
    changes: &[PolicyChange],
) -> anyhow::Result<i64> {
    zone.write_policies(stored, changes)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub async fn apply(files: &[PathBuf], dry_run: bool, flags: &EtcdFlags) -> anyhow::Result<()> {
    let new = load_files(files)?;
    let mut zone = connect(flags).await?;
    let stored = zone.policies().await?;
    let changes = plan(&stored, &new)?;
    if dry_run {
        print!("{}", describe(&stored, &changes));
        for c in &changes {
            println!(
                "policy/{} would be {} (dry run)",
                c.name(),
                verb(&stored, c)
            );
        }
        return Ok(());
    }
    let revision = if changes.is_empty() {
        stored.revision
    } else {
        write(&mut zone, &stored, &changes).await?
    };
    for p in &new {
        let how = changes
            .iter()
            .find(|c| c.name() == p.metadata.name)
            .map_or("unchanged", |c| verb(&stored, c));
        println!("policy/{} {how}", p.metadata.name);
    }
    if !changes.is_empty() {
        println!("revision {revision}: `fedmesh get proxies` shows which proxies run it");
    }
    Ok(())
}

/// Prints what `apply` would change; `Ok(true)` when something would.
pub async fn diff(files: &[PathBuf], flags: &EtcdFlags) -> anyhow::Result<bool> {
    let new = load_files(files)?;
    let mut zone = connect(flags).await?;
    let stored = zone.policies().await?;
    let changes = plan(&stored, &new)?;
    print!("{}", describe(&stored, &changes));
    Ok(!changes.is_empty())
}

pub async fn delete(name: &str, flags: &EtcdFlags) -> anyhow::Result<()> {
    let mut zone = connect(flags).await?;
    let stored = zone.policies().await?;
    if !stored.policies.contains_key(name) {
        bail!("policy {name:?} does not exist (`fedmesh get policies` lists them)");
    }
    let revision = write(&mut zone, &stored, &[PolicyChange::Delete(name.into())]).await?;
    println!("policy/{name} deleted (revision {revision})");
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PolicyRow {
    name: String,
    /// `ok`, or why the stored value is not believed (`get policies`).
    #[serde(skip_serializing_if = "str::is_empty")]
    trust: &'static str,
    revision: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<GlobalTrafficPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn summary(p: &GlobalTrafficPolicy) -> String {
    let s = &p.spec;
    let mut parts = Vec::new();
    if let Some(w) = &s.weights {
        let w: Vec<String> = w.iter().map(|(c, v)| format!("{c}:{v}")).collect();
        parts.push(format!("weights {}", w.join(",")));
    }
    if let Some(r) = &s.routes {
        parts.push(format!("{} routes", r.len()));
    }
    if let Some(a) = s.export.as_ref().and_then(|e| e.allow.as_ref()) {
        parts.push(format!("{} allow rules", a.len()));
    }
    if let Some(f) = &s.failover {
        parts.push(format!(
            "failover {}",
            serde_json::to_string(f).unwrap_or_default()
        ));
    }
    parts.join("; ")
}

pub async fn get(name: Option<&str>, output: Output, flags: &EtcdFlags) -> anyhow::Result<()> {
    let mut zone = connect(flags).await?;
    let stored = zone.policies().await?;
    if let Some(n) = name
        && !stored.policies.contains_key(n)
    {
        bail!("policy {n:?} does not exist");
    }
    let rows: Vec<PolicyRow> = stored
        .policies
        .into_iter()
        .filter(|(n, _)| name.is_none_or(|x| x == n))
        .map(|(name, s)| {
            let (policy, error) = match s.policy {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            };
            PolicyRow {
                name,
                trust: s.trust,
                revision: s.mod_revision,
                policy,
                error,
            }
        })
        .collect();
    if let (Output::Yaml, Some(_)) = (output, name) {
        // One policy as YAML is a document `apply -f` takes back.
        if let Some(p) = rows.first().and_then(|r| r.policy.as_ref()) {
            print!("{}", yaml(p));
            return Ok(());
        }
    }
    print_rows(
        output,
        &rows,
        &["NAME", "TRUST", "SERVICE", "REVISION", "SUMMARY"],
        |r| match &r.policy {
            Some(p) => vec![
                r.name.clone(),
                r.trust.into(),
                p.spec.service.clone(),
                r.revision.to_string(),
                summary(p),
            ],
            None => vec![
                r.name.clone(),
                r.trust.into(),
                "?".into(),
                r.revision.to_string(),
                format!("UNREADABLE: {}", r.error.as_deref().unwrap_or("")),
            ],
        },
    )
}

pub async fn history(name: &str, output: Output, flags: &EtcdFlags) -> anyhow::Result<()> {
    let mut zone = connect(flags).await?;
    let h = zone.policy_history(name).await?;
    if h.entries.is_empty() && h.compacted_before.is_none() {
        bail!("policy {name:?} has no history: it never existed");
    }
    let rows: Vec<PolicyRow> = h
        .entries
        .iter()
        .map(|e| PolicyRow {
            name: name.into(),
            trust: "",
            revision: e.revision,
            policy: e.policy.clone().and_then(Result::ok),
            error: match &e.policy {
                None => Some("deleted".into()),
                Some(Err(err)) => Some(err.clone()),
                Some(Ok(_)) => None,
            },
        })
        .collect();
    print_rows(
        output,
        &rows,
        &["REVISION", "CHANGE", "SUMMARY"],
        |r| match &r.policy {
            Some(p) => vec![r.revision.to_string(), "applied".into(), summary(p)],
            None => vec![
                r.revision.to_string(),
                match r.error.as_deref() {
                    Some("deleted") => "deleted".into(),
                    _ => "unreadable".into(),
                },
                r.error.clone().unwrap_or_default(),
            ],
        },
    )?;
    if let Some(c) = h.compacted_before {
        eprintln!("etcd has compacted revisions before {c}: older history is gone");
    }
    Ok(())
}

pub async fn rollback(name: &str, to: i64, flags: &EtcdFlags) -> anyhow::Result<()> {
    let mut zone = connect(flags).await?;
    let old = match zone.policy_at(name, to).await {
        Ok(v) => v,
        Err(e) if e.to_string().contains("compacted") => bail!(
            "revision {to} of policy {name:?} is gone: etcd has compacted it (`fedmesh history policy {name}` shows what is left)"
        ),
        Err(e) => return Err(e.into()),
    };
    let stored = zone.policies().await?;
    let change = match old {
        Some(Ok(p)) => PolicyChange::Put(Box::new(p)),
        Some(Err(e)) => bail!("revision {to} of policy {name:?} is not a valid policy: {e}"),
        None if stored.policies.contains_key(name) => PolicyChange::Delete(name.into()),
        None => bail!("policy {name:?} did not exist at revision {to}, and does not now"),
    };
    if stored.policies.get(name).map(|s| s.policy.as_ref().ok())
        == Some(match &change {
            PolicyChange::Put(p) => Some(p),
            PolicyChange::Delete(_) => None,
        })
    {
        println!("policy/{name} unchanged: it is already as at revision {to}");
        return Ok(());
    }
    check_after(&stored, std::slice::from_ref(&change))?;
    print!("{}", describe(&stored, std::slice::from_ref(&change)));
    let revision = write(&mut zone, &stored, &[change]).await?;
    println!("policy/{name} rolled back to revision {to} (now revision {revision})");
    Ok(())
}
