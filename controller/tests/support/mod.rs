//! Building clusters and claims for the engine's tests.
#![allow(dead_code)]

use controller::engine::{Engine, Inputs, Policies};
use controller::model::{
    Alternative, ClaimView, ClassView, ConstraintView, Count, NodeView, PodView, RequestView,
};
use serde_json::{Value, json};
pub use test_support::{gpu_with, hgx};
use vgpu_driver::class::controller_selector;
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{AttributeValue, PublishedDevice, gpu_devices, render_pool};
use vgpu_driver::{ConfigEntry, ConfigSource, Gpu, NodeRef, PoolOptions, SliceView};

pub const DRIVER: &str = "vgpu.hami.io";
pub const SLICE: &str = "gpu-slice.vgpu.hami.io";
pub const WHOLE: &str = "gpu.vgpu.hami.io";
pub const GI: u64 = 1 << 30;

pub fn node(name: &str) -> NodeView {
    NodeView {
        name: name.into(),
        labels: [("kubernetes.io/hostname".to_string(), name.to_string())].into(),
        ..Default::default()
    }
}

/// A cluster of `nodes` each with `gpus`.
pub fn cluster(nodes: &[(&str, Vec<Gpu>)]) -> Inputs {
    let mut inputs = Inputs::default();
    for (name, gpus) in nodes {
        inputs.nodes.push(node(name));
        let devices = gpu_devices(gpus).unwrap();
        for s in render_pool(
            &NodeRef {
                name: name.to_string(),
                uid: format!("uid-{name}"),
            },
            &devices,
            &PoolOptions::new(DRIVER),
        )
        .unwrap()
        {
            inputs.slices.push(SliceView::of(&s));
        }
    }
    inputs.classes = classes();
    inputs
}

pub fn classes() -> Vec<ClassView> {
    vec![
        ClassView {
            name: SLICE.into(),
            selectors: vec![format!("device.driver == \"{DRIVER}\"")],
            config: vec![ConfigEntry {
                source: ConfigSource::FromClass,
                requests: vec![],
                driver: DRIVER.into(),
                parameters: json!({"apiVersion": API_VERSION, "kind": KIND}).into(),
            }],
            ours: true,
        },
        ClassView {
            name: WHOLE.into(),
            selectors: vec![format!("device.driver == \"{DRIVER}\"")],
            config: vec![],
            ours: false,
        },
    ]
}

/// The marker selector really is what makes a class ours.
pub fn marker() -> String {
    controller_selector(DRIVER)
}

pub fn params(extra: Value) -> Value {
    let mut p = json!({"apiVersion": API_VERSION, "kind": KIND});
    p.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    p
}

/// A one-request claim of the slice class.
pub fn claim(name: &str, count: u32, config: Value) -> ClaimView {
    claim_with(
        name,
        vec![request("gpu", SLICE, count, &[])],
        vec![(vec![], config)],
    )
}

pub fn request(name: &str, class: &str, count: u32, selectors: &[&str]) -> RequestView {
    RequestView {
        name: name.into(),
        alternatives: vec![Alternative {
            result_name: name.into(),
            class: class.into(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            count: Count::Exact(count),
            admin_access: false,
            capacity: Default::default(),
        }],
    }
}

pub fn claim_with(
    name: &str,
    requests: Vec<RequestView>,
    config: Vec<(Vec<&str>, Value)>,
) -> ClaimView {
    ClaimView {
        namespace: "ml".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        resource_version: None,
        created: None,
        requests,
        constraints: Vec::<ConstraintView>::new(),
        config: config
            .into_iter()
            .map(|(requests, extra)| ConfigEntry {
                source: ConfigSource::FromClaim,
                requests: requests.into_iter().map(String::from).collect(),
                driver: DRIVER.into(),
                parameters: params(extra).into(),
            })
            .collect(),
        allocation: None,
        deleting: false,
        reserved_for: vec![],
        finalizers: vec![],
    }
}

pub fn engine(inputs: &Inputs, policies: Policies) -> Engine {
    Engine::new(DRIVER, inputs, policies)
}

pub fn pod(claims: &[&str]) -> PodView {
    PodView {
        namespace: "ml".into(),
        name: "p".into(),
        uid: "pod-uid".into(),
        claims: claims.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn attr(device: &PublishedDevice, name: &str) -> Option<AttributeValue> {
    device.attributes.get(name).cloned()
}
