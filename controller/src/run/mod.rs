//! `controller run`: the allocator against a live API server. Watches ResourceClaims,
//! DeviceClasses, ResourceSlices (as v1, whichever version the API server serves: the `dra`
//! crate converts at the wire), Nodes and Pods; while this replica holds the leader Lease,
//! allocates pending claims of our classes in passes triggered by changes and by retry
//! back-off.

pub mod cache;
pub mod leader;
pub mod metrics;
pub mod reconcile;

use crate::engine::Policies;
use crate::model::{ClaimView, ClassView, NodeView, PodView};
use crate::slim::SlimPod;
use cache::Cached;
use dra::events::EventSink;
use dra::{ApiVersion, DiscoveryError, DraApi, DraObject};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1;
use kube::runtime::reflector::{self, Lookup, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use leader::{Elector, Leadership, LeaseTiming};
use metrics::Metrics;
use reconcile::{Allocator, Backoff, PassReport, Snapshot};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use vgpu_driver::SliceView;

/// Leader election settings; `None` in [`Options`] runs without (a single replica).
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    pub timing: LeaseTiming,
}

/// How the loop runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub driver: String,
    pub policies: Policies,
    /// This replica's name in the Lease and in Events (the pod name in a cluster).
    pub identity: String,
    pub leader_election: Option<LeaderElection>,
    pub backoff: Backoff,
    /// Changes arriving within this window are handled in one pass.
    pub debounce: Duration,
    /// A pass runs at least this often even without changes.
    pub resync: Duration,
    /// Publish Kubernetes Events about claims.
    pub events: bool,
    /// How often the Warning Events of a claim that keeps waiting are published again
    /// (at most as often as the claim is retried).
    pub event_refresh: Duration,
}

impl Options {
    pub fn new(driver: &str, identity: &str) -> Options {
        Options {
            driver: driver.to_string(),
            policies: Policies::default(),
            identity: identity.to_string(),
            leader_election: None,
            backoff: Backoff::default(),
            debounce: Duration::from_millis(100),
            resync: Duration::from_secs(30),
            events: true,
            event_refresh: reconcile::EVENT_REFRESH,
        }
    }
}

/// What the loop has done so far, for tests and diagnostics.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub version: Option<ApiVersion>,
    pub passes: u64,
    /// Dry passes made as a standby, for its metrics.
    pub observed: u64,
    pub leading: bool,
    /// How many claims this replica allocated (the last pass's are in `last`): a count, so
    /// that a controller running for months does not keep every claim it ever placed.
    pub allocated: u64,
    pub last: PassReport,
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("a watch cache stopped before its first list completed")]
    CacheNotReady,
}

/// A controller bound to an API server.
pub struct Controller {
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<Status>>,
    synced: Arc<AtomicBool>,
}

impl Controller {
    pub fn new(client: Client, options: Options, metrics: Arc<Metrics>) -> Controller {
        Controller {
            client,
            options,
            metrics,
            status: Arc::default(),
            synced: Arc::default(),
        }
    }

    /// A handle on the loop's progress.
    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// True once every watch cache has listed: from then on this replica can allocate, or
    /// take over at once if it is the standby, so both are ready.
    pub fn synced(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    /// Run until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let version = dra::version::discover(&self.client).await?;
        tracing::info!(version = version.as_str(), "resource.k8s.io version chosen");
        if let Ok(mut s) = self.status.lock() {
            s.version = Some(version);
        }
        let notify = Arc::new(Notify::new());
        // Aborted when this future ends or is dropped: a stopped replica must not keep
        // renewing its Lease or watching.
        let mut tasks = AbortOnDrop(Vec::new());
        // The caches keep each object as the view a pass reads, made once when it arrives
        // (`cache`); pods are decoded straight into the fields placement reads (`SlimPod`).
        let claims = watch_dra(&self.client, version, &notify, &mut tasks, ClaimView::of);
        let classes = watch_dra(&self.client, version, &notify, &mut tasks, |c| {
            Ok::<_, Infallible>(ClassView::of(c))
        });
        let slices = watch_dra(&self.client, version, &notify, &mut tasks, |s| {
            Ok::<_, Infallible>(SliceView::of(s))
        });
        let nodes = watch_core(&self.client, &notify, &mut tasks, |n: &Node| {
            Ok::<_, Infallible>(NodeView::from_node(n))
        });
        let pods = watch_core(&self.client, &notify, &mut tasks, |p: &SlimPod| {
            Ok::<_, Infallible>(PodView::of(p))
        });

        let leadership = match &self.options.leader_election {
            Some(le) => {
                let elector = Elector::new(
                    Api::<Lease>::namespaced(self.client.clone(), &le.namespace),
                    &le.lease_name,
                    &lease_identity(&self.options.identity),
                    le.timing,
                );
                let leadership = elector.leadership();
                let gauge = self.metrics.leader.clone();
                let notify = notify.clone();
                tasks.push(tokio::spawn(elector.run(move |leading| {
                    gauge.set(i64::from(leading));
                    notify.notify_one();
                })));
                leadership
            }
            None => {
                self.metrics.leader.set(1);
                Leadership::always()
            }
        };

        let work = async {
            // A pass on partial caches could hand out capacity that is already taken.
            for ready in [
                claims.wait_until_ready().await,
                classes.wait_until_ready().await,
                slices.wait_until_ready().await,
                nodes.wait_until_ready().await,
                pods.wait_until_ready().await,
            ] {
                ready.map_err(|_| RunError::CacheNotReady)?;
            }
            tracing::info!("watch caches synced");
            self.synced.store(true, Ordering::SeqCst);
            let events = self.options.events.then(|| {
                EventSink::new(
                    self.client.clone(),
                    "vgpu-controller",
                    &self.options.identity,
                )
            });
            let mut allocator = Allocator::new(
                self.client.clone(),
                version,
                &self.options.driver,
                self.options.policies,
                self.options.backoff,
                events,
                self.metrics.clone(),
                leadership.clone(),
            );
            allocator.event_refresh = self.options.event_refresh;
            loop {
                let leading = leadership.is_leading();
                let mut next_retry = None;
                let started = std::time::Instant::now();
                let snapshot = snapshot(&claims, &classes, &slices, &nodes, &pods);
                if leading {
                    let report = allocator.pass(snapshot).await;
                    next_retry = report.next_retry;
                    if let Ok(mut s) = self.status.lock() {
                        s.passes += 1;
                        s.allocated += report.allocated.len() as u64;
                        s.last = report;
                    }
                } else {
                    // A standby's metrics come from its own caches: capacity and pending
                    // claims stay visible whichever replica a scrape reaches.
                    allocator.observe(snapshot);
                    if let Ok(mut s) = self.status.lock() {
                        s.observed += 1;
                    }
                }
                self.metrics
                    .pass_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Ok(mut s) = self.status.lock() {
                    s.leading = leading;
                }
                let resync = tokio::time::Instant::now() + self.options.resync;
                let wake = next_retry.map_or(resync, |r| r.min(resync));
                tokio::select! {
                    _ = notify.notified() => {
                        // Let a burst of changes (our own writes echoing back included) settle.
                        tokio::time::sleep(self.options.debounce).await;
                    }
                    _ = tokio::time::sleep_until(wake) => {}
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), RunError>(())
        };
        let result = tokio::select! {
            r = work => r,
            _ = shutdown => Ok(()),
        };
        drop(tasks);
        result
    }
}

/// The identity written into the Lease: the replica's name and a suffix unique to this
/// process, as client-go does. A container restarted in the same pod keeps its name, and
/// with the name alone it would take the Lease back at once as if it had never stopped,
/// skipping the wait that lets a stalled predecessor notice it lost the Lease.
fn lease_identity(name: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!("{name}_{:016x}", h.finish())
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    fn push(&mut self, task: tokio::task::JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Start a reflector for a resource.k8s.io resource, in v1 whatever the wire speaks, keeping
/// what `to_view` makes of each object.
fn watch_dra<K, V, E>(
    client: &Client,
    version: ApiVersion,
    notify: &Arc<Notify>,
    tasks: &mut AbortOnDrop,
    to_view: fn(&K) -> Result<V, E>,
) -> Store<Cached<K, V>>
where
    K: DraObject,
    V: Send + Sync + 'static,
    E: std::fmt::Display + 'static,
{
    let stream = DraApi::<K>::all(client.clone(), version)
        .watch(watcher::Config::default())
        .map_ok(move |e| cache::to_views(e, to_view));
    reflect(stream, notify, tasks)
}

/// Start a reflector for a core resource, keeping what `to_view` makes of each object.
fn watch_core<K, V, E>(
    client: &Client,
    notify: &Arc<Notify>,
    tasks: &mut AbortOnDrop,
    to_view: fn(&K) -> Result<V, E>,
) -> Store<Cached<K, V>>
where
    K: kube::Resource<DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    V: Send + Sync + 'static,
    E: std::fmt::Display + 'static,
{
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .map_ok(move |e| cache::to_views(e, to_view));
    reflect(stream, notify, tasks)
}

/// Feed `stream` into a new store, waking the loop on every change.
fn reflect<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    notify: &Arc<Notify>,
    tasks: &mut AbortOnDrop,
) -> Store<K>
where
    K: Lookup<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let notify = notify.clone();
    tasks.push(tokio::spawn(async move {
        let stream = reflector::reflector(writer, stream.default_backoff());
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying")
                }
            }
        }
    }));
    store
}

type Views<K, V> = Store<Cached<K, V>>;

fn snapshot(
    claims: &Views<v1::ResourceClaim, ClaimView>,
    classes: &Views<v1::DeviceClass, ClassView>,
    slices: &Views<v1::ResourceSlice, SliceView>,
    nodes: &Views<Node, NodeView>,
    pods: &Views<SlimPod, PodView>,
) -> Snapshot {
    // The versions that key a kept engine are read from the very entries the engine would be
    // built from, so a change landing between two reads of a store cannot be missed.
    let (classes, slices, nodes) = (classes.state(), slices.state(), nodes.state());
    Snapshot {
        claims: cache::views(&claims.state()),
        classes: classes
            .iter()
            .filter_map(|c| c.view.as_deref().cloned())
            .collect(),
        slice_versions: cache::versions(&slices),
        node_versions: cache::versions(&nodes),
        class_versions: cache::versions(&classes),
        slices: cache::views(&slices),
        nodes: cache::views(&nodes),
        pods: cache::views(&pods.state()),
    }
}
