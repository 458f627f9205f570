//! The objects of one scenario: bench nodes (Node objects without a kubelet, kept alive by
//! their Leases), the ResourceSlices our plugin would publish for them, and claims with the
//! pods that wait for them. The three scenarios ask for the same GPUs in the same order; only
//! who allocates them and how much of each GPU a claim gets differ.

use serde_json::{Value, json};
use test_support::fleet::{SELECTORS, gpus};
use vgpu_driver::class::scheduling_gate;
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{DEFAULT_DRIVER_NAME, NodeRef, PoolOptions};

/// Marks the bench's nodes and pods with their scenario; pods select their scenario's nodes.
pub const SCENARIO_LABEL: &str = "bench.vgpu.hami.io/scenario";

/// Who allocates the claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Slices (class `gpu-slice`), allocated by our controller; the scheduler binds.
    Controller,
    /// As `Controller`, each pod created with the controller's scheduling gate, which the
    /// controller lifts once the pod's claim is allocated.
    Gated,
    /// Shares (class `gpu-share`, consumable capacity), allocated by the kube-scheduler.
    Native,
    /// Whole GPUs (class `gpu`), allocated by the kube-scheduler: the baseline.
    Whole,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Controller,
        Scenario::Gated,
        Scenario::Native,
        Scenario::Whole,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Controller => "controller",
            Scenario::Gated => "gated",
            Scenario::Native => "native",
            Scenario::Whole => "whole",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    /// What the scenario is, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Controller => "slices, our controller allocates (gpu-slice)",
            Scenario::Gated => {
                "slices, our controller allocates, pods gated until then (gpu-slice, scheduling gate)"
            }
            Scenario::Native => "shares, kube-scheduler allocates (gpu-share, consumable capacity)",
            Scenario::Whole => "whole GPUs, kube-scheduler allocates (gpu)",
        }
    }

    pub fn node_name(self, n: usize) -> String {
        format!("bench-{}-{n:03}", self.name())
    }
}

/// A bench node: room for every pod the bench puts on it, Ready, no kubelet behind it.
pub fn node(scenario: Scenario, n: usize) -> Value {
    let name = scenario.node_name(n);
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            SCENARIO_LABEL: scenario.name(),
        }},
    })
}

/// The status a kubelet would report; `now` is an RFC 3339 time.
pub fn node_status(now: &str) -> Value {
    let resources = json!({"cpu": "192", "memory": "2Ti", "pods": "250"});
    json!({"status": {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "a bench node: no kubelet, its Lease is renewed by the bench",
            "lastHeartbeatTime": now, "lastTransitionTime": now,
        }],
    }})
}

/// The node's Lease in kube-node-lease, which the node lifecycle controller reads as the
/// kubelet's heartbeat.
pub fn lease(node: &str, now_micro: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now_micro},
    })
}

/// The ResourceSlices of fleet node `n` as our plugin publishes them in the scenario's mode:
/// every GPU shareable by the scheduler (native) or not (controller mode, whole GPUs).
pub fn slices(scenario: Scenario, n: usize, node_uid: &str) -> Vec<Value> {
    let mut devices = gpu_devices(&gpus(n)).expect("the fleet's GPUs render");
    for d in &mut devices {
        d.allow_multiple_allocations = scenario == Scenario::Native;
    }
    let node = NodeRef {
        name: scenario.node_name(n),
        uid: node_uid.to_string(),
    };
    render_pool(&node, &devices, &PoolOptions::new(DEFAULT_DRIVER_NAME))
        .expect("the fleet's pool renders")
        .iter()
        .map(|s| dra::convert::to_wire(s, dra::ApiVersion::V1))
        .collect()
}

/// What pod `i` asks for, the same in every scenario: by `i` modulo 10, seven single GPUs
/// (2-9 GiB, 10-20 % cores), two single GPUs with a CEL selector from the fleet's four, one
/// pair of GPUs (8 GiB, 20 % each).
struct Ask {
    gpus: usize,
    memory_gib: usize,
    cores: usize,
    selector: Option<&'static str>,
}

fn ask(i: usize) -> Ask {
    match i % 10 {
        0..=6 => Ask {
            gpus: 1,
            memory_gib: 2 + i % 8,
            cores: 10 + 5 * (i % 3),
            selector: None,
        },
        7 | 8 => Ask {
            gpus: 1,
            memory_gib: 4,
            cores: 10,
            selector: Some(SELECTORS[(i / 10) % 4]),
        },
        _ => Ask {
            gpus: 2,
            memory_gib: 8,
            cores: 20,
            selector: None,
        },
    }
}

pub fn claim_name(i: usize) -> String {
    format!("claim-{i:04}")
}

pub fn pod_name(i: usize) -> String {
    format!("pod-{i:04}")
}

/// Claim `i` in the scenario's terms.
pub fn claim(scenario: Scenario, i: usize) -> Value {
    let ask = ask(i);
    let selectors: Vec<Value> = ask
        .selector
        .iter()
        .map(|s| json!({"cel": {"expression": s}}))
        .collect();
    let exactly = |class: &str, count: usize| {
        let mut e = json!({"deviceClassName": class, "count": count});
        if !selectors.is_empty() {
            e["selectors"] = Value::Array(selectors.clone());
        }
        e
    };
    let devices = match scenario {
        Scenario::Controller | Scenario::Gated => json!({
            "requests": [{"name": "gpu", "exactly": exactly("gpu-slice.vgpu.hami.io", ask.gpus)}],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DEFAULT_DRIVER_NAME, "parameters": {
                "apiVersion": API_VERSION, "kind": KIND,
                "memory": format!("{}Gi", ask.memory_gib), "cores": ask.cores,
            }}}],
        }),
        Scenario::Native => {
            // One request per GPU, kept on distinct GPUs, as deploy/examples/native does.
            let requests: Vec<Value> = (0..ask.gpus)
                .map(|g| {
                    let mut e = exactly("gpu-share.vgpu.hami.io", 1);
                    e.as_object_mut().expect("an object").remove("count");
                    e["capacity"] = json!({"requests": {
                        "memory": format!("{}Gi", ask.memory_gib),
                        "cores": ask.cores.to_string(),
                    }});
                    json!({"name": format!("gpu{g}"), "exactly": e})
                })
                .collect();
            let mut d = json!({"requests": requests});
            if ask.gpus > 1 {
                let names: Vec<String> = (0..ask.gpus).map(|g| format!("gpu{g}")).collect();
                d["constraints"] = json!([{
                    "requests": names,
                    "distinctAttribute": format!("{DEFAULT_DRIVER_NAME}/uuid"),
                }]);
            }
            d
        }
        Scenario::Whole => json!({
            "requests": [{"name": "gpu", "exactly": exactly("gpu.vgpu.hami.io", ask.gpus)}],
        }),
    };
    json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": claim_name(i)},
        "spec": {"devices": devices},
    })
}

/// Pod `i`: an ordinary inference pod spec (a few KiB), restricted to the scenario's nodes,
/// using claim `i`.
pub fn pod(scenario: Scenario, i: usize) -> Value {
    let container = test_support::fleet::inference_container(
        i,
        50,
        json!({"requests": {"cpu": "100m", "memory": "1Gi"}, "claims": [{"name": "gpu"}]}),
    );
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name(i),
            "labels": {"app": format!("app-{}", i % 50), SCENARIO_LABEL: scenario.name()},
            "annotations": {"example.com/owner": format!("owner-{}@example.com", i % 20)},
        },
        "spec": {
            "nodeSelector": {SCENARIO_LABEL: scenario.name()},
            "containers": [container],
            "resourceClaims": [{"name": "gpu", "resourceClaimName": claim_name(i)}],
            "terminationGracePeriodSeconds": 0,
            "schedulingGates": if scenario == Scenario::Gated {
                json!([{"name": scheduling_gate(DEFAULT_DRIVER_NAME)}])
            } else {
                json!([])
            },
        }
    })
}
