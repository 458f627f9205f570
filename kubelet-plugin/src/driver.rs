//! The vGPU driver's answer to the kubelet, behind [`dra::kubeletplugin::Driver`]: the helper
//! has already checked each claim (the UID the kubelet holds, allocated, for this node); this
//! reads its allocation and hands it to the [`Preparer`] off the async threads (prepare writes
//! and fsyncs files).

use crate::discovery::{GpuState, Snapshot};
use crate::metrics::Metrics;
use crate::prepare::{PrepareError, Preparer};
use dra::kubeletplugin::{Call, ClaimRef, Device, DeviceHealth, Driver, Timing};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::resource::v1::ResourceClaim;
use std::sync::Arc;
use vgpu_driver::ClaimAllocation;

/// Why the driver could not answer for a claim.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Allocation(#[from] vgpu_driver::AllocationError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The plugin's [`Driver`].
pub struct VgpuDriver {
    preparer: Arc<Preparer>,
    metrics: Metrics,
    gpus: GpuState,
    /// Pool name of the devices (the node).
    pool: String,
}

/// Every GPU's health in `snapshot`, as the kubelet's health service carries it.
pub fn device_health(snapshot: &Snapshot, pool: &str, now: i64) -> Vec<DeviceHealth> {
    snapshot
        .gpus
        .iter()
        .map(|gpu| DeviceHealth {
            pool_name: pool.to_string(),
            device_name: gpu.device_name(),
            healthy: Some(snapshot.unhealthy_reason(&gpu.uuid).is_none()),
            last_updated: now,
        })
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl VgpuDriver {
    pub fn new(preparer: Arc<Preparer>, metrics: Metrics, gpus: GpuState, pool: &str) -> Self {
        VgpuDriver {
            preparer,
            metrics,
            gpus,
            pool: pool.to_string(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Preparer) -> Result<T, PrepareError> + Send + 'static,
    ) -> Result<T, DriverError> {
        let preparer = self.preparer.clone();
        tokio::task::spawn_blocking(move || f(&preparer))
            .await
            .map_err(|e| DriverError::Internal(e.to_string()))?
            .map_err(DriverError::from)
    }

    /// Fold the checkpoint's journal into its snapshot when it has grown, after the answer
    /// is made: the kubelet does not wait for it (a following call waits for the lock).
    fn compact_when_due(&self) {
        if !self.preparer.compaction_due() {
            return;
        }
        let preparer = self.preparer.clone();
        tokio::task::spawn_blocking(move || match preparer.compact_if_due() {
            Ok(true) => tracing::debug!("folded the checkpoint journal into its snapshot"),
            Ok(false) => {}
            // Nothing is lost: the journal still holds every change, and the next call tries
            // again.
            Err(e) => {
                tracing::warn!(error = %e, "cannot fold the checkpoint journal into its snapshot")
            }
        });
    }
}

impl Driver for VgpuDriver {
    type Error = DriverError;

    async fn prepared(&self, claim: &ClaimRef) -> Result<Option<Vec<Device>>, DriverError> {
        let uid = claim.uid.clone();
        let known = self.blocking(move |p| p.prepared_claim(&uid)).await?;
        Ok(known.map(|prepared| prepared.devices))
    }

    async fn prepare(&self, claims: Vec<ResourceClaim>) -> Vec<Result<Vec<Device>, DriverError>> {
        let mut answers: Vec<Option<Result<Vec<Device>, DriverError>>> = Vec::new();
        let mut allocations = Vec::new();
        for claim in &claims {
            match ClaimAllocation::of(claim) {
                Ok(allocation) => {
                    allocations.push(allocation);
                    answers.push(None);
                }
                Err(e) => answers.push(Some(Err(e.into()))),
            }
        }
        // One blocking task and one checkpoint write for every claim of the call.
        let preparer = self.preparer.clone();
        let joined = tokio::task::spawn_blocking(move || preparer.prepare_all(&allocations)).await;
        self.compact_when_due();
        let (mut prepared, failed) = match joined {
            Ok(results) => (results.into_iter(), None),
            Err(e) => (Vec::new().into_iter(), Some(e.to_string())),
        };
        answers
            .into_iter()
            .map(|answer| match answer {
                Some(error) => error,
                None => match prepared.next() {
                    Some(result) => result.map(|claim| claim.devices).map_err(DriverError::from),
                    None => {
                        Err(DriverError::Internal(failed.clone().unwrap_or_else(|| {
                            "prepare did not answer for every claim".into()
                        })))
                    }
                },
            })
            .collect()
    }

    async fn unprepare(&self, claim: &ClaimRef) -> Result<(), DriverError> {
        let uid = claim.uid.clone();
        let done = self.blocking(move |p| p.unprepare(&uid).map(|_| ())).await;
        self.compact_when_due();
        done
    }

    fn device_health(&self) -> Option<BoxStream<'static, Vec<DeviceHealth>>> {
        let pool = self.pool.clone();
        // The current health first, then every change.
        let updates = tokio_stream::wrappers::WatchStream::new(self.gpus.subscribe())
            .map(move |snapshot| device_health(&snapshot, &pool, unix_now()));
        Some(updates.boxed())
    }

    fn observe(&self, call: Call, outcomes: &[(ClaimRef, bool)], timing: Timing) {
        for (_, ok) in outcomes {
            match call {
                Call::Prepare => self.metrics.prepared(*ok),
                Call::Unprepare => self.metrics.unprepared(*ok),
            }
        }
        match call {
            Call::Prepare => self.metrics.observe_prepare(timing.total, timing.api_reads),
            Call::Unprepare => self.metrics.observe_unprepare(timing.total),
        }
        self.metrics
            .set_prepared_claims(self.preparer.prepared_count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::tests::gpu;

    #[test]
    fn health_is_reported_per_published_device() {
        let snapshot = Snapshot {
            gpus: vec![gpu(0), gpu(1)],
            unhealthy: [(gpu(1).uuid, "Xid 79".to_string())].into(),
        };
        let health = device_health(&snapshot, "node-a", 42);
        assert_eq!(
            health,
            vec![
                DeviceHealth {
                    pool_name: "node-a".into(),
                    device_name: "gpu-0".into(),
                    healthy: Some(true),
                    last_updated: 42,
                },
                DeviceHealth {
                    pool_name: "node-a".into(),
                    device_name: "gpu-1".into(),
                    healthy: Some(false),
                    last_updated: 42,
                },
            ]
        );
    }
}
