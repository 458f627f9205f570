#!/usr/bin/env bash
# Issue #18's side-by-side on the local real cluster: pod created → bound (p50/p90/p99, pods/s)
# for slices allocated by our controller, shares allocated by the kube-scheduler (native mode)
# and whole GPUs (the baseline), on bench nodes (Node objects with our ResourceSlices, no
# kubelet), 1,000 pods each by default. Prints a Markdown table (see BENCHMARKS.md).
#
#   hack/bench-scheduling.sh            # BENCH_PODS, BENCH_NODES, BENCH_SCENARIOS,
#                                       # BENCH_CONCURRENCY, BENCH_TIMEOUT_S tune it
#
# Uses a 1.34 cluster that is up (hack/cluster/up.sh 1.34), else brings one up and tears it
# down afterwards (KEEP_CLUSTER=1 leaves it). Our controller and plugin are built with
# PROFILE (default release) and run as host processes, as in the end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cluster/versions.sh
. hack/cluster/versions.sh
state=$(cluster_dir "$PWD")
export VGPU_CLUSTER_DIR=$state
profile=${PROFILE:-release}

cargo build --profile "$profile" -p kubelet-plugin -p controller -p libvgpu
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
# cargo names the dev profile's directory "debug".
[ "$profile" = dev ] && profile=debug
export VGPU_BIN_DIR=$target/$profile
# The bench itself only talks to the API server: a debug build is enough.
cargo test -p test-e2e --bench scheduling --no-run

if [ ! -f "$state/cluster.env" ]; then
  if [ "${KEEP_CLUSTER:-}" != 1 ]; then
    trap 'hack/cluster/down.sh' EXIT
  fi
  hack/cluster/up.sh 1.34
fi
VGPU_CLUSTER_ENV=$state/cluster.env cargo test -p test-e2e --bench scheduling -- --bench
