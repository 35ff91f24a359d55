#!/usr/bin/env bash
# The main job. Until `fedmesh up` exists, this runs the most complete thing
# there is: the identity-federation demo (three clusters, three independent
# CAs, bundle exchange, mutual TLS across trust domains, a live CA rotation).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --quiet -p trust-bundle --example federation "$@"
