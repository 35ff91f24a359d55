//! The harness against a real etcd.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use fedmesh_test_support::{Etcd, EtcdOptions, eventually};

#[tokio::test]
async fn starts_healthy_on_loopback_and_serves_reads_and_writes() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    assert!(etcd.client_addr().ip().is_loopback());
    let mut c = etcd.client().await?;
    c.put("/fedmesh/v1/probe", "hello", None).await?;
    let got = c.get("/fedmesh/v1/probe", None).await?;
    assert_eq!(got.kvs()[0].value(), b"hello");
    Ok(())
}

#[tokio::test]
async fn binds_the_requested_cluster_address() -> anyhow::Result<()> {
    let host = IpAddr::V4(Ipv4Addr::new(127, 0, 7, 1));
    let etcd = Etcd::start_with(EtcdOptions {
        host,
        ..Default::default()
    })
    .await?;
    assert_eq!(etcd.client_addr().ip(), host);
    etcd.client().await?.status().await?;
    Ok(())
}

#[tokio::test]
async fn two_instances_run_side_by_side() -> anyhow::Result<()> {
    let (a, b) = tokio::try_join!(Etcd::start(), Etcd::start())?;
    assert_ne!(a.client_addr(), b.client_addr());
    a.client().await?.put("k", "a", None).await?;
    let on_b = b.client().await?.get("k", None).await?;
    assert!(on_b.kvs().is_empty(), "instances must not share data");
    Ok(())
}

#[tokio::test]
async fn drop_kills_the_process_and_removes_the_data_dir() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let pid = etcd.pid().expect("running");
    let dir = etcd.data_dir().to_path_buf();
    let addr = etcd.client_addr();
    assert!(dir.exists());
    drop(etcd);
    assert!(!dir.exists(), "data dir {} left behind", dir.display());
    // The pid is reaped by drop, so /proc no longer has it (or has another
    // process that reused the number, which cannot be etcd on our port).
    eventually("etcd's port to close", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(addr).is_err().then_some(())
    })
    .await;
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !cmdline.contains(&addr.to_string()),
        "etcd {pid} still running"
    );
    Ok(())
}

#[tokio::test]
async fn kill_is_an_outage_and_restart_keeps_address_and_data() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let addr = etcd.client_addr();
    etcd.client().await?.put("durable", "yes", None).await?;

    etcd.kill();
    assert!(etcd.pid().is_none());
    let mut offline = etcd_client::Client::connect(
        [etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_timeout(Duration::from_millis(500))),
    )
    .await?;
    assert!(
        offline.get("durable", None).await.is_err(),
        "a killed etcd must not answer"
    );

    etcd.restart().await?;
    assert_eq!(etcd.client_addr(), addr);
    let got = etcd.client().await?.get("durable", None).await?;
    assert_eq!(got.kvs()[0].value(), b"yes");
    Ok(())
}

#[tokio::test]
async fn auth_mode_requires_credentials() -> anyhow::Result<()> {
    let etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await?;
    assert!(etcd.root_password().is_some());

    // Root can write.
    etcd.client()
        .await?
        .put("/fedmesh/v1/clusters/a", "{}", None)
        .await?;

    // Anonymous clients cannot read or write.
    let mut anon = etcd.anonymous_client().await?;
    let err = anon
        .put("/fedmesh/v1/clusters/a", "evil", None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("user name is empty")
            || err.to_string().contains("permission denied"),
        "{err}"
    );
    assert!(anon.get("/fedmesh/v1/clusters/a", None).await.is_err());

    // A wrong password is refused at connect time.
    let wrong = etcd_client::Client::connect(
        [etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_user("root", "not-the-password")),
    )
    .await;
    assert!(wrong.is_err());

    // The value root wrote is intact.
    let got = etcd
        .client()
        .await?
        .get("/fedmesh/v1/clusters/a", None)
        .await?;
    assert_eq!(got.kvs()[0].value(), b"{}");
    Ok(())
}

#[tokio::test]
async fn auth_survives_restart() -> anyhow::Result<()> {
    let mut etcd = Etcd::start_with(EtcdOptions {
        auth: true,
        ..Default::default()
    })
    .await?;
    etcd.restart().await?;
    etcd.client().await?.put("k", "v", None).await?;
    assert!(
        etcd.anonymous_client()
            .await?
            .put("k", "x", None)
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test]
async fn missing_binary_is_a_clear_error() {
    let opts = EtcdOptions {
        binary: Some("/nonexistent/etcd".into()),
        ..Default::default()
    };
    let err = Etcd::start_with(opts).await.unwrap_err().to_string();
    assert!(
        err.contains("/nonexistent/etcd") && err.contains("etcd-server"),
        "{err}"
    );
}

#[tokio::test]
async fn relay_forwards_until_cut_and_again_after_restore() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let relay =
        fedmesh_test_support::TcpRelay::start(IpAddr::V4(Ipv4Addr::LOCALHOST), etcd.client_addr())
            .await?;
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_millis(500));
    let mut c =
        etcd_client::Client::connect([format!("http://{}", relay.addr())], Some(opts)).await?;
    c.put("k", "v", None).await?;
    relay.cut().await;
    assert!(
        c.get("k", None).await.is_err(),
        "a cut relay must not forward"
    );
    relay.restore();
    let got = eventually(
        "the relay to forward again",
        Duration::from_secs(10),
        || {
            let mut c = c.clone();
            async move { c.get("k", None).await.ok() }
        },
    )
    .await;
    assert_eq!(got.kvs()[0].value(), b"v");
    Ok(())
}

#[tokio::test]
async fn with_tls_serves_only_verified_clients_with_certificates() -> anyhow::Result<()> {
    let etcd = Etcd::start_with(EtcdOptions {
        tls: true,
        auth: true,
        ..Default::default()
    })
    .await?;
    assert!(
        etcd.endpoint().starts_with("https://"),
        "{}",
        etcd.endpoint()
    );
    let mut c = etcd.client().await?;
    c.put("k", "v", None).await?;
    assert_eq!(c.get("k", None).await?.kvs()[0].value(), b"v");

    // Plaintext to a TLS port gets nowhere.
    let plain = format!("http://{}", etcd.client_addr());
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2));
    let refused = match etcd_client::Client::connect([plain], Some(opts)).await {
        Ok(mut c) => c.status().await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was served by a TLS etcd");

    // Verified server, but no client certificate: refused by --client-cert-auth.
    let ca = std::fs::read(etcd.ca_file().unwrap())?;
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_tls(
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)),
        );
    let refused = match etcd_client::Client::connect([etcd.endpoint()], Some(opts)).await {
        Ok(mut c) => c.status().await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");
    Ok(())
}
