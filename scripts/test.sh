#!/usr/bin/env bash
# Runs every test of the workspace, then the fast subset of the failover
# drills (scripts/drills.sh), which fails when a drill misses a threshold.
# Installs etcd-server and protoc first when they are missing. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace "$@"
exec scripts/drills.sh
