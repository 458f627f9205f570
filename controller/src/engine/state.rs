//! The cluster as the allocator sees it: nodes with their GPUs, and what every allocated claim
//! holds of each GPU, rebuilt from the API objects alone.

use crate::cel::CelDevice;
use crate::model::{ClaimView, NodeView, PodView};
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use vgpu_driver::capacity::{CORES, MEMORY};
use vgpu_driver::slice::{AttributeValue, PublishedDevice, SliceView, nvlink_peer_names};
use vgpu_driver::{Capacity, SliceLimits};

/// One GPU of a node.
#[derive(Debug)]
pub struct GpuState {
    pub node: usize,
    pub pool: String,
    /// Shared with the slice it was published in.
    pub device: Arc<PublishedDevice>,
    /// The CEL `device` variable, built and converted once, when a selector is first
    /// evaluated on this GPU: a GPU no selector looks at never holds one.
    pub cel: Option<CelDevice>,
    pub total: Capacity,
    pub used: Capacity,
    /// Claims holding a part of this GPU (admin access excluded).
    pub holders: u32,
    pub exclusive: bool,
    /// Exclusive holdings: more than one only when the API shows an overbooked GPU, and then
    /// releasing one must leave the GPU exclusive, as a rebuild would.
    exclusive_holders: u32,
    pub numa: Option<i64>,
    /// NVLink peers on the same node (indices into the GPU table).
    pub peers: Vec<usize>,
}

impl GpuState {
    pub fn free(&self) -> Capacity {
        self.total.saturating_sub(&self.used)
    }

    /// Utilisation in parts per million, memory and cores weighted equally.
    pub fn utilisation_ppm(&self) -> u64 {
        let mem = if self.total.memory_bytes == 0 {
            0
        } else {
            (u128::from(self.used.memory_bytes.min(self.total.memory_bytes)) * 500_000
                / u128::from(self.total.memory_bytes)) as u64
        };
        let cores = if self.total.cores == 0 {
            0
        } else {
            u64::from(self.used.cores.min(self.total.cores)) * 500_000 / u64::from(self.total.cores)
        };
        mem + cores
    }

    pub fn attribute(&self, qualified: &str, driver: &str) -> Option<&AttributeValue> {
        // Attributes of the driver's own domain are published unprefixed.
        let local = qualified
            .strip_prefix(driver)
            .and_then(|s| s.strip_prefix('/'))
            .unwrap_or(qualified);
        self.device
            .attributes
            .get(local)
            .or_else(|| self.device.attributes.get(qualified))
    }
}

/// One node with a pool of our GPUs.
#[derive(Debug)]
pub struct NodeState {
    pub view: NodeView,
    pub gpus: Vec<usize>,
    pub cpu_requested: i128,
    pub memory_requested: i128,
    /// The most memory free on one shareable GPU of the node: a slice that needs more cannot
    /// fit anywhere on it, which lets a decision skip full nodes without looking at GPUs.
    pub max_free_memory: u64,
    /// The most cores free on one shareable GPU of the node.
    pub max_free_cores: u32,
    /// The bit-mask indexes below, over node-local positions (bit `i` is `gpus[i]`); only kept
    /// for nodes of at most [`MASK_GPUS`] GPUs, larger nodes are always looked at GPU by GPU.
    pub masks: Option<NodeMasks>,
}

/// The most GPUs a node may have for its bit-mask indexes: one bit each in a `u64`, and one
/// value (all ones) left over to mean "not computed yet" in the engine's selector masks.
pub const MASK_GPUS: usize = 63;

/// Per-node indexes that let a decision rule a node out without looking at its GPUs one by
/// one: which GPUs are unused, what each has free, and which are NVLink peers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeMasks {
    /// GPUs nothing holds: the only ones an exclusive GPU can be.
    pub unused: u64,
    /// Memory and cores free per GPU; nothing for an exclusive GPU, which no slice can share.
    pub free: Vec<(u64, u32)>,
    /// Per GPU, its NVLink peers that list it back (the topology search trusts no one-way link).
    pub peers: Vec<u64>,
    /// One more than the most peers any GPU has: no set of pairwise peers is larger, so a
    /// `topology: Required` request for more GPUs can never be placed on the node.
    pub clique_bound: usize,
}

impl NodeMasks {
    /// The GPUs of `within` with at least `memory` and `cores` free, not exclusive.
    pub fn with_room(&self, within: u64, memory: u64, cores: u32) -> u64 {
        let mut out = 0;
        let mut rest = within;
        while rest != 0 {
            let i = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            if let Some(&(m, c)) = self.free.get(i)
                && m >= memory
                && c >= cores
            {
                out |= 1 << i;
            }
        }
        out
    }

    /// Whether `count` GPUs of `within` are pairwise peers.
    pub fn has_clique(&self, within: u64, count: usize) -> bool {
        count <= self.clique_bound && has_clique(&self.peers, within, count)
    }
}

/// Whether `count` positions of `open` are pairwise linked in `peers`: a branch-and-bound over
/// bit sets. A position with fewer than `count - 1` peers left in `open` cannot be a member,
/// and a branch is cut when too few positions are left.
fn has_clique(peers: &[u64], open: u64, count: usize) -> bool {
    if count <= 1 {
        return open.count_ones() as usize >= count;
    }
    let linked = |v: usize| peers.get(v).copied().unwrap_or(0);
    let mut open = open;
    let mut rest = open;
    while rest != 0 {
        let v = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        if ((open & linked(v)).count_ones() as usize) < count - 1 {
            open &= !(1 << v);
        }
    }
    while open.count_ones() as usize >= count {
        let v = open.trailing_zeros() as usize;
        open &= open - 1;
        if has_clique(peers, open & linked(v), count - 1) {
            return true;
        }
    }
    false
}

/// What one claim holds of one GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holding {
    pub gpu: usize,
    pub limits: SliceLimits,
}

/// Nodes, GPUs and holdings.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// This state's build, unique in the process: states of one build have the same nodes
    /// and GPUs at the same indices (charges and releases change only their books).
    pub build: u64,
    pub driver: String,
    pub nodes: Vec<NodeState>,
    pub node_index: HashMap<String, usize>,
    pub gpus: Vec<GpuState>,
    pub gpu_index: HashMap<(String, String), usize>,
    pub holdings: HashMap<String, Vec<Holding>>,
    /// Nodes ordered by utilisation, kept current on every change.
    pub by_utilisation: BTreeSet<(u64, usize)>,
    node_utilisation: Vec<u64>,
}

/// The complete pools of `driver`: for each pool only its highest generation, and only when
/// every one of its `resourceSliceCount` slices is present (the scheduler's rule).
pub fn complete_pools<'a, S: Borrow<SliceView>>(
    driver: &str,
    slices: &'a [S],
) -> Vec<(&'a str, &'a str, Vec<&'a Arc<PublishedDevice>>)> {
    let mut newest: BTreeMap<&str, (i64, Vec<&SliceView>)> = BTreeMap::new();
    for s in slices
        .iter()
        .map(Borrow::borrow)
        .filter(|s| s.driver == driver)
    {
        let entry = newest
            .entry(s.pool.as_str())
            .or_insert((s.generation, Vec::new()));
        if s.generation > entry.0 {
            *entry = (s.generation, Vec::new());
        }
        if s.generation == entry.0 {
            entry.1.push(s);
        }
    }
    newest
        .into_iter()
        .filter_map(|(pool, (_, slices))| {
            let node = slices.first()?.node_name.as_deref()?;
            let complete = slices
                .iter()
                .all(|s| s.resource_slice_count == slices.len() as i64);
            complete.then(|| {
                (
                    pool,
                    node,
                    slices
                        .iter()
                        .flat_map(|s| s.devices.iter())
                        .filter(|d| d.unhealthy.is_none())
                        .collect(),
                )
            })
        })
        .collect()
}

impl ClusterState {
    /// Build from the API objects: every allocated claim's results of `driver` are charged to
    /// their GPUs (a result without slice configuration holds the whole GPU); pods bound to a
    /// node charge its CPU and memory.
    pub fn build(
        driver: &str,
        nodes: &[impl Borrow<NodeView>],
        slices: &[impl Borrow<SliceView>],
        claims: &[impl Borrow<ClaimView>],
        pods: &[impl Borrow<PodView>],
    ) -> ClusterState {
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let mut state = ClusterState {
            build: BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            driver: driver.to_string(),
            ..Default::default()
        };
        let node_views: HashMap<&str, &NodeView> = nodes
            .iter()
            .map(|n| (n.borrow().name.as_str(), n.borrow()))
            .collect();
        let mut pools = complete_pools(driver, slices);
        pools.sort_by(|a, b| a.1.cmp(b.1));
        for (pool, node_name, devices) in pools {
            // A pool whose Node object is missing is not schedulable.
            let Some(view) = node_views.get(node_name) else {
                continue;
            };
            let node_idx = match state.node_index.get(node_name) {
                Some(i) => *i,
                None => {
                    state.nodes.push(NodeState {
                        view: (*view).clone(),
                        gpus: Vec::new(),
                        cpu_requested: 0,
                        memory_requested: 0,
                        max_free_memory: 0,
                        max_free_cores: 0,
                        masks: None,
                    });
                    state
                        .node_index
                        .insert(node_name.to_string(), state.nodes.len() - 1);
                    state.nodes.len() - 1
                }
            };
            for d in devices {
                let memory = d
                    .capacity
                    .get(MEMORY)
                    .and_then(|q| q.to_bytes())
                    .unwrap_or(0);
                let cores = d
                    .capacity
                    .get(CORES)
                    .map(|q| q.ceil_units().clamp(0, 100) as u32)
                    .unwrap_or(100);
                let numa = match d.attributes.get("numaNode") {
                    Some(AttributeValue::Int(n)) => Some(*n),
                    _ => None,
                };
                state.gpus.push(GpuState {
                    node: node_idx,
                    pool: pool.to_string(),
                    cel: None,
                    device: Arc::clone(d),
                    total: Capacity {
                        memory_bytes: memory,
                        cores,
                    },
                    used: Capacity::default(),
                    holders: 0,
                    exclusive: false,
                    exclusive_holders: 0,
                    numa,
                    peers: Vec::new(),
                });
                let idx = state.gpus.len() - 1;
                state
                    .gpu_index
                    .insert((pool.to_string(), d.name.clone()), idx);
                state.nodes[node_idx].gpus.push(idx);
            }
        }
        for g in 0..state.gpus.len() {
            let peers: Vec<usize> = nvlink_peer_names(&state.gpus[g].device)
                .into_iter()
                .filter_map(|name| {
                    state
                        .gpu_index
                        .get(&(state.gpus[g].pool.clone(), name))
                        .copied()
                })
                .collect();
            state.gpus[g].peers = peers;
        }
        for n in 0..state.nodes.len() {
            state.nodes[n].masks = state.static_masks(n);
        }
        state.count_pods(pods);
        state.node_utilisation = vec![0; state.nodes.len()];
        for n in 0..state.nodes.len() {
            state.by_utilisation.insert((0, n));
            state.refresh_node(n);
        }
        for claim in claims.iter().map(Borrow::borrow) {
            if let Some(allocation) = &claim.allocation {
                let holdings = state.holdings_of(allocation);
                state.charge(&claim.uid, holdings);
            }
        }
        state
    }

    /// The CPU and memory the pods bound to each node request, counted afresh.
    fn count_pods(&mut self, pods: &[impl Borrow<PodView>]) {
        for node in &mut self.nodes {
            node.cpu_requested = 0;
            node.memory_requested = 0;
        }
        for pod in pods.iter().map(Borrow::borrow).filter(|p| !p.finished) {
            if let Some(&n) = pod
                .node_name
                .as_deref()
                .and_then(|n| self.node_index.get(n))
            {
                self.nodes[n].cpu_requested += pod.cpu_millis;
                self.nodes[n].memory_requested += pod.memory_bytes;
            }
        }
    }

    /// Bring the holdings up to `claims` and the pods' requests up to `pods` without
    /// rebuilding the GPU table: the state [`ClusterState::build`] would make from the same
    /// nodes and slices with these claims and pods. Only claims whose holdings changed are
    /// charged or released.
    pub fn resync(&mut self, claims: &[impl Borrow<ClaimView>], pods: &[impl Borrow<PodView>]) {
        let mut current: HashMap<&str, Vec<Holding>> = HashMap::new();
        for claim in claims.iter().map(Borrow::borrow) {
            if let Some(allocation) = &claim.allocation {
                let holdings = self.holdings_of(allocation);
                // A UID listed twice: the last wins, as in a build, where a charge replaces.
                current.insert(claim.uid.as_str(), holdings);
            }
        }
        let gone: Vec<String> = self
            .holdings
            .keys()
            .filter(|uid| !current.contains_key(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            self.release(&uid);
        }
        for (uid, holdings) in current {
            if self.holdings.get(uid) != Some(&holdings) {
                self.charge(uid, holdings);
            }
        }
        self.count_pods(pods);
    }

    /// What an allocation holds of our GPUs.
    pub fn holdings_of(&self, allocation: &vgpu_driver::ClaimAllocation) -> Vec<Holding> {
        allocation
            .results
            .iter()
            .filter(|r| r.driver == self.driver && !r.admin_access)
            .filter_map(|r| {
                let gpu = *self.gpu_index.get(&(r.pool.clone(), r.device.clone()))?;
                let memory = self.gpus[gpu].total.memory_bytes;
                // An allocation we cannot interpret is charged as the whole GPU: never overbook.
                let limits = allocation.slice_limits(r, memory).unwrap_or(SliceLimits {
                    memory_bytes: memory,
                    cores: 100,
                    exclusive: true,
                });
                Some(Holding { gpu, limits })
            })
            .collect()
    }

    /// Charge a claim's holdings (replacing what it held before).
    pub fn charge(&mut self, uid: &str, holdings: Vec<Holding>) {
        self.release(uid);
        for h in &holdings {
            let gpu = &mut self.gpus[h.gpu];
            if h.limits.exclusive {
                gpu.used = gpu.used.saturating_add(&gpu.total);
                gpu.exclusive_holders += 1;
                gpu.exclusive = true;
            } else {
                gpu.used = gpu.used.saturating_add(&Capacity {
                    memory_bytes: h.limits.memory_bytes,
                    cores: u32::from(h.limits.cores),
                });
            }
            gpu.holders += 1;
        }
        let touched: BTreeSet<usize> = holdings.iter().map(|h| self.gpus[h.gpu].node).collect();
        self.holdings.insert(uid.to_string(), holdings);
        for n in touched {
            self.refresh_node(n);
        }
    }

    /// Give back what a claim held.
    pub fn release(&mut self, uid: &str) {
        let Some(holdings) = self.holdings.remove(uid) else {
            return;
        };
        let mut touched = BTreeSet::new();
        for h in &holdings {
            let gpu = &mut self.gpus[h.gpu];
            if h.limits.exclusive {
                gpu.used = gpu.used.saturating_sub(&gpu.total);
                gpu.exclusive_holders = gpu.exclusive_holders.saturating_sub(1);
                gpu.exclusive = gpu.exclusive_holders > 0;
            } else {
                gpu.used = gpu.used.saturating_sub(&Capacity {
                    memory_bytes: h.limits.memory_bytes,
                    cores: u32::from(h.limits.cores),
                });
            }
            gpu.holders = gpu.holders.saturating_sub(1);
            touched.insert(gpu.node);
        }
        for n in touched {
            self.refresh_node(n);
        }
    }

    fn refresh_node(&mut self, n: usize) {
        let gpus = &self.nodes[n].gpus;
        let score = if gpus.is_empty() {
            0
        } else {
            gpus.iter()
                .map(|&g| self.gpus[g].utilisation_ppm())
                .sum::<u64>()
                / gpus.len() as u64
        };
        let (mut memory, mut cores) = (0, 0);
        for &g in gpus {
            let gpu = &self.gpus[g];
            if !gpu.exclusive {
                let free = gpu.free();
                memory = memory.max(free.memory_bytes);
                cores = cores.max(free.cores);
            }
        }
        self.nodes[n].max_free_memory = memory;
        self.nodes[n].max_free_cores = cores;
        if let Some(mut masks) = self.nodes[n].masks.take() {
            self.fill_dynamic_masks(n, &mut masks);
            self.nodes[n].masks = Some(masks);
        }
        self.by_utilisation.remove(&(self.node_utilisation[n], n));
        self.node_utilisation[n] = score;
        self.by_utilisation.insert((score, n));
    }

    /// The parts of a node's masks that never change (peers, the bound on linked sets), the
    /// rest empty until [`ClusterState::refresh_node`]; `None` for a node too large for masks.
    fn static_masks(&self, n: usize) -> Option<NodeMasks> {
        let gpus = &self.nodes[n].gpus;
        if gpus.len() > MASK_GPUS {
            return None;
        }
        let linked = |a: usize, b: usize| {
            a != b
                && self.gpus[gpus[a]].peers.contains(&gpus[b])
                && self.gpus[gpus[b]].peers.contains(&gpus[a])
        };
        let peers: Vec<u64> = (0..gpus.len())
            .map(|a| {
                (0..gpus.len())
                    .filter(|&b| linked(a, b))
                    .fold(0u64, |m, b| m | 1 << b)
            })
            .collect();
        let clique_bound = peers
            .iter()
            .map(|p| p.count_ones() as usize + 1)
            .max()
            .unwrap_or(0);
        Some(NodeMasks {
            unused: 0,
            free: Vec::new(),
            peers,
            clique_bound,
        })
    }

    /// A node's unused GPUs and the room on each, from its GPUs (reusing the vector: this
    /// runs on every charge and release).
    fn fill_dynamic_masks(&self, n: usize, masks: &mut NodeMasks) {
        masks.unused = 0;
        masks.free.clear();
        for (i, &g) in self.nodes[n].gpus.iter().enumerate() {
            let gpu = &self.gpus[g];
            if gpu.holders == 0 && gpu.used == Capacity::default() {
                masks.unused |= 1 << i;
            }
            masks.free.push(if gpu.exclusive {
                (0, 0)
            } else {
                let f = gpu.free();
                (f.memory_bytes, f.cores)
            });
        }
    }

    /// Where a node's indexes disagree with its GPUs (`None`: everywhere they agree). For
    /// tests: the indexes are kept up to date on every charge and release, never recomputed.
    #[doc(hidden)]
    pub fn index_mismatch(&self) -> Option<String> {
        for n in 0..self.nodes.len() {
            let mut fresh = self.static_masks(n);
            if let Some(m) = &mut fresh {
                self.fill_dynamic_masks(n, m);
            }
            if fresh != self.nodes[n].masks {
                return Some(format!(
                    "node {n}: kept {:?}, computed {fresh:?}",
                    self.nodes[n].masks
                ));
            }
        }
        None
    }

    pub fn node_utilisation(&self, n: usize) -> u64 {
        self.node_utilisation[n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Whether `count` positions of `within` are pairwise linked, by trying every subset.
    fn brute_force(links: &[Vec<bool>], within: u64, count: usize) -> bool {
        let n = links.len();
        (0u64..1 << n).any(|set| {
            set & !within == 0
                && set.count_ones() as usize == count
                && (0..n).all(|a| {
                    set & (1 << a) == 0
                        || (0..n).all(|b| a == b || set & (1 << b) == 0 || links[a][b])
                })
        })
    }

    proptest! {
        #[test]
        fn has_clique_agrees_with_brute_force(
            (links, within, count) in (1usize..=10).prop_flat_map(|n| (
                prop::collection::vec(prop::bool::weighted(0.6), n * n).prop_map(move |bits| {
                    (0..n)
                        .map(|a| (0..n).map(|b| a != b && bits[a.min(b) * n + a.max(b)]).collect())
                        .collect::<Vec<Vec<bool>>>()
                }),
                0u64..1 << n,
                0..=n + 1,
            ))
        ) {
            let peers: Vec<u64> = links
                .iter()
                .map(|row| row.iter().enumerate().filter(|(_, l)| **l).fold(0, |m, (b, _)| m | 1 << b))
                .collect();
            let masks = NodeMasks {
                clique_bound: peers.iter().map(|p| p.count_ones() as usize + 1).max().unwrap_or(0),
                peers,
                ..Default::default()
            };
            prop_assert_eq!(masks.has_clique(within, count), brute_force(&links, within, count));
        }
    }
}
