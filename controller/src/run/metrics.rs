//! Prometheus metrics of the controller (served by `dra::http::Endpoint`).

use crate::engine::state::ClusterState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `unschedulable` (no room now, retried) or `invalid` (the claim cannot be allocated as
    /// written).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub node: String,
    pub device: String,
}

/// The controller's metrics, registered once.
pub struct Metrics {
    registry: Registry,
    pub allocated: Counter,
    pub refused: Family<RefusalLabels, Counter>,
    pub conflicts: Counter,
    pub decision_seconds: Histogram,
    pub gpu_memory_bytes: Family<GpuLabels, Gauge>,
    pub gpu_cores: Family<GpuLabels, Gauge>,
    pub gpu_claims: Family<GpuLabels, Gauge>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vgpu_controller");
        let allocated = Counter::default();
        let refused = Family::<RefusalLabels, Counter>::default();
        let conflicts = Counter::default();
        // 1 µs to about 4 s: decisions are microseconds, a pass over a large backlog longer.
        let decision_seconds = Histogram::new(exponential_buckets(1e-6, 4.0, 12));
        let gpu_memory_bytes = Family::<GpuLabels, Gauge>::default();
        let gpu_cores = Family::<GpuLabels, Gauge>::default();
        let gpu_claims = Family::<GpuLabels, Gauge>::default();
        let leader = Gauge::default();
        registry.register(
            "claims_allocated",
            "ResourceClaims whose allocation this controller wrote",
            allocated.clone(),
        );
        registry.register(
            "claims_refused",
            "Allocation attempts that found no room or an invalid claim",
            refused.clone(),
        );
        registry.register(
            "write_conflicts",
            "Claim writes answered 409 Conflict and retried after a re-read",
            conflicts.clone(),
        );
        registry.register(
            "decision_seconds",
            "Time the engine took to decide one claim",
            decision_seconds.clone(),
        );
        registry.register(
            "gpu_allocated_memory_bytes",
            "Device memory allocated on a GPU by all claims",
            gpu_memory_bytes.clone(),
        );
        registry.register(
            "gpu_allocated_cores",
            "Compute share (percent) allocated on a GPU by all claims",
            gpu_cores.clone(),
        );
        registry.register(
            "gpu_claims",
            "Claims holding a part of a GPU",
            gpu_claims.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            allocated,
            refused,
            conflicts,
            decision_seconds,
            gpu_memory_bytes,
            gpu_cores,
            gpu_claims,
            leader,
        }
    }

    /// Set the per-GPU gauges from the state a pass ended with.
    pub fn observe_state(&self, state: &ClusterState) {
        // Drop GPUs that disappeared (node removed, pool replaced).
        self.gpu_memory_bytes.clear();
        self.gpu_cores.clear();
        self.gpu_claims.clear();
        for gpu in &state.gpus {
            let labels = GpuLabels {
                node: state.nodes[gpu.node].view.name.clone(),
                device: gpu.device.name.clone(),
            };
            let used = gpu.used;
            self.gpu_memory_bytes.get_or_create(&labels).set(
                i64::try_from(used.memory_bytes.min(gpu.total.memory_bytes)).unwrap_or(i64::MAX),
            );
            self.gpu_cores
                .get_or_create(&labels)
                .set(i64::from(used.cores.min(gpu.total.cores)));
            self.gpu_claims
                .get_or_create(&labels)
                .set(i64::from(gpu.holders));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::new();
        m.allocated.inc();
        m.refused
            .get_or_create(&RefusalLabels {
                reason: "unschedulable".into(),
            })
            .inc_by(2);
        m.decision_seconds.observe(0.00002);
        m.gpu_memory_bytes
            .get_or_create(&GpuLabels {
                node: "n1".into(),
                device: "gpu-0".into(),
            })
            .set(10 << 30);
        let text = m.render();
        assert!(
            text.contains("vgpu_controller_claims_allocated_total 1"),
            "{text}"
        );
        assert!(
            text.contains("vgpu_controller_claims_refused_total{reason=\"unschedulable\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("vgpu_controller_decision_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "vgpu_controller_gpu_allocated_memory_bytes{node=\"n1\",device=\"gpu-0\"} 10737418240"
            ),
            "{text}"
        );
    }
}
