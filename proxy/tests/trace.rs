//! OTLP traces: with an endpoint set, each request becomes a span, the
//! child of the caller's `traceparent`, exported over real OTLP/gRPC to a
//! collector on loopback; the backend sees the proxy's span as its parent.

#![allow(clippy::unwrap_used)]

use fedmesh_testbed::proxy as support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fedmesh_api::ServiceKey;
use fedmesh_proxy::config::{Common, Listen, Settings};
use fedmesh_proxy::table::{ServiceSpec, Table};
use fedmesh_test_support::eventually;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::gw::{Domain, bundles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// An OTLP collector that keeps what it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_a_span_under_the_callers_trace_and_the_backends_parent() {
    let d = Domain::new("aws", "aws.fedmesh.test", 67);
    // The collector.
    let collector = Collector::default();
    let l = TcpListener::bind((d.ip(20), 0)).await.unwrap();
    let otlp = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l)),
    );
    // A backend that answers with the traceparent it was sent.
    let backend = TcpListener::bind((d.ip(10), 0)).await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).await.unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let tp = head
                    .lines()
                    .find_map(|l| l.strip_prefix("traceparent: "))
                    .unwrap_or("none")
                    .to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{tp}",
                    tp.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });

    let provider = fedmesh_proxy::trace::otlp(&otlp, "fedmesh-proxy").unwrap();
    let common = Common {
        me: support::me(&d, "az1"),
        listen: Listen {
            http: Some(std::net::SocketAddr::new(d.ip(5), 0)),
            tcp: vec![],
            admin: None,
        },
        gateways: vec![],
        settings: Settings::default(),
    };
    let spec = ServiceSpec {
        key: ServiceKey::new("shop", "cart"),
        port: 8080,
        local: vec![fedmesh_api::Endpoint {
            address: backend_addr,
            zone: "az1".into(),
            healthy: true,
        }],
        remote: vec![],
        policy: None,
    };
    let (_t, table) = watch::channel(Arc::new(Table::build(
        "aws",
        &common.me.locality,
        &common.settings,
        &[spec],
    )));
    let (_s, svid) = watch::channel(Arc::new(d.workload_svid("shop", "web")));
    let (_b, b) = watch::channel(Arc::new(bundles(&[&d])));
    let p = fedmesh_proxy::Proxy::start_with(
        &common,
        table,
        svid,
        b,
        fedmesh_proxy::Extras {
            tracer: Some(provider.tracer("test")),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let tcp = TcpStream::connect(p.http.unwrap()).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "cart.shop")
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let seen =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    // Same trace, a new parent: the proxy's own span.
    let parts: Vec<&str> = seen.trim().split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!(parts[1], TRACE);
    assert_ne!(parts[2], CALLER_SPAN);
    let proxy_span = parts[2].to_string();

    let span = eventually(
        "the span at the collector",
        Duration::from_secs(20),
        || async {
            collector
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|s| hex(&s.trace_id) == TRACE)
                .cloned()
        },
    )
    .await;
    assert_eq!(hex(&span.span_id), proxy_span);
    assert_eq!(hex(&span.parent_span_id), CALLER_SPAN);
    let attr = |k: &str| {
        span.attributes
            .iter()
            .find(|a| a.key == k)
            .map(|a| format!("{:?}", a.value))
            .unwrap_or_default()
    };
    assert!(attr("fedmesh.service").contains("shop/cart"));
    assert!(attr("fedmesh.cluster").contains("aws"));
    assert!(attr("http.response.status_code").contains("200"));
    let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
}
