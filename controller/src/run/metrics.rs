//! Prometheus metrics of the controller (served by `dra::http::Endpoint`).

use crate::engine::state::ClusterState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use vgpu_driver::slice::AttributeValue;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why: `no_matching_gpu`, `no_eligible_node`, `insufficient_capacity`, `topology`
    /// (retried) or `invalid` (the claim cannot be allocated as written).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PendingLabels {
    /// A [`RefusalLabels`] reason, or `undecided` for a claim not refused (yet).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub node: String,
    /// The device's name in the ResourceSlice (`gpu-0`).
    pub device: String,
    /// The `uuid`, `index` and `productName` attributes the plugin published (empty when
    /// absent), to join with the plugin's and NVIDIA's exporters.
    pub uuid: String,
    pub index: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// The controller's metrics, registered once.
pub struct Metrics {
    registry: Registry,
    pub allocated: Counter,
    pub refused: Family<RefusalLabels, Counter>,
    pub conflicts: Counter,
    pub gates_lifted: Counter,
    pub decision_seconds: Histogram,
    pub pass_seconds: Histogram,
    pub gpu_memory_allocated_bytes: Family<GpuLabels, Gauge>,
    pub gpu_memory_free_bytes: Family<GpuLabels, Gauge>,
    pub gpu_cores_allocated_percent: Family<GpuLabels, Gauge>,
    pub gpu_cores_free_percent: Family<GpuLabels, Gauge>,
    pub gpu_claims: Family<GpuLabels, Gauge>,
    pub node_fragmentation: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    pub pending: Family<PendingLabels, Gauge>,
    pub leader: Gauge,
    /// The label sets of the GPUs and nodes of the last state observed.
    observed: Mutex<Option<Observed>>,
}

/// Label sets of one engine build, by GPU and node index: built once per build rather than
/// per pass (five strings per GPU, and a pass runs after every burst of changes).
struct Observed {
    build: u64,
    gpus: Vec<GpuLabels>,
    nodes: Vec<NodeLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vgpu_controller");
        let m = Metrics {
            registry: Registry::default(),
            allocated: Counter::default(),
            refused: Family::default(),
            conflicts: Counter::default(),
            gates_lifted: Counter::default(),
            // 1 µs to about 4 s: decisions are microseconds, a pass over a large backlog longer.
            decision_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            // 100 µs to about 3 s: a pass reads the whole cache, so it grows with the cluster.
            pass_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            gpu_memory_allocated_bytes: Family::default(),
            gpu_memory_free_bytes: Family::default(),
            gpu_cores_allocated_percent: Family::default(),
            gpu_cores_free_percent: Family::default(),
            gpu_claims: Family::default(),
            node_fragmentation: Family::default(),
            pending: Family::default(),
            leader: Gauge::default(),
            observed: Mutex::default(),
        };
        registry.register(
            "claims_allocated",
            "ResourceClaims whose allocation this controller wrote",
            m.allocated.clone(),
        );
        registry.register(
            "claims_refused",
            "Claims the leader found no room for or invalid, each counted once per episode of one reason (not per retry)",
            m.refused.clone(),
        );
        registry.register(
            "write_conflicts",
            "Claim writes answered 409 Conflict and retried after a re-read",
            m.conflicts.clone(),
        );
        registry.register(
            "scheduling_gates_lifted",
            "Pods whose scheduling gate this controller removed once their claims were allocated",
            m.gates_lifted.clone(),
        );
        registry.register(
            "decision_seconds",
            "Time the engine took to decide one claim",
            m.decision_seconds.clone(),
        );
        registry.register(
            "pass_duration_seconds",
            "Time of one pass over the watch caches: allocating and writing on the leader, observing on a standby",
            m.pass_seconds.clone(),
        );
        registry.register(
            "gpu_memory_allocated_bytes",
            "Device memory allocated on a GPU by all claims, as this replica's watch caches show",
            m.gpu_memory_allocated_bytes.clone(),
        );
        registry.register(
            "gpu_memory_free_bytes",
            "Device memory of a GPU no claim holds (0 while a claim holds it exclusively)",
            m.gpu_memory_free_bytes.clone(),
        );
        registry.register(
            "gpu_cores_allocated_percent",
            "Compute share of a GPU allocated by all claims, in percent",
            m.gpu_cores_allocated_percent.clone(),
        );
        registry.register(
            "gpu_cores_free_percent",
            "Compute share of a GPU no claim holds, in percent (0 while held exclusively)",
            m.gpu_cores_free_percent.clone(),
        );
        registry.register(
            "gpu_claims",
            "Claims holding a part of a GPU",
            m.gpu_claims.clone(),
        );
        registry.register(
            "node_memory_fragmentation_ratio",
            "1 - (free memory of the node's roomiest GPU / free memory of all its GPUs): 0 when the free memory is on one GPU (or none is free), towards 1 when it is spread in pieces no single slice can use",
            m.node_fragmentation.clone(),
        );
        registry.register(
            "pending_claims",
            "Claims of the controller's classes that a pod waits for and that are not allocated, by the reason of their last refusal",
            m.pending.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Set the per-GPU and per-node gauges from a cluster state: the leader's after a pass,
    /// a standby's from its own caches.
    pub fn observe_state(&self, state: &ClusterState) {
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        if observed.as_ref().is_none_or(|o| {
            o.build != state.build
                || o.gpus.len() != state.gpus.len()
                || o.nodes.len() != state.nodes.len()
        }) {
            let now = Observed::of(state);
            // Drop the series of GPUs and nodes that disappeared (node removed, pool replaced).
            if let Some(old) = observed.take() {
                let gpus: HashSet<&GpuLabels> = now.gpus.iter().collect();
                for gone in old.gpus.iter().filter(|l| !gpus.contains(l)) {
                    self.gpu_memory_allocated_bytes.remove(gone);
                    self.gpu_memory_free_bytes.remove(gone);
                    self.gpu_cores_allocated_percent.remove(gone);
                    self.gpu_cores_free_percent.remove(gone);
                    self.gpu_claims.remove(gone);
                }
                let nodes: HashSet<&NodeLabels> = now.nodes.iter().collect();
                for gone in old.nodes.iter().filter(|l| !nodes.contains(l)) {
                    self.node_fragmentation.remove(gone);
                }
            }
            *observed = Some(now);
        }
        let Some(labels) = observed.as_ref() else {
            return;
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (n, node) in state.nodes.iter().enumerate() {
            let (mut total_free, mut max_free) = (0u128, 0u64);
            for &g in &node.gpus {
                let gpu = &state.gpus[g];
                let labels = &labels.gpus[g];
                let used_memory = gpu.used.memory_bytes.min(gpu.total.memory_bytes);
                let used_cores = gpu.used.cores.min(gpu.total.cores);
                // An exclusively held GPU has nothing to give whatever its counters say.
                let free = if gpu.exclusive {
                    vgpu_driver::Capacity::default()
                } else {
                    gpu.free()
                };
                total_free += u128::from(free.memory_bytes);
                max_free = max_free.max(free.memory_bytes);
                self.gpu_memory_allocated_bytes
                    .get_or_create(labels)
                    .set(clamp(used_memory));
                self.gpu_memory_free_bytes
                    .get_or_create(labels)
                    .set(clamp(free.memory_bytes));
                self.gpu_cores_allocated_percent
                    .get_or_create(labels)
                    .set(i64::from(used_cores));
                self.gpu_cores_free_percent
                    .get_or_create(labels)
                    .set(i64::from(free.cores));
                self.gpu_claims
                    .get_or_create(labels)
                    .set(i64::from(gpu.holders));
            }
            self.node_fragmentation
                .get_or_create(&labels.nodes[n])
                .set(fragmentation(max_free, total_free));
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

impl Observed {
    fn of(state: &ClusterState) -> Observed {
        let attribute = |gpu: &crate::engine::state::GpuState, name: &str| match gpu
            .device
            .attributes
            .get(name)
        {
            Some(AttributeValue::String(s)) | Some(AttributeValue::Version(s)) => s.clone(),
            Some(AttributeValue::Int(i)) => i.to_string(),
            Some(AttributeValue::Bool(b)) => b.to_string(),
            None => String::new(),
        };
        Observed {
            build: state.build,
            gpus: state
                .gpus
                .iter()
                .map(|gpu| GpuLabels {
                    node: state.nodes[gpu.node].view.name.clone(),
                    device: gpu.device.name.clone(),
                    uuid: attribute(gpu, "uuid"),
                    index: attribute(gpu, "index"),
                    model: attribute(gpu, "productName"),
                })
                .collect(),
            nodes: state
                .nodes
                .iter()
                .map(|node| NodeLabels {
                    node: node.view.name.clone(),
                })
                .collect(),
        }
    }
}

/// External fragmentation of a node's free GPU memory: the share of it that is not on its
/// roomiest GPU, hence out of reach of a slice as large as all of it. 0 with nothing free.
pub fn fragmentation(max_free: u64, total_free: u128) -> f64 {
    if total_free == 0 {
        return 0.0;
    }
    1.0 - max_free as f64 / total_free as f64
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
                reason: "insufficient_capacity".into(),
            })
            .inc_by(2);
        m.decision_seconds.observe(0.00002);
        m.gpu_memory_free_bytes
            .get_or_create(&GpuLabels {
                node: "n1".into(),
                device: "gpu-0".into(),
                uuid: "GPU-1".into(),
                index: "0".into(),
                model: "H100".into(),
            })
            .set(10 << 30);
        m.node_fragmentation
            .get_or_create(&NodeLabels { node: "n1".into() })
            .set(0.25);
        let text = m.render();
        for line in [
            "vgpu_controller_claims_allocated_total 1",
            "vgpu_controller_claims_refused_total{reason=\"insufficient_capacity\"} 2",
            "vgpu_controller_decision_seconds_count 1",
            "vgpu_controller_gpu_memory_free_bytes{node=\"n1\",device=\"gpu-0\",uuid=\"GPU-1\",index=\"0\",model=\"H100\"} 10737418240",
            "vgpu_controller_node_memory_fragmentation_ratio{node=\"n1\"} 0.25",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    #[test]
    fn fragmentation_is_the_free_memory_off_the_roomiest_gpu() {
        assert_eq!(fragmentation(0, 0), 0.0);
        // All free memory on one GPU: a slice of all of it fits.
        assert_eq!(fragmentation(80, 80), 0.0);
        // Four GPUs with 20 free each: three quarters out of reach of an 80 slice.
        assert_eq!(fragmentation(20, 80), 0.75);
    }
}
