//! The engine at cluster scale, two workloads:
//! - `mixed/…`: 1,000 nodes × 8 GPUs of three NVLink layouts (H100 NVSwitch, V100 DGX-1
//!   cube-mesh, A100 pairs) and 20,000 claims, 20 % with CEL selectors, multi-GPU Required and
//!   Preferred, exclusive (see `cluster/mod.rs`), each decided with its pod: the whole stream,
//!   and single decisions on the filled cluster.
//! - the original: 1,000 nodes × 8 H100 with 20,000 live selector-free slices; one decision
//!   on a prebuilt engine.
//!
//! `cargo bench -p controller --bench engine`

mod cluster;

use controller::engine::{Engine, Inputs, Policies};
use controller::model::PodView;
use controller::model::{Alternative, ClaimView, ClassView, Count, NodeView, RequestView};
use controller::slim::SlimPod;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use serde_json::json;
use std::collections::BTreeSet;
use std::hint::black_box;
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{ConfigEntry, ConfigSource, Inventory, NodeRef, PoolOptions, SliceView};

const DRIVER: &str = "vgpu.hami.io";
const NODES: usize = 1000;
const LIVE_SLICES: usize = 20_000;

fn claim(i: usize, memory_gib: u64, cores: u64) -> ClaimView {
    ClaimView {
        namespace: "bench".into(),
        name: format!("c{i}"),
        uid: format!("uid-{i}"),
        resource_version: None,
        created: None,
        requests: vec![RequestView {
            name: "gpu".into(),
            alternatives: vec![Alternative {
                result_name: "gpu".into(),
                class: "gpu-slice.vgpu.hami.io".into(),
                selectors: vec![],
                count: Count::Exact(1),
                admin_access: false,
                capacity: Default::default(),
            }],
        }],
        constraints: vec![],
        config: vec![ConfigEntry {
            source: ConfigSource::FromClaim,
            requests: vec![],
            driver: DRIVER.into(),
            parameters: json!({"apiVersion": API_VERSION, "kind": KIND, "memory": format!("{memory_gib}Gi"), "cores": cores}).into(),
        }],
        allocation: None,
        deleting: false,
        reserved_for: vec![],
        finalizers: vec![],
    }
}

fn cluster() -> Engine {
    let gpus = Inventory::from_yaml(include_str!("../../driver/testdata/hgx-h100.yaml"))
        .unwrap()
        .gpus;
    let devices = gpu_devices(&gpus).unwrap();
    let mut inputs = Inputs::default();
    for n in 0..NODES {
        let name = format!("node-{n:04}");
        inputs.nodes.push(NodeView {
            name: name.clone(),
            ..Default::default()
        });
        for s in render_pool(
            &NodeRef {
                name,
                uid: format!("uid-{n}"),
            },
            &devices,
            &PoolOptions::new(DRIVER),
        )
        .unwrap()
        {
            inputs.slices.push(SliceView::of(&s));
        }
    }
    inputs.classes.push(ClassView {
        name: "gpu-slice.vgpu.hami.io".into(),
        selectors: vec![format!("device.driver == \"{DRIVER}\"")],
        config: vec![],
        ours: true,
    });
    let mut engine = Engine::new(DRIVER, &inputs, Policies::default());
    // 20,000 live slices of 2-9 GiB and 0-9 % (2.5 per GPU on average).
    for i in 0..LIVE_SLICES {
        let c = claim(i, 2 + (i % 8) as u64, (i % 10) as u64);
        let a = engine
            .allocate(&c, None, &BTreeSet::new())
            .expect("the live slices fit");
        engine.commit(&a);
    }
    engine
}

/// The mixed workload as engine inputs, its claims and the pod of each claim.
fn mixed() -> (Inputs, Vec<ClaimView>, Vec<PodView>) {
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::api::resource::v1;
    let mut inputs = Inputs::default();
    let (mut claims, mut pods) = (Vec::new(), Vec::new());
    for o in cluster::objects(NODES, LIVE_SLICES) {
        match o["kind"].as_str() {
            Some("Node") => inputs.nodes.push(NodeView::from_node(
                &serde_json::from_value::<Node>(o).unwrap(),
            )),
            Some("ResourceSlice") => inputs.slices.push(SliceView::of(
                &serde_json::from_value::<v1::ResourceSlice>(o).unwrap(),
            )),
            Some("DeviceClass") => inputs.classes.push(ClassView::of(
                &serde_json::from_value::<v1::DeviceClass>(o).unwrap(),
            )),
            Some("ResourceClaim") => claims.push(
                ClaimView::of(&serde_json::from_value::<v1::ResourceClaim>(o).unwrap()).unwrap(),
            ),
            Some("Pod") => pods.push(PodView::of(&serde_json::from_value::<SlimPod>(o).unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    (inputs, claims, pods)
}

/// Decide and commit every claim in order; how many were placed.
fn decide_all(engine: &mut Engine, claims: &[ClaimView], pods: &[PodView]) -> usize {
    let avoid = BTreeSet::new();
    let mut placed = 0;
    for (claim, pod) in claims.iter().zip(pods) {
        if let Ok(a) = engine.allocate(claim, Some(pod), &avoid) {
            engine.commit(&a);
            placed += 1;
        }
    }
    placed
}

fn bench_mixed(c: &mut Criterion) {
    let (inputs, claims, pods) = mixed();
    let mut filled = Engine::new(DRIVER, &inputs, Policies::default());
    let placed = decide_all(&mut filled, &claims, &pods);
    eprintln!("mixed workload: {placed} of {} claims placed", claims.len());
    c.bench_function(
        "mixed: decide + commit 20,000 claims on 1000 nodes x 8 GPUs (20% CEL, multi-GPU, exclusive)",
        |b| {
            b.iter_batched(
                || Engine::new(DRIVER, &inputs, Policies::default()),
                |mut engine| black_box(decide_all(&mut engine, &claims, &pods)),
                BatchSize::PerIteration,
            )
        },
    );
    let avoid = BTreeSet::new();
    let mut probe = claims[12].clone();
    probe.uid = "probe-selector".into();
    probe.name = "probe-selector".into();
    c.bench_function(
        "mixed: one decision with a CEL selector, filled cluster",
        |b| b.iter(|| filled.allocate(black_box(&probe), Some(&pods[12]), &avoid)),
    );
    let mut quad = claims[17].clone();
    quad.uid = "probe-quad".into();
    quad.name = "probe-quad".into();
    c.bench_function("mixed: one 4-GPU Required decision, filled cluster", |b| {
        b.iter(|| filled.allocate(black_box(&quad), Some(&pods[17]), &avoid))
    });
}

fn bench(c: &mut Criterion) {
    let mut engine = cluster();
    let avoid = BTreeSet::new();
    let probe = claim(LIVE_SLICES + 1, 10, 20);
    c.bench_function(
        "decision: 10Gi/20% slice, 1000 nodes x 8 GPUs, 20k live slices",
        |b| b.iter(|| engine.allocate(black_box(&probe), None, &avoid).unwrap()),
    );
    let refused = claim(LIVE_SLICES + 2, 100, 10);
    c.bench_function("refusal: 100Gi fits no GPU, every node considered", |b| {
        b.iter(|| {
            engine
                .allocate(black_box(&refused), None, &avoid)
                .unwrap_err()
        })
    });
    let mut training = claim(LIVE_SLICES + 3, 20, 30);
    training.requests[0].alternatives[0].count = Count::Exact(4);
    std::sync::Arc::make_mut(&mut training.config[0].parameters)["scheduling"] =
        json!({"topology": "Required"});
    c.bench_function(
        "decision: 4 NVLink-peer GPUs x 20Gi/30% (topology Required)",
        |b| b.iter(|| engine.allocate(black_box(&training), None, &avoid).unwrap()),
    );
    c.bench_function("cycle: allocate + commit + release", |b| {
        b.iter(|| {
            let a = engine.allocate(black_box(&probe), None, &avoid).unwrap();
            engine.commit(&a);
            engine.release(&a.uid);
        })
    });
    c.bench_function(
        "fill an empty 8,000-GPU cluster with 20k slices (20k decisions + commits)",
        |b| {
            b.iter_with_large_drop(|| {
                let fresh = cluster();
                black_box(fresh.state.gpus.len())
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(5));
    targets = bench_mixed, bench
}
criterion_main!(benches);
