//! The allocation engine's behaviour: policies, topology, exclusivity, selectors, constraints,
//! pod constraints, state rebuilt from claims, and refusals that say why.

mod support;

use controller::engine::{NoRoom, Policies, Refusal, WaitReason};
use controller::model::{Alternative, ConstraintView, Count, RequestView};
use k8s_openapi::api::core::v1::{Taint, Toleration};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use support::*;
use vgpu_driver::config::{Policy, Topology};
use vgpu_driver::{ClaimAllocation, ConfigSource};

fn policies(node: Policy, gpu: Policy) -> Policies {
    Policies {
        node,
        gpu,
        topology: Topology::Preferred,
    }
}

fn none() -> BTreeSet<String> {
    BTreeSet::new()
}

fn devices(a: &ClaimAllocation) -> Vec<String> {
    a.results
        .iter()
        .map(|r| format!("{}/{}", r.pool, r.device))
        .collect()
}

#[test]
fn gpu_binpack_stacks_and_spread_spreads() {
    let inputs = cluster(&[("n1", hgx(4, 80))]);
    for (policy, want_same) in [(Policy::Binpack, true), (Policy::Spread, false)] {
        let mut e = engine(&inputs, policies(Policy::Binpack, policy));
        let a = e
            .allocate(
                &claim("a", 1, json!({"memory": "10Gi", "cores": 10})),
                None,
                &none(),
            )
            .unwrap();
        e.commit(&a);
        let b = e
            .allocate(
                &claim("b", 1, json!({"memory": "10Gi", "cores": 10})),
                None,
                &none(),
            )
            .unwrap();
        assert_eq!(
            devices(&a) == devices(&b),
            want_same,
            "{policy:?}: {:?} {:?}",
            devices(&a),
            devices(&b)
        );
    }
}

#[test]
fn node_binpack_prefers_used_nodes_and_spread_empty_ones() {
    let inputs = cluster(&[("n1", hgx(2, 80)), ("n2", hgx(2, 80))]);
    for (policy, want_same_node) in [(Policy::Binpack, true), (Policy::Spread, false)] {
        let mut e = engine(&inputs, policies(policy, Policy::Spread));
        let a = e
            .allocate(&claim("a", 1, json!({"memory": "10Gi"})), None, &none())
            .unwrap();
        e.commit(&a);
        let b = e
            .allocate(&claim("b", 1, json!({"memory": "10Gi"})), None, &none())
            .unwrap();
        assert_eq!(a.node_name == b.node_name, want_same_node, "{policy:?}");
    }
}

#[test]
fn a_claim_overrides_the_cluster_policy() {
    let inputs = cluster(&[("n1", hgx(4, 80))]);
    let mut e = engine(&inputs, policies(Policy::Binpack, Policy::Spread));
    let a = e
        .allocate(&claim("a", 1, json!({"memory": "10Gi"})), None, &none())
        .unwrap();
    e.commit(&a);
    let b = e
        .allocate(
            &claim(
                "b",
                1,
                json!({"memory": "10Gi", "scheduling": {"gpuPolicy": "Binpack"}}),
            ),
            None,
            &none(),
        )
        .unwrap();
    assert_eq!(devices(&a), devices(&b));
}

#[test]
fn slices_never_exceed_memory_or_cores() {
    let inputs = cluster(&[("n1", hgx(1, 80))]);
    let mut e = engine(&inputs, Policies::default());
    for i in 0..3 {
        let a = e
            .allocate(
                &claim(&format!("c{i}"), 1, json!({"memory": "20Gi", "cores": 30})),
                None,
                &none(),
            )
            .unwrap();
        e.commit(&a);
    }
    // 60Gi and 90 cores used: 20Gi more fits by memory, 30 cores does not.
    let err = e
        .allocate(
            &claim("c3", 1, json!({"memory": "20Gi", "cores": 30})),
            None,
            &none(),
        )
        .unwrap_err();
    assert!(matches!(err, Refusal::Unschedulable(_)), "{err}");
    assert!(err.to_string().contains("20Gi and 30% cores free"), "{err}");
    let fits = e
        .allocate(
            &claim("c4", 1, json!({"memory": "20Gi", "cores": 10})),
            None,
            &none(),
        )
        .unwrap();
    e.commit(&fits);
    let full = e.allocate(&claim("c5", 1, json!({"memory": "1Gi"})), None, &none());
    assert!(full.is_err(), "80Gi of 80Gi used");
    // Best-effort compute (cores 0) still needs memory.
    e.release("uid-c4");
    assert!(
        e.allocate(
            &claim("c6", 1, json!({"memory": "20Gi", "cores": 0})),
            None,
            &none()
        )
        .is_ok()
    );
}

#[test]
fn exclusive_claims_take_a_whole_unused_gpu() {
    let inputs = cluster(&[("n1", hgx(2, 80))]);
    let mut e = engine(&inputs, policies(Policy::Binpack, Policy::Binpack));
    let slice = e
        .allocate(&claim("s", 1, json!({"memory": "1Gi"})), None, &none())
        .unwrap();
    e.commit(&slice);
    let ex = e
        .allocate(&claim("x", 1, json!({"exclusive": true})), None, &none())
        .unwrap();
    assert_ne!(
        devices(&ex),
        devices(&slice),
        "an exclusive claim never shares"
    );
    e.commit(&ex);
    let gpu = e.state.gpu_index[&("n1".to_string(), ex.results[0].device.clone())];
    assert!(e.state.gpus[gpu].exclusive);
    assert!(
        e.allocate(&claim("x2", 1, json!({"exclusive": true})), None, &none())
            .is_err()
    );
    // Slices still fit beside the first slice, never on the exclusive GPU.
    let s2 = e
        .allocate(&claim("s2", 1, json!({"memory": "1Gi"})), None, &none())
        .unwrap();
    assert_eq!(devices(&s2), devices(&slice));
}

#[test]
fn required_topology_takes_nvlink_peers_only() {
    // Pairs (0,1) and (2,3) are NVLinked; 1 and 2 are not.
    let gpus = vec![
        gpu_with(0, 80, Some(0), &[1]),
        gpu_with(1, 80, Some(0), &[0]),
        gpu_with(2, 80, Some(1), &[3]),
        gpu_with(3, 80, Some(1), &[2]),
    ];
    let inputs = cluster(&[("n1", gpus)]);
    let mut e = engine(&inputs, Policies::default());
    let filler = e
        .allocate(&claim("f", 1, json!({"memory": "70Gi"})), None, &none())
        .unwrap();
    e.commit(&filler);
    let pair = e
        .allocate(
            &claim(
                "p",
                2,
                json!({"memory": "20Gi", "scheduling": {"topology": "Required"}}),
            ),
            None,
            &none(),
        )
        .unwrap();
    let mut got: Vec<String> = pair.results.iter().map(|r| r.device.clone()).collect();
    got.sort();
    assert!(
        got == ["gpu-0", "gpu-1"] || got == ["gpu-2", "gpu-3"],
        "{got:?}"
    );
    e.commit(&pair);
    let three = e.allocate(
        &claim(
            "t",
            3,
            json!({"memory": "1Gi", "scheduling": {"topology": "Required"}}),
        ),
        None,
        &none(),
    );
    let err = three.unwrap_err().to_string();
    assert!(err.contains("as NVLink peers"), "{err}");
    // Without the requirement three GPUs are found.
    assert!(
        e.allocate(
            &claim(
                "t2",
                3,
                json!({"memory": "1Gi", "scheduling": {"topology": "None"}})
            ),
            None,
            &none()
        )
        .is_ok()
    );
}

/// A DGX-1 hybrid cube-mesh: GPUs 0-3 and 4-7 fully linked quads, GPU i linked to i + 4.
fn cube_mesh_peers(i: u32) -> Vec<u32> {
    (0..8)
        .filter(|&p| p != i && (p / 4 == i / 4 || p % 4 == i % 4))
        .collect()
}

#[test]
fn required_topology_finds_the_free_quad_of_a_cube_mesh() {
    let gpus = (0..8)
        .map(|i| gpu_with(i, 80, Some(i / 4), &cube_mesh_peers(i)))
        .collect();
    let inputs = cluster(&[("n1", gpus)]);
    let mut e = engine(&inputs, Policies::default());
    let mut hold = |name: &str, count: u32, selector: &str, config: serde_json::Value| {
        let c = claim_with(
            name,
            vec![request("gpu", SLICE, count, &[selector])],
            vec![(vec![], config)],
        );
        let a = e.allocate(&c, None, &none()).unwrap();
        e.commit(&a);
        a
    };
    let index = |op: &str| format!(r#"device.attributes["vgpu.hami.io"].index {op}"#);
    hold("x", 3, &index(">= 5"), json!({"exclusive": true}));
    for i in 1..=3 {
        hold(
            &format!("s{i}"),
            1,
            &index(&format!("== {i}")),
            json!({"memory": "10Gi"}),
        );
    }
    // The smallest slice on GPU 4: spread puts it right after the free GPU 0, and 4 is a
    // peer of 0 but of none of 1-3.
    hold("s4", 1, &index("== 4"), json!({"memory": "1Gi"}));
    let quad = claim(
        "q",
        4,
        json!({"memory": "1Gi", "scheduling": {"topology": "Required"}}),
    );
    let got = e.allocate(&quad, None, &none()).unwrap();
    let mut names: Vec<String> = got.results.iter().map(|r| r.device.clone()).collect();
    names.sort();
    assert_eq!(names, ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]);
    // Five linked GPUs do not exist: refused, with the candidates counted.
    let five = claim(
        "f",
        5,
        json!({"memory": "1Gi", "scheduling": {"topology": "Required"}}),
    );
    let err = e.allocate(&five, None, &none()).unwrap_err().to_string();
    assert!(
        err.contains("1 node: request gpu needs 5 GPU(s) with 1Gi free as NVLink peers, 5 found"),
        "{err}"
    );
}

#[test]
fn preferred_topology_falls_back_to_one_numa_node() {
    // No NVLink at all: GPUs 0,1 on NUMA 0 and 2,3 on NUMA 1.
    let gpus = (0..4).map(|i| gpu_with(i, 80, Some(i / 2), &[])).collect();
    let inputs = cluster(&[("n1", gpus)]);
    let mut e = engine(&inputs, policies(Policy::Binpack, Policy::Spread));
    // Make GPU 1 the least used after GPU 2 and 3 so plain spread order would mix NUMA nodes.
    let a = e
        .allocate(&claim("a", 1, json!({"memory": "5Gi"})), None, &none())
        .unwrap();
    e.commit(&a);
    let pair = e
        .allocate(&claim("p", 2, json!({"memory": "5Gi"})), None, &none())
        .unwrap();
    let numa: BTreeSet<String> = pair
        .results
        .iter()
        .map(|r| (r.device.trim_start_matches("gpu-").parse::<u32>().unwrap() / 2).to_string())
        .collect();
    assert_eq!(numa.len(), 1, "both on one NUMA node: {:?}", devices(&pair));
}

#[test]
fn selectors_of_class_and_request_both_apply() {
    let gpus = vec![gpu_with(0, 40, Some(0), &[]), gpu_with(1, 80, Some(1), &[])];
    let inputs = cluster(&[("n1", gpus)]);
    let mut e = engine(&inputs, Policies::default());
    let h100 = claim_with(
        "h",
        vec![request(
            "gpu",
            SLICE,
            1,
            &[r#"device.attributes["vgpu.hami.io"].productName.startsWith("NVIDIA H100")"#],
        )],
        vec![(vec![], json!({"memory": "1Gi"}))],
    );
    assert_eq!(
        e.allocate(&h100, None, &none()).unwrap().results[0].device,
        "gpu-1"
    );
    let big = claim_with(
        "b",
        vec![request(
            "gpu",
            SLICE,
            1,
            &[r#"device.capacity["vgpu.hami.io"].memory.compareTo(quantity("50Gi")) < 0"#],
        )],
        vec![(vec![], json!({"memory": "1Gi"}))],
    );
    assert_eq!(
        e.allocate(&big, None, &none()).unwrap().results[0].device,
        "gpu-0"
    );
    let broken = claim_with(
        "x",
        vec![request("gpu", SLICE, 1, &["device.driver =="])],
        vec![],
    );
    assert!(
        matches!(e.allocate(&broken, None, &none()), Err(Refusal::Invalid(m)) if m.contains("does not compile"))
    );
}

#[test]
fn match_attribute_keeps_requests_on_one_numa_node() {
    let gpus = (0..4).map(|i| gpu_with(i, 80, Some(i / 2), &[])).collect();
    let inputs = cluster(&[("n1", gpus)]);
    let mut e = engine(&inputs, policies(Policy::Binpack, Policy::Spread));
    // Load NUMA 0's GPU 0 so that spread would choose GPU 1 then 2 (different NUMA nodes).
    let load = e
        .allocate(&claim("l", 1, json!({"memory": "50Gi"})), None, &none())
        .unwrap();
    e.commit(&load);
    let mut c = claim_with(
        "m",
        vec![request("a", SLICE, 1, &[]), request("b", SLICE, 1, &[])],
        vec![(vec![], json!({"memory": "40Gi"}))],
    );
    c.constraints = vec![ConstraintView {
        requests: vec![],
        match_attribute: Some("vgpu.hami.io/numaNode".into()),
        distinct_attribute: None,
    }];
    let a = e.allocate(&c, None, &none()).unwrap();
    let numas: BTreeSet<u32> = a
        .results
        .iter()
        .map(|r| r.device.trim_start_matches("gpu-").parse::<u32>().unwrap() / 2)
        .collect();
    assert_eq!(numas.len(), 1, "{:?}", devices(&a));
    assert_eq!(a.results.len(), 2);
    assert_ne!(a.results[0].device, a.results[1].device);
}

#[test]
fn pod_constraints_are_respected() {
    let mut inputs = cluster(&[("n1", hgx(1, 80)), ("n2", hgx(1, 80)), ("n3", hgx(1, 80))]);
    inputs.nodes[0].labels.insert("zone".into(), "a".into());
    inputs.nodes[1].taints.push(Taint {
        key: "dedicated".into(),
        value: Some("ml".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    });
    inputs.nodes[2].unschedulable = true;
    let mut e = engine(&inputs, Policies::default());
    let c = claim("c", 1, json!({"memory": "1Gi"}));
    let mut p = pod(&["c"]);
    p.node_selector.insert("zone".into(), "b".into());
    let err = e.allocate(&c, Some(&p), &none()).unwrap_err().to_string();
    assert!(
        err.contains("2 nodes: node does not match the pod's nodeSelector")
            && err.contains("unschedulable"),
        "{err}"
    );
    p.node_selector.clear();
    let err = e
        .allocate(&c, Some(&p), &BTreeSet::from(["n1".to_string()]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("untolerated taint dedicated")
            && err.contains("rejected by the scheduler before"),
        "{err}"
    );
    p.tolerations.push(Toleration {
        key: Some("dedicated".into()),
        operator: Some("Exists".into()),
        ..Default::default()
    });
    let a = e
        .allocate(&c, Some(&p), &BTreeSet::from(["n1".to_string()]))
        .unwrap();
    assert_eq!(
        a.node_name.as_deref(),
        Some("n2"),
        "n1 avoided, n2 tolerated, n3 unschedulable"
    );
    let err = e
        .allocate(
            &c,
            Some(&p),
            &BTreeSet::from(["n1".to_string(), "n2".to_string()]),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("rejected by the scheduler before"), "{err}");
}

#[test]
fn node_cpu_and_memory_are_checked() {
    let mut inputs = cluster(&[("n1", hgx(1, 80))]);
    inputs.nodes[0].cpu_millis = Some(4000);
    inputs.pods.push(controller::model::PodView {
        node_name: Some("n1".into()),
        cpu_millis: 3500,
        ..pod(&[])
    });
    let mut e = engine(&inputs, Policies::default());
    let mut p = pod(&["c"]);
    p.cpu_millis = 1000;
    let err = e
        .allocate(&claim("c", 1, json!({"memory": "1Gi"})), Some(&p), &none())
        .unwrap_err()
        .to_string();
    assert!(err.contains("insufficient cpu"), "{err}");
    p.cpu_millis = 500;
    assert!(
        e.allocate(&claim("c", 1, json!({"memory": "1Gi"})), Some(&p), &none())
            .is_ok()
    );
}

#[test]
fn state_is_rebuilt_from_claims_and_whole_gpu_allocations_count_full() {
    let inputs = cluster(&[("n1", hgx(2, 80))]);
    let mut e = engine(&inputs, policies(Policy::Binpack, Policy::Binpack));
    let mut allocated = Vec::new();
    for i in 0..3 {
        let mut c = claim(&format!("c{i}"), 1, json!({"memory": "10Gi", "cores": 20}));
        let a = e.allocate(&c, None, &none()).unwrap();
        e.commit(&a);
        c.allocation = Some(Arc::new(a));
        allocated.push(c);
    }
    // A whole GPU handed out by the kube-scheduler through the whole-GPU class (no config).
    let mut whole = claim_with("w", vec![request("gpu", WHOLE, 1, &[])], vec![]);
    whole.allocation = Some(Arc::new(ClaimAllocation {
        namespace: "ml".into(),
        name: "w".into(),
        uid: "uid-w".into(),
        results: vec![vgpu_driver::AllocatedDevice {
            request: "gpu".into(),
            driver: DRIVER.into(),
            pool: "n1".into(),
            device: "gpu-1".into(),
            admin_access: false,
            share_id: None,
            consumed_capacity: Default::default(),
        }],
        config: vec![],
        node_name: Some("n1".into()),
    }));
    allocated.push(whole.clone());
    let mut rebuilt_inputs = inputs.clone();
    rebuilt_inputs.claims = allocated;
    let rebuilt = engine(&rebuilt_inputs, Policies::default());
    let used: Vec<_> = rebuilt
        .state
        .gpus
        .iter()
        .map(|g| (g.device.name.clone(), g.used, g.holders))
        .collect();
    let gpu0 = &used[0];
    assert_eq!(gpu0.1.memory_bytes, 30 * GI);
    assert_eq!(gpu0.1.cores, 60);
    assert_eq!(used[1].1.cores, 100, "the whole-GPU allocation fills gpu-1");
    assert!(rebuilt.state.gpus[1].exclusive);
    // Rebuilding twice gives the same state.
    let again = engine(&rebuilt_inputs, Policies::default());
    let used_again: Vec<_> = again
        .state
        .gpus
        .iter()
        .map(|g| (g.device.name.clone(), g.used, g.holders))
        .collect();
    assert_eq!(used, used_again);
    // The whole-GPU claim is not ours to allocate.
    let mut fresh = whole.clone();
    fresh.allocation = None;
    assert!(matches!(
        engine(&inputs, Policies::default()).allocate(&fresh, None, &none()),
        Err(Refusal::NotOurs(_))
    ));
}

#[test]
fn admin_access_takes_nothing() {
    let inputs = cluster(&[("n1", hgx(1, 80))]);
    let mut e = engine(&inputs, Policies::default());
    let ex = e
        .allocate(&claim("x", 1, json!({"exclusive": true})), None, &none())
        .unwrap();
    e.commit(&ex);
    let mut admin = claim("admin", 1, json!({}));
    if let Some(alt) = admin.requests[0].alternatives.first_mut() {
        alt.admin_access = true;
    }
    let a = e.allocate(&admin, None, &none()).unwrap();
    assert!(a.results[0].admin_access);
    e.commit(&a);
    assert_eq!(e.state.gpus[0].holders, 1, "admin access is not a holder");
}

#[test]
fn missing_classes_and_mixed_claims_are_invalid() {
    let inputs = cluster(&[("n1", hgx(1, 80))]);
    let mut e = engine(&inputs, Policies::default());
    let mixed = claim_with(
        "m",
        vec![
            request("a", SLICE, 1, &[]),
            request("b", "nic.example.com", 1, &[]),
        ],
        vec![],
    );
    let err = e.allocate(&mixed, None, &none()).unwrap_err();
    assert!(
        matches!(&err, Refusal::Invalid(m) if m.contains("device class nic.example.com does not exist")),
        "{err}"
    );
    let bad_config = claim("b", 1, json!({"cores": 300}));
    let err = e.allocate(&bad_config, None, &none()).unwrap_err();
    assert!(
        matches!(&err, Refusal::Invalid(m) if m.contains("parameters.cores")),
        "{err}"
    );
}

#[test]
fn first_available_falls_back_in_order() {
    let inputs = cluster(&[("n1", hgx(2, 80))]);
    let mut e = engine(&inputs, Policies::default());
    let alt = |sub: &str, count| Alternative {
        capacity: Default::default(),
        result_name: format!("gpu/{sub}"),
        class: SLICE.into(),
        selectors: vec![],
        count: Count::Exact(count),
        admin_access: false,
    };
    let c = claim_with(
        "f",
        vec![RequestView {
            name: "gpu".into(),
            alternatives: vec![alt("big", 4), alt("small", 1)],
        }],
        vec![(vec!["gpu"], json!({"memory": "8Gi"}))],
    );
    let a = e.allocate(&c, None, &none()).unwrap();
    assert_eq!(a.results.len(), 1);
    assert_eq!(a.results[0].request, "gpu/small");
    assert_eq!(a.results[0].main_request(), "gpu");
    assert_eq!(
        a.slice_limits(&a.results[0], 80 * GI).unwrap().memory_bytes,
        8 * GI
    );
}

#[test]
fn allocation_mode_all_takes_every_matching_gpu() {
    let inputs = cluster(&[("n1", hgx(4, 80))]);
    let mut e = engine(&inputs, Policies::default());
    let mut c = claim("all", 1, json!({"memory": "1Gi"}));
    c.requests[0].alternatives[0].count = Count::All;
    let a = e.allocate(&c, None, &none()).unwrap();
    assert_eq!(a.results.len(), 4);
}

#[test]
fn config_is_copied_class_first_then_claim() {
    let inputs = cluster(&[("n1", hgx(1, 80))]);
    let mut e = engine(&inputs, Policies::default());
    let a = e
        .allocate(
            &claim("c", 1, json!({"memory": "2Gi", "cores": 30})),
            None,
            &none(),
        )
        .unwrap();
    assert_eq!(a.config.len(), 2);
    assert_eq!(a.config[0].source, ConfigSource::FromClass);
    assert_eq!(a.config[0].requests, vec!["gpu".to_string()]);
    assert_eq!(a.config[1].source, ConfigSource::FromClaim);
    assert_eq!(a.node_name.as_deref(), Some("n1"));
    let limits = a.slice_limits(&a.results[0], 80 * GI).unwrap();
    assert_eq!((limits.memory_bytes, limits.cores), (2 * GI, 30));
    // And the marker the shipped class carries is what makes it ours.
    assert!(vgpu_driver::class::is_controller_selector(&marker()));
}

#[test]
fn incomplete_and_stale_pools_are_ignored() {
    let mut inputs = cluster(&[("n1", hgx(2, 80))]);
    // A newer generation with only one of its two slices published yet.
    let mut newer = inputs.slices[0].clone();
    newer.generation = 5;
    newer.resource_slice_count = 2;
    inputs.slices.push(newer);
    let e = engine(&inputs, Policies::default());
    assert!(
        e.state.gpus.is_empty(),
        "the newest generation is incomplete: the pool is not usable"
    );
    let mut old = cluster(&[("n1", hgx(2, 80))]);
    let mut stale = old.slices[0].clone();
    stale.generation = -1;
    stale.devices.truncate(1);
    old.slices.push(stale);
    assert_eq!(
        engine(&old, Policies::default()).state.gpus.len(),
        2,
        "older generations are ignored"
    );
}

fn no_room(result: Result<ClaimAllocation, Refusal>) -> NoRoom {
    match result {
        Err(Refusal::Unschedulable(no_room)) => no_room,
        other => panic!("expected no room, got {other:?}"),
    }
}

#[test]
fn a_selector_no_gpu_matches_is_told_apart_from_a_full_cluster() {
    let inputs = cluster(&[("n1", hgx(2, 80)), ("n2", hgx(2, 80))]);
    let mut e = engine(&inputs, Policies::default());
    let b200 = claim_with(
        "b200",
        vec![request(
            "gpu",
            SLICE,
            1,
            &[r#"device.attributes["vgpu.hami.io"].productName == "NVIDIA B200""#],
        )],
        vec![(vec![], json!({"memory": "2Gi"}))],
    );
    let r = no_room(e.allocate(&b200, None, &none()));
    assert_eq!(r.reason, WaitReason::NoMatchingGpu, "{}", r.message);
    assert!(
        r.message.contains(
            "NoMatchingGpu: request gpu: no GPU matches device class gpu-slice.vgpu.hami.io and the request's selectors (4 GPUs checked)"
        ),
        "{}",
        r.message
    );
    // More GPUs than any node has matching: no wait helps either.
    let r = no_room(e.allocate(&claim("many", 3, json!({"memory": "1Gi"})), None, &none()));
    assert_eq!(r.reason, WaitReason::NoMatchingGpu, "{}", r.message);
    assert!(
        r.message
            .contains("wants 3 GPUs matching device class gpu-slice.vgpu.hami.io and its selectors; 4 match, at most 2 on one node"),
        "{}",
        r.message
    );
    // Bigger than every GPU: GPUs match, none has room; the amount is printed with its unit.
    let r = no_room(e.allocate(
        &claim("huge", 1, json!({"memory": "96Gi", "cores": 20})),
        None,
        &none(),
    ));
    assert_eq!(r.reason, WaitReason::InsufficientCapacity, "{}", r.message);
    assert!(
        r.message.contains(
            "InsufficientCapacity: request gpu needs 1 GPU with 96Gi and 20% cores free: 4 GPUs match on nodes the pod may run on, none has room"
        ),
        "{}",
        r.message
    );
}

#[test]
fn a_full_cluster_says_how_many_gpus_match_and_have_room() {
    let inputs = cluster(&[("n1", hgx(2, 80)), ("n2", hgx(2, 80))]);
    let mut e = engine(&inputs, Policies::default());
    // 60 GiB on three GPUs: one GPU has 80 GiB free, the others 20.
    for i in 0..3 {
        let a = e
            .allocate(
                &claim(&format!("c{i}"), 1, json!({"memory": "60Gi"})),
                None,
                &none(),
            )
            .unwrap();
        e.commit(&a);
    }
    let r = no_room(e.allocate(&claim("two", 2, json!({"memory": "30Gi"})), None, &none()));
    assert_eq!(r.reason, WaitReason::InsufficientCapacity, "{}", r.message);
    assert!(
        r.message.contains(
            "request gpu needs 2 GPUs with 30Gi free: 4 GPUs match on nodes the pod may run on, 1 have room but at most 1 on one node"
        ),
        "{}",
        r.message
    );
}

#[test]
fn a_pod_that_may_run_on_no_gpu_node_is_told_so() {
    let mut inputs = cluster(&[("n1", hgx(2, 80)), ("n2", hgx(2, 80))]);
    inputs.nodes[1].taints.push(Taint {
        key: "dedicated".into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    });
    let mut e = engine(&inputs, Policies::default());
    let mut p = pod(&["c"]);
    p.node_selector.insert("zone".into(), "b".into());
    let r = no_room(e.allocate(&claim("c", 1, json!({"memory": "1Gi"})), Some(&p), &none()));
    assert_eq!(r.reason, WaitReason::NoEligibleNode, "{}", r.message);
    assert!(
        r.message.contains(
            "NoEligibleNode: request gpu: 4 GPUs match, but none on nodes the pod may run on"
        ),
        "{}",
        r.message
    );
    // The per-node reasons follow.
    assert!(r.message.contains("nodeSelector"), "{}", r.message);
}

#[test]
fn required_nvlink_says_how_many_gpus_have_room_but_are_not_peers() {
    // Six GPUs in three NVLink pairs: room on all six, no four mutual peers.
    let pairs: Vec<vgpu_driver::Gpu> = (0..6u32)
        .map(|i| gpu_with(i, 80, Some(0), &[i ^ 1]))
        .collect();
    let inputs = cluster(&[("n1", pairs)]);
    let mut e = engine(&inputs, Policies::default());
    let r = no_room(e.allocate(
        &claim(
            "four",
            4,
            json!({"memory": "2Gi", "scheduling": {"topology": "Required"}}),
        ),
        None,
        &none(),
    ));
    assert_eq!(r.reason, WaitReason::Topology, "{}", r.message);
    assert!(
        r.message.contains(
            "TopologyUnsatisfiable: request gpu: 6 GPUs on one node have 2Gi free, but no 4 of them are mutual NVLink peers"
        ),
        "{}",
        r.message
    );
    // Preferred takes any four.
    assert!(
        e.allocate(&claim("four", 4, json!({"memory": "2Gi"})), None, &none())
            .is_ok()
    );
}

#[test]
fn config_errors_number_the_claims_entries_from_its_own_list() {
    let inputs = cluster(&[("n1", hgx(1, 80))]);
    let mut e = engine(&inputs, Policies::default());
    // The class adds an entry before the claim's: the claim's first is still config[0].
    let bad = claim("bad", 1, json!({"cores": 300}));
    let err = e.allocate(&bad, None, &none()).unwrap_err();
    assert!(
        matches!(&err, Refusal::Invalid(m) if m.contains("spec.devices.config[0].opaque.parameters.cores")),
        "{err}"
    );
    let mut broken = inputs.clone();
    broken.classes[0].config[0].parameters = params(json!({"memory": "lots"})).into();
    let mut e = engine(&broken, Policies::default());
    let err = e
        .allocate(&claim("ok", 1, json!({"cores": 10})), None, &none())
        .unwrap_err();
    assert!(
        matches!(&err, Refusal::Invalid(m) if m.contains("DeviceClass gpu-slice.vgpu.hami.io spec.config[0].opaque.parameters.memory")),
        "{err}"
    );
}

/// The capacity gauges follow the engine: values move with each charge, and the series of a
/// node that left are gone after the next build, while the others stay.
#[test]
fn capacity_series_follow_the_engines_gpus() {
    use controller::run::metrics::Metrics;
    let metrics = Metrics::new();
    let free = |text: &str, node: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.starts_with("vgpu_controller_gpu_memory_free_bytes{")
                    && l.contains(&format!("node=\"{node}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
            .collect()
    };
    let mut e = engine(
        &cluster(&[("n1", hgx(2, 80)), ("n2", hgx(2, 80))]),
        Policies::default(),
    );
    metrics.observe_state(&e.state);
    let text = metrics.render();
    assert_eq!(
        free(&text, "n1"),
        [(80 * GI).to_string(), (80 * GI).to_string()]
    );
    assert_eq!(free(&text, "n2").len(), 2);

    let a = e
        .allocate(&claim("a", 1, json!({"memory": "10Gi"})), None, &none())
        .unwrap();
    e.commit(&a);
    metrics.observe_state(&e.state);
    let text = metrics.render();
    let all: Vec<String> = [free(&text, "n1"), free(&text, "n2")].concat();
    assert_eq!(
        all.iter().filter(|v| **v == (70 * GI).to_string()).count(),
        1
    );
    assert!(text.contains("vgpu_controller_node_memory_fragmentation_ratio{node=\"n2\"}"));

    let e = engine(&cluster(&[("n1", hgx(2, 80))]), Policies::default());
    metrics.observe_state(&e.state);
    let text = metrics.render();
    assert_eq!(free(&text, "n1").len(), 2);
    assert!(free(&text, "n2").is_empty(), "{text}");
    assert!(!text.contains("node=\"n2\""), "{text}");
}
