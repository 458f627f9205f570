#!/usr/bin/env bash
# Render every Kustomize overlay and validate it, and every example, strictly against the
# official schemas of the Kubernetes versions it targets (kubernetes-validate).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

validate() { # version files...
  local version=$1; shift
  python3 -m kubernetes_validate --strict --quiet --no-warn -k "$version" "$@"
}

hack/examples-v1beta1.py --check

kubectl kustomize deploy/overlays/k8s-1.32 > "$out/k8s-1.32.yaml"
kubectl kustomize deploy/overlays/k8s-1.34 > "$out/k8s-1.34.yaml"
kubectl kustomize deploy/overlays/fake-gpus > "$out/fake-gpus.yaml"
kubectl kustomize deploy/overlays/fake-gpus-1.32 > "$out/fake-gpus-1.32.yaml"
kubectl kustomize deploy/overlays/k8s-1.34-native > "$out/k8s-1.34-native.yaml"
kubectl kustomize deploy/overlays/fake-gpus-native > "$out/fake-gpus-native.yaml"

validate 1.32.0 "$out/k8s-1.32.yaml" "$out/fake-gpus-1.32.yaml" deploy/examples/v1beta1/*.yaml
validate 1.33.0 "$out/k8s-1.32.yaml" "$out/fake-gpus-1.32.yaml" deploy/examples/v1beta1/*.yaml
validate 1.34.0 "$out/k8s-1.34.yaml" "$out/fake-gpus.yaml" deploy/examples/v1/*.yaml
validate 1.35.0 "$out/k8s-1.34.yaml" "$out/fake-gpus.yaml" deploy/examples/v1/*.yaml
# Native sharing exists from 1.34 (resource.k8s.io/v1 with capacity.requests).
validate 1.34.0 "$out/k8s-1.34-native.yaml" "$out/fake-gpus-native.yaml" deploy/examples/native/*.yaml
validate 1.35.0 "$out/k8s-1.34-native.yaml" "$out/fake-gpus-native.yaml" deploy/examples/native/*.yaml
for f in "$out"/*-native.yaml; do
  grep -q 'value: native' "$f" && grep -q 'name: gpu-share.vgpu.hami.io' "$f" ||
    { echo "$f: not a native-mode installation" >&2; exit 1; }
done

# The rendered objects must be the ones we mean: every overlay installs both binaries and the
# slice class carries the controller marker.
for f in "$out"/*.yaml; do
  grep -q 'name: vgpu-kubelet-plugin' "$f" && grep -q 'name: vgpu-controller' "$f" ||
    { echo "$f lacks the plugin or the controller" >&2; exit 1; }
  grep -q 'has(device.attributes\["vgpu.hami.io"\].allocatedByController)' "$f" ||
    { echo "$f: the gpu-slice class lacks the controller marker" >&2; exit 1; }
done
# The monitoring overlay: the core objects validate; the PodMonitors and the PrometheusRule (CRDs
# the schemas do not carry) are checked here: the monitors must select the pods and name the
# port that serves /metrics, the dashboard ConfigMap must hold JSON. (That their PromQL names
# only metrics the binaries register is kubelet-plugin/tests/monitoring.rs's job.)
kubectl kustomize deploy/overlays/k8s-1.34-monitoring > "$out/monitoring-all.yaml"
python3 - "$out/monitoring-all.yaml" "$out/monitoring-core.yaml" <<'PY'
import sys, yaml
import json
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
monitors = [d for d in docs if d["kind"] == "PodMonitor"]
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
core = [d for d in docs if d["kind"] not in ("PodMonitor", "PrometheusRule")]
assert len(monitors) == 2, monitors
assert len(rules) == 1 and rules[0]["spec"]["groups"][0]["rules"], rules
dashboards = [d for d in core if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
assert len(dashboards) == 1, dashboards
for name, text in dashboards[0]["data"].items():
    assert json.loads(text)["panels"], name
pods = {d["metadata"]["name"]: d["spec"]["template"] for d in core if d["kind"] in ("DaemonSet", "Deployment")}
for m in monitors:
    want = m["spec"]["selector"]["matchLabels"]
    matched = [t for t in pods.values() if all(t["metadata"]["labels"].get(k) == v for k, v in want.items())]
    assert len(matched) == 1, f"PodMonitor {m['metadata']['name']} selects {len(matched)} workloads"
    ports = {p["name"] for c in matched[0]["spec"]["containers"] for p in c.get("ports", [])}
    assert all(e["port"] in ports for e in m["spec"]["podMetricsEndpoints"]), (m, ports)
yaml.safe_dump_all(core, open(sys.argv[2], "w"))
PY
validate 1.34.0 "$out/monitoring-core.yaml"

grep -q 'vgpu.hami.io/fake-gpus' "$out/fake-gpus-1.32.yaml" && grep -q 'resource.k8s.io/v1beta1' "$out/fake-gpus-1.32.yaml" ||
  { echo "the 1.32 fake-GPU overlay is not a 1.32 fake-GPU installation" >&2; exit 1; }
echo "manifests: 7 overlays, $(ls deploy/examples/v1/*.yaml | wc -l) examples × 2 API versions and $(ls deploy/examples/native/*.yaml | wc -l) native examples validate"
