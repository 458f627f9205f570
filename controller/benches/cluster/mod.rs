//! A cluster-scale workload as Kubernetes objects, shared by the engine bench and the
//! `controller simulate` input it writes: nodes of three NVLink layouts, ResourceSlices
//! rendered by the driver crate, the two device classes, and claims (each with the pod that
//! waits for it) mixing small slices, CEL selectors, multi-GPU claims with topology
//! requirements and exclusive GPUs.
//!
//! Nodes: the benchmark fleet of `test_support::fleet` (HGX H100, DGX-1 V100 cube-mesh, A100
//! in NVLink pairs).
//!
//! Claims, by index modulo 20: 12 plain slices (2-9 GiB, 0-9 % cores), 4 slices with one CEL
//! selector (20 %), 1 two-GPU Required, 1 four-GPU Required, 1 two-GPU Preferred, 1 exclusive
//! GPU.
#![allow(dead_code)]

use serde_json::{Value, json};
use test_support::fleet::{SELECTORS, gpus};
use vgpu_driver::class::controller_selector;
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{DEFAULT_DRIVER_NAME, NodeRef, PoolOptions};

fn claim(i: usize) -> Value {
    let (count, selectors, params) = match i % 20 {
        0..=11 => (
            1,
            vec![],
            json!({"memory": format!("{}Gi", 2 + i % 8), "cores": i % 10}),
        ),
        12..=15 => (
            1,
            vec![SELECTORS[(i / 20) % 4]],
            json!({"memory": format!("{}Gi", 4 + i % 5), "cores": 10}),
        ),
        16 => (
            2,
            vec![],
            json!({"memory": "8Gi", "cores": 20, "scheduling": {"topology": "Required"}}),
        ),
        17 => (
            4,
            vec![],
            json!({"memory": "6Gi", "cores": 20, "scheduling": {"topology": "Required"}}),
        ),
        18 => (
            2,
            vec![],
            json!({"memory": "8Gi", "cores": 20, "scheduling": {"topology": "Preferred"}}),
        ),
        _ => (1, vec![], json!({"exclusive": true})),
    };
    let mut parameters = json!({"apiVersion": API_VERSION, "kind": KIND});
    parameters
        .as_object_mut()
        .expect("an object")
        .extend(params.as_object().expect("an object").clone());
    let mut exactly = json!({"deviceClassName": "gpu-slice.vgpu.hami.io", "count": count});
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
        "metadata": {"name": format!("claim-{i:05}"), "namespace": namespace(i), "uid": format!("00000000-0000-4000-a000-{i:012}")},
        "spec": {"devices": {
            "requests": [{"name": "gpu", "exactly": exactly}],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DEFAULT_DRIVER_NAME, "parameters": parameters}}]
        }}
    })
}

fn namespace(i: usize) -> String {
    format!("team-{:02}", i % 25)
}

/// The pod waiting for claim `i`: an ordinary training or inference pod spec, a few KiB of
/// JSON, not a skeleton.
fn pod(i: usize) -> Value {
    let mut container = test_support::fleet::inference_container(
        i,
        300,
        json!({
            "requests": {"cpu": "2", "memory": "8Gi"},
            "limits": {"cpu": "4", "memory": "16Gi"},
            "claims": [{"name": "gpu"}]
        }),
    );
    container["volumeMounts"] =
        json!([{"name": "models", "mountPath": "/models", "readOnly": true}]);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("pod-{i:05}"), "namespace": namespace(i), "uid": format!("00000000-0000-4000-b000-{i:012}"),
            "labels": {"app": format!("app-{}", i % 300), "team": namespace(i), "tier": "gpu"},
            "annotations": {"example.com/owner": format!("owner-{}@example.com", i % 50), "example.com/run": format!("run-{i}")}
        },
        "spec": {
            "containers": [container],
            "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": true}}],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": format!("claim-{i:05}")}],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        }
    })
}

/// The whole workload: `nodes` nodes of 8 GPUs and `claims` pending claims with their pods.
pub fn objects(nodes: usize, claims: usize) -> Vec<Value> {
    let mut objects = Vec::new();
    for n in 0..nodes {
        let name = format!("gpu-node-{n:04}");
        let uid = format!("00000000-0000-4000-8000-{n:012}");
        objects.push(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": uid, "labels": {"kubernetes.io/hostname": name}},
            "status": {"allocatable": {"cpu": "192", "memory": "2Ti", "pods": "110"}}
        }));
        let devices = gpu_devices(&gpus(n)).expect("the generated GPUs render");
        let node = NodeRef {
            name: name.clone(),
            uid,
        };
        for (s, slice) in render_pool(&node, &devices, &PoolOptions::new(DEFAULT_DRIVER_NAME))
            .expect("the generated pool renders")
            .into_iter()
            .enumerate()
        {
            let mut s_obj = dra::convert::to_wire(&slice, dra::ApiVersion::V1);
            s_obj["metadata"]["name"] = json!(format!("{name}-{DEFAULT_DRIVER_NAME}-{s}"));
            objects.push(s_obj);
        }
    }
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
    for i in 0..claims {
        objects.push(claim(i));
        objects.push(pod(i));
    }
    objects
}

/// The workload as the YAML stream `controller simulate -f` reads.
pub fn yaml(nodes: usize, claims: usize) -> String {
    objects(nodes, claims)
        .iter()
        .map(|o| {
            format!(
                "---\n{}",
                serde_yaml_ng::to_string(o).expect("JSON values serialize as YAML")
            )
        })
        .collect()
}
