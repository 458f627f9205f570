//! Security review, as tests: what the kubelet sends never steers a file path or an API
//! request, and every file and socket the plugin creates has the narrowest mode that works.

mod common;

use common::*;
use fake_apiserver::DraVersions;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use vgpu_proto::dra::v1;

/// Every path under `root` (relative) with its mode, sockets included.
fn modes(root: &Path) -> BTreeMap<String, u32> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(rel, meta.permissions().mode() & 0o7777);
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_claim_references_reach_neither_a_file_path_nor_the_api() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let good = h.put_claim(&ClaimSpec::sliced("good", &["gpu-0"], "4Gi", 10));
    // What a path traversal would hit: it must survive every call below.
    std::fs::write(h.path("victim.json"), b"keep").unwrap();
    std::fs::write(h.path("victim"), b"keep").unwrap();
    let before = modes(h.dir.path());
    h.server.reset_request_counts();

    let crafted = [
        ("uid", v1_claim("../victim", "good")),
        ("uid", v1_claim("../../../../../../tmp/x", "good")),
        ("uid", v1_claim("a\0b", "good")),
        ("uid", v1_claim("", "good")),
        ("name", v1_claim(&good, "../../../api/v1/secrets")),
        ("name", v1_claim(&good, "good/status")),
        ("name", v1_claim(&good, "Good")),
        (
            "namespace",
            v1::Claim {
                namespace: "ml/../kube-system".into(),
                uid: good.clone(),
                name: "good".into(),
            },
        ),
    ];
    let mut client = h.v1().await;
    for (field, claim) in &crafted {
        let answer = h.prepare_v1(vec![claim.clone()]).await;
        let result = &answer.claims[&claim.uid];
        assert!(result.devices.is_empty(), "{claim:?}: {result:?}");
        assert!(
            result.error.contains(&format!("claim reference {field} ")),
            "{claim:?}: {}",
            result.error
        );
        // Unprepare of a name no claim can have: success (nothing of it can exist), and
        // nothing removed.
        let answer = client
            .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                claims: vec![claim.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.claims[&claim.uid].error, "", "{claim:?}");
    }
    // Only the slice publisher's own traffic: no claim read, nothing else.
    let requests: Vec<_> = h
        .server
        .request_counts()
        .into_keys()
        .filter(|(_, path)| !path.ends_with("/resourceslices"))
        .collect();
    assert!(
        requests.is_empty(),
        "a crafted reference reached the API server: {requests:?}"
    );
    assert_eq!(modes(h.dir.path()), before, "files changed");
    assert_eq!(std::fs::read(h.path("victim")).unwrap(), b"keep");

    // The plugin still serves a real claim.
    let answer = h.prepare_v1(vec![v1_claim(&good, "good")]).await;
    assert_eq!(answer.claims[&good].error, "");
    assert_eq!(running.preparer.prepared().len(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_and_sockets_have_the_narrowest_modes_that_work() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("train", &["gpu-1"], "4Gi", 10));
    let answer = h.prepare_v1(vec![v1_claim(&uid, "train")]).await;
    assert_eq!(answer.claims[&uid].error, "");

    let got = modes(h.dir.path());
    let want: BTreeMap<String, u32> = [
        // Only the kubelet (root) talks to the plugin.
        ("plugins/vgpu.hami.io/dra.sock".to_string(), 0o600),
        ("plugins_registry/vgpu.hami.io-reg.sock".to_string(), 0o600),
        // The plugin's own state: nobody else reads it.
        ("plugins/vgpu.hami.io/checkpoint.json".to_string(), 0o600),
        ("plugins/vgpu.hami.io/checkpoint.journal".to_string(), 0o600),
        ("plugins/vgpu.hami.io/plugin.lock".to_string(), 0o600),
        // Read by the container runtime and by CDI tools as any user; no secret inside.
        (format!("cdi/k8s.vgpu.hami.io-claim_{uid}.json"), 0o644),
        // Bind-mounted into the container read-only: the dynamic loader of any user reads it.
        ("plugins/vgpu.hami.io/ld.so.preload".to_string(), 0o644),
        // The claim's shared accounting directory: the container's processes run as any
        // user and must create their lock and usage files there.
        (format!("plugins/vgpu.hami.io/claims/{uid}"), 0o777),
    ]
    .into_iter()
    .collect();
    for (path, mode) in &want {
        assert_eq!(
            got.get(path),
            Some(mode),
            "{path}: mode {:o}, want {mode:o}",
            got.get(path).copied().unwrap_or_default()
        );
    }
    // Nothing else the plugin made is group- or world-writable.
    for (path, mode) in &got {
        let ours = path.starts_with("plugins") || path.starts_with("cdi/");
        if ours && !want.contains_key(path) && !path.ends_with("claims") {
            assert_eq!(mode & 0o022, 0, "{path} is writable by others: {mode:o}");
        }
    }
    running.shutdown().await.unwrap();
}
