//! `fedmesh register/deregister/get` as an operator runs them, against a real etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use fedmesh_test_support::{Etcd, EtcdOptions};

fn fedmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedmesh"))
        .args(args)
        .env("FEDMESH_ANCHOR_DIR", fedmesh_test_support::anchor_dir())
        .env_remove("FEDMESH_ETCD")
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

fn err(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn register<'a>(name: &'a str, td: &'a str, etcd: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "register",
        "cluster",
        name,
        "--cloud",
        "aws",
        "--region",
        "us-east-1",
        "--zones",
        "az1,az2",
        "--gateway",
        "127.0.1.1:15443",
        "--trust-domain",
        td,
        "--etcd",
        etcd,
        "--out",
        out,
    ]
}

async fn revision(etcd: &Etcd) -> i64 {
    etcd.client()
        .await
        .unwrap()
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test]
async fn register_get_and_deregister() {
    let etcd = Etcd::start().await.unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let out_a = dir.path().join("join-a");
    let out_a = out_a.to_str().unwrap();

    let stdout = ok(&fedmesh(&register(
        "aws-use1",
        "aws.fedmesh.test",
        &ep,
        out_a,
    )));
    assert!(stdout.contains("cluster aws-use1 registered"), "{stdout}");
    assert!(stdout.contains("fedmesh-controller --join"), "{stdout}");
    for f in ["cluster.json", "etcd.json", "ca/ca.crt", "ca/ca.key"] {
        let mode = std::fs::metadata(Path::new(out_a).join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }

    // The controller starts from exactly this directory.
    let join = fedmesh_zone::join::JoinDir::load(Path::new(out_a)).unwrap();
    assert_eq!(join.cluster.name, "aws-use1");
    assert_eq!(join.etcd.endpoints, vec![ep.to_string()]);
    // The record as the anchor signed it, for the controller to write back.
    let signed = std::fs::read(Path::new(out_a).join("record.json")).unwrap();
    assert!(signed.starts_with(b"{\"payload\""), "an envelope");
    assert_eq!(
        join.anchor,
        Some(fedmesh_test_support::anchor().public()),
        "pinned"
    );

    // Again: idempotent, nothing written, the same CA kept.
    let ca_before = std::fs::read(Path::new(out_a).join("ca/ca.crt")).unwrap();
    let rev = revision(&etcd).await;
    let stdout = ok(&fedmesh(&register(
        "aws-use1",
        "aws.fedmesh.test",
        &ep,
        out_a,
    )));
    assert!(stdout.contains("unchanged"), "{stdout}");
    assert_eq!(revision(&etcd).await, rev);
    assert_eq!(
        std::fs::read(Path::new(out_a).join("ca/ca.crt")).unwrap(),
        ca_before
    );

    // Conflicts: clear message, non-zero exit, nothing written.
    let out_b = dir.path().join("join-b");
    let stderr = err(&fedmesh(&register(
        "gcp-euw1",
        "aws.fedmesh.test",
        &ep,
        out_b.to_str().unwrap(),
    )));
    assert!(
        stderr
            .contains("trust domain \"aws.fedmesh.test\" already belongs to cluster \"aws-use1\""),
        "{stderr}"
    );
    let stderr = err(&fedmesh(&register(
        "aws-use1",
        "other.fedmesh.test",
        &ep,
        out_b.to_str().unwrap(),
    )));
    assert!(
        stderr.contains("already registered with trust domain"),
        "{stderr}"
    );
    assert!(
        !out_b.exists(),
        "a refused registration wrote a join directory"
    );
    assert_eq!(revision(&etcd).await, rev);

    // get, in every format.
    let table = ok(&fedmesh(&["get", "clusters", "--etcd", &ep]));
    assert!(
        table.starts_with("NAME")
            && table.contains("aws-use1")
            && table.contains("127.0.1.1:15443"),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(&fedmesh(&[
        "get", "clusters", "-o", "json", "--etcd", &ep,
    ])))
    .unwrap();
    assert_eq!(json[0]["trustDomain"], "aws.fedmesh.test");
    assert_eq!(json[0]["egress"], "direct", "proxies go direct unless said");
    // No controller has said it is alive yet.
    assert_eq!(json[0]["liveness"]["state"], "stale");
    assert!(table.contains("STALE"), "{table}");
    // Its controller last signed its manifest 150 s ago; then it comes back.
    let keys = fedmesh_api::KeySpace::default();
    let mut c = etcd.client().await.unwrap();
    let joined = fedmesh_zone::JoinDir::load(Path::new(out_a)).unwrap();
    let td = joined.ca.trust_domain().clone();
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(150);
    let controller = fedmesh_trust::SpiffeId::controller(&td, "aws-use1").unwrap();
    let svid = joined
        .ca
        .issue(&controller, &fedmesh_trust::SvidPolicy::default(), then)
        .unwrap();
    let manifest = fedmesh_seal::seal(
        fedmesh_seal::Statement {
            subject: "seen/aws-use1".into(),
            seq: fedmesh_seal::next_seq(then, None),
            value: Some(fedmesh_seal::ExportSet::default().manifest(0, Default::default())),
            x5c: vec![],
            endorsements: vec![],
        },
        fedmesh_seal::Signer::Svid(&svid),
    )
    .unwrap();
    c.put(keys.seen("aws-use1"), manifest.to_json(), None)
        .await
        .unwrap();
    let table = ok(&fedmesh(&["get", "clusters", "--etcd", &ep]));
    assert!(table.contains("STALE 2m"), "{table}");
    assert!(table.contains("TRUST") && table.contains(" ok "), "{table}");

    // A record rewritten by anyone but the anchor is not shown as the
    // cluster's: `get` (which holds no earlier value) names the key and why.
    let signed = c.get(keys.cluster("aws-use1"), None).await.unwrap().kvs()[0]
        .value()
        .to_vec();
    let mut forged: serde_json::Value = json[0].clone();
    forged["gateways"] = serde_json::json!([{"address": "127.0.66.6", "port": 15443}]);
    c.put(keys.cluster("aws-use1"), forged.to_string(), None)
        .await
        .unwrap();
    let out = fedmesh(&["get", "clusters", "--etcd", &ep]);
    let (table, said) = (ok(&out), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!table.contains("127.0.66.6"), "{table}");
    assert!(
        said.contains("not believed: /fedmesh/v1/clusters/aws-use1: unsigned"),
        "{said}"
    );
    c.put(keys.cluster("aws-use1"), signed, None).await.unwrap();
    c.put(keys.alive("aws-use1"), "{}", None).await.unwrap();
    let table = ok(&fedmesh(&["get", "clusters", "--etcd", &ep]));
    assert!(table.contains("LIVE"), "{table}");
    let yaml = ok(&fedmesh(&["get", "bundles", "-o", "yaml", "--etcd", &ep]));
    assert!(yaml.contains("trustDomain: aws.fedmesh.test"), "{yaml}");
    assert!(ok(&fedmesh(&["get", "services", "--etcd", &ep])).starts_with("CLUSTER"));

    // Re-registering with another egress mode updates the record (the
    // controller passes it on to the cluster's proxies); a mode that does
    // not exist is refused by name.
    let mut again = register("aws-use1", "aws.fedmesh.test", &ep, out_a);
    again.extend(["--egress", "gateway"]);
    let stdout = ok(&fedmesh(&again));
    assert!(stdout.contains("updated"), "{stdout}");
    let table = ok(&fedmesh(&["get", "clusters", "--etcd", &ep]));
    assert!(
        table.contains("EGRESS") && table.contains("gateway"),
        "{table}"
    );
    let mut bad = register("aws-use1", "aws.fedmesh.test", &ep, out_a);
    bad.extend(["--egress", "relay"]);
    let stderr = err(&fedmesh(&bad));
    assert!(
        stderr.contains("--egress") && stderr.contains("\"relay\" is not an egress mode"),
        "{stderr}"
    );

    // Deregister removes it; a second time says it is not registered.
    let stdout = ok(&fedmesh(&[
        "deregister",
        "cluster",
        "aws-use1",
        "--etcd",
        &ep,
    ]));
    assert!(stdout.contains("deregistered"), "{stdout}");
    let stderr = err(&fedmesh(&[
        "deregister",
        "cluster",
        "aws-use1",
        "--etcd",
        &ep,
    ]));
    assert!(stderr.contains("not registered"), "{stderr}");
}

#[test]
fn invalid_input_is_refused_before_contacting_etcd() {
    // Port 9 on loopback has nothing listening: any I/O attempt would fail
    // with a connection error instead of these messages.
    let etcd = "http://127.0.0.1:9";
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "register",
                "cluster",
                "Bad_Name",
                "--cloud",
                "a",
                "--region",
                "r",
                "--zones",
                "z",
                "--gateway",
                "h:1",
                "--etcd",
                etcd,
            ],
            "cluster name \"Bad_Name\"",
        ),
        (
            &[
                "register",
                "cluster",
                "ok",
                "--cloud",
                "a",
                "--region",
                "r",
                "--zones",
                "z",
                "--gateway",
                "nohost",
                "--etcd",
                etcd,
            ],
            "--gateway",
        ),
        (
            &[
                "register",
                "cluster",
                "ok",
                "--cloud",
                "a",
                "--region",
                "r",
                "--zones",
                "z,z",
                "--gateway",
                "h:1",
                "--etcd",
                etcd,
            ],
            "listed twice",
        ),
        (
            &[
                "register",
                "cluster",
                "ok",
                "--cloud",
                "a",
                "--region",
                "r",
                "--gateway",
                "h:1",
                "--etcd",
                etcd,
            ],
            "--zones",
        ),
    ];
    for (args, want) in cases {
        let stderr = err(&fedmesh(args));
        assert!(
            stderr.contains(want) && !stderr.contains("connecting"),
            "{args:?}: {stderr}"
        );
    }
    let stderr = err(&fedmesh(&["get", "clusters", "--etcd", etcd]));
    assert!(
        stderr.contains("connecting to etcd at http://127.0.0.1:9"),
        "{stderr}"
    );
}

#[tokio::test]
async fn with_auth_registration_creates_the_clusters_own_etcd_user() {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ep = etcd.endpoint();
    let pw = etcd.root_password().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("join");
    let mut args = register("aws-use1", "aws.fedmesh.test", &ep, out.to_str().unwrap());
    args.extend(["--etcd-user", "root", "--etcd-password", &pw]);
    ok(&fedmesh(&args));
    let access: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("etcd.json")).unwrap()).unwrap();
    assert_eq!(access["user"], "fedmesh-cluster-aws-use1");
    let password = access["password"].as_str().unwrap();
    let mut c = etcd_client::Client::connect(
        [ep.as_str()],
        Some(etcd_client::ConnectOptions::new().with_user("fedmesh-cluster-aws-use1", password)),
    )
    .await
    .unwrap();
    c.put("/fedmesh/v1/alive/aws-use1", "{}", None)
        .await
        .unwrap();
    assert!(c.put("/fedmesh/v1/alive/other", "{}", None).await.is_err());
    // Re-running keeps the same password.
    ok(&fedmesh(&args));
    let again: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("etcd.json")).unwrap()).unwrap();
    assert_eq!(again["password"], access["password"]);
}

#[tokio::test]
async fn a_join_directory_that_cannot_be_written_publishes_nothing_and_a_rerun_works() {
    let etcd = Etcd::start().await.unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    // A path under a regular file: no directory can be made there.
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let bad = dir.path().join("file/join");
    let e = err(&fedmesh(&register(
        "aws-use1",
        "aws.fedmesh.test",
        &ep,
        bad.to_str().unwrap(),
    )));
    assert!(e.contains("writing the join directory"), "{e}");
    let resp = etcd
        .client()
        .await
        .unwrap()
        .get(
            "/fedmesh/v1/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(
        resp.kvs().is_empty(),
        "nothing published without the key on disk"
    );
    // A writable directory: the same registration goes through.
    let good = dir.path().join("join");
    let out = ok(&fedmesh(&register(
        "aws-use1",
        "aws.fedmesh.test",
        &ep,
        good.to_str().unwrap(),
    )));
    assert!(out.contains("registered"), "{out}");
    assert!(good.join("ca/ca.key").exists() || good.join("ca").is_dir());
    // And again, unchanged, keeping the same CA.
    let before = std::fs::read(good.join("ca/ca.crt")).unwrap();
    assert!(
        ok(&fedmesh(&register(
            "aws-use1",
            "aws.fedmesh.test",
            &ep,
            good.to_str().unwrap()
        )))
        .contains("unchanged")
    );
    assert_eq!(std::fs::read(good.join("ca/ca.crt")).unwrap(), before);
    // A refused registration (another trust domain for the name) leaves
    // the join directory alone.
    let e = err(&fedmesh(&register(
        "aws-use1",
        "other.fedmesh.test",
        &ep,
        good.to_str().unwrap(),
    )));
    assert!(e.contains("already registered with trust domain"), "{e}");
    assert_eq!(std::fs::read(good.join("ca/ca.crt")).unwrap(), before);
}

/// An etcd client with a PEM pair and the harness's CA, no password.
async fn by_certificate(etcd: &Etcd, cert: &Path, key: &Path) -> etcd_client::Client {
    let ca = std::fs::read(etcd.ca_file().unwrap()).unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(ca))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    etcd_client::Client::connect(
        [etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn over_tls_a_cluster_gets_its_own_certificate_and_only_its_keys() {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        tls: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("root.password");
    std::fs::write(&pw_file, etcd.root_password().unwrap()).unwrap();
    let ca = etcd.ca_file().unwrap();
    let root = etcd.client_files().unwrap().clone();
    let mine = etcd.issue_client("fedmesh-cluster-aws-use1").unwrap();
    let wrong = etcd.issue_client("root").unwrap();
    let out = dir.path().join("join");
    let operator = |cluster: Option<&fedmesh_trust::pki::PemPair>| {
        let mut args: Vec<String> =
            register("aws-use1", "aws.fedmesh.test", &ep, out.to_str().unwrap())
                .into_iter()
                .map(String::from)
                .collect();
        let p = |p: &Path| p.to_str().unwrap().to_owned();
        args.extend([
            "--etcd-cacert".into(),
            p(&ca),
            "--etcd-cert".into(),
            p(&root.cert),
            "--etcd-key".into(),
            p(&root.key),
            "--etcd-user".into(),
            "root".into(),
            "--etcd-password-file".into(),
            p(&pw_file),
        ]);
        if let Some(c) = cluster {
            args.extend([
                "--cluster-etcd-cert".into(),
                p(&c.cert),
                "--cluster-etcd-key".into(),
                p(&c.key),
            ]);
        }
        args
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fedmesh(&refs)
    };

    // The operator's own certificate would carry root's rights: refused.
    let e = err(&run(operator(None)));
    assert!(e.contains("--cluster-etcd-cert"), "{e}");
    // So is a certificate whose CN is another user.
    let e = err(&run(operator(Some(&wrong))));
    assert!(
        e.contains("CN is \"root\"") && e.contains("fedmesh-cluster-aws-use1"),
        "{e}"
    );
    assert!(!out.exists(), "a refused registration writes nothing");

    ok(&run(operator(Some(&mine))));
    // The join directory holds its own copies, and no password.
    let access: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("etcd.json")).unwrap()).unwrap();
    assert_eq!(access["endpoints"][0], ep.as_str());
    assert!(
        access.get("password").is_none() && access.get("user").is_none(),
        "{access}"
    );
    assert_eq!(access["tls"]["ca"], "etcd-tls/ca.pem");
    for f in ["ca.pem", "client.pem", "client-key.pem"] {
        let mode = std::fs::metadata(out.join("etcd-tls").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // Its certificate makes it its own etcd user: its keys, not another's.
    let tls = out.join("etcd-tls");
    let mut c = by_certificate(&etcd, &tls.join("client.pem"), &tls.join("client-key.pem")).await;
    c.put("/fedmesh/v1/alive/aws-use1", "{}", None)
        .await
        .unwrap();
    let denied = c
        .put("/fedmesh/v1/bundles/gcp.fedmesh.test", "forged", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(denied.contains("permission denied"), "{denied}");
    // Its own record (to put back what the anchor signed), not another's.
    let record = c
        .get("/fedmesh/v1/clusters/aws-use1", None)
        .await
        .unwrap()
        .kvs()[0]
        .value()
        .to_vec();
    c.put("/fedmesh/v1/clusters/aws-use1", record.clone(), None)
        .await
        .unwrap();
    let denied = c
        .put("/fedmesh/v1/clusters/gcp-usc1", record, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(denied.contains("permission denied"), "{denied}");

    // Commands reach a TLS etcd only with its CA, and never over http://.
    let e = err(&fedmesh(&["get", "clusters", "--etcd", &ep]));
    assert!(e.contains("--etcd-cacert"), "{e}");
    let e = err(&fedmesh(&[
        "get",
        "clusters",
        "--etcd",
        "http://192.0.2.1:2379",
    ]));
    assert!(e.contains("beyond loopback"), "{e}");
    let listed = ok(&fedmesh(&[
        "get",
        "clusters",
        "--etcd",
        &ep,
        "--etcd-cacert",
        ca.to_str().unwrap(),
        "--etcd-cert",
        tls.join("client.pem").to_str().unwrap(),
        "--etcd-key",
        tls.join("client-key.pem").to_str().unwrap(),
    ]));
    assert!(listed.contains("aws-use1"), "{listed}");
}
