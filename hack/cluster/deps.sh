#!/usr/bin/env bash
# Debian packages the local cluster needs beside what build.sh builds: runc (the OCI runtime
# containerd drives), busybox-static (the workload image), openssl (certificates), curl (health
# checks), and the C library's static archive for the pause image. Installed only when missing.
set -euo pipefail
missing=()
command -v runc >/dev/null || missing+=(runc)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
command -v mount >/dev/null || missing+=(mount)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "hack/cluster/deps.sh: install ${missing[*]} (Debian: apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "hack/cluster/deps.sh: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
