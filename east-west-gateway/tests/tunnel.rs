//! The gateway end to end, on real sockets: a proxy's TLS connection to an
//! egress gateway in cluster A, QUIC to the ingress gateway of cluster B,
//! TCP to an echo backend. Each cluster has its own CA and trust domain.
#![allow(clippy::unwrap_used)]

use fedmesh_testbed::gateway as support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_gateway::routes::AllowRule;
use fedmesh_gateway::splice::{read_frame, write_frame};
use fedmesh_gateway::{Settings, quic};
use fedmesh_proto::tunnel::v1::{TunnelAccept, TunnelOpen, tunnel_accept::Status};
use fedmesh_test_support::{UdpRelay, eventually};
use fedmesh_trust::{BundleSet, SpiffeId, Svid};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const ECHO: &str = "shop/echo";

struct Pair {
    a: Domain,
    b: Domain,
    gw_a: Gw,
    gw_b: Gw,
    echo: Echo,
    proxy: Arc<rustls::ClientConfig>,
}

/// Cluster A (aws-use1, 127.0.1.x) with an egress; cluster B (gcp-usc1,
/// 127.0.2.x) with an ingress in front of an echo service.
async fn pair(settings_b: Settings) -> Pair {
    pair_with(Settings::default(), settings_b).await
}

/// [`pair`], with settings for aws's gateway (the egress) too.
async fn pair_with(settings_a: Settings, settings_b: Settings) -> Pair {
    let a = Domain::new("aws-use1", "aws.example", 1);
    let b = Domain::new("gcp-usc1", "gcp.example", 2);
    let echo = Echo::start(b.ip(10)).await;
    let mut rb = b.routes("usc1-a");
    rb.peers.extend([a.as_peer(vec![])]);
    export(&mut rb, ECHO, 8080, &[(echo.addr, "usc1-a")]);
    let gw_b = start_gateway(&b, 1, false, bundles(&[&a, &b]), rb, settings_b).await;
    let mut ra = a.routes("use1-a");
    ra.peers.extend([b.as_peer(vec![gw_b.quic()])]);
    let gw_a = start_gateway(&a, 1, true, bundles(&[&a, &b]), ra, settings_a).await;
    let proxy = proxy_tls(a.workload_svid("shop", "web"), bundles(&[&a]), &a);
    Pair {
        a,
        b,
        gw_a,
        gw_b,
        echo,
        proxy,
    }
}

impl Pair {
    async fn open(
        &self,
        open: &TunnelOpen,
    ) -> (
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        TunnelAccept,
    ) {
        open_tunnel(self.gw_a.egress(), self.proxy.clone(), open)
            .await
            .unwrap()
    }

    /// A raw QUIC connection from aws (loopback host `host`) to gcp's
    /// ingress, presenting `svid`.
    async fn dial_from_aws(
        &self,
        host: u8,
        svid: Svid,
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        raw_connect(
            self.a.ip(host),
            svid,
            bundles(&[&self.a, &self.b]),
            self.b.gateway_id(),
            self.gw_b.quic(),
        )
        .await
    }

    async fn status(&self, open: &TunnelOpen) -> (Status, String) {
        let (_, a) = self.open(open).await;
        (Status::try_from(a.status).unwrap(), a.message)
    }
}

/// Echoes `msg` through an open tunnel.
async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabytes_round_trip_byte_exact() {
    // With `revealEndpoint` (debugging), the accept names the backend.
    let p = pair(Settings {
        reveal_endpoint: true,
        ..Settings::default()
    })
    .await;
    let (s, accept) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(accept.status, Status::Ok as i32, "{accept:?}");
    assert_eq!(accept.endpoint, p.echo.addr.to_string());
    const TOTAL: u64 = 100 * 1024 * 1024;
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0;
        while off < TOTAL {
            pattern(off, &mut buf);
            w.write_all(&buf).await.unwrap();
            off += buf.len() as u64;
        }
        w.shutdown().await.unwrap();
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        pattern(off, &mut want[..n]);
        assert!(buf[..n] == want[..n], "bytes differ after offset {off}");
        off += n as u64;
    }
    writer.await.unwrap();
    assert_eq!(off, TOTAL, "the echo ended early");
    let sent = p
        .gw_a
        .sample("fedmesh_gateway_bytes_total{peer_cluster=\"gcp-usc1\",flow=\"to_peer\"}");
    assert_eq!(sent as u64, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_one_connection() {
    let p = Arc::new(pair(Settings::default()).await);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let (mut s, accept) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
            assert_eq!(accept.status, Status::Ok as i32, "{accept:?}");
            // By default no backend address leaves the cluster.
            assert_eq!(accept.endpoint, "", "{accept:?}");
            let msg = format!("stream {i} ").repeat(100);
            s.write_all(msg.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = String::new();
            s.read_to_string(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let opened = p.gw_b.sample(
        "fedmesh_gateway_streams_opened_total{direction=\"ingress\",peer_cluster=\"aws-use1\"}",
    );
    assert_eq!(opened, 1000.0);
    assert_eq!(p.echo.accepted(), 1000);
    assert!(p.gw_a.gateway.pool().connected(p.gw_b.quic()));
    let handshakes = p.gw_a.sample("fedmesh_gateway_handshake_failures_total");
    assert_eq!(handshakes, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_comes_before_any_application_byte() {
    let settings = Settings {
        max_streams_per_peer: 1,
        ..Settings::default()
    };
    let p = pair(settings).await;
    let closed_port = {
        let l = std::net::TcpListener::bind((p.b.ip(11), 0)).unwrap();
        l.local_addr().unwrap()
    };
    p.gw_b.update(|r| {
        export(r, "shop/down", 8080, &[(closed_port, "usc1-a")]);
        export(r, "shop/sick", 8080, &[(p.echo.addr, "usc1-a")]);
        let sick = r.services.get_mut(&"shop/sick".parse().unwrap()).unwrap();
        sick.endpoints[0].healthy = false;
        export(r, "shop/guarded", 8080, &[(p.echo.addr, "usc1-a")]);
        r.services
            .get_mut(&"shop/guarded".parse().unwrap())
            .unwrap()
            .allow = Some(vec![AllowRule {
            cluster: "aws-use1".into(),
            identities: vec![SpiffeId::parse("spiffe://aws.example/ns/shop/sa/admin").unwrap()],
        }]);
    });

    let cases: Vec<(TunnelOpen, Status, &str)> = vec![
        (
            open_msg("shop/nope", 8080, "gcp-usc1"),
            Status::UnknownService,
            "does not export",
        ),
        (
            open_msg(ECHO, 9090, "gcp-usc1"),
            Status::UnknownService,
            "not 9090",
        ),
        (
            open_msg("shop/down", 8080, "gcp-usc1"),
            Status::NoHealthyEndpoints,
            "no endpoint accepted",
        ),
        (
            open_msg("shop/sick", 8080, "gcp-usc1"),
            Status::NoHealthyEndpoints,
            "no healthy endpoint",
        ),
        (
            open_msg("shop/guarded", 8080, "gcp-usc1"),
            Status::Forbidden,
            "may not reach",
        ),
        (
            open_msg("Shop/x", 8080, "gcp-usc1"),
            Status::BadRequest,
            "namespace",
        ),
        (
            open_msg(ECHO, 8080, "aws-use1"),
            Status::BadRequest,
            "own cluster",
        ),
        (
            open_msg(ECHO, 8080, "azure-weu"),
            Status::Unreachable,
            "not federated",
        ),
    ];
    for (open, want, says) in cases {
        let (mut s, a) = p.open(&open).await;
        let status = Status::try_from(a.status).unwrap();
        assert_eq!(status, want, "{open:?}: {a:?}");
        assert!(
            a.message.contains(says),
            "{:?} should say {says:?}",
            a.message
        );
        // The stream ends after the refusal.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }
    assert_eq!(p.echo.accepted(), 0, "a refused stream reached the backend");

    // Pipelined bytes after a refused TunnelOpen go nowhere.
    let (mut s, a) = p.open(&open_msg("shop/guarded", 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Forbidden as i32);
    let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;

    // OVERLOADED: the limit is one stream per peer cluster.
    let (mut held, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Ok as i32);
    ping(&mut held, b"held").await;
    let (status, msg) = p.status(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(status, Status::Overloaded, "{msg}");
    drop(held);
    eventually(
        "the slot to be released",
        Duration::from_secs(10),
        || async {
            let (status, _) = p.status(&open_msg(ECHO, 8080, "gcp-usc1")).await;
            (status == Status::Ok).then_some(())
        },
    )
    .await;

    // UNREACHABLE: a peer whose only gateway does not answer.
    let silent = std::net::UdpSocket::bind((p.b.ip(12), 0)).unwrap();
    let c = Domain::new("azure-weu", "azure.example", 3);
    p.gw_a.update(|r| {
        r.peers.extend([(
            "azure-weu".to_string(),
            fedmesh_gateway::routes::Peer {
                trust_domain: c.td.clone(),
                gateways: vec![silent.local_addr().unwrap().into()],
            },
        )]);
    });
    let mut open = open_msg(ECHO, 8080, "azure-weu");
    open.deadline_ms = 3000;
    let (status, msg) = p.status(&open).await;
    assert_eq!(status, Status::Unreachable, "{msg}");
    // Now in backoff: the next stream fails fast, without a handshake.
    let t = tokio::time::Instant::now();
    let (status, msg) = p.status(&open).await;
    assert_eq!(status, Status::Unreachable, "{msg}");
    assert!(
        msg.contains("backoff") || t.elapsed() < Duration::from_secs(3),
        "{msg}"
    );

    for status in [
        "unknown_service",
        "no_healthy_endpoints",
        "forbidden",
        "overloaded",
    ] {
        let line = format!(
            "fedmesh_gateway_streams_refused_total{{direction=\"ingress\",peer_cluster=\"aws-use1\",status=\"{status}\"}}"
        );
        assert!(p.gw_b.sample(&line) >= 1.0, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_are_bad_requests() {
    let p = pair(Settings::default()).await;
    // Raw bytes to the egress: an oversized prefix, then garbage.
    for raw in [vec![0xff, 0xff, 0xff, 0xff], {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend([0xff, 0xff, 0xff]);
        v
    }] {
        let tcp = tokio::net::TcpStream::connect(p.gw_a.egress())
            .await
            .unwrap();
        let name = rustls_pki_types::ServerName::try_from("x").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(p.proxy.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        s.write_all(&raw).await.unwrap();
        let a: TunnelAccept = read_frame("TunnelAccept", &mut s).await.unwrap();
        assert_eq!(a.status, Status::BadRequest as i32, "{a:?}");
    }
    // No ALPN: an unknown protocol version.
    let mut no_alpn = (*p.proxy).clone();
    no_alpn.alpn_protocols.clear();
    let (_, a) = open_tunnel(
        p.gw_a.egress(),
        Arc::new(no_alpn),
        &open_msg(ECHO, 8080, "gcp-usc1"),
    )
    .await
    .unwrap();
    assert_eq!(a.status, Status::BadRequest as i32);
    assert!(a.message.contains("protocol version"), "{}", a.message);
}

/// The egress counts a local client refused for its certificate as a
/// trust failure (`tls`), and a TCP port probe that closes without a word
/// as `closed`: drills judge the first, and probes must not trip them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_tells_a_port_probe_from_a_refused_certificate() {
    let p = pair(Settings::default()).await;
    let series = |reason: &str| {
        format!(
            "fedmesh_gateway_handshake_failures_total{{direction=\"egress\",peer_cluster=\"local\",reason=\"{reason}\"}}"
        )
    };
    drop(
        tokio::net::TcpStream::connect(p.gw_a.egress())
            .await
            .unwrap(),
    );
    eventually(
        "the probe to be counted",
        Duration::from_secs(5),
        || async { (p.gw_a.sample(&series("closed")) >= 1.0).then_some(()) },
    )
    .await;
    assert_eq!(p.gw_a.sample(&series("tls")), 0.0);

    // A workload of a domain the gateway does not trust.
    let stranger = Domain::new("evil", "evil.example", 9);
    let tls = proxy_tls(
        stranger.workload_svid("shop", "web"),
        bundles(&[&p.a, &stranger]),
        &p.a,
    );
    let r = open_tunnel(p.gw_a.egress(), tls, &open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert!(r.is_err(), "a stranger got an answer: {r:?}");
    eventually(
        "the refusal to be counted",
        Duration::from_secs(5),
        || async { (p.gw_a.sample(&series("tls")) >= 1.0).then_some(()) },
    )
    .await;
}

/// A QUIC client holding `svid`, that accepts only `peer`.
async fn raw_connect(
    ip: std::net::IpAddr,
    svid: Svid,
    bundles: BundleSet,
    peer: SpiffeId,
    to: SocketAddr,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = quinn::Endpoint::client(SocketAddr::new(ip, 0)).unwrap();
    let (_s, svid) = watch::channel(Arc::new(svid));
    let (_b, bundles) = watch::channel(Arc::new(bundles));
    let transport = Arc::new(quic::transport(&Settings::default()).unwrap());
    let cfg = quic::client_config(svid, bundles, peer, transport).unwrap();
    endpoint.connect_with(cfg, to, "gw").unwrap().await
}

async fn raw_stream(conn: &quinn::Connection, header: &[u8]) -> Result<TunnelAccept, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(header).await.map_err(|e| e.to_string())?;
    read_frame::<TunnelAccept>("TunnelAccept", &mut recv)
        .await
        .map_err(|e| e.to_string())
}

/// Why the gateway refused or closed a connection, waiting at most 10 s
/// for the close (a connection that stays open fails the test, not hangs it).
async fn close_reason(conn: Result<quinn::Connection, quinn::ConnectionError>) -> String {
    let c = match conn {
        Err(e) => return e.to_string(),
        Ok(c) => c,
    };
    match tokio::time::timeout(Duration::from_secs(10), c.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(a)) => {
            String::from_utf8_lossy(&a.reason).into_owned()
        }
        Ok(other) => other.to_string(),
        Err(_) => panic!("the connection is still open after 10 s"),
    }
}

fn framed(open: &TunnelOpen) -> Vec<u8> {
    fedmesh_gateway::frame::encode(open).unwrap()
}

/// A raw connection from aws's gateway identity to gcp's gateway, with one
/// live echo tunnel on it, and the header that opened it.
async fn live_tunnel(
    p: &Pair,
    host: u8,
) -> (
    quinn::Connection,
    TunnelOpen,
    tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
) {
    let conn = p.dial_from_aws(host, p.a.gateway_svid()).await.unwrap();
    let mut good = open_msg(ECHO, 8080, "gcp-usc1");
    good.source_identity = "spiffe://aws.example/ns/shop/sa/web".into();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    write_frame(&mut send, &good).await.unwrap();
    let a: TunnelAccept = read_frame("TunnelAccept", &mut recv).await.unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    let mut live = tokio::io::join(recv, send);
    ping(&mut live, b"before").await;
    (conn, good, live)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_streams_never_disturb_their_neighbours() {
    let p = pair(Settings::default()).await;
    let (conn, good, mut live) = live_tunnel(&p, 50).await;

    let mut garbage = 3u32.to_be_bytes().to_vec();
    garbage.extend([0xff, 0xff, 0xff]);
    let mut foreign = good.clone();
    foreign.source_identity = "spiffe://gcp.example/ns/shop/sa/web".into();
    let mut anonymous = good.clone();
    anonymous.source_identity.clear();
    let cases: Vec<(Vec<u8>, Status)> = vec![
        (vec![0xff, 0xff, 0xff, 0xff], Status::BadRequest),
        (garbage, Status::BadRequest),
        (framed(&foreign), Status::Forbidden),
        (framed(&anonymous), Status::BadRequest),
    ];
    for (header, want) in cases {
        let a = raw_stream(&conn, &header).await.unwrap();
        assert_eq!(a.status, want as i32, "{a:?}");
    }
    // A header cut short: the stream ends without an answer.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&framed(&good)[..6]).await.unwrap();
    send.finish().unwrap();
    assert!(
        read_frame::<TunnelAccept>("TunnelAccept", &mut recv)
            .await
            .is_err()
    );

    ping(&mut live, b"after").await;
    assert!(conn.close_reason().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_stamps_the_proxys_identity_and_keeps_the_trace() {
    let p = pair(Settings::default()).await;
    // A fake ingress for cluster B that records what it is sent.
    let (_s, svid) = watch::channel(Arc::new(p.b.gateway_svid()));
    let (_b, bset) = watch::channel(Arc::new(bundles(&[&p.a, &p.b])));
    let transport = Arc::new(quic::transport(&Settings::default()).unwrap());
    let server = quic::server_config(
        svid,
        bset,
        Arc::new(fedmesh_trust::AllowAnyVerified),
        transport,
    )
    .unwrap();
    let fake = quinn::Endpoint::server(server, SocketAddr::new(p.b.ip(20), 0)).unwrap();
    let fake_addr = fake.local_addr().unwrap();
    let seen = tokio::spawn(async move {
        let conn = fake.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let open: TunnelOpen = read_frame("TunnelOpen", &mut recv).await.unwrap();
        write_frame(
            &mut send,
            &fedmesh_gateway::frame::accept_ok("10.0.0.1:80".into()),
        )
        .await
        .unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
        open
    });
    p.gw_a
        .update(|r| r.peers.get_mut("gcp-usc1").unwrap().gateways = vec![fake_addr.into()]);
    let mut open = open_msg(ECHO, 8080, "gcp-usc1");
    open.source_identity = "spiffe://aws.example/ns/kube-system/sa/admin".into();
    let (_, a) = p.open(&open).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    assert_eq!(a.endpoint, "10.0.0.1:80");
    let got = seen.await.unwrap();
    assert_eq!(got.source_identity, "spiffe://aws.example/ns/shop/sa/web");
    assert_eq!(got.traceparent, open.traceparent);
    assert_eq!((got.service.as_str(), got.port), (ECHO, 8080));
    assert!(
        got.deadline_ms > 0 && got.deadline_ms <= 5000,
        "{}",
        got.deadline_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gateways_are_refused_at_the_handshake() {
    let p = pair(Settings::default()).await;
    // Right SPIFFE ID, wrong CA.
    let forged = Domain::new("aws-use1", "aws.example", 1);
    let forged_svid = forged.gateway_svid();
    let trusting_b = bundles(&[&p.a, &p.b]);
    let result = raw_connect(
        p.a.ip(51),
        forged_svid,
        trusting_b.clone(),
        p.b.gateway_id(),
        p.gw_b.quic(),
    )
    .await;
    if let Ok(conn) = result {
        // The client may finish its side before the server has judged its
        // certificate; then the server's close follows.
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .unwrap();
        assert!(
            !matches!(reason, quinn::ConnectionError::LocallyClosed),
            "{reason}"
        );
        assert!(
            raw_stream(&conn, &framed(&open_msg(ECHO, 8080, "gcp-usc1")))
                .await
                .is_err()
        );
    }
    eventually("the ingress to count the failed handshake", Duration::from_secs(5), || async {
        let n = p.gw_b.sample(
            "fedmesh_gateway_handshake_failures_total{direction=\"ingress\",peer_cluster=\"unknown\",reason=\"certificate\"}",
        );
        (n >= 1.0).then_some(())
    })
    .await;

    // A well-formed gateway of a cluster B is not federated with.
    let stranger = Domain::new("azure-weu", "azure.example", 3);
    let mut with_stranger = trusting_b.clone();
    with_stranger.insert(stranger.bundle());
    let result = raw_connect(
        stranger.ip(1),
        stranger.gateway_svid(),
        with_stranger,
        p.b.gateway_id(),
        p.gw_b.quic(),
    )
    .await;
    if let Ok(conn) = result {
        assert!(
            raw_stream(&conn, &framed(&open_msg(ECHO, 8080, "gcp-usc1")))
                .await
                .is_err()
        );
    }

    // The egress side: A's egress dials a gateway that holds a forged B
    // identity; it is refused and the stream is UNREACHABLE.
    let forged_b = Domain::new("gcp-usc1", "gcp.example", 2);
    let mut rb = forged_b.routes("usc1-a");
    rb.peers.extend([p.a.as_peer(vec![])]);
    export(&mut rb, ECHO, 8080, &[(p.echo.addr, "usc1-a")]);
    let impostor = start_gateway(
        &forged_b,
        2,
        false,
        bundles(&[&p.a, &forged_b]),
        rb,
        Settings::default(),
    )
    .await;
    p.gw_a
        .update(|r| r.peers.get_mut("gcp-usc1").unwrap().gateways = vec![impostor.quic().into()]);
    let (status, msg) = p.status(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(status, Status::Unreachable, "{msg}");
    let failures = p.gw_a.sample(
        "fedmesh_gateway_handshake_failures_total{direction=\"egress\",peer_cluster=\"gcp-usc1\",reason=\"certificate\"}",
    );
    assert_eq!(failures, 1.0);
    assert_eq!(p.echo.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_with_live_streams_loses_none() {
    let mut p = pair(Settings::default()).await;
    let mut live = Vec::new();
    for _ in 0..20 {
        let (mut s, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
        assert_eq!(a.status, Status::Ok as i32);
        ping(&mut s, b"before rotation").await;
        live.push(s);
    }
    // B rotates: the new root is published next to the old one, B's
    // gateway gets a leaf from the new root.
    let old_b = std::mem::replace(&mut p.b, Domain::new("gcp-usc1", "gcp.example", 2));
    let mut both = p.b.bundle();
    both.add_root(old_b.ca.cert_der().clone());
    let mut set = bundles(&[&p.a]);
    set.insert(both);
    p.gw_a.bundles.send_replace(Arc::new(set.clone()));
    p.gw_b.bundles.send_replace(Arc::new(set));
    p.gw_b.svid.send_replace(Arc::new(p.b.gateway_svid()));
    for s in &mut live {
        ping(s, b"during rotation").await;
    }
    // A new connection (a second egress in A) sees B's new leaf.
    let mut ra = p.a.routes("use1-a");
    ra.peers.extend([p.b.as_peer(vec![p.gw_b.quic()])]);
    let a2 = start_gateway(
        &p.a,
        2,
        true,
        (**p.gw_a.bundles.borrow()).clone(),
        ra,
        Settings::default(),
    )
    .await;
    let (mut s, a) = open_tunnel(
        a2.egress(),
        p.proxy.clone(),
        &open_msg(ECHO, 8080, "gcp-usc1"),
    )
    .await
    .unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    ping(&mut s, b"new connection").await;
    // The old root goes once its last leaf is gone.
    let set = bundles(&[&p.a, &p.b]);
    p.gw_a.bundles.send_replace(Arc::new(set.clone()));
    p.gw_b.bundles.send_replace(Arc::new(set.clone()));
    a2.bundles.send_replace(Arc::new(set));
    for s in &mut live {
        ping(s, b"after rotation").await;
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
    let aborted = p.gw_a.sample("fedmesh_gateway_handshake_failures_total");
    assert_eq!(aborted, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_nat_rebinding() {
    let p = pair(Settings::default()).await;
    let relay = UdpRelay::start(p.a.ip(99), p.gw_b.quic()).await.unwrap();
    p.gw_a
        .update(|r| r.peers.get_mut("gcp-usc1").unwrap().gateways = vec![relay.addr().into()]);
    let (mut s, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    ping(&mut s, &vec![7u8; 256 * 1024]).await;
    let before = relay.source().unwrap();
    let after = relay.rebind().await.unwrap();
    assert_ne!(before.port(), after.port());
    ping(&mut s, &vec![8u8; 256 * 1024]).await;
    ping(&mut s, b"still here").await;
    let (mut s2, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    ping(&mut s2, b"new stream on the same connection").await;
    assert_eq!(
        p.gw_a.sample("fedmesh_gateway_handshake_failures_total"),
        0.0
    );
}

/// Draining refuses new streams (OVERLOADED, which the egress passes on,
/// and openers retry elsewhere) and ends with nothing cut: a tunnel idle
/// after its answer (a pooled upstream connection) is closed once quiet
/// for `DRAIN_IDLE`, not waited for until the drain's deadline. (One whose answer is due
/// is left to finish: `draining_leaves_a_tunnel_awaiting_its_answer_alone`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_refuses_new_streams_and_ends_with_nothing_cut() {
    let p = pair(Settings {
        drain_timeout: Duration::from_secs(30),
        ..Settings::default()
    })
    .await;
    let (mut s, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Ok as i32);
    ping(&mut s, b"before drain").await;
    let Pair {
        gw_a, gw_b, proxy, ..
    } = p;
    assert_eq!(gw_b.gateway.active_streams(), 1);
    let drain = tokio::spawn(async move { gw_b.gateway.shutdown().await });
    let refused = eventually(
        "new streams to be refused",
        Duration::from_secs(10),
        || async {
            let (_, a) = open_tunnel(
                gw_a.egress(),
                proxy.clone(),
                &open_msg(ECHO, 8080, "gcp-usc1"),
            )
            .await
            .ok()?;
            (a.status != Status::Ok as i32).then_some(a)
        },
    )
    .await;
    assert!(
        [Status::Overloaded as i32, Status::Unreachable as i32].contains(&refused.status),
        "{refused:?}"
    );
    // The idle tunnel, a client's pooled connection, was closed rather
    // than waited for: the drain ends long before its 30 s deadline, and
    // the client sees its tunnel end.
    let left = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain waited on an idle tunnel")
        .unwrap();
    assert_eq!(left, 0, "a stream was cut short");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the idle tunnel was closed");
}

/// aws's egress gateway and gcp's ingress (`settings`), gcp exporting
/// `service` on port 8080 at `backend` in usc1-a; and a proxy's TLS to
/// aws's egress.
async fn exporting(
    a: &Domain,
    b: &Domain,
    service: &str,
    backend: SocketAddr,
    settings: Settings,
) -> (Gw, Gw, Arc<rustls::ClientConfig>) {
    let mut rb = b.routes("usc1-a");
    rb.peers.extend([a.as_peer(vec![])]);
    export(&mut rb, service, 8080, &[(backend, "usc1-a")]);
    let gw_b = start_gateway(b, 1, false, bundles(&[a, b]), rb, settings).await;
    let mut ra = a.routes("use1-a");
    ra.peers.extend([b.as_peer(vec![gw_b.quic()])]);
    let gw_a = start_gateway(a, 1, true, bundles(&[a, b]), ra, Settings::default()).await;
    let proxy = proxy_tls(a.workload_svid("shop", "web"), bundles(&[a]), a);
    (gw_a, gw_b, proxy)
}

/// A request that takes its backend longer than `DRAIN_IDLE` to answer is
/// not cut by the drain: nothing moves meanwhile, but the last bytes were
/// the request, so the tunnel awaits its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_leaves_a_tunnel_awaiting_its_answer_alone() {
    let a = Domain::new("aws-use1", "aws.example", 54);
    let b = Domain::new("gcp-usc1", "gcp.example", 55);
    // A backend that answers each read after 1.5 s.
    let slow = tokio::net::TcpListener::bind((b.ip(10), 0)).await.unwrap();
    let slow_addr = slow.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = slow.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    if c.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let settings = Settings {
        drain_timeout: Duration::from_secs(30),
        ..Settings::default()
    };
    let (gw_a, gw_b, proxy) = exporting(&a, &b, "shop/slow", slow_addr, settings).await;
    let (mut live, accept) = open_tunnel(
        gw_a.egress(),
        proxy,
        &open_msg("shop/slow", 8080, "gcp-usc1"),
    )
    .await
    .unwrap();
    assert_eq!(accept.status(), Status::Ok);
    live.write_all(b"slow question").await.unwrap();
    // Let the request reach the backend before the drain starts.
    eventually("the request in flight", Duration::from_secs(5), || async {
        (gw_b.gateway.active_streams() == 1).then_some(())
    })
    .await;
    let drain = tokio::spawn(async move { gw_b.gateway.shutdown().await });
    let mut answer = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(10), live.read_exact(&mut answer))
        .await
        .expect("an answer")
        .expect("the tunnel was cut while its answer was due");
    assert_eq!(&answer, b"slow question");
    // Answered and then idle: now it closes, and the drain ends.
    let left = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain ended")
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_leaves_the_routes_is_let_go_after_its_last_stream() {
    let a = Domain::new("aws-use1", "aws.example", 51);
    let b = Domain::new("gcp-usc1", "gcp.example", 52);
    let echo = Echo::start(b.ip(10)).await;
    let (gw_a, gw_b, proxy) = exporting(&a, &b, "shop/echo", echo.addr, Settings::default()).await;
    let (mut live, accept) = open_tunnel(
        gw_a.egress(),
        proxy.clone(),
        &open_msg("shop/echo", 8080, "gcp-usc1"),
    )
    .await
    .unwrap();
    assert_eq!(accept.status(), Status::Ok);
    live.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    live.read_exact(&mut buf).await.unwrap();
    assert!(gw_a.gateway.pool().connected(gw_b.quic()));

    // gcp's gateway leaves aws's routes (the cluster re-registered elsewhere).
    gw_a.update(|r| r.peers.get_mut("gcp-usc1").unwrap().gateways.clear());
    eventually(
        "the pool to forget the gateway",
        Duration::from_secs(5),
        || async { (!gw_a.gateway.pool().connected(gw_b.quic())).then_some(()) },
    )
    .await;
    // The live stream is not cut...
    live.write_all(b"two").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two");
    assert_eq!(gw_b.gateway.open_connections(), 1);
    // ...and once it ends, the connection closes, though keep-alives
    // would have held it open forever.
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();
    drop(live);
    eventually(
        "the peer's connection to close",
        Duration::from_secs(5),
        || async { (gw_b.gateway.open_connections() == 0).then_some(()) },
    )
    .await;
    // New streams find no gateway.
    let (_s, refused) = open_tunnel(
        gw_a.egress(),
        proxy,
        &open_msg("shop/echo", 8080, "gcp-usc1"),
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), Status::Unreachable);
}

/// Revocation reaches live connections within a second (the contract's
/// bound, which every wait below is held to).
const REVOCATION: Duration = Duration::from_secs(1);

/// A live connection is re-checked when the routes or bundles change.
/// aws is deregistered while its gateway holds a connection to gcp's with
/// a live stream: a new stream on that connection is refused FORBIDDEN at
/// once, the live one may finish, and then the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_peer_loses_its_live_connection() {
    let p = pair(Settings::default()).await;
    let (conn, good, mut live) = live_tunnel(&p, 51).await;

    // gcp's gateway learns that aws is no longer federated.
    p.gw_b.update(|r| {
        r.peers.remove("aws-use1");
    });
    let refused = eventually("a new stream to be refused", REVOCATION, || async {
        let a = raw_stream(&conn, &framed(&good)).await.ok()?;
        (a.status == Status::Forbidden as i32).then_some(a)
    })
    .await;
    assert!(refused.message.contains("not federated"), "{refused:?}");
    // The live stream may finish...
    ping(&mut live, b"during").await;
    drop(live);
    // ...then the connection closes, however long keep-alives would hold it.
    let closed = tokio::time::timeout(REVOCATION, conn.closed())
        .await
        .expect("the connection closes once its last stream is done");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == fedmesh_gateway::splice::code::REVOKED),
        "{closed:?}"
    );
}

/// A connection whose peer's bundle is withdrawn closes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_bundle_closes_the_peers_connection() {
    let p = pair(Settings::default()).await;
    let (conn, _, live) = live_tunnel(&p, 52).await;
    drop(live);
    // aws's trust domain now has another root: its old certificates no
    // longer verify.
    let other = Domain::new("aws-use1", "aws.example", 53);
    p.gw_b
        .bundles
        .send_replace(Arc::new(bundles(&[&other, &p.b])));
    let closed = tokio::time::timeout(REVOCATION, conn.closed())
        .await
        .expect("the connection closes");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == fedmesh_gateway::splice::code::REVOKED),
        "{closed:?}"
    );
}

/// The egress side: when gcp's bundle changes so that its gateway no longer
/// verifies, aws's egress stops using its pooled connection, and a new
/// tunnel needs a fresh handshake, which the new bundle refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_lets_go_of_a_peer_that_no_longer_verifies() {
    let p = pair(Settings::default()).await;
    let (_s, accept) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(accept.status(), Status::Ok);
    assert!(p.gw_a.gateway.pool().connected(p.gw_b.quic()));

    let other = Domain::new("gcp-usc1", "gcp.example", 54);
    p.gw_a
        .bundles
        .send_replace(Arc::new(bundles(&[&p.a, &other])));
    eventually(
        "the pool to let go of the connection",
        REVOCATION,
        || async { (!p.gw_a.gateway.pool().connected(p.gw_b.quic())).then_some(()) },
    )
    .await;
    let (status, message) = p.status(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(status, Status::Unreachable, "{message}");
}

/// A peer connection ends when its certificate expires, so that a renewed
/// SVID takes over with a fresh handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closes_at_its_peers_certificate_expiry() {
    let p = pair(Settings::default()).await;
    // It expires 3 s from now at the latest (X.509 times are whole seconds).
    let expires = tokio::time::Instant::now() + Duration::from_secs(3);
    let conn = p
        .dial_from_aws(53, p.a.short_gateway_svid(Duration::from_secs(3)))
        .await
        .unwrap();
    let mut good = open_msg(ECHO, 8080, "gcp-usc1");
    good.source_identity = "spiffe://aws.example/ns/shop/sa/web".into();
    let a = raw_stream(&conn, &framed(&good)).await.unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    let closed = tokio::time::timeout_at(expires + REVOCATION, conn.closed())
        .await
        .expect("the connection closes within a second of the certificate's expiry");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == fedmesh_gateway::splice::code::REVOKED),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_peer_connection_leaves_no_rtt_series_behind() {
    let p = pair(Settings::default()).await;
    let (mut s, accept) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(accept.status, Status::Ok as i32, "{accept:?}");
    ping(&mut s, b"hello").await;
    let rtt_lines = |text: String| {
        text.lines()
            .filter(|l| l.starts_with("fedmesh_gateway_rtt_seconds{"))
            .count()
    };
    assert_eq!(rtt_lines(p.gw_b.scrape()), 1, "{}", p.gw_b.scrape());
    // aws's gateway goes away: its connection closes at gcp's side.
    let Pair { gw_a, gw_b, .. } = p;
    drop(s);
    drop(gw_a);
    fedmesh_test_support::eventually(
        "the series to go",
        std::time::Duration::from_secs(10),
        || {
            let n = rtt_lines(gw_b.scrape());
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_its_connection_cap_is_refused_while_other_peers_work() {
    let p = pair(Settings {
        max_connections_per_peer: 2,
        ..Settings::default()
    })
    .await;
    let mut open = open_msg(ECHO, 8080, "gcp-usc1");
    open.source_identity = "spiffe://aws.example/ns/shop/sa/web".into();
    let dial_from_aws = |host: u8| p.dial_from_aws(host, p.a.gateway_svid());
    // aws's egress already holds one; one more fits, a third does not.
    let second = dial_from_aws(60).await.unwrap();
    let a = raw_stream(&second, &framed(&open)).await.unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    let _warm = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    let refused = close_reason(dial_from_aws(61).await).await;
    assert!(refused.contains("too many connections"), "{refused}");
    assert!(p.gw_b.scrape().contains("too_many_connections"));

    // Another peer cluster is not affected.
    let c = Domain::new("azure-eus", "azure.example", 3);
    p.gw_b.update(|r| {
        r.peers.insert("azure-eus".into(), c.as_peer(vec![]).1);
    });
    p.gw_b
        .bundles
        .send_replace(Arc::new(bundles(&[&p.a, &p.b, &c])));
    let mut from_azure = open_msg(ECHO, 8080, "gcp-usc1");
    from_azure.source_identity = "spiffe://azure.example/ns/shop/sa/web".into();
    let conn = raw_connect(
        c.ip(10),
        c.gateway_svid(),
        bundles(&[&c, &p.b]),
        p.b.gateway_id(),
        p.gw_b.quic(),
    )
    .await
    .unwrap();
    let a = raw_stream(&conn, &framed(&from_azure)).await.unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workload_over_its_stream_cap_is_refused_while_others_go_on() {
    let p = pair_with(
        Settings {
            max_streams_per_source: 2,
            ..Settings::default()
        },
        Settings::default(),
    )
    .await;
    let open = open_msg(ECHO, 8080, "gcp-usc1");
    let (mut one, a) = p.open(&open).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    let (mut two, a) = p.open(&open).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    ping(&mut one, b"1").await;
    ping(&mut two, b"2").await;
    let (status, message) = p.status(&open).await;
    assert_eq!(status, Status::Overloaded);
    assert!(
        message.contains("ns/shop/sa/web holds 2 streams"),
        "{message}"
    );
    // Another workload of the same cluster is not affected.
    let other = proxy_tls(p.a.workload_svid("shop", "batch"), bundles(&[&p.a]), &p.a);
    let (mut s, a) = open_tunnel(p.gw_a.egress(), other, &open).await.unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    ping(&mut s, b"other").await;
    // The first workload's slot comes back when one of its streams ends.
    drop(one);
    fedmesh_test_support::eventually(
        "a slot back",
        std::time::Duration::from_secs(10),
        || async {
            let (_s, a) = p.open(&open).await;
            (a.status == Status::Ok as i32).then_some(())
        },
    )
    .await;
}

/// `fedmesh_gateway_address_validations` as scraped.
fn retries(scrape: &str) -> u64 {
    scrape
        .lines()
        .find(|l| l.starts_with("fedmesh_gateway_address_validations_total"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_validation_retries_new_peers_which_still_connect() {
    use fedmesh_gateway::validate::AddressValidation;
    // Always: every new peer proves its address first, and is served.
    let p = pair(Settings {
        address_validation: AddressValidation::Always,
        ..Settings::default()
    })
    .await;
    let (mut s, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    ping(&mut s, b"after a retry").await;
    assert!(retries(&p.gw_b.scrape()) >= 1, "{}", p.gw_b.scrape());

    // Auto: quiet peers pay nothing; a burst of new connections above the
    // threshold is retried, and every one of them still gets through.
    let p = pair(Settings {
        address_validation: AddressValidation::Auto,
        address_validation_above: 5,
        ..Settings::default()
    })
    .await;
    let _warm = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(retries(&p.gw_b.scrape()), 0);
    let mut open = open_msg(ECHO, 8080, "gcp-usc1");
    open.source_identity = "spiffe://aws.example/ns/shop/sa/web".into();
    let mut conns = Vec::new();
    for host in 60..80 {
        let c = p.dial_from_aws(host, p.a.gateway_svid()).await.unwrap();
        let a = raw_stream(&c, &framed(&open)).await.unwrap();
        assert_eq!(a.status, Status::Ok as i32, "{a:?}");
        conns.push(c);
    }
    assert!(retries(&p.gw_b.scrape()) >= 1, "{}", p.gw_b.scrape());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_of_a_federated_cluster_connects_directly_as_itself() {
    let p = pair(Settings {
        max_connections_per_workload: 2,
        ..Settings::default()
    })
    .await;
    let as_web = |host: u8| p.dial_from_aws(host, p.a.workload_svid("shop", "web"));
    // No source on the wire: the certificate says who it is.
    let mut open = open_msg(ECHO, 8080, "gcp-usc1");
    open.source_identity.clear();
    let first = as_web(70).await.unwrap();
    let a = raw_stream(&first, &framed(&open)).await.unwrap();
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");
    // Claiming to be someone else is refused before any byte.
    open.source_identity = "spiffe://aws.example/ns/shop/sa/admin".into();
    let a = raw_stream(&first, &framed(&open)).await.unwrap();
    assert_eq!(a.status, Status::Forbidden as i32, "{a:?}");
    assert!(a.message.contains("only for itself"), "{}", a.message);

    // Its own connection cap: a second fits, a third is closed. The
    // second's stream proves the gateway counted it: the cap is taken after
    // the handshake, which the client finishes first.
    let second = as_web(71).await.unwrap();
    let a = raw_stream(&second, &framed(&open_msg(ECHO, 8080, "gcp-usc1"))).await;
    assert_eq!(a.unwrap().status, Status::Ok as i32);
    let refused = close_reason(as_web(72).await).await;
    assert!(
        refused.contains("too many connections from this workload"),
        "{refused}"
    );
    // Its cluster's gateway is not affected.
    let (_s, a) = p.open(&open_msg(ECHO, 8080, "gcp-usc1")).await;
    assert_eq!(a.status, Status::Ok as i32, "{a:?}");

    // A workload of a trust domain no federated cluster has: its
    // certificate is refused (TLS 1.3 lets the client finish first; the
    // server closes before any stream).
    let stranger = Domain::new("evil", "evil.example", 9);
    let conn = raw_connect(
        stranger.ip(10),
        stranger.workload_svid("shop", "web"),
        bundles(&[&stranger, &p.b]),
        p.b.gateway_id(),
        p.gw_b.quic(),
    )
    .await;
    if let Ok(c) = conn {
        let r = raw_stream(&c, &framed(&open_msg(ECHO, 8080, "gcp-usc1"))).await;
        assert!(r.is_err(), "a stranger's workload got a stream: {r:?}");
    }
}

/// The QUIC client as a proxy runs it (`egress: direct`): its own
/// workload SVID, straight to gcp's ingress. A connection it stops using is
/// let go after `idle_release` (and closes: its keep-alives stop), and the
/// next stream simply connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_client_lets_an_unused_connection_go_and_connects_again() {
    use fedmesh_tunnel::frame::OpenRequest;
    use fedmesh_tunnel::peers::Watched;
    use fedmesh_tunnel::pool::{PeerPool, PoolOptions};
    let p = pair(Settings::default()).await;
    let (_svid_tx, svid) = watch::channel(Arc::new(p.a.workload_svid("shop", "web")));
    let (_b_tx, bundles_rx) = watch::channel(Arc::new(bundles(&[&p.a, &p.b])));
    let mut routes = p.a.routes("use1-a");
    routes.peers.extend([p.b.as_peer(vec![p.gw_b.quic()])]);
    let (_r_tx, routes) = watch::channel(Arc::new(routes));
    let transport = fedmesh_tunnel::quic::transport(&fedmesh_tunnel::quic::Sizing {
        keep_alive: Duration::from_millis(150),
        idle_timeout: Duration::from_millis(700),
        incoming_streams: 0,
        stream_window: 1 << 20,
        connection_window: 4 << 20,
        max_udp_payload: 1452,
    })
    .unwrap();
    let endpoint =
        fedmesh_tunnel::quic::client_endpoint(SocketAddr::new(p.a.ip(73), 0), 1452).unwrap();
    let pool = PeerPool::new(
        PoolOptions {
            svid,
            bundles: bundles_rx,
            backoff: Default::default(),
            drain_timeout: Duration::from_secs(1),
            dns_servers: vec![],
            idle_release: Some(Duration::from_millis(200)),
        },
        Arc::new(Watched(routes)),
        Arc::new(fedmesh_gateway::Metrics::default()),
        endpoint,
        Arc::new(transport),
    );
    let req = OpenRequest {
        service: ECHO.parse().unwrap(),
        port: 8080,
        target_cluster: "gcp-usc1".into(),
        source: None,
        traceparent: None,
        deadline: Duration::from_secs(2),
    };
    let echo_once = || async {
        let o = pool.open(&req).await.unwrap();
        let mut s = tokio::io::join(o.recv, o.send);
        ping(&mut s, b"direct").await;
        s.shutdown().await.unwrap();
    };
    echo_once().await;
    let gw = p.gw_b.quic();
    assert!(pool.connected(gw));
    // Used just now: a prune keeps it.
    pool.prune();
    assert!(pool.connected(gw), "a connection in use is kept");
    // Unused past idle_release: let go, and gcp's ingress sees it close.
    eventually(
        "the unused connection let go",
        Duration::from_secs(5),
        || async {
            pool.prune();
            (!pool.connected(gw)).then_some(())
        },
    )
    .await;
    eventually(
        "gcp's ingress without it",
        Duration::from_secs(5),
        || async { (p.gw_b.gateway.open_connections() == 0).then_some(()) },
    )
    .await;
    // The next stream connects again.
    echo_once().await;
    assert!(pool.connected(gw));
}
