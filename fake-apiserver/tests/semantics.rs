//! The fake behaves like the API server where our components depend on it, driven through
//! kube-rs exactly as they drive a real one.

use fake_apiserver::{FakeApiServer, Release};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceClaimStatus, ResourceSlice};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

fn slice(name: &str, node: &str) -> ResourceSlice {
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": name},
        "spec": {"driver": "vgpu.hami.io", "nodeName": node, "pool": {"name": node, "generation": 0, "resourceSliceCount": 1}}
    }))
    .unwrap()
}

fn claim(name: &str) -> ResourceClaim {
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "c"}}]}}
    }))
    .unwrap()
}

#[tokio::test]
async fn create_get_list_with_selectors_and_generate_name() {
    let server = FakeApiServer::for_release(Release::K8s134);
    let slices: Api<ResourceSlice> = Api::all(server.client());
    let a = slices
        .create(&PostParams::default(), &slice("a", "n1"))
        .await
        .unwrap();
    assert!(a.metadata.uid.is_some() && a.metadata.resource_version.is_some());
    let mut generated = slice("", "n2");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("n2-vgpu.hami.io-".into());
    let b = slices
        .create(&PostParams::default(), &generated)
        .await
        .unwrap();
    assert!(b.metadata.name.unwrap().starts_with("n2-vgpu.hami.io-"));
    let err = slices
        .create(&PostParams::default(), &slice("a", "n1"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"));
    let on_n1 = slices
        .list(&ListParams::default().fields("spec.nodeName=n1,spec.driver=vgpu.hami.io"))
        .await
        .unwrap();
    assert_eq!(on_n1.items.len(), 1);
    let err = slices
        .list(&ListParams::default().fields("spec.colour=red"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 400));
    assert_eq!(
        slices.get("a").await.unwrap().spec.node_name.as_deref(),
        Some("n1")
    );
    assert!(matches!(slices.get("zz").await.unwrap_err(), kube::Error::Api(s) if s.code == 404));
}

#[tokio::test]
async fn stale_updates_conflict_and_status_is_a_subresource() {
    let server = FakeApiServer::for_release(Release::K8s134);
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let created = claims
        .create(&PostParams::default(), &claim("c"))
        .await
        .unwrap();
    // The main resource ignores status.
    let mut with_status = created.clone();
    with_status.status = Some(ResourceClaimStatus {
        reserved_for: Some(vec![]),
        ..Default::default()
    });
    with_status.metadata.finalizers = Some(vec!["resource.kubernetes.io/delete-protection".into()]);
    let updated = claims
        .replace("c", &PostParams::default(), &with_status)
        .await
        .unwrap();
    assert!(updated.status.is_none());
    assert_eq!(updated.metadata.finalizers.as_ref().unwrap().len(), 1);
    // A write with the old resourceVersion conflicts.
    let err = claims
        .replace("c", &PostParams::default(), &created)
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"));
    // /status takes only status.
    let mut status_update = updated.clone();
    status_update.status = Some(ResourceClaimStatus {
        reserved_for: Some(vec![]),
        ..Default::default()
    });
    status_update.metadata.finalizers = None;
    let after = claims
        .replace_status("c", &PostParams::default(), &status_update)
        .await
        .unwrap();
    assert!(after.status.is_some());
    assert_eq!(
        after.metadata.finalizers.as_ref().unwrap().len(),
        1,
        "status writes keep metadata"
    );
    // Injected conflicts.
    server.inject_conflicts("/resourceclaims/c", 1);
    let err = claims
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
    let patched = claims
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.labels.unwrap()["x"], "y");
    assert!(
        server
            .writes()
            .iter()
            .any(|w| w.verb == "update" && w.path.ends_with("/status"))
    );
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let server = FakeApiServer::for_release(Release::K8s134);
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let mut c = claim("f");
    c.metadata.finalizers = Some(vec!["resource.kubernetes.io/delete-protection".into()]);
    claims.create(&PostParams::default(), &c).await.unwrap();
    claims.delete("f", &DeleteParams::default()).await.unwrap();
    let deleting = claims.get("f").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    claims
        .patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(matches!(claims.get("f").await.unwrap_err(), kube::Error::Api(s) if s.code == 404));
}

#[tokio::test]
async fn watchers_see_changes_in_order_and_survive_dropped_watches() {
    let server = FakeApiServer::for_release(Release::K8s134);
    let nodes: Api<Node> = Api::all(server.client());
    server.put_object(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
    );
    let mut stream = watcher(nodes.clone(), watcher::Config::default()).boxed();
    let mut seen = Vec::new();
    // Initial list: Init, InitApply(n1), InitDone.
    while let Some(event) = stream.next().await {
        match event.unwrap() {
            watcher::Event::InitApply(n) => seen.push(format!("init {}", n.metadata.name.unwrap())),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    server.put_object(
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2"}}),
    );
    if let Some(Ok(watcher::Event::Apply(n))) = stream.next().await {
        seen.push(format!("apply {}", n.metadata.name.unwrap()));
    }
    server.drop_watches();
    server.delete_object("v1", "nodes", "", "n1");
    // After the dropped watch the watcher re-lists or resumes; either way n1's deletion shows.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the watcher recovers")
            .unwrap()
            .unwrap();
        match event {
            watcher::Event::Delete(n) => {
                seen.push(format!("delete {}", n.metadata.name.unwrap()));
                break;
            }
            watcher::Event::InitApply(n) if n.metadata.name.as_deref() == Some("n2") => {}
            watcher::Event::InitDone => {
                // A re-list without n1 also reports its deletion to a reflector.
                seen.push("delete n1".into());
                break;
            }
            _ => {}
        }
    }
    assert_eq!(seen, vec!["init n1", "apply n2", "delete n1"]);
}

#[tokio::test]
async fn discovery_reports_the_release() {
    for (release, version) in [(Release::K8s132, "v1beta1"), (Release::K8s134, "v1")] {
        let server = FakeApiServer::for_release(release);
        let group = kube::discovery::group(&server.client(), "resource.k8s.io")
            .await
            .unwrap();
        let versions: Vec<&str> = group.versions().collect();
        assert_eq!(versions, vec![version]);
    }
}
