#!/usr/bin/env bash
# Builds, once, every binary a one-machine Kubernetes cluster needs, from the official Go modules,
# into a cache outside the work tree keyed by component and version:
#
#   hack/cluster/build.sh 1.32|1.34      # prints the directory holding the binaries
#
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl come from
# k8s.io/kubernetes (a throwaway module that requires it and pins every staging module it
# replaces with ./staging/src/... to the matching v0.X.Y); etcd from go.etcd.io/etcd/server/v3;
# containerd 2 and ctr from github.com/containerd/containerd/v2; the CNI plugins a pod network
# needs from github.com/containernetworking/plugins. runc comes from Debian (hack/cluster/deps.sh).
#
# VGPU_CLUSTER_CACHE (default ~/.cache/vgpu-dra/cluster) is the cache. A component is rebuilt
# only when its directory lacks the stamp written after a complete build, so a killed build is
# redone, never half-used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
release_versions "${1:-}"

cache=$(cluster_cache)
mkdir -p "$cache"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=${CGO_ENABLED:-1}
ldflags="-s -w"

log() { echo "hack/cluster/build.sh: $*" >&2; }

# Bumped whenever the way a component is built changes: a directory stamped with another recipe
# is rebuilt.
RECIPE=2
complete() { [ "$(cat "$1/.complete" 2>/dev/null)" = "recipe $RECIPE" ]; }

# build_go DIR GOMOD_LINES PKG... : builds PKGs of a throwaway module whose go.mod has
# GOMOD_LINES (its requirements) into DIR/bin, then stamps DIR complete.
build_go() {
  local dir=$1 gomod_extra=$2; shift 2
  local out="$dir/bin" work="$dir/mod"
  if complete "$dir"; then return 0; fi
  log "building $(basename "$dir") (first time only; cached in $dir)"
  rm -rf "$dir"; mkdir -p "$out" "$work"
  printf 'module vgpu-dra.local/cluster-build\n\ngo 1.24\n\n%s\n' "$gomod_extra" > "$work/go.mod"
  local started=$SECONDS
  (cd "$work" && go build -trimpath -ldflags "$ldflags" -o "$out/" "$@")
  # etcd's main package is the module root, "server": name the binary as etcd's releases do.
  if [ -f "$out/server" ]; then mv "$out/server" "$out/etcd"; fi
  echo "recipe $RECIPE" > "$dir/.complete"
  log "built $(basename "$dir") in $((SECONDS - started)) s"
}

# Kubernetes: its go.mod replaces the staging modules (k8s.io/api, k8s.io/client-go, ...) with
# directories that a module download does not carry; pin each to the published v0.X.Y instead.
k8s_dir="$cache/kubernetes-$K8S_VERSION"
if ! complete "$k8s_dir"; then
  modfile=$(cd "$cache" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  staging_version="v0.${K8S_VERSION#v1.}"
  replaces=$(sed -nE 's#^[[:space:]]*(k8s\.io/[a-z0-9.-]+) => \./staging/src/.*#\1#p' "$modfile" |
    while read -r m; do
      v=$staging_version
      for o in $STAGING_OVERRIDES; do [ "${o%%=*}" = "$m" ] && v=${o#*=}; done
      echo "replace $m => $m $v"
    done)
  [ -n "$replaces" ] || { log "no staging replacements found in $modfile"; exit 1; }
  # The version the binaries report (kubectl version, the Node's kubeletVersion), as Kubernetes'
  # own build stamps it; without it they say v0.0.0-master and kubectl refuses to parse it.
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  build_go "$k8s_dir" "require k8s.io/kubernetes $K8S_VERSION
$replaces" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl
fi

etcd_dir="$cache/etcd-$ETCD_VERSION"
if ! complete "$etcd_dir"; then
  build_go "$etcd_dir" "require go.etcd.io/etcd/server/v3 $ETCD_VERSION" go.etcd.io/etcd/server/v3
fi

containerd_dir="$cache/containerd-$CONTAINERD_VERSION"
if ! complete "$containerd_dir"; then
  # No btrfs/devmapper/zfs snapshotters: overlayfs and native are all a test node needs, and the
  # others need C headers this machine does not have.
  GOFLAGS="$GOFLAGS -tags=no_btrfs,no_devmapper,no_zfs" build_go "$containerd_dir" \
    "require github.com/containerd/containerd/v2 $CONTAINERD_VERSION" \
    github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr \
    github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
fi

cni_dir="$cache/cni-plugins-$CNI_VERSION"
if ! complete "$cni_dir"; then
  CGO_ENABLED=0 build_go "$cni_dir" "require github.com/containernetworking/plugins $CNI_VERSION" \
    github.com/containernetworking/plugins/plugins/main/bridge \
    github.com/containernetworking/plugins/plugins/main/loopback \
    github.com/containernetworking/plugins/plugins/ipam/host-local \
    github.com/containernetworking/plugins/plugins/meta/portmap
fi

echo "$cache"
