//! The `fedmesh-proxy` binary: a bad file is refused with the field named,
//! a static file serves traffic and exposes metrics, and SIGTERM drains
//! it to a clean exit.

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
