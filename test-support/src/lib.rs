//! Test support for fedmesh: real parts, started and stopped by the tests.
//!
//! - [`etcd::Etcd`]: Debian's `etcd-server` on a free loopback port with a
//!   temporary data directory, optional auth, outage (`kill`) and `restart`.
//! - [`relay::TcpRelay`]: a loopback TCP forwarder a test can cut and
//!   restore, to break connections without stopping the server.
//! - [`udp_relay::UdpRelay`]: a loopback UDP forwarder that can change its
//!   upstream source port, as a NAT rebinding does.
//! - [`dns::DnsServer`]: a small authoritative DNS server on loopback UDP
//!   whose A records a test can change, to move a name.
//! - [`fake_kube::FakeKube`]: **a fake** Kubernetes API server (list,
//!   watch with bookmarks and `410 Gone`, writes, TokenReview) over real
//!   HTTP, since no real one can run here; [`kube_objects`] builds what
//!   a user would apply to it.
//! - [`mutate::mutations`]: valid documents with random edits, for
//!   property-based tests of the parsers.
//! - [`eventually`]: poll a condition until a deadline instead of sleeping.
//! - [`env_or`]: a bench knob from the environment.
//! - [`ensure_haproxy`]: install the benches' peer when it is missing.
//! - [`write_atomically`]: replace a file a component is watching, so that
//!   it never reads half an edit.
//!
//! Nothing else here is a mock: the one fake is the Kubernetes API server,
//! which cannot run on a test machine, and it says so in its name.

pub mod dns;
pub mod etcd;
pub mod fake_kube;
pub mod kube_objects;
pub mod mutate;
pub mod relay;
pub mod udp_relay;

pub use dns::DnsServer;
pub use etcd::{Etcd, EtcdOptions, HarnessError};
pub use fake_kube::FakeKube;
pub use relay::TcpRelay;
pub use udp_relay::UdpRelay;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// A bench knob from the environment: `name` parsed, or `default` when it
/// is unset or does not parse.
/// The federation anchor of every fixture in this test process: clusters
/// registered by different helpers of one test must share it, and each
/// test's etcd is its own, so one per process is enough.
pub fn anchor() -> std::sync::Arc<fedmesh_seal::AnchorKey> {
    static ANCHOR: std::sync::OnceLock<std::sync::Arc<fedmesh_seal::AnchorKey>> =
        std::sync::OnceLock::new();
    ANCHOR
        .get_or_init(|| {
            std::sync::Arc::new(
                fedmesh_seal::AnchorKey::generate().expect("the system RNG works in tests"),
            )
        })
        .clone()
}

/// A directory holding [`anchor`] (`anchor.key`, `anchor.pub`), for the
/// `fedmesh` command run by tests (`--anchor-dir`, `FEDMESH_ANCHOR_DIR`).
pub fn anchor_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        anchor()
            .save_new(dir.path())
            .expect("the anchor is written");
        dir
    })
    .path()
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Installs Debian's haproxy through the project's setup script when it
/// is missing (benches compare against it).
pub fn ensure_haproxy() {
    let present = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/setup.sh");
        let ok = std::process::Command::new(setup)
            .arg("haproxy")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "installing haproxy with {setup} failed");
    }
}

/// Writes `contents` beside `path` and renames it into place, as an
/// operator's tooling (or a ConfigMap mount) does.
pub fn write_atomically(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `timeout`
/// with `what` in the message.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Memory of `pid` in kB: (resident now, peak resident).
pub fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
