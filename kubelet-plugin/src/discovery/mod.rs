//! GPU discovery and health: what GPUs this node has and which of them may be offered.
//!
//! Two sources feed the same [`GpuState`]: real GPUs through NVML ([`nvml`]) and a fake
//! inventory file for clusters without GPUs, demos and tests ([`fake`]). Everything after
//! discovery (publishing, preparing) only sees [`Snapshot`]s, so both go through the same code.

pub mod fake;
pub mod nvml;

use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use vgpu_driver::Gpu;
use vgpu_driver::slice::{PublishedDevice, SliceError, gpu_devices};

/// Why GPUs could not be discovered.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "NVML (libnvidia-ml.so.1) could not be loaded: {0}. This node has no NVIDIA driver \
         visible to the plugin; install the driver (or mount it into the container), or run \
         with --fake-gpus FILE to describe GPUs"
    )]
    NvmlMissing(String),
    #[error("NVML: {op}: {message}")]
    Nvml { op: String, message: String },
    #[error("cannot read fake GPU inventory {path}: {source}")]
    ReadInventory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fake GPU inventory {path}: {message}")]
    Inventory { path: String, message: String },
    #[error("discovered GPUs are inconsistent: {0}")]
    Invalid(#[from] vgpu_driver::gpu::InventoryError),
}

/// The node's GPUs and their health at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub gpus: Vec<Gpu>,
    /// GPU UUID → why it is unhealthy. Absent = healthy.
    pub unhealthy: BTreeMap<String, String>,
}

impl Snapshot {
    /// The GPU published under `device` (`gpu-<index>`).
    pub fn gpu_by_device(&self, device: &str) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.device_name() == device)
    }

    /// Why the GPU is unhealthy, if it is.
    pub fn unhealthy_reason(&self, uuid: &str) -> Option<&str> {
        self.unhealthy.get(uuid).map(String::as_str)
    }

    /// The devices to publish, unhealthy ones marked (the renderer leaves them out or taints
    /// them depending on what the API supports).
    pub fn published_devices(&self) -> Result<Vec<PublishedDevice>, SliceError> {
        let mut devices = gpu_devices(&self.gpus)?;
        for (device, gpu) in devices.iter_mut().zip(&self.gpus) {
            device.unhealthy = self.unhealthy.get(&gpu.uuid).cloned();
        }
        Ok(devices)
    }
}

/// The current [`Snapshot`], shared by discovery, the health watchers, the publisher and
/// prepare. Cheap to clone; subscribers are woken on every change.
#[derive(Clone, Debug)]
pub struct GpuState {
    tx: Arc<watch::Sender<Snapshot>>,
}

impl GpuState {
    pub fn new(snapshot: Snapshot) -> Self {
        let (tx, _) = watch::channel(snapshot);
        GpuState { tx: Arc::new(tx) }
    }

    /// A copy of the current snapshot.
    pub fn current(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    /// Replace the snapshot; subscribers are only woken when something changed.
    pub fn replace(&self, snapshot: Snapshot) -> bool {
        self.tx.send_if_modified(|current| {
            if *current == snapshot {
                false
            } else {
                *current = snapshot;
                true
            }
        })
    }

    /// Mark a GPU unhealthy (the first reason is kept). Returns whether anything changed.
    pub fn mark_unhealthy(&self, uuid: &str, reason: &str) -> bool {
        self.tx.send_if_modified(|s| {
            if !s.gpus.iter().any(|g| g.uuid == uuid) || s.unhealthy.contains_key(uuid) {
                return false;
            }
            tracing::error!(
                gpu = uuid,
                reason,
                "GPU is unhealthy: it is no longer offered"
            );
            s.unhealthy.insert(uuid.to_string(), reason.to_string());
            true
        })
    }

    /// Mark a GPU healthy again. Returns whether anything changed.
    pub fn mark_healthy(&self, uuid: &str) -> bool {
        self.tx.send_if_modified(|s| {
            let changed = s.unhealthy.remove(uuid).is_some();
            if changed {
                tracing::info!(gpu = uuid, "GPU is healthy again");
            }
            changed
        })
    }
}

/// Where GPUs come from.
pub enum GpuSource {
    Fake(fake::FakeSource),
    Nvml(nvml::NvmlSource),
}

impl GpuSource {
    /// Discover the GPUs and their current health.
    pub fn discover(&self) -> Result<Snapshot, DiscoveryError> {
        let snapshot = match self {
            GpuSource::Fake(f) => f.discover()?,
            GpuSource::Nvml(n) => n.discover()?,
        };
        vgpu_driver::gpu::validate_gpus(&snapshot.gpus)?;
        Ok(snapshot)
    }

    /// Keep `state`'s health current until `stop` fires: NVML events for real GPUs, file
    /// changes for a fake inventory.
    pub fn spawn_health_watcher(
        self,
        state: GpuState,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::thread::JoinHandle<()> {
        match self {
            GpuSource::Fake(f) => f.spawn_watcher(state, stop),
            GpuSource::Nvml(n) => n.spawn_watcher(state, stop),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use test_support::gpu;

    #[test]
    fn health_changes_wake_subscribers_and_mark_devices() {
        let state = GpuState::new(Snapshot {
            gpus: vec![gpu(0), gpu(1)],
            unhealthy: BTreeMap::new(),
        });
        let mut rx = state.subscribe();
        let uuid = gpu(1).uuid;
        assert!(state.mark_unhealthy(&uuid, "Xid 79"));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // Same GPU again, or an unknown GPU: nothing changes, nobody is woken.
        assert!(!state.mark_unhealthy(&uuid, "Xid 48"));
        assert!(!state.mark_unhealthy("GPU-nope", "Xid 48"));
        assert!(!rx.has_changed().unwrap());
        let devices = state.current().published_devices().unwrap();
        assert_eq!(devices[0].unhealthy, None);
        assert_eq!(devices[1].unhealthy.as_deref(), Some("Xid 79"));
        assert!(state.mark_healthy(&uuid));
        assert!(!state.mark_healthy(&uuid));
        assert_eq!(state.current().unhealthy_reason(&uuid), None);
    }
}
