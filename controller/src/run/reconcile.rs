//! One allocation pass over the cluster as the watch caches show it, and the bookkeeping that
//! survives between passes: retry back-off, nodes the scheduler rejected, and allocations we
//! wrote that the caches have not shown yet.
//!
//! Every pass brings the engine up to the objects (the API server is the source of truth, so
//! a restarted or newly elected replica decides exactly as the previous one would have), then
//! allocates the pending claims of our classes oldest first, charging each allocation before
//! deciding the next. The engine of the previous pass is kept while the nodes, slices and
//! classes are unchanged (same names and resourceVersions): only the claims whose allocation
//! changed are charged or released, and compiled selectors with their per-GPU results
//! survive. Any change to those objects rebuilds it, as does an engine that has compiled
//! [`MAX_KEPT_SELECTORS`] expressions.
//!
//! A pass has two halves: [`Selection`] decides (which claims are ours, pending and waiting,
//! in which order, and where each goes) from the snapshot and the [`Book`] alone, and
//! [`Allocator`] writes those decisions and publishes Events about them.

use super::leader::Leadership;
use super::metrics::{Metrics, PendingLabels, RefusalLabels};
use crate::engine::{Engine, Parts, Policies, Refusal};
use crate::model::{ClaimView, ClassView, NodeView, PodView};
use dra::events::EventSink;
use dra::{ApiVersion, ClientError, DraApi};
use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::resource::v1;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use vgpu_driver::class::scheduling_gate;
use vgpu_driver::{ClaimAllocation, SliceView};

/// The finalizer that makes kube-controller-manager deallocate a claim once no pod uses it.
pub const DELETE_PROTECTION: &str = "resource.kubernetes.io/delete-protection";

/// How long an allocation we wrote overrides what the watch cache shows, at most.
const ASSUME_FOR: Duration = Duration::from_secs(120);
/// Conflicts on one claim retried within a pass before giving up until the next.
const MAX_WRITE_ATTEMPTS: usize = 5;
/// Selector expressions a kept engine may hold before the next pass rebuilds it: each keeps a
/// result per GPU (a byte each), and claims come and go with expressions of their own, so a
/// kept engine would otherwise grow for as long as the controller runs.
pub const MAX_KEPT_SELECTORS: usize = 1024;

/// The engine of a pass, kept for the next one with the objects it was built from.
pub struct KeptEngine {
    key: u64,
    engine: Engine,
}

/// Digests of the (name, resourceVersion) of the slices, nodes and classes of a snapshot,
/// made once a pass for both the engine's key and the capacity fingerprint.
struct Versions {
    slices: u64,
    nodes: u64,
    classes: u64,
    /// Every object has a resourceVersion.
    complete: bool,
}

impl Versions {
    fn of(snapshot: &Snapshot) -> Versions {
        let all = [
            &snapshot.slice_versions,
            &snapshot.node_versions,
            &snapshot.class_versions,
        ];
        Versions {
            slices: hash_of(&snapshot.slice_versions),
            nodes: hash_of(&snapshot.node_versions),
            classes: hash_of(&snapshot.class_versions),
            complete: all.iter().all(|v| v.iter().all(|(_, rv)| !rv.is_empty())),
        }
    }

    /// What an engine's GPU table and classes are built from: `None` when an object has no
    /// resourceVersion, as then a change could not be seen.
    fn engine_key(&self) -> Option<u64> {
        if !self.complete {
            return None;
        }
        let mut h = DefaultHasher::new();
        (self.slices, self.nodes, self.classes).hash(&mut h);
        Some(h.finish())
    }
}

/// Retry back-off for claims that could not be allocated.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(120),
        }
    }
}

#[derive(Clone, Debug)]
struct Retry {
    attempts: u32,
    not_before: Instant,
    last_reason: String,
    /// The category of the last refusal (a [`Decision::Refuse`] label); `None` while the
    /// claim only failed to be written.
    refusal: Option<&'static str>,
    /// The category last counted in `claims_refused_total`: a claim counts once per
    /// episode of one category, not once per retry.
    counted: Option<&'static str>,
    /// The note last published about the claim, and when.
    evented: Option<(String, Instant)>,
}

#[derive(Clone, Debug)]
struct Assumed {
    resource_version: String,
    allocation: Arc<ClaimAllocation>,
    at: Instant,
}

/// What changes in the cluster can give a refused claim room.
#[derive(Clone, Debug, Default, PartialEq)]
struct Fingerprint {
    /// Digests of the UIDs of the allocated claims and of the pods bound to a node, kept per
    /// pass: a digest instead of a copy of every UID. Two UIDs with one digest (odds 2^-64)
    /// could only leave a refused claim to its back-off instead of retrying it at once.
    allocated: HashSet<u64>,
    bound_pods: HashSet<u64>,
    slices: u64,
    nodes: u64,
    classes: u64,
}

impl Fingerprint {
    /// Whether going from `self` to `now` may have freed capacity or changed what fits.
    fn may_have_grown(&self, now: &Fingerprint) -> bool {
        self.allocated.difference(&now.allocated).next().is_some()
            || self.bound_pods.difference(&now.bound_pods).next().is_some()
            || self.slices != now.slices
            || self.nodes != now.nodes
            || self.classes != now.classes
    }
}

fn digest(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn hash_of(items: &[(String, String)]) -> u64 {
    let mut items: Vec<&(String, String)> = items.iter().collect();
    items.sort();
    let mut h = DefaultHasher::new();
    items.hash(&mut h);
    h.finish()
}

/// The objects a pass works on, as the watch caches keep them (views, shared with the
/// caches: taking a snapshot copies pointers, not objects).
#[derive(Default)]
pub struct Snapshot {
    pub claims: Vec<Arc<ClaimView>>,
    pub classes: Vec<ClassView>,
    pub slices: Vec<Arc<SliceView>>,
    pub nodes: Vec<Arc<NodeView>>,
    pub pods: Vec<Arc<PodView>>,
    /// (name, resourceVersion) of the slices, nodes and classes: cheap change detection.
    pub slice_versions: Vec<(String, String)>,
    pub node_versions: Vec<(String, String)>,
    pub class_versions: Vec<(String, String)>,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PassReport {
    /// (claim, node) written this pass.
    pub allocated: Vec<(String, String)>,
    /// (claim, reason).
    pub refused: Vec<(String, String)>,
    /// Claims skipped because they are in back-off.
    pub deferred: usize,
    /// When the next claim in back-off (or gate lift to check) becomes due.
    pub next_retry: Option<Instant>,
    /// Pods (namespace/name) whose scheduling gate this pass lifted.
    pub ungated: Vec<String>,
}

/// Pure bookkeeping between passes.
#[derive(Debug, Default)]
pub struct Book {
    retries: HashMap<String, Retry>,
    /// Nodes to avoid per claim UID: the scheduler cleared our allocation there.
    avoid: HashMap<String, BTreeSet<String>>,
    /// Node of each of our claims seen allocated in the previous pass.
    last_node: HashMap<String, String>,
    assumed: HashMap<String, Assumed>,
    fingerprint: Option<Fingerprint>,
    /// Gated pods whose gate a pass tried to lift, by UID, and when: the cache shows the gate
    /// until the patch echoes back, and the passes in between must not send it again.
    lifted: HashMap<String, Instant>,
}

/// A gate lift is sent again after this long if the pod still shows it.
const LIFT_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// Resource versions are opaque, but etcd's are increasing integers; where both parse, the
/// cache has caught up with a write when it shows that version or a later one.
fn caught_up(cached: Option<&str>, written: &str) -> bool {
    match (
        cached.and_then(|c| c.parse::<u64>().ok()),
        written.parse::<u64>().ok(),
    ) {
        (Some(c), Some(w)) => c >= w,
        _ => cached == Some(written),
    }
}

impl Book {
    /// Replace cached claims by the allocations we wrote that the cache does not show yet, so
    /// that a lagging watch never makes us hand out the same capacity twice.
    pub fn overlay_assumed(&mut self, views: &mut [Arc<ClaimView>], now: Instant) {
        let present: HashSet<&str> = views.iter().map(|v| v.uid.as_str()).collect();
        self.assumed.retain(|uid, _| present.contains(uid.as_str()));
        for view in views.iter_mut() {
            let Some(assumed) = self.assumed.get(&view.uid) else {
                continue;
            };
            if view.allocation.is_some()
                || caught_up(view.resource_version.as_deref(), &assumed.resource_version)
                || now.duration_since(assumed.at) > ASSUME_FOR
            {
                self.assumed.remove(&view.uid);
            } else {
                // A copy of this claim's view only: the cache's stays as the API server has it.
                Arc::make_mut(view).allocation = Some(assumed.allocation.clone());
            }
        }
    }

    /// Remember a write until the cache shows it.
    pub fn assume(
        &mut self,
        uid: &str,
        resource_version: String,
        allocation: Arc<ClaimAllocation>,
    ) {
        self.assumed.insert(
            uid.to_string(),
            Assumed {
                resource_version,
                allocation,
                at: Instant::now(),
            },
        );
    }

    /// Notice claims of ours that were allocated and are no longer while a pod still waits
    /// for them: the kube-scheduler could not use the node and cleared the allocation, so the
    /// next attempt avoids that node. Returns (claim, node) for each such claim.
    pub fn observe_clears(
        &mut self,
        views: &[Arc<ClaimView>],
        ours: &[bool],
        waiting: &[bool],
    ) -> Vec<(String, String)> {
        let mut cleared = Vec::new();
        // Kept from pass to pass and changed only where a claim moved: most passes copy no name.
        let mut allocated: HashSet<&str> = HashSet::new();
        for (i, view) in views.iter().enumerate().filter(|&(i, _)| ours[i]) {
            match &view.allocation {
                Some(a) => {
                    if let Some(node) = &a.node_name {
                        if self.last_node.get(&view.uid) != Some(node) {
                            self.last_node.insert(view.uid.clone(), node.clone());
                        }
                        allocated.insert(view.uid.as_str());
                    }
                }
                None => {
                    if let Some(node) = self.last_node.get(&view.uid)
                        && !view.deleting
                        && waiting[i]
                    {
                        self.avoid
                            .entry(view.uid.clone())
                            .or_default()
                            .insert(node.clone());
                        cleared.push((view.key(), node.clone()));
                    }
                }
            }
        }
        self.last_node
            .retain(|uid, _| allocated.contains(uid.as_str()));
        let present: HashSet<&str> = views.iter().map(|v| v.uid.as_str()).collect();
        self.avoid.retain(|uid, _| present.contains(uid.as_str()));
        self.retries.retain(|uid, _| present.contains(uid.as_str()));
        cleared
    }

    fn observe_capacity(&mut self, fingerprint: Fingerprint, now: Instant) {
        if let Some(previous) = &self.fingerprint
            && previous.may_have_grown(&fingerprint)
        {
            // Retry everything now rather than when the back-off says.
            for retry in self.retries.values_mut() {
                retry.not_before = now;
            }
        }
        self.fingerprint = Some(fingerprint);
    }

    /// Whether to send the lift of pod `uid`'s gate now; if so, remembered as sent.
    pub fn lifting(&mut self, uid: &str, now: Instant) -> bool {
        if self
            .lifted
            .get(uid)
            .is_some_and(|at| now.duration_since(*at) < LIFT_AGAIN_AFTER)
        {
            return false;
        }
        self.lifted.insert(uid.to_string(), now);
        true
    }

    pub fn avoid(&self, uid: &str) -> BTreeSet<String> {
        self.avoid.get(uid).cloned().unwrap_or_default()
    }

    fn due(&self, uid: &str, now: Instant) -> bool {
        self.retries.get(uid).is_none_or(|r| now >= r.not_before)
    }

    /// Record a failed attempt; returns whether the reason changed (worth a new Event).
    fn failed(&mut self, uid: &str, reason: &str, backoff: Backoff, now: Instant) -> bool {
        let retry = self.retries.entry(uid.to_string()).or_insert(Retry {
            attempts: 0,
            not_before: now,
            last_reason: String::new(),
            refusal: None,
            counted: None,
            evented: None,
        });
        let changed = retry.last_reason != reason;
        let delay = backoff
            .initial
            .saturating_mul(1u32 << retry.attempts.min(16))
            .min(backoff.max);
        retry.attempts += 1;
        retry.not_before = now + delay;
        retry.last_reason = reason.to_string();
        changed || retry.attempts == 1
    }

    /// Record a refusal of category `label`; returns whether it starts a new episode (the
    /// claim's first refusal since it was last allocated or forgotten, or one of another
    /// category), which is what `claims_refused_total` counts.
    fn refused(
        &mut self,
        uid: &str,
        label: &'static str,
        reason: &str,
        backoff: Backoff,
        now: Instant,
    ) -> bool {
        // Nodes the scheduler rejected may be the only ones left: forget them so the next
        // attempt can try them again rather than waiting forever.
        self.avoid.remove(uid);
        self.failed(uid, reason, backoff, now);
        let Some(retry) = self.retries.get_mut(uid) else {
            return false;
        };
        retry.refusal = Some(label);
        let new_episode = retry.counted != Some(label);
        retry.counted = Some(label);
        new_episode
    }

    /// Whether to publish `note` about a refused claim now: when it differs from the last
    /// note published, or the last is `refresh` old. Events expire an hour after their last
    /// update (the API server's TTL), so a claim that waits longer would otherwise lose its
    /// explanation. Records the publication when it says yes.
    fn event_due(&mut self, uid: &str, note: &str, refresh: Duration, now: Instant) -> bool {
        let Some(retry) = self.retries.get_mut(uid) else {
            return false;
        };
        let due = match &retry.evented {
            Some((last, at)) => last != note || now.duration_since(*at) >= refresh,
            None => true,
        };
        if due {
            retry.evented = Some((note.to_string(), now));
        }
        due
    }

    /// The category of a pending claim's last refusal, if it was refused.
    pub fn refusal(&self, uid: &str) -> Option<&'static str> {
        self.retries.get(uid).and_then(|r| r.refusal)
    }

    /// Make every claim in back-off due now: a replica that just took over must not wait
    /// out the back-off its dry runs as a standby accumulated.
    fn retry_all_now(&mut self, now: Instant) {
        for retry in self.retries.values_mut() {
            retry.not_before = now;
        }
    }

    fn succeeded(&mut self, uid: &str) {
        self.retries.remove(uid);
        self.avoid.remove(uid);
    }

    /// When the next claim in back-off, or the next gate lift not yet seen to land, is due.
    fn next_retry(&self) -> Option<Instant> {
        let lifts = self.lifted.values().map(|at| *at + LIFT_AGAIN_AFTER);
        self.retries
            .values()
            .map(|r| r.not_before)
            .chain(lifts)
            .min()
    }
}

/// What the engine decided for one claim, before anything is written.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Write this allocation.
    Allocate(ClaimAllocation),
    /// No room now (a [`crate::engine::WaitReason`] label, retried) or never as written (`invalid`); the
    /// reason.
    Refuse { label: &'static str, reason: String },
    /// Not a claim this controller allocates after all.
    NotOurs,
}

impl Decision {
    fn of(result: Result<ClaimAllocation, Refusal>) -> Decision {
        match result {
            Ok(allocation) => Decision::Allocate(allocation),
            Err(Refusal::NotOurs(_)) => Decision::NotOurs,
            Err(Refusal::Invalid(reason)) => Decision::Refuse {
                label: "invalid",
                reason,
            },
            Err(Refusal::Unschedulable(no_room)) => Decision::Refuse {
                label: no_room.reason.label(),
                reason: no_room.message,
            },
        }
    }
}

/// The pure half of a pass: the claims as the pass sees them (our unconfirmed writes laid
/// over the cache), which of them are ours, pending and waiting for a pod, in the order they
/// are tried, and the engine that decides each. Touches only the [`Book`]; writes nothing.
pub struct Selection {
    views: Vec<Arc<ClaimView>>,
    /// The pod waiting to be scheduled for each claim, by index into `views`.
    waiting: Vec<Option<Arc<PodView>>>,
    /// Indices into `views` of the claims to try: oldest first, then by name.
    pending: Vec<usize>,
    /// (claim, node) for each allocation the scheduler cleared since the last pass.
    pub cleared: Vec<(String, String)>,
    /// Whether this controller allocates each claim, by index into `views`.
    ours: Vec<bool>,
    /// Unscheduled pods carrying our scheduling gate, with the gate's index in their list.
    gated: Vec<(Arc<PodView>, usize)>,
    /// Our scheduling gate's name.
    gate: String,
    engine: Engine,
    /// What the engine was built from, when it may be kept.
    key: Option<u64>,
}

impl Selection {
    pub fn new(
        snapshot: Snapshot,
        book: &mut Book,
        driver: &str,
        policies: Policies,
        now: Instant,
    ) -> Selection {
        Selection::with_engine(snapshot, book, driver, policies, now, None)
    }

    /// As [`Selection::new`], reusing `kept` when it was built from the same nodes, slices
    /// and classes.
    pub fn with_engine(
        mut snapshot: Snapshot,
        book: &mut Book,
        driver: &str,
        policies: Policies,
        now: Instant,
        kept: Option<KeptEngine>,
    ) -> Selection {
        // A claim whose allocation cannot be read is not in the snapshot (the cache said so
        // when it arrived): not ours to fix; its devices are unknown, which the kubelet
        // plugin's prepare-time check covers.
        let mut views = std::mem::take(&mut snapshot.claims);
        book.overlay_assumed(&mut views, now);

        let ours_classes: HashSet<&str> = snapshot
            .classes
            .iter()
            .filter(|c| c.ours)
            .map(|c| c.name.as_str())
            .collect();
        let ours: Vec<bool> = views
            .iter()
            .map(|v| {
                v.requests
                    .iter()
                    .flat_map(|r| &r.alternatives)
                    .any(|a| ours_classes.contains(a.class.as_str()))
            })
            .collect();
        // Claims (namespace, name) with a pod waiting to be scheduled, and with a bound pod,
        // keyed by names borrowed from the snapshot: a pass copies no name.
        let mut waiting_pods: HashMap<(&str, &str), &Arc<PodView>> = HashMap::new();
        let mut bound: HashSet<(&str, &str)> = HashSet::new();
        for pod in snapshot.pods.iter().filter(|p| !p.finished) {
            for claim in &pod.claims {
                let key = (pod.namespace.as_str(), claim.as_str());
                if pod.node_name.is_some() {
                    bound.insert(key);
                } else {
                    waiting_pods.entry(key).or_insert(pod);
                }
            }
        }
        // The pod waiting for each claim, by the claim's index.
        let waiting: Vec<Option<Arc<PodView>>> = views
            .iter()
            .map(|v| {
                waiting_pods
                    .get(&(v.namespace.as_str(), v.name.as_str()))
                    .map(|p| Arc::clone(p))
            })
            .collect();
        let is_waiting: Vec<bool> = waiting.iter().map(Option::is_some).collect();
        let gate = scheduling_gate(driver);
        let gated = snapshot
            .pods
            .iter()
            .filter(|p| !p.finished && p.node_name.is_none())
            .filter_map(|p| {
                let at = p.scheduling_gates.iter().position(|g| *g == gate)?;
                Some((Arc::clone(p), at))
            })
            .collect::<Vec<(Arc<PodView>, usize)>>();
        let still_gated: HashSet<&str> = gated.iter().map(|(p, _)| p.uid.as_str()).collect();
        book.lifted
            .retain(|uid, _| still_gated.contains(uid.as_str()));
        let cleared = book.observe_clears(&views, &ours, &is_waiting);
        let versions = Versions::of(&snapshot);
        book.observe_capacity(fingerprint(&views, &snapshot.pods, &versions), now);

        let mut pending: Vec<(Option<k8s_openapi::jiff::Timestamp>, &str, &str, usize)> = views
            .iter()
            .enumerate()
            .filter(|&(i, v)| {
                ours[i]
                    && v.allocation.is_none()
                    && !v.deleting
                    && !bound.contains(&(v.namespace.as_str(), v.name.as_str()))
                    && is_waiting[i]
            })
            .map(|(i, v)| (v.created, v.namespace.as_str(), v.name.as_str(), i))
            .collect();
        // Oldest first, then by name: deterministic, and fair to claims that waited longest.
        pending.sort();
        let pending: Vec<usize> = pending.into_iter().map(|(_, _, _, i)| i).collect();

        let key = versions.engine_key();
        let allocated: Vec<Arc<ClaimView>> = views
            .iter()
            .filter(|v| v.allocation.is_some())
            .cloned()
            .collect();
        let engine = match kept {
            Some(KeptEngine {
                key: was,
                mut engine,
            }) if Some(was) == key
                && engine.driver() == driver
                && engine.policies() == policies
                && engine.selector_count() < MAX_KEPT_SELECTORS =>
            {
                engine.resync(&allocated, &snapshot.pods);
                engine
            }
            _ => Engine::of(
                driver,
                Parts {
                    nodes: &snapshot.nodes,
                    slices: &snapshot.slices,
                    classes: &snapshot.classes,
                    claims: &allocated,
                    pods: &snapshot.pods,
                },
                policies,
            ),
        };
        Selection {
            views,
            waiting,
            pending,
            cleared,
            ours,
            gated,
            gate,
            engine,
            key,
        }
    }

    /// The gated pods whose gate can be lifted: every claim they use exists and is either
    /// allocated (before this pass or by it: `allocated_now`, by UID) or not ours to
    /// allocate. A pod still waiting for a template's claim, or for a claim we could not
    /// place, stays gated: the scheduler could not place it either, and ungated it would
    /// only go into back-off. Each with the index of our gate in its list.
    pub fn gates_to_lift(&self, allocated_now: &HashSet<String>) -> Vec<(Arc<PodView>, usize)> {
        if self.gated.is_empty() {
            return Vec::new();
        }
        let index: HashMap<(&str, &str), usize> = self
            .views
            .iter()
            .enumerate()
            .map(|(i, v)| ((v.namespace.as_str(), v.name.as_str()), i))
            .collect();
        let ready = |pod: &PodView, claim: &str| {
            index
                .get(&(pod.namespace.as_str(), claim))
                .is_some_and(|&i| {
                    let v = &self.views[i];
                    !self.ours[i] || v.allocation.is_some() || allocated_now.contains(&v.uid)
                })
        };
        self.gated
            .iter()
            .filter(|(pod, _)| !pod.awaiting_claims && pod.claims.iter().all(|c| ready(pod, c)))
            .cloned()
            .collect()
    }

    /// The engine, for the next pass, when it can be kept.
    pub fn into_kept(self) -> Option<KeptEngine> {
        self.key.map(|key| KeptEngine {
            key,
            engine: self.engine,
        })
    }

    /// The claims to try, in order, as indices for [`Selection::view`].
    pub fn pending(&self) -> Vec<usize> {
        self.pending.clone()
    }

    pub fn view(&self, i: usize) -> &ClaimView {
        &self.views[i]
    }

    /// Where claim `i` goes, avoiding `avoid`, given every allocation committed so far.
    pub fn decide(&mut self, i: usize, avoid: &BTreeSet<String>) -> Decision {
        let pod = self.waiting[i].as_deref();
        Decision::of(self.engine.allocate(&self.views[i], pod, avoid))
    }

    /// The pod waiting for claim `i`, if any.
    pub fn pod(&self, i: usize) -> Option<&PodView> {
        self.waiting[i].as_deref()
    }

    /// Charge an allocation before the next decision.
    pub fn commit(&mut self, allocation: &ClaimAllocation) {
        self.engine.commit(allocation);
    }

    /// Give back what claim `uid` was charged (its write did not land).
    pub fn release(&mut self, uid: &str) {
        self.engine.release(uid);
    }

    pub fn view_arc(&self, i: usize) -> Arc<ClaimView> {
        Arc::clone(&self.views[i])
    }

    /// The pod whose gate claim `i`'s allocation lifts, with the gate's index: its waiting
    /// pod, gated by us, when that claim is its only one. Pods with several claims, or
    /// sharing one, are left to [`Selection::gates_to_lift`] at the end of the pass.
    pub fn gate_lifted_by(&self, i: usize) -> Option<(Arc<PodView>, usize)> {
        let pod = self.waiting[i].as_ref()?;
        let at = pod.scheduling_gates.iter().position(|g| *g == self.gate)?;
        (!pod.awaiting_claims && pod.claims.len() == 1 && pod.claims[0] == self.views[i].name)
            .then(|| (Arc::clone(pod), at))
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

fn fingerprint(
    views: &[Arc<ClaimView>],
    pods: &[Arc<PodView>],
    versions: &Versions,
) -> Fingerprint {
    Fingerprint {
        allocated: views
            .iter()
            .filter(|v| v.allocation.is_some())
            .map(|v| digest(&v.uid))
            .collect(),
        bound_pods: pods
            .iter()
            .filter(|p| p.node_name.is_some() && !p.finished)
            .map(|p| digest(&p.uid))
            .collect(),
        slices: versions.slices,
        nodes: versions.nodes,
        classes: versions.classes,
    }
}

/// What became of a write.
#[derive(Debug)]
enum Written {
    /// status.allocation is stored; the claim's new resourceVersion.
    Stored(String),
    /// Someone else allocated the claim meanwhile: nothing written.
    AlreadyAllocated,
    /// The claim is gone, being deleted, or was replaced (another UID).
    Gone,
    /// Leadership was lost: nothing written.
    NotLeader,
    /// Conflicts on every attempt.
    Conflicted,
}

/// What a write must know of the claim as it is now: from the cache's view at first, from
/// the API server after a conflict.
struct Current {
    uid: String,
    resource_version: Option<String>,
    deleting: bool,
    allocated: bool,
    finalizers: Vec<String>,
}

impl Current {
    fn of_view(claim: &ClaimView) -> Current {
        Current {
            uid: claim.uid.clone(),
            resource_version: claim.resource_version.clone(),
            deleting: claim.deleting,
            allocated: claim.allocation.is_some(),
            finalizers: claim.finalizers.clone(),
        }
    }

    fn of_object(claim: &v1::ResourceClaim) -> Current {
        Current {
            uid: claim.uid().unwrap_or_default(),
            resource_version: claim.resource_version(),
            deleting: claim.metadata.deletion_timestamp.is_some(),
            allocated: claim
                .status
                .as_ref()
                .is_some_and(|s| s.allocation.is_some()),
            finalizers: claim.finalizers().to_vec(),
        }
    }
}

/// The allocation loop's worker: runs a [`Selection`] and writes what it decides.
pub struct Allocator {
    pub driver: String,
    pub policies: Policies,
    pub backoff: Backoff,
    writer: Writer,
    metrics: Arc<Metrics>,
    leadership: Leadership,
    pub book: Book,
    kept: Option<KeptEngine>,
    /// How often the Events of a claim that keeps waiting are published again.
    pub event_refresh: Duration,
    /// Whether the previous pass was the leader's (else a standby's dry run).
    led: bool,
}

/// Every label `pending_claims` carries, so each series exists (at 0) from the first pass:
/// an alert on one must not depend on it having been non-zero once.
pub const PENDING_LABELS: [&str; 6] = [
    "no_matching_gpu",
    "no_eligible_node",
    "insufficient_capacity",
    "topology",
    "invalid",
    UNDECIDED,
];

/// Pending claims this replica has not refused (yet): about to be allocated, being written,
/// or in a standby that has not tried them.
pub const UNDECIDED: &str = "undecided";

/// Events about a claim that keeps waiting are published again this often: well under the
/// API server's one-hour Event TTL, and under the 6 minutes for which kube's Recorder keeps
/// an Event to update it as a series (count and lastObservedTime) instead of creating another.
pub const EVENT_REFRESH: Duration = Duration::from_secs(5 * 60);

impl Allocator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        version: ApiVersion,
        driver: &str,
        policies: Policies,
        backoff: Backoff,
        events: Option<EventSink>,
        metrics: Arc<Metrics>,
        leadership: Leadership,
    ) -> Allocator {
        Allocator {
            driver: driver.to_string(),
            policies,
            backoff,
            writer: Writer {
                client,
                version,
                gate: scheduling_gate(driver),
                events,
                metrics: metrics.clone(),
                leadership: leadership.clone(),
            },
            metrics,
            leadership,
            book: Book::default(),
            kept: None,
            event_refresh: EVENT_REFRESH,
            led: false,
        }
    }

    /// A standby's pass: the same decisions from its own watch caches, for its metrics (GPU
    /// capacity, pending claims by reason), without writing a claim, an Event or a counter.
    /// Decisions are charged to this pass's engine only, so claims decided later see the room
    /// the leader would have used; the next pass's resync gives it back.
    pub fn observe(&mut self, snapshot: Snapshot) {
        let now = Instant::now();
        self.led = false;
        let mut selection = Selection::with_engine(
            snapshot,
            &mut self.book,
            &self.driver,
            self.policies,
            now,
            self.kept.take(),
        );
        // What the caches show, before any dry-run charge.
        self.metrics.observe_state(&selection.engine().state);
        let pending = selection.pending();
        for &i in &pending {
            let uid = selection.view(i).uid.clone();
            if !self.book.due(&uid, now) {
                continue;
            }
            let avoid = self.book.avoid(&uid);
            match selection.decide(i, &avoid) {
                Decision::Allocate(allocation) => {
                    selection.commit(&allocation);
                    // Not refused: still pending, as `undecided`, until the leader's write.
                    self.book.succeeded(&uid);
                }
                Decision::Refuse { label, reason } => {
                    // Remembered as counted: the leader counts this episode, and a takeover
                    // must not count it a second time in a sum over replicas.
                    self.book.refused(&uid, label, &reason, self.backoff, now);
                }
                Decision::NotOurs => {}
            }
        }
        self.observe_pending(&selection, &pending, &HashSet::new());
        self.kept = selection.into_kept();
    }

    /// Set `pending_claims` from the claims still pending after a pass (those in `gone` were
    /// allocated by it).
    fn observe_pending(&self, selection: &Selection, pending: &[usize], gone: &HashSet<String>) {
        let mut counts: BTreeMap<&'static str, i64> =
            PENDING_LABELS.iter().map(|l| (*l, 0)).collect();
        for &i in pending {
            let uid = &selection.view(i).uid;
            if gone.contains(uid) {
                continue;
            }
            *counts
                .entry(self.book.refusal(uid).unwrap_or(UNDECIDED))
                .or_default() += 1;
        }
        for (reason, count) in counts {
            self.metrics
                .pending
                .get_or_create(&PendingLabels {
                    reason: reason.to_string(),
                })
                .set(count);
        }
    }

    /// One pass: allocate every pending claim of our classes that is due.
    pub async fn pass(&mut self, snapshot: Snapshot) -> PassReport {
        let now = Instant::now();
        if !self.led {
            self.book.retry_all_now(now);
            self.led = true;
        }
        let mut report = PassReport::default();
        let mut selection = Selection::with_engine(
            snapshot,
            &mut self.book,
            &self.driver,
            self.policies,
            now,
            self.kept.take(),
        );
        for (claim, node) in &selection.cleared {
            tracing::info!(claim = %claim, node = %node, "the scheduler cleared our allocation; avoiding the node for this claim");
        }
        let pending = selection.pending();
        let mut allocated = HashSet::new();
        // Decisions are made one after the other on the engine; their writes run
        // `WRITES_IN_FLIGHT` at a time, each allocation charged when decided and given back
        // if its write does not land.
        let mut in_flight = FuturesUnordered::new();
        let mut lost_lead = false;
        for &i in &pending {
            let uid = selection.view(i).uid.clone();
            if !self.book.due(&uid, now) {
                report.deferred += 1;
                continue;
            }
            if lost_lead || !self.leadership.is_leading() {
                break;
            }
            let avoid = self.book.avoid(&uid);
            let started = std::time::Instant::now();
            let decision = selection.decide(i, &avoid);
            self.metrics
                .decision_seconds
                .observe(started.elapsed().as_secs_f64());
            match decision {
                Decision::Allocate(allocation) => {
                    let allocation = Arc::new(allocation);
                    selection.commit(&allocation);
                    let lift = selection
                        .gate_lifted_by(i)
                        .filter(|(pod, _)| self.book.lifting(&pod.uid, now));
                    in_flight.push(self.writer.clone().allocate(
                        selection.view_arc(i),
                        allocation,
                        lift,
                    ));
                    if in_flight.len() >= WRITES_IN_FLIGHT
                        && let Some(outcome) = in_flight.next().await
                    {
                        lost_lead |=
                            self.settle(outcome, &mut selection, &mut report, &mut allocated, now);
                    }
                }
                Decision::NotOurs => {}
                Decision::Refuse { label, reason } => {
                    let claim = selection.view_arc(i);
                    let key = claim.key();
                    if self.book.refused(&uid, label, &reason, self.backoff, now) {
                        self.metrics
                            .refused
                            .get_or_create(&RefusalLabels {
                                reason: label.into(),
                            })
                            .inc();
                    }
                    tracing::info!(claim = %key, reason = %reason, "cannot allocate");
                    if self.book.event_due(&uid, &reason, self.event_refresh, now) {
                        let event_reason = if label == "invalid" {
                            "InvalidClaim"
                        } else {
                            "FailedAllocation"
                        };
                        self.writer
                            .event(&claim, EventType::Warning, event_reason, &reason)
                            .await;
                        // `kubectl describe pod` shows the pod's Events, not its claims':
                        // the pod is where a user looks first.
                        if let Some(pod) = selection.pod(i) {
                            self.writer
                                .pod_event(pod, EventType::Warning, event_reason, &reason)
                                .await;
                        }
                    }
                    report.refused.push((key, reason));
                }
            }
        }
        while let Some(outcome) = in_flight.next().await {
            self.settle(outcome, &mut selection, &mut report, &mut allocated, now);
        }
        if self.leadership.is_leading() {
            // Gates whose last claim was allocated before this pass, by another pod's write,
            // or is not ours; those lifted with their claim's write above are not sent again.
            for (pod, at) in selection.gates_to_lift(&allocated) {
                if self.book.lifting(&pod.uid, now) && self.writer.lift_gate(&pod, at).await {
                    report.ungated.push(pod.key());
                }
            }
        }
        self.metrics.observe_state(&selection.engine().state);
        self.observe_pending(&selection, &pending, &allocated);
        report.next_retry = self.book.next_retry();
        self.kept = selection.into_kept();
        report
    }

    /// Book what became of one allocation's write; true if leadership was lost.
    fn settle(
        &mut self,
        outcome: Outcome,
        selection: &mut Selection,
        report: &mut PassReport,
        allocated: &mut HashSet<String>,
        now: Instant,
    ) -> bool {
        let Outcome {
            claim,
            allocation,
            written,
            lift,
            lifted,
        } = outcome;
        let uid = claim.uid.as_str();
        if !matches!(written, Ok(Written::Stored(_))) {
            // Not allocated: give back what the decision charged, and let the gate be lifted
            // whenever the claim is.
            selection.release(uid);
            if let Some(pod) = &lift {
                self.book.lifted.remove(&pod.uid);
            }
        }
        match written {
            Ok(Written::Stored(rv)) => {
                let node = allocation.node_name.clone().unwrap_or_default();
                self.book.assume(uid, rv, allocation);
                self.book.succeeded(uid);
                // Known allocated from now on, even if the scheduler clears it before a pass
                // sees the write echoed back by the watch.
                self.book.last_node.insert(uid.to_string(), node.clone());
                self.metrics.allocated.inc();
                report.allocated.push((claim.key(), node));
                if let Some(pod) = lift.filter(|_| lifted) {
                    report.ungated.push(pod.key());
                }
                allocated.insert(uid.to_string());
            }
            Ok(Written::AlreadyAllocated) | Ok(Written::Gone) => {
                // The next pass sees the claim as it is now.
                self.book.succeeded(uid);
            }
            Ok(Written::NotLeader) => return true,
            Ok(Written::Conflicted) => {
                self.book.failed(uid, "write conflicts", self.backoff, now);
            }
            Err(e) => {
                tracing::warn!(claim = %claim.key(), error = %e, "writing the allocation failed");
                self.book
                    .failed(uid, &format!("write: {e}"), self.backoff, now);
            }
        }
        false
    }
}

/// Allocations written at once in a pass. An allocation is two writes (finalizer, then
/// status), its Event and, for a gated pod, the gate's lift; one allocation after another, the
/// API server's round trips bounded a burst at about 20 claims/s (BENCHMARKS.md). Eight keep
/// the controller ahead of the kube-scheduler's binding rate; sixteen were no faster on the
/// 20,000-claim bench and held 1-2 MiB more at the peak.
const WRITES_IN_FLIGHT: usize = 8;

/// What a write needs of the allocator, owned, so that several run while the pass goes on.
#[derive(Clone)]
struct Writer {
    client: Client,
    version: ApiVersion,
    /// Our scheduling gate's name.
    gate: String,
    events: Option<EventSink>,
    metrics: Arc<Metrics>,
    leadership: Leadership,
}

/// One allocation's write and what followed it.
struct Outcome {
    claim: Arc<ClaimView>,
    allocation: Arc<ClaimAllocation>,
    written: Result<Written, ClientError>,
    /// The pod whose gate was to be lifted after the write, and whether that landed.
    lift: Option<Arc<PodView>>,
    lifted: bool,
}

impl Writer {
    /// Write `allocation` to its claim; once stored, lift the gate of `lift`'s pod (first:
    /// the scheduler is waiting for it) and publish the Allocated Event.
    async fn allocate(
        self,
        claim: Arc<ClaimView>,
        allocation: Arc<ClaimAllocation>,
        lift: Option<(Arc<PodView>, usize)>,
    ) -> Outcome {
        let written = self.write(&claim, &allocation).await;
        let mut lifted = false;
        if matches!(written, Ok(Written::Stored(_))) {
            if let Some((pod, at)) = &lift {
                lifted = self.lift_gate(pod, *at).await;
            }
            let node = allocation.node_name.as_deref().unwrap_or_default();
            let devices: Vec<&str> = allocation
                .results
                .iter()
                .map(|r| r.device.as_str())
                .collect();
            tracing::info!(claim = %claim.key(), node = %node, devices = ?devices, "allocated");
            let note = format!("allocated {} on node {node}", devices.join(", "));
            self.event(&claim, EventType::Normal, "Allocated", &note)
                .await;
        }
        Outcome {
            claim,
            allocation,
            written,
            lift: lift.map(|(pod, _)| pod),
            lifted,
        }
    }

    /// Add the delete-protection finalizer, then write status.allocation, each a merge patch
    /// carrying the claim's resourceVersion (a precondition: a stale one is a conflict, as an
    /// update would be). Only the fields written are sent, so the cache need not keep the
    /// whole claim. A conflict re-reads the claim: if someone allocated it meanwhile nothing
    /// is written, otherwise the same allocation (the claim's spec is immutable, and this
    /// pass already charged it) is retried.
    async fn write(
        &self,
        claim: &ClaimView,
        allocation: &ClaimAllocation,
    ) -> Result<Written, ClientError> {
        let name = claim.name.as_str();
        let key = claim.key();
        let api = DraApi::<v1::ResourceClaim>::namespaced(
            self.client.clone(),
            &claim.namespace,
            self.version,
        );
        let mut current = Current::of_view(claim);
        for attempt in 0..MAX_WRITE_ATTEMPTS {
            // Without a resourceVersion a patch would be unconditional: read one first.
            if attempt > 0 || current.resource_version.is_none() {
                match api.get_opt(name).await? {
                    Some(c) => current = Current::of_object(&c),
                    None => return Ok(Written::Gone),
                }
            }
            if current.uid != claim.uid || current.deleting {
                return Ok(Written::Gone);
            }
            if current.allocated {
                return Ok(Written::AlreadyAllocated);
            }
            if !self.leadership.is_leading() {
                return Ok(Written::NotLeader);
            }
            if !current.finalizers.iter().any(|f| f == DELETE_PROTECTION) {
                let mut finalizers = current.finalizers.clone();
                finalizers.push(DELETE_PROTECTION.to_string());
                let patch = serde_json::json!({"metadata": {
                    "resourceVersion": current.resource_version,
                    "finalizers": finalizers,
                }});
                current = match api.patch_metadata(name, &patch).await {
                    Ok(c) => Current::of_object(&c),
                    Err(e) if e.is_conflict() => {
                        self.metrics.conflicts.inc();
                        tracing::debug!(claim = %key, "conflict adding the finalizer; re-reading");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            }
            let status = v1::ResourceClaim {
                status: Some(v1::ResourceClaimStatus {
                    allocation: Some(allocation.to_result()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match api
                .patch_status(name, current.resource_version.as_deref(), &status)
                .await
            {
                Ok(stored) => {
                    return Ok(Written::Stored(
                        stored.resource_version().unwrap_or_default(),
                    ));
                }
                Err(e) if e.is_conflict() => {
                    self.metrics.conflicts.inc();
                    tracing::debug!(claim = %key, "conflict writing the allocation; re-reading");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Written::Conflicted)
    }

    /// Remove our scheduling gate from `pod`, where it is entry `at` of its list. A JSON
    /// patch that first tests the entry: if the list changed since the cache saw it (another
    /// gate lifted), the patch fails without touching the pod and a later pass retries.
    async fn lift_gate(&self, pod: &PodView, at: usize) -> bool {
        let key = pod.key();
        let gate = &self.gate;
        let path = format!("/spec/schedulingGates/{at}");
        let patch: json_patch::Patch = match serde_json::from_value(serde_json::json!([
            {"op": "test", "path": format!("{path}/name"), "value": gate},
            {"op": "remove", "path": path},
        ])) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(pod = %key, error = %e, "building the gate patch failed");
                return false;
            }
        };
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace);
        match api
            .patch(
                &pod.name,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await
        {
            Ok(_) => {
                self.metrics.gates_lifted.inc();
                tracing::info!(pod = %key, gate = %gate, "claims allocated; scheduling gate lifted");
                true
            }
            // Gone, or its gates changed: the next pass sees the pod as it is now.
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => {
                tracing::debug!(pod = %key, error = %e.message, "scheduling gate not lifted");
                false
            }
            Err(e) => {
                tracing::warn!(pod = %key, error = %e, "lifting the scheduling gate failed");
                false
            }
        }
    }

    async fn pod_event(&self, pod: &PodView, kind: EventType, reason: &str, note: &str) {
        let Some(sink) = &self.events else {
            return;
        };
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        };
        sink.publish(&regarding, kind, reason, "Allocate", note)
            .await;
    }

    async fn event(&self, claim: &ClaimView, kind: EventType, reason: &str, note: &str) {
        let Some(sink) = &self.events else {
            return;
        };
        // Pointing at the claim in the version the cluster serves, so that `kubectl
        // describe` there finds the Event.
        let regarding = ObjectReference {
            api_version: Some(self.version.as_str().to_string()),
            kind: Some("ResourceClaim".into()),
            name: Some(claim.name.clone()),
            namespace: Some(claim.namespace.clone()),
            uid: Some(claim.uid.clone()).filter(|u| !u.is_empty()),
            resource_version: claim.resource_version.clone(),
            field_path: None,
        };
        sink.publish(&regarding, kind, reason, "Allocate", note)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_driver::AllocatedDevice;

    fn view(uid: &str, rv: &str, node: Option<&str>) -> Arc<ClaimView> {
        Arc::new(ClaimView {
            namespace: "ml".into(),
            name: uid.into(),
            uid: uid.into(),
            resource_version: Some(rv.into()),
            created: None,
            requests: vec![],
            constraints: vec![],
            config: vec![],
            allocation: node.map(|n| Arc::new(allocation(n))),
            deleting: false,
            reserved_for: vec![],
            finalizers: vec![],
        })
    }

    fn allocation(node: &str) -> ClaimAllocation {
        ClaimAllocation {
            namespace: "ml".into(),
            name: "c".into(),
            uid: "c".into(),
            results: vec![AllocatedDevice {
                request: "gpu".into(),
                driver: "vgpu.hami.io".into(),
                pool: node.into(),
                device: "gpu-0".into(),
                admin_access: false,
                share_id: None,
                consumed_capacity: Default::default(),
            }],
            config: vec![],
            node_name: Some(node.into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn assumed_allocations_cover_a_lagging_cache_until_it_catches_up() {
        let mut book = Book::default();
        book.assume("a", "10".into(), Arc::new(allocation("n1")));
        // The cache still shows version 9, unallocated: the write is assumed.
        let cached = view("a", "9", None);
        let mut views = vec![cached.clone()];
        book.overlay_assumed(&mut views, Instant::now());
        assert_eq!(views[0].allocation.as_deref(), Some(&allocation("n1")));
        // Laid over a copy: the cache's view is untouched.
        assert_eq!(cached.allocation, None);
        // Version 10 arrived (allocated): the cache wins from now on.
        let mut views = vec![view("a", "10", Some("n1"))];
        book.overlay_assumed(&mut views, Instant::now());
        assert!(book.assumed.is_empty());
        // A cache past our write without an allocation means it was cleared since.
        book.assume("a", "10".into(), Arc::new(allocation("n1")));
        let mut views = vec![view("a", "11", None)];
        book.overlay_assumed(&mut views, Instant::now());
        assert_eq!(views[0].allocation, None);
        // An assumption expires.
        book.assume("a", "10".into(), Arc::new(allocation("n1")));
        tokio::time::advance(ASSUME_FOR + Duration::from_secs(1)).await;
        let mut views = vec![view("a", "9", None)];
        book.overlay_assumed(&mut views, Instant::now());
        assert_eq!(views[0].allocation, None);
    }

    #[test]
    fn a_cleared_allocation_with_a_waiting_pod_marks_the_node_to_avoid() {
        let mut book = Book::default();
        // a and b are ours, c is not; the pods of a and c wait, b has none.
        let (ours, waiting) = ([true, true, false], [true, false, true]);
        let none = book.observe_clears(
            &[
                view("a", "1", Some("n1")),
                view("b", "1", Some("n2")),
                view("c", "1", Some("n3")),
            ],
            &ours,
            &waiting,
        );
        assert!(none.is_empty());
        // a: cleared while its pod waits -> avoid n1; b: cleared with no pod waiting (KCM
        // deallocated it after its pod finished) -> nothing to avoid; c: not ours.
        let cleared = book.observe_clears(
            &[
                view("a", "2", None),
                view("b", "2", None),
                view("c", "2", None),
            ],
            &ours,
            &waiting,
        );
        assert_eq!(cleared, vec![("ml/a".to_string(), "n1".to_string())]);
        assert_eq!(book.avoid("a"), ["n1".to_string()].into());
        assert!(book.avoid("b").is_empty());
        assert!(book.avoid("c").is_empty());
        // Not reported twice.
        assert!(
            book.observe_clears(&[view("a", "3", None)], &[true], &[true])
                .is_empty()
        );
        // Forgotten with the claim.
        book.observe_clears(&[], &[], &[]);
        assert!(book.avoid("a").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_doubles_and_freed_capacity_resets_it() {
        let mut book = Book::default();
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        let t0 = Instant::now();
        assert!(book.failed("a", "full", backoff, t0));
        assert!(!book.due("a", t0));
        assert!(book.due("a", t0 + Duration::from_secs(1)));
        assert!(!book.failed("a", "full", backoff, t0));
        assert!(!book.due("a", t0 + Duration::from_millis(1999)));
        for _ in 0..5 {
            book.failed("a", "full", backoff, t0);
        }
        assert_eq!(book.next_retry(), Some(t0 + Duration::from_secs(4)));
        assert!(book.failed("a", "another reason", backoff, t0));
        // Our own allocations do not reset back-off; a released claim does.
        let mut f = Fingerprint {
            allocated: [digest("x")].into(),
            ..Default::default()
        };
        book.observe_capacity(f.clone(), t0);
        f.allocated.insert(digest("y"));
        book.observe_capacity(f.clone(), t0);
        assert!(!book.due("a", t0));
        f.allocated.remove(&digest("x"));
        book.observe_capacity(f.clone(), t0);
        assert!(book.due("a", t0));
        book.succeeded("a");
        assert_eq!(book.next_retry(), None);
    }

    #[test]
    fn a_refusal_counts_once_per_reason_and_its_event_is_refreshed() {
        let mut book = Book::default();
        let backoff = Backoff::default();
        let refresh = Duration::from_secs(300);
        let t0 = Instant::now();
        assert!(book.refused("a", "insufficient_capacity", "full", backoff, t0));
        // Retried and refused again for the same reason: not a new claim to count.
        assert!(!book.refused("a", "insufficient_capacity", "full", backoff, t0));
        assert!(book.refused("a", "topology", "no peers", backoff, t0));
        assert_eq!(book.refusal("a"), Some("topology"));
        assert!(book.event_due("a", "no peers", refresh, t0));
        assert!(!book.event_due("a", "no peers", refresh, t0 + refresh / 2));
        // A new text is published at once, and then refreshed from then on.
        let t1 = t0 + refresh / 2;
        assert!(book.event_due("a", "full", refresh, t1));
        assert!(!book.event_due("a", "full", refresh, t1 + refresh / 2));
        assert!(book.event_due("a", "full", refresh, t1 + refresh));
        // Allocated, then refused again: a new episode.
        book.succeeded("a");
        assert_eq!(book.refusal("a"), None);
        assert!(book.refused("a", "topology", "no peers", backoff, t0));
        // A claim that only failed to be written has no refusal reason.
        book.failed("b", "write conflicts", backoff, t0);
        assert_eq!(book.refusal("b"), None);
        assert!(!book.event_due("c", "never refused", refresh, t0));
    }

    fn claim_object(name: &str, second: u32, class: &str) -> Arc<ClaimView> {
        let object: v1::ResourceClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ml", "uid": name,
                         "creationTimestamp": format!("2025-01-01T00:00:{second:02}Z")},
            "spec": {"devices": {"requests": [
                {"name": "gpu", "exactly": {"deviceClassName": class}}]}}
        }))
        .unwrap();
        Arc::new(ClaimView::of(&object).unwrap())
    }

    /// `slice`, which the controller allocates, and `whole`, which it does not.
    fn slice_and_whole_classes() -> Vec<ClassView> {
        [("slice", true), ("whole", false)]
            .into_iter()
            .map(|(name, ours)| ClassView {
                name: name.into(),
                selectors: vec![],
                config: vec![],
                ours,
            })
            .collect()
    }

    /// A selection of `snapshot` for our driver with the default policies, now.
    fn select(snapshot: Snapshot, book: &mut Book) -> Selection {
        Selection::new(
            snapshot,
            book,
            "vgpu.hami.io",
            Policies::default(),
            Instant::now(),
        )
    }

    fn pod_of(name: &str, claim: &str, node: Option<&str>) -> Arc<PodView> {
        Arc::new(PodView {
            namespace: "ml".into(),
            name: name.into(),
            uid: name.into(),
            node_name: node.map(Into::into),
            claims: vec![claim.into()],
            ..Default::default()
        })
    }

    #[test]
    fn selection_tries_our_waiting_claims_oldest_first() {
        let snapshot = Snapshot {
            claims: vec![
                claim_object("young", 2, "slice"),
                claim_object("old", 1, "slice"),
                claim_object("bound", 0, "slice"),
                claim_object("theirs", 0, "whole"),
                claim_object("idle", 0, "slice"),
            ],
            classes: slice_and_whole_classes(),
            pods: vec![
                pod_of("p1", "young", None),
                pod_of("p2", "old", None),
                pod_of("p3", "bound", Some("n1")),
                pod_of("p4", "theirs", None),
            ],
            ..Default::default()
        };
        let mut book = Book::default();
        let mut selection = select(snapshot, &mut book);
        let order: Vec<String> = selection
            .pending()
            .into_iter()
            .map(|i| selection.view(i).key())
            .collect();
        assert_eq!(order, ["ml/old", "ml/young"]);
        let first = selection.pending()[0];
        // No slices: no room anywhere, and nothing was written to decide that.
        assert!(matches!(
            selection.decide(first, &BTreeSet::new()),
            Decision::Refuse {
                label: "no_matching_gpu",
                ..
            }
        ));
        assert!(book.fingerprint.is_some());
    }

    fn gated(name: &str, claims: &[&str], gates: &[&str]) -> Arc<PodView> {
        Arc::new(PodView {
            namespace: "ml".into(),
            name: name.into(),
            uid: name.into(),
            claims: claims.iter().map(|c| c.to_string()).collect(),
            scheduling_gates: gates.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_gate_is_lifted_once_every_claim_of_ours_is_allocated() {
        const GATE: &str = "vgpu.hami.io/allocation";
        let mut allocated = claim_object("done", 0, "slice");
        Arc::make_mut(&mut allocated).allocation = Some(Arc::new(allocation("n1")));
        let mut awaiting = (*gated("awaiting", &[], &[GATE])).clone();
        awaiting.awaiting_claims = true;
        let mut bound = (*gated("bound", &["done"], &[GATE])).clone();
        bound.node_name = Some("n1".into());
        let snapshot = Snapshot {
            claims: vec![
                allocated,
                claim_object("now", 1, "slice"),
                claim_object("waits", 2, "slice"),
                claim_object("theirs", 3, "whole"),
            ],
            classes: slice_and_whole_classes(),
            pods: vec![
                // Our gate second in its list: its index is what the patch tests.
                gated("ready", &["done", "theirs"], &["other.io/x", GATE]),
                gated("this-pass", &["now"], &[GATE]),
                gated("unplaced", &["done", "waits"], &[GATE]),
                gated("missing", &["not-created"], &[GATE]),
                gated("no-claims", &[], &[GATE]),
                gated("not-ours", &["done"], &["other.io/x"]),
                gated("ungated", &["done"], &[]),
                Arc::new(awaiting),
                Arc::new(bound),
            ],
            ..Default::default()
        };
        let mut book = Book::default();
        let selection = select(snapshot, &mut book);
        let lift = |now: &[&str]| -> Vec<(String, usize)> {
            let now: HashSet<String> = now.iter().map(|s| s.to_string()).collect();
            selection
                .gates_to_lift(&now)
                .into_iter()
                .map(|(p, at)| (p.name.clone(), at))
                .collect()
        };
        assert_eq!(
            lift(&[]),
            [("ready".to_string(), 1), ("no-claims".to_string(), 0)]
        );
        // "now" allocated by this pass, by its UID.
        assert_eq!(
            lift(&["now"]),
            [
                ("ready".to_string(), 1),
                ("this-pass".to_string(), 0),
                ("no-claims".to_string(), 0)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lift_is_sent_once_until_it_is_due_again_and_forgotten_with_the_gate() {
        let mut book = Book::default();
        let t0 = Instant::now();
        assert!(book.lifting("p", t0));
        // A pass comes back to check it even if nothing else changes.
        assert_eq!(book.next_retry(), Some(t0 + LIFT_AGAIN_AFTER));
        assert!(!book.lifting("p", t0 + LIFT_AGAIN_AFTER / 2));
        assert!(book.lifting("p", t0 + LIFT_AGAIN_AFTER));
        // A pass that no longer sees the pod gated forgets it.
        select(snapshot_with("1"), &mut book);
        assert!(book.lifted.is_empty());
        assert_eq!(book.next_retry(), None);
    }

    #[test]
    fn a_released_charge_is_room_for_the_next_decision_of_the_same_pass() {
        use vgpu_driver::slice::{gpu_devices, render_pool};
        use vgpu_driver::{NodeRef, PoolOptions};
        let devices = gpu_devices(&[test_support::gpu(0)]).unwrap();
        let node = NodeRef {
            name: "n1".into(),
            uid: "uid-n1".into(),
        };
        let slices = render_pool(&node, &devices, &PoolOptions::new("vgpu.hami.io"))
            .unwrap()
            .iter()
            .map(|s| Arc::new(SliceView::of(s)))
            .collect();
        let claim = |name: &str, second: u32| {
            let object: v1::ResourceClaim = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ml", "uid": name,
                             "creationTimestamp": format!("2025-01-01T00:00:{second:02}Z")},
                "spec": {"devices": {
                    "requests": [{"name": "gpu", "exactly": {"deviceClassName": "slice"}}],
                    "config": [{"requests": ["gpu"], "opaque": {"driver": "vgpu.hami.io",
                        "parameters": {"apiVersion": "vgpu.hami.io/v1alpha1",
                                       "kind": "GpuSliceConfig", "memory": "50Gi"}}}]}}
            }))
            .unwrap();
            Arc::new(ClaimView::of(&object).unwrap())
        };
        let snapshot = Snapshot {
            claims: vec![claim("a", 0), claim("b", 1)],
            classes: vec![ClassView {
                name: "slice".into(),
                selectors: vec![],
                config: vec![],
                ours: true,
            }],
            slices,
            nodes: vec![Arc::new(NodeView {
                name: "n1".into(),
                ..Default::default()
            })],
            pods: vec![pod_of("pa", "a", None), pod_of("pb", "b", None)],
            ..Default::default()
        };
        let mut book = Book::default();
        let mut selection = select(snapshot, &mut book);
        let (a, b) = (selection.pending()[0], selection.pending()[1]);
        let none = BTreeSet::new();
        let Decision::Allocate(first) = selection.decide(a, &none) else {
            panic!("a fits an empty 80Gi GPU");
        };
        // Charged while its write is in flight: b (50Gi more) does not fit beside it.
        selection.commit(&first);
        assert!(matches!(
            selection.decide(b, &none),
            Decision::Refuse {
                label: "insufficient_capacity",
                ..
            }
        ));
        // a's write failed: its charge is given back, and b fits.
        selection.release("a");
        assert!(matches!(selection.decide(b, &none), Decision::Allocate(_)));
    }

    fn snapshot_with(slice_version: &str) -> Snapshot {
        Snapshot {
            claims: vec![claim_object("a", 1, "slice")],
            classes: vec![ClassView {
                name: "slice".into(),
                selectors: vec!["device.driver == \"vgpu.hami.io\"".into()],
                config: vec![],
                ours: true,
            }],
            pods: vec![pod_of("p", "a", None)],
            slice_versions: vec![("s1".into(), slice_version.into())],
            class_versions: vec![("slice".into(), "1".into())],
            ..Default::default()
        }
    }

    #[test]
    fn the_engine_is_kept_while_nodes_slices_and_classes_are_unchanged() {
        let mut book = Book::default();
        let select = |book: &mut Book, version: &str, kept: Option<KeptEngine>| {
            Selection::with_engine(
                snapshot_with(version),
                book,
                "vgpu.hami.io",
                Policies::default(),
                Instant::now(),
                kept,
            )
        };
        let mut first = select(&mut book, "1", None);
        first.decide(first.pending()[0], &BTreeSet::new());
        assert_eq!(first.engine().selector_count(), 1);
        // Same objects: the compiled selector survives into the next pass.
        let second = select(&mut book, "1", first.into_kept());
        assert_eq!(second.engine().selector_count(), 1);
        // A slice changed: rebuilt.
        let third = select(&mut book, "2", second.into_kept());
        assert_eq!(third.engine().selector_count(), 0);
        // Without resourceVersions a change could go unseen: never kept.
        assert!(select(&mut book, "", None).into_kept().is_none());
    }

    #[test]
    fn resource_versions_compare_numerically_when_they_can() {
        assert!(caught_up(Some("10"), "10"));
        assert!(caught_up(Some("11"), "10"));
        assert!(!caught_up(Some("9"), "10"));
        assert!(!caught_up(None, "10"));
        assert!(caught_up(Some("abc"), "abc"));
        assert!(!caught_up(Some("abd"), "abc"));
    }
}
