//! Asking what runs whether it is ready: an admin port's `/ready`, a GET
//! through a proxy, etcd's status. HTTP goes over hyper, one connection per
//! probe, each bounded in time.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

/// One GET of `path` with Host `host` on a fresh connection to `addr`,
/// within `limit`: (status, body).
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    limit: Duration,
) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(hyper::header::HOST, host)
            .body(Empty::<Bytes>::new())?;
        let resp = tx.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(limit, exchange)
        .await
        .with_context(|| format!("no answer from {addr} within {limit:?}"))?
}

/// Whether an admin port's `/ready` answers 200.
pub async fn ready(admin: SocketAddr) -> bool {
    get(admin, "admin", "/ready", Duration::from_millis(500))
        .await
        .is_ok_and(|(status, _)| status == 200)
}

/// GETs `host` through `proxy` until it answers 200, for up to a minute.
pub async fn wait_http(proxy: SocketAddr, host: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = get(proxy, host, "/", Duration::from_secs(20)).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no 200 within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the etcd of the `fedmesh up` in `state` answers a status
/// request (30 s at most).
pub async fn wait_for_etcd(state: &std::path::Path, endpoints: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = super::etcd::client(state, endpoints, Duration::from_secs(2)).await
            && c.status().await.is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("etcd did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An HTTP/1.1 server on loopback that answers every request with
    /// `status` and `body` and closes.
    async fn server(status: u16, body: &'static str) -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn ready_is_a_200_and_nothing_else() {
        assert!(ready(server(200, "serving").await).await);
        assert!(!ready(server(503, "not yet").await).await);
        // Nothing listens there (a port just freed).
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(!ready(gone).await);
    }

    #[tokio::test]
    async fn get_returns_status_and_body() {
        let addr = server(404, "no such service").await;
        let (status, body) = get(addr, "x.y", "/", Duration::from_secs(5)).await.unwrap();
        assert_eq!((status, body.as_str()), (404, "no such service"));
    }
}
