#!/usr/bin/env bash
# The main job: a whole three-cloud federation on this machine, made of real
# processes (`fedmesh up topologies/three-clouds.yaml`). Installs etcd-server
# and protoc when missing, builds every binary, and stays in the foreground
# until Ctrl-C. Extra arguments go to `fedmesh up` (`-d` to detach).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins --quiet
exec "${CARGO_TARGET_DIR:-target}/release/fedmesh" up topologies/three-clouds.yaml "$@"
