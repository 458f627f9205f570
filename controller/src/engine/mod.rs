//! The allocation engine: given the cluster state rebuilt from the API server, choose a node
//! and GPUs for one claim under the node and GPU policies, topology preferences, selectors and
//! constraints. Pure: the controller loop and the simulator run the same code.

pub mod state;
pub mod topology;

use crate::cel::{CelDevice, CelEnv, CelError, LibraryError, Selector};
use crate::model::{
    ClaimView, ClassView, Count, NodeView, PodView, matches_node_selector, tolerates,
};
use state::{ClusterState, Holding, MASK_GPUS};
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use vgpu_driver::allocation::{AllocatedDevice, ClaimAllocation};
use vgpu_driver::capacity::NATIVE_MEMORY_STEP;
use vgpu_driver::config::{Policy, SliceConfig, Topology, effective_config_named};
use vgpu_driver::slice::{AttributeValue, SliceView};
use vgpu_driver::{Capacity, ConfigEntry, ConfigSource, SliceLimits};

/// Cluster-wide defaults; a claim's `scheduling` overrides them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policies {
    pub node: Policy,
    pub gpu: Policy,
    pub topology: Topology,
}

impl Default for Policies {
    /// HAMi's defaults: binpack nodes, spread over a node's GPUs; NVLink preferred.
    fn default() -> Self {
        Policies {
            node: Policy::Binpack,
            gpu: Policy::Spread,
            topology: Topology::Preferred,
        }
    }
}

/// Who places the slices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// This controller, with the policies and topology preferences.
    #[default]
    Controller,
    /// The kube-scheduler's own allocator with DRA consumable capacity (1.34+), as documented
    /// for 1.34/1.35: it has no placement policy of its own, so nodes are taken in name order
    /// (the scheduler's other scores, which see no GPUs, decide among feasible nodes; a
    /// simulator cannot know them), the first devices in slice order with the capacity free
    /// are taken, memory is rounded up to the published request policy's step, topology is
    /// not considered and opaque configuration does not steer placement.
    Native,
}

/// Why a claim was not allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// None of the claim's requests uses a class of ours: not the controller's business.
    #[error("not allocated by this controller: {0}")]
    NotOurs(String),
    /// The claim cannot be allocated as written (missing class, bad selector or config).
    #[error("{0}")]
    Invalid(String),
    /// No node has room now; retried when capacity changes.
    #[error("{0}")]
    Unschedulable(NoRoom),
}

/// Why a valid claim waits: what an admin has to change differs for each, so Events, metrics
/// and the simulator tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitReason {
    /// Some request has no node with enough GPUs matching its class and selectors, free or
    /// not: no amount of waiting helps; the selector, class or count must change.
    NoMatchingGpu,
    /// GPUs match, but only on nodes the pod may not run on (node selector, affinity, taints,
    /// cordon, CPU or memory, or nodes the scheduler rejected).
    NoEligibleNode,
    /// GPUs match on nodes the pod may use, but none has (or not enough have) the memory and
    /// cores free: waiting for other claims to end helps.
    InsufficientCapacity,
    /// Enough GPUs have room, but not enough of them on one node are mutual NVLink peers, as
    /// a Required topology demands.
    Topology,
}

impl WaitReason {
    /// The metric label value (Prometheus style).
    pub fn label(self) -> &'static str {
        match self {
            WaitReason::NoMatchingGpu => "no_matching_gpu",
            WaitReason::NoEligibleNode => "no_eligible_node",
            WaitReason::InsufficientCapacity => "insufficient_capacity",
            WaitReason::Topology => "topology",
        }
    }

    /// The name that starts an Event's note and the simulator's reason (Kubernetes style).
    pub fn name(self) -> &'static str {
        match self {
            WaitReason::NoMatchingGpu => "NoMatchingGpu",
            WaitReason::NoEligibleNode => "NoEligibleNode",
            WaitReason::InsufficientCapacity => "InsufficientCapacity",
            WaitReason::Topology => "TopologyUnsatisfiable",
        }
    }
}

/// A claim that is valid but cannot be placed now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NoRoom {
    pub reason: WaitReason,
    pub message: String,
}

/// Bytes as people write them in a claim: `2Gi`, `512Mi`, `1536Mi`; an amount that is no
/// whole number of KiB is printed in bytes with the unit spelt out.
pub fn format_bytes(bytes: u64) -> String {
    for (shift, unit) in [(40, "Ti"), (30, "Gi"), (20, "Mi"), (10, "Ki")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Inputs for one engine, version-neutral.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub nodes: Vec<NodeView>,
    pub slices: Vec<SliceView>,
    pub classes: Vec<ClassView>,
    pub claims: Vec<ClaimView>,
    pub pods: Vec<PodView>,
}

/// What an engine is built from, borrowed: [`Inputs`] with each view held as its owner
/// holds it.
pub struct Parts<'a, N, S, C, P> {
    pub nodes: &'a [N],
    pub slices: &'a [S],
    pub classes: &'a [ClassView],
    pub claims: &'a [C],
    pub pods: &'a [P],
}

/// How one alternative of a request is to be satisfied.
#[derive(Clone, Debug)]
struct AltPlan {
    result_name: String,
    class: String,
    count: Count,
    admin_access: bool,
    selectors: Vec<usize>,
    config: SliceConfig,
}

#[derive(Clone, Debug)]
struct RequestPlan {
    name: String,
    alternatives: Vec<AltPlan>,
}

/// What one request got on a node.
#[derive(Clone, Debug)]
struct Placed {
    result_name: String,
    class: String,
    admin_access: bool,
    gpus: Vec<(usize, SliceLimits)>,
}

/// The allocator.
pub struct Engine {
    pub state: ClusterState,
    classes: HashMap<String, ClassView>,
    policies: Policies,
    mode: Mode,
    selector_ids: HashMap<String, usize>,
    selectors: Vec<Result<Selector, CelError>>,
    /// One CEL library for every evaluation of this engine.
    cel: Result<CelEnv, LibraryError>,
    /// Per selector, per GPU: 0 not evaluated, 1 matches, 2 does not, 3 failed.
    matches: Vec<Vec<u8>>,
    /// Per set of selectors, per node: how many of its GPUs match them all, free or not.
    /// Explaining a refusal needs it for every node; it holds as long as the GPU table, which
    /// is the engine's whole life.
    match_counts: HashMap<Vec<usize>, Vec<u32>>,
    /// Per selector, per node: the node-local positions of the GPUs it matches, or
    /// [`MASK_UNKNOWN`] until a decision needs it (for nodes without masks, never computed).
    node_matches: Vec<Vec<u64>>,
    /// Whether decisions first look only at the nodes the indexes cannot rule out; off, every
    /// node is tried (the reference the property tests compare against).
    indexed: bool,
}

/// Not computed yet; no node mask has all 64 bits set, as nodes with masks have at most
/// [`MASK_GPUS`] GPUs.
const MASK_UNKNOWN: u64 = u64::MAX;

/// How many nodes [`Engine::first_fit`] reads from the utilisation index at a time.
const BATCH: usize = 32;

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;
const FAILED: u8 = 3;

impl Engine {
    pub fn new(driver: &str, inputs: &Inputs, policies: Policies) -> Engine {
        Engine::of(
            driver,
            Parts {
                nodes: &inputs.nodes,
                slices: &inputs.slices,
                classes: &inputs.classes,
                claims: &inputs.claims,
                pods: &inputs.pods,
            },
            policies,
        )
    }

    /// As [`Engine::new`], from views held in any way (the controller's caches share theirs).
    pub fn of<N, S, C, P>(driver: &str, parts: Parts<'_, N, S, C, P>, policies: Policies) -> Engine
    where
        N: Borrow<NodeView>,
        S: Borrow<SliceView>,
        C: Borrow<ClaimView>,
        P: Borrow<PodView>,
    {
        Engine {
            state: ClusterState::build(driver, parts.nodes, parts.slices, parts.claims, parts.pods),
            classes: parts
                .classes
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            policies,
            mode: Mode::Controller,
            selector_ids: HashMap::new(),
            selectors: Vec::new(),
            cel: CelEnv::new(),
            matches: Vec::new(),
            match_counts: HashMap::new(),
            node_matches: Vec::new(),
            indexed: true,
        }
    }

    /// Tries every node on every decision instead of first the nodes the indexes leave: the
    /// same decisions, slower. For tests that check the indexes change nothing.
    #[doc(hidden)]
    pub fn without_indexes(mut self) -> Self {
        self.indexed = false;
        self
    }

    pub fn driver(&self) -> &str {
        &self.state.driver
    }

    pub fn policies(&self) -> Policies {
        self.policies
    }

    /// Places like `mode` from now on.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Distinct selector expressions compiled so far, each with a result slot per GPU.
    pub fn selector_count(&self) -> usize {
        self.selectors.len()
    }

    /// Whether the claim uses one of our (controller-allocated) classes.
    pub fn is_ours(&self, claim: &ClaimView) -> bool {
        claim
            .requests
            .iter()
            .flat_map(|r| &r.alternatives)
            .any(|a| {
                self.classes
                    .get(&a.class)
                    .is_some_and(|c| c.ours || self.mode == Mode::Native)
            })
    }

    fn selector_id(&mut self, expression: &str) -> usize {
        if let Some(&id) = self.selector_ids.get(expression) {
            return id;
        }
        self.selectors.push(Selector::compile(expression));
        self.matches.push(vec![UNKNOWN; self.state.gpus.len()]);
        self.node_matches
            .push(vec![MASK_UNKNOWN; self.state.nodes.len()]);
        let id = self.selectors.len() - 1;
        self.selector_ids.insert(expression.to_string(), id);
        id
    }

    fn matches(&mut self, selector: usize, gpu: usize) -> Result<bool, CelError> {
        match self.matches[selector][gpu] {
            YES => return Ok(true),
            NO => return Ok(false),
            _ => {}
        }
        let state = &mut self.state;
        let device = &mut state.gpus[gpu];
        let outcome = match (&self.selectors[selector], &self.cel) {
            (Ok(s), Ok(env)) => {
                let cel = device
                    .cel
                    .get_or_insert_with(|| CelDevice::of(&state.driver, &device.device));
                s.evaluate(env, cel)
            }
            (Ok(s), Err(e)) => Err(CelError::Runtime {
                expression: s.expression.clone(),
                device: device.device.name.clone(),
                message: e.to_string(),
            }),
            (Err(e), _) => Err(e.clone()),
        };
        self.matches[selector][gpu] = match &outcome {
            Ok(true) => YES,
            Ok(false) => NO,
            Err(_) => FAILED,
        };
        outcome
    }

    fn plan(&mut self, claim: &ClaimView) -> Result<(Vec<RequestPlan>, Policies), Refusal> {
        if !self.is_ours(claim) {
            return Err(Refusal::NotOurs(format!(
                "ResourceClaim {} uses no class allocated by the vgpu controller",
                claim.key()
            )));
        }
        if claim.requests.is_empty() {
            return Err(Refusal::Invalid(format!(
                "ResourceClaim {}: spec.devices.requests is empty",
                claim.key()
            )));
        }
        let driver = self.state.driver.clone();
        let mut plans = Vec::new();
        let mut policies = self.policies;
        let mut overridden = (false, false, false);
        for request in &claim.requests {
            let mut alternatives = Vec::new();
            for alt in &request.alternatives {
                let class = self.classes.get(&alt.class).cloned().ok_or_else(|| {
                    Refusal::Invalid(format!(
                        "ResourceClaim {}: request {}: device class {} does not exist",
                        claim.key(),
                        alt.result_name,
                        alt.class
                    ))
                })?;
                if !class.ours && self.mode == Mode::Controller {
                    return Err(Refusal::Invalid(format!(
                        "ResourceClaim {}: request {} uses device class {}, which the vgpu controller does not allocate; a claim cannot mix it with GPU-slice classes",
                        claim.key(),
                        alt.result_name,
                        alt.class
                    )));
                }
                let mut entries: Vec<ConfigEntry> = class
                    .config
                    .iter()
                    .map(|c| ConfigEntry {
                        requests: vec![alt.result_name.clone()],
                        ..c.clone()
                    })
                    .collect();
                entries.extend(claim.config.iter().cloned());
                let mut config =
                    effective_config_named(&entries, &driver, &alt.result_name, |source, i| {
                        match source {
                            ConfigSource::FromClaim => format!("spec.devices.config[{i}]"),
                            ConfigSource::FromClass => {
                                format!("DeviceClass {} spec.config[{i}]", alt.class)
                            }
                        }
                    })
                    .map_err(|e| Refusal::Invalid(format!("ResourceClaim {}: {e}", claim.key())))?;
                apply_capacity_requests(&mut config, &alt.capacity).map_err(|e| {
                    Refusal::Invalid(format!(
                        "ResourceClaim {}: request {}: capacity.requests.{e}",
                        claim.key(),
                        alt.result_name
                    ))
                })?;
                if let Some(p) = config.scheduling.node_policy.filter(|_| !overridden.0) {
                    policies.node = p;
                    overridden.0 = true;
                }
                if let Some(p) = config.scheduling.gpu_policy.filter(|_| !overridden.1) {
                    policies.gpu = p;
                    overridden.1 = true;
                }
                if let Some(t) = config.scheduling.topology.filter(|_| !overridden.2) {
                    policies.topology = t;
                    overridden.2 = true;
                }
                let mut selectors = Vec::new();
                for expr in class.selectors.iter().chain(&alt.selectors) {
                    let id = self.selector_id(expr);
                    if let Err(e) = &self.selectors[id] {
                        return Err(Refusal::Invalid(format!(
                            "ResourceClaim {}: request {}: {e}",
                            claim.key(),
                            alt.result_name
                        )));
                    }
                    selectors.push(id);
                }
                if let Count::Exact(0) = alt.count {
                    return Err(Refusal::Invalid(format!(
                        "ResourceClaim {}: request {}: count must be at least 1",
                        claim.key(),
                        alt.result_name
                    )));
                }
                alternatives.push(AltPlan {
                    result_name: alt.result_name.clone(),
                    class: alt.class.clone(),
                    count: alt.count,
                    admin_access: alt.admin_access,
                    selectors,
                    config,
                });
            }
            plans.push(RequestPlan {
                name: request.name.clone(),
                alternatives,
            });
        }
        if self.mode == Mode::Native {
            policies.topology = Topology::None;
        }
        Ok((plans, policies))
    }

    /// Choose a node and GPUs for `claim` (used by `pod` when known), never one of `avoid`.
    /// Nothing is charged until [`Engine::commit`].
    pub fn allocate(
        &mut self,
        claim: &ClaimView,
        pod: Option<&PodView>,
        avoid: &BTreeSet<String>,
    ) -> Result<ClaimAllocation, Refusal> {
        if claim.allocation.is_some() {
            return Err(Refusal::Invalid(format!(
                "ResourceClaim {} is already allocated",
                claim.key()
            )));
        }
        let (plans, policies) = self.plan(claim)?;
        if self.indexed
            && let Some(allocation) = self.first_fit(claim, pod, avoid, &plans, policies)
        {
            return Ok(allocation);
        }
        let order: Vec<usize> = match policies.node {
            _ if self.mode == Mode::Native => {
                let mut by_name: Vec<usize> = (0..self.state.nodes.len()).collect();
                by_name.sort_by(|a, b| {
                    self.state.nodes[*a]
                        .view
                        .name
                        .cmp(&self.state.nodes[*b].view.name)
                });
                by_name
            }
            Policy::Binpack => self
                .state
                .by_utilisation
                .iter()
                .rev()
                .map(|&(_, n)| n)
                .collect(),
            Policy::Spread => self.state.by_utilisation.iter().map(|&(_, n)| n).collect(),
        };
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut first_error: Option<String> = None;
        let total_nodes = order.len();
        let needs: Vec<(u64, u32)> = plans.iter().map(minimum_need).collect();
        let mut skipped = vec![0usize; plans.len()];
        for n in order {
            if let Some(reason) = self.node_rejects(n, pod, avoid) {
                *reasons.entry(reason).or_default() += 1;
                continue;
            }
            // The per-node index: a node whose roomiest GPU is too small is skipped unseen.
            let node = &self.state.nodes[n];
            if let Some(r) = needs.iter().position(|&(memory, cores)| {
                node.max_free_memory < memory || node.max_free_cores < cores
            }) {
                // Counted here, described once after the loop: formatting per node would
                // dominate a refusal over a large cluster.
                skipped[r] += 1;
                continue;
            }
            match self.place_on_node(n, &plans, claim, policies, &mut first_error) {
                Ok(placed) => return Ok(self.allocation_of(claim, n, placed)),
                Err(reason) => *reasons.entry(reason).or_default() += 1,
            }
        }
        for (r, count) in skipped.into_iter().enumerate().filter(|(_, c)| *c > 0) {
            let reason = describe_shortfall(&plans[r].alternatives[0], 0, policies.topology);
            *reasons.entry(reason).or_default() += count;
        }
        let mut message = format!(
            "0/{total_nodes} nodes with {} GPUs are available",
            self.state.driver
        );
        if !reasons.is_empty() {
            let parts: Vec<String> = reasons
                .iter()
                .map(|(r, c)| format!("{c} {}: {r}", if *c == 1 { "node" } else { "nodes" }))
                .collect();
            message.push_str(": ");
            message.push_str(&parts.join("; "));
        }
        if let Some(e) = first_error {
            message.push_str(&format!(" (selector error: {e})"));
        }
        let (reason, headline) = self.explain(&plans, pod, avoid, policies);
        Err(Refusal::Unschedulable(NoRoom {
            reason,
            message: format!(
                "ResourceClaim {}: {}: {headline}. {message}",
                claim.key(),
                reason.name()
            ),
        }))
    }

    /// Why no node took the claim, in the terms an admin acts on. Runs on refusals only, so
    /// it may look at every GPU; the search above stops at the first node that fits and
    /// skips nodes wholesale, which leaves it no global view.
    fn explain(
        &mut self,
        plans: &[RequestPlan],
        pod: Option<&PodView>,
        avoid: &BTreeSet<String>,
        policies: Policies,
    ) -> (WaitReason, String) {
        let eligible: Vec<bool> = (0..self.state.nodes.len())
            .map(|n| self.node_rejects(n, pod, avoid).is_none())
            .collect();
        let none = BTreeSet::new();
        for alt in plans.iter().flat_map(|p| &p.alternatives) {
            if !self.match_counts.contains_key(&alt.selectors) {
                let counts = (0..self.state.nodes.len())
                    .map(|n| self.matching_count(n, alt, &none) as u32)
                    .collect();
                self.match_counts.insert(alt.selectors.clone(), counts);
            }
        }
        let mut worst: Option<(WaitReason, String)> = None;
        for plan in plans {
            // The most hopeful alternative speaks for the request: the first that fits alone,
            // else the one that got furthest.
            let mut best: Option<(WaitReason, String)> = None;
            let mut fits_alone = false;
            for alt in &plan.alternatives {
                let need = match alt.count {
                    Count::Exact(k) => k as usize,
                    Count::All => 1,
                };
                let (mut matching, mut most_matching) = (0usize, 0usize);
                let (mut matching_eligible, mut most_eligible) = (0usize, 0usize);
                let (mut roomy, mut most_roomy) = (0usize, 0usize);
                let mut clique = false;
                let mut scratch = None;
                let (need_memory, need_cores) = alt_need(alt);
                let counts = self
                    .match_counts
                    .get(&alt.selectors)
                    .cloned()
                    .unwrap_or_default();
                for (n, m) in counts.into_iter().enumerate() {
                    let m = m as usize;
                    matching += m;
                    most_matching = most_matching.max(m);
                    if !eligible.get(n).copied().unwrap_or(false) || m == 0 {
                        continue;
                    }
                    matching_eligible += m;
                    most_eligible = most_eligible.max(m);
                    // The per-node index: no GPU of the node has room, without looking.
                    let node = &self.state.nodes[n];
                    if node.max_free_memory < need_memory || node.max_free_cores < need_cores {
                        continue;
                    }
                    let mut candidates = self.candidates(n, alt, &none, &mut scratch);
                    roomy += candidates.len();
                    most_roomy = most_roomy.max(candidates.len());
                    if candidates.len() >= need && !clique {
                        self.order(&mut candidates, policies.gpu);
                        clique = self.pick(&candidates, need, policies.topology).is_some();
                    }
                }
                let class = &alt.class;
                let found = if most_matching < need {
                    (
                        WaitReason::NoMatchingGpu,
                        if matching == 0 {
                            format!(
                                "request {}: no GPU matches device class {class} and the request's selectors ({} GPUs checked)",
                                alt.result_name,
                                self.state.gpus.len()
                            )
                        } else {
                            format!(
                                "request {} wants {need} GPUs matching device class {class} and its selectors; {matching} match, at most {most_matching} on one node",
                                alt.result_name
                            )
                        },
                    )
                } else if most_eligible < need {
                    (
                        WaitReason::NoEligibleNode,
                        format!(
                            "request {}: {matching} GPUs match, but {} on nodes the pod may run on",
                            alt.result_name,
                            if matching_eligible == 0 {
                                "none".to_string()
                            } else {
                                format!("at most {most_eligible} on one node")
                            }
                        ),
                    )
                } else if most_roomy < need {
                    (
                        WaitReason::InsufficientCapacity,
                        format!(
                            "request {} needs {} with {}: {matching_eligible} GPUs match on nodes the pod may run on, {}",
                            alt.result_name,
                            gpus_wanted(alt.count),
                            size_of(alt),
                            match roomy {
                                0 => "none has room".to_string(),
                                _ => format!(
                                    "{roomy} have room but at most {most_roomy} on one node"
                                ),
                            }
                        ),
                    )
                } else if !clique {
                    (
                        WaitReason::Topology,
                        format!(
                            "request {}: {most_roomy} GPUs on one node have {}, but no {need} of them are mutual NVLink peers (topology Required)",
                            alt.result_name,
                            size_of(alt)
                        ),
                    )
                } else {
                    fits_alone = true;
                    break;
                };
                // The alternative that got furthest speaks for the request.
                if best.as_ref().is_none_or(|(r, _)| found.0 > *r) {
                    best = Some(found);
                }
            }
            if fits_alone {
                continue;
            }
            // The request furthest from fitting speaks for the claim.
            if let Some(found) = best
                && worst.as_ref().is_none_or(|(r, _)| found.0 < *r)
            {
                worst = Some(found);
            }
        }
        worst.unwrap_or_else(|| {
            (
                WaitReason::InsufficientCapacity,
                "each request fits somewhere alone, but no node has room for all of them together under the claim's constraints".into(),
            )
        })
    }

    /// The node the full pass of [`Engine::allocate`] would choose, found by trying only the
    /// nodes the indexes cannot rule out, in the same order: that pass refuses every node
    /// ruled out here. `None`: no node takes the claim, and only the full pass says why.
    fn first_fit(
        &mut self,
        claim: &ClaimView,
        pod: Option<&PodView>,
        avoid: &BTreeSet<String>,
        plans: &[RequestPlan],
        policies: Policies,
    ) -> Option<ClaimAllocation> {
        let needs: Vec<(u64, u32)> = plans.iter().map(minimum_need).collect();
        let mut ignored = None;
        // The policy order is read from the utilisation index a batch at a time: a decision
        // usually stops after a few nodes, and copying the whole order of a large cluster
        // cost more than the rest of the decision.
        let mut batch: Vec<(u64, usize)> = Vec::with_capacity(BATCH);
        let mut after: Option<(u64, usize)> = None;
        let by_name = (self.mode == Mode::Native).then(|| {
            let mut order: Vec<usize> = (0..self.state.nodes.len()).collect();
            order.sort_by(|a, b| {
                self.state.nodes[*a]
                    .view
                    .name
                    .cmp(&self.state.nodes[*b].view.name)
            });
            order
        });
        let mut next_named = 0;
        loop {
            batch.clear();
            if let Some(order) = &by_name {
                let end = (next_named + BATCH).min(order.len());
                batch.extend(order[next_named..end].iter().map(|&n| (0, n)));
                next_named = end;
            } else {
                let index = &self.state.by_utilisation;
                match (policies.node, after) {
                    (Policy::Binpack, None) => batch.extend(index.iter().rev().take(BATCH)),
                    (Policy::Binpack, Some(k)) => batch.extend(index.range(..k).rev().take(BATCH)),
                    (Policy::Spread, None) => batch.extend(index.iter().take(BATCH)),
                    (Policy::Spread, Some(k)) => batch.extend(
                        index
                            .range((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))
                            .take(BATCH),
                    ),
                }
                after = batch.last().copied();
            }
            if batch.is_empty() {
                return None;
            }
            for &(_, n) in &batch {
                if !self.may_fit(n, plans, &needs, policies.topology)
                    || self.node_rejects(n, pod, avoid).is_some()
                {
                    continue;
                }
                if let Ok(placed) = self.place_on_node(n, plans, claim, policies, &mut ignored) {
                    return Some(self.allocation_of(claim, n, placed));
                }
            }
        }
    }

    /// Whether node `n` may take every request of the claim, from the node's indexes: `false`
    /// only when [`Engine::place_on_node`] would refuse it. Each request needs, for one of its
    /// alternatives, enough GPUs that match the selectors and have room (unused ones for an
    /// exclusive GPU), and for `topology: Required` that many pairwise NVLink peers among
    /// them. Constraints and the GPUs an earlier request takes only make the real test harder.
    fn may_fit(
        &mut self,
        n: usize,
        plans: &[RequestPlan],
        needs: &[(u64, u32)],
        topology: Topology,
    ) -> bool {
        let node = &self.state.nodes[n];
        if needs
            .iter()
            .any(|&(memory, cores)| node.max_free_memory < memory || node.max_free_cores < cores)
        {
            return false;
        }
        if node.masks.is_none() {
            return true;
        }
        plans.iter().all(|plan| {
            plan.alternatives
                .iter()
                .any(|alt| self.alt_may_fit(n, alt, topology))
        })
    }

    fn alt_may_fit(&mut self, n: usize, alt: &AltPlan, topology: Topology) -> bool {
        let wanted = match alt.count {
            Count::Exact(k) => k as usize,
            Count::All => 1,
        };
        let size = self.state.nodes[n].gpus.len();
        if size < wanted {
            return false;
        }
        let mut matching = if size == 0 {
            0
        } else {
            u64::MAX >> (64 - size)
        };
        for &s in &alt.selectors {
            matching &= self.node_matches(s, n);
            if (matching.count_ones() as usize) < wanted {
                return false;
            }
        }
        let Some(masks) = &self.state.nodes[n].masks else {
            return true;
        };
        let room = if alt.admin_access {
            matching
        } else if alt.config.exclusive == Some(true) {
            matching & masks.unused
        } else {
            // A lower bound of what `fit` asks (a percentage resolves per GPU, Native rounds
            // up): the GPUs without it cannot fit.
            let memory = match alt.config.memory {
                Some(vgpu_driver::config::MemoryRequest::Bytes(b)) => b,
                _ => 0,
            };
            masks.with_room(matching, memory, u32::from(alt.config.cores.unwrap_or(0)))
        };
        if (room.count_ones() as usize) < wanted {
            return false;
        }
        !(topology == Topology::Required && wanted > 1) || masks.has_clique(room, wanted)
    }

    /// The GPUs of node `n` that selector `s` matches, as node-local positions; evaluated once
    /// per node (failures count as no match: the full pass reports them).
    fn node_matches(&mut self, s: usize, n: usize) -> u64 {
        let known = self.node_matches[s][n];
        if known != MASK_UNKNOWN {
            return known;
        }
        let size = self.state.nodes[n].gpus.len();
        if size > MASK_GPUS {
            return known;
        }
        let mut mask = 0;
        for i in 0..size {
            let g = self.state.nodes[n].gpus[i];
            if let Ok(true) = self.matches(s, g) {
                mask |= 1 << i;
            }
        }
        self.node_matches[s][n] = mask;
        mask
    }

    fn node_rejects(
        &self,
        n: usize,
        pod: Option<&PodView>,
        avoid: &BTreeSet<String>,
    ) -> Option<String> {
        let node = &self.state.nodes[n];
        if avoid.contains(&node.view.name) {
            return Some("rejected by the scheduler before".into());
        }
        let pod = pod?;
        if let Some(bound) = &pod.node_name {
            return (bound != &node.view.name).then(|| "the pod is bound to another node".into());
        }
        if node.view.unschedulable {
            let taint = k8s_openapi::api::core::v1::Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            };
            if !tolerates(&pod.tolerations, &taint) {
                return Some("node is unschedulable".into());
            }
        }
        if !pod
            .node_selector
            .iter()
            .all(|(k, v)| node.view.labels.get(k) == Some(v))
        {
            return Some("node does not match the pod's nodeSelector".into());
        }
        if pod
            .affinity
            .as_ref()
            .is_some_and(|a| !matches_node_selector(a, &node.view))
        {
            return Some("node does not match the pod's required node affinity".into());
        }
        if let Some(t) = node.view.taints.iter().find(|t| {
            matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
                && !tolerates(&pod.tolerations, t)
        }) {
            return Some(format!("node has untolerated taint {}", t.key));
        }
        if node
            .view
            .cpu_millis
            .is_some_and(|cap| node.cpu_requested + pod.cpu_millis > cap)
        {
            return Some("insufficient cpu".into());
        }
        if node
            .view
            .memory_bytes
            .is_some_and(|cap| node.memory_requested + pod.memory_bytes > cap)
        {
            return Some("insufficient memory".into());
        }
        None
    }

    /// The slice an alternative takes of GPU `g`, if it fits there now.
    fn fit(&self, alt: &AltPlan, g: usize) -> Option<SliceLimits> {
        let gpu = &self.state.gpus[g];
        let mut limits = alt.config.resolve(gpu.total.memory_bytes).ok()?;
        if self.mode == Mode::Native && !limits.exclusive {
            // consumedCapacity is the request rounded up to the published step.
            limits.memory_bytes = limits
                .memory_bytes
                .div_ceil(NATIVE_MEMORY_STEP)
                .saturating_mul(NATIVE_MEMORY_STEP)
                .min(gpu.total.memory_bytes);
        }
        if alt.admin_access {
            return Some(limits);
        }
        if limits.exclusive {
            return (gpu.holders == 0 && gpu.used == Capacity::default()).then_some(limits);
        }
        if gpu.exclusive {
            return None;
        }
        let want = Capacity {
            memory_bytes: limits.memory_bytes,
            cores: u32::from(limits.cores),
        };
        gpu.total.fits(&gpu.used, &want).then_some(limits)
    }

    fn candidates(
        &mut self,
        n: usize,
        alt: &AltPlan,
        taken: &BTreeSet<usize>,
        first_error: &mut Option<String>,
    ) -> Vec<(usize, SliceLimits)> {
        let gpus = self.state.nodes[n].gpus.clone();
        let mut out = Vec::new();
        'gpu: for g in gpus {
            if taken.contains(&g) {
                continue;
            }
            for &s in &alt.selectors {
                match self.matches(s, g) {
                    Ok(true) => {}
                    Ok(false) => continue 'gpu,
                    Err(e) => {
                        first_error.get_or_insert_with(|| e.to_string());
                        continue 'gpu;
                    }
                }
            }
            if let Some(limits) = self.fit(alt, g) {
                out.push((g, limits));
            }
        }
        out
    }

    fn order(&self, candidates: &mut [(usize, SliceLimits)], policy: Policy) {
        if self.mode == Mode::Native {
            // First fit, in the order the devices are published.
            candidates.sort_by_key(|c| c.0);
            return;
        }
        let gpus = &self.state.gpus;
        candidates.sort_by(|a, b| {
            let (ua, ub) = (gpus[a.0].utilisation_ppm(), gpus[b.0].utilisation_ppm());
            let by_use = match policy {
                Policy::Binpack => ub.cmp(&ua),
                Policy::Spread => ua.cmp(&ub),
            };
            by_use.then(a.0.cmp(&b.0))
        });
    }

    /// Pick `count` GPUs from ordered candidates under the topology preference.
    fn pick(
        &self,
        candidates: &[(usize, SliceLimits)],
        count: usize,
        topology: Topology,
    ) -> Option<Vec<(usize, SliceLimits)>> {
        if candidates.len() < count {
            return None;
        }
        if count <= 1 {
            return candidates.first().map(|c| vec![*c]);
        }
        let gpus = &self.state.gpus;
        let clique = || -> Option<Vec<(usize, SliceLimits)>> {
            let found = topology::first_clique(candidates.len(), count, |a, b| {
                gpus[candidates[a].0].peers.contains(&candidates[b].0)
            })?;
            Some(found.into_iter().map(|i| candidates[i]).collect())
        };
        let one_numa = || -> Option<Vec<(usize, SliceLimits)>> {
            let mut groups: BTreeMap<i64, Vec<(usize, SliceLimits)>> = BTreeMap::new();
            for c in candidates {
                if let Some(numa) = gpus[c.0].numa {
                    groups.entry(numa).or_default().push(*c);
                }
            }
            // The group holding the best-ordered candidate first, keeping policy order inside.
            let mut best: Option<(usize, Vec<(usize, SliceLimits)>)> = None;
            for group in groups.into_values().filter(|g| g.len() >= count) {
                let rank = candidates
                    .iter()
                    .position(|c| c.0 == group[0].0)
                    .unwrap_or(usize::MAX);
                if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                    best = Some((rank, group));
                }
            }
            best.map(|(_, g)| g[..count].to_vec())
        };
        match topology {
            Topology::Required => clique(),
            Topology::Preferred => clique()
                .or_else(one_numa)
                .or_else(|| Some(candidates[..count].to_vec())),
            Topology::None => Some(candidates[..count].to_vec()),
        }
    }

    fn place_on_node(
        &mut self,
        n: usize,
        plans: &[RequestPlan],
        claim: &ClaimView,
        policies: Policies,
        first_error: &mut Option<String>,
    ) -> Result<Vec<Placed>, String> {
        // The first matchAttribute constraint is tried with every value present on the node,
        // so an early request's choice does not doom a later one.
        let constraint_values: Vec<Option<AttributeValue>> = match claim
            .constraints
            .iter()
            .find_map(|c| c.match_attribute.as_ref())
        {
            Some(attr) => {
                let mut values: Vec<AttributeValue> = self.state.nodes[n]
                    .gpus
                    .iter()
                    .filter_map(|&g| {
                        self.state.gpus[g]
                            .attribute(attr, &self.state.driver)
                            .cloned()
                    })
                    .collect();
                values.sort();
                values.dedup();
                if values.is_empty() {
                    return Err(format!("no GPU has attribute {attr}"));
                }
                values.into_iter().map(Some).collect()
            }
            None => vec![None],
        };
        let mut last_reason = String::from("no GPU fits");
        for pinned in constraint_values {
            match self.place_with(n, plans, claim, policies, pinned.as_ref(), first_error) {
                Ok(placed) => return Ok(placed),
                Err(reason) => last_reason = reason,
            }
        }
        Err(last_reason)
    }

    fn place_with(
        &mut self,
        n: usize,
        plans: &[RequestPlan],
        claim: &ClaimView,
        policies: Policies,
        pinned: Option<&AttributeValue>,
        first_error: &mut Option<String>,
    ) -> Result<Vec<Placed>, String> {
        let driver = self.state.driver.clone();
        let mut taken: BTreeSet<usize> = BTreeSet::new();
        let mut placed: Vec<Placed> = Vec::new();
        for plan in plans {
            let mut reason = None;
            let mut done = false;
            for alt in &plan.alternatives {
                let mut candidates = self.candidates(n, alt, &taken, first_error);
                // Constraints over the requests already placed and this one.
                for c in &claim.constraints {
                    let applies =
                        |r: &str| c.requests.is_empty() || c.requests.iter().any(|x| x == r);
                    if !applies(&plan.name) {
                        continue;
                    }
                    if let Some(attr) = &c.match_attribute {
                        let want = pinned
                            .cloned()
                            .filter(|_| {
                                claim
                                    .constraints
                                    .iter()
                                    .find_map(|c| c.match_attribute.as_ref())
                                    == Some(attr)
                            })
                            .or_else(|| {
                                placed
                                    .iter()
                                    .filter(|p| {
                                        applies(p.result_name.split('/').next().unwrap_or(""))
                                    })
                                    .flat_map(|p| p.gpus.iter())
                                    .find_map(|(g, _)| {
                                        self.state.gpus[*g].attribute(attr, &driver).cloned()
                                    })
                            });
                        candidates.retain(|(g, _)| {
                            let v = self.state.gpus[*g].attribute(attr, &driver);
                            v.is_some() && want.as_ref().is_none_or(|w| v == Some(w))
                        });
                    }
                    if let Some(attr) = &c.distinct_attribute {
                        let used: Vec<AttributeValue> = placed
                            .iter()
                            .filter(|p| applies(p.result_name.split('/').next().unwrap_or("")))
                            .flat_map(|p| p.gpus.iter())
                            .filter_map(|(g, _)| {
                                self.state.gpus[*g].attribute(attr, &driver).cloned()
                            })
                            .collect();
                        candidates.retain(|(g, _)| {
                            self.state.gpus[*g]
                                .attribute(attr, &driver)
                                .is_some_and(|v| !used.contains(v))
                        });
                    }
                }
                self.order(&mut candidates, policies.gpu);
                let chosen = match alt.count {
                    Count::All => (!candidates.is_empty()
                        && candidates.len() == self.matching_count(n, alt, &taken))
                    .then(|| candidates.clone()),
                    Count::Exact(k) => self.pick(&candidates, k as usize, policies.topology),
                };
                match chosen {
                    Some(gpus) => {
                        taken.extend(gpus.iter().map(|(g, _)| *g));
                        placed.push(Placed {
                            result_name: alt.result_name.clone(),
                            class: alt.class.clone(),
                            admin_access: alt.admin_access,
                            gpus,
                        });
                        done = true;
                        break;
                    }
                    None => {
                        reason.get_or_insert_with(|| {
                            describe_shortfall(alt, candidates.len(), policies.topology)
                        });
                    }
                }
            }
            if !done {
                return Err(
                    reason.unwrap_or_else(|| format!("request {} cannot be satisfied", plan.name))
                );
            }
        }
        Ok(placed)
    }

    /// How many GPUs of the node match an alternative's selectors (for allocationMode All).
    fn matching_count(&mut self, n: usize, alt: &AltPlan, taken: &BTreeSet<usize>) -> usize {
        let gpus = self.state.nodes[n].gpus.clone();
        gpus.into_iter()
            .filter(|g| !taken.contains(g))
            .filter(|&g| {
                alt.selectors
                    .iter()
                    .all(|&s| matches!(self.matches(s, g), Ok(true)))
            })
            .count()
    }

    fn allocation_of(&self, claim: &ClaimView, n: usize, placed: Vec<Placed>) -> ClaimAllocation {
        let driver = self.state.driver.clone();
        // Sized exactly: an allocation is kept (assumed, then cached) for the claim's life.
        let mut results = Vec::with_capacity(placed.iter().map(|p| p.gpus.len()).sum());
        let mut class_requests: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in &placed {
            class_requests
                .entry(p.class.clone())
                .or_default()
                .push(p.result_name.clone());
            for (g, limits) in &p.gpus {
                let gpu = &self.state.gpus[*g];
                let (share_id, consumed_capacity) = match self.mode {
                    Mode::Controller => (None, BTreeMap::new()),
                    // What the kube-scheduler writes for a share of a device.
                    Mode::Native => (
                        Some(share_id(&claim.key(), results.len())),
                        native_consumption(limits),
                    ),
                };
                results.push(AllocatedDevice {
                    request: p.result_name.clone(),
                    driver: driver.clone(),
                    pool: gpu.pool.clone(),
                    device: gpu.device.name.clone(),
                    admin_access: p.admin_access,
                    share_id,
                    consumed_capacity,
                });
            }
        }
        // The scheduler's layout: every class's configuration for the requests that used it
        // (source FromClass), then the claim's own (FromClaim).
        let mut config = Vec::new();
        for (class, requests) in class_requests {
            if let Some(c) = self.classes.get(&class) {
                for entry in &c.config {
                    config.push(ConfigEntry {
                        source: ConfigSource::FromClass,
                        requests: requests.clone(),
                        ..entry.clone()
                    });
                }
            }
        }
        config.extend(claim.config.iter().cloned());
        config.shrink_to_fit();
        ClaimAllocation {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            uid: claim.uid.clone(),
            results,
            config,
            node_name: Some(self.state.nodes[n].view.name.clone()),
        }
    }

    /// Charge an allocation (ours or anyone's) to the GPUs it names.
    pub fn commit(&mut self, allocation: &ClaimAllocation) {
        let holdings: Vec<Holding> = self.state.holdings_of(allocation);
        self.state.charge(&allocation.uid, holdings);
    }

    /// Bring the engine up to the allocated `claims` and `pods` of a cluster whose nodes,
    /// slices and classes are those it was built from: charges and releases only what
    /// changed, and keeps the compiled selectors and their results per GPU, which stay true
    /// while the devices are the same.
    pub fn resync(&mut self, claims: &[impl Borrow<ClaimView>], pods: &[impl Borrow<PodView>]) {
        self.state.resync(claims, pods);
    }

    /// Give back what a claim held (deallocated or deleted).
    pub fn release(&mut self, uid: &str) {
        self.state.release(uid);
    }
}

/// `capacity.requests` (how a native claim asks for a share) over the configuration: the same
/// slice whichever way it was asked for.
fn apply_capacity_requests(
    config: &mut SliceConfig,
    requests: &BTreeMap<String, String>,
) -> Result<(), String> {
    use vgpu_driver::capacity::{CORES, MEMORY};
    use vgpu_driver::config::MemoryRequest;
    use vgpu_driver::quantity::Quantity;
    if let Some(memory) = requests.get(MEMORY) {
        let bytes = Quantity::parse(memory)
            .ok()
            .and_then(|q| q.to_bytes())
            .filter(|b| *b > 0)
            .ok_or_else(|| format!("{MEMORY}: {memory:?} is not a positive number of bytes"))?;
        config.memory = Some(MemoryRequest::Bytes(bytes));
    }
    if let Some(cores) = requests.get(CORES) {
        let value = Quantity::parse(cores)
            .ok()
            .map(|q| q.ceil_units())
            .filter(|c| (0..=100).contains(c))
            .ok_or_else(|| format!("{CORES}: {cores:?} is not a percentage from 0 to 100"))?;
        config.cores = Some(value as u8);
    }
    Ok(())
}

/// A UID for the `index`-th share of a claim, stable across runs of the simulator (the
/// kube-scheduler generates a random one).
fn share_id(claim: &str, index: usize) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in claim.bytes().chain(index.to_le_bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        hash >> 32,
        (hash >> 16) & 0xffff,
        hash & 0xfff,
        (hash >> 20) & 0xfff,
        hash & 0xffff_ffff_ffff
    )
}

/// consumedCapacity of a native share: every capacity of the device, as the scheduler fills it.
fn native_consumption(limits: &SliceLimits) -> BTreeMap<String, vgpu_driver::quantity::Quantity> {
    let quantity =
        |v: u64| vgpu_driver::quantity::Quantity::parse(&v.to_string()).expect("an integer");
    BTreeMap::from([
        (
            vgpu_driver::capacity::MEMORY.to_string(),
            quantity(limits.memory_bytes),
        ),
        (
            vgpu_driver::capacity::CORES.to_string(),
            quantity(u64::from(limits.cores)),
        ),
    ])
}

/// What any GPU must have free for some alternative of a request to fit on it: a lower
/// bound, (0, 0) when it depends on the GPU (percentages, whole-GPU memory, exclusivity).
fn minimum_need(plan: &RequestPlan) -> (u64, u32) {
    plan.alternatives
        .iter()
        .map(alt_need)
        // Component-wise: any alternative may be the one that fits.
        .reduce(|a, b| (a.0.min(b.0), a.1.min(b.1)))
        .unwrap_or((0, 0))
}

/// What any GPU must have free for one alternative to fit on it: a lower bound, (0, 0) when
/// it depends on the GPU.
fn alt_need(alt: &AltPlan) -> (u64, u32) {
    if alt.admin_access || alt.config.exclusive == Some(true) {
        return (0, 0);
    }
    let memory = match alt.config.memory {
        Some(vgpu_driver::config::MemoryRequest::Bytes(b)) => b,
        _ => 0,
    };
    (memory, u32::from(alt.config.cores.unwrap_or(0)))
}

/// `1 GPU`, `4 GPUs`, `all matching GPUs`.
fn gpus_wanted(count: Count) -> String {
    match count {
        Count::Exact(1) => "1 GPU".into(),
        Count::Exact(k) => format!("{k} GPUs"),
        Count::All => "all matching GPUs".into(),
    }
}

/// What one GPU must have free: `2Gi and 20% cores free`, or `nothing else on it`.
fn size_of(alt: &AltPlan) -> String {
    if alt.config.exclusive == Some(true) {
        return "nothing else on it (exclusive)".to_string();
    }
    let memory = match alt.config.memory {
        Some(vgpu_driver::config::MemoryRequest::Bytes(b)) => format_bytes(b),
        Some(vgpu_driver::config::MemoryRequest::Percent(p)) => format!("{p}% of its memory"),
        None => "all its memory".into(),
    };
    match alt.config.cores {
        Some(cores) if cores > 0 => format!("{memory} and {cores}% cores free"),
        _ => format!("{memory} free"),
    }
}

fn describe_shortfall(alt: &AltPlan, found: usize, topology: Topology) -> String {
    let wanted = match alt.count {
        Count::Exact(k) => k.to_string(),
        Count::All => "all matching".into(),
    };
    let size = if alt.config.exclusive == Some(true) {
        "an unused GPU".to_string()
    } else {
        size_of(alt)
    };
    let topo = match (alt.count, topology) {
        (Count::Exact(k), Topology::Required) if k > 1 => " as NVLink peers",
        _ => "",
    };
    format!(
        "request {} needs {wanted} GPU(s) with {size}{topo}, {found} found",
        alt.result_name
    )
}
