//! The converting client against an API server that serves resource.k8s.io v1beta1 only (as
//! 1.32 and 1.33 do): v1 objects in, v1beta1 objects stored, the same v1 objects out, through
//! every verb and the watch.

use dra::{ApiVersion, DraApi};
use fake_apiserver::{DraVersions, FakeApiServer};
use futures::StreamExt;
use k8s_openapi::api::resource::{v1, v1beta1};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;

fn claim(name: &str) -> v1::ResourceClaim {
    let mut claim = v1::ResourceClaim::default();
    claim.metadata.name = Some(name.into());
    claim.metadata.namespace = Some("ml".into());
    claim.spec.devices = Some(v1::DeviceClaim {
        requests: Some(vec![
            v1::DeviceRequest {
                name: "gpu".into(),
                exactly: Some(v1::ExactDeviceRequest {
                    device_class_name: "gpu-slice.vgpu.hami.io".into(),
                    count: Some(2),
                    ..Default::default()
                }),
                ..Default::default()
            },
            v1::DeviceRequest {
                name: "alt".into(),
                first_available: Some(vec![v1::DeviceSubRequest {
                    name: "big".into(),
                    device_class_name: "gpu.vgpu.hami.io".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        ]),
        ..Default::default()
    });
    claim
}

#[tokio::test]
async fn v1_objects_round_trip_through_a_v1beta1_server() {
    let server = FakeApiServer::start_with_builtin(DraVersions::V1beta1Only)
        .await
        .unwrap();
    let client = server.client();
    assert_eq!(
        dra::version::discover(&client).await.unwrap(),
        ApiVersion::V1beta1
    );
    let api: DraApi<v1::ResourceClaim> = DraApi::namespaced(client, "ml", ApiVersion::V1beta1);
    let mut watch = api.watch(watcher::Config::default()).boxed();

    let created = api
        .create(&PostParams::default(), &claim("c"))
        .await
        .unwrap();
    assert_eq!(created.spec, claim("c").spec);
    // Stored as v1beta1: the request fields beside firstAvailable, no `exactly`.
    let stored = server
        .get_as::<v1beta1::ResourceClaim>("ml", "c")
        .unwrap()
        .unwrap();
    let requests = stored.spec.devices.unwrap().requests.unwrap();
    assert_eq!(
        requests[0].device_class_name.as_deref(),
        Some("gpu-slice.vgpu.hami.io")
    );
    assert_eq!(requests[0].count, Some(2));
    assert_eq!(requests[1].first_available.as_ref().unwrap()[0].name, "big");

    assert_eq!(api.get("c").await.unwrap().spec, claim("c").spec);
    assert!(api.get_opt("missing").await.unwrap().is_none());
    assert!(api.get("missing").await.unwrap_err().is_not_found());
    let listed = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].spec, claim("c").spec);

    // The status subresource, with an allocation.
    let mut allocated = created.clone();
    allocated.status = allocation_only().status;
    let written = api
        .replace_status("c", &PostParams::default(), &allocated)
        .await
        .unwrap();
    assert_eq!(written.status, allocated.status);
    // A stale write is a conflict, as the caller's retry loop expects.
    let stale = api
        .replace_status("c", &PostParams::default(), &allocated)
        .await
        .unwrap_err();
    assert!(stale.is_conflict(), "{stale}");

    // The watch saw the claim as v1, allocated in the end.
    let mut last = None;
    while let Some(event) = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
        .await
        .unwrap()
    {
        match event.unwrap() {
            watcher::Event::Apply(c) | watcher::Event::InitApply(c) => {
                let done = c.status.is_some();
                last = Some(c);
                if done {
                    break;
                }
            }
            _ => {}
        }
    }
    let seen = last.unwrap();
    assert_eq!(seen.spec, claim("c").spec);
    assert_eq!(seen.status, allocated.status);

    api.delete("c", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("c").await.unwrap().is_none());
}

fn allocation_only() -> v1::ResourceClaim {
    v1::ResourceClaim {
        status: Some(v1::ResourceClaimStatus {
            allocation: Some(v1::AllocationResult {
                devices: Some(v1::DeviceAllocationResult {
                    results: Some(vec![v1::DeviceRequestAllocationResult {
                        request: "gpu".into(),
                        driver: "vgpu.hami.io".into(),
                        pool: "n1".into(),
                        device: "gpu-0".into(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The controller writes with merge patches that carry only what it writes and the version
/// it read: the rest of the claim is kept, and a stale version is a conflict.
#[tokio::test]
async fn merge_patches_write_only_their_fields_on_condition_of_the_version() {
    for (served, version) in [
        (DraVersions::V1Only, ApiVersion::V1),
        (DraVersions::V1beta1Only, ApiVersion::V1beta1),
    ] {
        let server = FakeApiServer::start_with_builtin(served).await.unwrap();
        let api: DraApi<v1::ResourceClaim> = DraApi::namespaced(server.client(), "ml", version);
        let created = api
            .create(&PostParams::default(), &claim("p"))
            .await
            .unwrap();
        let v1 = created.metadata.resource_version.clone().unwrap();

        let finalizer = serde_json::json!({"metadata": {
            "resourceVersion": v1,
            "finalizers": ["resource.kubernetes.io/delete-protection"],
        }});
        let protected = api.patch_metadata("p", &finalizer).await.unwrap();
        assert_eq!(
            protected.metadata.finalizers.as_deref(),
            Some(&["resource.kubernetes.io/delete-protection".to_string()][..])
        );
        assert_eq!(protected.spec, claim("p").spec, "{version:?}");
        let stale = api.patch_metadata("p", &finalizer).await.unwrap_err();
        assert!(stale.is_conflict(), "{version:?}: {stale}");

        let v2 = protected.metadata.resource_version.clone();
        let written = api
            .patch_status("p", v2.as_deref(), &allocation_only())
            .await
            .unwrap();
        assert_eq!(written.status, allocation_only().status, "{version:?}");
        assert_eq!(written.spec, claim("p").spec, "{version:?}");
        assert_eq!(written.metadata.finalizers, protected.metadata.finalizers);
        let stale = api
            .patch_status("p", v2.as_deref(), &allocation_only())
            .await
            .unwrap_err();
        assert!(stale.is_conflict(), "{version:?}: {stale}");
        assert_eq!(api.get("p").await.unwrap().status, written.status);
    }
}
