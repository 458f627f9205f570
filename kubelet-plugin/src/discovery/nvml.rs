//! Real GPUs through NVML. `libnvidia-ml.so.1` is loaded at run time (nvml-wrapper uses
//! libloading), so the binary starts on machines without a driver and says so plainly.

use super::{DiscoveryError, GpuState, Snapshot};
use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{P2pCapabilitiesIndex, P2pStatus};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use vgpu_driver::Gpu;

/// NVML's `NVML_NVLINK_MAX_LINKS`.
const MAX_NVLINKS: u32 = 18;

/// Xids caused by applications, not by the GPU: NVIDIA's device plugin skips the same set
/// (13 graphics engine exception, 31 MMU fault, 43 channel stopped, 45 preemptive cleanup,
/// 68 video processor exception, 109 context switch timeout). Every other critical Xid takes
/// the GPU out of service.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Whether a critical Xid makes the GPU unhealthy.
pub fn xid_is_fatal(xid: u64) -> bool {
    !APPLICATION_XIDS.contains(&xid)
}

/// NVML, loaded.
pub struct NvmlSource {
    nvml: Arc<Nvml>,
    sysfs_pci: std::path::PathBuf,
}

fn nvml_err(op: &str) -> impl FnOnce(NvmlError) -> DiscoveryError + '_ {
    move |e| DiscoveryError::Nvml {
        op: op.to_string(),
        message: e.to_string(),
    }
}

/// NVML writes bus ids as `00000000:3B:00.0`; sysfs and the domain model use `0000:3b:00.0`.
pub fn normalize_bus_id(id: &str) -> String {
    let id = id.trim().trim_end_matches('\0').to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            let trimmed = domain.trim_start_matches('0');
            format!("{:0>4}:{rest}", trimmed)
        }
        _ => id,
    }
}

/// `12040` → `12.4`.
pub fn cuda_version_string(v: i32) -> String {
    format!(
        "{}.{}",
        nvml_wrapper::cuda_driver_version_major(v),
        nvml_wrapper::cuda_driver_version_minor(v)
    )
}

/// The NUMA node sysfs reports for a PCI device; `-1` (no NUMA) and absence are `None`.
pub fn sysfs_numa_node(sysfs_pci: &Path, bus_id: &str) -> Option<u32> {
    let text = std::fs::read_to_string(sysfs_pci.join(bus_id).join("numa_node")).ok()?;
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

impl NvmlSource {
    /// Load NVML. A missing library is [`DiscoveryError::NvmlMissing`].
    pub fn init() -> Result<Self, DiscoveryError> {
        let nvml = Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => {
                DiscoveryError::NvmlMissing(e.to_string())
            }
            other => DiscoveryError::Nvml {
                op: "nvmlInit".into(),
                message: other.to_string(),
            },
        })?;
        Ok(NvmlSource {
            nvml: Arc::new(nvml),
            sysfs_pci: "/sys/bus/pci/devices".into(),
        })
    }

    pub fn discover(&self) -> Result<Snapshot, DiscoveryError> {
        let nvml = &self.nvml;
        let driver_version = nvml
            .sys_driver_version()
            .map_err(nvml_err("driver version"))?;
        let cuda_driver_version = cuda_version_string(
            nvml.sys_cuda_driver_version()
                .map_err(nvml_err("CUDA driver version"))?,
        );
        let count = nvml.device_count().map_err(nvml_err("device count"))?;
        let mut gpus = Vec::new();
        let mut unhealthy = BTreeMap::new();
        let mut devices = Vec::new();
        for i in 0..count {
            let device = match nvml.device_by_index(i) {
                Ok(d) => d,
                Err(NvmlError::GpuLost) => {
                    // Without a handle there is no UUID to publish under: log and skip.
                    tracing::error!(index = i, "GPU is lost (fallen off the bus); not published");
                    continue;
                }
                Err(e) => return Err(nvml_err("device by index")(e)),
            };
            let uuid = device.uuid().map_err(nvml_err("uuid"))?;
            let pci = device.pci_info().map_err(nvml_err("PCI info"))?;
            let pci_bus_id = normalize_bus_id(&pci.bus_id);
            let cc = device
                .cuda_compute_capability()
                .map_err(nvml_err("CUDA compute capability"))?;
            let multiprocessor_count = match device.attributes() {
                Ok(a) => a.multiprocessor_count,
                Err(e) => {
                    // Older drivers only answer for MIG devices; 0 means "unknown".
                    tracing::warn!(gpu = %uuid, error = %e, "multiprocessor count unavailable; publishing 0");
                    0
                }
            };
            let numa_node = device
                .numa_node_id()
                .ok()
                .or_else(|| sysfs_numa_node(&self.sysfs_pci, &pci_bus_id));
            let gpu = Gpu {
                uuid: uuid.clone(),
                index: device.index().map_err(nvml_err("index"))?,
                minor: device.minor_number().map_err(nvml_err("minor number"))?,
                product_name: device.name().map_err(nvml_err("name"))?,
                architecture: device
                    .architecture()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "Unknown".into()),
                cuda_compute_capability: format!("{}.{}", cc.major, cc.minor),
                driver_version: driver_version.clone(),
                cuda_driver_version: cuda_driver_version.clone(),
                pci_bus_id,
                numa_node,
                memory_bytes: device.memory_info().map_err(nvml_err("memory info"))?.total,
                multiprocessor_count,
                nvlink_peers: Vec::new(),
            };
            gpus.push(gpu);
            devices.push(device);
        }
        // NVLink peers: a direct link whose remote end is another GPU, or (NVSwitch systems,
        // where the remote end is a switch) NVML's P2P-over-NVLink status.
        let by_bus: BTreeMap<String, String> = gpus
            .iter()
            .map(|g| (g.pci_bus_id.clone(), g.uuid.clone()))
            .collect();
        for (i, device) in devices.iter().enumerate() {
            let mut peers = Vec::new();
            for link in 0..MAX_NVLINKS {
                let wrapper = device.link_wrapper_for(link);
                if !matches!(wrapper.is_active(), Ok(true)) {
                    continue;
                }
                if let Ok(remote) = wrapper.remote_pci_info()
                    && let Some(peer) = by_bus.get(&normalize_bus_id(&remote.bus_id))
                    && *peer != gpus[i].uuid
                {
                    peers.push(peer.clone());
                }
            }
            for (j, other) in devices.iter().enumerate() {
                if i != j
                    && matches!(
                        device.p2p_status(other, P2pCapabilitiesIndex::NvLink),
                        Ok(P2pStatus::Ok)
                    )
                {
                    peers.push(gpus[j].uuid.clone());
                }
            }
            peers.sort();
            peers.dedup();
            gpus[i].nvlink_peers = peers;
        }
        // A GPU NVML still lists but cannot fully answer for is reported, not hidden.
        for gpu in &gpus {
            if let Err(NvmlError::GpuLost) = nvml
                .device_by_uuid(gpu.uuid.as_str())
                .and_then(|d| d.memory_info())
            {
                unhealthy.insert(gpu.uuid.clone(), "GPU is lost".to_string());
            }
        }
        Ok(Snapshot { gpus, unhealthy })
    }

    /// Watch critical Xid events on every GPU; a fatal Xid or a lost GPU marks it unhealthy.
    /// NVML's event wait blocks, so this is a thread that wakes every second to check `stop`.
    pub fn spawn_watcher(
        self,
        state: GpuState,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let nvml = self.nvml;
            let uuids: Vec<String> = state
                .current()
                .gpus
                .iter()
                .map(|g| g.uuid.clone())
                .collect();
            let mut set = match nvml.create_event_set() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "NVML event set unavailable: GPU health is not watched");
                    return;
                }
            };
            for uuid in &uuids {
                let device = match nvml.device_by_uuid(uuid.as_str()) {
                    Ok(d) => d,
                    Err(e) => {
                        state.mark_unhealthy(uuid, &format!("NVML cannot open the GPU: {e}"));
                        continue;
                    }
                };
                set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(gpu = %uuid, error = %e.error, "cannot watch Xid events of this GPU");
                        match e.source {
                            // NVML freed the set; start a new one for the remaining GPUs.
                            Some(_) | None => match nvml.create_event_set() {
                                Ok(s) => s,
                                Err(_) => return,
                            },
                        }
                    }
                };
            }
            while !*stop.borrow() {
                match set.wait(1000) {
                    Ok(event) => {
                        let uuid = match event.device.uuid() {
                            Ok(u) => u,
                            Err(_) => continue,
                        };
                        match event.event_data {
                            Some(XidError::Value(xid)) if xid_is_fatal(xid) => {
                                state.mark_unhealthy(&uuid, &format!("critical Xid {xid}"));
                            }
                            Some(XidError::Value(xid)) => {
                                tracing::info!(gpu = %uuid, xid, "application Xid; GPU stays healthy");
                            }
                            Some(XidError::Unknown) | None => {
                                state.mark_unhealthy(&uuid, "critical Xid (unknown)");
                            }
                        }
                    }
                    Err(NvmlError::Timeout) => {}
                    Err(NvmlError::GpuLost) => {
                        // The wait does not say which GPU; ask each.
                        for uuid in &uuids {
                            if let Err(NvmlError::GpuLost) = nvml
                                .device_by_uuid(uuid.as_str())
                                .and_then(|d| d.memory_info())
                            {
                                state.mark_unhealthy(uuid, "GPU is lost (fallen off the bus)");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "NVML event wait failed");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_are_normalized() {
        assert_eq!(normalize_bus_id("00000000:3B:00.0"), "0000:3b:00.0");
        assert_eq!(normalize_bus_id("00000001:3B:00.0"), "0001:3b:00.0");
        assert_eq!(normalize_bus_id("0000:3b:00.0"), "0000:3b:00.0");
    }

    #[test]
    fn cuda_versions() {
        assert_eq!(cuda_version_string(12040), "12.4");
        assert_eq!(cuda_version_string(11080), "11.8");
    }

    #[test]
    fn application_xids_are_not_fatal() {
        assert!(!xid_is_fatal(13));
        assert!(!xid_is_fatal(43));
        assert!(xid_is_fatal(79));
        assert!(xid_is_fatal(48));
    }

    #[test]
    fn numa_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("0000:3b:00.0")).unwrap();
        std::fs::write(dir.path().join("0000:3b:00.0/numa_node"), "1\n").unwrap();
        std::fs::create_dir_all(dir.path().join("0000:5e:00.0")).unwrap();
        std::fs::write(dir.path().join("0000:5e:00.0/numa_node"), "-1\n").unwrap();
        assert_eq!(sysfs_numa_node(dir.path(), "0000:3b:00.0"), Some(1));
        assert_eq!(sysfs_numa_node(dir.path(), "0000:5e:00.0"), None);
        assert_eq!(sysfs_numa_node(dir.path(), "0000:00:00.0"), None);
    }

    #[test]
    fn missing_library_message_names_the_library_and_the_way_out() {
        let text =
            DiscoveryError::NvmlMissing("libnvidia-ml.so.1: cannot open shared object file".into())
                .to_string();
        assert!(
            text.starts_with("NVML (libnvidia-ml.so.1) could not be loaded"),
            "{text}"
        );
        assert!(text.contains("--fake-gpus FILE"), "{text}");
    }
}
