#!/usr/bin/env bash
# The plain manifests in deploy/manifests/, for `kubectl apply -f` without Helm, are the Helm
# chart rendered (deploy/helm/vgpu-dra is the one source):
#
#   hack/render-manifests.sh            # rewrite deploy/manifests/
#   hack/render-manifests.sh --check    # fail if they differ from the chart (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-$(hack/helm.sh)}
check=${1:-}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# render FILE KUBE_VERSION [helm args...]
render() {
  local file=$1 version=$2; shift 2
  {
    echo "# Rendered from deploy/helm/vgpu-dra by hack/render-manifests.sh for Kubernetes $version:"
    echo "# helm template vgpu-dra deploy/helm/vgpu-dra -n vgpu-system --kube-version $version $*"
    echo "# Do not edit; change the chart and run hack/render-manifests.sh."
    printf -- '---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: vgpu-system\n'
    "$helm" template vgpu-dra deploy/helm/vgpu-dra --namespace vgpu-system --kube-version "$version" "$@"
  } > "$out/$file"
}
render vgpu-dra.yaml 1.34.0
render vgpu-dra-1.32.yaml 1.32.0
render vgpu-dra-native.yaml 1.34.0 --set sharingMode=native
render vgpu-dra-fake-gpus.yaml 1.34.0 --set fakeGpus.enabled=true

if [ "$check" = --check ]; then
  if ! diff -ru deploy/manifests "$out" >&2; then
    echo "deploy/manifests differs from the chart: run hack/render-manifests.sh" >&2
    exit 1
  fi
  echo "deploy/manifests: $(ls "$out" | wc -l) files, the chart rendered"
else
  rm -rf deploy/manifests
  mkdir -p deploy/manifests
  cp "$out"/*.yaml deploy/manifests/
fi
