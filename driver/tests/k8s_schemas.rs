//! Every rendered ResourceSlice and allocation validates against the official Kubernetes
//! schemas: v1beta1 against 1.32, v1 against 1.34.

use k8s_openapi::api::resource::{v1, v1beta1};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use std::collections::BTreeMap;
use vgpu_driver::allocation::{AllocatedDevice, ClaimAllocation};
use vgpu_driver::config::{API_VERSION, ConfigEntry, ConfigSource, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::testing::validate_k8s;
use vgpu_driver::{ApiVersion, Gpu, NodeRef, PoolOptions, PublishedDevice, Quantity};

fn hgx_h100() -> Vec<Gpu> {
    let uuids: Vec<String> = (0..8)
        .map(|i| format!("GPU-5f2c9a1e-{i:04}-4a8b-9c3d-7e6f5a4b3c2d"))
        .collect();
    (0..8u32)
        .map(|i| Gpu {
            uuid: uuids[i as usize].clone(),
            index: i,
            minor: i,
            product_name: "NVIDIA H100 80GB HBM3".into(),
            architecture: "Hopper".into(),
            cuda_compute_capability: "9.0".into(),
            driver_version: "560.35.03".into(),
            cuda_driver_version: "12.6".into(),
            pci_bus_id: format!(
                "0000:{:02x}:00.0",
                [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb][i as usize]
            ),
            numa_node: Some(i / 4),
            memory_bytes: 81559 << 20,
            multiprocessor_count: 132,
            nvlink_peers: uuids
                .iter()
                .filter(|u| **u != uuids[i as usize])
                .cloned()
                .collect(),
        })
        .collect()
}

fn node() -> NodeRef {
    NodeRef {
        name: "gpu-node-1".into(),
        uid: "6c1f5a7e-1111-2222-3333-444455556666".into(),
    }
}

fn rendered(version: ApiVersion) -> Vec<serde_json::Value> {
    let mut objects = Vec::new();
    let mut opts = PoolOptions::new("vgpu.hami.io", version);
    opts.generation = 3;
    for slice in render_pool(&node(), &gpu_devices(&hgx_h100()).unwrap(), &opts).unwrap() {
        objects.push(name_it(slice.to_json(), objects.len()));
    }
    // A pool big enough to need several slices.
    let many: Vec<PublishedDevice> = (0..200)
        .map(|i| PublishedDevice {
            name: format!("gpu-{i}"),
            capacity: [("memory".to_string(), Quantity::from_units(16 << 30))].into(),
            ..Default::default()
        })
        .collect();
    let slices = render_pool(&node(), &many, &opts).unwrap();
    assert_eq!(slices.len(), 2);
    for slice in slices {
        objects.push(name_it(slice.to_json(), objects.len()));
    }
    // An empty pool.
    for slice in render_pool(&node(), &[], &opts).unwrap() {
        objects.push(name_it(slice.to_json(), objects.len()));
    }
    objects
}

/// The API server fills metadata.name from generateName; the schema accepts either.
fn name_it(mut object: serde_json::Value, i: usize) -> serde_json::Value {
    object["metadata"]["name"] = json!(format!("gpu-node-1-vgpu.hami.io-{i}"));
    object
}

fn allocation() -> ClaimAllocation {
    ClaimAllocation {
        namespace: "ml".into(),
        name: "train-gpu".into(),
        uid: "0b6f3c1e-5d0a-4c8e-9f11-2a7e8c3d4b5a".into(),
        results: (0..2)
            .map(|i| AllocatedDevice {
                request: "gpu".into(),
                driver: "vgpu.hami.io".into(),
                pool: "gpu-node-1".into(),
                device: format!("gpu-{i}"),
                admin_access: false,
                share_id: None,
                consumed_capacity: BTreeMap::new(),
            })
            .collect(),
        config: vec![ConfigEntry {
            source: ConfigSource::FromClaim,
            requests: vec!["gpu".into()],
            driver: "vgpu.hami.io".into(),
            parameters: json!({"apiVersion": API_VERSION, "kind": KIND, "memory": "4Gi", "cores": 30}),
        }],
        node_name: Some("gpu-node-1".into()),
    }
}

fn meta() -> ObjectMeta {
    ObjectMeta {
        name: Some("train-gpu".into()),
        namespace: Some("ml".into()),
        ..Default::default()
    }
}

#[test]
fn v1beta1_slices_and_allocations_validate_against_kubernetes_1_32() {
    let mut objects = rendered(ApiVersion::V1beta1);
    let claim = v1beta1::ResourceClaim {
        metadata: meta(),
        spec: v1beta1::ResourceClaimSpec {
            devices: Some(v1beta1::DeviceClaim {
                requests: Some(vec![v1beta1::DeviceRequest {
                    name: "gpu".into(),
                    device_class_name: Some("gpu-slice.vgpu.hami.io".into()),
                    count: Some(2),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        },
        status: Some(v1beta1::ResourceClaimStatus {
            allocation: Some(allocation().to_v1beta1()),
            ..Default::default()
        }),
    };
    objects.push(serde_json::to_value(&claim).unwrap());
    validate_k8s(&objects, "1.32.0").unwrap();
    // And 1.33, which serves v1beta1 too.
    validate_k8s(&objects, "1.33.0").unwrap();
}

#[test]
fn v1_slices_and_allocations_validate_against_kubernetes_1_34() {
    let mut objects = rendered(ApiVersion::V1);
    let claim = v1::ResourceClaim {
        metadata: meta(),
        spec: v1::ResourceClaimSpec {
            devices: Some(v1::DeviceClaim {
                requests: Some(vec![v1::DeviceRequest {
                    name: "gpu".into(),
                    exactly: Some(v1::ExactDeviceRequest {
                        device_class_name: "gpu-slice.vgpu.hami.io".into(),
                        count: Some(2),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        },
        status: Some(v1::ResourceClaimStatus {
            allocation: Some(allocation().to_v1()),
            ..Default::default()
        }),
    };
    objects.push(serde_json::to_value(&claim).unwrap());
    validate_k8s(&objects, "1.34.0").unwrap();
}

/// The check can fail: a v1 slice is not a 1.32 object, and a v1beta1 slice with a v1-only
/// layout is rejected.
#[test]
fn the_schema_check_rejects_wrong_objects() {
    let v1_objects = rendered(ApiVersion::V1);
    assert!(validate_k8s(&v1_objects[..1], "1.32.0").is_err());
    let mut broken = rendered(ApiVersion::V1beta1).remove(0);
    // v1 puts attributes directly on the device; v1beta1 wants them under `basic`.
    broken["spec"]["devices"][0]["attributes"] = json!({"type": {"string": "gpu"}});
    let report = validate_k8s(&[broken], "1.32.0").unwrap_err();
    assert!(report.contains("attributes"), "{report}");
}

/// Native sharing (consumable capacity): the v1 fields of 1.34 validate.
#[test]
fn native_sharing_slices_and_allocations_validate_against_kubernetes_1_34() {
    let mut devices = gpu_devices(&hgx_h100()).unwrap();
    for d in &mut devices {
        d.allow_multiple_allocations = true;
    }
    let opts = PoolOptions::new("vgpu.hami.io", ApiVersion::V1);
    let mut objects: Vec<serde_json::Value> = render_pool(&node(), &devices, &opts)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, s)| name_it(s.to_json(), i))
        .collect();
    assert_eq!(
        objects[0]["spec"]["devices"][0]["allowMultipleAllocations"],
        true
    );
    let mut a = allocation();
    for r in &mut a.results {
        r.share_id = Some("3f1e2d4c-5b6a-4789-8abc-def012345678".into());
        r.consumed_capacity = [
            ("memory".to_string(), Quantity::parse("4Gi").unwrap()),
            ("cores".to_string(), Quantity::from_units(30)),
        ]
        .into();
    }
    let claim = v1::ResourceClaim {
        metadata: meta(),
        spec: v1::ResourceClaimSpec {
            devices: Some(v1::DeviceClaim {
                requests: Some(vec![v1::DeviceRequest {
                    name: "gpu".into(),
                    exactly: Some(v1::ExactDeviceRequest {
                        device_class_name: "gpu-native.vgpu.hami.io".into(),
                        count: Some(2),
                        capacity: Some(v1::CapacityRequirements {
                            requests: Some(
                                [
                                    (
                                        "memory".to_string(),
                                        k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                                            "4Gi".into(),
                                        ),
                                    ),
                                    (
                                        "cores".to_string(),
                                        k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                                            "30".into(),
                                        ),
                                    ),
                                ]
                                .into(),
                            ),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        },
        status: Some(v1::ResourceClaimStatus {
            allocation: Some(a.to_v1()),
            ..Default::default()
        }),
    };
    let claim = serde_json::to_value(&claim).unwrap();
    assert_eq!(
        claim["status"]["allocation"]["devices"]["results"][0]["consumedCapacity"]["memory"],
        "4Gi"
    );
    objects.push(claim);
    validate_k8s(&objects, "1.34.0").unwrap();
    // 1.33 has no consumable capacity: its v1beta1 rejects the fields that 1.34's accepts, so
    // the plugin must only publish them where the API has them.
    let beta = render_pool(
        &node(),
        &devices,
        &PoolOptions::new("vgpu.hami.io", ApiVersion::V1beta1),
    )
    .unwrap();
    let beta = name_it(beta[0].to_json(), 0);
    validate_k8s(std::slice::from_ref(&beta), "1.34.0").unwrap();
    let report = validate_k8s(&[beta], "1.33.0").unwrap_err();
    assert!(
        report.contains("requestPolicy") || report.contains("allowMultipleAllocations"),
        "{report}"
    );
}
