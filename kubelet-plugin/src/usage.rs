//! What prepared claims really use, read at scrape time from the accounting files the
//! enforcement library keeps in each claim's directory (the format: `vgpu-accounting`).
//!
//! Nothing is cached between scrapes: a claim's numbers are as fresh as the scrape, and a
//! claim that is unprepared disappears from the next one. A file that cannot be read (no
//! process has started yet, another library's file, a container's garbage) costs its claim the
//! usage series, never the scrape: it is counted by reason and logged once.

use crate::prepare::PreparedClaim;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A utilization older than this is not shown: no throttled process measured it lately, so it
/// says nothing about now.
pub const UTILIZATION_MAX_AGE: Duration = Duration::from_secs(60);

/// One GPU of one request of a claim.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClaimGpuLabels {
    pub namespace: String,
    pub claim: String,
    pub request: String,
    /// Published device name, `gpu-<index>`.
    pub device: String,
    pub uuid: String,
}

/// What the processes of one pod (by their host name) use of one GPU of a claim.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodGpuLabels {
    pub namespace: String,
    pub claim: String,
    pub request: String,
    pub pod: String,
    pub device: String,
    pub uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub namespace: String,
    pub claim: String,
    pub request: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub device: String,
    pub uuid: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// One GPU of a watched request, in CUDA ordinal order inside the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedGpu {
    pub device: String,
    pub uuid: String,
    pub memory_bytes: u64,
    /// Percent; 0 and 100 both mean "not throttled".
    pub cores: u8,
}

/// One request of a prepared claim whose containers run under the library, and its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub namespace: String,
    pub claim: String,
    pub request: String,
    pub file: PathBuf,
    /// Index `i` is CUDA device `i` of the file (`CUDA_DEVICE_MEMORY_LIMIT_<i>`).
    pub gpus: Vec<WatchedGpu>,
}

/// The requests of `claims` (by UID) that have an accounting file: those with limits, not
/// admin access. `file(uid, request)` is where the library writes.
pub fn watched(
    claims: &BTreeMap<String, PreparedClaim>,
    file: impl Fn(&str, &str) -> PathBuf,
) -> Vec<Watched> {
    let mut out: Vec<Watched> = Vec::new();
    for (uid, claim) in claims {
        let mut requests: Vec<Watched> = Vec::new();
        for gpu in claim.gpus.iter().filter(|g| !g.admin_access) {
            let entry = WatchedGpu {
                device: gpu.device.clone(),
                uuid: gpu.uuid.clone(),
                memory_bytes: gpu.memory_bytes,
                cores: gpu.cores,
            };
            // A request's GPUs are in allocation order in the checkpoint, which is the order
            // of CUDA_VISIBLE_DEVICES in its CDI device.
            match requests.iter_mut().find(|w| w.request == gpu.request) {
                Some(w) => w.gpus.push(entry),
                None => requests.push(Watched {
                    namespace: claim.namespace.clone(),
                    claim: claim.name.clone(),
                    request: gpu.request.clone(),
                    file: file(uid, &gpu.request),
                    gpus: vec![entry],
                }),
            }
        }
        out.append(&mut requests);
    }
    out
}

type Source = Box<dyn Fn() -> Vec<Watched> + Send + Sync>;

/// The usage metrics, computed on each scrape from what `source` says is prepared.
pub struct UsageCollector {
    source: Source,
    read_errors: Family<ReasonLabels, Counter>,
    /// (file, reason) pairs already logged, so a broken file is said once, not every scrape.
    logged: Mutex<HashSet<(PathBuf, &'static str)>>,
}

impl std::fmt::Debug for UsageCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageCollector").finish_non_exhaustive()
    }
}

type F64Gauge = Gauge<f64, AtomicU64>;
type F64Counter = Counter<f64, AtomicU64>;

/// One scrape's families.
#[derive(Default)]
struct Scrape {
    used: Family<ClaimGpuLabels, Gauge>,
    limit: Family<ClaimGpuLabels, Gauge>,
    peak: Family<ClaimGpuLabels, Gauge>,
    refused: Family<ClaimGpuLabels, Counter>,
    compute_limit: Family<ClaimGpuLabels, F64Gauge>,
    utilization: Family<ClaimGpuLabels, F64Gauge>,
    throttled: Family<ClaimGpuLabels, F64Counter>,
    pod_used: Family<PodGpuLabels, Gauge>,
    processes: Family<RequestLabels, Gauge>,
    open_loop: Family<RequestLabels, Gauge>,
    gpu_used: Family<GpuLabels, Gauge>,
}

fn gauge_bytes(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl UsageCollector {
    pub fn new(source: impl Fn() -> Vec<Watched> + Send + Sync + 'static) -> Self {
        UsageCollector {
            source: Box::new(source),
            read_errors: Family::default(),
            logged: Mutex::new(HashSet::new()),
        }
    }

    fn collect(&self, now: SystemTime) -> Scrape {
        let scrape = Scrape::default();
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut failed = HashSet::new();
        for w in (self.source)() {
            let request = RequestLabels {
                namespace: w.namespace.clone(),
                claim: w.claim.clone(),
                request: w.request.clone(),
            };
            let labels = |gpu: &WatchedGpu| ClaimGpuLabels {
                namespace: w.namespace.clone(),
                claim: w.claim.clone(),
                request: w.request.clone(),
                device: gpu.device.clone(),
                uuid: gpu.uuid.clone(),
            };
            // The limits are the plugin's own: known whether or not a process ever started.
            for gpu in &w.gpus {
                scrape
                    .limit
                    .get_or_create(&labels(gpu))
                    .set(gauge_bytes(gpu.memory_bytes));
                let cap = match gpu.cores {
                    0 | 100.. => 1.0,
                    c => f64::from(c) / 100.0,
                };
                scrape.compute_limit.get_or_create(&labels(gpu)).set(cap);
            }
            let usage = match read_file(&w.file) {
                Ok(Some(vgpu_accounting::Usage::Vgpu(usage))) => *usage,
                Ok(Some(vgpu_accounting::Usage::HamiCore(usage))) => {
                    hami_core(&scrape, &w, &request, &usage);
                    continue;
                }
                // No process of the claim has used the GPU yet: nothing is in use.
                Ok(None) => {
                    for gpu in &w.gpus {
                        scrape.used.get_or_create(&labels(gpu)).set(0);
                        // The GPU's total is shown (0 so far) even before a process runs.
                        scrape
                            .gpu_used
                            .get_or_create(&GpuLabels {
                                device: gpu.device.clone(),
                                uuid: gpu.uuid.clone(),
                            })
                            .inc_by(0);
                    }
                    scrape.processes.get_or_create(&request).set(0);
                    continue;
                }
                Err(err) => {
                    let reason = err.reason();
                    self.read_errors
                        .get_or_create(&ReasonLabels {
                            reason: reason.into(),
                        })
                        .inc();
                    let key = (w.file.clone(), reason);
                    let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
                    if logged.insert(key.clone()) {
                        tracing::warn!(
                            namespace = %w.namespace, claim = %w.claim, request = %w.request,
                            error = %err,
                            "cannot read the claim's accounting file: its usage is not exported"
                        );
                    }
                    failed.insert(key);
                    continue;
                }
            };
            scrape
                .processes
                .get_or_create(&request)
                .set(i64::try_from(usage.processes.len()).unwrap_or(i64::MAX));
            let open_loop = usage
                .processes
                .iter()
                .any(|p| p.flags & vgpu_accounting::FLAG_THROTTLE_OPEN_LOOP != 0);
            scrape
                .open_loop
                .get_or_create(&request)
                .set(i64::from(open_loop));
            for (index, gpu) in w.gpus.iter().enumerate() {
                let Some(d) = usage.devices.get(index) else {
                    break;
                };
                let l = labels(gpu);
                scrape.used.get_or_create(&l).set(gauge_bytes(d.used_bytes));
                scrape.peak.get_or_create(&l).set(gauge_bytes(d.peak_bytes));
                scrape.refused.get_or_create(&l).inc_by(d.cap_failures);
                scrape
                    .throttled
                    .get_or_create(&l)
                    .inc_by(d.throttled_ns as f64 / 1e9);
                if let Some((util, at)) = d.utilization
                    && now_ms.saturating_sub(at) <= UTILIZATION_MAX_AGE.as_millis() as u64
                {
                    scrape.utilization.get_or_create(&l).set(util);
                }
                scrape
                    .gpu_used
                    .get_or_create(&GpuLabels {
                        device: gpu.device.clone(),
                        uuid: gpu.uuid.clone(),
                    })
                    .inc_by(gauge_bytes(d.used_bytes));
                let mut by_pod: BTreeMap<&str, u64> = BTreeMap::new();
                for p in &usage.processes {
                    let used = p.used.get(index).copied().unwrap_or(0);
                    let sum = by_pod.entry(p.host_name.as_str()).or_default();
                    *sum = sum.saturating_add(used);
                }
                for (pod, used) in by_pod {
                    scrape
                        .pod_used
                        .get_or_create(&PodGpuLabels {
                            namespace: w.namespace.clone(),
                            claim: w.claim.clone(),
                            request: w.request.clone(),
                            pod: pod.to_string(),
                            device: gpu.device.clone(),
                            uuid: gpu.uuid.clone(),
                        })
                        .set(gauge_bytes(used));
                }
            }
        }
        // Forget what was logged about files that are fine now or gone, so that a file that
        // breaks again is said again.
        self.logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k| failed.contains(k));
        scrape
    }
}

/// What HAMi-core's region holds, when its library is mounted instead of ours: memory in use
/// and live processes (it keeps no peak, refusals or throttled time).
fn hami_core(
    scrape: &Scrape,
    w: &Watched,
    request: &RequestLabels,
    usage: &vgpu_accounting::hami::HamiUsage,
) {
    scrape
        .processes
        .get_or_create(request)
        .set(i64::try_from(usage.processes).unwrap_or(i64::MAX));
    for (gpu, device) in w.gpus.iter().zip(&usage.devices) {
        let labels = ClaimGpuLabels {
            namespace: w.namespace.clone(),
            claim: w.claim.clone(),
            request: w.request.clone(),
            device: gpu.device.clone(),
            uuid: gpu.uuid.clone(),
        };
        scrape
            .used
            .get_or_create(&labels)
            .set(gauge_bytes(device.used_bytes));
        scrape
            .gpu_used
            .get_or_create(&GpuLabels {
                device: gpu.device.clone(),
                uuid: gpu.uuid.clone(),
            })
            .inc_by(gauge_bytes(device.used_bytes));
    }
}

/// The file, or `None` when it does not exist (yet).
fn read_file(path: &Path) -> Result<Option<vgpu_accounting::Usage>, vgpu_accounting::ReadError> {
    match vgpu_accounting::read_any(path) {
        Ok(usage) => Ok(Some(usage)),
        Err(vgpu_accounting::ReadError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &M,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

impl Collector for UsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.collect(SystemTime::now());
        let e = &mut encoder;
        family(
            e,
            "claim_memory_used_bytes",
            "Device memory the claim's live processes hold on the GPU, as the enforcement library counts it",
            &s.used,
        )?;
        family(
            e,
            "claim_memory_limit_bytes",
            "Device memory the claim may use on the GPU (its slice)",
            &s.limit,
        )?;
        family(
            e,
            "claim_memory_peak_bytes",
            "The most device memory the claim's processes held at once on the GPU since it was prepared",
            &s.peak,
        )?;
        family(
            e,
            "claim_memory_refused_allocations",
            "Allocations the enforcement library refused because they would have passed the claim's memory limit",
            &s.refused,
        )?;
        family(
            e,
            "claim_compute_limit_ratio",
            "Share of the GPU's compute the claim may use (1: not throttled)",
            &s.compute_limit,
        )?;
        family(
            e,
            "claim_compute_utilization_ratio",
            "The claim's utilization of the GPU as last measured by its throttled processes (within the last minute)",
            &s.utilization,
        )?;
        family(
            e,
            "claim_compute_throttled_seconds",
            "Time the claim's kernel launches waited for its compute limit, summed over threads",
            &s.throttled,
        )?;
        family(
            e,
            "pod_memory_used_bytes",
            "Device memory held on the GPU by the processes of one pod of the claim (the pod is the processes' host name)",
            &s.pod_used,
        )?;
        family(
            e,
            "claim_processes",
            "Live processes of the claim's request that run under the enforcement library",
            &s.processes,
        )?;
        family(
            e,
            "claim_throttle_open_loop",
            "1 when a process of the claim throttles without NVML's utilization (open loop)",
            &s.open_loop,
        )?;
        family(
            e,
            "gpu_memory_used_bytes",
            "Device memory held on the GPU by all prepared claims, as the enforcement library counts it",
            &s.gpu_used,
        )?;
        family(
            e,
            "accounting_read_errors",
            "Scrapes that skipped a claim's accounting file, by reason (io, not_regular, size, magic, version, slots)",
            &self.read_errors,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched_one(file: PathBuf) -> Vec<Watched> {
        vec![Watched {
            namespace: "team-a".into(),
            claim: "trainer".into(),
            request: "gpu".into(),
            file,
            gpus: vec![
                WatchedGpu {
                    device: "gpu-0".into(),
                    uuid: "GPU-aaa".into(),
                    memory_bytes: 4 << 30,
                    cores: 30,
                },
                WatchedGpu {
                    device: "gpu-3".into(),
                    uuid: "GPU-ddd".into(),
                    memory_bytes: 2 << 30,
                    cores: 30,
                },
            ],
        }]
    }

    fn render(collector: UsageCollector) -> String {
        let mut registry =
            prometheus_client::registry::Registry::with_prefix("vgpu_kubelet_plugin");
        registry.register_collector(Box::new(collector));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    fn valid_file() -> Vec<u8> {
        let mut b = vec![0u8; vgpu_accounting::FILE_SIZE];
        b[0..8].copy_from_slice(&vgpu_accounting::MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&vgpu_accounting::VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(vgpu_accounting::SLOTS as u32).to_le_bytes());
        b
    }

    #[test]
    fn before_any_process_the_limits_show_and_nothing_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gpu.cache");
        let text = render(UsageCollector::new(move || watched_one(file.clone())));
        let l = r#"namespace="team-a",claim="trainer",request="gpu",device="gpu-3",uuid="GPU-ddd""#;
        assert!(
            text.contains(&format!(
                "vgpu_kubelet_plugin_claim_memory_limit_bytes{{{l}}} 2147483648"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "vgpu_kubelet_plugin_claim_memory_used_bytes{{{l}}} 0"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "vgpu_kubelet_plugin_claim_compute_limit_ratio{{{l}}} 0.3"
            )),
            "{text}"
        );
        assert!(
            text.contains("# TYPE vgpu_kubelet_plugin_claim_memory_refused_allocations counter"),
            "{text}"
        );
        assert!(!text.contains("accounting_read_errors_total{"), "{text}");
    }

    #[test]
    fn a_broken_file_is_counted_by_reason_and_the_scrape_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.cache");
        let mut v2 = valid_file();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&bad, v2).unwrap();
        let good = dir.path().join("good.cache");
        std::fs::write(&good, valid_file()).unwrap();
        let (b, g) = (bad.clone(), good.clone());
        let collector = UsageCollector::new(move || {
            let mut w = watched_one(b.clone());
            let mut other = watched_one(g.clone());
            other[0].claim = "other".into();
            w.append(&mut other);
            w
        });
        let mut registry =
            prometheus_client::registry::Registry::with_prefix("vgpu_kubelet_plugin");
        registry.register_collector(Box::new(collector));
        let mut text = String::new();
        for _ in 0..2 {
            text.clear();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        }
        assert!(
            text.contains(
                r#"vgpu_kubelet_plugin_accounting_read_errors_total{reason="version"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"vgpu_kubelet_plugin_claim_processes{namespace="team-a",claim="other",request="gpu"} 0"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"claim_memory_used_bytes{namespace="team-a",claim="trainer""#),
            "{text}"
        );
    }

    #[test]
    fn usage_counters_and_stale_utilization() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.cache");
        let mut b = valid_file();
        let put =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        // Device 1 (gpu-3): peak 2 GiB, 5 refusals, 2.5 s throttled, 25 % measured at t=1000 s.
        let dev1 = 16 + 48;
        put(&mut b, dev1, 2 << 30);
        put(&mut b, dev1 + 8, 5);
        put(&mut b, dev1 + 16, 2_500_000_000);
        put(&mut b, dev1 + 24, 2_500);
        put(&mut b, dev1 + 32, 1_000_000);
        std::fs::write(&path, &b).unwrap();
        let p = path.clone();
        let collector = UsageCollector::new(move || watched_one(p.clone()));
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        let fresh = collector.collect(at(1030));
        let l = ClaimGpuLabels {
            namespace: "team-a".into(),
            claim: "trainer".into(),
            request: "gpu".into(),
            device: "gpu-3".into(),
            uuid: "GPU-ddd".into(),
        };
        assert_eq!(fresh.peak.get_or_create(&l).get(), 2 << 30);
        assert_eq!(fresh.refused.get_or_create(&l).get(), 5);
        assert_eq!(fresh.throttled.get_or_create(&l).get(), 2.5);
        assert_eq!(fresh.utilization.get_or_create(&l).get(), 0.25);
        let stale = collector.collect(at(1000 + 61));
        assert!(stale.utilization.get(&l).is_none());
    }

    #[test]
    fn hami_cores_region_gives_memory_in_use_and_processes() {
        // HAMi-core 1.2's shared_region_t, at the offsets a C compiler gives it.
        let mut b = vec![0u8; vgpu_accounting::hami::FILE_SIZE];
        b[0..4].copy_from_slice(&vgpu_accounting::hami::MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[56..64].copy_from_slice(&2u64.to_le_bytes());
        let proc_num = 1856 + 1024 * 1960;
        b[proc_num..proc_num + 4].copy_from_slice(&1u32.to_le_bytes());
        b[1856..1860].copy_from_slice(&77u32.to_le_bytes());
        // Slot 0, device 1, used.total.
        let at = 1856 + 8 + 64 + 32;
        b[at..at + 8].copy_from_slice(&(3u64 << 29).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpu.cache");
        std::fs::write(&path, b).unwrap();
        let text = render(UsageCollector::new(move || watched_one(path.clone())));
        let l = r#"namespace="team-a",claim="trainer",request="gpu",device="gpu-3",uuid="GPU-ddd""#;
        assert!(
            text.contains(&format!(
                "vgpu_kubelet_plugin_claim_memory_used_bytes{{{l}}} 1610612736"
            )),
            "{text}"
        );
        assert!(
            text.contains(r#"vgpu_kubelet_plugin_gpu_memory_used_bytes{device="gpu-3",uuid="GPU-ddd"} 1610612736"#),
            "{text}"
        );
        assert!(
            text.contains(r#"vgpu_kubelet_plugin_claim_processes{namespace="team-a",claim="trainer",request="gpu"} 1"#),
            "{text}"
        );
        assert!(
            !text.contains("claim_memory_peak_bytes{"),
            "HAMi-core keeps no peak: {text}"
        );
    }

    #[test]
    fn admin_access_has_no_file_and_requests_keep_their_gpu_order() {
        let gpu = |device: &str, request: &str, admin: bool| crate::prepare::PreparedGpu {
            device: device.into(),
            uuid: format!("GPU-{device}"),
            request: request.into(),
            memory_bytes: 1 << 30,
            cores: 50,
            exclusive: false,
            admin_access: admin,
        };
        let claim = PreparedClaim {
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![],
            gpus: vec![
                gpu("gpu-2", "a", false),
                gpu("gpu-0", "b", false),
                gpu("gpu-1", "a", false),
                gpu("gpu-3", "admin", true),
            ],
            spec: vgpu_cdi::Spec::new(
                &crate::cdi_spec::claim_kind("vgpu.hami.io").unwrap(),
                vec![],
            ),
        };
        let claims = BTreeMap::from([("uid-1".to_string(), claim)]);
        let w = watched(&claims, |uid, req| {
            PathBuf::from(format!("/claims/{uid}/{req}.cache"))
        });
        let summary: Vec<(String, PathBuf, Vec<String>)> = w
            .into_iter()
            .map(|w| {
                (
                    w.request,
                    w.file,
                    w.gpus.into_iter().map(|g| g.device).collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "a".into(),
                    "/claims/uid-1/a.cache".into(),
                    vec!["gpu-2".into(), "gpu-1".into()]
                ),
                (
                    "b".into(),
                    "/claims/uid-1/b.cache".into(),
                    vec!["gpu-0".into()]
                ),
            ]
        );
    }
}
