//! The `fedmesh-controller` binary as an operator runs it.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use fedmesh_api::{ClusterRecord, KeySpace};
use fedmesh_test_support::{Etcd, eventually};
use fedmesh_trust::{Bundle, CaOptions, ClusterCa, TrustDomain};
use fedmesh_zone::GlobalZone;
use fedmesh_zone::join::{EtcdAccess, JoinDir};

/// Registers aws and writes its join directory; returns its own bundle.
async fn join_dir(etcd: &Etcd, dir: &std::path::Path) -> Bundle {
    let td = TrustDomain::new("aws.fedmesh.test").unwrap();
    let ca = ClusterCa::generate(&td, &CaOptions::default(), SystemTime::now()).unwrap();
    let record = ClusterRecord {
        name: "aws".into(),
        cloud: "aws".into(),
        region: "r1".into(),
        zones: vec!["az1".into()],
        trust_domain: td.to_string(),
        gateways: vec!["127.0.1.1:15443".parse().unwrap()],
        labels: BTreeMap::new(),
        registered_at: time::OffsetDateTime::now_utc(),
        egress: Default::default(),
    };
    let bundle = Bundle::with_roots(td, [ca.cert_der().clone()]);
    let anchor = fedmesh_test_support::anchor();
    GlobalZone::new(etcd.client().await.unwrap(), KeySpace::default())
        .with_anchor(anchor.clone())
        .register(&record, &ca)
        .await
        .unwrap();
    let etcd = EtcdAccess {
        endpoints: vec![etcd.endpoint()],
        prefix: KeySpace::default().prefix().into(),
        user: None,
        password: None,
        tls: None,
    };
    JoinDir {
        cluster: record,
        etcd,
        ca,
        anchor: Some(anchor.public()),
    }
    .write(dir)
    .unwrap();
    bundle
}

/// Waits until aws's export of shop/cart is in etcd.
async fn export_in_etcd(c: &etcd_client::Client) {
    eventually(
        "aws's shop/cart export in etcd",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                let r = c
                    .get(KeySpace::default().export("aws", "shop", "cart"), None)
                    .await
                    .ok()?;
                (!r.kvs().is_empty()).then_some(())
            }
        },
    )
    .await;
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if tcp.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = tcp.read_to_string(&mut out).await;
    out
}

/// Polls the admin port's `/ready` until it answers 200, for up to `within`.
async fn until_ready(admin: &str, what: &str, within: Duration) {
    eventually(what, within, || async move {
        http_get(admin, "/ready")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn starts_from_a_join_directory_becomes_ready_and_stops_on_sigterm() {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let join = dir.path().join("join");
    join_dir(&etcd, &join).await;
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, "services:\n  - {namespace: shop, name: cart, ports: [8080], endpoints: [{address: '127.0.1.10:8080', zone: az1}]}\n").unwrap();
    let tokens = dir.path().join("tokens.yaml");
    web_tokens(&tokens);

    let mut child = Command::new(env!("CARGO_BIN_EXE_fedmesh-controller"))
        .args([
            "--join",
            join.to_str().unwrap(),
            "--registry",
            registry.to_str().unwrap(),
        ])
        .args([
            "--listen",
            "127.0.1.2:0",
            "--admin",
            "127.0.1.2:0",
            "--tokens",
            tokens.to_str().unwrap(),
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let admin = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(line.contains("discovery on 127.0.1.2:"), "{line}");

    until_ready(&admin, "/ready", Duration::from_secs(15)).await;
    // It published its export.
    let mut c = etcd.client().await.unwrap();
    export_in_etcd(&c).await;
    assert!(
        !c.get(KeySpace::default().alive("aws"), None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    );
    // Its state directory is private, and keeps its last good view.
    let state = dir.path().join("state");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    eventually(
        "the last good view on disk",
        Duration::from_secs(15),
        || {
            let written = state.join("last-good-view.json").is_file();
            async move { written.then_some(()) }
        },
    )
    .await;

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn bad_flags_and_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_fedmesh-controller"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = dir.path().join("nope");
    let err = run(&["--join", missing.to_str().unwrap(), "--registry", "r.yaml"]);
    assert!(
        err.contains("nope") && err.contains("cluster.json"),
        "{err}"
    );
    let err = run(&["--registry", "r.yaml"]);
    assert!(err.contains("--join"), "{err}");
    // A local source is required: the file registry, Kubernetes, or both.
    let err = run(&["--join", "j"]);
    assert!(
        err.contains("--registry") && err.contains("--kube"),
        "{err}"
    );
    let err = run(&[
        "--join",
        missing.to_str().unwrap(),
        "--registry",
        "r",
        "--clusterset-ip",
        "10.0.0.1",
    ]);
    assert!(err.contains("--clusterset-ip needs --kube"), "{err}");
    let err = run(&[
        "--join",
        "j",
        "--kube",
        "--gateway-service-account",
        "fedmesh-gateway",
    ]);
    assert!(err.contains("expected namespace/name"), "{err}");
}

/// `--kubeconfig` alone: the services of the cluster's ServiceExports reach
/// etcd. The API server is test-support's FakeKube (a fake: none can run
/// here).
#[tokio::test]
async fn runs_on_kubernetes_from_a_kubeconfig() {
    use fedmesh_test_support::{FakeKube, kube_objects};
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let join = dir.path().join("join");
    join_dir(&etcd, &join).await;
    let kube = FakeKube::start("127.0.1.62", Duration::from_secs(1))
        .await
        .unwrap();
    kube.put(&kube_objects::service("shop", "cart", 8080));
    kube.put(&kube_objects::slice(
        "shop",
        "cart-1",
        "cart",
        9376,
        &[("10.1.0.1", "az1", true)],
    ));
    kube.put(&kube_objects::export("shop", "cart"));
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: c, context: {{cluster: fake, user: u}}}}]\ncurrent-context: c\n",
            kube.url()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedmesh-controller"))
        .args([
            "--join",
            join.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ])
        .args(["--listen", "127.0.1.2:0", "--admin", "127.0.1.2:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let c = etcd.client().await.unwrap();
    export_in_etcd(&c).await;
    let _ = child.kill();
    let _ = child.wait();

    // A kubeconfig that is not there is named.
    let out = Command::new(env!("CARGO_BIN_EXE_fedmesh-controller"))
        .args([
            "--join",
            join.to_str().unwrap(),
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
}

/// Out of file descriptors, the discovery listener's accepts fail. The
/// controller logs it, keeps listening, and serves again once descriptors
/// are free: proxies can renew their SVIDs afterwards.
#[tokio::test]
async fn the_discovery_listener_survives_running_out_of_descriptors() {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let join = dir.path().join("join");
    let bundle = join_dir(&etcd, &join).await;
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, "services: []\n").unwrap();
    let tokens = dir.path().join("tokens.yaml");
    web_tokens(&tokens);

    // A low descriptor limit for the controller alone.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -n 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_fedmesh-controller"))
        .args(["--join", join.to_str().unwrap()])
        .args(["--registry", registry.to_str().unwrap()])
        .args(["--listen", "127.0.1.2:0", "--admin", "127.0.1.2:0"])
        .args(["--tokens", tokens.to_str().unwrap()])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .unwrap();
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let discovery: std::net::SocketAddr = line
        .split("discovery on ")
        .nth(1)
        .and_then(|s| s.split([' ', ',']).next())
        .unwrap()
        .parse()
        .unwrap();
    let admin = line
        .split("admin on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let warned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = warned.clone();
    std::thread::spawn(move || {
        for l in stdout.lines().map_while(Result::ok) {
            if l.contains("accept failed; still listening") {
                w.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    // Idle connections that never handshake hold a descriptor each.
    let mut hogs = Vec::new();
    for _ in 0..120 {
        if let Ok(c) = tokio::net::TcpStream::connect(discovery).await {
            hogs.push(c);
        }
    }
    eventually("a failed accept", Duration::from_secs(15), || {
        let w = warned.clone();
        async move { w.load(std::sync::atomic::Ordering::Relaxed).then_some(()) }
    })
    .await;
    // Out of descriptors, the controller is not ready (or cannot even
    // answer its probe).
    assert!(!http_get(&admin, "/ready").await.starts_with("HTTP/1.1 200"));
    drop(hogs);

    // Descriptors are free again: ready again by itself, before any
    // discovery client comes back.
    until_ready(&admin, "ready again", Duration::from_secs(10)).await;

    // Certify works over a fresh connection.
    let access = fedmesh_discovery::ControllerAccess {
        address: discovery,
        controller: "spiffe://aws.fedmesh.test/fedmesh/controller/aws"
            .parse()
            .unwrap(),
        identity: "spiffe://aws.fedmesh.test/ns/shop/sa/web".parse().unwrap(),
        credential: fedmesh_discovery::Credential::JoinToken(
            "web-token-0123456789abcdef0123456789".into(),
        ),
        node: "test".into(),
    };
    let mut set = fedmesh_trust::BundleSet::new();
    set.insert(bundle);
    let (_tx, bundles) = tokio::sync::watch::channel(std::sync::Arc::new(set));
    let svid = eventually(
        "Certify after the exhaustion",
        Duration::from_secs(20),
        || {
            let (access, bundles) = (access.clone(), bundles.clone());
            async move {
                fedmesh_discovery::certify(&access, bundles, None)
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://aws.fedmesh.test/ns/shop/sa/web"
    );
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tokens file granting the web token, as `fedmesh token create` writes one.
fn web_tokens(path: &std::path::Path) {
    let id = "spiffe://aws.fedmesh.test/ns/shop/sa/web".parse().unwrap();
    fedmesh_zone::TokensFile::granting(
        [("web-token-0123456789abcdef0123456789", id)],
        Duration::from_secs(3600),
    )
    .save(path)
    .unwrap();
}
