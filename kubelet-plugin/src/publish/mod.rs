//! Publishing the node's GPUs as ResourceSlices: what the pool holds (one device per GPU, in
//! the sharing mode in effect) is decided here; [`dra::resourceslice::PoolWriter`] makes the
//! API server show it.
//!
//! Republished at start (the kubelet wipes a node's slices when it restarts and 30 s after a
//! plugin disconnects), on health changes, and on drift: a watch on our slices puts back what
//! someone deleted or edited.

use crate::discovery::{GpuState, Snapshot};
use crate::metrics::Metrics;
use dra::ApiVersion;
use dra::events::EventSink;
use dra::resourceslice::{PoolWriter, same_content};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::runtime::events::EventType;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use vgpu_driver::slice::{PoolOptions, SliceError, render_pool};

/// Why publishing failed (retried with backoff by [`run`]).
pub type PublishError = dra::resourceslice::PublishError<SliceError>;

/// Who allocates slices of this node's GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SharingMode {
    /// The vgpu controller (any Kubernetes 1.32+): one plain device per GPU.
    #[default]
    Controller,
    /// The kube-scheduler with DRA consumable capacity (1.34+, gate DRAConsumableCapacity):
    /// each GPU with `allowMultipleAllocations` and request policies for memory and cores.
    Native,
}

impl SharingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SharingMode::Controller => "controller",
            SharingMode::Native => "native",
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncOutcome {
    pub generation: i64,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub devices: usize,
}

impl SyncOutcome {
    pub fn changed(&self) -> bool {
        self.created + self.updated + self.deleted > 0
    }
}

/// Publishes one node's pool.
pub struct Publisher {
    pool: PoolWriter,
    events: EventSink,
    driver: String,
    /// Taint unhealthy GPUs instead of leaving them out (needs DRADeviceTaints on the cluster).
    taint_unhealthy: bool,
    mode: SharingMode,
    /// Why native mode was given up, until [`Publisher::take_fallback`] reports it.
    fallback: Option<String>,
}

impl Publisher {
    /// GETs the Node for its UID (the owner reference needs it).
    pub async fn new(
        client: kube::Client,
        driver: &str,
        node_name: &str,
        api_version: ApiVersion,
        taint_unhealthy: bool,
        mode: SharingMode,
    ) -> Result<Self, PublishError> {
        let pool = PoolWriter::new(client.clone(), api_version, driver, node_name).await?;
        Ok(Publisher {
            pool,
            events: EventSink::new(client, &format!("{driver}/kubelet-plugin"), node_name),
            driver: driver.into(),
            taint_unhealthy,
            mode,
            fallback: None,
        }
        .check_native_served())
    }

    /// Native sharing needs the v1 API (1.34+); v1beta1 of 1.32/1.33 has no such fields.
    fn check_native_served(mut self) -> Self {
        if self.mode == SharingMode::Native && self.pool.version() != ApiVersion::V1 {
            self.fall_back(
                "resource.k8s.io/v1 is not served, so this is Kubernetes 1.33 or older: native \
                 sharing needs 1.34+ with the DRAConsumableCapacity feature gate",
            );
        }
        self
    }

    fn fall_back(&mut self, why: &str) {
        self.mode = SharingMode::Controller;
        let message = format!(
            "{why}; publishing for the controller mode instead (GPU-slice classes of the vgpu \
             controller keep working; native-mode classes get whole GPUs)"
        );
        tracing::error!("{message}");
        self.fallback = Some(message);
    }

    /// The sharing mode in effect (native falls back to controller when the cluster cannot).
    pub fn mode(&self) -> SharingMode {
        self.mode
    }

    /// Why native mode was just given up, once.
    pub fn take_fallback(&mut self) -> Option<String> {
        self.fallback.take()
    }

    pub fn api_version(&self) -> ApiVersion {
        self.pool.version()
    }

    /// Make the published pool match `snapshot`.
    pub async fn sync(&mut self, snapshot: &Snapshot) -> Result<SyncOutcome, PublishError> {
        let mut devices = snapshot.published_devices().map_err(PublishError::Render)?;
        for device in &mut devices {
            device.allow_multiple_allocations = self.mode == SharingMode::Native;
        }
        let published = devices
            .iter()
            .filter(|d| d.unhealthy.is_none() || self.taint_unhealthy)
            .count();
        let (driver, taint_unhealthy) = (self.driver.clone(), self.taint_unhealthy);
        let synced = self
            .pool
            .sync(|node, generation| {
                let mut opts = PoolOptions::new(&driver);
                opts.generation = generation;
                opts.taint_unhealthy = taint_unhealthy;
                render_pool(node, &devices, &opts)
            })
            .await?;
        self.check_stored(&synced.written);
        Ok(SyncOutcome {
            generation: synced.generation,
            created: synced.created,
            updated: synced.updated,
            deleted: synced.deleted,
            devices: published,
        })
    }

    /// Alpha fields are dropped silently when their feature gate is off: compare what was
    /// stored with what was sent. Dropped taints would offer unhealthy GPUs, so fall back to
    /// leaving them out.
    fn check_stored(&mut self, written: &[(ResourceSlice, ResourceSlice)]) {
        let multiple = |s: &ResourceSlice| {
            s.spec
                .devices
                .iter()
                .flatten()
                .any(|d| d.allow_multiple_allocations == Some(true))
        };
        for (sent, stored) in written {
            if self.mode == SharingMode::Native && multiple(sent) && !multiple(stored) {
                self.fall_back(
                    "the API server dropped allowMultipleAllocations from the ResourceSlice: \
                     the DRAConsumableCapacity feature gate is off",
                );
                // The stored slices lack the flag already; the next sync rewrites them whole
                // for the controller mode.
                break;
            }
            if !same_content(stored, sent) {
                if self.taint_unhealthy {
                    tracing::error!(
                        "the API server dropped device taints (DRADeviceTaints is off): unhealthy GPUs are now left out of the slice instead"
                    );
                    self.taint_unhealthy = false;
                } else {
                    tracing::warn!(
                        slice = stored.metadata.name.as_deref().unwrap_or(""),
                        "the API server stored a slice different from the one sent"
                    );
                }
            }
        }
    }

    /// Tells the admin where `kubectl describe node` shows it: a Warning Event on the Node.
    async fn announce_fallback(&self, why: &str) {
        let node = self.pool.node();
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.name.clone()),
            uid: Some(node.uid.clone()),
            ..Default::default()
        };
        self.events
            .publish(
                &regarding,
                EventType::Warning,
                "NativeSharingUnavailable",
                "PublishResourceSlices",
                why,
            )
            .await;
    }

    fn spawn_drift_watch(&self, notify: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        self.pool.watch_drift(notify)
    }
}

/// Publish until `stop` fires: at start, on every health or inventory change, on drift, and
/// every `resync` as a safety net. Failures are retried with backoff (1 s doubling to 30 s).
pub async fn run(
    mut publisher: Publisher,
    gpus: GpuState,
    metrics: Metrics,
    resync: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let notify = Arc::new(Notify::new());
    let watch = publisher.spawn_drift_watch(notify.clone());
    metrics.set_sharing_mode(publisher.mode());
    if let Some(why) = publisher.take_fallback() {
        publisher.announce_fallback(&why).await;
    }
    let mut changes = gpus.subscribe();
    let mut backoff = Duration::from_secs(1);
    loop {
        let snapshot = gpus.current();
        metrics.set_gpu_health(&snapshot);
        let wait = match publisher.sync(&snapshot).await {
            Ok(outcome) => {
                metrics.set_published_devices(outcome.devices);
                backoff = Duration::from_secs(1);
                if let Some(why) = publisher.take_fallback() {
                    metrics.set_sharing_mode(publisher.mode());
                    publisher.announce_fallback(&why).await;
                    // Rewrite the pool for the controller mode now.
                    continue;
                }
                resync
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "publishing ResourceSlices failed");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                wait
            }
        };
        tokio::select! {
            _ = stop.changed() => break,
            r = changes.changed() => if r.is_err() { break },
            _ = notify.notified() => {},
            _ = tokio::time::sleep(wait) => {},
        }
        if *stop.borrow() {
            break;
        }
    }
    watch.abort();
}
