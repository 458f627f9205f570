#!/usr/bin/env bash
# Builds the two product images on this machine, without Docker, a registry or a base image
# from the network, as OCI image archives:
#
#   hack/images.sh OUT_DIR [TAG...]     # OUT_DIR/kubelet-plugin.tar, OUT_DIR/controller.tar
#
# Each image holds the binary (cargo, PROFILE=release by default, or debug), exactly the shared
# libraries it loads as this machine resolves them (glibc, libgcc_s), and nothing else: no
# shell, no package manager. The plugin image also carries the enforcement library at
# /opt/vgpu/libvgpu.so, which its init container installs on the host.
#
# Image names: REGISTRY/vgpu-dra/kubelet-plugin:TAG and REGISTRY/vgpu-dra/controller:TAG,
# REGISTRY defaulting to docker.io (the chart's defaults), TAG to the chart's appVersion; give
# several TAGs to name one image several ways. Load them into a node's containerd with
# `ctr -n k8s.io images import OUT_DIR/kubelet-plugin.tar`, or push them with skopeo:
#   skopeo copy oci-archive:OUT_DIR/controller.tar:REGISTRY/vgpu-dra/controller:TAG \
#     docker://REGISTRY/vgpu-dra/controller:TAG
#
# libvgpu.so is preloaded into arbitrary CUDA containers and needs a glibc no newer than
# theirs: it is linked against this machine's (2.36 on Debian 12). For images with an older
# glibc, build it on an older distribution (deploy/images/kubelet-plugin.Dockerfile uses
# Debian 11, glibc 2.31).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${1:?usage: hack/images.sh OUT_DIR [TAG...]}
shift
tags=("$@")
if [ ${#tags[@]} -eq 0 ]; then
  tags=("$(sed -n 's/^appVersion: *//p' "$repo/deploy/helm/vgpu-dra/Chart.yaml")")
fi
registry=${REGISTRY:-docker.io}
profile=${PROFILE:-release}
mkdir -p "$out"
out=$(cd "$out" && pwd)

cd "$repo"
case $profile in
  release) cargo build --release -p kubelet-plugin -p controller -p libvgpu ;;
  debug) cargo build -p kubelet-plugin -p controller -p libvgpu ;;
  *) echo "PROFILE must be release or debug" >&2; exit 2 ;;
esac
target=${CARGO_TARGET_DIR:-$repo/target}/$profile

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# libs ROOT BINARY... : copies every shared library the binaries load (and the loader) into ROOT.
libs() {
  local root=$1; shift
  for binary in "$@"; do
    ldd "$binary" | grep -o '/[^ ]*' || true
  done | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# image NAME ROOT ENTRYPOINT : the archive OUT/NAME.tar, named for every tag.
image() {
  local name=$1 root=$2 entrypoint=$3 names=()
  for tag in "${tags[@]}"; do names+=(--name "$registry/vgpu-dra/$name:$tag"); done
  mkdir -p "$root/tmp" "$root/etc"
  chmod 1777 "$root/tmp"
  # The nonroot user of distroless images, for runAsNonRoot.
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
  python3 "$repo/hack/cluster/oci_archive.py" "$root" "$out/$name.tar" --entrypoint "$entrypoint" "${names[@]}"
  echo "hack/images.sh: $out/$name.tar: ${names[*]//--name /}" >&2
}

plugin=$work/kubelet-plugin
mkdir -p "$plugin/opt/vgpu"
install -m 0755 "$target/kubelet-plugin" "$target/install-library" "$plugin/"
install -m 0755 "$target/libvgpu.so" "$plugin/opt/vgpu/libvgpu.so"
strip --strip-debug "$plugin/kubelet-plugin" "$plugin/install-library" "$plugin/opt/vgpu/libvgpu.so"
libs "$plugin" "$target/kubelet-plugin" "$target/install-library"
image kubelet-plugin "$plugin" /kubelet-plugin

controller=$work/controller
mkdir -p "$controller"
install -m 0755 "$target/controller" "$controller/"
strip --strip-debug "$controller/controller"
libs "$controller" "$target/controller"
image controller "$controller" /controller
