//! A claim storm against two controller replicas (the real binary, leader election on) and a
//! fake API server that injects write conflicts, latency and dropped watches; the leader is
//! SIGKILLed mid-storm and restarted, as its Deployment would. Expected: no GPU over its
//! memory or cores (recomputed from what each claim asked, not from the controller's model),
//! every allocatable claim allocated exactly once, the unallocatable ones left pending, and
//! the time to recover after the failover measured; and the shipped RBAC granting exactly
//! the calls the replicas made.
//!
//! `STORM_CLAIMS` (200 by default, enough for `cargo test`) and `STORM_LEASE_SECONDS`
//! (2 by default; the binary's default is 15) scale it; RELIABILITY.md has the full run.

use fake_apiserver::rbac::{self, Permission, granted_to};
use fake_apiserver::{DraVersions, FakeApiServer, Gvr};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use test_support::gpu_with;
use vgpu_driver::class::{controller_selector, scheduling_gate};
use vgpu_driver::config::{API_VERSION, KIND};
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{NodeRef, PoolOptions};

const BIN: &str = env!("CARGO_BIN_EXE_controller");
const DRIVER: &str = "vgpu.hami.io";
const SLICE: &str = "gpu-slice.vgpu.hami.io";
const GI: u64 = 1 << 30;
const GPUS_PER_NODE: u32 = 8;
const GPU_MEMORY: u64 = 80 * GI;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn claims_gvr() -> Gvr {
    Gvr::new("resource.k8s.io", "v1", "resourceclaims")
}

/// What claim `i` asks for: (memory GiB, cores %). Every 100th asks for more memory than
/// any GPU has and can never be allocated.
fn ask(i: usize) -> (u64, u64) {
    if i % 100 == 99 {
        return (120, 10);
    }
    (1 + (i as u64 * 7) % 16, 5 + (i as u64 * 13) % 36)
}

fn allocatable(i: usize) -> bool {
    ask(i).0 * GI <= GPU_MEMORY
}

/// Nodes enough for the storm's cores at about 60 % of the cluster.
fn cluster(server: &FakeApiServer, claims: usize) -> usize {
    let cores: u64 = (0..claims)
        .filter(|i| allocatable(*i))
        .map(|i| ask(i).1)
        .sum();
    let nodes = (cores as f64 / 100.0 / f64::from(GPUS_PER_NODE) / 0.6).ceil() as usize;
    let devices = gpu_devices(
        &(0..GPUS_PER_NODE)
            .map(|i| gpu_with(i, GPU_MEMORY / GI, Some(0), &[]))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    for n in 0..nodes {
        let name = format!("node-{n:04}");
        server
            .put_object(
                Gvr::new("", "v1", "nodes"),
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                       "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110"}}}),
            )
            .unwrap();
        let node = NodeRef {
            name: name.clone(),
            uid: format!("uid-{name}"),
        };
        for (i, slice) in render_pool(&node, &devices, &PoolOptions::new(DRIVER))
            .unwrap()
            .into_iter()
            .enumerate()
        {
            let mut s = dra::convert::to_wire(&slice, dra::ApiVersion::V1);
            s["metadata"]["name"] = json!(format!("{name}-{i}"));
            server
                .put_object(Gvr::new("resource.k8s.io", "v1", "resourceslices"), s)
                .unwrap();
        }
    }
    server
        .put_object(
            Gvr::new("resource.k8s.io", "v1", "deviceclasses"),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "DeviceClass",
                "metadata": {"name": SLICE},
                "spec": {"selectors": [
                    {"cel": {"expression": format!("device.driver == \"{DRIVER}\"")}},
                    {"cel": {"expression": controller_selector(DRIVER)}}]}}),
        )
        .unwrap();
    nodes
}

/// Every fourth pod is created behind the controller's scheduling gate.
fn gated(i: usize) -> bool {
    i.is_multiple_of(4)
}

fn workload(server: &FakeApiServer, i: usize) {
    let (memory, cores) = ask(i);
    let name = format!("c{i:05}");
    server
        .put_object(
            claims_gvr(),
            json!({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
                "metadata": {"name": name, "namespace": "ml"},
                "spec": {"devices": {
                    "requests": [{"name": "gpu", "exactly": {"deviceClassName": SLICE}}],
                    "config": [{"requests": ["gpu"], "opaque": {"driver": DRIVER, "parameters":
                        {"apiVersion": API_VERSION, "kind": KIND, "memory": format!("{memory}Gi"), "cores": cores}}}]}}}),
        )
        .unwrap();
    server
        .put_object(
            Gvr::new("", "v1", "pods"),
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("{name}-pod"), "namespace": "ml"},
                "spec": {"containers": [{"name": "c", "image": "cuda",
                                         "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
                         "resourceClaims": [{"name": "gpu", "resourceClaimName": name}],
                         "schedulingGates": if gated(i) {
                             json!([{"name": scheduling_gate(DRIVER)}])
                         } else {
                             json!([])
                         }},
                "status": {"phase": "Pending"}}),
        )
        .unwrap();
}

struct Replica {
    identity: String,
    child: Child,
    log: PathBuf,
}

fn spawn(identity: &str, kubeconfig: &Path, dir: &Path, lease: f64) -> Replica {
    let log = dir.join(format!("{identity}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let ms = |f: f64| format!("{}ms", (lease * f * 1000.0) as u64);
    let child = Command::new(BIN)
        .arg("run")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--identity", identity, "--metrics-addr", "127.0.0.1:0"])
        .args(["--leader-election-lease-duration", &ms(1.0)])
        .args(["--leader-election-renew-deadline", &ms(2.0 / 3.0)])
        .args(["--leader-election-retry-period", &ms(2.0 / 15.0)])
        .env("RUST_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Replica {
        identity: identity.into(),
        child,
        log,
    }
}

fn holder(server: &FakeApiServer) -> Option<String> {
    server
        .get(
            Gvr::new("coordination.k8s.io", "v1", "leases"),
            "vgpu-system",
            "vgpu-controller",
        )
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

/// The allocated device of every allocated claim: name → (pool, device, results).
fn allocations(server: &FakeApiServer) -> HashMap<String, (String, String, usize)> {
    server
        .list(claims_gvr())
        .into_iter()
        .filter_map(|c| {
            let results = c["status"]["allocation"]["devices"]["results"].as_array()?;
            let first = results.first()?;
            Some((
                c["metadata"]["name"].as_str()?.to_string(),
                (
                    first["pool"].as_str()?.to_string(),
                    first["device"].as_str()?.to_string(),
                    results.len(),
                ),
            ))
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_storm_with_faults_and_a_killed_leader_never_overbooks() {
    let claims: usize = env_or("STORM_CLAIMS", 200);
    let lease: f64 = env_or("STORM_LEASE_SECONDS", 2.0);
    let server = FakeApiServer::start_with_builtin(DraVersions::V1Only)
        .await
        .unwrap();
    let nodes = cluster(&server, claims);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig(None)).unwrap();
    let mut replicas = vec![
        spawn("replica-a", &kubeconfig, dir.path(), lease),
        spawn("replica-b", &kubeconfig, dir.path(), lease),
    ];
    let started = Instant::now();
    while holder(&server).is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Faults for the whole storm: conflicts on claim writes, latency, dropped watches.
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let conflicts = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let chaos = {
        let (server, stop, conflicts, dropped) = (
            server.clone(),
            stop.clone(),
            conflicts.clone(),
            dropped.clone(),
        );
        tokio::spawn(async move {
            let mut tick = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // At most three pending at a time: faults queued while the controller is
                // idle would otherwise pile up and fail every write for seconds.
                server.clear_faults();
                server.inject_conflicts(claims_gvr(), 3);
                conflicts.fetch_add(3, Ordering::Relaxed);
                // Latency for two seconds out of four.
                let slow = (tick / 20) % 2 == 1;
                server.set_latency(Duration::from_millis(if slow { 2 } else { 0 }));
                if tick % 15 == 14 {
                    server.drop_watches();
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            server.clear_faults();
            server.set_latency(Duration::ZERO);
        })
    };

    // The storm: every claim and its pod, in bursts of 500.
    let storm_started = Instant::now();
    let mut created_at = Vec::with_capacity(claims);
    for i in 0..claims {
        workload(&server, i);
        created_at.push(storm_started.elapsed());
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let want = (0..claims).filter(|i| allocatable(*i)).count();

    // Watch progress; kill the leader once 40 % is allocated; wait for the rest.
    let deadline = Duration::from_secs(env_or("STORM_TIMEOUT_SECONDS", 600));
    let mut seen: HashMap<String, Duration> = HashMap::new();
    let mut killed: Option<(Instant, usize, String)> = None;
    let mut takeover = None;
    let mut resumed = None;
    let mut restarted = false;
    let mut last_report = Instant::now();
    loop {
        let now = allocations(&server);
        for name in now.keys() {
            seen.entry(name.clone())
                .or_insert_with(|| storm_started.elapsed());
        }
        if killed.is_none() && now.len() * 10 >= want * 4 {
            let leader = holder(&server).unwrap();
            let r = replicas
                .iter_mut()
                .find(|r| leader.starts_with(&format!("{}_", r.identity)))
                .unwrap();
            let _ = r.child.kill();
            let at = Instant::now();
            let _ = r.child.wait();
            // A write in flight when the process died may still land: count from a moment
            // later, still well inside the lease the standby must wait out.
            tokio::time::sleep(Duration::from_secs_f64(lease / 4.0)).await;
            killed = Some((at, allocations(&server).len(), leader));
            continue;
        }
        if let Some((at, count, leader)) = &killed {
            if takeover.is_none() && holder(&server).is_some_and(|h| &h != leader) {
                takeover = Some(at.elapsed());
            }
            if resumed.is_none() && now.len() > *count {
                resumed = Some(at.elapsed());
            }
            if !restarted && at.elapsed() > Duration::from_secs(1) {
                let i = replicas
                    .iter()
                    .position(|r| leader.starts_with(&format!("{}_", r.identity)))
                    .unwrap();
                let identity = replicas[i].identity.clone();
                replicas[i] = spawn(&identity, &kubeconfig, dir.path(), lease);
                restarted = true;
            }
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "{:.0?}: {} of {want} allocated, leader {:?}, killed {:?}",
                storm_started.elapsed(),
                now.len(),
                holder(&server),
                killed.as_ref().map(|k| (k.0.elapsed(), k.1, &k.2))
            );
            last_report = Instant::now();
        }
        if now.len() >= want && resumed.is_some() {
            break;
        }
        if storm_started.elapsed() > deadline {
            let logs: Vec<String> = replicas
                .iter()
                .map(|r| {
                    let text = std::fs::read_to_string(&r.log).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    format!(
                        "{}:\n{}",
                        r.identity,
                        lines[lines.len().saturating_sub(20)..].join("\n")
                    )
                })
                .collect();
            let missing: Vec<Value> = (0..claims)
                .filter(|i| allocatable(*i) && !now.contains_key(&format!("c{i:05}")))
                .filter_map(|i| server.get(claims_gvr(), "ml", &format!("c{i:05}")))
                .take(3)
                .collect();
            panic!(
                "{} of {want} allocatable claims allocated after {deadline:?}\nnot allocated: {}\n{}",
                now.len(),
                serde_json::to_string_pretty(&missing).unwrap(),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_allocated = storm_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    chaos.await.unwrap();
    // Let any pass still running finish, then check the final state.
    tokio::time::sleep(Duration::from_secs_f64(lease)).await;
    for r in &mut replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }

    let final_state = allocations(&server);
    let mut memory: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut cores: BTreeMap<(String, String), u64> = BTreeMap::new();
    for i in 0..claims {
        let name = format!("c{i:05}");
        match final_state.get(&name) {
            Some((pool, device, results)) => {
                assert!(
                    allocatable(i),
                    "{name} asks for more than a GPU and was allocated"
                );
                assert_eq!(*results, 1, "{name}: one request, one device");
                let (m, c) = ask(i);
                *memory.entry((pool.clone(), device.clone())).or_default() += m * GI;
                *cores.entry((pool.clone(), device.clone())).or_default() += c;
            }
            None => assert!(!allocatable(i), "{name} fits and was never allocated"),
        }
    }
    for (gpu, bytes) in &memory {
        assert!(*bytes <= GPU_MEMORY, "{gpu:?} holds {} GiB", bytes / GI);
    }
    for (gpu, pct) in &cores {
        assert!(*pct <= 100, "{gpu:?} holds {pct} % of the cores");
    }
    // Each claim's allocation was written once: no replica wrote over another's.
    let mut status_writes: BTreeMap<String, usize> = BTreeMap::new();
    for w in server.writes() {
        if w.gvr == claims_gvr() && w.subresource.as_deref() == Some("status") {
            *status_writes.entry(w.name).or_default() += 1;
        }
    }
    let twice: Vec<_> = status_writes.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "claims allocated more than once: {twice:?}"
    );

    // The gate of each gated pod was lifted once its claim was allocated, through the faults
    // and the leader's death, and stays on the pods whose claims can never fit.
    for i in (0..claims).filter(|i| gated(*i)) {
        let pod = server
            .get(Gvr::new("", "v1", "pods"), "ml", &format!("c{i:05}-pod"))
            .unwrap();
        let gates = pod["spec"]["schedulingGates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            gates.is_empty(),
            allocatable(i),
            "c{i:05}-pod: gates {gates:?}"
        );
    }

    // The shipped RBAC grants exactly what the replicas called (the workload was written
    // with the server's direct helpers, which are not counted). Patching an Event happens
    // only when one repeats into a series, which this storm need not provoke.
    let used = rbac::used(&server);
    let rbac = granted_to(
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/manifests/vgpu-dra.yaml"
        )),
        "vgpu-controller",
    )
    .unwrap();
    let missing: Vec<_> = used.difference(&rbac).collect();
    assert!(missing.is_empty(), "called without RBAC: {missing:?}");
    let series: Permission = ("events.k8s.io".into(), "events".into(), "patch".into());
    let unused: Vec<_> = rbac.difference(&used).filter(|p| **p != series).collect();
    assert!(unused.is_empty(), "granted, never called: {unused:?}");

    let mut latencies: Vec<Duration> = (0..claims)
        .filter(|i| allocatable(*i))
        .map(|i| seen[&format!("c{i:05}")].saturating_sub(created_at[i]))
        .collect();
    latencies.sort();
    let (_, _, leader) = killed.unwrap();
    let gpus = memory.len();
    eprintln!(
        "claims={claims} allocatable={want} nodes={nodes} gpus={} gpus_used={gpus} \
         lease={lease}s conflict_faults_armed={} watches_dropped={} killed={leader} \
         takeover_after_kill={:.2?} allocations_resumed_after_kill={:.2?} \
         all_allocated_after={all_allocated:.2?} throughput={:.0}/s \
         claim_latency: p50={:.2?} p99={:.2?} max={:.2?}",
        nodes * GPUS_PER_NODE as usize,
        conflicts.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        takeover.unwrap_or_default(),
        resumed.unwrap(),
        want as f64 / all_allocated.as_secs_f64(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies[latencies.len() - 1],
    );
}
