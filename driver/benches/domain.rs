//! Costs on the plugin's and controller's hot paths: rendering a node's slices, decoding and
//! merging opaque configuration, parsing quantities.

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use std::hint::black_box;
use vgpu_driver::config::{API_VERSION, ConfigEntry, ConfigSource, KIND, effective_config};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{Inventory, NodeRef, PoolOptions, PublishedDevice, Quantity};

const HGX: &str = include_str!("../testdata/hgx-h100.yaml");

fn bench(c: &mut Criterion) {
    let gpus = Inventory::from_yaml(HGX).unwrap().gpus;
    let node = NodeRef {
        name: "gpu-node-1".into(),
        uid: "uid".into(),
    };
    let opts = PoolOptions::new("vgpu.hami.io");

    c.bench_function("render 8×H100 node (devices + v1 slice)", |b| {
        b.iter(|| {
            let devices = gpu_devices(black_box(&gpus)).unwrap();
            render_pool(&node, &devices, &opts).unwrap()
        })
    });

    let many: Vec<PublishedDevice> = gpu_devices(&gpus)
        .unwrap()
        .into_iter()
        .cycle()
        .take(1000)
        .enumerate()
        .map(|(i, mut d)| {
            d.name = format!("gpu-{i}");
            d
        })
        .collect();
    c.bench_function("render 1000-device pool (8 v1 slices)", |b| {
        b.iter(|| render_pool(&node, black_box(&many), &opts).unwrap())
    });

    let entries = vec![
        ConfigEntry {
            source: ConfigSource::FromClass,
            requests: vec![],
            driver: "vgpu.hami.io".into(),
            parameters:
                json!({"apiVersion": API_VERSION, "kind": KIND, "memory": "8Gi", "cores": 20})
                    .into(),
        },
        ConfigEntry {
            source: ConfigSource::FromClaim,
            requests: vec!["gpu".into()],
            driver: "vgpu.hami.io".into(),
            parameters:
                json!({"apiVersion": API_VERSION, "kind": KIND, "memoryPercentage": 25, "cores": 30,
                "scheduling": {"gpuPolicy": "Spread"}})
                .into(),
        },
    ];
    c.bench_function("effective config (class + claim entries)", |b| {
        b.iter(|| effective_config(black_box(&entries), "vgpu.hami.io", "gpu").unwrap())
    });

    c.bench_function("quantity parse 81559Mi", |b| {
        b.iter(|| Quantity::parse(black_box("81559Mi")).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
