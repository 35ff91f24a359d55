#!/usr/bin/env bash
# Installs what fedmesh needs beyond the Rust toolchain, only when missing:
# Debian's etcd-server (the global zone in tests), protobuf-compiler and
# libprotobuf-dev (protoc's well-known types, which etcd-client's protos import),
# and librsvg2-bin (rsvg-convert, to check drill timelines render).
# Extra Debian packages may be named as arguments (the benches ask for haproxy).
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
# rsvg-convert: a test checks that a drill's SVG timeline really renders.
command -v rsvg-convert >/dev/null 2>&1 || need+=(librsvg2-bin)
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; fedmesh needs a Rust toolchain (1.89 or newer)" >&2
  exit 1
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
  else
    echo "setup: need root (or sudo) to install: ${need[*]}" >&2
    exit 1
  fi
fi

echo "setup: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
