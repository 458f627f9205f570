//! `controller run` (the release binary, leader election off) against the in-process fake API
//! server holding the mixed cluster-scale workload of `cluster/mod.rs`: every claim pending
//! with its pod waiting. Reports the time to the last allocation, claims per second and the
//! controller's peak RSS (VmHWM):
//!
//! ```sh
//! cargo bench -p controller --bench controller_run -- [nodes] [claims]
//! ```

mod cluster;

use fake_apiserver::{DraVersions, FakeApiServer, Gvr};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_controller");
/// No new allocation for this long after the first: the rest cannot be placed. (Before the
/// first, the controller may still be listing, slower under a profiler: up to `GIVE_UP`.)
const SETTLED: Duration = Duration::from_secs(15);
const GIVE_UP: Duration = Duration::from_secs(600);

fn gvr_of(object: &Value) -> Option<Gvr> {
    Some(match object["kind"].as_str()? {
        "Node" => Gvr::new("", "v1", "nodes"),
        "Pod" => Gvr::new("", "v1", "pods"),
        "ResourceSlice" => Gvr::new("resource.k8s.io", "v1", "resourceslices"),
        "DeviceClass" => Gvr::new("resource.k8s.io", "v1", "deviceclasses"),
        "ResourceClaim" => Gvr::new("resource.k8s.io", "v1", "resourceclaims"),
        _ => return None,
    })
}

/// The text of `/metrics` at `addr` (HTTP/1.0, read to the end).
fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok(body)
}

/// A field of /proc/<pid>/status in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim_start_matches(':')
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let nodes = args.first().copied().unwrap_or(1000);
    let claims = args.get(1).copied().unwrap_or(20_000);
    let server = FakeApiServer::start_with_builtin(DraVersions::V1Only).await?;
    for object in cluster::objects(nodes, claims) {
        let gvr = gvr_of(&object).ok_or("an object of an unexpected kind")?;
        server.put_object(gvr, object)?;
    }
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig(None))?;
    let log = dir.path().join("controller.log");
    // A free port for the controller's metrics, read at the end for its pass and decision
    // times.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--identity", "bench", "--metrics-addr"])
        .arg(metrics_addr.to_string())
        .arg("--disable-leader-election")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let pid = child.id();
    let claims_gvr = Gvr::new("resource.k8s.io", "v1", "resourceclaims");
    let (mut allocated, mut last_change) = (0usize, Instant::now());
    let mut first: Option<Duration> = None;
    let mut peak_rss = 0;
    while !(first.is_some() && last_change.elapsed() >= SETTLED) && started.elapsed() < GIVE_UP {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(status_kib(pid, "VmRSS").unwrap_or(0));
        let now = server
            .list(claims_gvr.clone())
            .iter()
            .filter(|c| !c["status"]["allocation"].is_null())
            .count();
        if now > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if now != allocated {
            allocated = now;
            last_change = Instant::now();
        }
    }
    let hwm = status_kib(pid, "VmHWM").unwrap_or(peak_rss);
    let metrics = scrape(metrics_addr).unwrap_or_default();
    let done = last_change.duration_since(started);
    child.kill()?;
    child.wait()?;
    let first = first.unwrap_or(done);
    let placing = done.saturating_sub(first).as_secs_f64().max(1e-3);
    println!("{nodes} nodes x 8 GPUs, {claims} claims (each with a waiting pod)");
    println!("allocated: {allocated}");
    println!(
        "start to first allocation: {:.2} s (list + watch sync + first pass)",
        first.as_secs_f64()
    );
    println!("start to last allocation: {:.2} s", done.as_secs_f64());
    println!(
        "claims/s from the first allocation to the last: {:.0}",
        allocated as f64 / placing
    );
    println!("controller peak RSS (VmHWM): {} MiB", hwm / 1024);
    for (name, what, unit, scale) in [
        ("vgpu_controller_pass_duration_seconds", "passes", "ms", 1e3),
        ("vgpu_controller_decision_seconds", "decisions", "µs", 1e6),
    ] {
        let sample = |suffix: &str| -> Option<f64> {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} ")))?
                .trim()
                .parse()
                .ok()
        };
        match (sample("sum"), sample("count")) {
            (Some(sum), Some(count)) if count > 0.0 => println!(
                "{what}: {count}, mean {:.2} {unit} (from {name})",
                sum / count * scale
            ),
            _ => println!("{what}: not scraped from {metrics_addr}"),
        }
    }
    let errors = std::fs::read_to_string(&log)?;
    let errors: Vec<&str> = errors.lines().filter(|l| l.contains("ERROR")).collect();
    if !errors.is_empty() {
        println!("controller errors: {}", errors.join("\n"));
    }
    Ok(())
}
