//! fedmesh's chaos suite: failover drills against a running federation.
//!
//! - [`drill`]: a drill as its YAML file says it;
//! - [`load`]: the open-loop load driver, recording every request;
//! - [`run`]: the runner, which keeps time around a [`run::Federation`]
//!   that injects the faults;
//! - [`report`]: the figures and the verdict, I/O-free; [`text`] and
//!   [`svg`] show them.
//!
//! The drills that ship with fedmesh are in [`SHIPPED`].

pub mod drill;
pub mod load;
pub mod report;
pub mod run;
pub mod svg;
pub mod text;

pub use drill::{Action, Drill, DrillError};
pub use report::Report;
pub use run::{Federation, run};

/// The shipped drills, by file name, as `fedmesh drill <name>` finds them.
pub const SHIPPED: &[(&str, &str)] = &[
    (
        "service-outage",
        include_str!("../drills/service-outage.yaml"),
    ),
    ("zone-outage", include_str!("../drills/zone-outage.yaml")),
    ("forged-zone", include_str!("../drills/forged-zone.yaml")),
    ("ca-rotation", include_str!("../drills/ca-rotation.yaml")),
    (
        "ca-rotation-proxy",
        include_str!("../drills/ca-rotation-proxy.yaml"),
    ),
    (
        "cluster-outage",
        include_str!("../drills/cluster-outage.yaml"),
    ),
    ("cloud-outage", include_str!("../drills/cloud-outage.yaml")),
    (
        "gateway-crash",
        include_str!("../drills/gateway-crash.yaml"),
    ),
    (
        "gateway-crash-ha",
        include_str!("../drills/gateway-crash-ha.yaml"),
    ),
    (
        "gateway-freeze",
        include_str!("../drills/gateway-freeze.yaml"),
    ),
    (
        "wan-partition",
        include_str!("../drills/wan-partition.yaml"),
    ),
    (
        "wan-one-way-partition",
        include_str!("../drills/wan-one-way-partition.yaml"),
    ),
    (
        "wan-degradation",
        include_str!("../drills/wan-degradation.yaml"),
    ),
    (
        "wan-bandwidth",
        include_str!("../drills/wan-bandwidth.yaml"),
    ),
    ("wan-rebind", include_str!("../drills/wan-rebind.yaml")),
    ("etcd-outage", include_str!("../drills/etcd-outage.yaml")),
    ("etcd-wiped", include_str!("../drills/etcd-wiped.yaml")),
    (
        "etcd-restored",
        include_str!("../drills/etcd-restored.yaml"),
    ),
    (
        "etcd-leader-outage",
        include_str!("../drills/etcd-leader-outage.yaml"),
    ),
    (
        "controller-crash",
        include_str!("../drills/controller-crash.yaml"),
    ),
    (
        "remote-controllers-crash",
        include_str!("../drills/remote-controllers-crash.yaml"),
    ),
    (
        "poisoned-export",
        include_str!("../drills/poisoned-export.yaml"),
    ),
    ("bad-policy", include_str!("../drills/bad-policy.yaml")),
    (
        "poisoned-bundle",
        include_str!("../drills/poisoned-bundle.yaml"),
    ),
    (
        "flapping-backend",
        include_str!("../drills/flapping-backend.yaml"),
    ),
    (
        "tcp-service-outage",
        include_str!("../drills/tcp-service-outage.yaml"),
    ),
    ("wan-gray", include_str!("../drills/wan-gray.yaml")),
    ("etcd-freeze", include_str!("../drills/etcd-freeze.yaml")),
    (
        "etcd-freeze-failover",
        include_str!("../drills/etcd-freeze-failover.yaml"),
    ),
    (
        "controller-freeze",
        include_str!("../drills/controller-freeze.yaml"),
    ),
    (
        "rolling-restart",
        include_str!("../drills/rolling-restart.yaml"),
    ),
];

/// The shipped drill called `name`.
pub fn shipped(name: &str) -> Option<Result<Drill, DrillError>> {
    SHIPPED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, yaml)| Drill::parse(yaml, &format!("drills/{n}.yaml")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_drill_parses_and_is_named_as_its_file() {
        for (name, _) in SHIPPED {
            let d = shipped(name).unwrap().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&d.name, name);
            assert!(!d.about.is_empty(), "{name}: say what breaks");
            assert!(
                d.thresholds != drill::Thresholds::default(),
                "{name}: a drill judges something"
            );
        }
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/drills"))
            .unwrap()
            .count();
        assert_eq!(files, SHIPPED.len(), "every file in drills/ is shipped");
    }
}
