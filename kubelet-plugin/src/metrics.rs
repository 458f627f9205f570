//! Prometheus metrics, served at `/metrics` on `--metrics-addr` by `dra::http` (with
//! `/healthz` and `/readyz`).

use crate::discovery::Snapshot;
use crate::usage::UsageCollector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// `controller` or `native`.
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub device: String,
    pub uuid: String,
}

/// The plugin's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    prepare: Family<ResultLabels, Counter>,
    unprepare: Family<ResultLabels, Counter>,
    prepare_seconds: Histogram,
    prepare_api_read_seconds: Histogram,
    unprepare_seconds: Histogram,
    published_devices: Gauge,
    prepared_claims: Gauge,
    gpu_healthy: Family<GpuLabels, Gauge>,
    sharing_mode: Family<ModeLabels, Gauge>,
    registered: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn label(ok: bool) -> ResultLabels {
    ResultLabels {
        result: if ok { "success" } else { "error" }.into(),
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::build(None)
    }

    /// With the usage metrics of prepared claims, read on each scrape.
    pub fn with_usage(usage: UsageCollector) -> Self {
        Self::build(Some(usage))
    }

    fn build(usage: Option<UsageCollector>) -> Self {
        let mut registry = Registry::with_prefix("vgpu_kubelet_plugin");
        if let Some(usage) = usage {
            registry.register_collector(Box::new(usage));
        }
        let prepare = Family::<ResultLabels, Counter>::default();
        let unprepare = Family::<ResultLabels, Counter>::default();
        // 1 ms to ~16 s: preparing is file I/O plus one API GET.
        let prepare_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        // 0.125 ms to ~4 s: a GET from a nearby API server takes well under a millisecond.
        let prepare_api_read_seconds = Histogram::new(exponential_buckets(0.000_125, 2.0, 16));
        let unprepare_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let published_devices = Gauge::default();
        let prepared_claims = Gauge::default();
        let gpu_healthy = Family::<GpuLabels, Gauge>::default();
        let sharing_mode = Family::<ModeLabels, Gauge>::default();
        let registered = Gauge::default();
        registry.register(
            "registered",
            "1 while the kubelet has accepted this plugin's registration (no claim of the \
             driver can be prepared on the node otherwise), 0 before and after a rejection",
            registered.clone(),
        );
        registry.register(
            "sharing_mode",
            "1 for the sharing mode in effect (controller or native; native falls back to \
             controller when the cluster drops its fields)",
            sharing_mode.clone(),
        );
        registry.register(
            "prepare_claims",
            "Claims prepared, by result",
            prepare.clone(),
        );
        registry.register(
            "unprepare_claims",
            "Claims unprepared, by result",
            unprepare.clone(),
        );
        registry.register(
            "prepare_duration_seconds",
            "Time to answer one NodePrepareResources call",
            prepare_seconds.clone(),
        );
        registry.register(
            "prepare_api_read_duration_seconds",
            "Of the time to answer one NodePrepareResources call, the time spent reading its \
             claims from the API server (the rest is the node's own work)",
            prepare_api_read_seconds.clone(),
        );
        registry.register(
            "unprepare_duration_seconds",
            "Time to answer one NodeUnprepareResources call",
            unprepare_seconds.clone(),
        );
        registry.register(
            "published_devices",
            "GPUs offered in this node's ResourceSlices",
            published_devices.clone(),
        );
        registry.register(
            "prepared_claims",
            "Claims prepared on this node now",
            prepared_claims.clone(),
        );
        registry.register(
            "gpu_healthy",
            "1 while the GPU is healthy and offered, 0 once it is taken out of service",
            gpu_healthy.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            prepare,
            unprepare,
            prepare_seconds,
            prepare_api_read_seconds,
            unprepare_seconds,
            registered,
            published_devices,
            prepared_claims,
            gpu_healthy,
            sharing_mode,
        }
    }

    pub fn set_sharing_mode(&self, mode: crate::publish::SharingMode) {
        for m in ["controller", "native"] {
            let value = i64::from(m == mode.as_str());
            self.sharing_mode
                .get_or_create(&ModeLabels { mode: m.into() })
                .set(value);
        }
    }

    pub fn prepared(&self, ok: bool) {
        self.prepare.get_or_create(&label(ok)).inc();
    }

    pub fn unprepared(&self, ok: bool) {
        self.unprepare.get_or_create(&label(ok)).inc();
    }

    /// One NodePrepareResources call: its whole time and the part spent on API reads.
    pub fn observe_prepare(&self, took: Duration, api_reads: Duration) {
        self.prepare_seconds.observe(took.as_secs_f64());
        self.prepare_api_read_seconds
            .observe(api_reads.as_secs_f64());
    }

    pub fn observe_unprepare(&self, took: Duration) {
        self.unprepare_seconds.observe(took.as_secs_f64());
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.set(i64::from(registered));
    }

    pub fn set_published_devices(&self, n: usize) {
        self.published_devices.set(n as i64);
    }

    pub fn set_prepared_claims(&self, n: usize) {
        self.prepared_claims.set(n as i64);
    }

    pub fn set_gpu_health(&self, snapshot: &Snapshot) {
        for gpu in &snapshot.gpus {
            let labels = GpuLabels {
                device: gpu.device_name(),
                uuid: gpu.uuid.clone(),
            };
            let healthy = snapshot.unhealthy_reason(&gpu.uuid).is_none();
            self.gpu_healthy
                .get_or_create(&labels)
                .set(i64::from(healthy));
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_latency_are_exposed() {
        let metrics = Metrics::new();
        metrics.prepared(true);
        metrics.prepared(false);
        metrics.prepared(true);
        metrics.observe_prepare(Duration::from_millis(3), Duration::from_micros(700));
        metrics.set_published_devices(7);
        let text = metrics.encode();
        assert!(
            text.contains("vgpu_kubelet_plugin_prepare_claims_total{result=\"success\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("vgpu_kubelet_plugin_prepare_claims_total{result=\"error\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vgpu_kubelet_plugin_published_devices 7"),
            "{text}"
        );
        assert!(
            text.contains("vgpu_kubelet_plugin_prepare_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("vgpu_kubelet_plugin_prepare_api_read_duration_seconds_sum 0.0007"),
            "{text}"
        );
    }
}
