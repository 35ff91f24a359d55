#!/usr/bin/env bash
# The fast subset of the failover drills, on a three-cloud federation brought
# up for them in its own loopback blocks, both ways a cluster reaches the
# others:
# - with its proxies opening QUIC to remote gateways themselves (`egress:
#   direct`, the client cluster's mode in three-clouds): the outages
#   (service, zone, cluster, cloud), a CA rotation, a gateway crash, a WAN
#   partition, a controller crash, an etcd outage, a bad policy, a global
#   zone forged with one cluster's credentials, an etcd emptied (and
#   one restored from a backup older than the zone) under load, and a
#   rolling restart of every controller, gateway and proxy under load from
#   every cluster;
# - through local egress gateways (`--egress gateway`): the cross-cluster
#   ones again (gateway crash, cluster outage, WAN partition).
# Fails when any drill misses its thresholds. Reports and SVG timelines stay
# in .fedmesh/drills-ci*/drills. Extra arguments go to `fedmesh drill`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins --quiet
fedmesh="${CARGO_TARGET_DIR:-target}/release/fedmesh"
"$fedmesh" drill \
  service-outage zone-outage ca-rotation ca-rotation-proxy cluster-outage cloud-outage gateway-crash \
  wan-partition controller-crash etcd-outage bad-policy forged-zone \
  etcd-wiped etcd-restored rolling-restart \
  --topology topologies/three-clouds.yaml --state-dir .fedmesh/drills-ci "$@"
"$fedmesh" drill gateway-crash cluster-outage wan-partition \
  --topology topologies/three-clouds.yaml --egress gateway \
  --state-dir .fedmesh/drills-ci-egress "$@"
