//! Render a node's GPUs as the ResourceSlices the kubelet plugin publishes, in both API
//! versions (v1beta1 converted from v1 as the plugin does at the wire), from a fake inventory (the embedded HGX H100 node by default).
//!
//! `cargo run -p vgpu-driver --example render-slices [-- INVENTORY.yaml [v1|v1beta1]]`

use dra::ApiVersion;
use vgpu_driver::slice::{gpu_devices, render_pool};
use vgpu_driver::{DEFAULT_DRIVER_NAME, Inventory, NodeRef, PoolOptions};

const EMBEDDED: &str = include_str!("../testdata/hgx-h100.yaml");

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = match args.first() {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => EMBEDDED.to_string(),
    };
    let versions = match args.get(1).map(String::as_str) {
        None => vec![ApiVersion::V1, ApiVersion::V1beta1],
        Some("v1") => vec![ApiVersion::V1],
        Some("v1beta1") => vec![ApiVersion::V1beta1],
        Some(other) => {
            return Err(format!("unknown API version {other:?}: use v1 or v1beta1").into());
        }
    };
    let inventory = Inventory::from_yaml(&text)?;
    let devices = gpu_devices(&inventory.gpus)?;
    let node = NodeRef {
        name: "gpu-node-1".into(),
        uid: "00000000-0000-0000-0000-000000000001".into(),
    };
    let slices = render_pool(&node, &devices, &PoolOptions::new(DEFAULT_DRIVER_NAME))?;
    for version in versions {
        for slice in &slices {
            let object = dra::convert::to_wire(slice, version);
            println!("---\n{}", serde_yaml_ng::to_string(&object)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_inventory_is_valid() {
        let inv = vgpu_driver::Inventory::from_yaml(super::EMBEDDED).unwrap();
        assert_eq!(inv.gpus.len(), 8);
        assert!(inv.gpus.iter().all(|g| g.nvlink_peers.len() == 7));
    }
}
