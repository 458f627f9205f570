#!/usr/bin/env bash
# The Helm chart (deploy/helm/vgpu-dra, the one source of every installation) and the examples
# against the official schemas of the Kubernetes versions they target (kubernetes-validate):
# helm lint, the chart rendered for 1.32, 1.33, 1.34 and 1.35 in every mode, the values schema
# refusing what cannot work, and deploy/manifests (the chart rendered for kubectl apply) equal
# to what the chart renders now.
set -euo pipefail
cd "$(dirname "$0")/.."
helm=${HELM:-$(hack/helm.sh)}
export HELM=$helm
chart=deploy/helm/vgpu-dra
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

validate() { # version files...
  local version=$1; shift
  python3 -m kubernetes_validate --strict --quiet --no-warn -k "$version" "$@"
}
# render NAME KUBE_VERSION [helm args...]: $out/NAME.yaml
render() {
  local name=$1 version=$2; shift 2
  "$helm" template vgpu-dra "$chart" -n vgpu-system --kube-version "$version" "$@" > "$out/$name.yaml"
}

hack/examples-v1beta1.py --check

"$helm" lint --strict "$chart" --kube-version 1.34.0
"$helm" lint --strict "$chart" --kube-version 1.32.0 --set fakeGpus.enabled=true
"$helm" lint --strict "$chart" --kube-version 1.34.0 \
  --set sharingMode=native,metrics.podMonitors.enabled=true,metrics.prometheusRule.enabled=true,metrics.grafanaDashboard.enabled=true

for version in 1.32.0 1.33.0; do
  render "default-$version" "$version"
  render "fake-$version" "$version" --set fakeGpus.enabled=true
  render "single-$version" "$version" --set controller.replicas=1,controller.leaderElection.enabled=false
  validate "$version" "$out/default-$version.yaml" "$out/fake-$version.yaml" "$out/single-$version.yaml" \
    deploy/examples/v1beta1/*.yaml
  grep -q 'apiVersion: resource.k8s.io/v1beta1' "$out/default-$version.yaml" ||
    { echo "the chart for $version does not install resource.k8s.io/v1beta1 DeviceClasses" >&2; exit 1; }
  grep -q 'maxSurge' "$out/default-$version.yaml" && [ "$version" = 1.32.0 ] &&
    { echo "the chart for 1.32 surges the plugin, which its kubelet cannot run twice" >&2; exit 1; }
done
for version in 1.34.0 1.35.0; do
  render "default-$version" "$version"
  render "fake-$version" "$version" --set fakeGpus.enabled=true
  render "native-$version" "$version" --set sharingMode=native
  render "custom-$version" "$version" --set driverName=gpu.example.com,host.kubeletDir=/data/kubelet,logFormat=json \
    --set controller.enabled=false,admissionPolicy.enabled=false,metrics.services=false
  validate "$version" "$out/default-$version.yaml" "$out/fake-$version.yaml" "$out/native-$version.yaml" \
    "$out/custom-$version.yaml" deploy/examples/v1/*.yaml
  # Native sharing exists from 1.34 (resource.k8s.io/v1 with capacity.requests).
  validate "$version" deploy/examples/native/*.yaml
  grep -q 'maxSurge: 1' "$out/default-$version.yaml" ||
    { echo "the chart for $version does not surge the plugin's rolling update" >&2; exit 1; }
done

python3 - "$out" <<'PY'
import glob, sys, yaml
out = sys.argv[1]

class Strict(yaml.SafeLoader):
    """A key twice in one mapping is an error (kubectl and the API server reject it)."""
def mapping(loader, node, deep=False):
    seen = set()
    for k, _ in node.value:
        key = loader.construct_object(k, deep=deep)
        assert key not in seen, f"{key!r} twice in one mapping at {k.start_mark}"
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)
Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

def docs(name):
    return [d for d in yaml.load_all(open(f"{out}/{name}.yaml"), Loader=Strict) if d]
for f in glob.glob(f"{out}/*.yaml"):
    list(yaml.load_all(open(f), Loader=Strict))
def one(ds, kind, name=None):
    found = [d for d in ds if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]
for v in ["1.32.0", "1.33.0", "1.34.0", "1.35.0"]:
    ds = docs(f"default-{v}")
    kinds = {d["kind"] for d in ds}
    want = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "DeviceClass",
            "DaemonSet", "Deployment", "Service", "PodDisruptionBudget"}
    assert want <= kinds, (v, want - kinds)
    # Everything namespaced lands in the release's namespace.
    for d in ds:
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "DaemonSet", "Deployment", "Service",
                         "PodDisruptionBudget", "ConfigMap"):
            assert d["metadata"]["namespace"] == "vgpu-system", d["metadata"]
    slice_class = one(ds, "DeviceClass", "gpu-slice.vgpu.hami.io")
    exprs = [s["cel"]["expression"] for s in slice_class["spec"]["selectors"]]
    assert 'has(device.attributes["vgpu.hami.io"].allocatedByController)' in exprs, exprs
    ds_ = one(ds, "DaemonSet")
    pod = ds_["spec"]["template"]["spec"]
    plugin = pod["containers"][0]
    assert "--driver-name=vgpu.hami.io" in plugin["args"], plugin["args"]
    assert plugin["livenessProbe"]["grpc"]["port"] == 51515, plugin
    # Readiness is the kubelet's registration (dra::kubeletplugin::REGISTERED_SERVICE).
    assert plugin["readinessProbe"]["grpc"] == {"port": 51515, "service": "kubelet-registration"}, plugin
    assert "service" not in plugin["livenessProbe"]["grpc"], plugin
    env = {e["name"]: e for e in plugin["env"]}
    assert env["POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ctrl = one(ds, "Deployment")["spec"]["template"]["spec"]
    assert ctrl["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = ctrl["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The bindings name the release's namespace, and the admission policy its plugin's account.
    for b in (d for d in ds if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        assert all(s["namespace"] == "vgpu-system" for s in b["subjects"]), b
    vap = one(ds, "ValidatingAdmissionPolicy", "vgpu-resourceslices-own-node")
    assert "system:serviceaccount:vgpu-system:vgpu-kubelet-plugin" in vap["spec"]["matchConditions"][0]["expression"]
    assert any("spec.driver" in v["expression"] for v in vap["spec"]["validations"])
    assert any("spec.pool.name" in v["expression"] for v in vap["spec"]["validations"])
    # The controller may patch pods (to lift its scheduling gate) and nothing else of them.
    gates = one(ds, "ValidatingAdmissionPolicy", "vgpu-controller-lifts-gates-only")
    assert "system:serviceaccount:vgpu-system:vgpu-controller" in gates["spec"]["matchConditions"][0]["expression"]
    assert gates["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["pods"]
    assert {"name": "gate", "expression": "'vgpu.hami.io/allocation'"} in gates["spec"]["variables"]
    assert one(ds, "ValidatingAdmissionPolicyBinding", "vgpu-controller-lifts-gates-only")["spec"]["validationActions"] == ["Deny"]
    role = one(ds, "ClusterRole", "vgpu-controller")
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]} in role["rules"], role["rules"]

# Another driver name and kubelet directory reach every place that spells them.
ds = docs("custom-1.34.0")
text = open(f"{out}/custom-1.34.0.yaml").read()
assert "vgpu.hami.io\"" not in text and "driver: vgpu.hami.io" not in text, "driver name hard-wired somewhere"
plugin = one(ds, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
assert "--plugin-dir=/data/kubelet/plugins/gpu.example.com" in plugin["args"], plugin["args"]
assert "--registrar-dir=/data/kubelet/plugins_registry" in plugin["args"], plugin["args"]
assert "--log-format=json" in plugin["args"]
assert not [d for d in ds if d["kind"] in ("Deployment", "ValidatingAdmissionPolicy", "Service")]

# Native mode adds the share class; fake GPUs select the labelled nodes and mount the inventory.
assert one(docs("native-1.34.0"), "DeviceClass", "gpu-share.vgpu.hami.io")
fake = docs("fake-1.34.0")
assert one(fake, "ConfigMap", "vgpu-fake-gpus")["data"]["fake-gpus.yaml"].startswith("# An HGX H100 node")
pod = one(fake, "DaemonSet")["spec"]["template"]["spec"]
assert pod["nodeSelector"] == {"vgpu.hami.io/fake-gpus": "true"}, pod["nodeSelector"]
assert {"name": "FAKE_GPUS", "value": "/etc/vgpu/fake-gpus.yaml"} in pod["containers"][0]["env"]
print("chart: every rendering has what it must")
PY

# Monitoring: PodMonitors and the PrometheusRule (CRDs the schemas do not carry) and the Grafana
# dashboard's ConfigMap. The monitors select the pods and name the port serving /metrics; the
# rule and the dashboard are the files tests/monitoring.rs checks against the binaries' metrics,
# carried through unrendered (Prometheus' own {{ $labels }} templates intact).
render monitoring 1.34.0 --set metrics.podMonitors.enabled=true,metrics.prometheusRule.enabled=true,metrics.grafanaDashboard.enabled=true
python3 - "$out/monitoring.yaml" "$chart/files/monitoring" "$out/monitoring-core.yaml" <<'PY'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
files = sys.argv[2]
monitors = [d for d in docs if d["kind"] == "PodMonitor"]
assert len(monitors) == 2, monitors
pods = [d["spec"]["template"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")]
for m in monitors:
    want = m["spec"]["selector"]["matchLabels"]
    matched = [t for t in pods if all(t["metadata"]["labels"].get(k) == v for k, v in want.items())]
    assert len(matched) == 1, f"PodMonitor {m['metadata']['name']} selects {len(matched)} workloads"
    ports = {p["name"] for c in matched[0]["spec"]["containers"] for p in c.get("ports", [])}
    assert all(e["port"] in ports for e in m["spec"]["podMetricsEndpoints"]), (m, ports)
rules = [d for d in docs if d["kind"] == "PrometheusRule"]
assert len(rules) == 1, rules
source = yaml.safe_load(open(f"{files}/prometheusrule.yaml"))
assert rules[0]["spec"] == source["spec"], "the PrometheusRule is not files/monitoring/prometheusrule.yaml"
assert rules[0]["metadata"]["namespace"] == "vgpu-system"
dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
assert len(dashboards) == 1, dashboards
shipped = json.loads(dashboards[0]["data"]["vgpu-dra-dashboard.json"])
assert shipped == json.load(open(f"{files}/vgpu-dra-dashboard.json")) and shipped["panels"]
core = [d for d in docs if d["kind"] not in ("PodMonitor", "PrometheusRule")]
yaml.safe_dump_all(core, open(sys.argv[3], "w"))
PY
validate 1.34.0 "$out/monitoring-core.yaml"

# What cannot work is refused at install time, naming the value.
refused() { # what-it-must-say helm-args...
  local want=$1; shift
  local err
  if err=$("$helm" template vgpu-dra "$chart" -n vgpu-system "$@" 2>&1 >/dev/null); then
    echo "helm template $* was accepted; it must be refused" >&2; exit 1
  fi
  grep -q -- "$want" <<<"$err" || { echo "helm template $*: refused without naming '$want': $err" >&2; exit 1; }
}
refused sharingMode --kube-version 1.34.0 --set sharingMode=shared
refused "sharingMode: native needs Kubernetes 1.34" --kube-version 1.32.0 --set sharingMode=native
refused logFormat --kube-version 1.34.0 --set logFormat=yaml
refused kubeletDir --kube-version 1.34.0 --set host.kubeletDir=relative/path
refused "leaderElection" --kube-version 1.34.0 --set controller.leaderElection.enabled=false
refused "kubeVersion" --kube-version 1.31.0

hack/render-manifests.sh --check
validate 1.34.0 deploy/manifests/vgpu-dra.yaml deploy/manifests/vgpu-dra-native.yaml deploy/manifests/vgpu-dra-fake-gpus.yaml
validate 1.32.0 deploy/manifests/vgpu-dra-1.32.yaml
echo "manifests: the chart lints, renders and validates for 1.32–1.35 in every mode; $(ls deploy/examples/v1/*.yaml | wc -l) examples × 2 API versions and $(ls deploy/examples/native/*.yaml | wc -l) native examples validate"
