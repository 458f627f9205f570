#!/usr/bin/env bash
# Create a kind cluster with DRA on for a chosen Kubernetes version, containerd with CDI on,
# build and load our images, and install the driver in fake-GPU mode.
#
#   hack/kind/cluster.sh [1.32|1.33|1.34|1.35] [--native]
#
# Needs docker, kind and kubectl; helm is built by hack/helm.sh when it is not on PATH. --native (1.34+) also turns on DRAConsumableCapacity for the
# native fractional-allocation mode. CLUSTER_NAME (default vgpu-dra) names the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

version=${1:-1.34}
native=${2:-}
name=${CLUSTER_NAME:-vgpu-dra}
declare -A node_images=(
  [1.32]=kindest/node:v1.32.5
  [1.33]=kindest/node:v1.33.1
  [1.34]=kindest/node:v1.34.0
  [1.35]=kindest/node:v1.35.0
)
image=${node_images[$version]:-}
[ -n "$image" ] || { echo "unsupported Kubernetes version $version (1.32 to 1.35)" >&2; exit 2; }
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 2; }
done

gates="" runtime_config="" mode=controller
case $version in
  1.32|1.33)
    gates="DynamicResourceAllocation: true"
    runtime_config='"resource.k8s.io/v1beta1": "true"'
    [ "$version" = 1.33 ] && runtime_config='"resource.k8s.io/v1beta1": "true", "resource.k8s.io/v1beta2": "true"'
    ;;
esac
if [ "$native" = --native ]; then
  case $version in 1.32|1.33) echo "--native needs Kubernetes 1.34 or later" >&2; exit 2 ;; esac
  gates="DRAConsumableCapacity: true"
  mode=native
fi

config=$(mktemp)
trap 'rm -f "$config"' EXIT
cat > "$config" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
featureGates: {${gates}}
runtimeConfig: {${runtime_config}}
containerdConfigPatches:
# containerd 1.7 needs CDI switched on; 2.x has it on by default and ignores this section.
- |-
  [plugins."io.containerd.grpc.v1.cri"]
    enable_cdi = true
nodes:
- role: control-plane
- role: worker
  labels:
    vgpu.hami.io/fake-gpus: "true"
- role: worker
  labels:
    vgpu.hami.io/fake-gpus: "true"
YAML

kind create cluster --name "$name" --image "$image" --config "$config" --wait 120s

docker build -f deploy/images/kubelet-plugin.Dockerfile -t vgpu-dra/kubelet-plugin:v0.1.0 .
docker build -f deploy/images/controller.Dockerfile -t vgpu-dra/controller:v0.1.0 .
kind load docker-image --name "$name" vgpu-dra/kubelet-plugin:v0.1.0 vgpu-dra/controller:v0.1.0

helm=$(command -v helm || hack/helm.sh)
"$helm" upgrade --install vgpu-dra deploy/helm/vgpu-dra -n vgpu-system --create-namespace \
  --set fakeGpus.enabled=true --set sharingMode="$mode" --wait --timeout 5m
kubectl get resourceslices -o wide
