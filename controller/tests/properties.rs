//! Property tests over random clusters and claim streams: no GPU ever exceeds its memory or
//! cores, every allocation satisfies its claim, and binpack never spreads over more GPUs than
//! spread does.

mod support;

use controller::engine::{Engine, Policies};
use controller::model::ConstraintView;
use proptest::prelude::*;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use support::*;
use vgpu_driver::config::{Policy, Topology};
use vgpu_driver::{Capacity, ClaimAllocation};

#[derive(Clone, Debug)]
struct ClaimSpec {
    count: u32,
    memory_gib: u64,
    cores: u32,
    exclusive: bool,
    numa_pair: bool,
    topology: Topology,
    /// 0: no selector, 1: GPUs of at least 40 GiB (capacity + quantity), 2: NUMA node 0.
    selector: u8,
}

const SELECTORS: [&str; 3] = [
    "",
    r#"device.capacity["vgpu.hami.io"].memory.compareTo(quantity("40Gi")) >= 0"#,
    r#"device.attributes["vgpu.hami.io"].numaNode == 0"#,
];

fn claim_spec() -> impl Strategy<Value = ClaimSpec> {
    (
        1u32..=3,
        1u64..=48,
        0u32..=60,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.2),
        prop_oneof![
            Just(Topology::Required),
            Just(Topology::Preferred),
            Just(Topology::None)
        ],
        0u8..=2,
    )
        .prop_map(
            |(count, memory_gib, cores, exclusive, numa_pair, topology, selector)| ClaimSpec {
                count,
                memory_gib,
                cores,
                exclusive,
                numa_pair,
                topology,
                selector,
            },
        )
}

fn cluster_spec() -> impl Strategy<Value = Vec<Vec<(u64, bool)>>> {
    // Nodes of 1 to 6 GPUs of 16 to 80 GiB, each GPU NVLinked to its neighbour or not.
    prop::collection::vec(
        prop::collection::vec(
            (prop_oneof![Just(16u64), Just(40), Just(80)], any::<bool>()),
            1..=6,
        ),
        1..=4,
    )
}

fn build(spec: &[Vec<(u64, bool)>]) -> controller::engine::Inputs {
    let nodes: Vec<(String, Vec<vgpu_driver::Gpu>)> = spec
        .iter()
        .enumerate()
        .map(|(n, gpus)| {
            let list = gpus
                .iter()
                .enumerate()
                .map(|(i, (mem, linked))| {
                    let i = i as u32;
                    let mut peers = vec![];
                    if *linked && (i as usize) + 1 < gpus.len() {
                        peers.push(i + 1);
                    }
                    if i > 0 && gpus[i as usize - 1].1 {
                        peers.push(i - 1);
                    }
                    gpu_with(i, *mem, Some(i / 2), &peers)
                })
                .collect();
            (format!("node-{n}"), list)
        })
        .collect();
    let refs: Vec<(&str, Vec<vgpu_driver::Gpu>)> =
        nodes.iter().map(|(n, g)| (n.as_str(), g.clone())).collect();
    cluster(&refs)
}

fn to_claim(i: usize, s: &ClaimSpec) -> controller::model::ClaimView {
    let topology = format!("{:?}", s.topology);
    let config = if s.exclusive {
        json!({"exclusive": true})
    } else {
        json!({"memory": format!("{}Gi", s.memory_gib), "cores": s.cores, "scheduling": {"topology": topology}})
    };
    let mut c = claim_shape(i, s, config);
    if s.selector > 0 {
        for r in &mut c.requests {
            r.alternatives[0].selectors = vec![SELECTORS[s.selector as usize].to_string()];
        }
    }
    c
}

fn claim_shape(i: usize, s: &ClaimSpec, config: serde_json::Value) -> controller::model::ClaimView {
    if s.numa_pair {
        let mut c = claim_with(
            &format!("c{i}"),
            vec![request("a", SLICE, 1, &[]), request("b", SLICE, 1, &[])],
            vec![(vec![], config)],
        );
        c.constraints = vec![ConstraintView {
            requests: vec![],
            match_attribute: Some("vgpu.hami.io/numaNode".into()),
            distinct_attribute: None,
        }];
        c
    } else {
        claim(&format!("c{i}"), s.count, config)
    }
}

/// Run a stream; return the allocations made.
fn run(
    inputs: &controller::engine::Inputs,
    claims: &[ClaimSpec],
    policies: Policies,
) -> (Engine, Vec<(ClaimSpec, ClaimAllocation)>) {
    let mut e = engine(inputs, policies);
    let mut out = Vec::new();
    for (i, s) in claims.iter().enumerate() {
        if let Ok(a) = e.allocate(&to_claim(i, s), None, &BTreeSet::new()) {
            e.commit(&a);
            out.push((s.clone(), a));
        }
    }
    (e, out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn no_gpu_is_ever_overbooked(spec in cluster_spec(), claims in prop::collection::vec(claim_spec(), 1..40),
                                 node_binpack in any::<bool>(), gpu_binpack in any::<bool>()) {
        let inputs = build(&spec);
        let policies = Policies {
            node: if node_binpack { Policy::Binpack } else { Policy::Spread },
            gpu: if gpu_binpack { Policy::Binpack } else { Policy::Spread },
            topology: Topology::Preferred,
        };
        let (e, allocations) = run(&inputs, &claims, policies);
        // Recompute usage from the allocations alone, independently of the engine's books.
        let mut used: BTreeMap<(String, String), (Capacity, u32, bool)> = BTreeMap::new();
        for (spec, a) in &allocations {
            let node = a.node_name.clone().unwrap();
            let expected = if spec.numa_pair { 2 } else { spec.count as usize };
            prop_assert_eq!(a.results.len(), expected);
            let distinct: BTreeSet<&str> = a.results.iter().map(|r| r.device.as_str()).collect();
            prop_assert_eq!(distinct.len(), a.results.len(), "a claim never gets one GPU twice");
            for r in &a.results {
                prop_assert_eq!(&r.pool, &node, "all results on the pinned node");
                let g = e.state.gpu_index[&(r.pool.clone(), r.device.clone())];
                let total = e.state.gpus[g].total;
                // The selector holds, checked without CEL: GPU index i sits on NUMA node i / 2.
                match spec.selector {
                    1 => prop_assert!(total.memory_bytes >= 40 * GI, "selector 40Gi violated by {:?}", r),
                    2 => prop_assert_eq!(r.device.trim_start_matches("gpu-").parse::<u32>().unwrap() / 2, 0, "selector numaNode violated by {:?}", r),
                    _ => {}
                }
                let limits = a.slice_limits(r, total.memory_bytes).unwrap();
                let entry = used.entry((r.pool.clone(), r.device.clone())).or_insert((Capacity::default(), 0, false));
                if limits.exclusive {
                    entry.0 = entry.0.saturating_add(&total);
                    entry.2 = true;
                } else {
                    entry.0 = entry.0.saturating_add(&Capacity { memory_bytes: limits.memory_bytes, cores: limits.cores.into() });
                }
                entry.1 += 1;
                prop_assert!(entry.0.memory_bytes <= total.memory_bytes, "memory overbooked on {:?}", r);
                prop_assert!(entry.0.cores <= total.cores, "cores overbooked on {:?}", r);
                prop_assert!(!entry.2 || entry.1 == 1, "an exclusive GPU is shared: {:?}", r);
            }
            if spec.numa_pair {
                let numas: BTreeSet<u32> = a.results.iter().map(|r| r.device.trim_start_matches("gpu-").parse::<u32>().unwrap() / 2).collect();
                prop_assert_eq!(numas.len(), 1, "matchAttribute numaNode violated");
            }
            if spec.topology == Topology::Required && spec.count > 1 && !spec.exclusive && !spec.numa_pair {
                for x in &a.results {
                    for y in &a.results {
                        if x.device != y.device {
                            let gx = e.state.gpu_index[&(x.pool.clone(), x.device.clone())];
                            let gy = e.state.gpu_index[&(y.pool.clone(), y.device.clone())];
                            prop_assert!(e.state.gpus[gx].peers.contains(&gy), "Required topology violated");
                        }
                    }
                }
            }
        }
        // The per-node index agrees with the GPUs it summarises.
        for node in &e.state.nodes {
            let free = |f: fn(&controller::engine::state::GpuState) -> u64| node.gpus.iter().map(|&g| &e.state.gpus[g]).filter(|g| !g.exclusive).map(f).max().unwrap_or(0);
            prop_assert_eq!(node.max_free_memory, free(|g| g.free().memory_bytes));
            prop_assert_eq!(u64::from(node.max_free_cores), free(|g| u64::from(g.free().cores)));
        }
        // The engine's own books agree with the recomputation.
        for ((pool, device), (capacity, holders, _)) in &used {
            let g = e.state.gpu_index[&(pool.clone(), device.clone())];
            prop_assert_eq!(e.state.gpus[g].used, *capacity);
            prop_assert_eq!(e.state.gpus[g].holders, *holders);
        }
    }

    #[test]
    fn binpack_never_uses_more_gpus_than_spread(gpus in 1usize..=8, claims in prop::collection::vec((1u64..=30, 0u32..=40), 1..30)) {
        let inputs = cluster(&[("n1", hgx(gpus as u32, 80))]);
        let stream: Vec<ClaimSpec> = claims.iter().map(|(m, c)| ClaimSpec { count: 1, memory_gib: *m, cores: *c, exclusive: false, numa_pair: false, topology: Topology::None, selector: 0 }).collect();
        let touched = |policy| {
            let (e, _) = run(&inputs, &stream, Policies { node: Policy::Binpack, gpu: policy, topology: Topology::None });
            e.state.gpus.iter().filter(|g| g.holders > 0).count()
        };
        prop_assert!(touched(Policy::Binpack) <= touched(Policy::Spread));
    }

    #[test]
    fn release_restores_the_state(claims in prop::collection::vec(claim_spec(), 1..20)) {
        let inputs = cluster(&[("n1", hgx(4, 80)), ("n2", hgx(4, 40))]);
        let (mut e, allocations) = run(&inputs, &claims, Policies::default());
        for (_, a) in &allocations {
            e.release(&a.uid);
        }
        prop_assert!(e.state.gpus.iter().all(|g| g.used == Capacity::default() && g.holders == 0 && !g.exclusive));
        prop_assert!(e.state.by_utilisation.iter().all(|(score, _)| *score == 0));
        // The per-node free-capacity index is back to the roomiest whole GPU.
        for node in &e.state.nodes {
            let roomiest = node.gpus.iter().map(|&g| e.state.gpus[g].total.memory_bytes).max().unwrap_or(0);
            prop_assert_eq!(node.max_free_memory, roomiest);
            prop_assert_eq!(node.max_free_cores, 100);
        }
    }
}

/// NVLink layouts of `n` GPUs as a symmetric adjacency matrix: random links, a DGX-1 hybrid
/// cube-mesh, NVLink bridges in pairs, a full NVSwitch mesh, or none.
fn topology(n: usize) -> impl Strategy<Value = Vec<Vec<bool>>> {
    let from = move |linked: fn(usize, usize) -> bool| {
        (0..n)
            .map(|a| (0..n).map(|b| a != b && linked(a, b)).collect())
            .collect::<Vec<Vec<bool>>>()
    };
    let random = prop::collection::vec(prop::bool::weighted(0.6), n * n).prop_map(move |bits| {
        (0..n)
            .map(|a| {
                (0..n)
                    .map(|b| a != b && bits[a.min(b) * n + a.max(b)])
                    .collect()
            })
            .collect::<Vec<Vec<bool>>>()
    });
    prop_oneof![
        3 => random,
        1 => Just(from(|a, b| a / 4 == b / 4 || a % 4 == b % 4)),
        1 => Just(from(|a, b| a / 2 == b / 2)),
        1 => Just(from(|_, _| true)),
        1 => Just(from(|_, _| false)),
    ]
}

/// Every `count`-subset of the GPUs with room, in lexicographic order, that is pairwise linked.
fn brute_force(links: &[Vec<bool>], room: &[bool], count: usize) -> Vec<Vec<usize>> {
    let n = links.len();
    let mut out = Vec::new();
    for mask in 0u32..(1 << n) {
        let set: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
        if set.len() == count
            && set.iter().all(|&g| room[g])
            && set
                .iter()
                .all(|&a| set.iter().all(|&b| a == b || links[a][b]))
        {
            out.push(set);
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_topology_search_finds_the_first_linked_set_brute_force_finds(
        (links, room, count) in (1usize..=10).prop_flat_map(|n| (topology(n), prop::collection::vec(prop::bool::weighted(0.7), n), 1..=n))
    ) {
        let candidates: Vec<usize> = (0..links.len()).filter(|&g| room[g]).collect();
        let found = controller::engine::topology::first_clique(candidates.len(), count, |a, b| links[candidates[a]][candidates[b]])
            .map(|set| set.into_iter().map(|i| candidates[i]).collect::<Vec<_>>());
        prop_assert_eq!(found, brute_force(&links, &room, count).into_iter().next());
    }

    #[test]
    fn required_topology_is_refused_only_when_no_linked_set_has_room(
        links in topology(8),
        used in prop::collection::vec(prop_oneof![Just(0u64), Just(30), Just(75)], 8),
        count in 2usize..=5,
    ) {
        let gpus = (0..8u32)
            .map(|i| {
                let peers: Vec<u32> = (0..8u32).filter(|&p| links[i as usize][p as usize]).collect();
                gpu_with(i, 80, Some(i / 4), &peers)
            })
            .collect();
        let inputs = cluster(&[("n1", gpus)]);
        let mut e = engine(&inputs, Policies::default());
        for (i, gib) in used.iter().enumerate().filter(|(_, g)| **g > 0) {
            let selector = format!(r#"device.attributes["vgpu.hami.io"].index == {i}"#);
            let c = claim_with(&format!("u{i}"), vec![request("gpu", SLICE, 1, &[&selector])], vec![(vec![], json!({"memory": format!("{gib}Gi")}))]);
            let a = e.allocate(&c, None, &BTreeSet::new()).unwrap();
            e.commit(&a);
        }
        let room: Vec<bool> = used.iter().map(|&g| g + 10 <= 80).collect();
        let want = claim("w", count as u32, json!({"memory": "10Gi", "scheduling": {"topology": "Required"}}));
        let got = e.allocate(&want, None, &BTreeSet::new());
        let exists = !brute_force(&links, &room, count).is_empty();
        prop_assert_eq!(got.is_ok(), exists, "{:?}", got);
        if let Ok(a) = got {
            let chosen: Vec<usize> = a.results.iter().map(|r| r.device.trim_start_matches("gpu-").parse().unwrap()).collect();
            let distinct: BTreeSet<usize> = chosen.iter().copied().collect();
            prop_assert_eq!(distinct.len(), count);
            for &x in &chosen {
                prop_assert!(room[x], "GPU {} has no room", x);
                for &y in &chosen {
                    prop_assert!(x == y || links[x][y], "GPUs {} and {} are not linked", x, y);
                }
            }
        }
    }
}

/// Everything a decision reads from the cluster state: per GPU (used, holders, exclusive),
/// per node (roomiest GPU's memory and cores, CPU and memory requested), the node order.
type Books = (
    Vec<(Capacity, u32, bool)>,
    Vec<(u64, u32, i128, i128)>,
    Vec<(u64, usize)>,
);

fn books(e: &Engine) -> Books {
    let gpus = e
        .state
        .gpus
        .iter()
        .map(|g| (g.used, g.holders, g.exclusive))
        .collect();
    let nodes = e
        .state
        .nodes
        .iter()
        .map(|n| {
            (
                n.max_free_memory,
                n.max_free_cores,
                n.cpu_requested,
                n.memory_requested,
            )
        })
        .collect();
    (
        gpus,
        nodes,
        e.state.by_utilisation.iter().copied().collect(),
    )
}

fn bound_pods(spec: &[Vec<(u64, bool)>], cpus: &[i128]) -> Vec<controller::model::PodView> {
    cpus.iter()
        .enumerate()
        .map(|(i, cpu)| controller::model::PodView {
            namespace: "ml".into(),
            name: format!("p{i}"),
            uid: format!("pod-{i}"),
            node_name: Some(format!("node-{}", i % spec.len())),
            cpu_millis: *cpu,
            ..Default::default()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_resynced_engine_equals_a_rebuilt_one(
        spec in cluster_spec(),
        claims in prop::collection::vec(claim_spec(), 1..30),
        keep in prop::collection::vec(any::<bool>(), 30),
        cpus in prop::collection::vec(0i128..4000, 0..6),
        cpus_later in prop::collection::vec(0i128..4000, 0..6),
    ) {
        let mut inputs = build(&spec);
        inputs.pods = bound_pods(&spec, &cpus);
        let (mut kept, allocations) = run(&inputs, &claims, Policies::default());
        let mut views: Vec<controller::model::ClaimView> = allocations.iter().enumerate().map(|(i, (s, a))| {
            let mut v = to_claim(i, s);
            v.uid = a.uid.clone();
            v.allocation = Some(std::sync::Arc::new(a.clone()));
            v
        }).collect();
        // Some claims released, one moved to where another claim is, pods changed.
        let mut later: Vec<controller::model::ClaimView> = views.iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| v.clone()).collect();
        if later.len() >= 2 {
            let other = later[1].allocation.clone();
            later[0].allocation = other.map(|mut a| { std::sync::Arc::make_mut(&mut a).uid = later[0].uid.clone(); a });
        }
        let pods_later = bound_pods(&spec, &cpus_later);
        kept.resync(&later, &pods_later);
        let mut fresh_inputs = inputs.clone();
        fresh_inputs.claims = later.clone();
        fresh_inputs.pods = pods_later;
        let fresh = engine(&fresh_inputs, Policies::default());
        prop_assert_eq!(books(&kept), books(&fresh));
        // And back to every allocation.
        views.sort_by(|a, b| a.uid.cmp(&b.uid));
        kept.resync(&views, &inputs.pods);
        let mut all_inputs = inputs.clone();
        all_inputs.claims = views;
        prop_assert_eq!(books(&kept), books(&engine(&all_inputs, Policies::default())));
    }
}

/// Nodes of 1 to 8 GPUs of one size each, with one of the NVLink layouts of [`topology`].
fn layout_spec() -> impl Strategy<Value = Vec<(Vec<Vec<bool>>, u64)>> {
    prop::collection::vec(
        (1usize..=8).prop_flat_map(|n| (topology(n), prop_oneof![Just(16u64), Just(40), Just(80)])),
        1..=5,
    )
}

fn build_layouts(spec: &[(Vec<Vec<bool>>, u64)]) -> controller::engine::Inputs {
    let nodes: Vec<(String, Vec<vgpu_driver::Gpu>)> = spec
        .iter()
        .enumerate()
        .map(|(n, (links, memory))| {
            let gpus = (0..links.len() as u32)
                .map(|i| {
                    let peers: Vec<u32> = (0..links.len() as u32)
                        .filter(|&p| links[i as usize][p as usize])
                        .collect();
                    gpu_with(i, *memory, Some(i / 4), &peers)
                })
                .collect();
            (format!("node-{n}"), gpus)
        })
        .collect();
    let refs: Vec<(&str, Vec<vgpu_driver::Gpu>)> =
        nodes.iter().map(|(n, g)| (n.as_str(), g.clone())).collect();
    cluster(&refs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The per-node indexes only rule out nodes the full pass refuses: every decision (node,
    /// GPUs, refusal and its reason) is the one an engine trying every node makes, and after
    /// any sequence of allocations and releases the indexes equal a recomputation from the GPUs.
    #[test]
    fn the_indexes_change_no_decision_and_stay_exact(
        spec in layout_spec(),
        steps in prop::collection::vec(
            (claim_spec(), 1u32..=4, prop::option::weighted(0.2, 0usize..5), prop::option::weighted(0.3, 0usize..40)),
            1..40,
        ),
        node_binpack in any::<bool>(),
        gpu_binpack in any::<bool>(),
    ) {
        let inputs = build_layouts(&spec);
        let policies = Policies {
            node: if node_binpack { Policy::Binpack } else { Policy::Spread },
            gpu: if gpu_binpack { Policy::Binpack } else { Policy::Spread },
            topology: Topology::Preferred,
        };
        let mut fast = engine(&inputs, policies);
        let mut full = engine(&inputs, policies).without_indexes();
        let mut placed: Vec<String> = Vec::new();
        for (i, (mut s, count, avoid, release)) in steps.into_iter().enumerate() {
            s.count = count;
            if let Some(r) = release.filter(|_| !placed.is_empty()) {
                let uid = placed.remove(r % placed.len());
                fast.release(&uid);
                full.release(&uid);
            }
            let avoid: BTreeSet<String> = avoid.map(|k| format!("node-{k}")).into_iter().collect();
            let claim = to_claim(i, &s);
            let got = fast.allocate(&claim, None, &avoid);
            prop_assert_eq!(&got, &full.allocate(&claim, None, &avoid));
            if let Ok(a) = got {
                fast.commit(&a);
                full.commit(&a);
                placed.push(a.uid.clone());
            }
            prop_assert_eq!(fast.state.index_mismatch(), None);
        }
    }
}
