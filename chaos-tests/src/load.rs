//! The load driver: open loop at a fixed rate. Request `i` is due at
//! `start + i / rate` and is sent then whatever earlier ones are doing, and
//! its latency counts from when it was due, so a stall shows in full (no
//! coordinated omission). Every request is recorded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::drill::Protocol;

/// One request (or TCP exchange).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When it was due, from the start of the load.
    #[serde(with = "humantime_serde")]
    pub due: Duration,
    /// From when it was due until it ended.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    pub outcome: Outcome,
    /// Where it was served, as the demo backend says (HTTP only).
    pub cluster: Option<String>,
    pub zone: Option<String>,
    /// For a failed status, the first line of the answer (a fedmesh proxy
    /// says which attempt failed and why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// An HTTP status other than 2xx.
    Status(u16),
    /// No answer: `connect`, `reset`, `timeout`, `mismatch` (a TCP echo
    /// that came back different), `overload` (the client itself had too
    /// many requests outstanding).
    Failed(String),
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }

    /// How a failure is counted in the report: `503`, `timeout`, ….
    pub fn label(&self) -> String {
        match self {
            Outcome::Ok => "ok".into(),
            Outcome::Status(s) => s.to_string(),
            Outcome::Failed(why) => why.clone(),
        }
    }
}

impl Load {
    /// Where request `i` goes.
    pub fn target(&self, i: u64) -> SocketAddr {
        let n = self.targets.len().max(1) as u64;
        self.targets[usize::try_from(i % n).unwrap_or(0)]
    }
}

/// What load to send, and where.
#[derive(Debug, Clone)]
pub struct Load {
    /// The client clusters' proxies: their HTTP listeners, or the
    /// service's TCP listeners. Request `i` goes to the `i mod n`-th.
    pub targets: Vec<SocketAddr>,
    /// The Host header (`name.namespace`).
    pub host: String,
    pub protocol: Protocol,
    pub rate: u32,
    pub duration: Duration,
    /// A request unanswered this long is a failure.
    pub timeout: Duration,
}

/// Running totals, for progress while the load runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Successes by the cluster that served them.
    pub served: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Counters {
    /// Successes by cluster so far.
    pub fn served(&self) -> std::collections::BTreeMap<String, u64> {
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The load while it runs.
#[derive(Debug)]
pub struct Running {
    pub counters: Arc<Counters>,
    /// When request 0 was due.
    pub start: Instant,
    task: JoinHandle<Vec<Record>>,
}

impl Running {
    /// Every request, in the order they were due, once the last has ended.
    pub async fn finish(self) -> anyhow::Result<Vec<Record>> {
        Ok(self.task.await?)
    }
}

/// Starts sending `load`, at once.
pub fn start(load: Load) -> Running {
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let task = tokio::spawn(drive(load, start, counters.clone()));
    Running {
        counters,
        start,
        task,
    }
}

async fn drive(load: Load, start: Instant, counters: Arc<Counters>) -> Vec<Record> {
    let total = (u128::from(load.rate) * load.duration.as_millis() / 1000) as u64;
    let interval = Duration::from_secs(1) / load.rate;
    // Beyond this many outstanding, the client itself is the bottleneck:
    // such requests are recorded as failed, not queued.
    let max_in_flight = (f64::from(load.rate) * load.timeout.as_secs_f64()).ceil() as u64 + 64;
    let http = http_client();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicU64::new(0));
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due).await;
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let since = due - start;
        if in_flight.load(Ordering::Relaxed) >= max_in_flight {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            let _ = tx.send(Record {
                due: since,
                latency: Duration::ZERO,
                outcome: Outcome::Failed("overload".into()),
                cluster: None,
                zone: None,
                why: None,
            });
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, load, http, counters, in_flight) = (
            tx.clone(),
            load.clone(),
            http.clone(),
            counters.clone(),
            in_flight.clone(),
        );
        tokio::spawn(async move {
            let attempt = async {
                let target = load.target(i);
                match load.protocol {
                    Protocol::Http => http_once(&http, target, &load.host).await,
                    Protocol::Tcp => {
                        let (outcome, served) = tcp_once(target, i).await;
                        (outcome, served, None)
                    }
                }
            };
            let (outcome, served, why) = tokio::time::timeout(load.timeout, attempt)
                .await
                .unwrap_or((Outcome::Failed("timeout".into()), None, None));
            let counter = if outcome.ok() {
                &counters.ok
            } else {
                &counters.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let (cluster, zone) = served.unzip();
            if let Some(c) = &cluster {
                let mut by = counters.served.lock().unwrap_or_else(|e| e.into_inner());
                *by.entry(c.clone()).or_default() += 1;
            }
            let _ = tx.send(Record {
                due: since,
                latency: due.elapsed(),
                outcome,
                cluster,
                zone,
                why,
            });
            in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(tx);
    let mut records = Vec::with_capacity(total as usize);
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    records.sort_by_key(|r| r.due);
    records
}

type Http = Client<HttpConnector, Empty<Bytes>>;

fn http_client() -> Http {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Where a demo backend says it runs: `{"cluster": …, "zone": …}`.
#[derive(Deserialize)]
struct Served {
    cluster: String,
    zone: String,
}

async fn http_once(
    http: &Http,
    target: SocketAddr,
    host: &str,
) -> (Outcome, Option<(String, String)>, Option<String>) {
    let request = hyper::Request::get(format!("http://{target}/drill"))
        .header(hyper::header::HOST, host)
        .body(Empty::new());
    let Ok(request) = request else {
        return (Outcome::Failed("request".into()), None, None);
    };
    let response = match http.request(request).await {
        Ok(r) => r,
        Err(e) if e.is_connect() => return (Outcome::Failed("connect".into()), None, None),
        Err(_) => return (Outcome::Failed("reset".into()), None, None),
    };
    let status = response.status();
    let Ok(body) = response.into_body().collect().await else {
        return (Outcome::Failed("reset".into()), None, None);
    };
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        let why = text.lines().next().map(|l| l.chars().take(200).collect());
        return (Outcome::Status(status.as_u16()), None, why);
    }
    let served = serde_json::from_slice::<Served>(&body.to_bytes())
        .ok()
        .map(|s| (s.cluster, s.zone));
    (Outcome::Ok, served, None)
}

/// One exchange with a demo TCP echo: its greeting (`fedmesh-echo
/// <cluster> <zone>`, where it runs), then a line out and the same line
/// back.
async fn tcp_once(target: SocketAddr, i: u64) -> (Outcome, Option<(String, String)>) {
    let Ok(stream) = tokio::net::TcpStream::connect(target).await else {
        return (Outcome::Failed("connect".into()), None);
    };
    let _ = stream.set_nodelay(true);
    let mut stream = tokio::io::BufReader::new(stream);
    let mut banner = String::new();
    let served = match stream.read_line(&mut banner).await {
        Ok(n) if n > 0 => banner
            .strip_prefix("fedmesh-echo ")
            .and_then(|rest| rest.trim_end().split_once(' '))
            .map(|(c, z)| (c.to_string(), z.to_string())),
        _ => return (Outcome::Failed("reset".into()), None),
    };
    if served.is_none() {
        return (Outcome::Failed("mismatch".into()), None);
    }
    let line = format!("fedmesh drill {i:>16}\n");
    if stream.get_mut().write_all(line.as_bytes()).await.is_err() {
        return (Outcome::Failed("reset".into()), None);
    }
    let mut back = vec![0u8; line.len()];
    match stream.read_exact(&mut back).await {
        Ok(_) if back == line.as_bytes() => (Outcome::Ok, served),
        Ok(_) => (Outcome::Failed("mismatch".into()), None),
        Err(_) => (Outcome::Failed("reset".into()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// An HTTP server on loopback that answers like a demo backend, but
    /// stalls every request while `stall` is set.
    async fn backend(stall: Arc<std::sync::atomic::AtomicBool>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let stall = stall.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let stall = stall.clone();
                        async move {
                            while stall.load(Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            let body = r#"{"cluster":"aws","zone":"az1"}"#;
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    /// The load keeps its schedule through a stall, and each stalled
    /// request's latency counts from when it was due.
    #[tokio::test]
    async fn open_loop_load_measures_a_stall_from_when_requests_were_due() {
        let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = backend(stall.clone()).await;
        let running = start(Load {
            targets: vec![target],
            host: "frontend.shop".into(),
            protocol: Protocol::Http,
            rate: 100,
            duration: Duration::from_millis(1500),
            timeout: Duration::from_secs(5),
        });
        // Stall from 0.5 s to 1 s of the run.
        let begin = running.start;
        tokio::time::sleep_until(begin + Duration::from_millis(500)).await;
        stall.store(true, Ordering::Relaxed);
        tokio::time::sleep_until(begin + Duration::from_millis(1000)).await;
        stall.store(false, Ordering::Relaxed);
        let records = running.finish().await.unwrap();

        assert_eq!(records.len(), 150, "every due request is sent and recorded");
        assert!(records.iter().all(|r| r.outcome.ok()));
        assert!(records.iter().all(|r| r.cluster.as_deref() == Some("aws")));
        // One due just after the stall began waited for most of it.
        let early = records
            .iter()
            .find(|r| r.due >= Duration::from_millis(550))
            .unwrap();
        assert!(early.latency >= Duration::from_millis(300), "{early:?}");
        // The schedule did not wait for the stall: requests stay 10 ms apart.
        for w in records.windows(2) {
            assert_eq!(w[1].due - w[0].due, Duration::from_millis(10));
        }
    }

    /// Five requests to `target` over 100 ms, all recorded.
    async fn five(target: SocketAddr, protocol: Protocol) -> Vec<Record> {
        start(Load {
            targets: vec![target],
            host: "frontend.shop".into(),
            protocol,
            rate: 50,
            duration: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
        })
        .finish()
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn nothing_listening_is_recorded_as_a_failure_to_connect() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for protocol in [Protocol::Http, Protocol::Tcp] {
            let records = five(closed, protocol).await;
            assert_eq!(records.len(), 5);
            assert!(
                records
                    .iter()
                    .all(|r| r.outcome == Outcome::Failed("connect".into())),
                "{protocol:?}: {records:?}"
            );
        }
    }

    /// A TCP exchange records where the echo said it runs; an echo that
    /// does not greet, or answers other bytes, fails the exchange.
    #[tokio::test]
    async fn a_tcp_exchange_records_the_serving_cluster() {
        async fn echo(banner: &'static [u8], flip: bool) -> SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (mut s, _) = listener.accept().await.unwrap();
                    tokio::spawn(async move {
                        s.write_all(banner).await.unwrap();
                        let mut buf = [0u8; 64];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if flip {
                                buf[0] ^= 1;
                            }
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            addr
        }
        for (banner, flip, want) in [
            (
                &b"fedmesh-echo gcp-usc1 usc1-a\n"[..],
                false,
                Some("gcp-usc1"),
            ),
            (&b"hello\n"[..], false, None),
            (&b"fedmesh-echo gcp-usc1 usc1-a\n"[..], true, None),
        ] {
            let records = five(echo(banner, flip).await, Protocol::Tcp).await;
            assert_eq!(records.len(), 5);
            for r in &records {
                assert_eq!(r.cluster.as_deref(), want, "{r:?}");
                assert_eq!(r.outcome.ok(), want.is_some(), "{r:?}");
            }
        }
    }
}
