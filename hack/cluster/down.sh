#!/usr/bin/env bash
# Stops the cluster hack/cluster/up.sh started and removes every trace of it: its processes
# (the kubelet first, so that it restarts nothing), the pods' containers and shims, their mounts,
# network namespaces and cgroups, the CNI bridge, and the state directory. Safe to run twice and
# after a failed up.sh.
#
#   hack/cluster/down.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
state=$(cluster_dir "$repo")
log() { echo "hack/cluster/down.sh: $*" >&2; }

if [ ! -d "$state" ]; then
  log "no cluster in $state"
  exit 0
fi

# stop NAME: TERM, then KILL after 10 s, the process (and its session) started as NAME.
stop() {
  local pidfile=$state/pids/$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pidfile"
}

# Processes the tests started against this cluster (our plugin and controller) record their
# pids here too.
for pidfile in "$state"/pids/*; do
  [ -e "$pidfile" ] || continue
  case $(basename "$pidfile") in
    etcd|kube-apiserver|kube-controller-manager|kube-scheduler|containerd*|kubelet*) ;;
    *) stop "$(basename "$pidfile")" ;;
  esac
done
for pidfile in "$state"/pids/kubelet*; do [ -e "$pidfile" ] && stop "$(basename "$pidfile")"; done

# Every container and sandbox of every node: kill their tasks through containerd, then the shims.
ctr_bin=$(sed -n 's/^CTR=//p' "$state/cluster.env" 2>/dev/null)
for sock in "$state"/containerd*/containerd.sock; do
  [ -S "$sock" ] && [ -x "${ctr_bin:-}" ] || continue
  for id in $("$ctr_bin" --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    "$ctr_bin" --address "$sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1
  done
  sleep 1
  for id in $("$ctr_bin" --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    "$ctr_bin" --address "$sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1
  done
done
for pidfile in "$state"/pids/containerd*; do [ -e "$pidfile" ] && stop "$(basename "$pidfile")"; done
# Shims outlive containerd by design; ours are the ones that talk to this state directory.
for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $state/" 2>/dev/null); do
  kill -KILL "$pid" 2>/dev/null
done
# Whatever runc still runs from our state (a container whose shim was killed).
for pid in $(pgrep -f "$state/containerd" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done

for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$name"; done

# Mounts under the state directory (overlay rootfs, shm, projected volumes, netns), deepest first.
for _ in 1 2 3; do
  mounts=$(awk -v s="$state" 'index($2, s) == 1 {print $2}' /proc/self/mounts | sort -r)
  [ -n "$mounts" ] || break
  for m in $mounts; do umount -l "$m" 2>/dev/null; done
done
# Network namespaces containerd made for our pods, and the CNI bridges.
for ns in /var/run/netns/cni-*; do
  [ -e "$ns" ] || continue
  if grep -qs "$(basename "$ns")" "$state"/logs/containerd*.log; then
    umount "$ns" 2>/dev/null; rm -f "$ns"
  fi
done
for bridge in vgpu-cni0 vgpu-cni1; do ip link del "$bridge" 2>/dev/null; done
# The kubelets' cgroups (cgroupfs driver: kubepods and its children in every hierarchy, under the
# root for the first node and under the second node's cgroup root), then those roots.
roots=/
[ -f "$state/cgroup-roots" ] && roots="/ $(cat "$state/cgroup-roots")"
for root in $roots; do
  for hierarchy in /sys/fs/cgroup/*/; do
    dir=$hierarchy${root#/}
    [ -d "$dir/kubepods" ] && find "$dir/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ "$root" != / ] && [ -d "$dir" ] && find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
done

# Host directories up.sh found missing, which the kubelet or containerd created.
if [ -f "$state/created-paths" ]; then
  tac "$state/created-paths" | while read -r path; do
    case $path in /*) rm -rf --one-file-system "$path" ;; esac
  done
fi

rm -rf "$state"
log "stopped; $state removed"
