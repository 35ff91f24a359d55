//! The `fedmesh-proxy` binary: a bad file is refused with the field named,
//! a static file serves traffic and exposes metrics, SIGTERM drains it to a
//! clean exit, and a restart through `--handoff` drops no request.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::proxy as support;

use std::time::Duration;

use support::gw::Domain;
use support::{Backend, ProxyProcess, get, static_config};

const BIN: &str = env!("CARGO_BIN_EXE_fedmesh-proxy");

#[test]
fn a_bad_file_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("retries: many", "settings: {retries: many}"),
        ("failoverThreshold", "settings: {failoverThreshold: 0}"),
        (
            "identity.certificate",
            "identity: {certificate: nope.pem, key: nope.pem}",
        ),
    ];
    for (want, extra) in cases {
        let path = dir.path().join("proxy.yaml");
        std::fs::write(
            &path,
            format!(
                "cluster: aws\ntrustDomain: aws.fedmesh.test\nlocality: {{cloud: aws, region: r1, zone: az1}}\nlisten: {{http: 127.0.71.5:0}}\n{extra}\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{want}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("proxy.yaml") && err.contains(want),
            "{want}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_file_serves_and_sigterm_drains() {
    let d = Domain::new("aws", "aws.fedmesh.test", 72);
    let b = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let dir = tempfile::tempdir().unwrap();
    let config = static_config(dir.path(), &d, b.addr, true, "{accessLog: json}");
    let p = ProxyProcess::start(&config, "info").await;
    let (http, admin, child) = (p.http.unwrap(), p.admin.unwrap(), p.child);
    assert_eq!(get(http, "cart.shop").await.unwrap().cluster, "aws");

    let metrics = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(
        metrics.contains(r#"fedmesh_proxy_requests_total{service="shop/cart",cluster="aws",zone="az1",outcome="success"} 1"#),
        "{metrics}"
    );

    let pid = child.id().unwrap();
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the proxy did not stop on SIGTERM")
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        logs.lines()
            .any(|l| l.starts_with('{') && l.contains(r#""status":200"#)),
        "a JSON access log line: {logs}"
    );
}

/// Keep-alive clients send GETs back to back while a second proxy takes
/// over the first one's listeners: no request fails, the first proxy
/// drains and exits on its own, and the second serves on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_through_the_handoff_drops_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let d = Domain::new("aws", "aws.fedmesh.test", 73);
    let b = Backend::new(d.ip(10), "aws", "az1", "cart").await;
    let dir = tempfile::tempdir().unwrap();
    // Fixed ports, in this test's own block: the successor names the same
    // addresses to take them over.
    let config = static_config(dir.path(), &d, b.addr, true, "{drainTimeout: 10s}");
    let yaml = std::fs::read_to_string(&config).unwrap();
    let ip = d.ip(5);
    let yaml = yaml
        .replace(
            &format!("http: \"{ip}:0\""),
            &format!("http: \"{ip}:4140\""),
        )
        .replace(
            &format!("admin: \"{ip}:0\""),
            &format!("admin: \"{ip}:4191\""),
        );
    std::fs::write(&config, yaml).unwrap();
    let handoff = dir.path().join("proxy.handoff");
    let args = [std::ffi::OsStr::new("--handoff"), handoff.as_os_str()];
    let old = ProxyProcess::start_with_args(&config, "info", &args).await;
    let http = old.http.unwrap();
    assert_eq!(http.port(), 4140);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut client: Option<support::Client> = None;
            let mut errors = Vec::new();
            // Bounded: at most 200,000 requests, and stopped by the test.
            for _ in 0..200_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let reusable = match client.as_mut() {
                    Some(c) => c.usable().await,
                    None => false,
                };
                if !reusable {
                    match support::Client::connect(http).await {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("connect: {e}"));
                            continue;
                        }
                    }
                }
                match client.as_mut().unwrap().get("cart.shop").await {
                    Ok(a) if a.cluster == "aws" => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(a) => panic!("{a:?}"),
                    Err(e) => {
                        errors.push(e);
                        client = None;
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }
    let wait_for = |n: u64| {
        let ok = ok.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            let from = ok.load(Ordering::Relaxed);
            while ok.load(Ordering::Relaxed) < from + n {
                assert!(tokio::time::Instant::now() < deadline, "load stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(500).await;

    let new = ProxyProcess::start_with_args(&config, "info", &args).await;
    assert_eq!(new.http, Some(http), "the same listener");
    let out = tokio::time::timeout(Duration::from_secs(15), old.child.wait_with_output())
        .await
        .expect("the old proxy did not drain and exit")
        .unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        logs.contains("a new proxy took over the listeners"),
        "{logs}"
    );
    let served_by_old = ok.load(Ordering::Relaxed);
    wait_for(500).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) >= served_by_old + 500);
    // And the successor offers them on in turn.
    assert!(handoff.exists());
    drop(new);
}
