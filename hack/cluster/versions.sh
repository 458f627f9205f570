# Pinned versions of everything hack/cluster builds, per supported Kubernetes release; sourced.
# A version change is a new cache key: the old build stays until the cache is cleared.

ETCD_VERSION=v3.6.16
CONTAINERD_VERSION=v2.2.9
CNI_VERSION=v1.7.1

# release_versions 1.32|1.34 : sets K8S_RELEASE, K8S_VERSION and STAGING_OVERRIDES (staging
# modules pinned to another patch release than K8S_VERSION's, as "module=version" words).
release_versions() {
  K8S_RELEASE=$1
  STAGING_OVERRIDES=
  case $K8S_RELEASE in
    # The Go module proxy refuses k8s.io/endpointslice@v0.32.13 ("This module version is not
    # available"), and k8s.io/kubernetes@v1.32.12: v0.32.12, the nearest patch release it serves,
    # stands in for that one module (the e2e suite on 1.32 is what vouches for the mix).
    1.32) K8S_VERSION=v1.32.13 STAGING_OVERRIDES="k8s.io/endpointslice=v0.32.12" ;;
    1.34) K8S_VERSION=v1.34.4 ;;
    *) echo "unsupported Kubernetes release '${K8S_RELEASE}': 1.32 or 1.34" >&2; exit 2 ;;
  esac
}

cluster_cache() {
  echo "${VGPU_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vgpu-dra/cluster}"
}

# The sandbox image containerd runs for every pod (built here from hack/cluster/pause.c).
PAUSE_IMAGE=registry.k8s.io/pause:3.10
# The workload image (busybox, glibc, the enforcement tests' simulated CUDA driver and probe).
# It is also tagged with the image the shipped examples name, so that they run unchanged on the
# local cluster, where no registry can serve the real one.
WORKLOAD_IMAGE=vgpu-dra/workload:e2e
EXAMPLES_IMAGE=nvcr.io/nvidia/cuda:12.6.3-base-ubuntu24.04

# cluster_dir REPO : the local cluster's state directory. VGPU_CLUSTER_DIR when set, else
# REPO/.cluster, unless that path is too long for the Unix sockets inside it (108 bytes with the
# longest name under it), then /tmp/vgpu-dra-cluster.
cluster_dir() {
  if [ -n "${VGPU_CLUSTER_DIR:-}" ]; then
    echo "$VGPU_CLUSTER_DIR"
  elif [ ${#1} -le 52 ]; then
    echo "$1/.cluster"
  else
    echo /tmp/vgpu-dra-cluster
  fi
}
