#!/usr/bin/env bash
# The fast subset of the failover drills: the outages (service, zone,
# cluster, cloud), a CA rotation, a gateway crash, a WAN partition, a
# controller crash and an etcd outage, on a three-cloud federation brought up
# for them in its own loopback blocks. Fails when any drill misses its thresholds. Reports and
# SVG timelines stay in .fedmesh/drills-ci/drills. Extra arguments go to
# `fedmesh drill`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins --quiet
exec "${CARGO_TARGET_DIR:-target}/release/fedmesh" drill \
  service-outage zone-outage ca-rotation cluster-outage cloud-outage gateway-crash \
  wan-partition controller-crash etcd-outage bad-policy \
  --topology topologies/three-clouds.yaml --state-dir .fedmesh/drills-ci "$@"
