//! Rendering a node's GPUs into ResourceSlices: attributes, capacities and request policies,
//! the API's limits, pools split at 128 devices, unhealthy devices.

use vgpu_driver::slice::*;
use vgpu_driver::{Gpu, NodeRef, PublishedDevice, Quantity, SliceView};

/// An H100 as NVML reports its memory (81559 MiB), from the shared fixtures.
fn gpu(index: u32) -> Gpu {
    let mut gpu = test_support::gpu(index);
    gpu.memory_bytes = 81559 << 20;
    gpu
}

fn node() -> NodeRef {
    NodeRef {
        name: "gpu-node-1".into(),
        uid: "6c1f5a7e-1111-2222-3333-444455556666".into(),
    }
}

#[test]
fn gpu_attributes_and_capacities() {
    let mut gpus = vec![gpu(0), gpu(1)];
    gpus[0].nvlink_peers = vec![gpus[1].uuid.clone()];
    let devices = gpu_devices(&gpus).unwrap();
    let d = &devices[0];
    assert_eq!(d.name, "gpu-0");
    assert_eq!(
        d.attributes["driverVersion"],
        AttributeValue::Version("560.35.3".into())
    );
    assert_eq!(
        d.attributes["cudaComputeCapability"],
        AttributeValue::Version("9.0.0".into())
    );
    assert_eq!(
        d.attributes["nvlinkPeers"],
        AttributeValue::String("1".into())
    );
    assert_eq!(
        d.attributes[PCI_BUS_ID_ATTRIBUTE],
        AttributeValue::String("0000:01:00.0".into())
    );
    assert_eq!(d.capacity["memory"].to_string(), "81559Mi");
    assert_eq!(d.capacity["cores"].to_string(), "100");
    assert_eq!(nvlink_peer_names(d), vec!["gpu-1".to_string()]);
    assert!(!devices[1].attributes.contains_key("nvlinkPeers"));
}

#[test]
fn bad_versions_name_the_device_and_attribute() {
    let mut g = gpu(3);
    g.driver_version = "r560".into();
    let err = gpu_devices(&[g]).unwrap_err().to_string();
    assert!(
        err.contains("gpu-3") && err.contains("driverVersion"),
        "{err}"
    );
}

#[test]
fn limits_are_enforced() {
    let mut d = gpu_devices(&[gpu(0)]).unwrap().remove(0);
    for i in 0..40 {
        d.attributes
            .insert(format!("extra{i}"), AttributeValue::Int(i));
    }
    assert!(
        validate_device(&d)
            .unwrap_err()
            .to_string()
            .contains("exceed the limit of 32")
    );
    let mut d = gpu_devices(&[gpu(0)]).unwrap().remove(0);
    d.attributes
        .insert("long".into(), AttributeValue::String("x".repeat(65)));
    assert!(validate_device(&d).is_err());
    let mut d = gpu_devices(&[gpu(0)]).unwrap().remove(0);
    d.attributes
        .insert("bad-name".into(), AttributeValue::Int(1));
    assert!(validate_device(&d).is_err());
    let mut d = gpu_devices(&[gpu(0)]).unwrap().remove(0);
    d.name = "GPU_0".into();
    assert!(validate_device(&d).is_err());
    let mut long = gpu(0);
    long.product_name = "é".repeat(40);
    let d = gpu_devices(&[long]).unwrap().remove(0);
    match &d.attributes["productName"] {
        AttributeValue::String(s) => assert!(s.len() <= 64 && s.len() >= 62),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pools_split_at_128_devices_with_consistent_counts() {
    let devices: Vec<PublishedDevice> = (0..300)
        .map(|i| PublishedDevice {
            name: format!("gpu-{i}"),
            capacity: [("memory".to_string(), Quantity::from_units(1 << 30))].into(),
            ..Default::default()
        })
        .collect();
    {
        let mut opts = PoolOptions::new("vgpu.hami.io");
        opts.generation = 7;
        let slices = render_pool(&node(), &devices, &opts).unwrap();
        assert_eq!(slices.len(), 3);
        let views: Vec<SliceView> = slices.iter().map(SliceView::of).collect();
        assert_eq!(
            views.iter().map(|v| v.devices.len()).collect::<Vec<_>>(),
            vec![128, 128, 44]
        );
        assert!(
            views
                .iter()
                .all(|v| v.resource_slice_count == 3 && v.generation == 7)
        );
        assert!(
            views
                .iter()
                .all(|v| v.pool == "gpu-node-1" && v.node_name.as_deref() == Some("gpu-node-1"))
        );
        let back: Vec<PublishedDevice> = views
            .into_iter()
            .flat_map(|v| v.devices)
            .map(|d| (*d).clone())
            .collect();
        assert_eq!(back, devices);
    }
}

#[test]
fn unhealthy_devices_are_left_out_or_tainted() {
    let mut devices = gpu_devices(&[gpu(0), gpu(1)]).unwrap();
    devices[1].unhealthy = Some("Xid 79: GPU has fallen off the bus".into());
    let mut opts = PoolOptions::new("vgpu.hami.io");
    let slices = render_pool(&node(), &devices, &opts).unwrap();
    assert_eq!(SliceView::of(&slices[0]).devices.len(), 1);
    opts.taint_unhealthy = true;
    let slices = render_pool(&node(), &devices, &opts).unwrap();
    let view = SliceView::of(&slices[0]);
    assert_eq!(view.devices.len(), 2);
    assert_eq!(view.devices[1].unhealthy, devices[1].unhealthy);
}

#[test]
fn native_sharing_publishes_request_policies() {
    let mut devices = gpu_devices(&[gpu(0)]).unwrap();
    devices[0].allow_multiple_allocations = true;
    let opts = PoolOptions::new("vgpu.hami.io");
    let slices = render_pool(&node(), &devices, &opts).unwrap();
    let json = serde_json::to_value(&slices[0]).unwrap();
    let d = &json["spec"]["devices"][0];
    assert_eq!(d["allowMultipleAllocations"], true);
    assert_eq!(
        d["capacity"]["memory"]["requestPolicy"]["validRange"]["step"],
        "256Mi"
    );
    assert_eq!(d["capacity"]["memory"]["value"], "81559Mi");
    assert_eq!(
        d["capacity"]["memory"]["requestPolicy"]["validRange"]["max"],
        "81408Mi"
    );
    assert_eq!(
        d["capacity"]["cores"]["requestPolicy"]["validRange"]["min"],
        "1"
    );
    // The API requires a default with a range, and max and default a whole number of steps
    // above min (a real 1.34 API server refused the slice otherwise): the largest share,
    // 318 steps of 256 MiB of the 81559 MiB, and all the cores.
    assert_eq!(
        d["capacity"]["memory"]["requestPolicy"]["default"],
        "81408Mi"
    );
    assert_eq!(d["capacity"]["cores"]["requestPolicy"]["default"], "100");
    let seen: Vec<PublishedDevice> = SliceView::of(&slices[0])
        .devices
        .iter()
        .map(|d| (**d).clone())
        .collect();
    assert_eq!(seen, devices);
    // Without native sharing no policy and no flag are published.
    let plain = serde_json::to_value(
        &render_pool(&node(), &gpu_devices(&[gpu(0)]).unwrap(), &opts).unwrap()[0],
    )
    .unwrap();
    assert!(
        plain["spec"]["devices"][0]
            .get("allowMultipleAllocations")
            .is_none()
    );
    assert!(
        plain["spec"]["devices"][0]["capacity"]["memory"]
            .get("requestPolicy")
            .is_none()
    );
}

#[test]
fn empty_node_still_publishes_one_slice() {
    let opts = PoolOptions::new("vgpu.hami.io");
    let slices = render_pool(&node(), &[], &opts).unwrap();
    assert_eq!(slices.len(), 1);
    assert_eq!(SliceView::of(&slices[0]).resource_slice_count, 1);
}

#[test]
fn refuses_bad_driver_pool_and_duplicates() {
    let devices = gpu_devices(&[gpu(0)]).unwrap();
    let opts = PoolOptions::new("Not_A_Driver");
    assert!(matches!(
        render_pool(&node(), &devices, &opts),
        Err(SliceError::DriverName(_))
    ));
    let opts = PoolOptions::new("vgpu.hami.io");
    let bad_node = NodeRef {
        name: "Node_1".into(),
        uid: "x".into(),
    };
    assert!(matches!(
        render_pool(&bad_node, &devices, &opts),
        Err(SliceError::PoolName(_))
    ));
    let dup = vec![devices[0].clone(), devices[0].clone()];
    assert!(matches!(
        render_pool(&node(), &dup, &opts),
        Err(SliceError::DuplicateDevice(_))
    ));
}
