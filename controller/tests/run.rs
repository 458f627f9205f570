//! The Kubernetes loop against an in-memory API server: the allocation written (finalizer
//! first, then status in one update), resource.k8s.io version discovery, Events and retry
//! when capacity frees, conflict retry, a restart rebuilding the same state, nodes the
//! scheduler rejected avoided, and two replicas under leader election never double-booking.
//! The API server is the workspace's fake-apiserver; on 1.32 (v1beta1 only) it stores
//! v1beta1, so those tests exercise the converting client.

use controller::run::leader::LeaseTiming;
use controller::run::metrics::Metrics;
use controller::run::reconcile::Backoff;
use controller::run::{Controller, LeaderElection, Options, Status};
use dra::ApiVersion;
use fake_apiserver::{DraVersions, FakeApiServer, Gvr, Verb};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use test_support::gpu;
use vgpu_driver::class::{controller_selector, scheduling_gate};
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{ClaimAllocation, NodeRef, PoolOptions};

const DRIVER: &str = "vgpu.hami.io";
const SLICE: &str = "gpu-slice.vgpu.hami.io";
const GI: u64 = 1 << 30;

fn claims_gvr(version: ApiVersion) -> Gvr {
    Gvr::new("resource.k8s.io", version.version(), "resourceclaims")
}

/// The fake API server with the calls these tests make, on objects as JSON.
struct FakeApi {
    server: FakeApiServer,
}

impl FakeApi {
    async fn start(dra: DraVersions) -> FakeApi {
        FakeApi {
            server: FakeApiServer::start_with_builtin(dra).await.unwrap(),
        }
    }

    fn client(&self) -> kube::Client {
        self.server.client()
    }

    /// Where the server stores an object of this apiVersion and kind.
    fn gvr_of(&self, object: &Value) -> Gvr {
        let (api_version, kind) = (
            object["apiVersion"].as_str().unwrap(),
            object["kind"].as_str().unwrap(),
        );
        self.server
            .registered()
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind == kind)
            .unwrap_or_else(|| panic!("the fake API server does not serve {api_version} {kind}"))
            .gvr()
    }

    fn key(&self, object: &Value) -> (Gvr, String, String) {
        let meta = &object["metadata"];
        (
            self.gvr_of(object),
            meta["namespace"].as_str().unwrap_or("").to_string(),
            meta["name"].as_str().unwrap().to_string(),
        )
    }

    /// Stored as another client would have created it.
    fn create(&self, object: Value) -> Value {
        self.server
            .put_object(self.gvr_of(&object), object)
            .unwrap()
    }

    fn get(&self, object: &Value) -> Option<Value> {
        let (gvr, namespace, name) = self.key(object);
        self.server.get(gvr, &namespace, &name)
    }

    fn list(&self, gvr: Gvr) -> Vec<Value> {
        self.server.list(gvr)
    }

    fn events(&self) -> Vec<Value> {
        self.list(Gvr::new("events.k8s.io", "v1", "events"))
    }

    /// Changed as another client (the kube-scheduler, say) would.
    fn modify(&self, object: &Value, edit: impl FnOnce(&mut Value)) {
        let (gvr, namespace, name) = self.key(object);
        self.server
            .update_object(gvr, &namespace, &name, edit)
            .unwrap();
    }

    /// Gone, finalizers and all, as after kube-controller-manager cleaned up.
    fn remove(&self, object: &Value) {
        let (gvr, namespace, name) = self.key(object);
        self.server
            .update_object(&gvr, &namespace, &name, |o| {
                o["metadata"]["finalizers"] = Value::Null;
            })
            .unwrap();
        self.server.delete_object(gvr, &namespace, &name).unwrap();
    }

    /// The controller's successful writes, as `METHOD path`.
    fn writes(&self) -> Vec<String> {
        self.server
            .writes()
            .iter()
            .map(|w| {
                let method = match w.verb {
                    Verb::Create => "POST",
                    Verb::Update => "PUT",
                    Verb::Patch => "PATCH",
                    Verb::Delete | Verb::DeleteCollection => "DELETE",
                    Verb::Get | Verb::List | Verb::Watch => "GET",
                };
                format!("{method} {}", w.path)
            })
            .collect()
    }
}

fn version_str(v: ApiVersion) -> &'static str {
    v.as_str()
}

/// A cluster of `nodes` each with `gpus` 80 GiB GPUs and the slice DeviceClass.
fn cluster(fake: &FakeApi, version: ApiVersion, nodes: &[&str], gpus: u32) {
    let devices = gpu_devices(&(0..gpus).map(gpu).collect::<Vec<_>>()).unwrap();
    for name in nodes {
        fake.create(
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110"}}}),
        );
        for (i, slice) in render_pool(
            &NodeRef {
                name: name.to_string(),
                uid: format!("uid-{name}"),
            },
            &devices,
            &PoolOptions::new(DRIVER),
        )
        .unwrap()
        .into_iter()
        .enumerate()
        {
            let mut s = dra::convert::to_wire(&slice, version);
            s["metadata"]["name"] = json!(format!("{name}-{i}"));
            fake.create(s);
        }
    }
    fake.create(json!({"apiVersion": version_str(version), "kind": "DeviceClass",
        "metadata": {"name": SLICE},
        "spec": {"selectors": [
            {"cel": {"expression": format!("device.driver == \"{DRIVER}\"")}},
            {"cel": {"expression": controller_selector(DRIVER)}}],
          "config": [{"opaque": {"driver": DRIVER, "parameters": {"apiVersion": API_VERSION, "kind": KIND, "cores": 10}}}]}}));
}

fn claim(version: ApiVersion, name: &str, memory_gib: u64) -> Value {
    let request = match version {
        ApiVersion::V1 => json!({"name": "gpu", "exactly": {"deviceClassName": SLICE}}),
        ApiVersion::V1beta1 => json!({"name": "gpu", "deviceClassName": SLICE}),
    };
    json!({"apiVersion": version_str(version), "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"devices": {"requests": [request],
            "config": [{"requests": ["gpu"], "opaque": {"driver": DRIVER,
                "parameters": {"apiVersion": API_VERSION, "kind": KIND, "memory": format!("{memory_gib}Gi"), "cores": 20}}}]}}})
}

/// A pending pod using claim `claim`.
fn pod(name: &str, claim: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ml"},
        "spec": {"containers": [{"name": "c", "image": "cuda",
                                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}],
                 "resourceClaims": [{"name": "gpu", "resourceClaimName": claim}]},
        "status": {"phase": "Pending"}})
}

/// A claim and its pending pod.
fn workload(fake: &FakeApi, version: ApiVersion, name: &str, memory_gib: u64) -> Value {
    let c = fake.create(claim(version, name, memory_gib));
    fake.create(pod(&format!("{name}-pod"), name));
    c
}

fn options(identity: &str) -> Options {
    let mut o = Options::new(DRIVER, identity);
    o.debounce = Duration::from_millis(20);
    o.resync = Duration::from_millis(500);
    o.backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(1),
    };
    o
}

struct Running {
    task: tokio::task::JoinHandle<()>,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
    /// What /readyz answers.
    synced: Arc<AtomicBool>,
}

impl Running {
    fn status(&self) -> Status {
        self.status.lock().unwrap().clone()
    }
}

fn start(fake: &FakeApi, options: Options) -> Running {
    let metrics = Arc::new(Metrics::new());
    let controller = Controller::new(fake.client(), options, metrics.clone());
    let status = controller.status();
    let synced = controller.synced();
    let task = tokio::spawn(async move {
        if let Err(e) = controller.run(futures::future::pending()).await {
            panic!("controller stopped: {e}");
        }
    });
    Running {
        task,
        status,
        metrics,
        synced,
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn allocation(fake: &FakeApi, claim: &Value) -> Option<ClaimAllocation> {
    let stored = fake.get(claim)?;
    if stored["status"]["allocation"].is_null() {
        return None;
    }
    Some(ClaimAllocation::of(&dra::convert::from_wire(stored).unwrap()).unwrap())
}

/// Successful status writes per claim name.
fn status_writes(fake: &FakeApi) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for w in fake.server.writes() {
        if w.verb == Verb::Patch && w.subresource.as_deref() == Some("status") {
            *out.entry(w.name).or_default() += 1;
        }
    }
    out
}

/// Memory allocated per (node, device), recomputed from the stored claims alone.
fn usage(fake: &FakeApi) -> BTreeMap<(String, String), u64> {
    let mut used = BTreeMap::new();
    for c in fake.list(claims_gvr(ApiVersion::V1)) {
        if let Some(a) = allocation(fake, &c) {
            for r in &a.results {
                let limits = a.slice_limits(r, 80 * GI).unwrap();
                *used.entry((r.pool.clone(), r.device.clone())).or_default() += limits.memory_bytes;
            }
        }
    }
    used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_is_written_finalizer_first_then_status_in_one_patch() {
    let fake = FakeApi::start(DraVersions::Both).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 2);
    let c = workload(&fake, ApiVersion::V1, "infer", 10);
    let running = start(&fake, options("replica-1"));
    eventually("the claim is allocated", || allocation(&fake, &c).is_some()).await;
    assert!(running.synced.load(Ordering::SeqCst), "ready once synced");
    let stored = fake.get(&c).unwrap();
    assert_eq!(
        stored["metadata"]["finalizers"],
        json!(["resource.kubernetes.io/delete-protection"])
    );
    let a = allocation(&fake, &c).unwrap();
    assert_eq!(a.node_name.as_deref(), Some("node-a"));
    assert_eq!(a.results.len(), 1);
    assert_eq!(
        (a.results[0].driver.as_str(), a.results[0].pool.as_str()),
        (DRIVER, "node-a")
    );
    // Class configuration first (FromClass), then the claim's (FromClaim): 10 Gi, 20 %.
    let sources: Vec<String> = stored["status"]["allocation"]["devices"]["config"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["source"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sources, ["FromClass", "FromClaim"]);
    let limits = a.slice_limits(&a.results[0], 80 * GI).unwrap();
    assert_eq!((limits.memory_bytes, limits.cores), (10 * GI, 20));
    // The finalizer patch precedes the status patch, and there is one status patch.
    let claim_writes: Vec<String> = fake
        .writes()
        .into_iter()
        .filter(|w| w.contains("/resourceclaims/"))
        .collect();
    assert_eq!(
        claim_writes,
        [
            "PATCH /apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/infer",
            "PATCH /apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/infer/status"
        ]
    );
    // The stored claim is a valid Kubernetes 1.34 object.
    let mut object = stored.clone();
    object["metadata"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| k != "creationTimestamp");
    test_support::validate_k8s(&[object], "1.34.0").unwrap();
    // An Event says where it went.
    eventually("an Allocated event", || {
        fake.events()
            .iter()
            .any(|e| e["reason"] == "Allocated" && e["regarding"]["name"] == "infer")
    })
    .await;
    assert_eq!(running.status().version, Some(ApiVersion::V1));
    let text = running.metrics.render();
    assert!(
        text.contains("vgpu_controller_claims_allocated_total 1"),
        "{text}"
    );
    assert!(
        text.contains("vgpu_controller_gpu_memory_allocated_bytes{node=\"node-a\""),
        "{text}"
    );
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1beta1_cluster_is_allocated_through_v1beta1() {
    let fake = FakeApi::start(DraVersions::V1beta1Only).await;
    cluster(&fake, ApiVersion::V1beta1, &["node-a"], 1);
    let c = workload(&fake, ApiVersion::V1beta1, "old-cluster", 8);
    let running = start(&fake, options("replica-1"));
    eventually("the claim is allocated", || allocation(&fake, &c).is_some()).await;
    assert_eq!(running.status().version, Some(ApiVersion::V1beta1));
    assert!(fake.writes().iter().any(|w| w
        == "PATCH /apis/resource.k8s.io/v1beta1/namespaces/ml/resourceclaims/old-cluster/status"));
    // Stored as v1beta1 (the request's fields beside its name, no `exactly`).
    let stored = fake.get(&c).unwrap();
    assert_eq!(stored["apiVersion"], "resource.k8s.io/v1beta1");
    assert_eq!(
        stored["spec"]["devices"]["requests"][0]["deviceClassName"],
        SLICE
    );
    // The Event points at the claim as this cluster serves it.
    eventually("an Allocated event regarding the v1beta1 claim", || {
        fake.events().iter().any(|e| {
            e["reason"] == "Allocated"
                && e["regarding"]["name"] == "old-cluster"
                && e["regarding"]["apiVersion"] == "resource.k8s.io/v1beta1"
        })
    })
    .await;
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_claim_gets_an_event_and_is_retried_when_capacity_frees() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 1);
    let big = workload(&fake, ApiVersion::V1, "big", 60);
    let mut o = options("replica-1");
    // Long back-off: only freed capacity can explain a quick retry.
    o.backoff = Backoff {
        initial: Duration::from_secs(300),
        max: Duration::from_secs(300),
    };
    o.resync = Duration::from_secs(300);
    let running = start(&fake, o);
    eventually("big is allocated", || allocation(&fake, &big).is_some()).await;
    let second = workload(&fake, ApiVersion::V1, "second", 40);
    eventually("a FailedAllocation event for second", || {
        fake.events().iter().any(|e| {
            e["reason"] == "FailedAllocation"
                && e["type"] == "Warning"
                && e["regarding"]["name"] == "second"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("40Gi") && n.contains("0/1 nodes"))
        })
    })
    .await;
    assert!(allocation(&fake, &second).is_none());
    // kube-controller-manager deallocates big (its pod finished) and removes it.
    fake.remove(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big-pod", "namespace": "ml"}}));
    fake.remove(&big);
    eventually("second is allocated once big is gone", || {
        allocation(&fake, &second).is_some()
    })
    .await;
    assert!(
        running
            .metrics
            .render()
            .contains("vgpu_controller_claims_refused_total{reason=\"insufficient_capacity\"}")
    );
    running.task.abort();
}

/// The gates of a stored pod, by name.
fn gates(fake: &FakeApi, pod: &Value) -> Vec<String> {
    fake.get(pod).unwrap()["spec"]["schedulingGates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_pods_gate_is_lifted_once_its_template_claim_is_created_and_allocated() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 1);
    let gate = scheduling_gate(DRIVER);
    let gated = |name: &str, claim: Value| {
        let mut p = pod(name, "");
        p["spec"]["resourceClaims"] = json!([claim]);
        p["spec"]["schedulingGates"] = json!([{"name": "other.io/quota"}, {"name": gate}]);
        fake.create(p)
    };
    // Its claim comes from a template: not created yet.
    let infer = gated(
        "infer",
        json!({"name": "gpu", "resourceClaimTemplateName": "t"}),
    );
    // Its claim can never fit (100Gi on an 80Gi GPU).
    fake.create(claim(ApiVersion::V1, "huge", 100));
    let huge = gated(
        "huge-pod",
        json!({"name": "gpu", "resourceClaimName": "huge"}),
    );
    let running = start(&fake, options("replica-1"));
    eventually("huge is refused", || {
        running
            .status()
            .last
            .refused
            .iter()
            .any(|(c, _)| c == "ml/huge")
    })
    .await;
    assert_eq!(gates(&fake, &infer), ["other.io/quota", gate.as_str()]);
    // The resourceclaim controller creates the claim and names it in the pod's status.
    let c = fake.create(claim(ApiVersion::V1, "infer-gpu-x7k2p", 10));
    fake.modify(&infer, |p| {
        p["status"]["resourceClaimStatuses"] =
            json!([{"name": "gpu", "resourceClaimName": "infer-gpu-x7k2p"}]);
    });
    eventually("infer's gate is lifted", || gates(&fake, &infer).len() == 1).await;
    assert!(
        allocation(&fake, &c).is_some(),
        "lifted only once allocated"
    );
    // Only our gate went; the other one is someone else's to lift.
    assert_eq!(gates(&fake, &infer), ["other.io/quota"]);
    assert_eq!(running.status().allocated, 1);
    // The pod that cannot be placed keeps its gate: ungated it would only go into back-off.
    assert_eq!(gates(&fake, &huge), ["other.io/quota", gate.as_str()]);
    let lifts = fake
        .server
        .writes()
        .iter()
        .filter(|w| w.verb == Verb::Patch && w.path.contains("/pods/"))
        .count();
    assert_eq!(lifts, 1, "one patch per lifted gate");
    assert!(
        running
            .metrics
            .render()
            .contains("vgpu_controller_scheduling_gates_lifted_total 1")
    );
    running.task.abort();
}

/// The value of the sample `series` (name and labels, as rendered) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Warning Events regarding a `kind` named `name`.
fn warnings(fake: &FakeApi, kind: &str, name: &str) -> Vec<Value> {
    fake.events()
        .into_iter()
        .filter(|e| {
            e["type"] == "Warning"
                && e["regarding"]["kind"] == kind
                && e["regarding"]["name"] == name
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_pod_gets_the_event_kept_alive_as_a_series_and_is_counted_once() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 1);
    let big = workload(&fake, ApiVersion::V1, "big", 60);
    let mut o = options("replica-1");
    // Retried every 100 ms and re-published every 300 ms: several refusals per refresh, and
    // several refreshes within the Recorder's 6 minutes.
    o.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(100),
    };
    o.resync = Duration::from_millis(100);
    o.event_refresh = Duration::from_millis(300);
    let running = start(&fake, o);
    eventually("big is allocated", || allocation(&fake, &big).is_some()).await;
    workload(&fake, ApiVersion::V1, "second", 40);
    // `kubectl describe pod` shows the pod's Events: the pod has its own.
    eventually("a FailedAllocation event on the pod", || {
        warnings(&fake, "Pod", "second-pod").iter().any(|e| {
            e["reason"] == "FailedAllocation"
                && e["note"].as_str().is_some_and(|n| {
                    n.contains("InsufficientCapacity: request gpu needs 1 GPU with 40Gi and 20% cores free: 1 GPUs match on nodes the pod may run on, none has room")
                })
        })
    })
    .await;
    // Kept alive: the same Event updated as a series (count, lastObservedTime), which
    // renews its TTL, rather than a new Event per retry.
    eventually("the pod's and the claim's Events refreshed twice", || {
        ["Pod:second-pod", "ResourceClaim:second"].iter().all(|k| {
            let (kind, name) = k.split_once(':').unwrap();
            warnings(&fake, kind, name)
                .iter()
                .any(|e| e["series"]["count"].as_i64().is_some_and(|c| c >= 3))
        })
    })
    .await;
    assert_eq!(warnings(&fake, "Pod", "second-pod").len(), 1);
    assert_eq!(warnings(&fake, "ResourceClaim", "second").len(), 1);
    let pod_event = &warnings(&fake, "Pod", "second-pod")[0];
    assert_eq!(pod_event["regarding"]["apiVersion"], "v1");
    assert_eq!(pod_event["regarding"]["namespace"], "ml");
    // Many refusals, one claim refused: counted once.
    assert!(running.status().passes >= 3);
    let text = running.metrics.render();
    assert_eq!(
        sample(
            &text,
            "vgpu_controller_claims_refused_total{reason=\"insufficient_capacity\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "vgpu_controller_pending_claims{reason=\"insufficient_capacity\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "vgpu_controller_pending_claims{reason=\"no_matching_gpu\"}"
        ),
        Some(0.0),
        "{text}"
    );
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_no_gpu_matches_is_told_apart_on_the_pod() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 1);
    let mut c = claim(ApiVersion::V1, "b200", 1);
    c["spec"]["devices"]["requests"][0]["exactly"]["selectors"] = json!([{"cel": {
        "expression": format!("device.attributes[\"{DRIVER}\"].productName == \"NVIDIA B200\"")}}]);
    fake.create(c);
    fake.create(pod("b200-pod", "b200"));
    let running = start(&fake, options("replica-1"));
    eventually("a NoMatchingGpu event on the pod", || {
        warnings(&fake, "Pod", "b200-pod").iter().any(|e| {
            e["reason"] == "FailedAllocation"
                && e["note"].as_str().is_some_and(|n| {
                    n.contains("NoMatchingGpu: request gpu: no GPU matches device class gpu-slice.vgpu.hami.io and the request's selectors (1 GPUs checked)")
                })
        })
    })
    .await;
    eventually("counted as no_matching_gpu", || {
        sample(
            &running.metrics.render(),
            "vgpu_controller_pending_claims{reason=\"no_matching_gpu\"}",
        ) == Some(1.0)
    })
    .await;
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_is_retried_and_the_gpu_never_booked_twice() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 1);
    // Two 50Gi claims for one 80Gi GPU: the older one is decided first and charged while its
    // write is in flight, so the younger one is refused; that write then fails (500).
    let first = workload(&fake, ApiVersion::V1, "first", 50);
    let second = workload(&fake, ApiVersion::V1, "second", 50);
    fake.server.inject_faults(
        claims_gvr(ApiVersion::V1),
        1,
        fake_apiserver::Fault::InternalError,
    );
    let running = start(&fake, options("replica-1"));
    eventually("one of the two is allocated", || {
        allocation(&fake, &first).is_some() || allocation(&fake, &second).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The claim whose write failed is retried after its back-off and allocated, not refused
    // for room it holds itself; the other never joins it on the GPU.
    assert!(
        allocation(&fake, &first).is_some(),
        "{:?}",
        running.status().last
    );
    assert!(allocation(&fake, &second).is_none());
    assert_eq!(usage(&fake).values().sum::<u64>(), 50 * GI);
    assert_eq!(
        fake.server.request_count(
            Verb::Patch,
            "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/first"
        ),
        2,
        "the finalizer patch failed once, then landed"
    );
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_rereads_and_retries_without_double_booking() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 1);
    // With the finalizer already there, the status update is the first write; it meets a
    // conflict.
    let mut protected = claim(ApiVersion::V1, "contended", 30);
    protected["metadata"]["finalizers"] = json!(["resource.kubernetes.io/delete-protection"]);
    let c = fake.create(protected);
    fake.create(pod("contended-pod", "contended"));
    fake.server.inject_conflicts(claims_gvr(ApiVersion::V1), 1);
    let running = start(&fake, options("replica-1"));
    eventually("the claim is allocated", || allocation(&fake, &c).is_some()).await;
    let path = "/apis/resource.k8s.io/v1/namespaces/ml/resourceclaims/contended";
    assert_eq!(
        fake.server
            .request_count(Verb::Patch, &format!("{path}/status")),
        2,
        "one conflict, then one successful write"
    );
    assert_eq!(status_writes(&fake).get("contended"), Some(&1));
    // The retry started from a fresh read, not from the cached copy.
    assert!(fake.server.request_count(Verb::Get, path) >= 1);
    assert!(
        running
            .metrics
            .render()
            .contains("vgpu_controller_write_conflicts_total 1")
    );
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_rebuilds_the_same_state() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a", "node-b"], 2);
    let claims: Vec<Value> = (0..5)
        .map(|i| workload(&fake, ApiVersion::V1, &format!("c{i}"), 30))
        .collect();
    let first = start(&fake, options("replica-1"));
    eventually("all five allocated", || {
        claims.iter().all(|c| allocation(&fake, c).is_some())
    })
    .await;
    // The engine's state as the per-GPU metrics show it: memory, cores and claims per GPU.
    let gpu_state = |r: &Running| -> Vec<String> {
        let mut lines: Vec<String> = r
            .metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("vgpu_controller_gpu_"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let claims_held = |r: &Running| -> f64 {
        gpu_state(r)
            .iter()
            .filter(|l| l.starts_with("vgpu_controller_gpu_claims{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    eventually("a pass that saw all five", || claims_held(&first) == 5.0).await;
    let before = gpu_state(&first);
    assert!(before.len() >= 4 * 5, "{before:?}");
    first.task.abort();
    let _ = first.task.await;

    let second = start(&fake, options("replica-2"));
    eventually("the restarted controller made a pass", || {
        second.status().passes > 0
    })
    .await;
    eventually("the restarted controller's metrics", || {
        claims_held(&second) == 5.0
    })
    .await;
    assert_eq!(gpu_state(&second), before, "same state after restart");
    assert_eq!(second.status().allocated, 0, "nothing re-allocated");
    // New claims go where there is room: 4 GPUs x 80 GiB hold 8 slices of 30 GiB, 5 taken.
    let more: Vec<Value> = (5..9)
        .map(|i| workload(&fake, ApiVersion::V1, &format!("c{i}"), 30))
        .collect();
    eventually("three of four more allocated", || {
        more.iter()
            .filter(|c| allocation(&fake, c).is_some())
            .count()
            == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        more.iter()
            .filter(|c| allocation(&fake, c).is_some())
            .count(),
        3
    );
    for ((node, device), bytes) in usage(&fake) {
        assert!(bytes <= 80 * GI, "{node}/{device} holds {bytes} bytes");
    }
    assert!(status_writes(&fake).values().all(|n| *n == 1));
    second.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_scheduler_rejected_is_avoided_next_time() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a", "node-b"], 1);
    let c = workload(&fake, ApiVersion::V1, "picky", 10);
    let running = start(&fake, options("replica-1"));
    eventually("allocated", || allocation(&fake, &c).is_some()).await;
    let first = allocation(&fake, &c).unwrap().node_name.unwrap();
    // The kube-scheduler could not fit the pod there and cleared the allocation (PostFilter).
    fake.modify(&c, |o| {
        o["status"] = json!({});
    });
    eventually("allocated again", || allocation(&fake, &c).is_some()).await;
    let second = allocation(&fake, &c).unwrap().node_name.unwrap();
    assert_ne!(first, second, "the rejected node is avoided");
    running.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_double_book_and_the_standby_takes_over() {
    let fake = FakeApi::start(DraVersions::V1Only).await;
    cluster(&fake, ApiVersion::V1, &["node-a"], 2);
    let election = |identity: &str| {
        let mut o = options(identity);
        o.leader_election = Some(LeaderElection {
            namespace: "vgpu-system".into(),
            lease_name: "vgpu-controller".into(),
            timing: LeaseTiming {
                lease_duration: Duration::from_millis(1500),
                renew_deadline: Duration::from_millis(1000),
                retry_period: Duration::from_millis(200),
            },
        });
        o
    };
    let a = start(&fake, election("replica-a"));
    let b = start(&fake, election("replica-b"));
    // 2 GPUs x 80 GiB hold four 35 GiB slices; six are asked for.
    let claims: Vec<Value> = (0..6)
        .map(|i| workload(&fake, ApiVersion::V1, &format!("c{i}"), 35))
        .collect();
    eventually("four allocated", || {
        claims
            .iter()
            .filter(|c| allocation(&fake, c).is_some())
            .count()
            == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        claims
            .iter()
            .filter(|c| allocation(&fake, c).is_some())
            .count(),
        4
    );
    let (sa, sb) = (a.status(), b.status());
    assert!(
        sa.allocated == 0 || sb.allocated == 0,
        "only the leader writes: {:?} / {:?}",
        sa.allocated,
        sb.allocated
    );
    // Both replicas are ready: the standby can take over at once.
    assert!(a.synced.load(Ordering::SeqCst) && b.synced.load(Ordering::SeqCst));
    // Both report capacity and the two waiting claims from their own caches, the standby
    // too; only the leader counts refusals.
    eventually("both replicas' capacity and pending metrics", || {
        [&a, &b].iter().all(|r| {
            let text = r.metrics.render();
            let allocated: f64 = text
                .lines()
                .filter(|l| l.starts_with("vgpu_controller_gpu_memory_allocated_bytes{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            allocated == (4 * 35 * GI) as f64
                && sample(
                    &text,
                    "vgpu_controller_pending_claims{reason=\"insufficient_capacity\"}",
                ) == Some(2.0)
        })
    })
    .await;
    let standby_text = if sa.allocated == 0 {
        a.metrics.render()
    } else {
        b.metrics.render()
    };
    assert!(
        !standby_text.contains("vgpu_controller_claims_refused_total{"),
        "{standby_text}"
    );
    assert!(
        standby_text.contains("vgpu_controller_gpu_memory_free_bytes{node=\"node-a\",device=\"gpu-0\",uuid=\"GPU-00000000\",index=\"0\",model=\"NVIDIA H100 80GB HBM3\"}"),
        "{standby_text}"
    );
    let (leader, standby, standby_name) = if sa.allocated == 0 {
        (b, a, "replica-a")
    } else {
        (a, b, "replica-b")
    };
    // The leader goes away; two allocated claims are released.
    leader.task.abort();
    let _ = leader.task.await;
    let released: Vec<&Value> = claims
        .iter()
        .filter(|c| allocation(&fake, c).is_some())
        .take(2)
        .collect();
    for c in &released {
        let name = c["metadata"]["name"].as_str().unwrap().to_string();
        fake.remove(&json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("{name}-pod"), "namespace": "ml"}}));
        fake.remove(c);
    }
    eventually("the standby allocates the two waiting claims", || {
        claims
            .iter()
            .filter(|c| fake.get(c).is_some() && allocation(&fake, c).is_some())
            .count()
            == 4
    })
    .await;
    // The standby's status is updated when its pass ends, just after the writes.
    eventually("the standby reports its two allocations", || {
        standby.status().allocated == 2
    })
    .await;
    let lease = fake
        .server
        .get(
            Gvr::new("coordination.k8s.io", "v1", "leases"),
            "vgpu-system",
            "vgpu-controller",
        )
        .unwrap();
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap();
    assert!(
        holder.starts_with(&format!("{standby_name}_")),
        "{holder} is not {standby_name}"
    );
    // Never two status writes for one claim, never a GPU over its memory.
    assert!(
        status_writes(&fake).values().all(|n| *n == 1),
        "{:?}",
        status_writes(&fake)
    );
    for ((node, device), bytes) in usage(&fake) {
        assert!(bytes <= 80 * GI, "{node}/{device} holds {bytes} bytes");
    }
    standby.task.abort();
}
