//! The embedded default: 4 nodes × 8 H100 80GB (NVSwitch: every GPU an NVLink peer of every
//! other, two NUMA nodes each) and a realistic mixed workload of 64 claims: inference slices,
//! notebooks, multi-GPU training with topology, exclusive GPUs, and a few that cannot fit.
//! `controller simulate --print-default` prints it so it can be edited and fed back with -f.

use serde_json::{Value, json};
use vgpu_driver::class::controller_selector;
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{DEFAULT_DRIVER_NAME, Inventory, NodeRef, PoolOptions};

const HGX: &str = include_str!("../../../driver/testdata/hgx-h100.yaml");
const NODES: usize = 4;

fn claim(name: &str, count: u32, selectors: &[&str], params: Value) -> Value {
    let mut parameters = json!({"apiVersion": API_VERSION, "kind": KIND});
    parameters
        .as_object_mut()
        .expect("object")
        .extend(params.as_object().expect("object").clone());
    let mut exactly = json!({"deviceClassName": "gpu-slice.vgpu.hami.io"});
    if count != 1 {
        exactly["count"] = json!(count);
    }
    if !selectors.is_empty() {
        exactly["selectors"] = Value::Array(
            selectors
                .iter()
                .map(|s| json!({"cel": {"expression": s}}))
                .collect(),
        );
    }
    json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"devices": {
            "requests": [{"name": "gpu", "exactly": exactly}],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DEFAULT_DRIVER_NAME, "parameters": parameters}}]
        }}
    })
}

/// The default cluster and workload as Kubernetes objects.
pub fn objects() -> Vec<Value> {
    let gpus = Inventory::from_yaml(HGX)
        .expect("the embedded inventory is valid")
        .gpus;
    let devices = gpu_devices(&gpus).expect("the embedded inventory renders");
    let mut objects = Vec::new();
    for n in 1..=NODES {
        let name = format!("gpu-node-{n}");
        objects.push(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("00000000-0000-0000-0000-00000000000{n}"),
                         "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": if n <= 2 { "zone-a" } else { "zone-b" }}},
            "status": {"allocatable": {"cpu": "192", "memory": "2Ti", "pods": "110"}}
        }));
        let node = NodeRef {
            name: name.clone(),
            uid: format!("00000000-0000-0000-0000-00000000000{n}"),
        };
        for (i, slice) in render_pool(&node, &devices, &PoolOptions::new(DEFAULT_DRIVER_NAME))
            .expect("renders")
            .into_iter()
            .enumerate()
        {
            let mut s = dra::convert::to_wire(&slice, dra::ApiVersion::V1);
            s["metadata"]["name"] = json!(format!("{name}-{DEFAULT_DRIVER_NAME}-{i}"));
            objects.push(s);
        }
    }
    objects.push(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": "gpu.vgpu.hami.io"},
        "spec": {"selectors": [{"cel": {"expression": format!("device.driver == \"{DEFAULT_DRIVER_NAME}\"")}}]}
    }));
    objects.push(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
        "metadata": {"name": "gpu-slice.vgpu.hami.io"},
        "spec": {
            "selectors": [
                {"cel": {"expression": format!("device.driver == \"{DEFAULT_DRIVER_NAME}\"")}},
                {"cel": {"expression": controller_selector(DEFAULT_DRIVER_NAME)}}
            ],
            "config": [{"opaque": {"driver": DEFAULT_DRIVER_NAME, "parameters": {"apiVersion": API_VERSION, "kind": KIND}}}]
        }
    }));
    // Inference services: 10-20 GiB, 10-30 % each.
    for i in 0..30u32 {
        let memory = format!("{}Gi", 10 + (i * 7) % 11);
        objects.push(claim(
            &format!("inference-{i:02}"),
            1,
            &[],
            json!({"memory": memory, "cores": 10 + (i * 3) % 21}),
        ));
    }
    // Notebooks: small slices, best-effort compute.
    for i in 0..12u32 {
        objects.push(claim(
            &format!("notebook-{i:02}"),
            1,
            &[],
            json!({"memory": "4Gi", "cores": 0}),
        ));
    }
    // Training jobs on NVLink peers.
    for (i, (gpus, topology)) in [
        (2, "Required"),
        (4, "Required"),
        (2, "Preferred"),
        (4, "Preferred"),
        (2, "Required"),
        (3, "Required"),
        (2, "Preferred"),
        (4, "Required"),
    ]
    .into_iter()
    .enumerate()
    {
        objects.push(claim(
            &format!("train-{i}"),
            gpus,
            &[],
            json!({"memory": "30Gi", "cores": 40, "scheduling": {"topology": topology}}),
        ));
    }
    // Exclusive GPUs, two of them restricted to the second NUMA node.
    for i in 0..6 {
        let selectors: &[&str] = if i < 2 {
            &["device.attributes[\"vgpu.hami.io\"].numaNode == 1"]
        } else {
            &[]
        };
        objects.push(claim(
            &format!("exclusive-{i}"),
            1,
            selectors,
            json!({"exclusive": true}),
        ));
    }
    // H100-only slices by CEL, spread over GPUs.
    for i in 0..4 {
        objects.push(claim(
            &format!("h100-only-{i}"),
            1,
            &["device.attributes[\"vgpu.hami.io\"].productName.startsWith(\"NVIDIA H100\") && device.capacity[\"vgpu.hami.io\"].memory.compareTo(quantity(\"79Gi\")) >= 0"],
            json!({"memoryPercentage": 25, "cores": 25, "scheduling": {"gpuPolicy": "Spread"}}),
        ));
    }
    // Claims that cannot be placed: bigger than any GPU, more NVLink peers than a node has,
    // an A100 on an H100 cluster, and a share of every GPU of a node.
    objects.push(claim(
        "too-big-memory",
        1,
        &[],
        json!({"memory": "100Gi", "cores": 10}),
    ));
    objects.push(claim(
        "too-many-peers",
        9,
        &[],
        json!({"memory": "10Gi", "cores": 10, "scheduling": {"topology": "Required"}}),
    ));
    objects.push(claim(
        "wrong-model",
        1,
        &["device.attributes[\"vgpu.hami.io\"].productName.startsWith(\"NVIDIA A100\")"],
        json!({"memory": "10Gi"}),
    ));
    objects.push(claim(
        "eight-big-slices",
        8,
        &[],
        json!({"memory": "70Gi", "cores": 60}),
    ));
    objects
}

/// The default as a YAML stream, the form `-f` reads.
pub fn yaml() -> String {
    objects()
        .iter()
        .map(|o| {
            format!(
                "---\n{}",
                serde_yaml_ng::to_string(o).expect("JSON values serialize as YAML")
            )
        })
        .collect()
}
