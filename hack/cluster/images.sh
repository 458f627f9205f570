#!/usr/bin/env bash
# Builds the local cluster's images as OCI archives, without a registry or a Docker engine:
#
#   hack/cluster/images.sh OUT_DIR      # writes OUT_DIR/pause.tar and OUT_DIR/workload.tar
#
# pause: a static build of hack/cluster/pause.c. workload: Debian's busybox-static, this
# machine's glibc, and the enforcement tests' simulated CUDA driver (libcuda.so.1,
# libnvidia-ml.so.1) and probe (enforcement/tests/c), so a container shows the limits the CDI
# spec sets (`probe direct meminfo` reports the capped memory once libvgpu.so is preloaded).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
out=${1:?usage: images.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cc=${CC:-cc}
flags=(-O2 -Wall -Wextra -Werror)

# pause
mkdir -p "$work/pause"
"$cc" "${flags[@]}" -static -o "$work/pause/pause" "$here/pause.c"
strip "$work/pause/pause"

# workload
root=$work/workload stub=$work/workload/opt/stub src=$repo/enforcement/tests/c
mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$stub"
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in sh env cat ls sleep grep sort; do ln -s busybox "$root/bin/$applet"; done
(cd "$stub" &&
  "$cc" "${flags[@]}" -fPIC -shared -Wl,-Bsymbolic -Wl,-soname,libcuda.so.1 -o libcuda.so.1 "$src/stub_cuda.c" -lpthread &&
  "$cc" "${flags[@]}" -fPIC -shared -Wl,-Bsymbolic -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 "$src/stub_nvml.c" -L. -l:libcuda.so.1 &&
  "$cc" "${flags[@]}" -o probe "$src/probe.c" -L. -l:libcuda.so.1 -ldl -lpthread)
ln -s /opt/stub/probe "$root/bin/probe"
# glibc and whatever else the probe and the stubs load, as this machine resolves them; libvgpu.so
# (a Rust cdylib linked against the same glibc) needs nothing beyond these.
for binary in "$stub/probe" "$stub/libcuda.so.1" "$stub/libnvidia-ml.so.1"; do
  LD_LIBRARY_PATH=$stub ldd "$binary" | grep -o '/[^ ]*' | grep -v "^$stub" || true
done | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
for extra in /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/libm.so.6; do
  [ -e "$extra" ] && { mkdir -p "$root$(dirname "$extra")"; cp -L "$extra" "$root$extra"; }
done

# The names as the kubelet asks for them: a name without a registry means docker.io's.
qualified() {
  case ${1%%/*} in
    *.*|*:*|localhost) echo "$1" ;;
    *) echo "docker.io/$1" ;;
  esac
}
python3 "$here/oci_archive.py" "$work/pause" "$out/pause.tar" --entrypoint /pause \
  --name "$(qualified "$PAUSE_IMAGE")"
python3 "$here/oci_archive.py" "$work/workload" "$out/workload.tar" --cmd /bin/sh \
  --env PATH=/bin:/opt/stub --env LD_LIBRARY_PATH=/opt/stub \
  --name "$(qualified "$WORKLOAD_IMAGE")" --name "$(qualified "$EXAMPLES_IMAGE")"
