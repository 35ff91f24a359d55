//! Fixtures for the end-to-end tests of `fedmesh up`: the binaries, a guard
//! that brings a federation down however a test ends, and a steady GET load
//! through a proxy that records which cluster answered.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub const FEDMESH: &str = env!("CARGO_BIN_EXE_fedmesh");

/// `fedmesh up` needs its sibling binaries; `cargo test --workspace`
/// builds them, `cargo test -p fedmesh` alone may not have.
pub fn ensure_binaries() {
    let dir = Path::new(FEDMESH).parent().unwrap();
    let missing = ["fedmesh-controller", "fedmesh-gateway", "fedmesh-proxy"]
        .iter()
        .any(|b| !dir.join(b).is_file());
    if missing {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args([
                "build",
                "--bins",
                "-p",
                "federation-controller",
                "-p",
                "east-west-gateway",
                "-p",
                "proxy",
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "building the binaries failed");
    }
}

/// Every federation a test brings up has its blocks moved up by this much,
/// clear of one the user may have up (127.0.9.x to 127.0.12.x by default).
pub const BLOCK_OFFSET: &str = "100";

pub fn fedmesh(args: &[&str], state: &Path) -> std::process::Output {
    Command::new(FEDMESH)
        .args(args)
        .envs(zone_env(state))
        .env("FEDMESH_BLOCK_OFFSET", BLOCK_OFFSET)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

/// What `set -a; . <state>/etcd.env` would set: the operator's way to the
/// global zone of a `fedmesh up` (TLS files, user, password file).
#[allow(dead_code)] // Not every test binary reaches the global zone.
pub fn zone_env(state: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(state.join("etcd.env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Runs `fedmesh <args>` and fails the test, with its stderr, unless it succeeds.
pub fn fedmesh_ok(args: &[&str], state: &Path) -> String {
    let out = fedmesh(args, state);
    assert!(
        out.status.success(),
        "fedmesh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Brings everything down even when the test fails.
pub struct Up(pub PathBuf);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = fedmesh(&["down"], &self.0);
    }
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub at: Instant,
    pub cluster: String,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn client(proxy: SocketAddr) -> Sender {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// One GET of `host`; the cluster that answered, or why it failed.
async fn get(tx: &mut Sender, host: &str) -> Result<String, String> {
    tx.ready().await.map_err(|e| e.to_string())?;
    let req = hyper::Request::get("/")
        .header("host", host)
        .body(Empty::new())
        .unwrap();
    let r = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = r.status();
    let body = r
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).to_string();
    if status != 200 {
        return Err(format!("{status}: {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    Ok(v["cluster"].as_str().unwrap_or_default().to_string())
}

/// Steady GETs from keep-alive clients, each stopping by itself after four
/// minutes at most.
pub struct Load {
    answers: Arc<Mutex<Vec<Answer>>>,
    failures: Arc<Mutex<Vec<String>>>,
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    pub async fn start(proxy: SocketAddr, host: &str, clients: usize) -> Self {
        let answers = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = watch::channel(false);
        let mut workers = Vec::new();
        for _ in 0..clients {
            let (answers, failures, stopped) = (answers.clone(), failures.clone(), stopped.clone());
            let host = host.to_string();
            let mut tx = client(proxy).await;
            workers.push(tokio::spawn(async move {
                let end = Instant::now() + Duration::from_secs(240);
                while !*stopped.borrow() && Instant::now() < end {
                    match get(&mut tx, &host).await {
                        Ok(cluster) => answers.lock().unwrap().push(Answer {
                            at: Instant::now(),
                            cluster,
                        }),
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            tx = client(proxy).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Self {
            answers,
            failures,
            stop,
            workers,
        }
    }

    pub fn count_since(&self, t: Instant, pred: impl Fn(&str) -> bool) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.at >= t && pred(&a.cluster))
            .count()
    }

    /// Waits until `n` answers satisfying `pred` have come since `since`.
    pub async fn wait(&self, what: &str, since: Instant, n: usize, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.count_since(since, &pred) < n {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the load; every answer, and every failure.
    pub async fn finish(self) -> (Vec<Answer>, Vec<String>) {
        let _ = self.stop.send(true);
        for w in self.workers {
            w.await.unwrap();
        }
        let answers = self.answers.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (answers, failures)
    }
}
