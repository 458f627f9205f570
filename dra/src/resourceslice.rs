//! Publishing a node's pool of ResourceSlices, the way Kubernetes' slice controller
//! (`k8s.io/dynamic-resource-allocation/resourceslice`) does: one pool named after the node,
//! `spec.nodeName`, an owner reference to the Node (so slices go with it), the same generation
//! and `resourceSliceCount` on every slice, stale slices deleted.
//!
//! Generation rule: the pool generation is bumped whenever the published content changes (the
//! Go controller skips the bump for a single in-place update; bumping always is also correct,
//! since the scheduler only ever looks at the newest complete generation). Writes go
//! delete → update → create, as in the Go controller.
//!
//! What a pool holds is the driver's business: it renders the slices for a generation
//! ([`PoolWriter::sync`] asks for them), this module makes the API server show exactly those.

use crate::client::{ClientError, DraApi};
use crate::version::ApiVersion;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::ResourceSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::watcher;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use vgpu_driver::{NodeRef, SliceView};

/// Why the pool could not be published (callers retry with backoff).
#[derive(Debug, thiserror::Error)]
pub enum PublishError<E: std::error::Error + 'static> {
    #[error("Kubernetes API: {op}: {source}")]
    Api {
        op: String,
        #[source]
        source: ClientError,
    },
    #[error("Node {0} has no UID")]
    NodeWithoutUid(String),
    #[error("cannot render the pool: {0}")]
    Render(#[source] E),
}

fn api_err<E: std::error::Error + 'static>(
    op: impl Into<String>,
) -> impl FnOnce(ClientError) -> PublishError<E> {
    let op = op.into();
    move |source| PublishError::Api { op, source }
}

/// What a sync did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Synced {
    pub generation: i64,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    /// Each slice written, as sent and as the API server stored it: fields behind a feature
    /// gate that is off are dropped silently, and only this comparison tells.
    pub written: Vec<(ResourceSlice, ResourceSlice)>,
}

/// Keeps one node's pool of one driver as the driver renders it.
pub struct PoolWriter {
    api: DraApi<ResourceSlice>,
    driver: String,
    node: NodeRef,
    last_generation: Option<i64>,
}

/// Whether two slices publish the same content (names aside): compared as the allocator
/// reads them, so fields the API server defaults do not count as a change.
pub fn same_content(a: &ResourceSlice, b: &ResourceSlice) -> bool {
    let view = |s: &ResourceSlice| SliceView {
        name: String::new(),
        ..SliceView::of(s)
    };
    view(a) == view(b)
}

fn owned_by(slice: &ResourceSlice, node: &NodeRef) -> bool {
    slice
        .metadata
        .owner_references
        .as_deref()
        .is_some_and(|refs| {
            refs.iter().any(|r| {
                r.kind == "Node"
                    && r.api_version == "v1"
                    && r.name == node.name
                    && r.uid == node.uid
            })
        })
}

impl PoolWriter {
    /// GETs the Node for its UID (the owner reference needs it).
    pub async fn new<E: std::error::Error + 'static>(
        client: kube::Client,
        version: ApiVersion,
        driver: &str,
        node_name: &str,
    ) -> Result<Self, PublishError<E>> {
        let node = Api::<Node>::all(client.clone())
            .get(node_name)
            .await
            .map_err(|e| api_err(format!("get Node {node_name}"))(e.into()))?;
        let uid = node
            .metadata
            .uid
            .ok_or_else(|| PublishError::NodeWithoutUid(node_name.into()))?;
        Ok(PoolWriter {
            api: DraApi::all(client, version),
            driver: driver.into(),
            node: NodeRef {
                name: node_name.into(),
                uid,
            },
            last_generation: None,
        })
    }

    pub fn node(&self) -> &NodeRef {
        &self.node
    }

    pub fn version(&self) -> ApiVersion {
        self.api.version()
    }

    fn field_selector(&self) -> String {
        format!(
            "spec.nodeName={},spec.driver={}",
            self.node.name, self.driver
        )
    }

    /// Make the published pool match what `render` gives for a generation.
    pub async fn sync<E: std::error::Error + 'static>(
        &mut self,
        render: impl Fn(&NodeRef, i64) -> Result<Vec<ResourceSlice>, E>,
    ) -> Result<Synced, PublishError<E>> {
        let existing = self
            .api
            .list(&ListParams::default().fields(&self.field_selector()))
            .await
            .map_err(api_err("list ResourceSlices"))?;
        let pool_slices: Vec<&ResourceSlice> = existing
            .iter()
            .filter(|s| s.spec.pool.name == self.node.name)
            .collect();
        let max_generation = pool_slices.iter().map(|s| s.spec.pool.generation).max();
        let mut current: Vec<&ResourceSlice> = pool_slices
            .iter()
            .copied()
            .filter(|s| Some(s.spec.pool.generation) == max_generation)
            .collect();
        current.sort_by_key(|s| {
            s.spec
                .devices
                .as_ref()
                .and_then(|d| d.first())
                .map(|d| d.name.clone())
        });
        let render = |generation| render(&self.node, generation).map_err(PublishError::Render);

        // Unchanged: the newest generation is exactly what we would publish, nothing else.
        if let Some(generation) = max_generation {
            let desired = render(generation)?;
            if existing.len() == current.len()
                && desired.len() == current.len()
                && desired
                    .iter()
                    .zip(&current)
                    .all(|(d, c)| same_content(c, d) && owned_by(c, &self.node))
            {
                self.last_generation = Some(generation);
                return Ok(Synced {
                    generation,
                    ..Default::default()
                });
            }
        }

        let generation = max_generation
            .map_or(0, |g| g + 1)
            .max(self.last_generation.map_or(0, |g| g + 1));
        let desired = render(generation)?;
        let mut outcome = Synced {
            generation,
            ..Default::default()
        };
        // Reuse the newest slices in place; everything else of ours goes.
        let reuse = current.len().min(desired.len());
        let keep: Vec<String> = current[..reuse]
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        for obsolete in existing
            .iter()
            .filter(|s| !s.metadata.name.as_ref().is_some_and(|n| keep.contains(n)))
        {
            let name = obsolete.metadata.name.clone().unwrap_or_default();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: obsolete.metadata.uid.clone(),
                    resource_version: obsolete.metadata.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            match self.api.delete(&name, &params).await {
                Ok(()) => outcome.deleted += 1,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(api_err(format!("delete ResourceSlice {name}"))(e)),
            }
        }
        for (old, new) in current[..reuse].iter().zip(&desired) {
            let mut new = new.clone();
            new.metadata.name = old.metadata.name.clone();
            new.metadata.generate_name = None;
            new.metadata.resource_version = old.metadata.resource_version.clone();
            let name = new.metadata.name.clone().unwrap_or_default();
            let stored = self
                .api
                .replace(&name, &PostParams::default(), &new)
                .await
                .map_err(api_err(format!("update ResourceSlice {name}")))?;
            outcome.updated += 1;
            outcome.written.push((new, stored));
        }
        for new in &desired[reuse..] {
            let stored = self
                .api
                .create(&PostParams::default(), new)
                .await
                .map_err(api_err("create ResourceSlice"))?;
            outcome.created += 1;
            outcome.written.push((new.clone(), stored));
        }
        self.last_generation = Some(generation);
        tracing::info!(
            generation,
            created = outcome.created,
            updated = outcome.updated,
            deleted = outcome.deleted,
            api = self.api.version().as_str(),
            "published ResourceSlices"
        );
        Ok(outcome)
    }

    /// Wake `notify` whenever one of the pool's slices changes (our own writes included; the
    /// sync that follows finds nothing to do), so that what someone deleted or edited is put
    /// back.
    pub fn watch_drift(&self, notify: Arc<Notify>) -> tokio::task::JoinHandle<()> {
        let stream = self
            .api
            .watch(watcher::Config::default().fields(&self.field_selector()));
        tokio::spawn(async move {
            let mut stream = stream.boxed();
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
                        // The watcher re-lists by itself; back off so a broken API server is
                        // not hammered.
                        tracing::warn!(error = %e, "ResourceSlice watch failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    }
}
