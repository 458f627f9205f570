//! The fake driven through kube-rs exactly as our components drive a real API server.

use fake_apiserver::{DraVersions, FakeApiServer, Fault, Gvr, ResourceKind, Verb};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use k8s_openapi::api::resource::v1beta1;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, ResourceExt,
    WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

async fn server() -> FakeApiServer {
    FakeApiServer::start_with_builtin(DraVersions::V1Only)
        .await
        .expect("start the fake API server")
}

fn slice(name: &str, node: &str) -> ResourceSlice {
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
        "metadata": {"name": name, "labels": {"node": node}},
        "spec": {"driver": "vgpu.hami.io", "nodeName": node,
                 "pool": {"name": node, "generation": 1, "resourceSliceCount": 1}}
    }))
    .unwrap()
}

fn claim(name: &str) -> ResourceClaim {
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "vgpu"}}]}}
    }))
    .unwrap()
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"pool": "a"}}})).unwrap()
}

fn reserved_for(pod: &str) -> Value {
    json!({"reservedFor": [{"resource": "pods", "name": pod, "uid": format!("uid-{pod}")}]})
}

/// The API error kube-rs reports, or a panic naming what came back instead.
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next<S, T>(stream: &mut S) -> T
where
    S: futures::Stream<Item = T> + Unpin,
{
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event within the timeout")
        .expect("the stream has not ended")
}

#[tokio::test]
async fn create_get_and_list_with_selectors() {
    let server = server().await;
    let slices: Api<ResourceSlice> = Api::all(server.client());
    let pp = PostParams::default();
    let a = slices.create(&pp, &slice("a", "n1")).await.unwrap();
    assert!(a.metadata.uid.as_deref().is_some_and(|u| u.len() == 36));
    assert_eq!(a.metadata.generation, Some(1));
    assert!(a.metadata.creation_timestamp.is_some());
    let mut generated = slice("", "n2");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("n2-vgpu.hami.io-".into());
    let b = slices.create(&pp, &generated).await.unwrap();
    let b_name = b.metadata.name.clone().unwrap();
    assert!(b_name.starts_with("n2-vgpu.hami.io-") && b_name.len() == 21);
    assert!(
        a.metadata.resource_version.unwrap().parse::<u64>().unwrap()
            < b.metadata.resource_version.unwrap().parse::<u64>().unwrap()
    );

    assert_eq!(
        api_error(slices.create(&pp, &slice("a", "n1")).await),
        (409, "AlreadyExists".into())
    );
    assert_eq!(
        api_error(slices.get("nope").await),
        (404, "NotFound".into())
    );
    let got = slices.get("a").await.unwrap();
    assert_eq!(got.spec.node_name.as_deref(), Some("n1"));

    let names = |list: kube::core::ObjectList<ResourceSlice>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|s| s.metadata.name.unwrap())
            .collect()
    };
    let on_n1 = slices
        .list(&ListParams::default().fields("spec.nodeName=n1,spec.driver=vgpu.hami.io"))
        .await
        .unwrap();
    assert_eq!(names(on_n1), ["a"]);
    let not_n1 = slices
        .list(&ListParams::default().fields("spec.nodeName!=n1"))
        .await
        .unwrap();
    assert_eq!(names(not_n1), std::slice::from_ref(&b_name));
    let by_name = slices
        .list(&ListParams::default().fields(&format!("metadata.name={b_name}")))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let labelled = slices
        .list(&ListParams::default().labels("node in (n1,n3),node"))
        .await
        .unwrap();
    assert_eq!(names(labelled), ["a"]);
    let unlabelled = slices
        .list(&ListParams::default().labels("!node"))
        .await
        .unwrap();
    assert!(unlabelled.items.is_empty());

    assert_eq!(
        api_error(
            slices
                .list(&ListParams::default().fields("spec.colour=red"))
                .await
        ),
        (400, "BadRequest".into())
    );
    assert_eq!(
        api_error(
            slices
                .list(&ListParams::default().labels("node in (n1"))
                .await
        ),
        (400, "BadRequest".into())
    );
    // spec.nodeName is a ResourceSlice field selector, not a ResourceClaim one.
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    assert_eq!(
        api_error(
            claims
                .list(&ListParams::default().fields("spec.nodeName=n1"))
                .await
        ),
        (400, "BadRequest".into())
    );
}

#[tokio::test]
async fn list_pages_with_limit_and_continue() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    for i in 0..5 {
        nodes
            .create(&PostParams::default(), &node(&format!("n{i}")))
            .await
            .unwrap();
    }
    let first = nodes.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().expect("a continue token");
    let rest = nodes
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<_> = first
        .items
        .iter()
        .chain(&rest.items)
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n4"]);
    assert!(rest.metadata.continue_.is_none());
    // kube-runtime's watcher pages too; it must see every object.
    let seen: Vec<_> = watcher(nodes, watcher::Config::default().page_size(2))
        .take_while(|e| futures::future::ready(!matches!(e, Ok(watcher::Event::InitDone))))
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let applied = seen
        .iter()
        .filter(|e| matches!(e, watcher::Event::InitApply(_)))
        .count();
    assert_eq!(applied, 5);
}

#[tokio::test]
async fn update_with_a_stale_resource_version_is_a_conflict() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    let pp = PostParams::default();
    let created = nodes.create(&pp, &node("n1")).await.unwrap();

    let mut fresh = created.clone();
    fresh.spec = Some(serde_json::from_value(json!({"unschedulable": true})).unwrap());
    let updated = nodes.replace("n1", &pp, &fresh).await.unwrap();
    assert_ne!(
        updated.metadata.resource_version,
        created.metadata.resource_version
    );
    assert_eq!(updated.metadata.generation, Some(2));

    // `created` still carries the old resourceVersion.
    let err = nodes.replace("n1", &pp, &created).await;
    match err {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
            assert!(status.message.contains("the object has been modified"));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        server.get_as::<Node>("", "n1").unwrap().unwrap().spec,
        updated.spec
    );

    // No resourceVersion: an unconditional update.
    let mut unconditional = updated.clone();
    unconditional.metadata.resource_version = None;
    unconditional
        .metadata
        .labels
        .get_or_insert_default()
        .insert("x".into(), "y".into());
    let forced = nodes.replace("n1", &pp, &unconditional).await.unwrap();
    assert_eq!(forced.labels().get("x").map(String::as_str), Some("y"));
    // Labels are metadata: the generation stays.
    assert_eq!(forced.metadata.generation, Some(2));

    // Writing the same object again changes nothing, not even the resourceVersion.
    let same = nodes.replace("n1", &pp, &forced).await.unwrap();
    assert_eq!(
        same.metadata.resource_version,
        forced.metadata.resource_version
    );

    // The name in the body must be the one in the URL.
    let mut renamed = forced.clone();
    renamed.metadata.name = Some("n2".into());
    assert_eq!(
        api_error(nodes.replace("n1", &pp, &renamed).await),
        (400, "BadRequest".into())
    );
}

#[tokio::test]
async fn status_is_a_subresource() {
    let server = server().await;
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let pp = PostParams::default();
    let mut with_status = claim("c");
    with_status.status = Some(serde_json::from_value(reserved_for("sneaky")).unwrap());
    let created = claims.create(&pp, &with_status).await.unwrap();
    assert!(created.status.is_none(), "status is dropped on create");

    // The main resource ignores status...
    let mut main = created.clone();
    main.status = Some(serde_json::from_value(reserved_for("p1")).unwrap());
    main.spec
        .devices
        .as_mut()
        .unwrap()
        .requests
        .as_mut()
        .unwrap()[0]
        .name = "gpu2".into();
    let replaced = claims.replace("c", &pp, &main).await.unwrap();
    assert!(replaced.status.is_none());
    assert_eq!(replaced.metadata.generation, Some(2));

    // ...and the status subresource takes only status.
    let mut status_write = replaced.clone();
    status_write.status = Some(serde_json::from_value(reserved_for("p1")).unwrap());
    status_write
        .spec
        .devices
        .as_mut()
        .unwrap()
        .requests
        .as_mut()
        .unwrap()[0]
        .name = "ignored".into();
    status_write
        .metadata
        .labels
        .get_or_insert_default()
        .insert("ignored".into(), "yes".into());
    let after = claims
        .replace_status("c", &pp, &status_write)
        .await
        .unwrap();
    assert_eq!(
        after
            .status
            .as_ref()
            .unwrap()
            .reserved_for
            .as_ref()
            .unwrap()[0]
            .name,
        "p1"
    );
    assert_eq!(
        after
            .spec
            .devices
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()[0]
            .name,
        "gpu2"
    );
    assert!(after.metadata.labels.is_none());
    assert_eq!(after.metadata.generation, Some(2), "status does not count");

    // A stale status write conflicts like any other.
    assert_eq!(
        api_error(claims.replace_status("c", &pp, &replaced).await),
        (409, "Conflict".into())
    );

    let patched = claims
        .patch_status(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": reserved_for("p2"), "spec": null})),
        )
        .await
        .unwrap();
    assert_eq!(patched.status.unwrap().reserved_for.unwrap()[0].name, "p2");
    assert_eq!(
        patched.spec.devices.unwrap().requests.unwrap()[0].name,
        "gpu2"
    );
    let stored: ResourceClaim = server.get_as("ml", "c").unwrap().unwrap();
    assert_eq!(stored.status.unwrap().reserved_for.unwrap()[0].name, "p2");

    let writes = server.writes();
    let subresources: Vec<_> = writes
        .iter()
        .map(|w| (w.verb, w.subresource.as_deref()))
        .collect();
    assert_eq!(
        subresources,
        [
            (Verb::Create, None),
            (Verb::Update, None),
            (Verb::Update, Some("status")),
            (Verb::Patch, Some("status")),
        ]
    );
}

#[tokio::test]
async fn finalizers_hold_a_deletion_until_the_last_is_removed() {
    let server = server().await;
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let mut held = claim("held");
    held.metadata.finalizers = Some(vec!["a/x".into(), "b/y".into()]);
    claims.create(&PostParams::default(), &held).await.unwrap();

    let pending = claims
        .delete("held", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the object, still there");
    assert!(pending.metadata.deletion_timestamp.is_some());
    let still = claims.get("held").await.unwrap();
    assert_eq!(
        still.metadata.deletion_timestamp,
        pending.metadata.deletion_timestamp
    );

    // No new finalizers once deleting.
    let add = Patch::Merge(json!({"metadata": {"finalizers": ["a/x", "b/y", "c/z"]}}));
    assert_eq!(
        api_error(claims.patch("held", &PatchParams::default(), &add).await),
        (422, "Invalid".into())
    );
    // Deleting again changes nothing.
    let again = claims
        .delete("held", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        still.metadata.resource_version
    );

    let one_left = Patch::Merge(json!({"metadata": {"finalizers": ["b/y"]}}));
    claims
        .patch("held", &PatchParams::default(), &one_left)
        .await
        .unwrap();
    assert!(claims.get_opt("held").await.unwrap().is_some());
    let none_left = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    claims
        .patch("held", &PatchParams::default(), &none_left)
        .await
        .unwrap();
    assert!(claims.get_opt("held").await.unwrap().is_none());
    assert!(
        server
            .get(Gvr::of::<ResourceClaim>(), "ml", "held")
            .is_none()
    );

    // Without finalizers the object goes at once and the answer is a Success status.
    claims
        .create(&PostParams::default(), &claim("free"))
        .await
        .unwrap();
    let status = claims
        .delete("free", &DeleteParams::default())
        .await
        .unwrap()
        .right()
        .expect("a status");
    assert_eq!(status.details.unwrap().name, "free");
    assert_eq!(
        api_error(claims.delete("free", &DeleteParams::default()).await),
        (404, "NotFound".into())
    );
}

#[tokio::test]
async fn delete_preconditions_are_honoured() {
    let server = server().await;
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let created = claims
        .create(&PostParams::default(), &claim("c"))
        .await
        .unwrap();
    let wrong_uid = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("not-the-uid".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    assert_eq!(
        api_error(claims.delete("c", &wrong_uid).await),
        (409, "Conflict".into())
    );
    let stale_rv = DeleteParams {
        preconditions: Some(Preconditions {
            uid: created.metadata.uid.clone(),
            resource_version: Some("1".into()),
        }),
        ..DeleteParams::default()
    };
    claims
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"bump": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        api_error(claims.delete("c", &stale_rv).await),
        (409, "Conflict".into())
    );
    assert!(claims.get_opt("c").await.unwrap().is_some());
    let current = claims.get("c").await.unwrap();
    let right = DeleteParams {
        preconditions: Some(Preconditions {
            uid: current.metadata.uid.clone(),
            resource_version: current.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    claims.delete("c", &right).await.unwrap();
    assert!(claims.get_opt("c").await.unwrap().is_none());
}

#[tokio::test]
async fn merge_json_and_apply_patches() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let pp = PatchParams::default();

    let merged = nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"pool": null, "zone": "z1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged
            .metadata
            .labels
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        [("zone".to_string(), "z1".to_string())]
    );

    let strategic = nodes
        .patch(
            "n1",
            &pp,
            &Patch::Strategic(json!({"spec": {"podCIDR": "10.0.0.0/24"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        strategic.spec.unwrap().pod_cidr.as_deref(),
        Some("10.0.0.0/24")
    );

    // kube-rs only builds JSON patches with its `jsonpatch` feature; send one by hand.
    let json_patch = |ops: Value| {
        let request = http::Request::builder()
            .method("PATCH")
            .uri("/api/v1/nodes/n1")
            .header("content-type", "application/json-patch+json")
            .body(serde_json::to_vec(&ops).unwrap())
            .unwrap();
        let client = server.client();
        async move { client.request::<Node>(request).await }
    };
    let patched = json_patch(json!([
        {"op": "test", "path": "/metadata/labels/zone", "value": "z1"},
        {"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}},
    ]))
    .await
    .unwrap();
    assert_eq!(
        patched.annotations().get("a").map(String::as_str),
        Some("b")
    );
    let failing = json_patch(json!([
        {"op": "test", "path": "/metadata/labels/zone", "value": "elsewhere"},
    ]));
    assert_eq!(api_error(failing.await), (422, "Invalid".into()));

    // A patch that carries a stale resourceVersion is refused.
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"z": "1"}}}));
    assert_eq!(
        api_error(nodes.patch("n1", &pp, &stale).await),
        (409, "Conflict".into())
    );

    // Server-side apply creates what is missing and merges into what exists.
    let apply = PatchParams::apply("test-manager");
    let applied = nodes
        .patch(
            "n2",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Node",
                                 "metadata": {"name": "n2", "labels": {"a": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.metadata.generation, Some(1));
    let reapplied = nodes
        .patch(
            "n2",
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Node",
                                 "metadata": {"name": "n2", "labels": {"b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(reapplied.labels().len(), 2);
    assert_eq!(reapplied.metadata.uid, applied.metadata.uid);
    assert_eq!(
        api_error(
            nodes
                .patch("missing", &pp, &Patch::Merge(json!({"metadata": {}})))
                .await
        ),
        (404, "NotFound".into())
    );
}

#[tokio::test]
async fn watch_reports_changes_in_order_and_replays_from_a_resource_version() {
    let server = server().await;
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let mut live = claims
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let created = claims
        .create(&PostParams::default(), &claim("c"))
        .await
        .unwrap();
    let start_rv = created.metadata.resource_version.clone().unwrap();
    claims
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"l": "1"}}})),
        )
        .await
        .unwrap();
    claims.delete("c", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        match next(&mut live).await.unwrap() {
            WatchEvent::Added(c) => seen.push(("ADDED", c.metadata.resource_version)),
            WatchEvent::Modified(c) => seen.push(("MODIFIED", c.metadata.resource_version)),
            WatchEvent::Deleted(c) => seen.push(("DELETED", c.metadata.resource_version)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let kinds: Vec<_> = seen.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    let rvs: Vec<u64> = seen
        .iter()
        .map(|(_, rv)| rv.as_ref().unwrap().parse().unwrap())
        .collect();
    assert!(rvs.windows(2).all(|w| w[0] < w[1]), "{rvs:?}");

    // Replay: everything after the creation.
    let mut replay = claims
        .watch(&WatchParams::default(), &start_rv)
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut replay).await.unwrap(),
        WatchEvent::Modified(_)
    ));
    assert!(matches!(
        next(&mut replay).await.unwrap(),
        WatchEvent::Deleted(_)
    ));

    // Another namespace sees none of it.
    let other: Api<ResourceClaim> = Api::namespaced(server.client(), "other");
    let mut elsewhere = other
        .watch(&WatchParams::default().timeout(1), &start_rv)
        .await
        .unwrap()
        .boxed();
    match next(&mut elsewhere).await.unwrap() {
        WatchEvent::Bookmark(_) => {}
        other => panic!("expected only the timeout bookmark, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, elsewhere.next())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn watch_selectors_turn_label_changes_into_added_and_deleted() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    let mut gpu = nodes
        .watch(&WatchParams::default().labels("gpu=yes"), "0")
        .await
        .unwrap()
        .boxed();
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let label = |v: Option<&str>| Patch::Merge(json!({"metadata": {"labels": {"gpu": v}}}));
    let pp = PatchParams::default();
    nodes.patch("n1", &pp, &label(Some("yes"))).await.unwrap();
    nodes.patch("n1", &pp, &label(None)).await.unwrap();
    match next(&mut gpu).await.unwrap() {
        WatchEvent::Added(n) => assert_eq!(n.labels().get("gpu").unwrap(), "yes"),
        other => panic!("expected ADDED on entering the selector, got {other:?}"),
    }
    assert!(matches!(
        next(&mut gpu).await.unwrap(),
        WatchEvent::Deleted(_)
    ));
}

#[tokio::test]
async fn watch_times_out_with_a_bookmark() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let rv = server.resource_version().to_string();
    let started = Instant::now();
    let events: Vec<_> = nodes
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        Ok(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // Without bookmarks the stream just ends.
    let events: Vec<_> = nodes
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn watcher_continues_after_dropped_watches_and_relists_after_compaction() {
    let server = server().await;
    let slices: Api<ResourceSlice> = Api::all(server.client());
    let pp = PostParams::default();
    slices.create(&pp, &slice("s0", "n0")).await.unwrap();
    let mut events = watcher(slices.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitApply(_)
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));

    let applied = |event: watcher::Event<ResourceSlice>| match event {
        watcher::Event::Apply(s) => s.metadata.name.unwrap(),
        other => panic!("expected Apply, got {other:?}"),
    };
    // The watcher only asks for its watch when polled, so poll while writing.
    let s1 = slice("s1", "n1");
    let create = slices.create(&pp, &s1);
    let (event, created) = tokio::join!(next(&mut events), create);
    created.unwrap();
    assert_eq!(applied(event.unwrap()), "s1");
    assert_eq!(server.open_watches(), 1);

    // The watch drops; the watcher re-watches from where it was and misses nothing, even a
    // change made while no watch was open.
    server.drop_watches();
    slices.create(&pp, &slice("s2", "n2")).await.unwrap();
    assert_eq!(applied(next(&mut events).await.unwrap()), "s2");
    let s3 = slice("s3", "n3");
    let create = slices.create(&pp, &s3);
    let (event, created) = tokio::join!(next(&mut events), create);
    created.unwrap();
    assert_eq!(applied(event.unwrap()), "s3");

    // A change made while no watch is open and then compacted away: the resumed watch is
    // 410 Expired and the watcher re-lists.
    server.drop_watches();
    slices.create(&pp, &slice("s4", "n4")).await.unwrap();
    server.compact();
    let mut saw_expired = false;
    loop {
        match next(&mut events).await {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => saw_expired = true,
            Ok(watcher::Event::Init) => break,
            other => panic!("expected 410 then a re-list, got {other:?}"),
        }
    }
    assert!(saw_expired);
    let mut relisted = Vec::new();
    loop {
        match next(&mut events).await.unwrap() {
            watcher::Event::InitApply(s) => relisted.push(s.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(relisted, ["s0", "s1", "s2", "s3", "s4"]);
    let dp = DeleteParams::default();
    let delete = slices.delete("s0", &dp);
    let (event, deleted) = tokio::join!(next(&mut events), delete);
    deleted.unwrap();
    assert!(
        matches!(event.unwrap(), watcher::Event::Delete(s) if s.metadata.name.as_deref() == Some("s0"))
    );
}

#[tokio::test]
async fn streaming_list_watch_ends_initial_events_with_a_bookmark() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    for name in ["a", "b"] {
        nodes
            .create(&PostParams::default(), &node(name))
            .await
            .unwrap();
    }
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher(nodes.clone(), config).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitApply(_)
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitApply(_)
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
}

#[tokio::test]
async fn discovery_reports_the_registered_dra_versions() {
    for (dra, expected, minor) in [
        (DraVersions::V1beta1Only, vec!["v1beta1"], "32"),
        (DraVersions::V1Only, vec!["v1"], "34"),
        (DraVersions::Both, vec!["v1", "v1beta1"], "34"),
    ] {
        let server = FakeApiServer::start_with_builtin(dra).await.unwrap();
        let client = server.client();
        let group = kube::discovery::group(&client, "resource.k8s.io")
            .await
            .unwrap();
        assert_eq!(group.versions().collect::<Vec<_>>(), expected, "{dra:?}");
        assert_eq!(group.preferred_version(), Some(expected[0]));
        let (claims, caps) = group.recommended_kind("ResourceClaim").unwrap();
        assert_eq!(claims.plural, "resourceclaims");
        assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
        assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
        assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
        let (_, slice_caps) = group.recommended_kind("ResourceSlice").unwrap();
        assert_eq!(slice_caps.scope, kube::discovery::Scope::Cluster);
        assert_eq!(client.apiserver_version().await.unwrap().minor, minor);

        for discovery in [
            kube::Discovery::new(client.clone()).run().await.unwrap(),
            kube::Discovery::new(client.clone())
                .run_aggregated()
                .await
                .unwrap(),
        ] {
            let resource = discovery.get("resource.k8s.io").unwrap();
            assert_eq!(resource.versions().collect::<Vec<_>>(), expected);
            assert!(discovery.has_group("coordination.k8s.io"));
            let core = discovery.get("").unwrap();
            assert!(core.recommended_kind("Node").is_some());
        }
    }
}

#[tokio::test]
async fn versions_are_served_only_when_registered_and_stored_apart() {
    let server = FakeApiServer::start_with_builtin(DraVersions::V1beta1Only)
        .await
        .unwrap();
    let v1: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    assert_eq!(
        api_error(v1.list(&ListParams::default()).await),
        (404, "NotFound".into())
    );
    let beta: Api<v1beta1::ResourceClaim> = Api::namespaced(server.client(), "ml");
    let beta_claim: v1beta1::ResourceClaim = serde_json::from_value(json!({
        "metadata": {"name": "c"},
        "spec": {"devices": {"requests": [{"name": "gpu", "deviceClassName": "vgpu"}]}}
    }))
    .unwrap();
    beta.create(&PostParams::default(), &beta_claim)
        .await
        .unwrap();

    for kind in ResourceKind::dra("v1") {
        server.register(kind);
    }
    // v1 is served now, but it is a separate store.
    assert!(v1.get_opt("c").await.unwrap().is_none());
    assert!(beta.get_opt("c").await.unwrap().is_some());
    server.unregister(Gvr::of::<v1beta1::ResourceClaim>());
    assert_eq!(api_error(beta.get("c").await), (404, "NotFound".into()));
}

#[tokio::test]
async fn fault_injection_conflicts_latency_and_request_counts() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    let pp = PostParams::default();
    nodes.create(&pp, &node("n1")).await.unwrap();
    let gvr = Gvr::of::<Node>();

    server.inject_conflicts(&gvr, 2);
    let label = Patch::Merge(json!({"metadata": {"labels": {"try": "1"}}}));
    let ppatch = PatchParams::default();
    for _ in 0..2 {
        assert_eq!(
            api_error(nodes.patch("n1", &ppatch, &label).await),
            (409, "Conflict".into())
        );
    }
    assert!(
        server
            .get_as::<Node>("", "n1")
            .unwrap()
            .unwrap()
            .labels()
            .get("try")
            .is_none()
    );
    nodes.patch("n1", &ppatch, &label).await.unwrap();
    // Reads are never faulted.
    server.inject_faults(&gvr, 1, Fault::InternalError);
    nodes.get("n1").await.unwrap();
    assert_eq!(
        api_error(nodes.create(&pp, &node("n2")).await),
        (500, "InternalError".into())
    );
    nodes.create(&pp, &node("n2")).await.unwrap();

    assert_eq!(server.request_count(Verb::Patch, "/api/v1/nodes/n1"), 3);
    assert_eq!(server.request_count(Verb::Create, "/api/v1/nodes"), 3);
    assert_eq!(server.request_count(Verb::Get, "/api/v1/nodes/n1"), 1);
    nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(server.request_count(Verb::List, "/api/v1/nodes"), 1);
    // Only successful writes are in the log.
    let verbs: Vec<Verb> = server.writes().iter().map(|w| w.verb).collect();
    assert_eq!(verbs, [Verb::Create, Verb::Patch, Verb::Create]);

    server.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    nodes.get("n1").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    server.set_latency(Duration::ZERO);
}

#[tokio::test]
async fn direct_helpers_seed_and_edit_state_and_notify_watches() {
    let server = server().await;
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    let gvr = Gvr::of::<ResourceClaim>();
    let mut seeded = claim("seeded");
    seeded.status = Some(serde_json::from_value(reserved_for("p")).unwrap());
    seeded.metadata.finalizers = Some(vec!["x/y".into()]);
    let stored = server.put(&seeded).unwrap();
    assert!(stored.status.is_some(), "seeding keeps status");
    assert!(stored.metadata.uid.is_some());

    let mut events = claims
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        WatchEvent::Added(_)
    ));

    let edited = server
        .update_object(&gvr, "ml", "seeded", |o| {
            o["status"] = json!({});
        })
        .unwrap();
    assert_ne!(
        edited["metadata"]["resourceVersion"],
        json!(stored.metadata.resource_version)
    );
    assert!(
        matches!(next(&mut events).await.unwrap(), WatchEvent::Modified(c) if c.status == Some(Default::default()))
    );

    let deleting = server.delete_object(&gvr, "ml", "seeded").unwrap();
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    assert!(
        matches!(next(&mut events).await.unwrap(), WatchEvent::Modified(c) if c.metadata.deletion_timestamp.is_some())
    );
    server
        .update_object(&gvr, "ml", "seeded", |o| {
            o["metadata"]["finalizers"] = json!([]);
        })
        .unwrap();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        WatchEvent::Deleted(_)
    ));
    assert!(server.get(&gvr, "ml", "seeded").is_none());
    assert!(
        server.writes().is_empty(),
        "direct helpers are not client writes"
    );
    assert!(matches!(
        server.put_object(Gvr::new("example.com", "v1", "widgets"), json!({})),
        Err(fake_apiserver::Error::NotRegistered(_))
    ));
}

#[tokio::test]
async fn delete_collection_with_a_label_selector() {
    let server = server().await;
    let slices: Api<ResourceSlice> = Api::all(server.client());
    for (name, node) in [("a", "n1"), ("b", "n1"), ("c", "n2")] {
        slices
            .create(&PostParams::default(), &slice(name, node))
            .await
            .unwrap();
    }
    let deleted = slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("node=n1"),
        )
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(deleted.items.len(), 2);
    let left: Vec<_> = server
        .list_as::<ResourceSlice>()
        .unwrap()
        .into_iter()
        .map(|s| s.metadata.name.unwrap())
        .collect();
    assert_eq!(left, ["c"]);
    let writes = server.writes();
    assert_eq!(writes.len(), 5);
    assert!(writes[3..].iter().all(|w| w.verb == Verb::DeleteCollection));
}

#[tokio::test]
async fn malformed_requests_are_bad_requests_not_crashes() {
    let server = server().await;
    let client = server.client();
    let send = |method: &str, uri: &str, content_type: &str, body: &str| {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", content_type)
            .body(body.as_bytes().to_vec())
            .unwrap();
        let client = client.clone();
        async move { client.request::<Value>(request).await }
    };
    let json_type = "application/json";
    assert_eq!(
        api_error(send("POST", "/api/v1/nodes", json_type, "{not json").await).0,
        400
    );
    assert_eq!(
        api_error(send("POST", "/api/v1/nodes", json_type, "[1, 2]").await).0,
        400
    );
    assert_eq!(
        api_error(
            send(
                "POST",
                "/api/v1/nodes",
                json_type,
                r#"{"kind": "Pod", "metadata": {"name": "x"}}"#
            )
            .await
        )
        .0,
        400
    );
    assert_eq!(
        api_error(
            send(
                "POST",
                "/api/v1/nodes",
                json_type,
                r#"{"metadata": {"name": "Not_Valid"}}"#
            )
            .await
        ),
        (422, "Invalid".into())
    );
    assert_eq!(
        api_error(
            send(
                "GET",
                "/api/v1/nodes?watch=true&resourceVersion=abc",
                json_type,
                ""
            )
            .await
        )
        .0,
        400
    );
    assert_eq!(
        api_error(send("GET", "/api/v1/nodes?limit=-1", json_type, "").await).0,
        400
    );
    assert_eq!(
        api_error(send("GET", "/api/v1/nodes?labelSelector=%ZZ", json_type, "").await).0,
        400
    );
    send(
        "POST",
        "/api/v1/nodes",
        json_type,
        r#"{"metadata": {"name": "n1"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        api_error(
            send(
                "PATCH",
                "/api/v1/nodes/n1",
                "application/json-patch+json",
                r#"{"op": 1}"#
            )
            .await
        )
        .0,
        400
    );
    assert_eq!(
        api_error(send("PATCH", "/api/v1/nodes/n1", "text/plain", "{}").await).0,
        415
    );
    assert_eq!(
        api_error(
            send(
                "PATCH",
                "/api/v1/nodes/n1",
                "application/apply-patch+yaml",
                "{}"
            )
            .await
        )
        .0,
        400,
        "apply without a fieldManager"
    );
    assert_eq!(
        api_error(send("DELETE", "/api/v1/nodes/n1", json_type, "nope").await).0,
        400
    );
    assert_eq!(
        api_error(send("GET", "/api/v1/nodes/n1/proxy", json_type, "").await).0,
        404
    );
    assert_eq!(
        api_error(send("GET", "/apis/example.com/v1/widgets", json_type, "").await).0,
        404
    );
    assert_eq!(
        api_error(send("POST", "/api/v1/nodes/n1", json_type, "{}").await).0,
        405
    );
    assert_eq!(
        api_error(
            send(
                "POST",
                "/api/v1/nodes?dryRun=All",
                json_type,
                r#"{"metadata": {"name": "n9"}}"#
            )
            .await
        )
        .0,
        400
    );
    // The server is still there.
    let nodes: Api<Node> = Api::all(server.client());
    assert_eq!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn metadata_only_requests() {
    let server = server().await;
    let nodes: Api<Node> = Api::all(server.client());
    let mut n = node("n1");
    n.spec = Some(serde_json::from_value(json!({"podCIDR": "10.0.0.0/24"})).unwrap());
    nodes.create(&PostParams::default(), &n).await.unwrap();
    let list = nodes.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].metadata.name.as_deref(), Some("n1"));
    let meta = nodes.get_metadata("n1").await.unwrap();
    assert_eq!(meta.types.unwrap().kind, "PartialObjectMetadata");
}

/// kube-runtime's finalizer helper adds and removes its finalizer with JSON patches whose
/// `test` operations must behave as on the real server (a missing list tests equal to null).
#[tokio::test]
async fn kube_runtime_finalizer_helper_round_trip() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event, finalizer};
    use std::sync::Arc;

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    struct Never;

    let server = server().await;
    let claims: Api<ResourceClaim> = Api::namespaced(server.client(), "ml");
    claims
        .create(&PostParams::default(), &claim("c"))
        .await
        .unwrap();
    const NAME: &str = "vgpu.hami.io/claim";
    let run = |obj: ResourceClaim| {
        let claims = claims.clone();
        async move {
            finalizer(&claims, NAME, Arc::new(obj), |event| async move {
                Ok::<_, Never>(match event {
                    Event::Apply(_) => Action::await_change(),
                    Event::Cleanup(_) => Action::await_change(),
                })
            })
            .await
        }
    };
    run(claims.get("c").await.unwrap()).await.unwrap();
    let with = claims.get("c").await.unwrap();
    assert_eq!(with.finalizers(), [NAME]);
    // With the finalizer present the helper reconciles without writing.
    run(with.clone()).await.unwrap();
    assert_eq!(claims.get("c").await.unwrap().finalizers(), [NAME]);

    claims.delete("c", &DeleteParams::default()).await.unwrap();
    let deleting = claims.get("c").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    run(deleting).await.unwrap();
    assert!(claims.get_opt("c").await.unwrap().is_none());
    // Every write was a JSON patch or the delete.
    let verbs: Vec<Verb> = server.writes().iter().map(|w| w.verb).collect();
    assert_eq!(
        verbs,
        [Verb::Create, Verb::Patch, Verb::Delete, Verb::Patch]
    );
}
