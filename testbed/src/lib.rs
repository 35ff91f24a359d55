//! Fixtures shared by the data plane's tests and benches (a dev-dependency
//! only): simulated clusters with their own CAs on their own loopback
//! blocks, real gateways and proxies (in this process or as processes),
//! registered clusters with real controllers over a real etcd, backends,
//! and bounded load.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod gateway;
pub mod proxy;
pub mod sites;

use std::path::PathBuf;

/// The path of one of the workspace's binaries, next to the running test
/// or bench (`target/<profile>/`). Cargo builds a package's binaries for
/// its own tests and benches, so `fedmesh-gateway` is there for the
/// gateway's and `fedmesh-proxy` for the proxy's.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the running test's path");
    // target/<profile>/deps/<test>-<hash>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run this from the tests of the crate that builds it (cargo test -p {name})",
        bin.display()
    );
    bin
}
