//! The API side through kube-rs against the fake API server: the exact slices published,
//! generation bumps, drift repair, and the API version chosen by discovery.

mod common;

use common::*;
use fake_apiserver::{DraVersions, Verb};
use serde_json::{Value, json};

fn slice_writes(h: &Harness) -> Vec<fake_apiserver::Write> {
    h.server
        .writes()
        .into_iter()
        .filter(|w| w.gvr.plural == "resourceslices")
        .collect()
}

fn devices(slice: &Value) -> Vec<String> {
    slice["spec"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn generation(slice: &Value) -> i64 {
    slice["spec"]["pool"]["generation"].as_i64().unwrap()
}

fn without_server_fields(mut v: Value) -> Value {
    let meta = v["metadata"].as_object_mut().unwrap();
    for k in [
        "name",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "generation",
        "managedFields",
    ] {
        meta.remove(k);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_slices_on_a_134_server_are_exact_and_valid() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-mixed.yaml")).await;
    let running = h.start().await;
    assert_eq!(running.api_version, dra::ApiVersion::V1);
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let writes = slice_writes(&h);
    assert_eq!(writes.len(), 1, "{writes:#?}");
    assert_eq!(writes[0].verb, Verb::Create);
    let slice = &writes[0].object;
    let gpu0 = json!({
        "name": "gpu-0",
        "attributes": {
            "architecture": {"string": "Ampere"},
            "cudaComputeCapability": {"version": "8.0.0"},
            "cudaDriverVersion": {"version": "12.4.0"},
            "driverVersion": {"version": "550.54.15"},
            "index": {"int": 0},
            "minor": {"int": 0},
            "multiprocessors": {"int": 108},
            "numaNode": {"int": 0},
            "nvlinkPeers": {"string": "1"},
            "productName": {"string": "NVIDIA A100 80GB PCIe"},
            "resource.kubernetes.io/pciBusID": {"string": "0000:17:00.0"},
            "type": {"string": "gpu"},
            "uuid": {"string": "GPU-8a1d3c52-0000-4b7e-a1f0-1c2d3e4f5a60"}
        },
        "capacity": {"cores": {"value": "100"}, "memory": {"value": "80Gi"}}
    });
    let expected = json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {
            "generateName": "node-a-vgpu.hami.io-",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": h.node_uid, "controller": true}]
        },
        "spec": {
            "driver": "vgpu.hami.io",
            "nodeName": "node-a",
            "pool": {"name": "node-a", "generation": 0, "resourceSliceCount": 1},
            "devices": slice["spec"]["devices"].clone()
        }
    });
    assert_eq!(without_server_fields(slice.clone()), expected);
    // The unhealthy T4 is left out (no device taints without the gate).
    assert_eq!(devices(slice), ["gpu-0", "gpu-1", "gpu-2"]);
    assert_eq!(slice["spec"]["devices"][0], gpu0);
    assert_eq!(
        slice["spec"]["devices"][2]["capacity"]["memory"]["value"],
        "46068Mi"
    );
    test_support::validate_k8s(std::slice::from_ref(slice), "1.34.0").unwrap();
    let text = running.metrics.encode();
    assert!(
        text.contains("vgpu_kubelet_plugin_published_devices 3"),
        "{text}"
    );
    assert!(text.contains("vgpu_kubelet_plugin_gpu_healthy{device=\"gpu-3\",uuid=\"GPU-c4f0a6b8-0003-4d2e-9f1a-2b3c4d5e6f70\"} 0"), "{text}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1beta1_slices_on_a_132_server_are_valid() {
    let h = Harness::new(
        DraVersions::V1beta1Only,
        &example("fake-gpus-hgx-h100.yaml"),
    )
    .await;
    let running = h.start().await;
    assert_eq!(running.api_version, dra::ApiVersion::V1beta1);
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let slice = h.slices().remove(0);
    assert_eq!(slice["apiVersion"], "resource.k8s.io/v1beta1");
    assert_eq!(slice["spec"]["devices"].as_array().unwrap().len(), 8);
    let d = &slice["spec"]["devices"][7];
    assert_eq!(d["name"], "gpu-7");
    assert_eq!(
        d["basic"]["attributes"]["nvlinkPeers"]["string"],
        "0,1,2,3,4,5,6"
    );
    assert_eq!(d["basic"]["capacity"]["memory"]["value"], "81559Mi");
    assert_eq!(
        slice["spec"]["pool"],
        json!({"name": "node-a", "generation": 0, "resourceSliceCount": 1})
    );
    test_support::validate_k8s(&[slice], "1.32.0").unwrap();
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_changes_bump_the_generation() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let uuid = "GPU-5f2c9a1e-0002-4a8b-9c3d-7e6f5a4b3c2d";
    h.write_inventory(&format!(
        "{}unhealthy:\n  {uuid}: \"Xid 79\"\n",
        example("fake-gpus-hgx-h100.yaml")
    ));
    h.eventually("gpu-2 removed", || {
        h.slices()
            .first()
            .is_some_and(|s| !devices(s).contains(&"gpu-2".to_string()))
    })
    .await;
    let slices = h.slices();
    assert_eq!(slices.len(), 1);
    assert_eq!(generation(&slices[0]), 1);
    assert_eq!(slices[0]["spec"]["pool"]["resourceSliceCount"], 1);
    assert_eq!(devices(&slices[0]).len(), 7);
    // The slice was updated in place, not replaced.
    let writes = slice_writes(&h);
    assert_eq!(
        writes.iter().map(|w| w.verb).collect::<Vec<_>>(),
        [Verb::Create, Verb::Update]
    );
    // Healthy again: back in, generation 2.
    running.gpus.mark_healthy(uuid);
    h.eventually("gpu-2 back", || {
        h.slices().first().is_some_and(|s| devices(s).len() == 8)
    })
    .await;
    assert_eq!(generation(&h.slices()[0]), 2);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_after_external_delete_and_edit() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let original = h.slices().remove(0);
    let name = original["metadata"]["name"].as_str().unwrap().to_string();
    h.server.wait_for_watches(1).await;

    // Someone (the kubelet at its restart) deletes the slice: it is put back.
    h.server.delete_object(h.slices_gvr(), "", &name).unwrap();
    h.eventually("the slice is back", || h.slices().len() == 1)
        .await;
    let back = h.slices().remove(0);
    assert_ne!(back["metadata"]["name"], original["metadata"]["name"]);
    assert_eq!(back["spec"]["devices"], original["spec"]["devices"]);
    assert!(generation(&back) > generation(&original));

    // Someone edits a device attribute: it is restored.
    let name = back["metadata"]["name"].as_str().unwrap().to_string();
    h.server
        .update_object(h.slices_gvr(), "", &name, |s| {
            s["spec"]["devices"][0]["attributes"]["productName"] = json!({"string": "Fake GPU"});
        })
        .unwrap();
    h.eventually("the edit is undone", || {
        h.slices().first().is_some_and(|s| {
            s["spec"]["devices"][0]["attributes"]["productName"]["string"]
                == "NVIDIA H100 80GB HBM3"
        })
    })
    .await;
    let repaired = h.slices().remove(0);
    assert_eq!(repaired["spec"]["devices"], original["spec"]["devices"]);
    assert!(generation(&repaired) > generation(&back));
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_slices_are_replaced_and_other_nodes_left_alone() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let stale = |name: &str, node: &str, generation: i64| {
        json!({
            "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": name},
            "spec": {"driver": "vgpu.hami.io", "nodeName": node,
                     "pool": {"name": node, "generation": generation, "resourceSliceCount": 2},
                     "devices": [{"name": "gpu-9"}]}
        })
    };
    for (name, node, generation) in [
        ("old-1", "node-a", 4),
        ("old-2", "node-a", 5),
        ("old-3", "node-a", 5),
        ("other", "node-b", 9),
    ] {
        h.server
            .put_object(h.slices_gvr(), stale(name, node, generation))
            .unwrap();
    }
    let running = h.start().await;
    // Deletes come before the update: wait for the end state, not the first single slice.
    h.eventually("one slice of node-a with the GPUs", || {
        let slices = h.slices();
        let mine: Vec<&Value> = slices
            .iter()
            .filter(|s| s["spec"]["nodeName"] == "node-a")
            .collect();
        mine.len() == 1 && devices(mine[0]).len() == 8
    })
    .await;
    let slices = h.slices();
    let mine: Vec<&Value> = slices
        .iter()
        .filter(|s| s["spec"]["nodeName"] == "node-a")
        .collect();
    assert_eq!(generation(mine[0]), 6, "a generation above every stale one");
    assert_eq!(mine[0]["spec"]["pool"]["resourceSliceCount"], 1);
    assert_eq!(devices(mine[0]).len(), 8);
    assert!(
        slices.iter().any(|s| s["metadata"]["name"] == "other"),
        "node-b's slice was touched"
    );
    let deleted: Vec<String> = slice_writes(&h)
        .into_iter()
        .filter(|w| w.verb == Verb::Delete)
        .map(|w| w.name)
        .collect();
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taint_mode_publishes_unhealthy_gpus_with_a_taint() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-mixed.yaml")).await;
    let mut cfg = h.config();
    cfg.taint_unhealthy = true;
    let running = h.start_with(cfg).await;
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let slice = h.slices().remove(0);
    assert_eq!(devices(&slice), ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]);
    assert_eq!(
        slice["spec"]["devices"][3]["taints"],
        json!([{"key": "vgpu.hami.io/unhealthy", "value": "Xid 79: GPU has fallen off the bus", "effect": "NoSchedule"}])
    );
    assert!(slice["spec"]["devices"][2].get("taints").is_none());
    test_support::validate_k8s(&[slice], "1.34.0").unwrap();
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_retries_after_api_errors() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    // The first two writes fail (a 409 and a 500): the publisher backs off and retries.
    h.server
        .inject_faults(h.slices_gvr(), 1, fake_apiserver::Fault::Conflict);
    h.server
        .inject_faults(h.slices_gvr(), 1, fake_apiserver::Fault::InternalError);
    let running = h.start().await;
    h.eventually("a published slice despite the errors", || {
        h.slices().len() == 1
    })
    .await;
    assert_eq!(devices(&h.slices()[0]).len(), 8);
    running.shutdown().await.unwrap();
}

fn native_config(h: &Harness) -> kubelet_plugin::plugin::PluginConfig {
    let mut cfg = h.config();
    cfg.sharing_mode = kubelet_plugin::publish::SharingMode::Native;
    cfg
}

fn fallback_events(h: &Harness) -> Vec<Value> {
    h.server
        .list(fake_apiserver::Gvr::new("events.k8s.io", "v1", "events"))
        .into_iter()
        .filter(|e| e["reason"] == "NativeSharingUnavailable")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_mode_publishes_shareable_gpus_with_request_policies() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start_with(native_config(&h)).await;
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let slice = h.slices().remove(0);
    let devices = slice["spec"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 8);
    for d in devices {
        assert_eq!(d["allowMultipleAllocations"], true, "{d}");
        assert!(d["capacity"]["memory"]["requestPolicy"].is_object(), "{d}");
        assert!(d["capacity"]["cores"]["requestPolicy"].is_object(), "{d}");
    }
    test_support::validate_k8s(&[slice], "1.34.0").unwrap();
    assert!(fallback_events(&h).is_empty());
    let text = running.metrics.encode();
    assert!(
        text.contains("vgpu_kubelet_plugin_sharing_mode{mode=\"native\"} 1"),
        "{text}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_mode_falls_back_when_the_api_server_drops_its_fields() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    // DRAConsumableCapacity off: the API server silently drops the alpha fields.
    h.server.drop_fields(
        h.slices_gvr(),
        &[
            "spec.devices[].allowMultipleAllocations",
            "spec.devices[].capacity.*.requestPolicy",
        ],
    );
    let running = h.start_with(native_config(&h)).await;
    h.eventually("a Warning Event on the Node", || {
        !fallback_events(&h).is_empty()
    })
    .await;
    let event = fallback_events(&h).remove(0);
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "Node");
    assert_eq!(event["regarding"]["name"], NODE);
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("DRAConsumableCapacity"),
        "{event}"
    );
    h.eventually("a controller-mode slice", || {
        h.slices().len() == 1
            && h.slices()[0]["spec"]["devices"]
                .as_array()
                .is_some_and(|d| {
                    d.len() == 8
                        && d.iter()
                            .all(|d| d.get("allowMultipleAllocations").is_none())
                })
    })
    .await;
    let text = running.metrics.encode();
    assert!(
        text.contains("vgpu_kubelet_plugin_sharing_mode{mode=\"controller\"} 1")
            && text.contains("vgpu_kubelet_plugin_sharing_mode{mode=\"native\"} 0"),
        "{text}"
    );
    assert_eq!(fallback_events(&h).len(), 1, "said once");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_mode_on_a_132_cluster_falls_back_at_once() {
    let h = Harness::new(
        DraVersions::V1beta1Only,
        &example("fake-gpus-hgx-h100.yaml"),
    )
    .await;
    let running = h.start_with(native_config(&h)).await;
    h.eventually("a Warning Event on the Node", || {
        !fallback_events(&h).is_empty()
    })
    .await;
    assert!(
        fallback_events(&h)[0]["note"]
            .as_str()
            .unwrap()
            .contains("1.34"),
    );
    h.eventually("a published slice", || h.slices().len() == 1)
        .await;
    let slice = h.slices().remove(0);
    test_support::validate_k8s(&[slice], "1.32.0").unwrap();
    running.shutdown().await.unwrap();
}
