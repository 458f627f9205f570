//! Publishing the node's GPUs as ResourceSlices, the way the Kubernetes slice controller
//! (`k8s.io/dynamic-resource-allocation/resourceslice`) does: one pool named after the node,
//! `spec.nodeName`, an owner reference to the Node (so slices go with it), the same
//! generation and `resourceSliceCount` on every slice, stale slices deleted.
//!
//! Generation rule: the pool generation is bumped whenever the published content changes
//! (the Go controller skips the bump for a single in-place update; bumping always is also
//! correct, since the scheduler only ever looks at the newest complete generation).
//! Writes go delete → update → create, as in the Go controller.
//!
//! Republished at start (the kubelet wipes a node's slices when it restarts and 30 s after a
//! plugin disconnects), on health changes, and on drift: a watch on our slices puts back what
//! someone deleted or edited.

use crate::discovery::{GpuState, Snapshot};
use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::resource::{v1, v1beta1};
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use vgpu_driver::slice::{ApiVersion, NodeRef, PoolOptions, RenderedSlice, SliceView, render_pool};

/// Why publishing failed (retried with backoff by [`run`]).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kubernetes API: {op}: {source}")]
    Kube {
        op: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the API server serves neither resource.k8s.io/v1 nor resource.k8s.io/v1beta1; enable \
         DRA (Kubernetes 1.32/1.33: feature gate DynamicResourceAllocation and \
         --runtime-config=resource.k8s.io/v1beta1=true)"
    )]
    NotServed,
    #[error("Node {0} has no UID")]
    NodeWithoutUid(String),
    #[error("cannot render the pool: {0}")]
    Render(#[from] vgpu_driver::slice::SliceError),
}

fn kube_err(op: impl Into<String>) -> impl FnOnce(kube::Error) -> PublishError {
    let op = op.into();
    move |source| PublishError::Kube { op, source }
}

/// resource.k8s.io/v1 where served, else v1beta1.
pub async fn discover_api_version(client: &kube::Client) -> Result<ApiVersion, PublishError> {
    let groups = client
        .list_api_groups()
        .await
        .map_err(kube_err("discover API groups"))?;
    let Some(group) = groups.groups.iter().find(|g| g.name == "resource.k8s.io") else {
        return Err(PublishError::NotServed);
    };
    let served = |v: &str| group.versions.iter().any(|gv| gv.version == v);
    if served("v1") {
        Ok(ApiVersion::V1)
    } else if served("v1beta1") {
        Ok(ApiVersion::V1beta1)
    } else {
        Err(PublishError::NotServed)
    }
}

/// A ResourceSlice type of one API version.
pub trait SliceObject:
    kube::Resource<DynamicType = ()>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    fn view(&self) -> SliceView;
    fn from_rendered(rendered: RenderedSlice) -> Option<Self>;
}

impl SliceObject for v1::ResourceSlice {
    fn view(&self) -> SliceView {
        SliceView::from_v1(self)
    }
    fn from_rendered(rendered: RenderedSlice) -> Option<Self> {
        match rendered {
            RenderedSlice::V1(s) => Some(s),
            RenderedSlice::V1beta1(_) => None,
        }
    }
}

impl SliceObject for v1beta1::ResourceSlice {
    fn view(&self) -> SliceView {
        SliceView::from_v1beta1(self)
    }
    fn from_rendered(rendered: RenderedSlice) -> Option<Self> {
        match rendered {
            RenderedSlice::V1beta1(s) => Some(s),
            RenderedSlice::V1(_) => None,
        }
    }
}

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
    client: kube::Client,
    driver: String,
    node: NodeRef,
    api_version: ApiVersion,
    /// Taint unhealthy GPUs instead of leaving them out (needs DRADeviceTaints on the cluster).
    taint_unhealthy: bool,
    mode: SharingMode,
    /// Why native mode was given up, until [`Publisher::take_fallback`] reports it.
    fallback: Option<String>,
    last_generation: Option<i64>,
}

fn same_content(existing: &SliceView, desired: &SliceView) -> bool {
    let strip = |v: &SliceView| SliceView {
        name: String::new(),
        ..v.clone()
    };
    strip(existing) == strip(desired)
}

fn owner_ok<K: kube::Resource>(obj: &K, node: &NodeRef) -> bool {
    obj.meta().owner_references.as_deref().is_some_and(|refs| {
        refs.iter().any(|r| {
            r.kind == "Node" && r.api_version == "v1" && r.name == node.name && r.uid == node.uid
        })
    })
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
        let node = Api::<Node>::all(client.clone())
            .get(node_name)
            .await
            .map_err(kube_err(format!("get Node {node_name}")))?;
        let uid = node
            .metadata
            .uid
            .ok_or_else(|| PublishError::NodeWithoutUid(node_name.into()))?;
        Ok(Publisher {
            client,
            driver: driver.into(),
            node: NodeRef {
                name: node_name.into(),
                uid,
            },
            api_version,
            taint_unhealthy,
            mode,
            fallback: None,
            last_generation: None,
        }
        .check_native_served())
    }

    /// Native sharing needs the v1 API (1.34+); v1beta1 of 1.32/1.33 has no such fields.
    fn check_native_served(mut self) -> Self {
        if self.mode == SharingMode::Native && self.api_version != ApiVersion::V1 {
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
        self.api_version
    }

    fn field_selector(&self) -> String {
        format!(
            "spec.nodeName={},spec.driver={}",
            self.node.name, self.driver
        )
    }

    /// Make the published pool match `snapshot`.
    pub async fn sync(&mut self, snapshot: &Snapshot) -> Result<SyncOutcome, PublishError> {
        match self.api_version {
            ApiVersion::V1 => self.sync_typed::<v1::ResourceSlice>(snapshot).await,
            ApiVersion::V1beta1 => self.sync_typed::<v1beta1::ResourceSlice>(snapshot).await,
        }
    }

    async fn sync_typed<K: SliceObject>(
        &mut self,
        snapshot: &Snapshot,
    ) -> Result<SyncOutcome, PublishError> {
        let api: Api<K> = Api::all(self.client.clone());
        let mut devices = snapshot.published_devices()?;
        for device in &mut devices {
            device.allow_multiple_allocations = self.mode == SharingMode::Native;
        }
        let existing = api
            .list(&ListParams::default().fields(&self.field_selector()))
            .await
            .map_err(kube_err("list ResourceSlices"))?
            .items;
        let pool_slices: Vec<&K> = existing
            .iter()
            .filter(|s| s.view().pool == self.node.name)
            .collect();
        let max_generation = pool_slices.iter().map(|s| s.view().generation).max();
        let mut current: Vec<&K> = pool_slices
            .iter()
            .copied()
            .filter(|s| Some(s.view().generation) == max_generation)
            .collect();
        current.sort_by_key(|s| s.view().devices.first().map(|d| d.name.clone()));

        let render = |generation: i64| -> Result<Vec<K>, PublishError> {
            let mut opts = PoolOptions::new(&self.driver, self.api_version);
            opts.generation = generation;
            opts.taint_unhealthy = self.taint_unhealthy;
            Ok(render_pool(&self.node, &devices, &opts)?
                .into_iter()
                .filter_map(K::from_rendered)
                .collect())
        };
        let published = devices
            .iter()
            .filter(|d| d.unhealthy.is_none() || self.taint_unhealthy)
            .count();

        // Unchanged: the newest generation is exactly what we would publish, nothing else.
        if let Some(generation) = max_generation {
            let desired = render(generation)?;
            let stale = existing.len() - current.len();
            if stale == 0
                && desired.len() == current.len()
                && desired
                    .iter()
                    .zip(&current)
                    .all(|(d, c)| same_content(&c.view(), &d.view()) && owner_ok(*c, &self.node))
            {
                self.last_generation = Some(generation);
                return Ok(SyncOutcome {
                    generation,
                    devices: published,
                    ..Default::default()
                });
            }
        }

        let generation = max_generation
            .map_or(0, |g| g + 1)
            .max(self.last_generation.map_or(0, |g| g + 1));
        let desired = render(generation)?;
        let mut outcome = SyncOutcome {
            generation,
            devices: published,
            ..Default::default()
        };
        // Reuse the newest slices in place; everything else of ours goes.
        let reuse = current.len().min(desired.len());
        let keep: Vec<String> = current[..reuse]
            .iter()
            .filter_map(|s| s.meta().name.clone())
            .collect();
        for obsolete in existing
            .iter()
            .filter(|s| !s.meta().name.as_ref().is_some_and(|n| keep.contains(n)))
        {
            let name = obsolete.meta().name.clone().unwrap_or_default();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: obsolete.meta().uid.clone(),
                    resource_version: obsolete.meta().resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => outcome.deleted += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(kube_err(format!("delete ResourceSlice {name}"))(e)),
            }
        }
        let mut written = Vec::new();
        for (old, new) in current[..reuse].iter().zip(&desired) {
            let mut new = new.clone();
            let meta = kube::Resource::meta_mut(&mut new);
            meta.name = old.meta().name.clone();
            meta.generate_name = None;
            meta.resource_version = old.meta().resource_version.clone();
            let name = meta.name.clone().unwrap_or_default();
            let stored = api
                .replace(&name, &PostParams::default(), &new)
                .await
                .map_err(kube_err(format!("update ResourceSlice {name}")))?;
            outcome.updated += 1;
            written.push((stored, new));
        }
        for new in &desired[reuse..] {
            let stored = api
                .create(&PostParams::default(), new)
                .await
                .map_err(kube_err("create ResourceSlice"))?;
            outcome.created += 1;
            written.push((stored, new.clone()));
        }
        self.last_generation = Some(generation);
        // Alpha fields are dropped silently when their feature gate is off: read back what
        // was stored. Dropped taints would offer unhealthy GPUs, so fall back to removal.
        for (stored, sent) in &written {
            let (stored, sent) = (stored.view(), sent.view());
            let multiple = |v: &SliceView| v.devices.iter().any(|d| d.allow_multiple_allocations);
            if self.mode == SharingMode::Native && multiple(&sent) && !multiple(&stored) {
                self.fall_back(
                    "the API server dropped allowMultipleAllocations from the ResourceSlice: \
                     the DRAConsumableCapacity feature gate is off",
                );
                // The stored slices lack the flag already; the next sync rewrites them
                // whole for the controller mode.
                break;
            }
            if !same_content(&stored, &sent) {
                if self.taint_unhealthy {
                    tracing::error!(
                        "the API server dropped device taints (DRADeviceTaints is off): unhealthy GPUs are now left out of the slice instead"
                    );
                    self.taint_unhealthy = false;
                } else {
                    tracing::warn!(slice = %stored.name, "the API server stored a slice different from the one sent");
                }
            }
        }
        tracing::info!(
            generation,
            created = outcome.created,
            updated = outcome.updated,
            deleted = outcome.deleted,
            devices = outcome.devices,
            api = self.api_version.as_str(),
            "published ResourceSlices"
        );
        Ok(outcome)
    }

    /// Tells the admin where `kubectl describe node` shows it: a Warning Event on the Node.
    async fn announce_fallback(&self, why: &str) {
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: format!("{}/kubelet-plugin", self.driver),
                instance: Some(self.node.name.clone()),
            },
        );
        let mut note = why.to_string();
        if note.len() > 1000 {
            let mut end = 997;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let event = Event {
            type_: EventType::Warning,
            reason: "NativeSharingUnavailable".into(),
            note: Some(note),
            action: "PublishResourceSlices".into(),
            secondary: None,
        };
        let node = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.name.clone()),
            uid: Some(self.node.uid.clone()),
            ..Default::default()
        };
        if let Err(e) = recorder.publish(&event, &node).await {
            tracing::warn!(error = %e, "publishing the fallback Event failed");
        }
    }

    /// Wake `notify` whenever one of our slices changes (our own writes included; the sync
    /// that follows finds nothing to do).
    fn spawn_drift_watch(&self, notify: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let config = watcher::Config::default().fields(&self.field_selector());
        let client = self.client.clone();
        match self.api_version {
            ApiVersion::V1 => {
                tokio::spawn(watch_slices::<v1::ResourceSlice>(client, config, notify))
            }
            ApiVersion::V1beta1 => tokio::spawn(watch_slices::<v1beta1::ResourceSlice>(
                client, config, notify,
            )),
        }
    }
}

async fn watch_slices<K: SliceObject>(
    client: kube::Client,
    config: watcher::Config,
    notify: Arc<Notify>,
) {
    let api: Api<K> = Api::all(client);
    let mut stream = watcher(api, config).boxed();
    let mut initialized = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                initialized = true;
                notify.notify_one();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) if initialized => {
                notify.notify_one();
            }
            Ok(_) => {}
            Err(e) => {
                // The watcher re-lists by itself; back off so a broken API server is not hammered.
                tracing::warn!(error = %e, "ResourceSlice watch failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
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
