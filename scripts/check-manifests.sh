#!/usr/bin/env bash
# Checks deploy/kubernetes against Kubernetes' own schemas (PyPI's
# kubernetes-validate, strict: unknown fields are errors) for every version
# fedmesh supports, and that the image builds every binary the manifests run,
# as a non-root user. Installs kubernetes-validate into a venv outside the
# clone on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Kubernetes versions fedmesh supports: those of k8s-openapi's features
# (the oldest is what the controller is built against).
versions=(1.33.0 1.34.0 1.35.0 1.36.0 1.37.0)
tools="${FEDMESH_TOOLS:-/var/tmp/fedmesh-tools}"
venv="$tools/kubernetes-validate"
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "check-manifests: installing kubernetes-validate into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
fi
for v in "${versions[@]}"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" deploy/kubernetes/*.yaml
  echo "check-manifests: deploy/kubernetes is valid for Kubernetes $v"
done

# Every binary a manifest runs is built into the image, and the image does
# not run as root.
python3 - <<'PY'
import pathlib, re, sys
docker = pathlib.Path("deploy/docker/Dockerfile").read_text()
manifests = "".join(p.read_text() for p in pathlib.Path("deploy/kubernetes").glob("*.yaml"))
bad = []
for binary in sorted(set(re.findall(r"/usr/local/bin/(fedmesh[a-z-]*)", manifests))):
    if f"--bin {binary} " not in docker + " ":
        bad.append(f"{binary} is run by a manifest but not built by the Dockerfile")
if not re.search(r"^USER (?!0\b|root\b)\S+", docker, re.M):
    bad.append("the Dockerfile's final stage must set a non-root USER")
for m in re.finditer(r"runAsNonRoot: (\w+)", manifests):
    if m.group(1) != "true":
        bad.append("a pod allows running as root")
for line in bad:
    print(f"check-manifests: {line}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
echo "check-manifests: the image builds every binary the manifests run, as non-root"
