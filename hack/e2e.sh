#!/usr/bin/env bash
# The end-to-end tier: brings up a real one-node cluster of the given release
# (hack/cluster/up.sh), prints `kubectl version`, runs the whole test-e2e suite against it with
# the cluster required (a test that cannot reach it fails), tears the cluster down, and exits
# non-zero if any test failed.
#
#   hack/e2e.sh 1.34|1.32 [cargo test args...]
#
# The first run builds Kubernetes, etcd, containerd and the CNI plugins from their Go modules
# (cached outside the work tree, see hack/cluster/build.sh), and helm (hack/helm.sh). The suite
# runs tests/e2e.rs (our binaries as host processes) and then tests/helm.rs (the Helm chart
# with our images: install, surge upgrade, uninstall). KEEP_CLUSTER=1 leaves the cluster
# up afterwards (stop it with hack/cluster/down.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
release=${1:?usage: hack/e2e.sh 1.32|1.34 [cargo test args...]}
shift
# shellcheck source=cluster/versions.sh
. hack/cluster/versions.sh
state=$(cluster_dir "$PWD")
export VGPU_CLUSTER_DIR=$state

start=$SECONDS
step() { echo "=== e2e $release: $* ($((SECONDS - start))s)"; }

step "our binaries (kubelet-plugin, controller, libvgpu.so) and helm"
cargo build -p kubelet-plugin -p controller -p libvgpu
HELM=$(hack/helm.sh)
export HELM
# A cluster left by an interrupted run is stopped first, so that this run starts clean.
[ -f "$state/cluster.env" ] && hack/cluster/down.sh

step "our images (hack/images.sh), which up.sh loads into every node's containerd"
# The same images under a second tag: the chart's test upgrades to it.
PROFILE=debug hack/images.sh "$state/images" v0.1.0 e2e-upgrade

step "cluster up"
if [ "${KEEP_CLUSTER:-}" != 1 ]; then
  trap 'step "cluster down"; hack/cluster/down.sh' EXIT
fi
hack/cluster/up.sh "$release"
# shellcheck disable=SC1091
. "$state/cluster.env"
"$KUBECTL" --kubeconfig "$KUBECONFIG" version
"$KUBECTL" --kubeconfig "$KUBECONFIG" get nodes -o wide

step "test-e2e"
status=0
VGPU_CLUSTER_ENV=$state/cluster.env cargo test -p test-e2e --no-fail-fast -- --test-threads=1 "$@" || status=$?
if [ $status -ne 0 ]; then
  echo "=== e2e $release FAILED; the last lines of each component's log:" >&2
  for f in "$state"/logs/*.log; do
    echo "--- $f" >&2
    tail -n 25 "$f" >&2
  done
fi
step "done (exit $status)"
exit $status
