//! The shipped Helm chart on the real local cluster, as an admin installs it: our images
//! (hack/images.sh, loaded into the nodes' containerd by hack/e2e.sh), the plugin DaemonSet
//! registering with the kubelet through the host's plugin directories, the controller as pods
//! with in-cluster configuration, their RBAC and leader election, a workload with its limits; a
//! rolling upgrade while workloads run and new claims are prepared; an uninstall that leaves no
//! file of ours on the host. Runs after tests/e2e.rs, whose host-process installation it
//! replaces.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use test_e2e::install::{CONTROLLER, DRIVER, PLUGIN, PLUGIN_B};
use test_e2e::local::repo;
use test_e2e::{Cluster, Helm, parse_env};

const MINUTE: Duration = Duration::from_secs(60);
const RELEASE: &str = "vgpu-dra";
const NS: &str = "vgpu-system";
/// The tag hack/e2e.sh gives the same images a second time, for the upgrade.
const UPGRADE_TAG: &str = "e2e-upgrade";
const FAKE_LABEL: &str = "vgpu.hami.io/fake-gpus";

fn v1(cluster: &Cluster) -> bool {
    cluster.local.release() != "1.32"
}

fn pods(cluster: &Cluster, ns: &str, selector: &str) -> Vec<Value> {
    cluster
        .get_json(&["pods", "-n", ns, "-l", selector])
        .map(|l| l["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn plugin_pods(cluster: &Cluster) -> Vec<Value> {
    pods(cluster, NS, "app.kubernetes.io/name=vgpu-kubelet-plugin")
}

/// The plugin pods' state and logs and the kubelet's plugin-watcher lines, for a failed wait.
fn why_the_plugin_waits(cluster: &Cluster) -> String {
    let mut out = cluster
        .run(&[
            "describe",
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/name=vgpu-kubelet-plugin",
        ])
        .unwrap_or_else(|e| e);
    for pod in plugin_pods(cluster) {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        for previous in [false, true] {
            let mut args = vec!["logs", "-n", NS, name, "--tail=60"];
            if previous {
                args.push("--previous");
            }
            out += &format!("\n--- kubectl {}\n", args.join(" "));
            out += &cluster.run(&args).unwrap_or_else(|e| e);
        }
    }
    out += "\n--- the kubelet's plugin registration lines\n";
    let kubelet = cluster.local.log("kubelet");
    let lines: Vec<&str> = kubelet
        .lines()
        .filter(|l| {
            [
                "plugin_watcher",
                "RegisterPlugin",
                "DRA plugin",
                "reconciler.go",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    out += &lines[lines.len().saturating_sub(40)..].join("\n");
    out
}

fn image_of(pod: &Value) -> String {
    pod["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn slices_of(cluster: &Cluster, node: &str) -> Vec<Value> {
    cluster
        .get_json(&["resourceslices"])
        .map(|l| l["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["spec"]["driver"] == DRIVER && s["spec"]["nodeName"] == node)
        .collect()
}

/// A ResourceClaimTemplate `name` of one 2 GiB / 20 % slice, and a pod `name` using it.
fn slice_workload(cluster: &Cluster, name: &str) -> String {
    let (api, request) = if v1(cluster) {
        (
            "resource.k8s.io/v1",
            "      - name: gpu\n        exactly:\n          deviceClassName: gpu-slice.vgpu.hami.io\n",
        )
    } else {
        (
            "resource.k8s.io/v1beta1",
            "      - name: gpu\n        deviceClassName: gpu-slice.vgpu.hami.io\n",
        )
    };
    format!(
        "apiVersion: {api}\nkind: ResourceClaimTemplate\nmetadata:\n  name: {name}\nspec:\n  spec:\n    devices:\n      requests:\n{request}      config:\n      - requests: [gpu]\n        opaque:\n          driver: {DRIVER}\n          parameters:\n            apiVersion: vgpu.hami.io/v1alpha1\n            kind: GpuSliceConfig\n            memory: 2Gi\n            cores: 20\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  resourceClaims:\n  - name: gpu\n    resourceClaimTemplateName: {name}\n  containers:\n  - name: cuda\n    image: vgpu-dra/workload:e2e\n    command: [sleep, '3600']\n    resources:\n      claims:\n      - name: gpu\n"
    )
}

fn wait_running(cluster: &Cluster, ns: &str, pod: &str) -> Value {
    cluster.wait_for(&format!("pod {ns}/{pod} to run"), 3 * MINUTE, || {
        let p = cluster.get_json(&["pod", pod, "-n", ns]).ok()?;
        (p["status"]["phase"] == "Running").then_some(p)
    })
}

fn claim_uid(cluster: &Cluster, ns: &str, pod: &str) -> String {
    let p = cluster.get_json(&["pod", pod, "-n", ns]).unwrap();
    let name = p["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        .as_str()
        .unwrap_or_else(|| panic!("pod {pod} has no generated claim: {p}"))
        .to_string();
    let claim = cluster
        .get_json(&["resourceclaim", &name, "-n", ns])
        .unwrap();
    claim["metadata"]["uid"].as_str().unwrap().to_string()
}

/// Files (recursively) under `dir` whose path contains `needle`; all of them when it is empty.
fn files_under(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(files_under(&path, needle));
        } else if path.display().to_string().contains(needle) {
            out.push(path);
        }
    }
    out
}

fn exec_env(cluster: &Cluster, ns: &str, pod: &str) -> std::collections::BTreeMap<String, String> {
    parse_env(
        &cluster
            .run(&["exec", "-n", ns, pod, "-c", "cuda", "--", "env"])
            .unwrap_or_else(|e| panic!("exec in {ns}/{pod}: {e}")),
    )
}

#[test]
fn the_chart_installs_upgrades_with_surge_and_uninstalls_leaving_nothing_on_the_host() {
    let cluster = Cluster::connect();
    let local = &cluster.local;
    let helm = Helm::new(&cluster);
    let node = local.node().to_string();

    // A release left by an interrupted run goes first.
    let _ = helm.run(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout=3m"]);
    // The host-process installation of tests/e2e.rs steps aside, objects and all.
    for name in [PLUGIN, PLUGIN_B, CONTROLLER] {
        local.stop(name);
    }
    for manifest in ["vgpu-dra-1.32.yaml", "vgpu-dra-native.yaml"] {
        let path = repo().join("deploy/manifests").join(manifest);
        let _ = cluster.run(&[
            "delete",
            "-f",
            &path.display().to_string(),
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
    }
    let _ = cluster.run(&[
        "delete",
        "resourceslices",
        "--all",
        "--field-selector",
        &format!("spec.driver={DRIVER}"),
    ]);

    // The host directories of the first node, as the chart mounts them.
    let kubelet_dir = local.kubelet_root();
    let cdi_dir = local.cdi_root();
    let library_dir = local.dir().join("helm-host/vgpu");
    let plugin_dir = kubelet_dir.join("plugins").join(DRIVER);
    let registry = kubelet_dir.join("plugins_registry");
    let api = local.api_server_pod_address().to_string();
    let (api_host, api_port) = api.split_once(':').expect("host:port");
    cluster
        .run(&[
            "label",
            "node",
            &node,
            &format!("{FAKE_LABEL}=true"),
            "--overwrite",
        ])
        .expect("label the GPU node");

    let s = |p: &Path| p.display().to_string();
    let values = format!(
        "fakeGpus:\n  enabled: true\n\
         host:\n  kubeletDir: {}\n  cdiDir: {}\n  libraryDir: {}\n\
         plugin:\n  image: {{pullPolicy: Never}}\n  extraEnv:\n  - {{name: KUBERNETES_SERVICE_HOST, value: \"{api_host}\"}}\n  - {{name: KUBERNETES_SERVICE_PORT, value: \"{api_port}\"}}\n\
         controller:\n  image: {{pullPolicy: Never}}\n  leaderElection: {{leaseDuration: 4s, renewDeadline: 3s, retryPeriod: 1s}}\n  extraEnv:\n  - {{name: KUBERNETES_SERVICE_HOST, value: \"{api_host}\"}}\n  - {{name: KUBERNETES_SERVICE_PORT, value: \"{api_port}\"}}\n",
        s(&kubelet_dir),
        s(&cdi_dir),
        s(&library_dir),
    );
    let values_file = local.dir().join("helm-values.yaml");
    std::fs::write(&values_file, values).unwrap();
    let chart = Helm::chart();
    let install = helm.run(&[
        "install",
        RELEASE,
        &chart,
        "-n",
        NS,
        "--create-namespace",
        "-f",
        &s(&values_file),
        "--wait",
        "--timeout=4m",
    ]);
    if let Err(e) = install {
        let describe = cluster
            .run(&["describe", "pods", "-n", NS])
            .unwrap_or_default();
        panic!("{e}\n{describe}");
    }

    // The plugin: one pod, on the labelled node, ready (its gRPC health probe), registered with
    // the kubelet through the host's registry directory, its GPUs published.
    // (helm's --wait counts a DaemonSet with maxUnavailable 1, as on 1.32, ready with none of
    // its pods ready: the test waits for the pod itself.)
    // Ready means registered: the readiness probe asks for the kubelet's verdict.
    let first_plugin = cluster.wait_or_explain(
        "the plugin pod to be ready (registered with the kubelet)",
        2 * MINUTE,
        || {
            let p = plugin_pods(&cluster);
            (p.len() == 1 && ready(&p[0])).then(|| p[0].clone())
        },
        || why_the_plugin_waits(&cluster),
    );
    assert_eq!(first_plugin["spec"]["nodeName"], node.as_str());
    assert!(
        image_of(&first_plugin).ends_with(":v0.1.0"),
        "{}",
        image_of(&first_plugin)
    );
    let plugin_name = first_plugin["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let logs = cluster
        .run(&["logs", "-n", NS, &plugin_name])
        .unwrap_or_default();
    assert!(
        logs.contains("registered with the kubelet"),
        "ready without the kubelet's registration:\n{logs}"
    );
    cluster.wait_for("the GPUs of the node published", MINUTE, || {
        let slices = slices_of(&cluster, &node);
        (slices
            .iter()
            .map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
            == 8)
            .then_some(())
    });
    assert!(
        library_dir.join("libvgpu.so").is_file(),
        "the init container installed the enforcement library in {}",
        library_dir.display()
    );

    // The controller: two ready replicas (ready = caches synced, leader or standby), one of
    // them holding the Lease.
    let controllers = cluster.wait_for("two ready controller replicas", 2 * MINUTE, || {
        let c = pods(&cluster, NS, "app.kubernetes.io/name=vgpu-controller");
        (c.len() == 2 && c.iter().all(ready)).then_some(c)
    });
    let names: Vec<&str> = controllers
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    let holder = cluster.wait_for("a controller replica to hold the Lease", MINUTE, || {
        let lease = cluster
            .get_json(&["lease", "vgpu-controller", "-n", NS])
            .ok()?;
        lease["spec"]["holderIdentity"].as_str().map(String::from)
    });
    // The identity is the pod's name and a per-process suffix, as Go's leader election has it.
    assert!(
        names.iter().any(|n| holder.starts_with(&format!("{n}_"))),
        "the Lease holder {holder} is not one of {names:?}"
    );

    // A workload with a slice: allocated by the controller pod, prepared by the plugin pod,
    // running with its limits.
    let ns = cluster.namespace("e2e-helm");
    cluster.apply(&ns.name, &slice_workload(&cluster, "before"));
    wait_running(&cluster, &ns.name, "before");
    let env = exec_env(&cluster, &ns.name, "before");
    assert_eq!(
        env.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
        Some("2048m"),
        "{env:?}"
    );
    assert_eq!(
        env.get("CUDA_DEVICE_SM_LIMIT").map(String::as_str),
        Some("20")
    );
    let before_uid = claim_uid(&cluster, &ns.name, "before");
    assert_eq!(files_under(&cdi_dir, &before_uid).len(), 1, "its CDI spec");

    // The rolling upgrade (new image tags) while that pod runs, and a new claim prepared
    // during it.
    helm.run(&[
        "upgrade",
        RELEASE,
        &chart,
        "-n",
        NS,
        "--reuse-values",
        "--set",
        &format!("plugin.image.tag={UPGRADE_TAG},controller.image.tag={UPGRADE_TAG}"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    cluster.apply(&ns.name, &slice_workload(&cluster, "during"));
    let mut most_plugins = 0;
    cluster.wait_or_explain(
        "the plugin DaemonSet's rollout",
        3 * MINUTE,
        || {
            let p = plugin_pods(&cluster);
            most_plugins = most_plugins.max(p.len());
            (p.len() == 1 && ready(&p[0]) && image_of(&p[0]).ends_with(UPGRADE_TAG)).then_some(())
        },
        || why_the_plugin_waits(&cluster),
    );
    let new_plugin = plugin_pods(&cluster).remove(0);
    assert_ne!(
        new_plugin["metadata"]["uid"],
        first_plugin["metadata"]["uid"]
    );
    if v1(&cluster) {
        // 1.34: surge, the old instance served until the new one had registered.
        assert!(
            most_plugins >= 2,
            "the rollout never ran two plugin instances side by side (maxSurge)"
        );
    }
    wait_running(&cluster, &ns.name, "during");
    cluster.wait_for("the controller's rollout", 3 * MINUTE, || {
        let c = pods(&cluster, NS, "app.kubernetes.io/name=vgpu-controller");
        (c.len() == 2
            && c.iter()
                .all(|p| ready(p) && image_of(p).ends_with(UPGRADE_TAG)))
        .then_some(())
    });
    let before = cluster
        .get_json(&["pod", "before", "-n", &ns.name])
        .unwrap();
    assert_eq!(
        before["status"]["phase"], "Running",
        "the running pod kept running"
    );
    assert_eq!(
        before["status"]["containerStatuses"][0]["restartCount"], 0,
        "{before}"
    );
    let events = cluster
        .get_json(&["events", "-n", &ns.name])
        .unwrap()
        .to_string();
    if v1(&cluster) {
        // Without surge (1.32) a prepare in the gap fails once and the kubelet retries; with
        // it, none fails.
        assert!(
            !events.contains("FailedPrepareDynamicResources"),
            "a prepare failed during the surge upgrade: {events}"
        );
    }

    // The new plugin knows the claim the old one prepared: deleting its pod unprepares it.
    let during_uid = claim_uid(&cluster, &ns.name, "during");
    for (pod, uid) in [("before", &before_uid), ("during", &during_uid)] {
        cluster
            .run(&[
                "delete",
                "pod",
                pod,
                "-n",
                &ns.name,
                "--wait=true",
                "--timeout=120s",
            ])
            .unwrap();
        cluster.wait_for(
            &format!("the CDI spec of {pod}'s claim removed"),
            MINUTE,
            || files_under(&cdi_dir, uid).is_empty().then_some(()),
        );
    }

    // Uninstall: the plugin sees its DaemonSet gone and takes its files off the host.
    helm.run(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout=3m"])
        .unwrap_or_else(|e| panic!("{e}"));
    cluster.wait_for("the plugin pod to be gone", 2 * MINUTE, || {
        plugin_pods(&cluster).is_empty().then_some(())
    });
    let left: Vec<PathBuf> = [
        files_under(&library_dir, ""),
        files_under(&cdi_dir, DRIVER),
        files_under(&registry, DRIVER),
        files_under(&plugin_dir, ""),
    ]
    .concat();
    assert!(
        left.is_empty(),
        "files left on the host after uninstall: {left:?}"
    );
    assert!(!plugin_dir.exists(), "{} left", plugin_dir.display());
    cluster
        .run(&["label", "node", &node, &format!("{FAKE_LABEL}-")])
        .unwrap();
}
