//! The shipped RBAC grants the plugin exactly what its code calls: every API request the plugin
//! makes in a full life (publishing, drift repair, stale slices, prepare, unprepare, and a
//! native-mode start on a cluster that drops its fields) is allowed by
//! `deploy/base/rbac-plugin.yaml`, and every rule there is used.

mod common;

use common::*;
use fake_apiserver::{DraVersions, Verb};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use vgpu_proto::dra::v1;

/// (apiGroup, resource[/subresource], verb), as RBAC names them.
type Permission = (String, String, String);

fn verb_name(v: &Verb) -> &'static str {
    match v {
        Verb::Get => "get",
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Create => "create",
        Verb::Update => "update",
        Verb::Patch => "patch",
        Verb::Delete => "delete",
        Verb::DeleteCollection => "deletecollection",
    }
}

/// The RBAC permission a request path needs; None for discovery, which every authenticated
/// user may read (system:discovery).
fn permission(verb: &Verb, path: &str) -> Option<Permission> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return None,
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let resource = match rest {
        [resource] | [resource, _] => resource.to_string(),
        [resource, _, sub] => format!("{resource}/{sub}"),
        _ => return None,
    };
    Some((group.to_string(), resource, verb_name(verb).to_string()))
}

fn granted() -> BTreeSet<Permission> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/base/rbac-plugin.yaml"
    ))
    .unwrap();
    let mut out = BTreeSet::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
        if doc["kind"] != "ClusterRole" {
            continue;
        }
        for rule in doc["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for resource in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        out.insert((
                            group.as_str().unwrap().into(),
                            resource.as_str().unwrap().into(),
                            verb.as_str().unwrap().into(),
                        ));
                    }
                }
            }
        }
    }
    out
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

    let used: BTreeSet<Permission> = h
        .server
        .request_counts()
        .keys()
        .chain(native.server.request_counts().keys())
        .filter_map(|(verb, path)| permission(verb, path))
        .collect();
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

#[test]
fn paths_map_to_rbac_permissions() {
    let p = |v, path| permission(&v, path);
    assert_eq!(
        p(Verb::Get, "/api/v1/nodes/n1"),
        Some(("".into(), "nodes".into(), "get".into()))
    );
    assert_eq!(
        p(
            Verb::Update,
            "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/c/status"
        ),
        Some((
            "resource.k8s.io".into(),
            "resourceclaims/status".into(),
            "update".into()
        ))
    );
    assert_eq!(
        p(Verb::List, "/apis/resource.k8s.io/v1/resourceslices"),
        Some((
            "resource.k8s.io".into(),
            "resourceslices".into(),
            "list".into()
        ))
    );
    assert_eq!(p(Verb::Get, "/apis/resource.k8s.io/v1"), None);
    assert_eq!(p(Verb::Get, "/apis"), None);
}
