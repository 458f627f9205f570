//! A fake GPU inventory read from a YAML file (`--fake-gpus FILE`).
//!
//! The file is a `vgpu_driver::Inventory` (`gpus: [...]`, every field of the domain model) with
//! one optional addition, so that health can be exercised without hardware:
//!
//! ```yaml
//! gpus: [...]
//! unhealthy:            # GPU UUID -> reason; such GPUs are not offered and prepare refuses them
//!   GPU-5f2c...: "Xid 79: GPU has fallen off the bus"
//! ```
//!
//! The file is re-read when it changes (polled), so editing `unhealthy` flips health at run
//! time as an NVML event would.

use super::{DiscoveryError, GpuState, Snapshot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vgpu_driver::Inventory;

/// The top-level key of the health addition.
pub const UNHEALTHY_KEY: &str = "unhealthy";

/// A fake inventory file.
pub struct FakeSource {
    path: PathBuf,
    poll: Duration,
}

impl FakeSource {
    /// `poll`: how often the file is checked for changes.
    pub fn new(path: impl Into<PathBuf>, poll: Duration) -> Self {
        FakeSource {
            path: path.into(),
            poll,
        }
    }

    pub fn discover(&self) -> Result<Snapshot, DiscoveryError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| {
            DiscoveryError::ReadInventory {
                path: self.path.display().to_string(),
                source,
            }
        })?;
        parse(&self.path, &text)
    }

    /// Poll the file and apply what changed (GPUs and health). A file that stops parsing is
    /// reported and ignored: the last good inventory stays in force.
    pub fn spawn_watcher(
        self,
        state: GpuState,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            // Start from "unknown" rather than re-reading now: the file may already have changed
            // since discovery, and the first poll applies it (a no-op when nothing changed).
            let mut last: Option<Vec<u8>> = None;
            while !*stop.borrow() {
                std::thread::sleep(self.poll);
                let now = std::fs::read(&self.path).ok();
                if now == last {
                    continue;
                }
                last = now;
                match self.discover().and_then(|s| {
                    vgpu_driver::gpu::validate_gpus(&s.gpus)?;
                    Ok(s)
                }) {
                    Ok(snapshot) => {
                        if state.replace(snapshot) {
                            tracing::info!(path = %self.path.display(), "fake GPU inventory changed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring the changed fake GPU inventory"),
                }
            }
        })
    }
}

/// Parse an inventory with its optional `unhealthy` map.
pub fn parse(path: &Path, text: &str) -> Result<Snapshot, DiscoveryError> {
    let invalid = |message: String| DiscoveryError::Inventory {
        path: path.display().to_string(),
        message,
    };
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let unhealthy_value = doc
        .as_mapping_mut()
        .and_then(|m| m.remove(UNHEALTHY_KEY))
        .unwrap_or(serde_yaml_ng::Value::Null);
    let unhealthy: BTreeMap<String, String> = if unhealthy_value.is_null() {
        BTreeMap::new()
    } else {
        serde_yaml_ng::from_value(unhealthy_value)
            .map_err(|e| invalid(format!("{UNHEALTHY_KEY}: {e} (expected GPU UUID: reason)")))?
    };
    let rest = serde_yaml_ng::to_string(&doc).map_err(|e| invalid(e.to_string()))?;
    let inventory = Inventory::from_yaml(&rest).map_err(|e| invalid(e.to_string()))?;
    for uuid in unhealthy.keys() {
        if !inventory.gpus.iter().any(|g| &g.uuid == uuid) {
            return Err(invalid(format!(
                "{UNHEALTHY_KEY}: {uuid:?} is not a GPU of this inventory"
            )));
        }
    }
    Ok(Snapshot {
        gpus: inventory.gpus,
        unhealthy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"
gpus:
- {uuid: GPU-a, index: 0, minor: 0, productName: NVIDIA A100-SXM4-40GB, architecture: Ampere, cudaComputeCapability: "8.0", driverVersion: 550.54.15, cudaDriverVersion: "12.4", pciBusId: "0000:07:00.0", memoryBytes: 42949672960, multiprocessorCount: 108}
- {uuid: GPU-b, index: 1, minor: 1, productName: NVIDIA A100-SXM4-40GB, architecture: Ampere, cudaComputeCapability: "8.0", driverVersion: 550.54.15, cudaDriverVersion: "12.4", pciBusId: "0000:0f:00.0", memoryBytes: 42949672960, multiprocessorCount: 108}
"#;

    #[test]
    fn parses_inventory_and_health() {
        let s = parse(Path::new("x"), TWO).unwrap();
        assert_eq!(s.gpus.len(), 2);
        assert!(s.unhealthy.is_empty());
        let with = format!("{TWO}unhealthy:\n  GPU-b: 'Xid 79'\n");
        let s = parse(Path::new("x"), &with).unwrap();
        assert_eq!(s.unhealthy_reason("GPU-b"), Some("Xid 79"));
        let bad = format!("{TWO}unhealthy:\n  GPU-z: 'Xid 79'\n");
        let e = parse(Path::new("inv.yaml"), &bad).unwrap_err().to_string();
        assert!(e.contains("inv.yaml") && e.contains("GPU-z"), "{e}");
        let e = parse(Path::new("x"), "gpus: 3").unwrap_err().to_string();
        assert!(e.contains("fake GPU inventory"), "{e}");
    }

    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let h100 = std::fs::read_to_string(dir.join("fake-gpus-hgx-h100.yaml")).unwrap();
        let s = parse(&dir, &h100).unwrap();
        assert_eq!(s.gpus.len(), 8);
        assert!(s.gpus.iter().all(|g| g.nvlink_peers.len() == 7));
        let mixed = std::fs::read_to_string(dir.join("fake-gpus-mixed.yaml")).unwrap();
        let s = parse(&dir, &mixed).unwrap();
        let names: std::collections::BTreeSet<&str> =
            s.gpus.iter().map(|g| g.product_name.as_str()).collect();
        assert!(names.len() >= 2, "{names:?}");
        vgpu_driver::gpu::validate_gpus(&s.gpus).unwrap();
        vgpu_driver::slice::gpu_devices(&s.gpus).unwrap();
    }

    #[test]
    fn watcher_applies_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        std::fs::write(&path, TWO).unwrap();
        let source = FakeSource::new(&path, Duration::from_millis(20));
        let state = GpuState::new(source.discover().unwrap());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let handle = source.spawn_watcher(state.clone(), stop);
        std::fs::write(&path, format!("{TWO}unhealthy:\n  GPU-a: lost\n")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while state.current().unhealthy.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(state.current().unhealthy_reason("GPU-a"), Some("lost"));
        // A broken edit keeps the last good inventory.
        std::fs::write(&path, "gpus: [").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(state.current().gpus.len(), 2);
        stop_tx.send(true).unwrap();
        handle.join().unwrap();
    }
}
