//! The GPU as the product sees it, whether NVML discovered it or a fake inventory described it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One physical GPU of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gpu {
    /// `GPU-…` UUID, stable across reboots; what CUDA_VISIBLE_DEVICES names.
    pub uuid: String,
    /// NVML index on the node.
    pub index: u32,
    /// Minor number of `/dev/nvidia<minor>`.
    pub minor: u32,
    pub product_name: String,
    /// e.g. `Hopper`, `Ampere`.
    pub architecture: String,
    /// CUDA compute capability, e.g. `9.0`.
    pub cuda_compute_capability: String,
    /// Kernel driver version, e.g. `550.54.15`.
    pub driver_version: String,
    /// Highest CUDA version the driver supports, e.g. `12.4`.
    pub cuda_driver_version: String,
    /// PCI bus id in NVML's form, e.g. `0000:3b:00.0`.
    pub pci_bus_id: String,
    /// NUMA node the GPU is attached to, when the platform reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
    pub multiprocessor_count: u32,
    /// UUIDs of GPUs on the same node reachable over NVLink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvlink_peers: Vec<String>,
}

impl Gpu {
    /// The device name published in ResourceSlices: `gpu-<index>`, a DNS label.
    pub fn device_name(&self) -> String {
        device_name(self.index)
    }
}

/// `gpu-<index>`.
pub fn device_name(index: u32) -> String {
    format!("gpu-{index}")
}

/// A fake inventory: what a node's GPUs would look like, for clusters without GPUs, demos and
/// tests. Read from YAML (`gpus: [...]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
}

/// Why an inventory is unusable.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("fake GPU inventory: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("fake GPU inventory: gpus[{index}].{field}: {message}")]
    Invalid {
        index: usize,
        field: &'static str,
        message: String,
    },
}

impl Inventory {
    /// Parse and check an inventory: unique UUIDs, indices and minors, peers that exist.
    pub fn from_yaml(text: &str) -> Result<Inventory, InventoryError> {
        let inventory: Inventory = serde_yaml_ng::from_str(text)?;
        inventory.validate()?;
        Ok(inventory)
    }

    pub fn validate(&self) -> Result<(), InventoryError> {
        validate_gpus(&self.gpus)
    }
}

/// The checks every discovered or described set of GPUs must pass before it is published.
pub fn validate_gpus(gpus: &[Gpu]) -> Result<(), InventoryError> {
    let mut uuids = BTreeSet::new();
    let mut indices = BTreeSet::new();
    let mut minors = BTreeSet::new();
    let invalid = |index, field, message: String| InventoryError::Invalid {
        index,
        field,
        message,
    };
    for (i, gpu) in gpus.iter().enumerate() {
        if gpu.uuid.is_empty() {
            return Err(invalid(i, "uuid", "must not be empty".into()));
        }
        if !uuids.insert(gpu.uuid.as_str()) {
            return Err(invalid(i, "uuid", format!("{:?} appears twice", gpu.uuid)));
        }
        if !indices.insert(gpu.index) {
            return Err(invalid(i, "index", format!("{} appears twice", gpu.index)));
        }
        if !minors.insert(gpu.minor) {
            return Err(invalid(i, "minor", format!("{} appears twice", gpu.minor)));
        }
        if gpu.memory_bytes == 0 {
            return Err(invalid(
                i,
                "memoryBytes",
                "must be greater than zero".into(),
            ));
        }
        if gpu.product_name.is_empty() {
            return Err(invalid(i, "productName", "must not be empty".into()));
        }
    }
    for (i, gpu) in gpus.iter().enumerate() {
        for peer in &gpu.nvlink_peers {
            if peer == &gpu.uuid {
                return Err(invalid(
                    i,
                    "nvlinkPeers",
                    "a GPU cannot be its own peer".into(),
                ));
            }
            if !uuids.contains(peer.as_str()) {
                return Err(invalid(
                    i,
                    "nvlinkPeers",
                    format!("peer {peer:?} is not a GPU of this node"),
                ));
            }
        }
    }
    Ok(())
}

/// A version string made acceptable as a semantic version: NVIDIA prints `560.35.03` and
/// `12.4`, semver wants `560.35.3` and `12.4.0`.
pub fn semver_of(version: &str) -> Option<String> {
    let parts: Vec<&str> = version.trim().split('.').collect();
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    let mut numbers = Vec::with_capacity(3);
    for part in &parts {
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        numbers.push(part.parse::<u64>().ok()?);
    }
    numbers.resize(3, 0);
    Some(format!("{}.{}.{}", numbers[0], numbers[1], numbers[2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn h100(index: u32) -> Gpu {
        Gpu {
            uuid: format!("GPU-00000000-0000-0000-0000-00000000000{index}"),
            index,
            minor: index,
            product_name: "NVIDIA H100 80GB HBM3".into(),
            architecture: "Hopper".into(),
            cuda_compute_capability: "9.0".into(),
            driver_version: "560.35.03".into(),
            cuda_driver_version: "12.6".into(),
            pci_bus_id: format!("0000:{:02x}:00.0", 0x18 + index),
            numa_node: Some(index / 4),
            memory_bytes: 81559 << 20,
            multiprocessor_count: 132,
            nvlink_peers: vec![],
        }
    }

    #[test]
    fn semver_normalisation() {
        assert_eq!(semver_of("560.35.03").as_deref(), Some("560.35.3"));
        assert_eq!(semver_of("12.4").as_deref(), Some("12.4.0"));
        assert_eq!(semver_of("9").as_deref(), Some("9.0.0"));
        assert_eq!(semver_of("1.2.3.4"), None);
        assert_eq!(semver_of("12.x"), None);
        assert_eq!(semver_of(""), None);
    }

    #[test]
    fn inventory_round_trip_and_checks() {
        let mut gpus = vec![h100(0), h100(1)];
        gpus[0].nvlink_peers = vec![gpus[1].uuid.clone()];
        let inv = Inventory { gpus };
        let yaml = serde_yaml_ng::to_string(&inv).unwrap();
        assert_eq!(Inventory::from_yaml(&yaml).unwrap(), inv);

        let mut dup = inv.clone();
        dup.gpus[1].minor = 0;
        let err = dup.validate().unwrap_err().to_string();
        assert!(err.contains("gpus[1].minor"), "{err}");

        let mut bad_peer = inv.clone();
        bad_peer.gpus[1].nvlink_peers = vec!["GPU-nope".into()];
        let err = bad_peer.validate().unwrap_err().to_string();
        assert!(err.contains("gpus[1].nvlinkPeers"), "{err}");
    }

    #[test]
    fn unknown_inventory_fields_are_rejected() {
        let err = Inventory::from_yaml("gpus:\n- uuid: x\n  colour: red\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
