//! `fedmesh token create|list|revoke` on a tokens file, as an operator runs them.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn fedmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> (bool, String, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const WEB: &str = "spiffe://aws.fedmesh.test/ns/shop/sa/web";

#[test]
fn create_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    let f = file.to_str().unwrap();

    let (ok, token, said) = text(&fedmesh(&[
        "token",
        "create",
        "--identity",
        WEB,
        "--single-use",
        "--file",
        f,
    ]));
    assert!(ok, "{said}");
    let token = token.trim().to_owned();
    assert_eq!(token.len(), 64, "{token}");
    assert!(
        said.contains("expires at") && said.contains("single-use"),
        "{said}"
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let on_disk = std::fs::read_to_string(&file).unwrap();
    assert!(!on_disk.contains(&token), "the file keeps hashes only");

    let (ok, _, said) = text(&fedmesh(&[
        "token",
        "create",
        "--identity",
        WEB,
        "--ttl",
        "2h",
        "--file",
        f,
    ]));
    assert!(ok, "{said}");
    let (ok, listed, _) = text(&fedmesh(&["token", "list", "-o", "json", "--file", f]));
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["singleUse"], true);
    assert_eq!(rows[0]["state"], "valid");
    assert_eq!(rows[1]["identity"], WEB);
    let (ok, table, _) = text(&fedmesh(&["token", "list", "--file", f]));
    assert!(
        ok && table.contains("EXPIRES") && !table.contains(&token),
        "{table}"
    );

    let id = rows[0]["id"].as_str().unwrap();
    let (ok, said, _) = text(&fedmesh(&["token", "revoke", &id[..8], "--file", f]));
    assert!(ok && said.contains("revoked"), "{said}");
    let (_, listed, _) = text(&fedmesh(&["token", "list", "-o", "json", "--file", f]));
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_ne!(rows[0]["id"].as_str().unwrap(), id);
}

#[test]
fn bad_input_is_named_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.yaml");
    let f = file.to_str().unwrap();
    let (ok, _, e) = text(&fedmesh(&[
        "token",
        "create",
        "--identity",
        "not-an-id",
        "--file",
        f,
    ]));
    assert!(!ok && e.contains("--identity \"not-an-id\""), "{e}");
    let (ok, _, e) = text(&fedmesh(&[
        "token",
        "create",
        "--identity",
        WEB,
        "--ttl",
        "5s",
        "--file",
        f,
    ]));
    assert!(!ok && e.contains("at least a minute"), "{e}");
    let (ok, _, e) = text(&fedmesh(&[
        "token",
        "create",
        "--identity",
        WEB,
        "--ttl",
        "soon",
        "--file",
        f,
    ]));
    assert!(!ok && e.contains("\"soon\""), "{e}");
    assert!(!file.exists());
    let (ok, _, e) = text(&fedmesh(&["token", "revoke", "abcdef012345", "--file", f]));
    assert!(!ok && e.contains("no token"), "{e}");
    std::fs::write(&file, "tokens: [{sha256: nope}]\n").unwrap();
    let (ok, _, e) = text(&fedmesh(&["token", "list", "--file", f]));
    assert!(!ok && e.contains("tokens.yaml"), "{e}");
}
