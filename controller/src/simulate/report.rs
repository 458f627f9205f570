//! The simulator's table: per node and GPU, what is used and by how many claims; then what
//! was placed and refused, and how fragmented the free memory is.

use super::{Outcome, Simulation};
use std::fmt::Write;

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

/// Figures that summarise a simulation, for comparing policies.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub placed: usize,
    pub refused: usize,
    pub already_allocated: usize,
    pub not_ours: usize,
    pub gpus: usize,
    pub gpus_in_use: usize,
    pub gpus_untouched: usize,
    /// Share of the free memory that sits on partly used GPUs (0 to 1): memory a whole-GPU
    /// or large claim cannot use. Binpacking keeps it low.
    pub fragmentation: f64,
}

pub fn summary(sim: &Simulation) -> Summary {
    let mut s = Summary::default();
    for (_, outcome) in &sim.claims {
        match outcome {
            Outcome::Placed(_) => s.placed += 1,
            Outcome::Refused(_) => s.refused += 1,
            Outcome::AlreadyAllocated => s.already_allocated += 1,
            Outcome::NotOurs => s.not_ours += 1,
        }
    }
    let (mut free_total, mut free_fragmented) = (0u128, 0u128);
    for gpu in &sim.engine.state.gpus {
        s.gpus += 1;
        let free = u128::from(gpu.free().memory_bytes);
        free_total += free;
        if gpu.holders > 0 {
            s.gpus_in_use += 1;
            free_fragmented += free;
        } else {
            s.gpus_untouched += 1;
        }
    }
    s.fragmentation = if free_total == 0 {
        0.0
    } else {
        free_fragmented as f64 / free_total as f64
    };
    s
}

/// The table's last line.
pub fn summary_line(s: &Summary) -> String {
    format!(
        "SUMMARY claims placed {}, refused {}, already allocated {}, not ours {}; GPUs {} ({} in use, {} untouched); fragmentation {:.0}% of free memory is on partly used GPUs",
        s.placed,
        s.refused,
        s.already_allocated,
        s.not_ours,
        s.gpus,
        s.gpus_in_use,
        s.gpus_untouched,
        s.fragmentation * 100.0
    )
}

/// The human-readable report.
pub fn table(sim: &Simulation) -> String {
    let mut out = String::new();
    let state = &sim.engine.state;
    let policies = sim.engine.policies();
    match sim.engine.mode() {
        crate::engine::Mode::Controller => {
            let _ = writeln!(
                out,
                "Mode controller. Policies: node {:?}, GPU {:?}, topology {:?} (a claim's GpuSliceConfig.scheduling overrides them)\n",
                policies.node, policies.gpu, policies.topology
            );
        }
        crate::engine::Mode::Native => {
            let _ = writeln!(
                out,
                "Mode native: the kube-scheduler's allocator (consumable capacity): first node by name that fits, first GPU that fits, memory rounded up to {} MiB, no topology, no policies\n",
                vgpu_driver::capacity::NATIVE_MEMORY_STEP >> 20
            );
        }
    }
    for node in &state.nodes {
        let _ = writeln!(out, "NODE {}", node.view.name);
        let _ = writeln!(
            out,
            "  {:<8} {:<24} {:>17} {:>9} {:>7}",
            "GPU", "PRODUCT", "MEMORY GiB", "CORES", "CLAIMS"
        );
        for &g in &node.gpus {
            let gpu = &state.gpus[g];
            let product = match gpu.device.attributes.get("productName") {
                Some(vgpu_driver::slice::AttributeValue::String(s)) => s.chars().take(24).collect(),
                _ => String::from("?"),
            };
            let memory = format!(
                "{:>6} / {:<6}",
                gib(gpu.used.memory_bytes.min(gpu.total.memory_bytes)),
                gib(gpu.total.memory_bytes)
            );
            let cores = format!(
                "{:>3} / {:<3}",
                gpu.used.cores.min(gpu.total.cores),
                gpu.total.cores
            );
            let claims = if gpu.exclusive {
                format!("{} excl", gpu.holders)
            } else {
                gpu.holders.to_string()
            };
            let _ = writeln!(
                out,
                "  {:<8} {:<24} {:>17} {:>9} {:>7}",
                gpu.device.name, product, memory, cores, claims
            );
        }
        let _ = writeln!(out);
    }
    let refused: Vec<(String, &str)> = sim
        .claims
        .iter()
        .filter_map(|(o, outcome)| match outcome {
            Outcome::Refused(r) => Some((o.key(), r.as_str())),
            _ => None,
        })
        .collect();
    if !refused.is_empty() {
        let _ = writeln!(out, "REFUSED");
        for (key, reason) in &refused {
            let reason = reason
                .strip_prefix(&format!("ResourceClaim {key}: "))
                .unwrap_or(reason);
            let _ = writeln!(out, "  {key}: {reason}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "{}", summary_line(&summary(sim)));
    if !sim.ignored.is_empty() {
        let _ = writeln!(
            out,
            "IGNORED {} objects the simulator does not use: {}",
            sim.ignored.len(),
            sim.ignored.join(", ")
        );
    }
    out
}
