//! `fedmesh zone backup|restore` against a real etcd that is wiped: the
//! zone comes back whole (records, bundles, exports' absence, policies,
//! users and auth), never older than what etcd holds, and a tampered backup
//! restores nothing of what was tampered with.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use fedmesh_test_support::{Etcd, EtcdOptions};

fn fedmesh(args: &[&str], etcd: &Etcd) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .env("FEDMESH_ANCHOR_DIR", fedmesh_test_support::anchor_dir())
        .env("FEDMESH_ETCD", etcd.endpoint())
        .env("FEDMESH_ETCD_USER", "root")
        .env("FEDMESH_ETCD_PASSWORD", etcd.root_password().unwrap())
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn register(name: &str, dir: &Path, etcd: &Etcd) {
    let out = dir.join(name);
    ok(&fedmesh(
        &[
            "register",
            "cluster",
            name,
            "--cloud",
            name,
            "--region",
            "r1",
            "--zones",
            "az1",
            "--gateway",
            "127.0.1.1:15443",
            "--out",
            out.to_str().unwrap(),
        ],
        etcd,
    ));
}

fn column_of(table: &str, row: &str, header: &str) -> Option<String> {
    let mut lines = table.lines();
    let head = lines.next()?;
    let at = head.find(header)?;
    let line = lines.find(|l| l.starts_with(row))?;
    Some(line.get(at..)?.split_whitespace().next()?.to_owned())
}

#[tokio::test]
async fn a_wiped_etcd_is_restored_whole_and_never_older() {
    let mut etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    register("aws", dir.path(), &etcd);
    register("gcp", dir.path(), &etcd);
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {name: pay}\nspec:\n  service: shop/payments\n  weights: {aws: 1}\n",
    )
    .unwrap();
    ok(&fedmesh(&["apply", "-f", policy.to_str().unwrap()], &etcd));

    let backup = dir.path().join("zone.json");
    let said = ok(&fedmesh(
        &["zone", "backup", backup.to_str().unwrap()],
        &etcd,
    ));
    // Two records, two bundles, one policy.
    assert!(said.contains("backed up 5 records"), "{said}");
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    etcd.wipe().await.unwrap();
    // Auth is off on the new etcd: a password login is refused.
    assert!(!fedmesh(&["get", "clusters"], &etcd).status.success());

    let file = backup.to_str().unwrap();
    let dry = ok(&fedmesh(
        &["zone", "restore", file, "--dry-run", "--enable-auth"],
        &etcd,
    ));
    assert!(dry.contains("would restore 5 records"), "{dry}");
    let said = ok(&fedmesh(&["zone", "restore", file, "--enable-auth"], &etcd));
    assert!(said.contains("restored 5 records"), "{said}");
    assert!(said.contains("etcd auth on"), "{said}");

    let clusters = ok(&fedmesh(&["get", "clusters"], &etcd));
    for c in ["aws", "gcp"] {
        assert_eq!(
            column_of(&clusters, c, "TRUST").as_deref(),
            Some("ok"),
            "{clusters}"
        );
    }
    let policies = ok(&fedmesh(&["get", "policies"], &etcd));
    assert!(policies.contains("pay"), "{policies}");
    // Auth is on again, and each cluster has its user and role back.
    let mut anonymous = etcd.anonymous_client().await.unwrap();
    assert!(
        anonymous
            .put("/fedmesh/v1/alive/aws", "{}", None)
            .await
            .is_err()
    );
    let mut root = etcd.client().await.unwrap();
    let users = root.user_list().await.unwrap();
    assert!(users.users().iter().any(|u| u == "fedmesh-cluster-gcp"));

    // Run again: nothing to write.
    let again = ok(&fedmesh(&["zone", "restore", file], &etcd));
    assert!(
        again.contains("restored 0 records") && again.contains("5 already in etcd"),
        "{again}"
    );

    // gcp is deregistered after the backup: the backup's older record of it
    // is never written over the signed deletion.
    ok(&fedmesh(&["deregister", "cluster", "gcp"], &etcd));
    ok(&fedmesh(&["zone", "restore", file], &etcd));
    let clusters = ok(&fedmesh(&["get", "clusters"], &etcd));
    assert!(
        !clusters.lines().any(|l| l.starts_with("gcp")),
        "{clusters}"
    );

    // A tampered backup: a byte of the policy changed in the file.
    // A backup is JSON lines: a header, then a {"key", "value"} per line.
    let text = std::fs::read_to_string(&backup).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let record = lines
        .iter_mut()
        .find(|r| {
            r["key"]
                .as_str()
                .is_some_and(|k| k.ends_with("/policies/pay"))
        })
        .unwrap();
    let envelope: serde_json::Value =
        serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
    let mut tampered = envelope.clone();
    let mut payload: Vec<char> = envelope["payload"].as_str().unwrap().chars().collect();
    payload[40] = if payload[40] == 'a' { 'b' } else { 'a' };
    tampered["payload"] = serde_json::Value::String(payload.into_iter().collect());
    record["value"] = serde_json::Value::String(tampered.to_string());
    let dump: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let forged = dir.path().join("forged.json");
    std::fs::write(&forged, dump).unwrap();
    ok(&fedmesh(&["delete", "policy", "pay"], &etcd));
    let out = fedmesh(&["zone", "restore", forged.to_str().unwrap()], &etcd);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not restored:") && stderr.contains("policies/pay"),
        "{stderr} {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let policies = ok(&fedmesh(&["get", "policies"], &etcd));
    assert!(!policies.contains("pay "), "{policies}");

    // Not a backup at all: the error names the file.
    let junk = dir.path().join("junk.json");
    std::fs::write(&junk, "{}").unwrap();
    let out = fedmesh(&["zone", "restore", junk.to_str().unwrap()], &etcd);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("junk.json") && stderr.contains("not a global-zone dump"),
        "{stderr}"
    );
}

/// A federation written before records were signed: `fedmesh anchor adopt
/// --trust-unsigned` signs its cluster records and policies, after which a
/// reader with the anchor alone believes them.
#[tokio::test]
async fn adopt_signs_an_unsigned_federations_records_and_policies() {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    register("aws", dir.path(), &etcd);
    // As an older fedmesh wrote them: plain JSON.
    let mut kv = etcd.client().await.unwrap();
    let key = "/fedmesh/v1/clusters/aws";
    let signed = kv.get(key, None).await.unwrap().kvs()[0].value().to_vec();
    let envelope: serde_json::Value = serde_json::from_slice(&signed).unwrap();
    let statement = fedmesh_seal::peek::<serde_json::Value>(&signed).unwrap();
    assert!(envelope["signatures"].is_array());
    let mut record = statement.value.unwrap();
    record.as_object_mut().unwrap().remove("roots");
    kv.put(key, record.to_string(), None).await.unwrap();
    let bundles = kv
        .get(
            "/fedmesh/v1/bundles/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let bundle = &bundles.kvs()[0];
    let doc = fedmesh_seal::peek::<serde_json::Value>(bundle.value())
        .unwrap()
        .value
        .unwrap();
    kv.put(bundle.key(), doc.to_string(), None).await.unwrap();
    let policy = serde_json::json!({"apiVersion": "fedmesh.io/v1", "kind": "GlobalTrafficPolicy",
        "metadata": {"name": "pay"}, "spec": {"service": "shop/payments", "weights": {"aws": 1}}});
    kv.put("/fedmesh/v1/policies/pay", policy.to_string(), None)
        .await
        .unwrap();

    let out = fedmesh(&["get", "clusters"], &etcd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not believed: /fedmesh/v1/clusters/aws"),
        "{stderr}"
    );

    let policies = ok(&fedmesh(&["get", "policies"], &etcd));
    assert_eq!(
        column_of(&policies, "pay", "TRUST").as_deref(),
        Some("UNSIGNED"),
        "{policies}"
    );

    let said = ok(&fedmesh(&["anchor", "adopt", "--trust-unsigned"], &etcd));
    assert!(said.contains("signed 2 records"), "{said}");
    let clusters = ok(&fedmesh(&["get", "clusters"], &etcd));
    assert_eq!(
        column_of(&clusters, "aws", "TRUST").as_deref(),
        Some("ok"),
        "{clusters}"
    );
    let out = fedmesh(&["get", "policies"], &etcd);
    let (policies, stderr) = (ok(&out), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(
        policies.contains("pay") && !stderr.contains("not believed"),
        "{policies}{stderr}"
    );
    // The record pins the root of the bundle it was adopted with.
    let now = kv.get(key, None).await.unwrap().kvs()[0].value().to_vec();
    let adopted = fedmesh_seal::peek::<serde_json::Value>(&now).unwrap();
    assert_eq!(
        adopted.value.unwrap()["roots"],
        statement_roots(&signed),
        "the roots the registration pinned"
    );
    // Without the anchor's private key, nothing is signed.
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args([
            "anchor",
            "adopt",
            "--anchor-dir",
            dir.path().to_str().unwrap(),
        ])
        .env("FEDMESH_ETCD", etcd.endpoint())
        .env("FEDMESH_ETCD_USER", "root")
        .env("FEDMESH_ETCD_PASSWORD", etcd.root_password().unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn statement_roots(signed: &[u8]) -> serde_json::Value {
    fedmesh_seal::peek::<serde_json::Value>(signed)
        .unwrap()
        .value
        .unwrap()["roots"]
        .clone()
}

/// `fedmesh anchor rotate`: the zone is signed with a new key, the old one
/// is retired; a reader still pinned to the old key follows the chain and
/// believes what the new key signs, and no longer what the old one signs.
#[tokio::test]
async fn a_rotated_anchor_is_followed_by_readers_pinned_to_the_old_one() {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // An anchor of this test's own, and a reader's copy of its public key.
    let anchor = dir.path().join("anchor");
    let old = fedmesh_seal::AnchorKey::generate().unwrap();
    old.save_new(&anchor).unwrap();
    let pinned = dir.path().join("pinned");
    std::fs::create_dir_all(&pinned).unwrap();
    std::fs::copy(anchor.join("anchor.pub"), pinned.join("anchor.pub")).unwrap();
    let with = |dir: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fedmesh"))
            .args(args)
            .env("FEDMESH_ANCHOR_DIR", dir)
            .env("FEDMESH_ETCD", etcd.endpoint())
            .env("FEDMESH_ETCD_USER", "root")
            .env("FEDMESH_ETCD_PASSWORD", etcd.root_password().unwrap())
            .output()
            .unwrap()
    };
    let out = dir.path().join("aws");
    ok(&with(
        &anchor,
        &[
            "register",
            "cluster",
            "aws",
            "--cloud",
            "aws",
            "--region",
            "r1",
            "--zones",
            "az1",
            "--gateway",
            "127.0.1.1:15443",
            "--out",
            out.to_str().unwrap(),
        ],
    ));

    let said = ok(&with(&anchor, &["anchor", "rotate"]));
    assert!(said.contains("signed 1 records"), "{said}");
    let retired = std::fs::read_dir(anchor.join("retired")).unwrap().count();
    assert_eq!(retired, 2, "the old key and its public half");
    let new = fedmesh_seal::AnchorKey::load(&anchor.join("anchor.key")).unwrap();
    assert_ne!(new.public(), old.public());

    // The old key's reader follows the chain to the new key.
    let out = with(&pinned, &["get", "clusters"]);
    let clusters = ok(&out);
    assert_eq!(
        column_of(&clusters, "aws", "TRUST").as_deref(),
        Some("ok"),
        "{clusters}"
    );
    // A policy applied with the new key is believed; one the old key signs
    // is not, even by the reader pinned to it.
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "apiVersion: fedmesh.io/v1\nkind: GlobalTrafficPolicy\nmetadata: {name: pay}\nspec:\n  service: shop/payments\n  weights: {aws: 1}\n",
    )
    .unwrap();
    ok(&with(&anchor, &["apply", "-f", policy.to_str().unwrap()]));
    let out = with(&pinned, &["get", "policies"]);
    assert!(ok(&out).contains("pay"));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("not believed"));
    let mut kv = etcd.client().await.unwrap();
    let stale = fedmesh_seal::seal(
        fedmesh_seal::Statement {
            subject: "policies/evil".into(),
            seq: fedmesh_seal::next_seq(std::time::SystemTime::now(), None),
            value: Some(serde_json::json!({"apiVersion": "fedmesh.io/v1",
                "kind": "GlobalTrafficPolicy", "metadata": {"name": "evil"},
                "spec": {"service": "*", "weights": {"aws": 1}}})),
            x5c: vec![],
            endorsements: vec![],
        },
        fedmesh_seal::Signer::Anchor(&old),
    )
    .unwrap()
    .to_json();
    kv.put("/fedmesh/v1/policies/evil", stale, None)
        .await
        .unwrap();
    let listed = ok(&with(&pinned, &["get", "policies"]));
    let evil = listed
        .lines()
        .find(|l| l.starts_with("evil"))
        .unwrap_or_default();
    assert!(
        evil.contains("UNREADABLE") && evil.contains("forged"),
        "{listed}"
    );
}
