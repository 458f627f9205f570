#!/usr/bin/env bash
# A real one-node Kubernetes cluster as local processes, the way Kubernetes' own
# hack/local-up-cluster.sh runs one: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd (CDI on) with Debian's runc and the CNI bridge, and a kubelet, all
# built from their official Go modules by hack/cluster/build.sh (cached after the first build).
#
#   hack/cluster/up.sh 1.32|1.34        # prints the kubeconfig path on its last line
#   hack/cluster/down.sh                # stops everything and removes every trace
#
# 1.32 serves resource.k8s.io/v1beta1 with the DynamicResourceAllocation gate on; 1.34 serves v1
# (DRA is GA) with DRAConsumableCapacity on for the native sharing mode. Authorization is Node
# and RBAC, admission includes NodeRestriction and ValidatingAdmissionPolicy. Everything lives in
# VGPU_CLUSTER_DIR (default .cluster/ in the repository, ignored by git, or /tmp/vgpu-dra-cluster
# where the repository path is too long for the sockets under it): certificates,
# kubeconfigs, logs (logs/<component>.log), etcd's data, the kubelet's root directory, the CDI
# spec directory the runtime reads (cdi/), and cluster.env, which names them for the tests.
# Needs root (the kubelet and containerd manage cgroups, mounts and network namespaces).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
release_versions "${1:-}"

state=$(cluster_dir "$repo")
log() { echo "hack/cluster/up.sh: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root: the kubelet and containerd manage cgroups, mounts and network namespaces"
if [ -f "$state/cluster.env" ]; then
  die "a cluster is already up in $state (hack/cluster/down.sh stops it)"
fi
# The kubelet's plugin sockets live under the state directory: keep their paths well inside the
# 108-byte limit of a Unix socket address.
[ ${#state} -le 60 ] || die "VGPU_CLUSTER_DIR=$state is too long for Unix socket paths (60 characters at most)"

"$here/deps.sh"
cache=$("$here/build.sh" "$K8S_RELEASE")
k8s_bin="$cache/kubernetes-$K8S_VERSION/bin"
etcd_bin="$cache/etcd-$ETCD_VERSION/bin"
containerd_bin="$cache/containerd-$CONTAINERD_VERSION/bin"
cni_bin="$cache/cni-plugins-$CNI_VERSION/bin"
export PATH="$k8s_bin:$etcd_bin:$containerd_bin:$PATH"

# The node is named after this machine when its name resolves to loopback (the API server
# reaches the kubelet by that name, and the kubelet refuses a loopback node IP), else localhost.
node=$(hostname | tr '[:upper:]' '[:lower:]')
case $(getent hosts "$node" | awk '{print $1; exit}') in
  127.*) ;;
  *) node=localhost ;;
esac
# The second node: localhost resolves to loopback everywhere (only where the first node took
# that name does the second get one the API server cannot reach, for logs and exec).
node_b=localhost
[ "$node" != localhost ] || node_b=vgpu-node-b

mkdir -p "$state"/{pki,logs,pids,etcd}
chmod 0700 "$state/pki"
trap 'status=$?; if [ $status -ne 0 ]; then log "failed; logs are in $state/logs, hack/cluster/down.sh cleans up"; fi' EXIT

# --- certificates and keys --------------------------------------------------------------------
pki=$state/pki
openssl_quiet() { openssl "$@" 2>/dev/null; }
openssl_quiet req -x509 -newkey rsa:2048 -nodes -days 3 -subj "/CN=vgpu-e2e-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt"
# cert NAME SUBJECT [SAN]: a key and a certificate signed by the cluster CA.
cert() {
  local name=$1 subject=$2 san=${3:-} ext
  ext=$(mktemp)
  if [ -n "$san" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$ext"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "$ext"
  fi
  openssl_quiet req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$pki/$name.key" -out "$pki/$name.csr"
  openssl_quiet x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3 -extfile "$ext" -out "$pki/$name.crt"
  rm -f "$pki/$name.csr" "$ext"
}
# Pods reach the API server at the first node's bridge address (10.244.0.1, see the CNI
# configuration below): there is no kube-proxy here to route the kubernetes Service's
# ClusterIP, so the in-cluster workloads of the chart's e2e install are pointed there
# (KUBERNETES_SERVICE_HOST/PORT, API_SERVER_POD_ADDRESS in cluster.env).
pod_api_host=10.244.0.1
cert apiserver "/CN=kube-apiserver" "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc,IP:127.0.0.1,IP:10.0.0.1,IP:$pod_api_host"
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=vgpu-e2e-admin"
cert controller-manager "/CN=system:kube-controller-manager"
cert scheduler "/CN=system:kube-scheduler"
openssl_quiet genrsa -out "$pki/sa.key" 2048
openssl_quiet rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

server=https://127.0.0.1:6443
# kubeconfig NAME CERT: a kubeconfig for the client certificate CERT.
kubeconfig() {
  cat > "$state/$1.kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: vgpu-e2e
  cluster: {server: $server, certificate-authority: $pki/ca.crt}
users:
- name: $2
  user: {client-certificate: $pki/$2.crt, client-key: $pki/$2.key}
contexts:
- name: vgpu-e2e
  context: {cluster: vgpu-e2e, user: $2}
current-context: vgpu-e2e
YAML
}
kubeconfig admin admin
kubeconfig controller-manager controller-manager
kubeconfig scheduler scheduler
export KUBECONFIG=$state/admin.kubeconfig

# --- feature gates per release ------------------------------------------------------------------
case $K8S_RELEASE in
  1.32) gates=DynamicResourceAllocation=true runtime_config=resource.k8s.io/v1beta1=true ;;
  # 1.34 serves v1beta1 too, off by default: on here, so the suite can hold our wire
  # conversion against the API server's own.
  1.34) gates=DRAConsumableCapacity=true runtime_config=resource.k8s.io/v1beta1=true ;;
esac

# start NAME COMMAND...: writes launch/NAME (COMMAND, logging to logs/NAME.log, its pid in
# pids/NAME) and runs it. The tests restart a component they killed with the same launcher.
start() {
  local name=$1; shift
  mkdir -p "$state/launch"
  {
    echo '#!/bin/sh'
    echo "# Starts $name as hack/cluster/up.sh did."
    echo "export PATH='$PATH'"
    printf 'setsid'; printf " '%s'" "$@"; printf " >>'%s' 2>&1 </dev/null &\n" "$state/logs/$name.log"
    echo "echo \$! > '$state/pids/$name'"
  } > "$state/launch/$name"
  chmod +x "$state/launch/$name"
  "$state/launch/$name"
}
# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${limit}s waiting for $what"
    sleep 1
  done
}

# Host paths the kubelet and containerd create outside the state directory whatever they are
# told (the device-plugin socket directory, the container log links, shim run directories):
# down.sh removes those that did not exist before.
for path in /var/lib/kubelet /var/lib/kubelet/device-plugins /var/log/containers /var/log/pods \
  /run/containerd /var/run/netns; do
  [ -e "$path" ] || echo "$path" >> "$state/created-paths"
done

# Written first so that down.sh can find and stop whatever started, even after a failure below.
cat > "$state/cluster.env" <<ENV
# Written by hack/cluster/up.sh; read by hack/cluster/down.sh and the end-to-end tests.
K8S_RELEASE=$K8S_RELEASE
K8S_VERSION=$K8S_VERSION
KUBECONFIG=$state/admin.kubeconfig
KUBECTL=$k8s_bin/kubectl
NODE_NAME=$node
KUBELET_ROOT=$state/kubelet
CDI_ROOT=$state/cdi
CONTAINERD_SOCKET=$state/containerd/containerd.sock
NODE_B_NAME=$node_b
KUBELET_ROOT_B=$state/kubelet-b
CDI_ROOT_B=$state/cdi-b
CONTAINERD_SOCKET_B=$state/containerd-b/containerd.sock
CTR=$containerd_bin/ctr
CLUSTER_DIR=$state
LAUNCH_DIR=$state/launch
PID_DIR=$state/pids
LOG_DIR=$state/logs
API_SERVER_POD_ADDRESS=$pod_api_host:6443
ENV

log "starting Kubernetes $K8S_VERSION in $state (node $node)"
start etcd etcd --name default --data-dir "$state/etcd" \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster default=http://127.0.0.1:2380 --listen-metrics-urls "" --unsafe-no-fsync
wait_for etcd 60 curl -sf http://127.0.0.1:2379/health

start kube-apiserver kube-apiserver \
  --etcd-servers=http://127.0.0.1:2379 \
  --bind-address=0.0.0.0 --advertise-address=127.0.0.1 --secure-port=6443 \
  --endpoint-reconciler-type=none \
  --service-cluster-ip-range=10.0.0.0/24 \
  --client-ca-file="$pki/ca.crt" --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
  --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types=Hostname,InternalIP \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --feature-gates="$gates" ${runtime_config:+--runtime-config="$runtime_config"}
wait_for kube-apiserver 120 kubectl get --raw /readyz

start kube-controller-manager kube-controller-manager \
  --kubeconfig="$state/controller-manager.kubeconfig" \
  --authentication-kubeconfig="$state/controller-manager.kubeconfig" \
  --authorization-kubeconfig="$state/controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --use-service-account-credentials=true \
  --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
  --feature-gates="$gates"
start kube-scheduler kube-scheduler \
  --kubeconfig="$state/scheduler.kubeconfig" \
  --authentication-kubeconfig="$state/scheduler.kubeconfig" \
  --authorization-kubeconfig="$state/scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false \
  --feature-gates="$gates"

# --- the nodes ----------------------------------------------------------------------------------
# Two nodes, each a kubelet with its own containerd, CNI bridge, kubelet root directory, CDI
# directory and cgroup subtree, as two machines would have. The first ($node) is where the tests
# run GPU pods; the second ($node_b) gets a kubelet plugin only in the tests that need a second
# GPU node (a pod the scheduler cannot fit where our controller placed its claim).
kubelet_gates=$(echo "$gates" | sed -E 's/([A-Za-z]+)=(true|false)/"\1": \2/g')
images_built=

# start_node INDEX NAME SUFFIX : the container runtime and the kubelet of one node.
start_node() {
  local idx=$1 name=$2 sfx=$3
  local run=$state/containerd$sfx cni=$state/cni$sfx cdi=$state/cdi$sfx root=$state/kubelet$sfx
  local cgroup_root=/ sock
  sock=$run/containerd.sock
  mkdir -p "$run" "$cni/net.d" "$cni/ipam" "$cdi" "$root"
  if [ "$idx" -gt 0 ]; then
    # The kubelet needs its cgroup root to exist; a new cpuset cgroup starts with no CPUs.
    cgroup_root=/vgpu-node$sfx
    for hierarchy in /sys/fs/cgroup/*/; do
      case $hierarchy in */unified/) continue ;; esac
      mkdir -p "$hierarchy$cgroup_root"
    done
    cat /sys/fs/cgroup/cpuset/cpuset.cpus > "/sys/fs/cgroup/cpuset$cgroup_root/cpuset.cpus"
    cat /sys/fs/cgroup/cpuset/cpuset.mems > "/sys/fs/cgroup/cpuset$cgroup_root/cpuset.mems"
    echo "$cgroup_root" >> "$state/cgroup-roots"
  fi
  cat > "$cni/net.d/10-vgpu-e2e.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "vgpu-e2e",
  "plugins": [
    {
      "type": "bridge", "bridge": "vgpu-cni$idx", "isGateway": true, "isDefaultGateway": true, "ipMasq": false,
      "ipam": {"type": "host-local", "dataDir": "$cni/ipam",
               "ranges": [[{"subnet": "10.244.$idx.0/24"}]]}
    }
  ]
}
JSON
  cat > "$run/config.toml" <<TOML
version = 3
root = '$run/root'
state = '$run/state'
[grpc]
  address = '$sock'
[ttrpc]
  address = '$sock.ttrpc'
[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '$run/opt'
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '$PAUSE_IMAGE'
  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = true
    # Some sandboxed VMs refuse a negative oom_score_adj (EIO), which the pod sandbox (-998) and
    # Guaranteed containers ask for; never ask below containerd's own score.
    restrict_oom_score_adj = true
    cdi_spec_dirs = ['$cdi']
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '$(command -v runc)'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['$cni_bin']
      conf_dir = '$cni/net.d'
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
TOML
  start "containerd$sfx" containerd --config "$run/config.toml"
  wait_for "containerd$sfx" 60 ctr --address "$sock" version

  # Images: there is no registry; the pause image and the workload image are built here and
  # imported under the names the kubelet and the examples ask for.
  if [ -z "$images_built" ]; then
    "$here/images.sh" "$state/images"
    images_built=1
  fi
  for archive in "$state"/images/*.tar; do
    ctr --address "$sock" -n k8s.io images import --local "$archive" >/dev/null
  done

  cert "kubelet$sfx" "/O=system:nodes/CN=system:node:$name"
  cert "kubelet-serving$sfx" "/CN=$name" "DNS:$name,DNS:localhost,IP:127.0.0.1"
  kubeconfig "kubelet$sfx" "kubelet$sfx"
  cat > "$state/kubelet$sfx.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: $((10250 + 10 * idx))
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $((10248 + 10 * idx))
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet-serving$sfx.crt
tlsPrivateKeyFile: $pki/kubelet-serving$sfx.key
cgroupDriver: cgroupfs
cgroupRoot: $cgroup_root
containerRuntimeEndpoint: unix://$sock
failSwapOn: false
featureGates: {$kubelet_gates}
# A test machine's disk is often fuller than the defaults allow; never evict for it here.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podLogsDir: $state/pod-logs$sfx
syncFrequency: 10s
fileCheckFrequency: 10s
YAML
  start "kubelet$sfx" kubelet --config="$state/kubelet$sfx.yaml" --kubeconfig="$state/kubelet$sfx.kubeconfig" \
    --root-dir="$root" --hostname-override="$name" --v=3
}

start_node 0 "$node" ""
start_node 1 "$node_b" "-b"
for n in "$node" "$node_b"; do
  wait_for "node $n to register" 120 kubectl get node "$n"
  wait_for "node $n to be Ready" 180 kubectl wait --for=condition=Ready "node/$n" --timeout=5s
done
# The API server's own RBAC bootstrap is done once the default ServiceAccount exists.
wait_for "the default ServiceAccount" 60 kubectl -n default get serviceaccount default

log "up: Kubernetes $K8S_VERSION, nodes $node and $node_b; KUBECONFIG=$state/admin.kubeconfig (cluster.env lists the rest)"
echo "$state/admin.kubeconfig"
