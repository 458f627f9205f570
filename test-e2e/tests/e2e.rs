//! The product on a real cluster (installed with hack/kind/cluster.sh in fake-GPU mode): slices
//! published, every example runs with its limits and mounts, capacity is freed, an oversized
//! claim stays pending with an Event, and a plugin restart leaves running pods alone.
//!
//! Run with `cargo test -p test-e2e -- --test-threads=1`; each test skips when KUBECONFIG
//! names no reachable cluster.

use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use test_e2e::{Cluster, parse_env};

const DRIVER: &str = "vgpu.hami.io";
const MINUTE: Duration = Duration::from_secs(60);
/// The memory of each GPU of the fake-GPU installation (deploy/components/fake-gpus), in
/// HAMi-core's format.
const FAKE_GPU_MEMORY: &str = "81559m";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example directory matching the cluster's resource.k8s.io version.
fn examples_dir(cluster: &Cluster) -> PathBuf {
    let served = cluster.run(&["api-versions"]).expect("api-versions");
    let version = if served.lines().any(|l| l == "resource.k8s.io/v1") {
        "v1"
    } else {
        "v1beta1"
    };
    repo().join("deploy/examples").join(version)
}

fn our_slices(cluster: &Cluster) -> Vec<Value> {
    let slices = cluster
        .get_json(&["resourceslices"])
        .expect("list resourceslices");
    slices["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["spec"]["driver"] == DRIVER)
        .collect()
}

fn pod_phase(cluster: &Cluster, ns: &str, pod: &str) -> Option<String> {
    cluster
        .get_json(&["pod", pod, "-n", ns])
        .ok()
        .and_then(|p| p["status"]["phase"].as_str().map(str::to_string))
}

fn wait_running(cluster: &Cluster, ns: &str, pod: &str) {
    cluster.wait_for(&format!("pod {ns}/{pod} running"), 3 * MINUTE, || {
        (pod_phase(cluster, ns, pod).as_deref() == Some("Running")).then_some(())
    });
}

fn container_env(
    cluster: &Cluster,
    ns: &str,
    pod: &str,
    container: &str,
) -> std::collections::BTreeMap<String, String> {
    parse_env(
        &cluster
            .run(&["exec", "-n", ns, pod, "-c", container, "--", "env"])
            .expect("exec env"),
    )
}

#[test]
fn the_plugin_publishes_one_pool_per_node() {
    let Some(cluster) = Cluster::connect() else {
        return;
    };
    let slices = cluster.wait_for("our ResourceSlices", 2 * MINUTE, || {
        let s = our_slices(&cluster);
        (!s.is_empty()).then_some(s)
    });
    for slice in &slices {
        let node = slice["spec"]["nodeName"]
            .as_str()
            .expect("spec.nodeName set");
        assert_eq!(slice["spec"]["pool"]["name"], node, "pool name = node name");
        assert_eq!(slice["metadata"]["ownerReferences"][0]["kind"], "Node");
        let devices = slice["spec"]["devices"].as_array().expect("devices");
        assert!(!devices.is_empty(), "{node}: no devices");
    }
}

#[test]
fn every_example_runs_with_its_limits_and_mounts() {
    let Some(cluster) = Cluster::connect() else {
        return;
    };
    let dir = examples_dir(&cluster);
    // (file, pod, containers, expected memory limit of GPU 0, expected SM limit)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [&'a str],
        Option<&'a str>,
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        (
            "slice-2gi-30pct.yaml",
            "slice-2gi-30pct",
            &["cuda"],
            Some("2048m"),
            Some("30"),
        ),
        (
            "shared-slice-two-containers.yaml",
            "shared-slice",
            &["server", "sidecar"],
            Some("8192m"),
            Some("50"),
        ),
        (
            "nvlink-pair.yaml",
            "nvlink-pair",
            &["train"],
            Some("20480m"),
            Some("50"),
        ),
        (
            "model-restricted.yaml",
            "h100-slice",
            &["cuda"],
            Some("10240m"),
            Some("25"),
        ),
        // A whole GPU still gets its (full) memory limit; 100 % means no throttling.
        (
            "exclusive-gpu.yaml",
            "exclusive-gpu",
            &["cuda"],
            Some(FAKE_GPU_MEMORY),
            None,
        ),
        (
            "whole-gpu.yaml",
            "whole-gpu",
            &["cuda"],
            Some(FAKE_GPU_MEMORY),
            None,
        ),
    ];
    for (file, pod, containers, memory, sm) in cases {
        let ns = cluster.namespace("vgpu-e2e");
        let path = dir.join(file);
        cluster
            .run(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()])
            .expect("apply example");
        wait_running(&cluster, &ns.name, pod);
        let mut shared_cache = None;
        for container in *containers {
            let env = container_env(&cluster, &ns.name, pod, container);
            assert!(
                env.contains_key("CUDA_VISIBLE_DEVICES"),
                "{file}/{container}: no CUDA_VISIBLE_DEVICES"
            );
            assert_eq!(
                env.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
                *memory,
                "{file}/{container}"
            );
            assert_eq!(
                env.get("CUDA_DEVICE_SM_LIMIT")
                    .map(String::as_str)
                    .filter(|v| *v != "0" && *v != "100"),
                *sm,
                "{file}/{container}"
            );
            if memory.is_some() {
                let preload = cluster
                    .run(&[
                        "exec",
                        "-n",
                        &ns.name,
                        pod,
                        "-c",
                        container,
                        "--",
                        "cat",
                        "/etc/ld.so.preload",
                    ])
                    .expect("read ld.so.preload");
                assert!(
                    preload.contains("libvgpu.so"),
                    "{file}/{container}: ld.so.preload = {preload:?}"
                );
                let cache = env
                    .get("CUDA_DEVICE_MEMORY_SHARED_CACHE")
                    .cloned()
                    .expect("shared cache set");
                // Containers of one claim share one accounting file.
                if let Some(first) = &shared_cache {
                    assert_eq!(
                        first, &cache,
                        "{file}: containers of one claim must share the cache"
                    );
                }
                shared_cache = Some(cache);
            }
        }
        if *file == "nvlink-pair.yaml" {
            let env = container_env(&cluster, &ns.name, pod, "train");
            assert_eq!(
                env["CUDA_VISIBLE_DEVICES"].split(',').count(),
                2,
                "two GPUs"
            );
        }
    }
}

#[test]
fn an_oversized_claim_stays_pending_with_an_event() {
    let Some(cluster) = Cluster::connect() else {
        return;
    };
    let ns = cluster.namespace("vgpu-e2e-big");
    let v1 = examples_dir(&cluster).ends_with("v1");
    let request = if v1 {
        "      - name: gpu\n        exactly:\n          deviceClassName: gpu-slice.vgpu.hami.io\n          count: 64\n"
    } else {
        "      - name: gpu\n        deviceClassName: gpu-slice.vgpu.hami.io\n        count: 64\n"
    };
    let version = if v1 { "v1" } else { "v1beta1" };
    let manifest = format!(
        "apiVersion: resource.k8s.io/{version}\nkind: ResourceClaim\nmetadata:\n  name: too-big\nspec:\n  devices:\n    requests:\n{request}"
    );
    cluster
        .run_with_input(&["apply", "-n", &ns.name, "-f", "-"], &manifest)
        .expect("create claim");
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: too-big\nspec:\n  resourceClaims:\n  - name: gpu\n    resourceClaimName: too-big\n  containers:\n  - name: c\n    image: busybox\n    command: [sleep, '3600']\n    resources:\n      claims:\n      - name: gpu\n";
    cluster
        .run_with_input(&["apply", "-n", &ns.name, "-f", "-"], pod)
        .expect("create pod");
    let event = cluster.wait_for("an Event on the oversized claim", 2 * MINUTE, || {
        let events = cluster.get_json(&["events", "-n", &ns.name]).ok()?;
        events["items"]
            .as_array()?
            .iter()
            .find(|e| {
                e["involvedObject"]["name"] == "too-big"
                    && e["involvedObject"]["kind"] == "ResourceClaim"
            })
            .cloned()
    });
    assert_eq!(event["type"], "Warning", "{event}");
    let claim = cluster
        .get_json(&["resourceclaim", "too-big", "-n", &ns.name])
        .expect("claim");
    assert!(
        claim["status"]["allocation"].is_null(),
        "an impossible claim must stay unallocated"
    );
    assert_eq!(
        pod_phase(&cluster, &ns.name, "too-big").as_deref(),
        Some("Pending")
    );
}

#[test]
fn deleting_pods_frees_capacity_and_a_plugin_restart_leaves_pods_alone() {
    let Some(cluster) = Cluster::connect() else {
        return;
    };
    let ns = cluster.namespace("vgpu-e2e-life");
    let path = examples_dir(&cluster).join("slice-2gi-30pct.yaml");
    cluster
        .run(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()])
        .expect("apply");
    wait_running(&cluster, &ns.name, "slice-2gi-30pct");
    let before = cluster
        .get_json(&["pod", "slice-2gi-30pct", "-n", &ns.name])
        .expect("pod");
    let node = before["spec"]["nodeName"]
        .as_str()
        .expect("bound")
        .to_string();

    // Restart the plugin on that node: the running pod keeps running, untouched.
    cluster
        .run(&[
            "delete",
            "pod",
            "-n",
            "vgpu-system",
            "-l",
            "app.kubernetes.io/name=vgpu-kubelet-plugin",
            "--field-selector",
            &format!("spec.nodeName={node}"),
        ])
        .expect("delete plugin pod");
    cluster
        .run(&[
            "rollout",
            "status",
            "daemonset/vgpu-kubelet-plugin",
            "-n",
            "vgpu-system",
            "--timeout=180s",
        ])
        .expect("plugin back");
    let after = cluster
        .get_json(&["pod", "slice-2gi-30pct", "-n", &ns.name])
        .expect("pod");
    assert_eq!(after["status"]["phase"], "Running");
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(after["status"]["containerStatuses"][0]["restartCount"], 0);

    // Deleting the pod deletes its generated claim, which frees the slice.
    let claim = after["status"]["resourceClaimStatuses"][0]["resourceClaimName"]
        .as_str()
        .expect("generated claim")
        .to_string();
    cluster
        .run(&[
            "delete",
            "pod",
            "slice-2gi-30pct",
            "-n",
            &ns.name,
            "--wait=true",
            "--timeout=120s",
        ])
        .expect("delete pod");
    cluster.wait_for("the generated claim to go", 2 * MINUTE, || {
        cluster
            .run(&["get", "resourceclaim", &claim, "-n", &ns.name])
            .is_err()
            .then_some(())
    });
}
