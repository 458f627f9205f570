//! A fleet of GPU nodes a user would recognise, for benchmarks: three NVLink layouts of
//! eight GPUs each, and the CEL selectors claims on such a fleet typically carry.
//!
//! Nodes, by index modulo 10: 0-3 HGX H100 80GB (NVSwitch: all eight GPUs linked), 4-6 DGX-1
//! V100 32GB (hybrid cube-mesh: two linked quads, GPU i linked to i + 4), 7-9 A100 40GB PCIe
//! with NVLink bridges in pairs.

use vgpu_driver::Gpu;

const GI: u64 = 1 << 30;

/// The board of a fleet node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Board {
    HgxH100,
    Dgx1V100,
    PairedA100,
}

/// The board of node `node` of the fleet.
pub fn board(node: usize) -> Board {
    match node % 10 {
        0..=3 => Board::HgxH100,
        4..=6 => Board::Dgx1V100,
        _ => Board::PairedA100,
    }
}

/// The eight GPUs of node `node`, with UUIDs unique across the fleet.
pub fn gpus(node: usize) -> Vec<Gpu> {
    let board = board(node);
    let (product, arch, cc, memory_gib) = match board {
        Board::HgxH100 => ("NVIDIA H100 80GB HBM3", "Hopper", "9.0", 80),
        Board::Dgx1V100 => ("Tesla V100-SXM2-32GB", "Volta", "7.0", 32),
        Board::PairedA100 => ("NVIDIA A100-PCIE-40GB", "Ampere", "8.0", 40),
    };
    let uuid = |i: u32| format!("GPU-{node:08x}-{i:04x}-4000-8000-000000000000");
    (0..8u32)
        .map(|i| {
            let linked = |p: u32| match board {
                Board::HgxH100 => true,
                Board::Dgx1V100 => p / 4 == i / 4 || p % 4 == i % 4,
                Board::PairedA100 => p / 2 == i / 2,
            };
            Gpu {
                uuid: uuid(i),
                index: i,
                minor: i,
                product_name: product.into(),
                architecture: arch.into(),
                cuda_compute_capability: cc.into(),
                driver_version: "560.35.03".into(),
                cuda_driver_version: "12.6".into(),
                pci_bus_id: format!("0000:{:02x}:00.0", 0x18 + i * 0x10),
                numa_node: Some(i / 4),
                memory_bytes: memory_gib * GI,
                multiprocessor_count: 80,
                nvlink_peers: (0..8).filter(|&p| p != i && linked(p)).map(uuid).collect(),
            }
        })
        .collect()
}

/// Claim selectors of the kinds users write (product name, memory `compareTo(quantity(...))`,
/// NUMA node, driver version `isGreaterThan(semver(...))`), for driver `vgpu.hami.io`.
pub const SELECTORS: [&str; 4] = [
    r#"device.attributes["vgpu.hami.io"].productName.startsWith("NVIDIA H100")"#,
    r#"device.capacity["vgpu.hami.io"].memory.compareTo(quantity("40Gi")) >= 0"#,
    r#"device.attributes["vgpu.hami.io"].numaNode == 1"#,
    r#"device.attributes["vgpu.hami.io"].driverVersion.isGreaterThan(semver("550.0.0"))"#,
];

/// The main container of the benches' inference-server pods: an image per app (`i % apps`),
/// a command, 24 environment variables, a port and a readiness probe, so a pod carries a few
/// KiB of spec as real ones do. `resources` goes in as given (requests, limits, claims).
pub fn inference_container(
    i: usize,
    apps: usize,
    resources: serde_json::Value,
) -> serde_json::Value {
    let env: Vec<serde_json::Value> = (0..24)
        .map(|e| serde_json::json!({"name": format!("SETTING_{e:02}"), "value": format!("value-{e}-for-workload-{i}")}))
        .collect();
    serde_json::json!({
        "name": "main",
        "image": format!("registry.example.com/ml/app-{}:1.{}.0", i % apps, i % 7),
        "command": ["python", "-m", "serve", "--port", "8080"],
        "args": ["--model", format!("/models/model-{}", i % 40), "--batch-size", "8"],
        "env": env,
        "ports": [{"containerPort": 8080, "name": "http"}],
        "resources": resources,
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_link_as_their_boards_do() {
        let peers = |node: usize, i: usize| gpus(node)[i].nvlink_peers.len();
        assert_eq!(peers(0, 0), 7, "NVSwitch links all eight");
        assert_eq!(peers(4, 0), 4, "cube-mesh: its quad and i + 4");
        assert_eq!(peers(7, 0), 1, "a bridged pair");
        vgpu_driver::gpu::validate_gpus(&gpus(4)).expect("a valid inventory");
        assert_ne!(
            gpus(0)[0].uuid,
            gpus(10)[0].uuid,
            "UUIDs unique across nodes"
        );
    }
}
