//! Rolling updates with maxSurge: two plugin instances on one node, each with its own socket
//! names, sharing the plugin directory; and the TCP gRPC health endpoint the kubelet's
//! `grpc:` probes reach.

mod common;

use common::*;
use dra::kubeletplugin::REGISTERED_SERVICE;
use fake_apiserver::DraVersions;
use kubelet_plugin::discovery::GpuSource;
use kubelet_plugin::discovery::fake::FakeSource;
use kubelet_plugin::plugin::{self, PluginConfig};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use vgpu_proto::dra::v1;
use vgpu_proto::pluginregistration as reg;
use vgpu_proto::uds;

const OLD: &str = "0b6f3c1e-5d2a-4c7b-9e8f-1a2b3c4d5e6f";
const NEW: &str = "7c9d2e4f-1a3b-4c5d-8e6f-a0b1c2d3e4f5";

fn instance(h: &Harness, uid: &str) -> PluginConfig {
    let mut cfg = h.config();
    cfg.rolling_update_uid = Some(uid.into());
    cfg
}

fn source(h: &Harness) -> GpuSource {
    GpuSource::Fake(FakeSource::new(
        h.path("inventory.yaml"),
        Duration::from_millis(25),
    ))
}

fn dra_socket(h: &Harness, uid: &str) -> PathBuf {
    h.path(&format!("plugins/vgpu.hami.io/dra-{uid}.sock"))
}

fn registration_socket(h: &Harness, uid: &str) -> PathBuf {
    h.path(&format!("plugins_registry/vgpu.hami.io-{uid}-reg.sock"))
}

async fn client(
    path: &std::path::Path,
) -> v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel> {
    v1::dra_plugin_client::DraPluginClient::new(uds::connect(path).await.unwrap())
}

async fn prepare(
    h: &Harness,
    uid: &str,
    claim: &str,
    name: &str,
) -> v1::NodePrepareResourceResponse {
    client(&dra_socket(h, uid))
        .await
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: vec![v1_claim(claim, name)],
        })
        .await
        .unwrap()
        .into_inner()
        .claims
        .remove(claim)
        .unwrap()
}

async fn unprepare(h: &Harness, uid: &str, claim: &str, name: &str) -> String {
    client(&dra_socket(h, uid))
        .await
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: vec![v1_claim(claim, name)],
        })
        .await
        .unwrap()
        .into_inner()
        .claims
        .remove(claim)
        .unwrap()
        .error
}

fn checkpointed(h: &Harness) -> Vec<String> {
    kubelet_plugin::checkpoint::Checkpoint::in_dir(&h.path("plugins/vgpu.hami.io"))
        .load()
        .unwrap()
        .claims
        .into_keys()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_node_during_a_rolling_update() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let old = h.start_with(instance(&h, OLD)).await;
    let a = h.put_claim(&ClaimSpec::sliced("a", &["gpu-0"], "4Gi", 60));
    assert_eq!(prepare(&h, OLD, &a, "a").await.error, "");

    // The new instance starts beside the old one: its own sockets, the same directory.
    let new = h.start_with(instance(&h, NEW)).await;
    for path in [
        dra_socket(&h, OLD),
        registration_socket(&h, OLD),
        dra_socket(&h, NEW),
        registration_socket(&h, NEW),
    ] {
        assert!(path.exists(), "{}", path.display());
    }
    // Each sees what the other prepared: the new one answers for a, and refuses b, which
    // would over-commit gpu-0 with a (prepared by the old one).
    let again = prepare(&h, NEW, &a, "a").await;
    assert_eq!(again.error, "");
    let b = h.put_claim(&ClaimSpec::sliced("b", &["gpu-0"], "4Gi", 60));
    let refused = prepare(&h, NEW, &b, "b").await;
    assert!(refused.error.contains("over-committed"), "{refused:?}");
    // The old one, still reachable, prepares c; the new one unprepares a.
    let c = h.put_claim(&ClaimSpec::sliced("c", &["gpu-1"], "4Gi", 10));
    assert_eq!(prepare(&h, OLD, &c, "c").await.error, "");
    assert_eq!(unprepare(&h, NEW, &a, "a").await, "");
    assert_eq!(checkpointed(&h), vec![c.clone()]);
    // Now b fits, through the old one, whose in-memory view still had a.
    assert_eq!(prepare(&h, OLD, &b, "b").await.error, "");
    let mut want = vec![b.clone(), c.clone()];
    want.sort();
    assert_eq!(checkpointed(&h), want);

    // The old instance stops: only its own sockets go.
    old.shutdown().await.unwrap();
    assert!(!dra_socket(&h, OLD).exists() && !registration_socket(&h, OLD).exists());
    assert!(dra_socket(&h, NEW).exists() && registration_socket(&h, NEW).exists());
    assert_eq!(unprepare(&h, NEW, &b, "b").await, "");
    assert_eq!(unprepare(&h, NEW, &c, "c").await, "");
    assert!(checkpointed(&h).is_empty());
    new.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_sockets_are_removed_by_the_next_one() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    // What a SIGKILLed instance leaves: its socket files, nothing listening.
    for path in [dra_socket(&h, OLD), registration_socket(&h, OLD)] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    }
    let live = h.start_with(instance(&h, NEW)).await;
    assert!(!dra_socket(&h, OLD).exists() && !registration_socket(&h, OLD).exists());
    // A third instance keeps the live one's sockets.
    let third = "11111111-2222-4333-8444-555555555555";
    let next = h.start_with(instance(&h, third)).await;
    assert!(dra_socket(&h, NEW).exists() && registration_socket(&h, NEW).exists());
    next.shutdown().await.unwrap();
    live.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_without_a_rolling_update_uid_is_refused() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let first = h.start().await;
    let err = plugin::start(h.config(), h.server.client(), source(&h), None)
        .await
        .err()
        .expect("two instances with the same socket names would replace each other's sockets");
    let msg = err.to_string();
    assert!(
        msg.contains("plugin.lock") && msg.contains("another kubelet-plugin"),
        "{msg}"
    );
    // The first one still serves.
    assert!(h.dra_socket().exists() && h.registration_socket().exists());
    first.shutdown().await.unwrap();
}

async fn health(addr: std::net::SocketAddr, service: &str) -> Result<ServingStatus, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_health_endpoint_serves_only_while_the_sockets_do() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let mut cfg = instance(&h, NEW);
    cfg.healthcheck_addr = Some("127.0.0.1:0".parse().unwrap());
    let running = h.start_with(cfg).await;
    let addr = running.healthcheck_addr().expect("a TCP health endpoint");
    assert_ne!(addr.port(), 0);
    for service in [
        "",
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
        "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
    ] {
        assert_eq!(
            health(addr, service).await,
            Ok(ServingStatus::Serving),
            "{service:?}"
        );
    }
    // No kubelet has registered it: alive, not ready.
    assert_eq!(
        health(addr, REGISTERED_SERVICE).await,
        Ok(ServingStatus::NotServing)
    );
    let unknown = health(addr, "no.such.Service").await.unwrap_err();
    assert!(
        unknown.contains("NotFound") || unknown.contains("not found"),
        "{unknown}"
    );
    running.shutdown().await.unwrap();
    // The endpoint stops with the sockets: the probe fails.
    let after = health(addr, "").await;
    assert!(after.is_err(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_health_port_fails_the_start_with_its_address() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = instance(&h, NEW);
    cfg.healthcheck_addr = Some(taken.local_addr().unwrap());
    let err = plugin::start(cfg, h.server.client(), source(&h), None)
        .await
        .err()
        .expect("the health port is taken");
    let msg = err.to_string();
    assert!(
        msg.contains(&taken.local_addr().unwrap().to_string()) && msg.contains("health"),
        "{msg}"
    );
    // Nothing is left for the kubelet to dial.
    assert!(!dra_socket(&h, NEW).exists() && !registration_socket(&h, NEW).exists());
}

/// The registration socket's identity: a new one means the socket was offered again (the
/// change time too, as a freed inode number may be reused at once).
fn inode(path: &std::path::Path) -> Option<(u64, i64, i64)> {
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the kubelet's plugin watcher does with a registration socket: GetInfo, then its
/// verdict.
async fn kubelet_verdict(socket: &std::path::Path, registered: bool) {
    let mut client =
        reg::registration_client::RegistrationClient::new(uds::connect(socket).await.unwrap());
    client.get_info(reg::InfoRequest {}).await.unwrap();
    client
        .notify_registration_status(reg::RegistrationStatus {
            plugin_registered: registered,
            error: if registered {
                String::new()
            } else {
                "endpoint already registered".into()
            },
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_registered_and_an_ignored_or_rejected_registration_is_offered_again() {
    let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
    let mut cfg = instance(&h, NEW);
    cfg.healthcheck_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.registration_patience = Duration::from_millis(300);
    let running = h.start_with(cfg).await;
    let addr = running.healthcheck_addr().unwrap();
    let socket = registration_socket(&h, NEW);
    let ready = async || health(addr, REGISTERED_SERVICE).await;

    // No kubelet answers: the socket is offered again, a new file for the plugin watcher.
    let first = inode(&socket).expect("the registration socket is served");
    assert_eq!(ready().await, Ok(ServingStatus::NotServing));
    let second = eventually("the socket offered again", async || {
        inode(&socket).filter(|i| *i != first)
    })
    .await;

    // The kubelet registers it: ready, and it stays where it is.
    let registered = || {
        running
            .metrics()
            .encode()
            .contains("\nvgpu_kubelet_plugin_registered 1\n")
    };
    assert!(!registered(), "{}", running.metrics().encode());
    kubelet_verdict(&socket, true).await;
    eventually("readiness", async || {
        (ready().await == Ok(ServingStatus::Serving)).then_some(())
    })
    .await;
    eventually("the registration gauge", async || {
        registered().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        inode(&socket),
        Some(second),
        "a registered socket is left alone"
    );
    assert_eq!(health(addr, "").await, Ok(ServingStatus::Serving));

    // A restarted kubelet rejects it: not ready, and offered again at once.
    kubelet_verdict(&socket, false).await;
    eventually("not ready after the rejection", async || {
        (ready().await == Ok(ServingStatus::NotServing)).then_some(())
    })
    .await;
    eventually("the gauge at 0", async || (!registered()).then_some(())).await;
    let third = eventually("the socket offered again", async || {
        inode(&socket).filter(|i| *i != second)
    })
    .await;
    kubelet_verdict(&socket, true).await;
    eventually("ready again", async || {
        (ready().await == Ok(ServingStatus::Serving)).then_some(())
    })
    .await;
    assert_eq!(inode(&socket), Some(third));

    running.shutdown().await.unwrap();
    assert!(!socket.exists() && !dra_socket(&h, NEW).exists());
}
