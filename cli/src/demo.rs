//! The demo backend `fedmesh up` runs for each replica: an HTTP echo whose
//! JSON answer says where it runs (`cluster`, `zone`, `service`), or for a
//! TCP service, a byte echo that first greets with where it runs
//! ([`tcp_banner`]). Tests and drills assert on what it reports.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The JSON body an HTTP demo backend answers with.
pub fn answer(cluster: &str, zone: &str, service: &str, path: &str) -> String {
    serde_json::json!({
        "cluster": cluster,
        "zone": zone,
        "service": service,
        "path": path,
    })
    .to_string()
}

/// The line a TCP demo backend greets each connection with, before it
/// echoes: `fedmesh-echo <cluster> <zone>`.
pub fn tcp_banner(cluster: &str, zone: &str) -> String {
    format!("fedmesh-echo {cluster} {zone}\n")
}

pub async fn run(
    listen: SocketAddr,
    cluster: String,
    zone: String,
    service: String,
    tcp: bool,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("fedmesh demo backend: {service} in {cluster}/{zone} on {listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        if tcp {
            let banner = tcp_banner(&cluster, &zone);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let (mut r, mut w) = stream.into_split();
                if w.write_all(banner.as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            continue;
        }
        let (cluster, zone, service) = (cluster.clone(), zone.clone(), service.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = answer(&cluster, &zone, &service, req.uri().path());
                async move {
                    // Read what was sent before answering.
                    let _ = req.into_body().collect().await;
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
