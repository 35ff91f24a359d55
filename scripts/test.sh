#!/usr/bin/env bash
# Runs every test of the workspace, checks the Kubernetes manifests against
# Kubernetes' schemas (scripts/check-manifests.sh), then the fast subset of
# the failover drills (scripts/drills.sh), which fails when a drill misses a
# threshold.
# Installs etcd-server and protoc first when they are missing. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace "$@"
scripts/check-manifests.sh
exec scripts/drills.sh
