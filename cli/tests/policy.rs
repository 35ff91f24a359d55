//! `fedmesh apply | diff | get policies | delete | history | rollback` as an
//! operator runs them, against a real etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::path::Path;
use std::process::{Command, Output};

use fedmesh_test_support::{Etcd, EtcdOptions};

fn fedmesh(args: &[&str], etcd: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .env("FEDMESH_ANCHOR_DIR", fedmesh_test_support::anchor_dir())
        .env("FEDMESH_ETCD", etcd)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn policy(name: &str, service: &str, body: &str) -> String {
    format!(
        "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {{name: {name}}}\nspec:\n  service: {service}\n{body}"
    )
}

fn write(dir: &Path, file: &str, docs: &[String]) -> String {
    let p = dir.join(file);
    std::fs::write(&p, docs.join("---\n")).unwrap();
    p.to_str().unwrap().to_owned()
}

async fn stored(etcd: &Etcd) -> Vec<(String, String)> {
    let resp = etcd
        .client()
        .await
        .unwrap()
        .get(
            "/fedmesh/v1/policies/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    // Each value is a statement the anchor signed; a deleted policy is a
    // signed deletion (`value: null`), which is not a policy.
    resp.kvs()
        .iter()
        .filter_map(|kv| {
            let key = kv.key_str().unwrap().to_owned();
            let subject = key.strip_prefix("/fedmesh/v1/").unwrap();
            let anchor = [fedmesh_test_support::anchor().public()];
            let opened =
                fedmesh_seal::open_anchored::<serde_json::Value>(kv.value(), subject, &anchor)
                    .unwrap();
            Some((key, opened.value?.to_string()))
        })
        .collect()
}

#[tokio::test]
async fn apply_diff_history_rollback_and_delete() {
    let etcd = Etcd::start().await.unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(
        dir.path(),
        "v1.yaml",
        &[
            policy(
                "checkout",
                "shop/checkout",
                "  weights: {aws: 90, gcp: 10}\n",
            ),
            policy("default", "\"*\"", "  retries: 1\n"),
        ],
    );

    // A dry run and a diff change nothing; diff says so with exit code 1.
    let dry = ok(&fedmesh(&["apply", "-f", &v1, "--dry-run"], &ep));
    assert!(
        dry.contains("+++ b/policies/checkout") && dry.contains("would be created"),
        "{dry}"
    );
    assert!(stored(&etcd).await.is_empty());
    let d = fedmesh(&["diff", "-f", &v1], &ep);
    assert_eq!(d.status.code(), Some(1), "{}", text(&d.stderr));
    assert!(
        text(&d.stdout).contains("+  service: shop/checkout"),
        "{}",
        text(&d.stdout)
    );

    let out = ok(&fedmesh(&["apply", "-f", &v1], &ep));
    assert!(
        out.contains("policy/checkout created") && out.contains("policy/default created"),
        "{out}"
    );
    assert_eq!(stored(&etcd).await.len(), 2);
    assert_eq!(fedmesh(&["diff", "-f", &v1], &ep).status.code(), Some(0));
    assert!(ok(&fedmesh(&["apply", "-f", &v1], &ep)).contains("policy/checkout unchanged"));

    // Change one: only it is written.
    let v2 = write(
        dir.path(),
        "v2.yaml",
        &[policy(
            "checkout",
            "shop/checkout",
            "  weights: {aws: 50, gcp: 50}\n",
        )],
    );
    let d = ok(&fedmesh(&["apply", "-f", &v2, "--dry-run"], &ep));
    assert!(
        d.contains("-  weights:") || d.contains("-    aws: 90"),
        "{d}"
    );
    assert!(ok(&fedmesh(&["apply", "-f", &v2], &ep)).contains("policy/checkout configured"));

    let table = ok(&fedmesh(&["get", "policies"], &ep));
    assert!(
        table.contains("checkout") && table.contains("weights aws:50,gcp:50"),
        "{table}"
    );
    let yaml = ok(&fedmesh(
        &["get", "policies", "checkout", "-o", "yaml"],
        &ep,
    ));
    assert!(
        yaml.contains("kind: GlobalTrafficPolicy") && yaml.contains("gcp: 50"),
        "{yaml}"
    );

    // History lists both revisions; rollback puts the first back.
    let h = ok(&fedmesh(
        &["history", "policy", "checkout", "-o", "json"],
        &ep,
    ));
    let rows: serde_json::Value = serde_json::from_str(&h).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{h}");
    let first = rows[0]["revision"].as_i64().unwrap();
    assert_eq!(rows[0]["policy"]["spec"]["weights"]["aws"], 90);
    let out = ok(&fedmesh(
        &["rollback", "policy", "checkout", "--to", &first.to_string()],
        &ep,
    ));
    assert!(out.contains("rolled back"), "{out}");
    let yaml = ok(&fedmesh(
        &["get", "policies", "checkout", "-o", "yaml"],
        &ep,
    ));
    assert!(yaml.contains("aws: 90"), "{yaml}");

    // Delete, and the deletion is in the history too.
    ok(&fedmesh(&["delete", "policy", "checkout"], &ep));
    assert_eq!(stored(&etcd).await.len(), 1);
    let h = ok(&fedmesh(&["history", "policy", "checkout"], &ep));
    assert_eq!(h.matches("applied").count(), 3, "{h}");
    assert!(h.contains("deleted"), "{h}");
    let e = fedmesh(&["delete", "policy", "checkout"], &ep);
    assert!(
        text(&e.stderr).contains("does not exist"),
        "{}",
        text(&e.stderr)
    );
}

/// etcd compacts its history (as `fedmesh up`'s does every hour): history
/// starts at the compaction and says older revisions are gone; rollback to
/// one of them is refused by name, changing nothing; rollback to a revision
/// still held works.
#[tokio::test]
async fn history_and_rollback_after_etcd_compacts() {
    let etcd = Etcd::start().await.unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let mut revisions = Vec::new();
    for aws in [90, 70, 50] {
        let f = write(
            dir.path(),
            &format!("v{aws}.yaml"),
            &[policy(
                "checkout",
                "shop/checkout",
                &format!("  weights: {{aws: {aws}, gcp: {}}}\n", 100 - aws),
            )],
        );
        ok(&fedmesh(&["apply", "-f", &f], &ep));
        let h = ok(&fedmesh(
            &["history", "policy", "checkout", "-o", "json"],
            &ep,
        ));
        let rows: serde_json::Value = serde_json::from_str(&h).unwrap();
        revisions.push(
            rows.as_array().unwrap().last().unwrap()["revision"]
                .as_i64()
                .unwrap(),
        );
    }
    // Compact at the second revision: the first is gone.
    let mut client = etcd.client().await.unwrap();
    client
        .compact(
            revisions[1],
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .unwrap();

    let out = fedmesh(&["history", "policy", "checkout", "-o", "json"], &ep);
    let rows: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let shown: Vec<i64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(shown, revisions[1..], "history from the compaction on");
    assert!(
        text(&out.stderr).contains(&format!(
            "etcd has compacted revisions before {}",
            revisions[1]
        )),
        "{}",
        text(&out.stderr)
    );

    let gone = fedmesh(
        &[
            "rollback",
            "policy",
            "checkout",
            "--to",
            &revisions[0].to_string(),
        ],
        &ep,
    );
    assert!(!gone.status.success());
    assert!(
        text(&gone.stderr).contains(&format!(
            "revision {} of policy \"checkout\" is gone: etcd has compacted it",
            revisions[0]
        )),
        "{}",
        text(&gone.stderr)
    );
    let yaml = ok(&fedmesh(
        &["get", "policies", "checkout", "-o", "yaml"],
        &ep,
    ));
    assert!(yaml.contains("aws: 50"), "nothing changed: {yaml}");

    let back = ok(&fedmesh(
        &[
            "rollback",
            "policy",
            "checkout",
            "--to",
            &revisions[1].to_string(),
        ],
        &ep,
    ));
    assert!(back.contains("rolled back"), "{back}");
    let yaml = ok(&fedmesh(
        &["get", "policies", "checkout", "-o", "yaml"],
        &ep,
    ));
    assert!(yaml.contains("aws: 70"), "{yaml}");
}

#[tokio::test]
async fn nothing_is_written_unless_everything_passes() {
    let etcd = Etcd::start().await.unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.yaml",
        &[policy("a", "shop/a", "  retries: 1\n")],
    );
    let bad = write(
        dir.path(),
        "bad.yaml",
        &[
            policy("b", "shop/b", "  retries: 1\n"),
            policy("c", "shop/c", "  failoverThreshold: 2\n"),
        ],
    );
    let out = fedmesh(&["apply", "-f", &good, "-f", &bad], &ep);
    assert_eq!(out.status.code(), Some(1));
    let e = text(&out.stderr);
    assert!(
        e.contains("bad.yaml: line 13 column 22: spec.failoverThreshold: 2 is outside (0, 1]"),
        "{e}"
    );
    assert!(stored(&etcd).await.is_empty(), "nothing half-applied");

    // Two policies for one service, across the stored set and the file.
    ok(&fedmesh(&["apply", "-f", &good], &ep));
    let dup = write(
        dir.path(),
        "dup.yaml",
        &[policy("a2", "shop/a", "  retries: 2\n")],
    );
    let e = text(&fedmesh(&["apply", "-f", &dup], &ep).stderr);
    assert!(
        e.contains("policies \"a\" and \"a2\" are both for service shop/a"),
        "{e}"
    );
    let two_defaults = write(
        dir.path(),
        "defaults.yaml",
        &[
            policy("d1", "\"*\"", "  retries: 1\n"),
            policy("d2", "\"*\"", "  retries: 2\n"),
        ],
    );
    let e = text(&fedmesh(&["apply", "-f", &two_defaults], &ep).stderr);
    assert!(e.contains("both for the mesh-wide default"), "{e}");
    assert_eq!(stored(&etcd).await.len(), 1);
}

#[tokio::test]
async fn a_concurrent_change_is_refused_not_overwritten() {
    let etcd = Etcd::start().await.unwrap();
    let keys = fedmesh_api::KeySpace::default();
    let client = etcd.client().await.unwrap();
    let mut zone = fedmesh_zone::GlobalZone::new(client.clone(), keys)
        .with_anchor(fedmesh_test_support::anchor());
    let p = |retries: &str| {
        fedmesh_api::policy::parse_documents(
            &policy("a", "shop/a", &format!("  retries: {retries}\n")),
            "t",
        )
        .unwrap()
        .remove(0)
    };
    let read = zone.policies().await.unwrap();
    // Someone else applies between our read and our write.
    let mut other = fedmesh_zone::GlobalZone::new(client, fedmesh_api::KeySpace::default())
        .with_anchor(fedmesh_test_support::anchor());
    let theirs = other.policies().await.unwrap();
    other
        .write_policies(
            &theirs,
            &[fedmesh_zone::PolicyChange::Put(Box::new(p("1")))],
        )
        .await
        .unwrap();
    let e = zone
        .write_policies(&read, &[fedmesh_zone::PolicyChange::Put(Box::new(p("2")))])
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("another change to the policies landed"),
        "{e}"
    );
    assert!(e.is_retryable());
    assert!(stored(&etcd).await[0].1.contains("\"retries\":1"));
    // Also when the other change is to a different policy.
    let read = zone.policies().await.unwrap();
    let q = fedmesh_api::policy::parse_documents(&policy("b", "shop/b", "  retries: 3\n"), "t")
        .unwrap()
        .remove(0);
    let theirs = other.policies().await.unwrap();
    other
        .write_policies(&theirs, &[fedmesh_zone::PolicyChange::Put(Box::new(q))])
        .await
        .unwrap();
    assert!(
        zone.write_policies(&read, &[fedmesh_zone::PolicyChange::Put(Box::new(p("4")))])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_clusters_credentials_cannot_write_policies() {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ep = etcd.endpoint();
    let pw = etcd.root_password().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let join = dir.path().join("join");
    let reg = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args([
            "register",
            "cluster",
            "aws",
            "--cloud",
            "aws",
            "--region",
            "r1",
            "--zones",
            "a",
            "--gateway",
            "127.0.1.1:15443",
            "--trust-domain",
            "aws.fedmesh.test",
            "--etcd",
            &ep,
            "--out",
            join.to_str().unwrap(),
            "--etcd-user",
            "root",
            "--etcd-password",
            &pw,
        ])
        .env("FEDMESH_ANCHOR_DIR", fedmesh_test_support::anchor_dir())
        .output()
        .unwrap();
    ok(&reg);
    let access: serde_json::Value =
        serde_json::from_slice(&std::fs::read(join.join("etcd.json")).unwrap()).unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        &[policy("a", "shop/a", "  retries: 1\n")],
    );
    let out = fedmesh(
        &[
            "apply",
            "-f",
            &file,
            "--etcd-user",
            access["user"].as_str().unwrap(),
            "--etcd-password",
            access["password"].as_str().unwrap(),
        ],
        &ep,
    );
    let e = text(&out.stderr);
    assert!(e.contains("Policies are an operator's write"), "{e}");
    ok(&fedmesh(
        &[
            "apply",
            "-f",
            &file,
            "--etcd-user",
            "root",
            "--etcd-password",
            &pw,
        ],
        &ep,
    ));
}
