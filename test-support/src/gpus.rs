//! GPUs as discovery reports them, for tests: an H100 by default, or any size, NUMA node and
//! NVLink peers. UUIDs are `GPU-<index, 8 digits>`, so peers can be named by index.

use vgpu_driver::Gpu;

const GI: u64 = 1 << 30;

/// An 80 GiB H100 at `index`, NUMA node 0, no NVLink.
pub fn gpu(index: u32) -> Gpu {
    gpu_with(index, 80, Some(0), &[])
}

/// A GPU with `memory_gib` (an H100 from 80 GiB, an A100 below), on NUMA node `numa`,
/// NVLinked to `peers` (indices on its node).
pub fn gpu_with(index: u32, memory_gib: u64, numa: Option<u32>, peers: &[u32]) -> Gpu {
    Gpu {
        uuid: uuid(index),
        index,
        minor: index,
        product_name: if memory_gib >= 80 {
            "NVIDIA H100 80GB HBM3".into()
        } else {
            "NVIDIA A100-SXM4-40GB".into()
        },
        architecture: "Hopper".into(),
        cuda_compute_capability: "9.0".into(),
        driver_version: "560.35.03".into(),
        cuda_driver_version: "12.6".into(),
        pci_bus_id: format!("0000:{:02x}:00.0", index + 1),
        numa_node: numa,
        memory_bytes: memory_gib * GI,
        multiprocessor_count: 132,
        nvlink_peers: peers.iter().map(|p| uuid(*p)).collect(),
    }
}

/// `count` identical GPUs, all NVLink peers of each other, NUMA node = index / 4 (an HGX
/// board).
pub fn hgx(count: u32, memory_gib: u64) -> Vec<Gpu> {
    (0..count)
        .map(|i| {
            let peers: Vec<u32> = (0..count).filter(|p| *p != i).collect();
            gpu_with(i, memory_gib, Some(i / 4), &peers)
        })
        .collect()
}

/// The UUID the fixtures give the GPU at `index`.
pub fn uuid(index: u32) -> String {
    format!("GPU-{index:08}")
}
