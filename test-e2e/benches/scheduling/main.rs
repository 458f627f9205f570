//! Pod created → bound on the local real cluster (`hack/cluster/up.sh 1.34`), in one run, for
//! three ways of giving pods GPUs: slices allocated by our controller (with pods created plain,
//! and with pods created behind its scheduling gate), shares allocated by the kube-scheduler
//! itself (native mode, consumable capacity) and whole GPUs allocated by the
//! kube-scheduler (the baseline). Each scenario gets its own bench nodes (Node objects with
//! our ResourceSlices and Leases the bench renews; no kubelet behind them, so pods are bound,
//! never run) and a burst of pods, each with its own claim, created as fast as the API server
//! takes them. Measured: per pod, from just before its create call to the watch event that
//! shows it bound; pods/s over the whole burst; the CPU each control-plane process used.
//!
//!   hack/bench-scheduling.sh                     # brings the cluster up, runs this, tears down
//!   BENCH_PODS=1000 BENCH_NODES=160 BENCH_SCENARIOS=controller,gated,native,whole \
//!     cargo bench -p test-e2e --bench scheduling  # against a cluster that is up
//!
//! Our controller and plugin run as the end-to-end tests run them (`Installation`), from
//! `VGPU_BIN_DIR` (the script builds them in release).

mod measure;
mod workload;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use measure::{CpuSample, Latencies};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use test_e2e::{Installation, LocalCluster, SharingMode};
use workload::{SCENARIO_LABEL, Scenario};

struct Settings {
    nodes: usize,
    pods: usize,
    concurrency: usize,
    timeout: Duration,
    scenarios: Vec<Scenario>,
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v}: not a whole number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let scenarios = match std::env::var("BENCH_SCENARIOS") {
            Ok(v) => v
                .split(',')
                .map(|s| {
                    Scenario::parse(s.trim()).with_context(|| {
                        format!(
                            "BENCH_SCENARIOS: unknown scenario {s:?} (controller, gated, native, whole)"
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Err(_) => Scenario::ALL.to_vec(),
        };
        Ok(Settings {
            nodes: env_usize("BENCH_NODES", 160)?,
            pods: env_usize("BENCH_PODS", 1000)?,
            concurrency: env_usize("BENCH_CONCURRENCY", 16)?.max(1),
            timeout: Duration::from_secs(env_usize("BENCH_TIMEOUT_S", 300)? as u64),
            scenarios,
        })
    }
}

/// One scenario's outcome.
struct Outcome {
    scenario: Scenario,
    created: usize,
    latencies: Latencies,
    /// From the first create call to the last pod bound.
    span: Duration,
    cpu: Vec<(String, Option<f64>)>,
    /// The kube-scheduler's scheduling attempts during the burst, by result.
    attempts: std::collections::BTreeMap<String, f64>,
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; nothing else is taken from the command line.
    let settings = Settings::from_env()?;
    let local = LocalCluster::get();
    if local.release() != "1.34" {
        bail!(
            "the side-by-side needs Kubernetes 1.34 (consumable capacity for native mode); \
             this cluster is {}: hack/cluster/down.sh, then hack/bench-scheduling.sh",
            local.release()
        );
    }
    // Shipped classes (gpu, gpu-slice, gpu-share), admission policy and RBAC; our controller
    // and the plugin of the real node running. Blocking: before the runtime starts.
    let install = Installation::ensure(SharingMode::Native);
    let processes = [
        "etcd",
        "kube-apiserver",
        "kube-scheduler",
        "kube-controller-manager",
        test_e2e::install::CONTROLLER,
    ]
    .map(|name| (name.to_string(), install.cluster.local.pid(name)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let config = config(&local).await?;
        let client = kube::Client::try_from(config.clone())?;
        let scheduler = scheduler_client(config)?;
        let mut outcomes = Vec::new();
        for &scenario in &settings.scenarios {
            eprintln!("=== {}: {}", scenario.name(), scenario.describe());
            cleanup(&client, scenario).await?;
            let outcome = run(&client, &scheduler, scenario, &settings, &processes).await;
            // The scenario's objects go even when it failed, so the next starts clean.
            cleanup(&client, scenario).await?;
            outcomes.push(outcome?);
            // Each row as soon as it is known: a long run interrupted later keeps it.
            eprint!("{}", report(&settings, &outcomes[outcomes.len() - 1..]));
        }
        print!("{}", report(&settings, &outcomes));
        Ok(())
    })
}

async fn config(local: &LocalCluster) -> Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::read_from(local.kubeconfig())?;
    Ok(kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?)
}

/// The kube-scheduler's own HTTPS endpoint (hack/cluster/up.sh: 127.0.0.1:10259, a
/// self-signed serving certificate), with the cluster admin's credentials.
fn scheduler_client(mut config: kube::Config) -> Result<kube::Client> {
    config.cluster_url = "https://127.0.0.1:10259".parse()?;
    config.accept_invalid_certs = true;
    config.root_cert = None;
    Ok(kube::Client::try_from(config)?)
}

fn namespace(scenario: Scenario) -> String {
    format!("bench-{}", scenario.name())
}

fn scenario_selector(scenario: Scenario) -> ListParams {
    ListParams::default().labels(&format!("{SCENARIO_LABEL}={}", scenario.name()))
}

async fn run(
    client: &kube::Client,
    scheduler: &kube::Client,
    scenario: Scenario,
    settings: &Settings,
    processes: &[(String, Option<i32>)],
) -> Result<Outcome> {
    let ns = namespace(scenario);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &from_json(json!({"metadata": {"name": ns}}))?,
        )
        .await
        .with_context(|| format!("create namespace {ns}"))?;
    create_nodes(client, scenario, settings).await?;
    let renewing = tokio::spawn(renew_leases(client.clone(), scenario, settings.nodes));
    let result = burst(client, scheduler, scenario, settings, processes, &ns).await;
    renewing.abort();
    result
}

/// Nodes, their status, Leases and slices; returns once every node is Ready and untainted.
async fn create_nodes(
    client: &kube::Client,
    scenario: Scenario,
    settings: &Settings,
) -> Result<()> {
    let started = Instant::now();
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    futures::stream::iter(0..settings.nodes)
        .map(|n| {
            let (nodes, leases, slices) = (nodes.clone(), leases.clone(), slices.clone());
            async move {
                let name = scenario.node_name(n);
                let node = nodes
                    .create(
                        &PostParams::default(),
                        &from_json(workload::node(scenario, n))?,
                    )
                    .await
                    .with_context(|| format!("create Node {name}"))?;
                let status = workload::node_status(&json_time(Time(Timestamp::now()))?);
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .with_context(|| format!("Node {name}: status"))?;
                let now = json_time(MicroTime(Timestamp::now()))?;
                leases
                    .create(
                        &PostParams::default(),
                        &from_json(workload::lease(&name, &now))?,
                    )
                    .await
                    .with_context(|| format!("Lease kube-node-lease/{name}"))?;
                let uid = node.metadata.uid.unwrap_or_default();
                for slice in workload::slices(scenario, n, &uid) {
                    slices
                        .create(&PostParams::default(), &from_json(slice)?)
                        .await
                        .with_context(|| format!("ResourceSlice of {name}"))?;
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(settings.concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    // The node lifecycle controller taints a node until it has seen it Ready; the scheduler
    // would refuse tainted nodes.
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(500),
        || async {
            let listed = nodes.list(&scenario_selector(scenario)).await?;
            let ready = listed
                .items
                .iter()
                .filter(|n| {
                    n.spec
                        .as_ref()
                        .and_then(|s| s.taints.as_ref())
                        .is_none_or(Vec::is_empty)
                })
                .count();
            Ok((ready != settings.nodes)
                .then(|| format!("{ready} of {} bench nodes untainted", settings.nodes)))
        },
    )
    .await?;
    eprintln!(
        "{} nodes with {} GPUs ready in {:.1} s",
        settings.nodes,
        settings.nodes * 8,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Renews every bench node's Lease every 10 s, as a kubelet does, until aborted.
async fn renew_leases(client: kube::Client, scenario: Scenario, nodes: usize) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let Ok(now) = json_time(MicroTime(Timestamp::now())) else {
            continue;
        };
        let patch = Patch::Merge(json!({"spec": {"renewTime": now}}));
        let renewed = futures::stream::iter(0..nodes)
            .map(|n| {
                let (leases, patch) = (leases.clone(), &patch);
                async move {
                    leases
                        .patch(&scenario.node_name(n), &PatchParams::default(), patch)
                        .await
                }
            })
            .buffer_unordered(8)
            .filter(|r| futures::future::ready(r.is_err()))
            .count()
            .await;
        if renewed > 0 {
            eprintln!("{renewed} Lease renewals failed");
        }
    }
}

/// Creates the claims and pods as fast as the API server takes them and waits for every pod
/// to be bound.
async fn burst(
    client: &kube::Client,
    scheduler: &kube::Client,
    scenario: Scenario,
    settings: &Settings,
    processes: &[(String, Option<i32>)],
    ns: &str,
) -> Result<Outcome> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), ns);
    // Bound times from a watch, so each is seen when the binding lands, not at a poll.
    let bound: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watching = {
        let (pods, bound) = (pods.clone(), bound.clone());
        tokio::spawn(async move {
            let mut events = watcher(pods, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(pod) = event else { continue };
                let on_node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some();
                if let (true, Some(name)) = (on_node, pod.metadata.name) {
                    let mut bound = bound.lock().expect("not poisoned");
                    bound.entry(name).or_insert_with(Instant::now);
                }
            }
        })
    };
    // The watch must be established before the first pod exists.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = CpuSample::take(processes);
    let attempts_before = measure::scheduler_attempts(scheduler).await?;
    let started = Instant::now();
    let created: HashMap<String, Instant> = futures::stream::iter(0..settings.pods)
        .map(|i| {
            let (pods, claims) = (pods.clone(), claims.clone());
            async move {
                claims
                    .create(
                        &PostParams::default(),
                        &from_json(workload::claim(scenario, i))?,
                    )
                    .await
                    .with_context(|| format!("create claim {}", workload::claim_name(i)))?;
                let at = Instant::now();
                pods.create(
                    &PostParams::default(),
                    &from_json(workload::pod(scenario, i))?,
                )
                .await
                .with_context(|| format!("create pod {}", workload::pod_name(i)))?;
                anyhow::Ok((workload::pod_name(i), at))
            }
        })
        .buffer_unordered(settings.concurrency)
        .try_collect()
        .await?;
    eprintln!(
        "{} pods and claims created in {:.1} s",
        created.len(),
        started.elapsed().as_secs_f64()
    );
    let deadline = started + settings.timeout;
    loop {
        let n = bound.lock().expect("not poisoned").len();
        if n >= settings.pods || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu = CpuSample::take(processes).since(&cpu_before);
    let mut attempts = measure::scheduler_attempts(scheduler).await?;
    for (result, n) in &mut attempts {
        *n -= attempts_before.get(result).copied().unwrap_or(0.0);
    }
    watching.abort();
    let bound = bound.lock().expect("not poisoned").clone();
    let latencies = Latencies::of(&created, &bound);
    let last = bound.values().max().copied().unwrap_or(started);
    eprintln!(
        "{} of {} pods bound; p50 {:.2} s",
        latencies.count(),
        settings.pods,
        latencies.quantile(0.5).as_secs_f64()
    );
    Ok(Outcome {
        scenario,
        created: created.len(),
        latencies,
        span: last.saturating_duration_since(started),
        cpu,
        attempts,
    })
}

/// Removes a scenario's pods (at once: no kubelet will confirm their end), claims, nodes
/// (their slices go with them, owned by the Node) and Leases, and waits until the claims are
/// gone, so that the next scenario does not share the control plane with this one's clean-up.
async fn cleanup(client: &kube::Client, scenario: Scenario) -> Result<()> {
    let ns = namespace(scenario);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(&ns).await?.is_some() {
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.delete_collection(&now, &ListParams::default()).await?;
        let claims: Api<ResourceClaim> = Api::namespaced(client.clone(), &ns);
        claims
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
        wait_until(Duration::from_secs(300), Duration::from_secs(1), || async {
            let left = claims
                .list_metadata(&ListParams::default())
                .await?
                .items
                .len();
            Ok((left > 0).then(|| format!("{left} claims of {ns} still there after deletion")))
        })
        .await?;
        namespaces.delete(&ns, &DeleteParams::default()).await?;
        wait_until(Duration::from_secs(120), Duration::from_secs(1), || async {
            Ok(namespaces
                .get_opt(&ns)
                .await?
                .map(|_| format!("namespace {ns} still terminating after its deletion")))
        })
        .await?;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = nodes
        .list_metadata(&scenario_selector(scenario))
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    if !names.is_empty() {
        nodes
            .delete_collection(&DeleteParams::default(), &scenario_selector(scenario))
            .await?;
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        for name in &names {
            let _ = leases.delete(name, &DeleteParams::default()).await;
        }
    }
    // Slices of deleted nodes are the garbage collector's; the scheduler must not see them
    // while the next scenario runs.
    let slices: Api<ResourceSlice> = Api::all(client.clone());
    let prefix = format!("bench-{}-", scenario.name());
    wait_until(Duration::from_secs(120), Duration::from_secs(1), || async {
        let left = slices
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|s| {
                s.spec
                    .node_name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .count();
        Ok((left > 0).then(|| format!("{left} ResourceSlices of deleted {prefix}* nodes left")))
    })
    .await
}

/// Poll `check` every `every` until it reports nothing left to wait for (`None`); after
/// `timeout`, fail with what it reported last.
async fn wait_until<F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let Some(waiting) = check().await? else {
            return Ok(());
        };
        if Instant::now() > deadline {
            bail!("{waiting} after {} s", timeout.as_secs());
        }
        tokio::time::sleep(every).await;
    }
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    Ok(serde_json::from_value(value)?)
}

fn json_time(time: impl serde::Serialize) -> Result<String> {
    match serde_json::to_value(time)? {
        Value::String(s) => Ok(s),
        other => bail!("a time serialized as {other}"),
    }
}

fn report(settings: &Settings, outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "\n{} pods per scenario ({} at a time), {} bench nodes × 8 GPUs each\n\n",
        settings.pods, settings.concurrency, settings.nodes
    );
    let names: Vec<&str> = outcomes
        .first()
        .map(|o| o.cpu.iter().map(|(n, _)| n.as_str()).collect())
        .unwrap_or_default();
    out += "| scenario | bound | p50 | p90 | p99 | max | pods/s | scheduler attempts |";
    for n in &names {
        out += &format!(" CPU s {n} |");
    }
    out += "\n|---|---|---|---|---|---|---|---|";
    out += &"---|".repeat(names.len());
    out += "\n";
    for o in outcomes {
        let l = &o.latencies;
        let s = |q: f64| format!("{:.2} s", l.quantile(q).as_secs_f64());
        out += &format!(
            "| {} | {}/{} | {} | {} | {} | {} | {:.1} | {} |",
            o.scenario.describe(),
            l.count(),
            o.created,
            s(0.5),
            s(0.9),
            s(0.99),
            s(1.0),
            l.count() as f64 / o.span.as_secs_f64().max(1e-9),
            o.attempts
                .iter()
                .filter(|(_, n)| **n > 0.0)
                .map(|(r, n)| format!("{n:.0} {r}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        for (_, secs) in &o.cpu {
            match secs {
                Some(s) => out += &format!(" {s:.1} |"),
                None => out += " not running |",
            }
        }
        out += "\n";
    }
    out
}
