//! The kubelet's side: tonic clients over the plugin's real Unix sockets, the plugin running
//! against the fake API server.

mod common;

use common::*;
use fake_apiserver::DraVersions;
use serde_json::json;
use std::os::unix::fs::FileTypeExt;
use std::time::Duration;
use vgpu_proto::dra::{v1, v1beta1};
use vgpu_proto::pluginregistration as reg;

fn is_socket(path: &std::path::Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn spec_path(h: &Harness, uid: &str) -> std::path::PathBuf {
    h.path(&format!("cdi/k8s.vgpu.hami.io-claim_{uid}.json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_after_dra_socket_and_sockets_removed_on_stop() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    // Watch the registry directory from another thread: when the registration socket first
    // appears, the DRA socket must already be there.
    let (dra, registration) = (h.dra_socket(), h.registration_socket());
    let watcher = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if is_socket(&registration) {
                return Some(is_socket(&dra));
            }
            std::hint::spin_loop();
        }
        None
    });
    let running = h.start().await;
    assert_eq!(
        watcher.join().unwrap(),
        Some(true),
        "DRA socket was not up before registration"
    );

    let mut client = reg::registration_client::RegistrationClient::new(
        vgpu_proto::uds::connect(h.registration_socket())
            .await
            .unwrap(),
    );
    let info = client
        .get_info(reg::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info,
        reg::PluginInfo {
            r#type: "DRAPlugin".into(),
            name: "vgpu.hami.io".into(),
            endpoint: "/var/lib/kubelet/plugins/vgpu.hami.io/dra.sock".into(),
            supported_versions: vec!["v1.DRAPlugin".into(), "v1beta1.DRAPlugin".into()],
        }
    );
    // A rejection is logged loudly and acknowledged, and the socket is offered again: a new
    // registration on a new connection is accepted.
    client
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: false,
            error: "no supported version".into(),
        })
        .await
        .unwrap();
    drop(client);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let accepted = async {
            let mut client = reg::registration_client::RegistrationClient::new(
                vgpu_proto::uds::connect(h.registration_socket())
                    .await
                    .ok()?,
            );
            client.get_info(reg::InfoRequest {}).await.ok()?;
            client
                .notify_registration_status(reg::RegistrationStatus {
                    plugin_registered: true,
                    error: String::new(),
                })
                .await
                .ok()
        };
        if accepted.await.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the socket was not offered again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    running.shutdown().await.unwrap();
    assert!(!h.dra_socket().exists(), "DRA socket left behind");
    assert!(
        !h.registration_socket().exists(),
        "registration socket left behind"
    );
}

/// The spec of a 2-GPU, 4 GiB / 30 % claim, exactly.
fn expected_spec(h: &Harness, uid: &str) -> serde_json::Value {
    let plugin_dir = h.path("plugins/vgpu.hami.io");
    let node = |path: &str, major: i64, minor: i64| json!({"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 438});
    // Device names that start with a digit need 0.5.0; nothing else in the spec needs more
    // than 0.3.0. UIDs are random, so both cases happen.
    let version = if uid.starts_with(|c: char| c.is_ascii_digit()) {
        "0.5.0"
    } else {
        "0.3.0"
    };
    json!({
        "cdiVersion": version,
        "kind": "k8s.vgpu.hami.io/claim",
        "devices": [{
            "name": format!("{uid}-gpu"),
            "containerEdits": {
                "env": [
                    "NVIDIA_VISIBLE_DEVICES=GPU-5f2c9a1e-0000-4a8b-9c3d-7e6f5a4b3c2d,GPU-5f2c9a1e-0003-4a8b-9c3d-7e6f5a4b3c2d",
                    "CUDA_VISIBLE_DEVICES=GPU-5f2c9a1e-0000-4a8b-9c3d-7e6f5a4b3c2d,GPU-5f2c9a1e-0003-4a8b-9c3d-7e6f5a4b3c2d",
                    "CUDA_DEVICE_MEMORY_LIMIT_0=4096m",
                    "CUDA_DEVICE_MEMORY_LIMIT_1=4096m",
                    "CUDA_DEVICE_SM_LIMIT=30",
                    "CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/shared/gpu.cache"
                ],
                "deviceNodes": [
                    node("/dev/nvidia0", 195, 0),
                    node("/dev/nvidia3", 195, 3),
                    node("/dev/nvidiactl", 195, 255),
                    node("/dev/nvidia-uvm", UVM_MAJOR, 0),
                    node("/dev/nvidia-uvm-tools", UVM_MAJOR, 1)
                ],
                "mounts": [
                    {"hostPath": plugin_dir.join("claims").join(uid).display().to_string(),
                     "containerPath": "/usr/local/vgpu/shared", "options": ["rw", "nosuid", "nodev", "bind"]},
                    {"hostPath": h.path("libvgpu.so").display().to_string(),
                     "containerPath": "/usr/local/vgpu/libvgpu.so", "options": ["ro", "nosuid", "nodev", "bind"]},
                    {"hostPath": plugin_dir.join("ld.so.preload").display().to_string(),
                     "containerPath": "/etc/ld.so.preload", "options": ["ro", "nosuid", "nodev", "bind"]}
                ]
            }
        }]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_writes_the_exact_spec_and_repeats_the_same_answer() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("train", &["gpu-0", "gpu-3"], "4Gi", 30));
    let answer = h.prepare_v1(vec![v1_claim(&uid, "train")]).await;
    let expected_devices = vec![
        v1::Device {
            request_names: vec!["gpu".into()],
            pool_name: "node-a".into(),
            device_name: "gpu-0".into(),
            cdi_device_ids: vec![format!("k8s.vgpu.hami.io/claim={uid}-gpu")],
            share_id: None,
        },
        v1::Device {
            request_names: vec!["gpu".into()],
            pool_name: "node-a".into(),
            device_name: "gpu-3".into(),
            cdi_device_ids: vec![],
            share_id: None,
        },
    ];
    assert_eq!(answer.claims.len(), 1);
    assert_eq!(answer.claims[&uid].error, "");
    assert_eq!(answer.claims[&uid].devices, expected_devices);

    let doc = check_spec_file(&spec_path(&h, &uid));
    assert_eq!(
        doc,
        expected_spec(&h, &uid),
        "{}",
        serde_json::to_string_pretty(&doc).unwrap()
    );
    assert!(
        h.path(&format!("plugins/vgpu.hami.io/claims/{uid}"))
            .is_dir()
    );
    assert_eq!(
        std::fs::read_to_string(h.path("plugins/vgpu.hami.io/ld.so.preload")).unwrap(),
        "/usr/local/vgpu/libvgpu.so\n"
    );

    // Repeated prepare: the same answer, the same single spec, one checkpoint entry.
    let again = h.prepare_v1(vec![v1_claim(&uid, "train")]).await;
    assert_eq!(again, answer);
    let specs: Vec<_> = std::fs::read_dir(h.path("cdi"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(specs.len(), 1, "{specs:?}");
    assert_eq!(running.preparer.prepared().len(), 1);
    let text = running.metrics.encode();
    assert!(
        text.contains("vgpu_kubelet_plugin_prepare_claims_total{result=\"success\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("vgpu_kubelet_plugin_prepared_claims 1"),
        "{text}"
    );
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_after_restart_answers_from_the_checkpoint() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("train", &["gpu-1"], "8Gi", 20));
    let first = h.prepare_v1(vec![v1_claim(&uid, "train")]).await;
    assert_eq!(first.claims[&uid].error, "");
    let spec_before = std::fs::read(spec_path(&h, &uid)).unwrap();
    running.shutdown().await.unwrap();

    // The claim disappears from the API server and the spec from disk while the plugin is
    // down: the restarted plugin rewrites the spec from its checkpoint and answers the same.
    h.delete_claim("train");
    std::fs::remove_file(spec_path(&h, &uid)).unwrap();
    let running = h.start().await;
    assert_eq!(std::fs::read(spec_path(&h, &uid)).unwrap(), spec_before);
    let second = h.prepare_v1(vec![v1_claim(&uid, "train")]).await;
    assert_eq!(second, first);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprepare_of_a_deleted_claim_removes_everything() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("train", &["gpu-2"], "8Gi", 20));
    assert_eq!(
        h.prepare_v1(vec![v1_claim(&uid, "train")]).await.claims[&uid].error,
        ""
    );
    h.delete_claim("train");
    let mut client = h.v1().await;
    for _ in 0..2 {
        let answer = client
            .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
                claims: vec![v1_claim(&uid, "train"), v1_claim("never-prepared", "ghost")],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.claims.len(), 2);
        assert!(
            answer.claims.values().all(|c| c.error.is_empty()),
            "{answer:?}"
        );
        assert!(!spec_path(&h, &uid).exists());
        assert!(
            !h.path(&format!("plugins/vgpu.hami.io/claims/{uid}"))
                .exists()
        );
        assert!(running.preparer.prepared().is_empty());
    }
    // What a restart would read (the snapshot and its journal) no longer has the claim.
    let recorded = kubelet_plugin::checkpoint::Checkpoint::in_dir(&h.path("plugins/vgpu.hami.io"))
        .load()
        .unwrap();
    assert!(recorded.claims.is_empty(), "{recorded:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_claim_errors_do_not_affect_other_claims() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let good = h.put_claim(&ClaimSpec::sliced("good", &["gpu-0"], "10Gi", 10));
    let mut malformed = ClaimSpec::sliced("malformed", &["gpu-1"], "10Gi", 10);
    malformed.config.push((
        "FromClaim".into(),
        vec![],
        json!({"apiVersion": "vgpu.hami.io/v1alpha1", "kind": "GpuSliceConfig", "cores": "lots"}),
    ));
    let malformed_uid = h.put_claim(&malformed);
    let mut elsewhere = ClaimSpec::sliced("elsewhere", &["gpu-2"], "10Gi", 10);
    elsewhere.node = "node-b".into();
    elsewhere.results[0].pool = "node-b".into();
    let elsewhere_uid = h.put_claim(&elsewhere);
    let mut pending = ClaimSpec::sliced("pending", &["gpu-2"], "10Gi", 10);
    pending.allocated = false;
    let pending_uid = h.put_claim(&pending);
    let unknown_device = h.put_claim(&ClaimSpec::sliced("phantom", &["gpu-9"], "1Gi", 1));
    let replaced = h.put_claim(&ClaimSpec::sliced("replaced", &["gpu-3"], "1Gi", 1));

    let answer = h
        .prepare_v1(vec![
            v1_claim(&good, "good"),
            v1_claim(&malformed_uid, "malformed"),
            v1_claim(&elsewhere_uid, "elsewhere"),
            v1_claim(&pending_uid, "pending"),
            v1_claim(&unknown_device, "phantom"),
            v1_claim("0000-not-the-uid", "replaced"),
            v1_claim("some-uid", "missing"),
        ])
        .await;
    assert_eq!(answer.claims.len(), 7, "every claim gets an entry");
    assert_eq!(answer.claims[&good].error, "");
    assert_eq!(answer.claims[&good].devices.len(), 1);
    let error = |uid: &str| answer.claims[uid].error.clone();
    let e = error(&malformed_uid);
    assert!(
        e.contains("ml/malformed") && e.contains("parameters.cores"),
        "{e}"
    );
    let e = error(&elsewhere_uid);
    assert!(e.contains("node-b") && e.contains("node-a"), "{e}");
    let e = error(&pending_uid);
    assert!(e.contains("not set") || e.contains("not allocated"), "{e}");
    let e = error(&unknown_device);
    assert!(
        e.contains("gpu-9") && e.contains("not in this node's pool"),
        "{e}"
    );
    let e = error("0000-not-the-uid");
    assert!(e.contains(&replaced) && e.contains("replaced"), "{e}");
    let e = error("some-uid");
    assert!(e.contains("ml/missing") && e.contains("not found"), "{e}");
    assert!(
        answer
            .claims
            .iter()
            .filter(|(u, _)| **u != good)
            .all(|(_, c)| c.devices.is_empty())
    );
    // Only the good claim left a spec.
    let specs: Vec<_> = std::fs::read_dir(h.path("cdi")).unwrap().collect();
    assert_eq!(specs.len(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_gpus_and_over_subscription_are_refused() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-mixed.yaml")).await;
    let running = h.start().await;
    // The mixed node's T4 (gpu-3) is unhealthy in the inventory.
    let t4 = h.put_claim(&ClaimSpec::sliced("t4", &["gpu-3"], "1Gi", 10));
    let a = h.put_claim(&ClaimSpec::sliced("a", &["gpu-2"], "30Gi", 50));
    let b = h.put_claim(&ClaimSpec::sliced("b", &["gpu-2"], "20Gi", 10));
    let c = h.put_claim(&ClaimSpec::sliced("c", &["gpu-2"], "10Gi", 60));
    let answer = h
        .prepare_v1(vec![v1_claim(&t4, "t4"), v1_claim(&a, "a")])
        .await;
    let e = &answer.claims[&t4].error;
    assert!(e.contains("unhealthy") && e.contains("Xid 79"), "{e}");
    assert_eq!(answer.claims[&a].error, "");
    // 30 GiB + 20 GiB exceed the L40S's 45 GiB; 50 % + 60 % exceed its cores.
    let answer = h
        .prepare_v1(vec![v1_claim(&b, "b"), v1_claim(&c, "c")])
        .await;
    let e = &answer.claims[&b].error;
    assert!(e.contains("over-committed") && e.contains("memory"), "{e}");
    let e = &answer.claims[&c].error;
    assert!(e.contains("over-committed") && e.contains("cores"), "{e}");
    // A GPU that turns unhealthy at run time (inventory edited, as an Xid event would) is
    // refused from then on.
    let inventory = example("fake-gpus-mixed.yaml").replace(
        "unhealthy:\n",
        "unhealthy:\n  GPU-8a1d3c52-0000-4b7e-a1f0-1c2d3e4f5a60: \"Xid 48: double-bit ECC error\"\n",
    );
    h.write_inventory(&inventory);
    h.eventually("gpu-0 unhealthy", || {
        running.gpus.current().unhealthy.len() == 2
    })
    .await;
    let d = h.put_claim(&ClaimSpec::sliced("d", &["gpu-0"], "1Gi", 10));
    let answer = h.prepare_v1(vec![v1_claim(&d, "d")]).await;
    assert!(answer.claims[&d].error.contains("Xid 48"), "{answer:?}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1beta1_and_v1_are_served_on_a_132_cluster() {
    let h = Harness::new(
        DraVersions::V1beta1Only,
        &example("fake-gpus-hgx-h100.yaml"),
    )
    .await;
    let running = h.start().await;
    assert_eq!(running.api_version, dra::ApiVersion::V1beta1);
    let uid = h.put_claim(&ClaimSpec::sliced("beta", &["gpu-4"], "2Gi", 25));
    let beta = h
        .v1beta1()
        .await
        .node_prepare_resources(v1beta1::NodePrepareResourcesRequest {
            claims: vec![v1beta1_claim(&uid, "beta")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        beta.claims[&uid].devices,
        vec![v1beta1::Device {
            request_names: vec!["gpu".into()],
            pool_name: "node-a".into(),
            device_name: "gpu-4".into(),
            cdi_device_ids: vec![format!("k8s.vgpu.hami.io/claim={uid}-gpu")],
        }]
    );
    let ga = h.prepare_v1(vec![v1_claim(&uid, "beta")]).await;
    assert_eq!(
        ga.claims[&uid].devices[0].cdi_device_ids,
        beta.claims[&uid].devices[0].cdi_device_ids
    );
    let spec = check_spec_file(&spec_path(&h, &uid));
    assert_eq!(
        spec["devices"][0]["containerEdits"]["env"][2],
        "CUDA_DEVICE_MEMORY_LIMIT_0=2048m"
    );
    let answer = h
        .v1beta1()
        .await
        .node_unprepare_resources(v1beta1::NodeUnprepareResourcesRequest {
            claims: vec![v1beta1_claim(&uid, "beta")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.claims[&uid].error, "");
    assert!(!spec_path(&h, &uid).exists());
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_carries_share_ids_admin_access_and_whole_gpus() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let mut shared = ClaimSpec::sliced("shared", &["gpu-5"], "4Gi", 30);
    shared.results[0].share_id = Some("7f3e0a52-1c1b-4e0e-9a57-3c5f0c1d2e3f".into());
    let shared_uid = h.put_claim(&shared);
    let mut whole = ClaimSpec::sliced("whole", &["gpu-6"], "4Gi", 30);
    whole.config.clear();
    let whole_uid = h.put_claim(&whole);
    // The claim's own config overrides the class's field by field (cores), the rest stays.
    let mut merged = ClaimSpec::sliced("merged", &["gpu-7"], "4Gi", 30);
    merged.config.push((
        "FromClaim".into(),
        vec!["gpu".into()],
        json!({"apiVersion": "vgpu.hami.io/v1alpha1", "kind": "GpuSliceConfig", "cores": 50}),
    ));
    let merged_uid = h.put_claim(&merged);
    let mut admin = ClaimSpec::sliced("admin", &["gpu-6"], "4Gi", 30);
    admin.results[0].admin = true;
    let admin_uid = h.put_claim(&admin);
    let answer = h
        .prepare_v1(vec![
            v1_claim(&shared_uid, "shared"),
            v1_claim(&whole_uid, "whole"),
            v1_claim(&admin_uid, "admin"),
            v1_claim(&merged_uid, "merged"),
        ])
        .await;
    assert!(
        answer.claims.values().all(|c| c.error.is_empty()),
        "{answer:?}"
    );
    assert_eq!(
        answer.claims[&shared_uid].devices[0].share_id.as_deref(),
        Some("7f3e0a52-1c1b-4e0e-9a57-3c5f0c1d2e3f")
    );
    let whole_spec = check_spec_file(&spec_path(&h, &whole_uid));
    let env = &whole_spec["devices"][0]["containerEdits"]["env"];
    assert_eq!(
        env[2], "CUDA_DEVICE_MEMORY_LIMIT_0=81559m",
        "whole GPU gets its full memory"
    );
    assert_eq!(env[3], "CUDA_DEVICE_SM_LIMIT=100");
    let merged_spec = check_spec_file(&spec_path(&h, &merged_uid));
    let env = &merged_spec["devices"][0]["containerEdits"]["env"];
    assert_eq!(env[2], "CUDA_DEVICE_MEMORY_LIMIT_0=4096m");
    assert_eq!(env[3], "CUDA_DEVICE_SM_LIMIT=50");
    // Admin access shares the exclusively held GPU and gets no limits and no preload.
    let admin_spec = check_spec_file(&spec_path(&h, &admin_uid));
    let edits = &admin_spec["devices"][0]["containerEdits"];
    assert_eq!(
        edits["env"],
        json!([
            "NVIDIA_VISIBLE_DEVICES=GPU-5f2c9a1e-0006-4a8b-9c3d-7e6f5a4b3c2d",
            "CUDA_VISIBLE_DEVICES=GPU-5f2c9a1e-0006-4a8b-9c3d-7e6f5a4b3c2d"
        ])
    );
    assert!(edits.get("mounts").is_none(), "{edits}");
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_prepares_of_one_claim_agree() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    let uid = h.put_claim(&ClaimSpec::sliced("shared", &["gpu-1"], "40Gi", 50));
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut client = h.v1().await;
        let claim = v1_claim(&uid, "shared");
        calls.push(tokio::spawn(async move {
            client
                .node_prepare_resources(v1::NodePrepareResourcesRequest {
                    claims: vec![claim],
                })
                .await
                .unwrap()
                .into_inner()
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    // One claim prepared once: had two calls both admitted it, 2 × 40 GiB would have been
    // refused as over-commitment for one of them.
    assert!(
        answers.iter().all(|a| a.claims[&uid].error.is_empty()),
        "{answers:?}"
    );
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(running.preparer.prepared().len(), 1);
    assert_eq!(std::fs::read_dir(h.path("cdi")).unwrap().count(), 1);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_share_prepares_the_same_container_as_the_controllers_slice() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let running = h.start().await;
    // The controller's slice: limits from the class's GpuSliceConfig.
    let controller_uid = h.put_claim(&ClaimSpec::sliced("by-controller", &["gpu-2"], "4Gi", 30));
    // The kube-scheduler's share of the same size: limits from consumedCapacity, no config.
    let share = "5b1c0e8a-7d2f-4f3e-9a61-0c2d4e6f8a1b";
    let mut native = ClaimSpec::sliced("native", &["gpu-2"], "4Gi", 30);
    native.config.clear();
    native.results[0].share_id = Some(share.into());
    native.results[0].consumed = Some(("4Gi".into(), "30".into()));
    let native_uid = h.put_claim(&native);
    let answer = h
        .prepare_v1(vec![
            v1_claim(&controller_uid, "by-controller"),
            v1_claim(&native_uid, "native"),
        ])
        .await;
    assert!(
        answer.claims.values().all(|c| c.error.is_empty()),
        "{answer:?}"
    );
    let native_device = &answer.claims[&native_uid].devices[0];
    assert_eq!(native_device.share_id.as_deref(), Some(share));
    assert_eq!(
        native_device.cdi_device_ids,
        vec![format!("k8s.vgpu.hami.io/claim={native_uid}-gpu-{share}")],
        "the CDI device name carries the shareID"
    );
    let by_controller = check_spec_file(&spec_path(&h, &controller_uid));
    let by_scheduler = check_spec_file(&spec_path(&h, &native_uid));
    let edits = |spec: &serde_json::Value| spec["devices"][0]["containerEdits"].clone();
    assert_eq!(
        edits(&by_controller)["env"],
        edits(&by_scheduler)["env"],
        "switching modes changes nothing inside the container"
    );
    assert_eq!(
        edits(&by_scheduler)["env"][2],
        "CUDA_DEVICE_MEMORY_LIMIT_0=4096m"
    );
    assert_eq!(edits(&by_scheduler)["env"][3], "CUDA_DEVICE_SM_LIMIT=30");
    assert_eq!(
        by_scheduler["devices"][0]["name"],
        format!("{native_uid}-gpu-{share}")
    );
    running.shutdown().await.unwrap();
}

/// The DRA socket serves gRPC health (SERVING) and the kubelet's device health stream: the
/// current health at once, then each change, as the kubelet with ResourceHealthStatus reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_services_report_serving_and_device_health_changes() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use vgpu_proto::health::v1alpha1 as health;

    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-mixed.yaml")).await;
    let running = h.start().await;
    let channel = vgpu_proto::uds::connect(h.dra_socket()).await.unwrap();
    let mut grpc_health = HealthClient::new(channel.clone());
    for service in [
        "",
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
        "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
    ] {
        let status = grpc_health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = grpc_health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut devices = health::dra_resource_health_client::DraResourceHealthClient::new(channel)
        .node_watch_resources(health::NodeWatchResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    let status_of = |m: &health::NodeWatchResourcesResponse, device: &str| {
        m.devices
            .iter()
            .find(|d| d.device.as_ref().is_some_and(|i| i.device_name == device))
            .map(|d| {
                assert_eq!(d.device.as_ref().unwrap().pool_name, "node-a");
                assert!(d.last_updated_time > 1_700_000_000, "{d:?}");
                d.health
            })
    };
    let first = devices.message().await.unwrap().unwrap();
    assert_eq!(first.devices.len(), 4, "{first:?}");
    // The mixed node's T4 (gpu-3) is unhealthy in the inventory, the others are healthy.
    assert_eq!(
        status_of(&first, "gpu-3"),
        Some(health::HealthStatus::Unhealthy as i32)
    );
    assert_eq!(
        status_of(&first, "gpu-0"),
        Some(health::HealthStatus::Healthy as i32)
    );
    // gpu-0 turns unhealthy (an Xid event): the stream says so.
    let inventory = example("fake-gpus-mixed.yaml").replace(
        "unhealthy:\n",
        "unhealthy:\n  GPU-8a1d3c52-0000-4b7e-a1f0-1c2d3e4f5a60: \"Xid 48: double-bit ECC error\"\n",
    );
    h.write_inventory(&inventory);
    let changed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = devices.message().await.unwrap().unwrap();
            if status_of(&m, "gpu-0") == Some(health::HealthStatus::Unhealthy as i32) {
                return m;
            }
        }
    })
    .await
    .expect("the health stream reported gpu-0 unhealthy");
    assert_eq!(
        status_of(&changed, "gpu-3"),
        Some(health::HealthStatus::Unhealthy as i32)
    );
    running.shutdown().await.unwrap();
}
