#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine, then runs every
# test of the workspace but the end-to-end tier (hack/e2e.sh, which needs a local cluster).
# Safe to run again; installs are skipped when already present.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import kubernetes_validate' 2>/dev/null ||
  python3 -m pip install --quiet --disable-pip-version-check -r hack/requirements-test.txt

# A real container runtime that consumes CDI specs (the plugin's tests run containers with it).
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || [ ! -x /bin/busybox ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc busybox-static >/dev/null
  else
    echo "hack/test.sh: podman, runc and busybox-static are needed (apt-get install podman runc busybox-static)" >&2
    exit 1
  fi
fi

# The Helm chart, the manifests rendered from it and the examples against the official schemas
# (helm is built once from its Go module by hack/helm.sh, cached outside the work tree).
hack/check-manifests.sh

# Everything but the end-to-end tier, which needs a cluster: hack/e2e.sh runs it.
exec cargo test --workspace --exclude test-e2e "$@"
