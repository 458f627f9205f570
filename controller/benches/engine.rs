//! The engine at cluster scale: 1,000 nodes × 8 H100 with 20,000 live slices. Measures one
//! allocation decision, and a full allocate + commit + release cycle (claims per second).
//!
//! `cargo bench -p controller --bench engine`

use controller::engine::{Engine, Inputs, Policies};
use controller::model::{Alternative, ClaimView, ClassView, Count, NodeView, RequestView};
use criterion::{Criterion, criterion_group, criterion_main};
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
            parameters: json!({"apiVersion": API_VERSION, "kind": KIND, "memory": format!("{memory_gib}Gi"), "cores": cores}),
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
    training.config[0].parameters["scheduling"] = json!({"topology": "Required"});
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
    targets = bench
}
criterion_main!(benches);
