//! The shipped RBAC grants the plugin exactly what its code calls: every API request the plugin
//! makes in a full life (publishing, drift repair, stale slices, prepare, unprepare, and a
//! native-mode start on a cluster that drops its fields) is allowed by
//! the shipped installation (`deploy/manifests/vgpu-dra.yaml`, the Helm chart rendered) to the
//! plugin's ServiceAccount, and every rule there is used.

mod common;

use common::*;
use fake_apiserver::DraVersions;
use fake_apiserver::rbac::{self, Permission, granted_to};
use kubelet_plugin::uninstall::DaemonSetState;
use serde_json::json;
use std::collections::BTreeSet;
use vgpu_proto::dra::v1;

fn granted() -> BTreeSet<Permission> {
    granted_to(
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/manifests/vgpu-dra.yaml"
        )),
        "vgpu-kubelet-plugin",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_what_the_plugin_calls() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    // Two slices left by an earlier run: the plugin reuses one and deletes the other.
    for name in ["stale-a", "stale-b"] {
        h.server
            .put_object(
                h.slices_gvr(),
                json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": {"name": name},
                       "spec": {"driver": DRIVER, "nodeName": NODE, "pool": {"name": NODE, "generation": 0, "resourceSliceCount": 2}}}),
            )
            .unwrap();
    }
    let running = h.start().await;
    h.eventually("one slice with our GPUs", || {
        let slices = h.slices();
        slices.len() == 1
            && slices[0]["spec"]["devices"]
                .as_array()
                .is_some_and(|d| d.len() == 8)
    })
    .await;
    // Someone edits our slice: the plugin puts it back.
    let ours = h.slices()[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    h.server
        .update_object(h.slices_gvr(), "", &ours, |s| {
            s["spec"]["devices"] = json!([])
        })
        .unwrap();
    h.eventually("the edit repaired", || {
        h.slices().iter().any(|s| {
            s["spec"]["devices"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
        })
    })
    .await;
    // Someone deletes it: the plugin creates it again.
    h.server.delete_object(h.slices_gvr(), "", &ours).unwrap();
    h.eventually("the deleted slice recreated", || {
        h.slices()
            .iter()
            .any(|s| s["metadata"]["name"] != ours.as_str())
    })
    .await;
    // Prepare and unprepare a claim.
    let uid = h.put_claim(&ClaimSpec::sliced("c", &["gpu-0"], "4Gi", 30));
    let answer = h
        .v1()
        .await
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![v1_claim(&uid, "c")],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        answer.claims[&uid].error.is_empty(),
        "{:?}",
        answer.claims[&uid]
    );
    h.v1()
        .await
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![v1_claim(&uid, "c")],
        })
        .await
        .unwrap();
    running.shutdown().await.unwrap();
    // With --daemonset-name, on SIGTERM: is this an uninstall? (it reads its DaemonSet)
    h.server.register(fake_apiserver::ResourceKind::new(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        true,
        true,
    ));
    let ds_state = || {
        kubelet_plugin::uninstall::daemonset_state(
            h.server.client(),
            "vgpu-system",
            "vgpu-kubelet-plugin",
        )
    };
    assert_eq!(ds_state().await, DaemonSetState::Gone);
    h.server
        .put_object(
            fake_apiserver::Gvr::new("apps", "v1", "daemonsets"),
            json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
                   "metadata": {"name": "vgpu-kubelet-plugin", "namespace": "vgpu-system"},
                   "spec": {"selector": {"matchLabels": {"app": "p"}},
                            "template": {"metadata": {"labels": {"app": "p"}},
                                         "spec": {"containers": [{"name": "p", "image": "p"}]}}}}),
        )
        .unwrap();
    assert_eq!(ds_state().await, DaemonSetState::Present);
    // ...and watches it from the start (list and watch by name), so that a deletion is known
    // even when RBAC is gone by SIGTERM.
    let watch = kubelet_plugin::uninstall::DaemonSetWatch::start(
        h.server.client(),
        "vgpu-system",
        "vgpu-kubelet-plugin",
    );
    h.eventually("the watch to list the DaemonSet", || {
        watch.last() == DaemonSetState::Present
    })
    .await;
    h.server
        .delete_object(
            fake_apiserver::Gvr::new("apps", "v1", "daemonsets"),
            "vgpu-system",
            "vgpu-kubelet-plugin",
        )
        .unwrap();
    h.eventually("the watch to see the DaemonSet deleted", || {
        watch.last() == DaemonSetState::Gone
    })
    .await;
    drop(watch);

    // Native mode where DRAConsumableCapacity is off: the fallback and its Event.
    let native = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    native.server.drop_fields(
        native.slices_gvr(),
        &["spec.devices[].allowMultipleAllocations"],
    );
    let mut cfg = native.config();
    cfg.sharing_mode = kubelet_plugin::publish::SharingMode::Native;
    let running = native.start_with(cfg).await;
    native
        .eventually("the fallback Event", || {
            !native
                .server
                .list(fake_apiserver::Gvr::new("events.k8s.io", "v1", "events"))
                .is_empty()
        })
        .await;
    running.shutdown().await.unwrap();

    let mut used = rbac::used(&h.server);
    used.extend(rbac::used(&native.server));
    let granted = granted();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "the plugin calls what its RBAC does not grant: {missing:?}"
    );
    let unused: Vec<_> = granted.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "the RBAC grants what the plugin never calls: {unused:?} (used: {used:?})"
    );
}
