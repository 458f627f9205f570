//! One allocation pass over the cluster as the watch caches show it, and the bookkeeping that
//! survives between passes: retry back-off, nodes the scheduler rejected, and allocations we
//! wrote that the caches have not shown yet.
//!
//! Every pass rebuilds the engine from the objects (the API server is the source of truth, so
//! a restarted or newly elected replica decides exactly as the previous one would have), then
//! allocates the pending claims of our classes oldest first, charging each allocation before
//! deciding the next.

use super::api::{ClaimObject, claim_reference};
use super::leader::Leadership;
use super::metrics::{Metrics, RefusalLabels};
use crate::engine::{Engine, Inputs, Policies, Refusal};
use crate::model::{ClaimView, ClassView, NodeView, PodView};
use kube::api::PostParams;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, ResourceExt};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use vgpu_driver::{ClaimAllocation, SliceView};

/// The finalizer that makes kube-controller-manager deallocate a claim once no pod uses it.
pub const DELETE_PROTECTION: &str = "resource.kubernetes.io/delete-protection";

/// How long an allocation we wrote overrides what the watch cache shows, at most.
const ASSUME_FOR: Duration = Duration::from_secs(120);
/// Conflicts on one claim retried within a pass before giving up until the next.
const MAX_WRITE_ATTEMPTS: usize = 5;

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
}

#[derive(Clone, Debug)]
struct Assumed {
    resource_version: String,
    allocation: ClaimAllocation,
    at: Instant,
}

/// What changes in the cluster can give a refused claim room.
#[derive(Clone, Debug, Default, PartialEq)]
struct Fingerprint {
    allocated: HashSet<String>,
    bound_pods: HashSet<String>,
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

fn hash_of(items: impl Iterator<Item = (String, String)>) -> u64 {
    let mut items: Vec<(String, String)> = items.collect();
    items.sort();
    let mut h = DefaultHasher::new();
    items.hash(&mut h);
    h.finish()
}

/// The objects a pass works on.
pub struct Snapshot<C> {
    pub claims: Vec<Arc<C>>,
    pub classes: Vec<ClassView>,
    pub slices: Vec<SliceView>,
    pub nodes: Vec<NodeView>,
    pub pods: Vec<PodView>,
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
    /// Per (node, device): memory bytes, cores, claims: the state the pass ended with.
    pub usage: BTreeMap<(String, String), (u64, u32, u32)>,
    /// When the next claim in back-off becomes due.
    pub next_retry: Option<Instant>,
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
}

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
    pub fn overlay_assumed(&mut self, views: &mut [ClaimView], now: Instant) {
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
                view.allocation = Some(assumed.allocation.clone());
            }
        }
    }

    /// Remember a write until the cache shows it.
    pub fn assume(&mut self, uid: &str, resource_version: String, allocation: ClaimAllocation) {
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
        views: &[ClaimView],
        ours: &HashSet<String>,
        waiting: &HashSet<(String, String)>,
    ) -> Vec<(String, String)> {
        let mut cleared = Vec::new();
        let mut seen = HashMap::new();
        for view in views.iter().filter(|v| ours.contains(&v.uid)) {
            match &view.allocation {
                Some(a) => {
                    if let Some(node) = &a.node_name {
                        seen.insert(view.uid.clone(), node.clone());
                    }
                }
                None => {
                    if let Some(node) = self.last_node.get(&view.uid)
                        && !view.deleting
                        && waiting.contains(&(view.namespace.clone(), view.name.clone()))
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
        let present: HashSet<&str> = views.iter().map(|v| v.uid.as_str()).collect();
        self.avoid.retain(|uid, _| present.contains(uid.as_str()));
        self.retries.retain(|uid, _| present.contains(uid.as_str()));
        self.last_node = seen;
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

    fn succeeded(&mut self, uid: &str) {
        self.retries.remove(uid);
        self.avoid.remove(uid);
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|r| r.not_before).min()
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

/// The allocation loop's worker.
pub struct Allocator {
    pub driver: String,
    pub policies: Policies,
    pub backoff: Backoff,
    client: Client,
    recorder: Option<Recorder>,
    metrics: Arc<Metrics>,
    leadership: Leadership,
    pub book: Book,
}

impl Allocator {
    pub fn new(
        client: Client,
        driver: &str,
        policies: Policies,
        backoff: Backoff,
        recorder: Option<Recorder>,
        metrics: Arc<Metrics>,
        leadership: Leadership,
    ) -> Allocator {
        Allocator {
            driver: driver.to_string(),
            policies,
            backoff,
            client,
            recorder,
            metrics,
            leadership,
            book: Book::default(),
        }
    }

    /// One pass: allocate every pending claim of our classes that is due.
    pub async fn pass<C: ClaimObject>(&mut self, snapshot: Snapshot<C>) -> PassReport {
        let now = Instant::now();
        let mut report = PassReport::default();
        let mut views = Vec::with_capacity(snapshot.claims.len());
        let mut objects: HashMap<String, Arc<C>> = HashMap::new();
        for claim in &snapshot.claims {
            match claim.view() {
                Ok(v) => {
                    objects.insert(v.uid.clone(), claim.clone());
                    views.push(v);
                }
                // A claim whose allocation cannot be read is not ours to fix; its devices are
                // unknown, which the kubelet plugin's prepare-time check covers.
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable ResourceClaim"),
            }
        }
        self.book.overlay_assumed(&mut views, now);

        let ours_classes: HashSet<&str> = snapshot
            .classes
            .iter()
            .filter(|c| c.ours)
            .map(|c| c.name.as_str())
            .collect();
        let ours: HashSet<String> = views
            .iter()
            .filter(|v| {
                v.requests
                    .iter()
                    .flat_map(|r| &r.alternatives)
                    .any(|a| ours_classes.contains(a.class.as_str()))
            })
            .map(|v| v.uid.clone())
            .collect();
        // Claims (namespace, name) with a pod waiting to be scheduled, and with a bound pod.
        let mut waiting: HashMap<(String, String), &PodView> = HashMap::new();
        let mut bound: HashSet<(String, String)> = HashSet::new();
        for pod in snapshot.pods.iter().filter(|p| !p.finished) {
            for claim in &pod.claims {
                let key = (pod.namespace.clone(), claim.clone());
                if pod.node_name.is_some() {
                    bound.insert(key);
                } else {
                    waiting.entry(key).or_insert(pod);
                }
            }
        }
        let waiting_keys: HashSet<(String, String)> = waiting.keys().cloned().collect();
        for (claim, node) in self.book.observe_clears(&views, &ours, &waiting_keys) {
            tracing::info!(claim = %claim, node = %node, "the scheduler cleared our allocation; avoiding the node for this claim");
        }
        self.book.observe_capacity(
            Fingerprint {
                allocated: views
                    .iter()
                    .filter(|v| v.allocation.is_some())
                    .map(|v| v.uid.clone())
                    .collect(),
                bound_pods: snapshot
                    .pods
                    .iter()
                    .filter(|p| p.node_name.is_some() && !p.finished)
                    .map(|p| p.uid.clone())
                    .collect(),
                slices: hash_of(snapshot.slice_versions.iter().cloned()),
                nodes: hash_of(snapshot.node_versions.iter().cloned()),
                classes: hash_of(snapshot.class_versions.iter().cloned()),
            },
            now,
        );

        let mut pending: Vec<(Option<k8s_openapi::jiff::Timestamp>, String, usize)> = views
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                ours.contains(&v.uid)
                    && v.allocation.is_none()
                    && !v.deleting
                    && !bound.contains(&(v.namespace.clone(), v.name.clone()))
                    && waiting.contains_key(&(v.namespace.clone(), v.name.clone()))
            })
            .map(|(i, v)| {
                let created = objects
                    .get(&v.uid)
                    .and_then(|o| o.meta().creation_timestamp.as_ref().map(|t| t.0));
                (created, v.key(), i)
            })
            .collect();
        // Oldest first, then by name: deterministic, and fair to claims that waited longest.
        pending.sort();

        let inputs = Inputs {
            nodes: snapshot.nodes,
            slices: snapshot.slices,
            classes: snapshot.classes,
            claims: views
                .iter()
                .filter(|v| v.allocation.is_some())
                .cloned()
                .collect(),
            pods: snapshot.pods.clone(),
        };
        let mut engine = Engine::new(&self.driver, &inputs, self.policies);

        for (_, key, i) in pending {
            let view = &views[i];
            if !self.book.due(&view.uid, now) {
                report.deferred += 1;
                continue;
            }
            if !self.leadership.is_leading() {
                break;
            }
            let pod = waiting
                .get(&(view.namespace.clone(), view.name.clone()))
                .copied();
            let avoid = self.book.avoid(&view.uid);
            let started = std::time::Instant::now();
            let decision = engine.allocate(view, pod, &avoid);
            self.metrics
                .decision_seconds
                .observe(started.elapsed().as_secs_f64());
            let Some(object) = objects.get(&view.uid) else {
                continue;
            };
            match decision {
                Ok(allocation) => {
                    let node = allocation.node_name.clone().unwrap_or_default();
                    match self.write(object.as_ref(), &allocation).await {
                        Ok(Written::Stored(rv)) => {
                            engine.commit(&allocation);
                            self.book.assume(&view.uid, rv, allocation.clone());
                            self.book.succeeded(&view.uid);
                            // Known allocated from now on, even if the scheduler clears it
                            // before a pass sees the write echoed back by the watch.
                            self.book.last_node.insert(view.uid.clone(), node.clone());
                            self.metrics.allocated.inc();
                            tracing::info!(claim = %key, node = %node, devices = ?allocation.results.iter().map(|r| r.device.as_str()).collect::<Vec<_>>(), "allocated");
                            self.event(
                                object.as_ref(),
                                EventType::Normal,
                                "Allocated",
                                &format!(
                                    "allocated {} on node {node}",
                                    allocation
                                        .results
                                        .iter()
                                        .map(|r| r.device.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            )
                            .await;
                            report.allocated.push((key, node));
                        }
                        Ok(Written::AlreadyAllocated) | Ok(Written::Gone) => {
                            // The next pass sees the claim as it is now.
                            self.book.succeeded(&view.uid);
                        }
                        Ok(Written::NotLeader) => break,
                        Ok(Written::Conflicted) => {
                            self.book
                                .failed(&view.uid, "write conflicts", self.backoff, now);
                        }
                        Err(e) => {
                            tracing::warn!(claim = %key, error = %e, "writing the allocation failed");
                            self.book
                                .failed(&view.uid, &format!("write: {e}"), self.backoff, now);
                        }
                    }
                }
                Err(Refusal::NotOurs(_)) => {}
                Err(refusal) => {
                    let (label, reason) = match &refusal {
                        Refusal::Invalid(r) => ("invalid", r.clone()),
                        Refusal::Unschedulable(r) | Refusal::NotOurs(r) => {
                            ("unschedulable", r.clone())
                        }
                    };
                    // Nodes the scheduler rejected may be the only ones left: forget them so
                    // the next attempt can try them again rather than waiting forever.
                    self.book.avoid.remove(&view.uid);
                    self.metrics
                        .refused
                        .get_or_create(&RefusalLabels {
                            reason: label.into(),
                        })
                        .inc();
                    let new_reason = self.book.failed(&view.uid, &reason, self.backoff, now);
                    tracing::info!(claim = %key, reason = %reason, "cannot allocate");
                    if new_reason {
                        let event_reason = if label == "invalid" {
                            "InvalidClaim"
                        } else {
                            "FailedAllocation"
                        };
                        self.event(object.as_ref(), EventType::Warning, event_reason, &reason)
                            .await;
                    }
                    report.refused.push((key, reason));
                }
            }
        }
        self.metrics.observe_state(&engine.state);
        for gpu in &engine.state.gpus {
            report.usage.insert(
                (
                    engine.state.nodes[gpu.node].view.name.clone(),
                    gpu.device.name.clone(),
                ),
                (gpu.used.memory_bytes, gpu.used.cores, gpu.holders),
            );
        }
        report.next_retry = self.book.next_retry();
        report
    }

    /// Add the delete-protection finalizer (Update), then write status.allocation in one
    /// status update carrying the claim's resourceVersion. A conflict re-reads the claim: if
    /// someone allocated it meanwhile nothing is written, otherwise the same allocation (the
    /// claim's spec is immutable, and this pass already charged it) is retried.
    async fn write<C: ClaimObject>(
        &self,
        cached: &C,
        allocation: &ClaimAllocation,
    ) -> Result<Written, kube::Error> {
        let namespace = cached.namespace().unwrap_or_default();
        let name = cached.name_any();
        let uid = cached.uid();
        let api: Api<C> = Api::namespaced(self.client.clone(), &namespace);
        let mut current = cached.clone();
        for attempt in 0..MAX_WRITE_ATTEMPTS {
            if attempt > 0 {
                match api.get_opt(&name).await? {
                    Some(c) => current = c,
                    None => return Ok(Written::Gone),
                }
            }
            if current.uid() != uid || current.meta().deletion_timestamp.is_some() {
                return Ok(Written::Gone);
            }
            if current.is_allocated() {
                return Ok(Written::AlreadyAllocated);
            }
            if !self.leadership.is_leading() {
                return Ok(Written::NotLeader);
            }
            if !current.finalizers().iter().any(|f| f == DELETE_PROTECTION) {
                current.finalizers_mut().push(DELETE_PROTECTION.to_string());
                current = match api.replace(&name, &PostParams::default(), &current).await {
                    Ok(c) => c,
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        self.metrics.conflicts.inc();
                        tracing::debug!(claim = %format!("{namespace}/{name}"), "conflict adding the finalizer; re-reading");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            }
            current.set_allocation(allocation);
            match api
                .replace_status(&name, &PostParams::default(), &current)
                .await
            {
                Ok(stored) => {
                    return Ok(Written::Stored(
                        stored.resource_version().unwrap_or_default(),
                    ));
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    self.metrics.conflicts.inc();
                    tracing::debug!(claim = %format!("{namespace}/{name}"), "conflict writing the allocation; re-reading");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Written::Conflicted)
    }

    async fn event<C: ClaimObject>(&self, claim: &C, kind: EventType, reason: &str, note: &str) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        // Event notes are limited to 1 kB.
        let mut note = note.to_string();
        if note.len() > 1000 {
            let mut end = 997;
            while !note.is_char_boundary(end) {
                end -= 1;
            }
            note.truncate(end);
            note.push_str("...");
        }
        let event = Event {
            type_: kind,
            reason: reason.to_string(),
            note: Some(note),
            action: "Allocate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &claim_reference(claim)).await {
            tracing::warn!(claim = %claim.name_any(), error = %e, "publishing an Event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_driver::AllocatedDevice;

    fn view(uid: &str, rv: &str, node: Option<&str>) -> ClaimView {
        ClaimView {
            namespace: "ml".into(),
            name: uid.into(),
            uid: uid.into(),
            resource_version: Some(rv.into()),
            requests: vec![],
            constraints: vec![],
            config: vec![],
            allocation: node.map(allocation),
            deleting: false,
            reserved_for: vec![],
            finalizers: vec![],
        }
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
        book.assume("a", "10".into(), allocation("n1"));
        // The cache still shows version 9, unallocated: the write is assumed.
        let mut views = vec![view("a", "9", None)];
        book.overlay_assumed(&mut views, Instant::now());
        assert_eq!(views[0].allocation, Some(allocation("n1")));
        // Version 10 arrived (allocated): the cache wins from now on.
        let mut views = vec![view("a", "10", Some("n1"))];
        book.overlay_assumed(&mut views, Instant::now());
        assert!(book.assumed.is_empty());
        // A cache past our write without an allocation means it was cleared since.
        book.assume("a", "10".into(), allocation("n1"));
        let mut views = vec![view("a", "11", None)];
        book.overlay_assumed(&mut views, Instant::now());
        assert_eq!(views[0].allocation, None);
        // An assumption expires.
        book.assume("a", "10".into(), allocation("n1"));
        tokio::time::advance(ASSUME_FOR + Duration::from_secs(1)).await;
        let mut views = vec![view("a", "9", None)];
        book.overlay_assumed(&mut views, Instant::now());
        assert_eq!(views[0].allocation, None);
    }

    #[test]
    fn a_cleared_allocation_with_a_waiting_pod_marks_the_node_to_avoid() {
        let mut book = Book::default();
        let ours: HashSet<String> = ["a".to_string(), "b".to_string()].into();
        let waiting: HashSet<(String, String)> = [("ml".to_string(), "a".to_string())].into();
        let none = book.observe_clears(
            &[view("a", "1", Some("n1")), view("b", "1", Some("n2"))],
            &ours,
            &waiting,
        );
        assert!(none.is_empty());
        // a: cleared while its pod waits -> avoid n1; b: cleared with no pod waiting (KCM
        // deallocated it after its pod finished) -> nothing to avoid.
        let cleared = book.observe_clears(
            &[view("a", "2", None), view("b", "2", None)],
            &ours,
            &waiting,
        );
        assert_eq!(cleared, vec![("ml/a".to_string(), "n1".to_string())]);
        assert_eq!(book.avoid("a"), ["n1".to_string()].into());
        assert!(book.avoid("b").is_empty());
        // Not reported twice.
        assert!(
            book.observe_clears(&[view("a", "3", None)], &ours, &waiting)
                .is_empty()
        );
        // Forgotten with the claim.
        book.observe_clears(&[], &ours, &waiting);
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
            allocated: ["x".to_string()].into(),
            ..Default::default()
        };
        book.observe_capacity(f.clone(), t0);
        f.allocated.insert("y".into());
        book.observe_capacity(f.clone(), t0);
        assert!(!book.due("a", t0));
        f.allocated.remove("x");
        book.observe_capacity(f.clone(), t0);
        assert!(book.due("a", t0));
        book.succeeded("a");
        assert_eq!(book.next_retry(), None);
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
