//! NodePrepareResources as the kubelet sees it, and the plugin's memory.
//!
//! The real `kubelet-plugin` binary (release build under `cargo bench`) against the in-memory
//! fake API server, on a node of 8 fake H100 80GB with `BACKGROUND` claims already prepared
//! (a busy node: 4 slices per GPU). Each iteration is one pod starting and stopping: one
//! NodePrepareResources call for its claims over a kept-open connection (as the kubelet
//! keeps one), then one NodeUnprepareResources call. Two pods: one claim, and four claims (one
//! slice on each of four GPUs, e.g. four containers).
//!
//! The API read is the API server's latency, not the node's: the plugin reports what each
//! call spent reading claims (`prepare_api_read_duration_seconds`), scraped between calls, and
//! each sample "without the API read" is that call's round trip minus its own reads; "in the
//! plugin" is the plugin's own time for the call (`prepare_duration_seconds`, from the request
//! decoded to the answer) minus its reads, which leaves out the client and the transport.
//!
//! Then the plugin's RSS (`VmRSS`, `VmHWM` of /proc/<pid>/status) at start, with the
//! background claims, and after `RSS_CLAIMS` prepared claims.
//!
//! `PREP_BENCH_ITERS` (default 300; 3 under `cargo test --benches`) sets the iterations per
//! pod shape. The files go under
//! `TMPDIR`: fsync costs what that filesystem makes it cost (tmpfs: nothing).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use fake_apiserver::DraVersions;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vgpu_proto::dra::v1;

/// The plugin binary of this build, or `PREP_BENCH_PLUGIN` (e.g. a release build measured by
/// a debug-built bench, which costs the client side more but not the plugin's own figures).
fn plugin_binary() -> std::ffi::OsString {
    std::env::var_os("PREP_BENCH_PLUGIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_kubelet-plugin").into())
}
const BACKGROUND: usize = 32;
const RSS_CLAIMS: [usize; 3] = [128, 256, 512];
const WARMUP: usize = 20;

type Client = v1::dra_plugin_client::DraPluginClient<tonic::transport::Channel>;

struct Plugin {
    child: Child,
    metrics: std::net::SocketAddr,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Plugin {
    fn spawn(h: &Harness) -> Plugin {
        let kubeconfig = h.path("kubeconfig");
        std::fs::write(&kubeconfig, h.server.kubeconfig(None)).unwrap();
        // A free port for the metrics endpoint; the plugin binds it right after.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(h.path("plugin.log")).unwrap();
        let child = Command::new(plugin_binary())
            .args(["--node-name", NODE, "--metrics-addr", &metrics.to_string()])
            .args(h.binary_args(&kubeconfig))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Plugin { child, metrics }
    }

    fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} not in /proc/<pid>/status"))
    }

    fn rss(&self) -> String {
        format!(
            "RSS {:.1} MiB (peak {:.1} MiB)",
            self.status("VmRSS:") as f64 / 1024.0,
            self.status("VmHWM:") as f64 / 1024.0
        )
    }

    /// The sums of the plugin's prepare histograms: every call's time and its API reads'.
    async fn prepare_sums(&self) -> (f64, f64) {
        let text = self.scrape().await;
        let sum = |name: &str| {
            let prefix = format!("vgpu_kubelet_plugin_{name}_sum ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map_or(0.0, |v| v.trim().parse().unwrap())
        };
        (
            sum("prepare_duration_seconds"),
            sum("prepare_api_read_duration_seconds"),
        )
    }

    async fn scrape(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }
}

async fn wait_ready(h: &Harness, plugin: &mut Plugin) -> Client {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = plugin.child.try_wait() {
            panic!(
                "the plugin exited ({status}): {}",
                std::fs::read_to_string(h.path("plugin.log")).unwrap_or_default()
            );
        }
        if let Ok(channel) = vgpu_proto::uds::connect(h.dra_socket()).await {
            let mut client = v1::dra_plugin_client::DraPluginClient::new(channel);
            let probe = v1::NodePrepareResourcesRequest { claims: vec![] };
            if client.node_prepare_resources(probe).await.is_ok() {
                return client;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Claims on the fake API server, `(uid, name)`.
fn claims(
    h: &Harness,
    prefix: &str,
    n: usize,
    gpu: impl Fn(usize) -> usize,
    memory: &str,
    cores: u32,
) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let device = format!("gpu-{}", gpu(i));
            let uid = h.put_claim(&ClaimSpec::sliced(&name, &[device.as_str()], memory, cores));
            (uid, name)
        })
        .collect()
}

fn request(claims: &[(String, String)]) -> Vec<v1::Claim> {
    claims
        .iter()
        .map(|(uid, name)| v1_claim(uid, name))
        .collect()
}

async fn prepare(client: &mut Client, claims: &[(String, String)]) {
    let answer = client
        .node_prepare_resources(v1::NodePrepareResourcesRequest {
            claims: request(claims),
        })
        .await
        .unwrap()
        .into_inner();
    for (uid, r) in &answer.claims {
        assert!(r.error.is_empty(), "{uid}: {}", r.error);
    }
    assert_eq!(answer.claims.len(), claims.len());
}

async fn unprepare(client: &mut Client, claims: &[(String, String)]) {
    let answer = client
        .node_unprepare_resources(v1::NodeUnprepareResourcesRequest {
            claims: request(claims),
        })
        .await
        .unwrap()
        .into_inner();
    for (uid, r) in &answer.claims {
        assert!(r.error.is_empty(), "{uid}: {}", r.error);
    }
}

fn percentiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label:<58} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>7.3} ms  (n={})",
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
        samples.len()
    );
}

/// One pod shape: `iters` pods of `claims_per_pod` claims each, prepared then unprepared.
async fn pods(
    h: &Harness,
    plugin: &Plugin,
    client: &mut Client,
    shape: &str,
    claims_per_pod: usize,
    iters: usize,
) {
    let all = claims(
        h,
        &format!("pod{claims_per_pod}"),
        (WARMUP + iters) * claims_per_pod,
        |i| i % 8,
        "2Gi",
        10,
    );
    let mut round_trip = Vec::new();
    let mut without_read = Vec::new();
    let mut in_plugin = Vec::new();
    let mut api_read = Vec::new();
    let mut unprep = Vec::new();
    for (i, pod) in all.chunks(claims_per_pod).enumerate() {
        let (total_before, read_before) = plugin.prepare_sums().await;
        let started = Instant::now();
        prepare(client, pod).await;
        let took = started.elapsed();
        let (total_after, read_after) = plugin.prepare_sums().await;
        let read = Duration::from_secs_f64((read_after - read_before).max(0.0));
        let total = Duration::from_secs_f64((total_after - total_before).max(0.0));
        let started = Instant::now();
        unprepare(client, pod).await;
        let unprepare_took = started.elapsed();
        if i >= WARMUP {
            round_trip.push(took);
            api_read.push(read);
            without_read.push(took.saturating_sub(read));
            in_plugin.push(total.saturating_sub(read));
            unprep.push(unprepare_took);
        }
    }
    percentiles(&format!("{shape}: prepare, gRPC round trip"), round_trip);
    percentiles(&format!("{shape}: of which the API reads"), api_read);
    percentiles(
        &format!("{shape}: prepare without the API reads, round trip"),
        without_read,
    );
    percentiles(
        &format!("{shape}: prepare without the API reads, in the plugin"),
        in_plugin,
    );
    percentiles(&format!("{shape}: unprepare, gRPC round trip"), unprep);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and gets a smoke run.
    let benching = std::env::args().any(|a| a == "--bench");
    let iters: usize = std::env::var("PREP_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 300 } else { 3 });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let h = Harness::new(DraVersions::V1Only, &example("fake-gpus-hgx-h100.yaml")).await;
            let mut plugin = Plugin::spawn(&h);
            let mut client = wait_ready(&h, &mut plugin).await;
            println!("files under {}", h.dir.path().display());
            println!("{:<58} {}", "plugin started", plugin.rss());
            let background = claims(&h, "background", BACKGROUND, |i| i % 8, "1Gi", 5);
            for claim in background.chunks(1) {
                prepare(&mut client, claim).await;
            }
            println!(
                "{:<58} {}",
                format!("{BACKGROUND} claims prepared"),
                plugin.rss()
            );
            pods(&h, &plugin, &mut client, "pod with 1 claim", 1, iters).await;
            pods(&h, &plugin, &mut client, "pod with 4 claims", 4, iters).await;
            println!(
                "{:<58} {}",
                format!("{BACKGROUND} claims prepared, after the pods"),
                plugin.rss()
            );
            let mut prepared = BACKGROUND;
            let mut last = Vec::new();
            for target in RSS_CLAIMS {
                let more = claims(
                    &h,
                    &format!("rss{target}"),
                    target - prepared,
                    |i| i % 8,
                    "128Mi",
                    1,
                );
                for claim in more.chunks(1) {
                    let started = Instant::now();
                    prepare(&mut client, claim).await;
                    last.push(started.elapsed());
                }
                prepared = target;
                println!(
                    "{:<58} {}",
                    format!("{target} claims prepared"),
                    plugin.rss()
                );
            }
            let tail = last.split_off(last.len() - 64);
            percentiles(
                &format!(
                    "1 claim with {} already prepared (API read included)",
                    RSS_CLAIMS[2] - 64
                ),
                tail,
            );
        });
}
