//! The driver's ResourceSlices and allocations, written in v1 and converted at the wire,
//! validate against the official Kubernetes schemas: v1 against 1.34, v1beta1 against 1.32
//! and 1.33; and what is converted to v1beta1 converts back to the same v1 object.

use dra::ApiVersion;
use dra::convert::{from_wire, to_wire};
use k8s_openapi::api::resource::v1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::json;
use std::collections::BTreeMap;
use test_support::validate_k8s;
use vgpu_driver::allocation::{AllocatedDevice, ClaimAllocation};
use vgpu_driver::config::{API_VERSION, ConfigEntry, ConfigSource, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{Gpu, NodeRef, PoolOptions, PublishedDevice, Quantity};

fn hgx_h100() -> Vec<Gpu> {
    test_support::hgx(8, 80)
}

fn node() -> NodeRef {
    NodeRef {
        name: "gpu-node-1".into(),
        uid: "6c1f5a7e-1111-2222-3333-444455556666".into(),
    }
}

fn rendered(version: ApiVersion) -> Vec<serde_json::Value> {
    let mut objects = Vec::new();
    let mut opts = PoolOptions::new("vgpu.hami.io");
    opts.generation = 3;
    for slice in render_pool(&node(), &gpu_devices(&hgx_h100()).unwrap(), &opts).unwrap() {
        objects.push(name_it(wire(&slice, version), objects.len()));
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
        objects.push(name_it(wire(&slice, version), objects.len()));
    }
    // An empty pool.
    for slice in render_pool(&node(), &[], &opts).unwrap() {
        objects.push(name_it(wire(&slice, version), objects.len()));
    }
    objects
}

/// The object as `version` carries it, checked to convert back to itself.
fn wire<K: dra::DraObject + PartialEq>(object: &K, version: ApiVersion) -> serde_json::Value {
    let value = to_wire(object, version);
    assert_eq!(
        &from_wire::<K>(value.clone()).unwrap(),
        object,
        "{version} round trip"
    );
    value
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
            parameters:
                json!({"apiVersion": API_VERSION, "kind": KIND, "memory": "4Gi", "cores": 30})
                    .into(),
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

fn claim() -> v1::ResourceClaim {
    v1::ResourceClaim {
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
            allocation: Some(allocation().to_result()),
            ..Default::default()
        }),
    }
}

#[test]
fn v1beta1_slices_and_allocations_validate_against_kubernetes_1_32() {
    let mut objects = rendered(ApiVersion::V1beta1);
    objects.push(wire(&claim(), ApiVersion::V1beta1));
    validate_k8s(&objects, "1.32.0").unwrap();
    // And 1.33, which serves v1beta1 too.
    validate_k8s(&objects, "1.33.0").unwrap();
}

#[test]
fn v1_slices_and_allocations_validate_against_kubernetes_1_34() {
    let mut objects = rendered(ApiVersion::V1);
    objects.push(wire(&claim(), ApiVersion::V1));
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
    let opts = PoolOptions::new("vgpu.hami.io");
    let slices = render_pool(&node(), &devices, &opts).unwrap();
    let mut objects: Vec<serde_json::Value> = slices
        .iter()
        .enumerate()
        .map(|(i, s)| name_it(wire(s, ApiVersion::V1), i))
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
            allocation: Some(a.to_result()),
            ..Default::default()
        }),
    };
    let claim = wire(&claim, ApiVersion::V1);
    assert_eq!(
        claim["status"]["allocation"]["devices"]["results"][0]["consumedCapacity"]["memory"],
        "4Gi"
    );
    objects.push(claim);
    validate_k8s(&objects, "1.34.0").unwrap();
    // 1.33 has no consumable capacity: its v1beta1 rejects the fields that 1.34's accepts, so
    // the plugin must only publish them where the API has them.
    let beta = name_it(wire(&slices[0], ApiVersion::V1beta1), 0);
    validate_k8s(std::slice::from_ref(&beta), "1.34.0").unwrap();
    let report = validate_k8s(&[beta], "1.33.0").unwrap_err();
    assert!(
        report.contains("requestPolicy") || report.contains("allowMultipleAllocations"),
        "{report}"
    );
}
