//! The product on a real cluster: the local one of hack/cluster (real kube-apiserver,
//! kube-scheduler, kube-controller-manager, kubelet, containerd with CDI), our plugin and
//! controller as host processes with their ServiceAccounts' tokens. Run with `hack/e2e.sh 1.34`
//! (or 1.32); the tests fail without the cluster.

use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use test_e2e::install::write_kubeconfig;
use test_e2e::install::{CONTROLLER, DRIVER, PLUGIN};
use test_e2e::local::repo;
use test_e2e::{Cluster, Installation, SharingMode, parse_env};

const MINUTE: Duration = Duration::from_secs(60);
/// The image the local cluster's runtime holds: busybox, glibc and the simulated CUDA driver.
const IMAGE: &str = "vgpu-dra/workload:e2e";
/// The memory of each fake GPU (deploy/helm/vgpu-dra/files/fake-gpus.yaml), in HAMi-core's format.
const FAKE_GPU_MEMORY: &str = "81559m";

fn v1(cluster: &Cluster) -> bool {
    cluster.local.release() != "1.32"
}

fn api_version(cluster: &Cluster) -> &'static str {
    if v1(cluster) {
        "resource.k8s.io/v1"
    } else {
        "resource.k8s.io/v1beta1"
    }
}

/// One device request named `gpu` of `class`, `body` being extra request fields (selectors,
/// count, allocationMode), in the shape of the cluster's API version.
fn request(cluster: &Cluster, class: &str, body: &str) -> String {
    let mut out = String::from("      - name: gpu\n");
    let indent = if v1(cluster) {
        out += "        exactly:\n";
        "          "
    } else {
        "        "
    };
    out += &format!("{indent}deviceClassName: {class}\n");
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        out += &format!("{indent}{line}\n");
    }
    out
}

/// A ResourceClaimTemplate `name` of one slice (`memory`, `cores`) of the slice class, with
/// optional extra request fields.
fn slice_template(cluster: &Cluster, name: &str, memory: &str, cores: u32, body: &str) -> String {
    format!(
        "apiVersion: {}\nkind: ResourceClaimTemplate\nmetadata:\n  name: {name}\nspec:\n  spec:\n    devices:\n      requests:\n{}      config:\n      - requests: [gpu]\n        opaque:\n          driver: {DRIVER}\n          parameters:\n            apiVersion: vgpu.hami.io/v1alpha1\n            kind: GpuSliceConfig\n            memory: {memory}\n            cores: {cores}\n",
        api_version(cluster),
        request(cluster, "gpu-slice.vgpu.hami.io", body)
    )
}

/// A pod `name` running `sleep` in the workload image with the claim of template `template`.
fn pod(name: &str, template: &str) -> String {
    pod_with(name, template, &PodOptions::default())
}

/// What some tests add to [`pod`]'s pod.
#[derive(Default)]
struct PodOptions<'a> {
    /// `metadata.labels`, as a YAML flow mapping (`{app: x}`).
    labels: Option<&'a str>,
    /// The container's CPU request (`1500m`).
    cpu: Option<&'a str>,
    /// Lines of `spec` before `containers` (two-space indented), e.g. an affinity.
    spec: &'a str,
}

fn pod_with(name: &str, template: &str, o: &PodOptions) -> String {
    let labels = o
        .labels
        .map(|l| format!("  labels: {l}\n"))
        .unwrap_or_default();
    let requests = o
        .cpu
        .map(|c| format!("      requests:\n        cpu: {c}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{labels}spec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  resourceClaims:\n  - name: gpu\n    resourceClaimTemplateName: {template}\n{}  containers:\n  - name: cuda\n    image: {IMAGE}\n    command: [sleep, '3600']\n    resources:\n{requests}      claims:\n      - name: gpu\n",
        o.spec
    )
}

fn selector_index(index: u32) -> String {
    format!(
        "selectors:\n- cel:\n    expression: device.attributes[\"{DRIVER}\"].index == {index}\n"
    )
}

fn get(cluster: &Cluster, kind: &str, ns: &str, name: &str) -> Option<Value> {
    cluster.get_json(&[kind, name, "-n", ns]).ok()
}

fn phase(cluster: &Cluster, ns: &str, pod: &str) -> Option<String> {
    get(cluster, "pod", ns, pod).and_then(|p| p["status"]["phase"].as_str().map(str::to_string))
}

fn wait_running(cluster: &Cluster, ns: &str, pod: &str) -> Value {
    cluster.wait_for(&format!("pod {ns}/{pod} running"), 3 * MINUTE, || {
        let p = get(cluster, "pod", ns, pod)?;
        if p["status"]["phase"] == "Failed" {
            panic!("pod {ns}/{pod} failed: {}", p["status"]);
        }
        (p["status"]["phase"] == "Running").then_some(p)
    })
}

/// The generated claim of `pod`'s claim `gpu`.
fn claim_of(cluster: &Cluster, ns: &str, pod: &str) -> Value {
    cluster.wait_for(&format!("the claim of {ns}/{pod}"), MINUTE, || {
        let p = get(cluster, "pod", ns, pod)?;
        let name = p["status"]["resourceClaimStatuses"][0]["resourceClaimName"].as_str()?;
        get(cluster, "resourceclaim", ns, name)
    })
}

fn allocated_devices(claim: &Value) -> Vec<String> {
    claim["status"]["allocation"]["devices"]["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|d| d["device"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `command` in the `cuda` container of `pod`.
fn exec(cluster: &Cluster, ns: &str, pod: &str, command: &[&str]) -> String {
    exec_in(cluster, ns, pod, "cuda", command)
}

fn exec_in(cluster: &Cluster, ns: &str, pod: &str, container: &str, command: &[&str]) -> String {
    let mut args = vec!["exec", "-n", ns, pod, "-c", container, "--"];
    args.extend_from_slice(command);
    cluster
        .run(&args)
        .unwrap_or_else(|e| panic!("exec in {ns}/{pod}/{container}: {e}"))
}

/// The CDI spec files the plugin has written for claim `uid`.
fn cdi_specs_of(cluster: &Cluster, uid: &str) -> Vec<PathBuf> {
    cdi_specs_in(&cluster.local.cdi_root(), uid)
}

/// The CDI spec files in `root` for claim `uid`.
fn cdi_specs_in(root: &std::path::Path, uid: &str) -> Vec<PathBuf> {
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.file_name().unwrap().to_string_lossy().contains(uid))
                .collect()
        })
        .unwrap_or_default()
}

fn delete_pod(cluster: &Cluster, ns: &str, pod: &str) {
    cluster
        .run(&[
            "delete",
            "pod",
            pod,
            "-n",
            ns,
            "--wait=true",
            "--timeout=120s",
        ])
        .expect("delete pod");
}

/// Deleting a pod: the controller-manager deletes its generated claim (deallocating it first),
/// and the kubelet unprepares it, which removes its CDI spec.
fn assert_released(cluster: &Cluster, ns: &str, claim: &Value) {
    assert_released_from(cluster, ns, claim, &[cluster.local.cdi_root()]);
}

/// [`assert_released`] for claims prepared on any node whose CDI directory is in `cdi_roots`.
fn assert_released_from(cluster: &Cluster, ns: &str, claim: &Value, cdi_roots: &[PathBuf]) {
    let name = claim["metadata"]["name"].as_str().unwrap();
    let uid = claim["metadata"]["uid"].as_str().unwrap();
    cluster.wait_for(
        &format!("claim {ns}/{name} to be deleted"),
        2 * MINUTE,
        || {
            get(cluster, "resourceclaim", ns, name)
                .is_none()
                .then_some(())
        },
    );
    cluster.wait_for(
        &format!("the CDI spec of claim {uid} to be removed"),
        MINUTE,
        || {
            cdi_roots
                .iter()
                .all(|root| cdi_specs_in(root, uid).is_empty())
                .then_some(())
        },
    );
}

#[test]
fn a1_the_kubelet_registers_the_plugin_and_its_gpus_are_published() {
    let install = Installation::ensure(SharingMode::Controller);
    let local = &install.cluster.local;
    let slices = install.slices();
    let devices: usize = slices
        .iter()
        .map(|s| s["spec"]["devices"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(devices, 8, "the 8 fake H100s: {slices:?}");
    for slice in &slices {
        assert_eq!(
            slice["spec"]["pool"]["name"],
            local.node(),
            "pool name = node name"
        );
        assert_eq!(slice["metadata"]["ownerReferences"][0]["kind"], "Node");
    }
    // The kubelet's side of the registration (its plugin watcher dialled our socket, called
    // GetInfo, validated the DRA versions and called NotifyRegistrationStatus).
    let kubelet = local.log("kubelet");
    assert!(
        kubelet.contains(DRIVER),
        "the kubelet's log never names {DRIVER}"
    );
    assert!(
        !local.log(PLUGIN).contains("REJECTED"),
        "the kubelet rejected the plugin:\n{}",
        local.log(PLUGIN)
    );
    // The verdict is exported for the VgpuKubeletPluginNotRegistered alert.
    assert_eq!(
        sample(&plugin_metrics(), "vgpu_kubelet_plugin_registered", &[]),
        Some(1.0),
        "the kubelet's registration in the plugin's metrics"
    );
    // Logs go to a file here, as to `kubectl logs` in a pod: plain text, no colour codes.
    for component in [PLUGIN, CONTROLLER] {
        let log = local.log(component);
        assert!(!log.is_empty(), "{component} logged nothing");
        assert!(
            !log.contains('\u{1b}'),
            "{component} writes terminal escape codes into a log file"
        );
    }
}

#[test]
fn a2_a_slice_pod_is_allocated_bound_prepared_and_runs_with_its_limits() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let ns = cluster.namespace("e2e-slice");
    cluster.apply(
        &ns.name,
        &slice_template(cluster, "slice-4gi-30", "4Gi", 30, ""),
    );
    cluster.apply(&ns.name, &pod("slice", "slice-4gi-30"));
    let running = wait_running(cluster, &ns.name, "slice");
    assert_eq!(running["spec"]["nodeName"], cluster.local.node());

    let claim = claim_of(cluster, &ns.name, "slice");
    let results = &claim["status"]["allocation"]["devices"]["results"];
    assert_eq!(results.as_array().map(Vec::len), Some(1), "{claim}");
    assert_eq!(results[0]["driver"], DRIVER);
    assert_eq!(results[0]["pool"], cluster.local.node());
    assert_eq!(
        claim["status"]["reservedFor"][0]["name"], "slice",
        "the scheduler reserved the claim for the pod"
    );

    // Inside the container: HAMi-core's limits, the preload and the library.
    let env = parse_env(&exec(cluster, &ns.name, "slice", &["env"]));
    assert_eq!(
        env.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
        Some("4096m")
    );
    assert_eq!(
        env.get("CUDA_DEVICE_SM_LIMIT").map(String::as_str),
        Some("30")
    );
    let preload = exec(cluster, &ns.name, "slice", &["cat", "/etc/ld.so.preload"]);
    let library = preload.trim();
    assert!(
        library.ends_with("libvgpu.so"),
        "/etc/ld.so.preload = {preload:?}"
    );
    exec(cluster, &ns.name, "slice", &["ls", "-l", library]);
    // The simulated driver under the preloaded library: CUDA sees a 4 GiB device.
    let meminfo = parse_env(&exec(
        cluster,
        &ns.name,
        "slice",
        &["probe", "direct", "meminfo"],
    ));
    assert_eq!(
        meminfo.get("meminfo_rc").map(String::as_str),
        Some("0"),
        "{meminfo:?}"
    );
    assert_eq!(
        meminfo.get("total_mib").map(String::as_str),
        Some("4096"),
        "{meminfo:?}"
    );

    let uid = claim["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        cdi_specs_of(cluster, uid).len(),
        1,
        "one CDI spec for the claim"
    );
    delete_pod(cluster, &ns.name, "slice");
    assert_released(cluster, &ns.name, &claim);
}

#[test]
fn a3_every_shipped_example_runs_with_its_limits_and_mounts() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let dir = repo()
        .join("deploy/examples")
        .join(if v1(cluster) { "v1" } else { "v1beta1" });
    // (file, pod, containers, expected memory limit of GPU 0, expected SM limit, GPUs)
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [&'a str],
        &'a str,
        Option<&'a str>,
        usize,
    );
    let cases: &[Case] = &[
        (
            "slice-2gi-30pct.yaml",
            "slice-2gi-30pct",
            &["cuda"],
            "2048m",
            Some("30"),
            1,
        ),
        (
            "shared-slice-two-containers.yaml",
            "shared-slice",
            &["server", "sidecar"],
            "8192m",
            Some("50"),
            1,
        ),
        (
            "nvlink-pair.yaml",
            "nvlink-pair",
            &["train"],
            "20480m",
            Some("50"),
            2,
        ),
        (
            "model-restricted.yaml",
            "h100-slice",
            &["cuda"],
            "10240m",
            Some("25"),
            1,
        ),
        // A whole GPU still gets its (full) memory limit; 100 % means no throttling.
        (
            "exclusive-gpu.yaml",
            "exclusive-gpu",
            &["cuda"],
            FAKE_GPU_MEMORY,
            None,
            1,
        ),
        (
            "whole-gpu.yaml",
            "whole-gpu",
            &["cuda"],
            FAKE_GPU_MEMORY,
            None,
            1,
        ),
    ];
    for (file, pod, containers, memory, sm, gpus) in cases {
        let ns = cluster.namespace("e2e-example");
        let path = dir.join(file);
        cluster
            .run(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()])
            .expect("apply example");
        wait_running(cluster, &ns.name, pod);
        let mut shared_cache = None;
        for container in *containers {
            let env = parse_env(&exec_in(cluster, &ns.name, pod, container, &["env"]));
            assert_eq!(
                env.get("CUDA_VISIBLE_DEVICES")
                    .map(|v| v.split(',').count()),
                Some(*gpus),
                "{file}/{container}: CUDA_VISIBLE_DEVICES"
            );
            assert_eq!(
                env.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
                Some(*memory),
                "{file}/{container}"
            );
            assert_eq!(
                env.get("CUDA_DEVICE_SM_LIMIT")
                    .map(String::as_str)
                    .filter(|v| *v != "0" && *v != "100"),
                *sm,
                "{file}/{container}"
            );
            let preload = exec_in(
                cluster,
                &ns.name,
                pod,
                container,
                &["cat", "/etc/ld.so.preload"],
            );
            assert!(
                preload.contains("libvgpu.so"),
                "{file}/{container}: {preload:?}"
            );
            let cache = env
                .get("CUDA_DEVICE_MEMORY_SHARED_CACHE")
                .cloned()
                .expect("shared cache set");
            // Containers of one claim share one accounting file.
            if let Some(first) = &shared_cache {
                assert_eq!(
                    first, &cache,
                    "{file}: containers of one claim share the cache"
                );
            }
            shared_cache = Some(cache);
        }
    }
}

#[test]
fn a4_two_pods_share_one_gpu_and_a_whole_gpu_is_never_shared() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let ns = cluster.namespace("e2e-share");
    // Two slices pinned to GPU 3 share it.
    cluster.apply(
        &ns.name,
        &slice_template(cluster, "on-gpu3", "8Gi", 20, &selector_index(3)),
    );
    cluster.apply(&ns.name, &pod("first", "on-gpu3"));
    cluster.apply(&ns.name, &pod("second", "on-gpu3"));
    wait_running(cluster, &ns.name, "first");
    wait_running(cluster, &ns.name, "second");
    let first = allocated_devices(&claim_of(cluster, &ns.name, "first"));
    let second = allocated_devices(&claim_of(cluster, &ns.name, "second"));
    assert_eq!(first.len(), 1);
    assert_eq!(first, second, "both slices on GPU 3");

    // A whole GPU of the plain class, allocated by the kube-scheduler itself.
    let whole = format!(
        "apiVersion: {}\nkind: ResourceClaimTemplate\nmetadata:\n  name: whole-gpu5\nspec:\n  spec:\n    devices:\n      requests:\n{}",
        api_version(cluster),
        request(cluster, "gpu.vgpu.hami.io", &selector_index(5))
    );
    cluster.apply(&ns.name, &whole);
    cluster.apply(&ns.name, &pod("whole", "whole-gpu5"));
    wait_running(cluster, &ns.name, "whole");
    let whole_claim = claim_of(cluster, &ns.name, "whole");
    let whole_device = allocated_devices(&whole_claim);
    assert_eq!(whole_device.len(), 1);
    assert_ne!(whole_device, first);
    let env = parse_env(&exec(cluster, &ns.name, "whole", &["env"]));
    assert_eq!(
        env.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
        Some(FAKE_GPU_MEMORY),
        "a whole GPU has its whole memory"
    );

    // Our controller never puts a slice on the scheduler's whole GPU ...
    cluster.apply(
        &ns.name,
        &slice_template(cluster, "on-gpu5", "1Gi", 10, &selector_index(5)),
    );
    cluster.apply(&ns.name, &pod("intruder", "on-gpu5"));
    // ... and the scheduler never hands out a GPU our controller has sliced.
    let whole3 = format!(
        "apiVersion: {}\nkind: ResourceClaimTemplate\nmetadata:\n  name: whole-gpu3\nspec:\n  spec:\n    devices:\n      requests:\n{}",
        api_version(cluster),
        request(cluster, "gpu.vgpu.hami.io", &selector_index(3))
    );
    cluster.apply(&ns.name, &whole3);
    cluster.apply(&ns.name, &pod("greedy", "whole-gpu3"));
    let intruder = claim_of(cluster, &ns.name, "intruder");
    let name = intruder["metadata"]["name"].as_str().unwrap().to_string();
    cluster.wait_for(
        "a Warning Event on the slice claim for the taken GPU",
        2 * MINUTE,
        || {
            let events = cluster.get_json(&["events", "-n", &ns.name]).ok()?;
            events["items"]
                .as_array()?
                .iter()
                .find(|e| e["involvedObject"]["name"] == name.as_str() && e["type"] == "Warning")
                .cloned()
        },
    );
    cluster.wait_for(
        "the scheduler to find the whole-GPU pod unschedulable",
        2 * MINUTE,
        || {
            let p = get(cluster, "pod", &ns.name, "greedy")?;
            p["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
                .then_some(())
        },
    );
    for (pod, claim) in [
        ("intruder", &intruder),
        ("greedy", &claim_of(cluster, &ns.name, "greedy")),
    ] {
        let claim = get(
            cluster,
            "resourceclaim",
            &ns.name,
            claim["metadata"]["name"].as_str().unwrap(),
        )
        .expect("claim");
        assert!(claim["status"]["allocation"].is_null(), "{pod}: {claim}");
        assert_eq!(phase(cluster, &ns.name, pod).as_deref(), Some("Pending"));
    }
}

#[test]
fn a5_the_admission_policy_keeps_each_plugin_to_its_own_node() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let node = cluster.local.node().to_string();
    let slice_of = |name: &str, node: &str, pool: &str, driver: &str| {
        format!(
            "apiVersion: {}\nkind: ResourceSlice\nmetadata:\n  name: {name}\nspec:\n  driver: {driver}\n  nodeName: {node}\n  pool:\n    name: {pool}\n    generation: 1\n    resourceSliceCount: 1\n",
            api_version(cluster)
        )
    };
    // The plugin's own pool is named after its node.
    let slice = |name: &str, node: &str| slice_of(name, node, node, DRIVER);
    let plugin = cluster.as_user(install.plugin_kubeconfig.clone());
    // Its own node: allowed (the plugin's RBAC and the policy agree).
    plugin
        .run_with_input(&["create", "-f", "-"], &slice("e2e-own-node", &node))
        .expect("the plugin may write its own node's slices");
    // The running plugin may already have removed it (it owns every slice of its driver on its
    // node); either way the plugin's credentials may delete it.
    plugin
        .run(&[
            "delete",
            "resourceslice",
            "e2e-own-node",
            "--ignore-not-found",
        ])
        .expect("and delete them");
    // Another node's: refused by the policy, with its message.
    let err = plugin
        .run_with_input(
            &["create", "-f", "-"],
            &slice("e2e-other-node", "some-other-node"),
        )
        .expect_err("a plugin must not write another node's slices");
    assert!(
        err.contains("vgpu-resourceslices-own-node")
            && err.contains(&format!("runs on node '{node}'"))
            && err.contains("some-other-node"),
        "{err}"
    );
    // Its own node, but another pool or another driver: refused, naming the field.
    let err = plugin
        .run_with_input(
            &["create", "-f", "-"],
            &slice_of("e2e-other-pool", &node, "some-pool", DRIVER),
        )
        .expect_err("a plugin must not write a pool not named after its node");
    assert!(
        err.contains("spec.pool.name") && err.contains("some-pool"),
        "{err}"
    );
    let err = plugin
        .run_with_input(
            &["create", "-f", "-"],
            &slice_of("e2e-other-driver", &node, &node, "gpu.example.com"),
        )
        .expect_err("a plugin must not publish another driver's devices");
    assert!(
        err.contains("spec.driver") && err.contains("gpu.example.com"),
        "{err}"
    );
    // A token of the plugin's ServiceAccount that is bound to no node: refused too.
    let unbound = cluster.local.dir().join("vgpu/unbound.kubeconfig");
    write_kubeconfig(cluster, &unbound, &install.token(PLUGIN, &[]));
    let err = cluster
        .as_user(unbound)
        .run_with_input(&["create", "-f", "-"], &slice("e2e-unbound", &node))
        .expect_err("a token without a node must not write slices");
    assert!(err.contains("no node association"), "{err}");
}

#[test]
fn a6_plugin_controller_and_kubelet_killed_and_restarted_lose_nothing() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let local = &cluster.local;
    let ns = cluster.namespace("e2e-restart");
    cluster.apply(&ns.name, &slice_template(cluster, "slice", "2Gi", 10, ""));
    cluster.apply(&ns.name, &pod("steady", "slice"));
    let steady = wait_running(cluster, &ns.name, "steady");
    let untouched = |what: &str| {
        let now = get(cluster, "pod", &ns.name, "steady").expect("steady pod");
        assert_eq!(now["metadata"]["uid"], steady["metadata"]["uid"], "{what}");
        assert_eq!(now["status"]["phase"], "Running", "{what}");
        assert_eq!(
            now["status"]["containerStatuses"][0]["restartCount"], 0,
            "{what}"
        );
        let env = parse_env(&exec(cluster, &ns.name, "steady", &["env"]));
        assert_eq!(env["CUDA_DEVICE_MEMORY_LIMIT_0"], "2048m", "{what}");
    };

    // The plugin dies: a pod created meanwhile waits for it, then runs; nothing else moves.
    local.kill(PLUGIN);
    cluster.apply(&ns.name, &pod("during-plugin-outage", "slice"));
    cluster.wait_for(
        "the controller to allocate while the plugin is down",
        MINUTE,
        || {
            let claim = claim_of(cluster, &ns.name, "during-plugin-outage");
            (!claim["status"]["allocation"].is_null()).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(
        phase(cluster, &ns.name, "during-plugin-outage").as_deref(),
        Some("Running"),
        "nobody can prepare the claim while the plugin is down"
    );
    install.start_plugin();
    wait_running(cluster, &ns.name, "during-plugin-outage");
    untouched("after the plugin's restart");

    // The controller dies: a claim created meanwhile stays unallocated, then is allocated.
    local.kill(CONTROLLER);
    cluster.apply(&ns.name, &pod("during-controller-outage", "slice"));
    std::thread::sleep(Duration::from_secs(5));
    let waiting = claim_of(cluster, &ns.name, "during-controller-outage");
    assert!(waiting["status"]["allocation"].is_null(), "{waiting}");
    local.start(CONTROLLER);
    wait_running(cluster, &ns.name, "during-controller-outage");

    // The kubelet dies: containers keep running; the restarted kubelet registers the plugin
    // again, leaves the running pods alone, and prepares and unprepares as before.
    let registrations = install.registrations(PLUGIN);
    local.kill("kubelet");
    let container = steady["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .expect("containerd container id")
        .to_string();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        local.container_running(&container),
        "the pod's container must outlive the kubelet"
    );
    local.start("kubelet");
    cluster.wait_for(
        "the restarted kubelet to register the plugin again",
        2 * MINUTE,
        || (install.registrations(PLUGIN) > registrations).then_some(()),
    );
    cluster.apply(&ns.name, &pod("after-kubelet-restart", "slice"));
    wait_running(cluster, &ns.name, "after-kubelet-restart");
    untouched("after the kubelet's restart");

    // Every claim was prepared exactly once and is released exactly once.
    for pod in [
        "steady",
        "during-plugin-outage",
        "during-controller-outage",
        "after-kubelet-restart",
    ] {
        let claim = claim_of(cluster, &ns.name, pod);
        let uid = claim["metadata"]["uid"].as_str().unwrap();
        assert_eq!(cdi_specs_of(cluster, uid).len(), 1, "{pod}: one CDI spec");
        delete_pod(cluster, &ns.name, pod);
        assert_released(cluster, &ns.name, &claim);
    }
}

#[test]
fn a7_native_mode_the_scheduler_allocates_shares_and_the_plugin_prepares_them() {
    let install = Installation::ensure(SharingMode::Native);
    let cluster = &install.cluster;
    let ns = cluster.namespace("e2e-native");
    if !v1(cluster) {
        // 1.32 has no consumable capacity: the plugin falls back to the controller mode and
        // says so on its Node.
        let node = cluster.local.node().to_string();
        let event = cluster.wait_for(
            "a Warning Event on the Node about the fallback",
            MINUTE,
            || {
                let events = cluster.get_json(&["events", "-A"]).ok()?;
                events["items"]
                    .as_array()?
                    .iter()
                    .find(|e| {
                        e["involvedObject"]["kind"] == "Node"
                            && e["involvedObject"]["name"] == node.as_str()
                            && e["type"] == "Warning"
                            && e["reason"] == "NativeSharingUnavailable"
                    })
                    .cloned()
            },
        );
        assert!(
            event["message"]
                .as_str()
                .unwrap_or_default()
                .contains("controller"),
            "{event}"
        );
        return;
    }
    let example = repo().join("deploy/examples/native/share-2gi-30pct.yaml");
    cluster
        .run(&["apply", "-n", &ns.name, "-f", example.to_str().unwrap()])
        .expect("apply the native example");
    wait_running(cluster, &ns.name, "share-2gi-30pct");
    let claim = claim_of(cluster, &ns.name, "share-2gi-30pct");
    let result = &claim["status"]["allocation"]["devices"]["results"][0];
    assert_eq!(result["driver"], DRIVER, "{claim}");
    assert!(
        !result["consumedCapacity"].is_null(),
        "the scheduler allocated a share (consumedCapacity): {claim}"
    );
    let env = parse_env(&exec(cluster, &ns.name, "share-2gi-30pct", &["env"]));
    assert_eq!(
        env.get("CUDA_DEVICE_MEMORY_LIMIT_0").map(String::as_str),
        Some("2048m")
    );
    assert_eq!(
        env.get("CUDA_DEVICE_SM_LIMIT").map(String::as_str),
        Some("30")
    );
    delete_pod(cluster, &ns.name, "share-2gi-30pct");
    assert_released(cluster, &ns.name, &claim);
    drop(ns);
    // Back to the controller mode for whatever runs next.
    Installation::ensure(SharingMode::Controller);
}

#[test]
fn a0_the_cluster_is_the_real_one_of_the_pinned_release() {
    let cluster = Cluster::connect();
    let version: Value = serde_json::from_str(
        &cluster
            .run(&["get", "--raw", "/version"])
            .expect("/version"),
    )
    .expect("/version is JSON");
    let minor = version["minor"].as_str().unwrap_or_default();
    assert_eq!(format!("1.{minor}"), cluster.local.release(), "{version}");
    let served = cluster.run(&["api-versions"]).expect("api-versions");
    let expected = api_version(&cluster);
    assert!(
        served.lines().any(|l| l == expected),
        "{expected} not served:\n{served}"
    );
}

/// The nodes the controller allocated claim `ns/name` on, in order, from its log.
fn allocations_logged(cluster: &Cluster, ns: &str, claim: &str) -> Vec<String> {
    let needle = format!("claim={ns}/{claim} node=");
    cluster
        .local
        .log(CONTROLLER)
        .lines()
        .filter(|l| l.contains("allocated") && !l.contains("deallocated"))
        .filter_map(|l| {
            let rest = &l[l.find(&needle)? + needle.len()..];
            Some(rest.split_whitespace().next()?.to_string())
        })
        .collect()
}

#[test]
fn a8_a_pod_that_does_not_fit_where_its_claim_was_placed_runs_on_the_other_node() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let second = install.second_gpu_node();
    let ns = cluster.namespace("e2e-postfilter");
    cluster.apply(&ns.name, &slice_template(cluster, "slice", "2Gi", 10, ""));
    // An anchor takes most of the CPU of the node our controller puts it on; binpacking
    // prefers that node for the next slices.
    let anchor = pod_with(
        "anchor",
        "slice",
        &PodOptions {
            labels: Some("{app: anchor}"),
            cpu: Some("1500m"),
            ..Default::default()
        },
    );
    cluster.apply(&ns.name, &anchor);
    let anchor = wait_running(cluster, &ns.name, "anchor");
    let crowded = anchor["spec"]["nodeName"].as_str().unwrap().to_string();
    let other = if crowded == second.node {
        cluster.local.node().to_string()
    } else {
        second.node.clone()
    };

    // A constraint only the scheduler checks (inter-pod anti-affinity): the controller puts the
    // slice on the crowded node, the scheduler cannot bind the pod there and its PostFilter
    // clears the allocation, and the controller places it again on the other node, once.
    let spread = pod_with(
        "spread",
        "slice",
        &PodOptions {
            spec: "  affinity:\n    podAntiAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector:\n          matchLabels: {app: anchor}\n        topologyKey: kubernetes.io/hostname\n",
            ..Default::default()
        },
    );
    cluster.apply(&ns.name, &spread);
    let spread = wait_running(cluster, &ns.name, "spread");
    assert_eq!(spread["spec"]["nodeName"], other.as_str());
    let claim = claim_of(cluster, &ns.name, "spread");
    let name = claim["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        claim["status"]["allocation"]["devices"]["results"][0]["pool"],
        other.as_str()
    );
    assert_eq!(
        allocations_logged(cluster, &ns.name, name),
        vec![crowded.clone(), other.clone()],
        "placed on the crowded node, cleared by the scheduler, placed once on the other"
    );

    // A CPU request that does not fit the crowded node: the controller counts the pods'
    // requests against the node's allocatable, so it goes to the other node at once.
    let hungry = pod_with(
        "hungry",
        "slice",
        &PodOptions {
            cpu: Some("1000m"),
            ..Default::default()
        },
    );
    cluster.apply(&ns.name, &hungry);
    let hungry = wait_running(cluster, &ns.name, "hungry");
    assert_eq!(hungry["spec"]["nodeName"], other.as_str());
    let claim = claim_of(cluster, &ns.name, "hungry");
    let name = claim["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        allocations_logged(cluster, &ns.name, name),
        vec![other.clone()]
    );

    // Both were prepared there by that node's kubelet and plugin, and are released.
    let cdi_root = if other == second.node {
        cluster.local.cdi_root_b()
    } else {
        cluster.local.cdi_root()
    };
    for pod in ["spread", "hungry", "anchor"] {
        let claim = claim_of(cluster, &ns.name, pod);
        let uid = claim["metadata"]["uid"].as_str().unwrap();
        if pod != "anchor" {
            assert_eq!(
                cdi_specs_in(&cdi_root, uid).len(),
                1,
                "{pod}: CDI spec on {other}"
            );
        }
        delete_pod(cluster, &ns.name, pod);
        assert_released_from(
            cluster,
            &ns.name,
            &claim,
            &[cluster.local.cdi_root(), cluster.local.cdi_root_b()],
        );
    }
}

#[test]
fn a9_an_oversized_claim_stays_pending_with_an_event() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let ns = cluster.namespace("e2e-too-big");
    // Three claims that cannot be placed, for three reasons told apart: more GPUs than a node
    // has, a selector no GPU matches, more memory than any GPU has free.
    let cases = [
        (
            "too-big",
            slice_template(cluster, "too-big", "1Gi", 10, "count: 64\n"),
            "NoMatchingGpu: request gpu wants 64 GPUs matching device class gpu-slice.vgpu.hami.io",
        ),
        (
            "no-such-gpu",
            slice_template(
                cluster,
                "no-such-gpu",
                "1Gi",
                10,
                &format!(
                    "selectors:\n- cel:\n    expression: device.attributes[\"{DRIVER}\"].productName == \"NVIDIA B200\"\n"
                ),
            ),
            "NoMatchingGpu: request gpu: no GPU matches device class gpu-slice.vgpu.hami.io and the request's selectors",
        ),
        (
            "too-much-memory",
            slice_template(cluster, "too-much-memory", "1000Gi", 10, ""),
            "InsufficientCapacity: request gpu needs 1 GPU with 1000Gi and 10% cores free",
        ),
    ];
    for (name, template, _) in &cases {
        cluster.apply(&ns.name, template);
        cluster.apply(&ns.name, &pod(name, name));
    }
    for (name, _, why) in &cases {
        let claim = claim_of(cluster, &ns.name, name);
        let claim_name = claim["metadata"]["name"].as_str().unwrap().to_string();
        // core/v1's view of the controller's events.k8s.io Events: what `kubectl describe`
        // lists under the object.
        let warning_on = |kind: &str, object: &str| {
            let events = cluster.get_json(&["events", "-n", &ns.name]).ok()?;
            events["items"]
                .as_array()?
                .iter()
                .find(|e| {
                    e["involvedObject"]["name"] == object
                        && e["involvedObject"]["kind"] == kind
                        && e["reason"] == "FailedAllocation"
                })
                .cloned()
        };
        let event = cluster.wait_for(
            &format!("a FailedAllocation Event on the claim of {name}"),
            2 * MINUTE,
            || warning_on("ResourceClaim", &claim_name),
        );
        assert_eq!(event["type"], "Warning", "{event}");
        let event = cluster.wait_for(
            &format!("a FailedAllocation Event on pod {name}"),
            2 * MINUTE,
            || warning_on("Pod", name),
        );
        assert_eq!(event["type"], "Warning", "{event}");
        let message = event["message"].as_str().unwrap_or_default();
        assert!(message.contains(why), "{name}: {why:?} not in {message:?}");
        // Where a user looks first.
        let described = cluster
            .run(&["describe", "pod", name, "-n", &ns.name])
            .unwrap();
        assert!(
            described.contains("FailedAllocation")
                && described.contains(why.split(':').next().unwrap()),
            "{described}"
        );
        let claim = get(cluster, "resourceclaim", &ns.name, &claim_name).expect("claim");
        assert!(
            claim["status"]["allocation"].is_null(),
            "an impossible claim must stay unallocated: {claim}"
        );
        assert_eq!(phase(cluster, &ns.name, name).as_deref(), Some("Pending"));
    }
}

/// Our wire conversion against the reference: the real API server keeps one object and serves
/// it in every enabled version (1.34 here serves resource.k8s.io v1 and v1beta1). For a claim
/// with every request shape, a DeviceClass and the slices our plugin published, what the
/// server gives in v1beta1 is what `dra::convert` makes of its v1, field for field, and both
/// read back as the same v1 object.
#[test]
fn a10_the_wire_conversion_is_the_api_servers_own() {
    use dra::ApiVersion;
    use dra::convert::{convert_value, from_wire};
    use k8s_openapi::api::resource::v1;

    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let served = cluster.run(&["api-versions"]).unwrap();
    let serves = |v: &str| served.lines().any(|l| l == v);
    if !v1(cluster) {
        // 1.32 serves v1beta1 alone: no second version to hold the conversion against there
        // (every other test runs the converting client on it).
        assert!(serves("resource.k8s.io/v1beta1") && !serves("resource.k8s.io/v1"));
        return;
    }
    assert!(
        serves("resource.k8s.io/v1beta1") && serves("resource.k8s.io/v1"),
        "{served}"
    );
    let ns = cluster.namespace("e2e-convert");
    let class = format!("e2e-convert-{}", std::process::id());
    cluster.apply(
        &ns.name,
        &format!(
            "apiVersion: resource.k8s.io/v1\nkind: DeviceClass\nmetadata:\n  name: {class}\nspec:\n  selectors:\n  - cel:\n      expression: device.driver == '{DRIVER}'\n  config:\n  - opaque:\n      driver: {DRIVER}\n      parameters: {{apiVersion: vgpu.hami.io/v1alpha1, kind: GpuSliceConfig, memory: 1Gi}}\n"
        ),
    );
    cluster.apply(
        &ns.name,
        &format!(
            "apiVersion: resource.k8s.io/v1\nkind: ResourceClaim\nmetadata:\n  name: every-shape\nspec:\n  devices:\n    requests:\n    - name: exact\n      exactly:\n        deviceClassName: {class}\n        allocationMode: ExactCount\n        count: 2\n        selectors:\n        - cel:\n            expression: device.attributes['{DRIVER}'].index >= 0\n    - name: any\n      firstAvailable:\n      - name: big\n        deviceClassName: {class}\n        count: 2\n      - name: small\n        deviceClassName: {class}\n    - name: all\n      exactly:\n        deviceClassName: {class}\n        allocationMode: All\n        adminAccess: false\n    constraints:\n    - requests: [exact]\n      matchAttribute: {DRIVER}/productName\n    config:\n    - requests: [exact]\n      opaque:\n        driver: {DRIVER}\n        parameters: {{apiVersion: vgpu.hami.io/v1alpha1, kind: GpuSliceConfig, memory: 2Gi, cores: 20}}\n"
        ),
    );
    let both = |resource: &str, name: &str, namespaced: bool| -> (Value, Value) {
        let get = |version: &str| {
            let mut args = vec![
                format!("{resource}.{version}.resource.k8s.io"),
                name.to_string(),
            ];
            if namespaced {
                args.extend(["-n".to_string(), ns.name.clone()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.get_json(&args).unwrap()
        };
        (get("v1"), get("v1beta1"))
    };
    fn same<K: dra::DraObject + PartialEq>(what: &str, v1: &Value, beta: &Value) {
        // What we send for a v1 object is what the server holds for it in v1beta1.
        let ours = convert_value(v1.clone(), ApiVersion::V1beta1).unwrap();
        for part in ["spec", "status"] {
            assert_eq!(
                ours[part], beta[part],
                "{what}: {part} differs from the server's v1beta1"
            );
        }
        // And what we read in v1beta1 is the server's v1.
        assert_eq!(
            from_wire::<K>(beta.clone()).unwrap(),
            from_wire::<K>(v1.clone()).unwrap(),
            "{what}: v1beta1 read as v1"
        );
    }
    let (v1_claim, beta_claim) = both("resourceclaims", "every-shape", true);
    assert!(beta_claim["spec"]["devices"]["requests"][0]["deviceClassName"].is_string());
    same::<v1::ResourceClaim>("ResourceClaim", &v1_claim, &beta_claim);
    let (v1_class, beta_class) = both("deviceclasses", &class, false);
    same::<v1::DeviceClass>("DeviceClass", &v1_class, &beta_class);
    // An allocated, reserved claim: its status too (written by our controller through the
    // converting client, read back by the kubelet plugin).
    cluster.apply(&ns.name, &slice_template(cluster, "slice", "1Gi", 10, ""));
    cluster.apply(&ns.name, &pod("converted", "slice"));
    wait_running(cluster, &ns.name, "converted");
    let claim = claim_of(cluster, &ns.name, "converted");
    let name = claim["metadata"]["name"].as_str().unwrap();
    let (v1_claim, beta_claim) = both("resourceclaims", name, true);
    assert!(!allocated_devices(&beta_claim).is_empty(), "{beta_claim}");
    assert!(
        beta_claim["status"]["reservedFor"].is_array(),
        "{beta_claim}"
    );
    same::<v1::ResourceClaim>("allocated ResourceClaim", &v1_claim, &beta_claim);
    let slices = install.slices();
    assert!(!slices.is_empty());
    for slice in &slices {
        let name = slice["metadata"]["name"].as_str().unwrap();
        let (v1_slice, beta_slice) = both("resourceslices", name, false);
        assert!(beta_slice["spec"]["devices"][0]["basic"].is_object());
        same::<v1::ResourceSlice>(name, &v1_slice, &beta_slice);
    }
    let _ = cluster.run(&["delete", "deviceclass", &class]);
}

/// The kubelet plugin's Prometheus exposition on the cluster's node (its launcher's
/// METRICS_ADDR), by a plain HTTP/1.0 GET: the test needs no HTTP client for one page.
fn plugin_metrics() -> String {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect("127.0.0.1:19402").expect("connect to the plugin's metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read /metrics");
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "{response}"
    );
    response
}

/// The value of the sample of `metric` whose labels include every `name="value"` of `labels`.
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter_map(|l| {
            // `name{labels} value`, or `name value` for a metric without labels.
            let rest = l.strip_prefix(metric)?;
            rest.strip_prefix('{')
                .or_else(|| rest.starts_with(' ').then_some(rest))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a11_a_slices_memory_use_shows_in_the_plugins_metrics_with_its_claims_labels() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let ns = cluster.namespace("e2e-usage");
    cluster.apply(
        &ns.name,
        &slice_template(cluster, "slice-4gi-30", "4Gi", 30, ""),
    );
    // The container's main process allocates 1 GiB under the library and holds it.
    let manifest = pod("usage", "slice-4gi-30").replace(
        "command: [sleep, '3600']",
        "command: [probe, direct, hold, '1024']",
    );
    assert!(manifest.contains("hold"), "{manifest}");
    cluster.apply(&ns.name, &manifest);
    wait_running(cluster, &ns.name, "usage");
    let claim = claim_of(cluster, &ns.name, "usage");
    let name = claim["metadata"]["name"].as_str().unwrap().to_string();
    let device = allocated_devices(&claim)[0].clone();
    let labels = [
        ("namespace", ns.name.as_str()),
        ("claim", name.as_str()),
        ("request", "gpu"),
        ("device", device.as_str()),
    ];
    let gib = f64::from(1u32 << 30);
    let text = cluster.wait_for("the held GiB in the plugin's metrics", MINUTE, || {
        let text = plugin_metrics();
        (sample(
            &text,
            "vgpu_kubelet_plugin_claim_memory_used_bytes",
            &labels,
        ) == Some(gib))
        .then_some(text)
    });
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_claim_memory_limit_bytes",
            &labels
        ),
        Some(4.0 * gib),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_claim_compute_limit_ratio",
            &labels
        ),
        Some(0.3),
        "{text}"
    );
    let mut pod_labels = labels.to_vec();
    pod_labels.push(("pod", "usage"));
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_pod_memory_used_bytes",
            &pod_labels
        ),
        Some(gib),
        "the processes' host name is the pod's: {text}"
    );
    assert_eq!(
        sample(&text, "vgpu_kubelet_plugin_claim_processes", &labels[..3]),
        Some(1.0),
        "{text}"
    );

    // A second process of the claim asks for more than is left: refused at the cap, counted.
    let tried = parse_env(&exec(
        cluster,
        &ns.name,
        "usage",
        &["probe", "direct", "try", "3584"],
    ));
    assert_eq!(tried.get("rc").map(String::as_str), Some("2"), "{tried:?}");
    let text = plugin_metrics();
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_claim_memory_refused_allocations_total",
            &labels
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_claim_memory_peak_bytes",
            &labels
        ),
        Some(gib),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_claim_memory_used_bytes",
            &labels
        ),
        Some(gib),
        "the refused process took nothing: {text}"
    );

    delete_pod(cluster, &ns.name, "usage");
    assert_released(cluster, &ns.name, &claim);
    let text = plugin_metrics();
    assert_eq!(
        sample(
            &text,
            "vgpu_kubelet_plugin_claim_memory_limit_bytes",
            &labels
        ),
        None,
        "an unprepared claim leaves the metrics: {text}"
    );
}

/// A JSON patch of pod `ns`/`name` as the user of `kubeconfig`, sent as is (no read first);
/// the API server's refusal on failure.
fn json_patch_as(
    kubeconfig: &std::path::Path,
    ns: &str,
    name: &str,
    patch: &str,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let request = http::Request::patch(format!("/api/v1/namespaces/{ns}/pods/{name}"))
            .header("Content-Type", "application/json-patch+json")
            .body(patch.as_bytes().to_vec())
            .unwrap();
        client
            .request_text(request)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// The controller's scheduling gate: a pod that carries it is not tried by the kube-scheduler
/// until the controller has allocated its claim and lifted the gate, so it is scheduled at the
/// first attempt, with no FailedScheduling and no back-off. The shipped admission policy lets
/// the controller's service account remove that gate and nothing else.
#[test]
fn a12_a_gated_pod_is_scheduled_once_its_claim_is_allocated_without_a_failed_attempt() {
    let install = Installation::ensure(SharingMode::Controller);
    let cluster = &install.cluster;
    let ns = cluster.namespace("e2e-gate");
    let gate = format!("{DRIVER}/allocation");
    cluster.apply(&ns.name, &slice_template(cluster, "slice", "2Gi", 10, ""));
    let gated = |name: &str, gates: &[&str]| {
        let spec: String = gates.iter().map(|g| format!("  - name: {g}\n")).collect();
        pod_with(
            name,
            "slice",
            &PodOptions {
                labels: Some("{app: gated}"),
                spec: &format!("  schedulingGates:\n{spec}"),
                ..Default::default()
            },
        )
    };
    cluster.apply(&ns.name, &gated("gated", &[&gate]));
    let running = wait_running(cluster, &ns.name, "gated");
    assert!(
        running["spec"]["schedulingGates"].is_null(),
        "the gate is gone: {}",
        running["spec"]
    );
    let claim = claim_of(cluster, &ns.name, "gated");
    assert_eq!(allocated_devices(&claim).len(), 1, "{claim}");
    let failed: Vec<Value> = cluster.get_json(&["events", "-n", &ns.name]).unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["involvedObject"]["name"] == "gated" && e["reason"] == "FailedScheduling")
        .cloned()
        .collect();
    assert!(
        failed.is_empty(),
        "tried before its claim was allocated: {failed:?}"
    );
    let scheduled = running["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap();
    assert_eq!(scheduled["status"], "True", "{scheduled}");

    // Someone else's gate stays: the controller lifts only its own, once the claim is allocated.
    cluster.apply(&ns.name, &gated("held", &["example.com/hold", &gate]));
    let held = cluster.wait_for("held loses the controller's gate", MINUTE, || {
        let p = get(cluster, "pod", &ns.name, "held")?;
        (p["spec"]["schedulingGates"] == serde_json::json!([{"name": "example.com/hold"}]))
            .then_some(p)
    });
    assert!(held["spec"]["nodeName"].is_null(), "still gated: {held}");
    let claim = claim_of(cluster, &ns.name, "held");
    assert_eq!(allocated_devices(&claim).len(), 1, "{claim}");

    // As the controller's service account (its RBAC may patch pods, not read them one by
    // one, so kubectl's patch, which reads first, cannot be used): on a pod that keeps our
    // gate (its claim can never fit), removing that gate passes the policy, and nothing else
    // does, alone or alongside it.
    cluster.apply(
        &ns.name,
        &slice_template(cluster, "too-much-memory", "1000Gi", 10, ""),
    );
    cluster.apply(
        &ns.name,
        &pod_with(
            "bait",
            "too-much-memory",
            &PodOptions {
                labels: Some("{app: gated}"),
                spec: &format!(
                    "  schedulingGates:\n  - name: example.com/hold\n  - name: {gate}\n"
                ),
                ..Default::default()
            },
        ),
    );
    let ours = format!(
        r#"{{"op":"test","path":"/spec/schedulingGates/1/name","value":"{gate}"}},{{"op":"remove","path":"/spec/schedulingGates/1"}}"#
    );
    for (patch, refusal) in [
        (
            r#"[{"op":"remove","path":"/spec/schedulingGates/0"}]"#.to_string(),
            "may only remove its scheduling gate",
        ),
        (
            format!(
                r#"[{ours},{{"op":"replace","path":"/spec/containers/0/image","value":"evil:latest"}}]"#
            ),
            "may not change a pod's containers",
        ),
        (
            format!(r#"[{ours},{{"op":"add","path":"/metadata/labels/app","value":"other"}}]"#),
            "may not change a pod's labels",
        ),
    ] {
        let err = json_patch_as(&install.controller_kubeconfig, &ns.name, "bait", &patch)
            .expect_err(&patch);
        assert!(
            err.contains("vgpu-controller-lifts-gates-only") && err.contains(refusal),
            "{patch}: {err}"
        );
    }
    json_patch_as(
        &install.controller_kubeconfig,
        &ns.name,
        "bait",
        &format!("[{ours}]"),
    )
    .expect("the controller may lift its own gate");
    let bait = get(cluster, "pod", &ns.name, "bait").unwrap();
    assert_eq!(
        bait["spec"]["schedulingGates"],
        serde_json::json!([{"name": "example.com/hold"}])
    );
    assert_eq!(bait["spec"]["containers"][0]["image"], IMAGE);
    // The admin lifts the other gate: the pod runs on its allocated claim.
    cluster
        .run(&[
            "patch",
            "pod",
            "held",
            "-n",
            &ns.name,
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/schedulingGates/0"}]"#,
        ])
        .unwrap();
    wait_running(cluster, &ns.name, "held");
}
