//! `fedmesh anchor init|show`, as an operator runs them.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn fedmesh(args: &[&str]) -> (bool, String, String) {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn init_creates_a_private_key_once_and_show_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("anchor");
    let d = dir.to_str().unwrap();
    let (ok, said, err) = fedmesh(&["anchor", "init", "--dir", d]);
    assert!(ok, "{err}");
    let keyid = said
        .lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert!(keyid.starts_with("anchor:"), "{said}");
    let mode = std::fs::metadata(dir.join("anchor.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, shown, err) = fedmesh(&["anchor", "show", "--dir", d]);
    assert!(ok, "{err}");
    assert!(shown.starts_with(&keyid), "{shown}");
    let public = std::fs::read_to_string(dir.join("anchor.pub")).unwrap();
    assert!(shown.ends_with(&public), "{shown}");

    // A second init never replaces the key.
    let (ok, _, err) = fedmesh(&["anchor", "init", "--dir", d]);
    assert!(!ok);
    assert!(err.contains("already there"), "{err}");
    let (_, again, _) = fedmesh(&["anchor", "show", "--dir", d]);
    assert_eq!(again, shown);

    // A key others can read is refused, naming the file and the fix.
    std::fs::set_permissions(
        dir.join("anchor.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, _, err) = fedmesh(&["anchor", "show", "--dir", d]);
    assert!(!ok);
    assert!(
        err.contains("anchor.key") && err.contains("chmod 600"),
        "{err}"
    );
}
