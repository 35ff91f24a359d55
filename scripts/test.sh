#!/usr/bin/env bash
# Runs every test of the workspace. Installs etcd-server and protoc first when
# they are missing. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo test --workspace "$@"
