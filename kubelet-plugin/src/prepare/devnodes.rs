//! The NVIDIA device nodes a container needs, with their real major/minor numbers.
//!
//! CDI lets the spec carry type/major/minor so the runtime can create the node itself; we read
//! them from the host's nodes when they exist. Without them (fake GPUs, or a plugin started
//! before the driver created the nodes) we use NVIDIA's fixed character major 195
//! (`/dev/nvidia<minor>`, `/dev/nvidiactl` = minor 255) and read `nvidia-uvm`'s dynamic major
//! from /proc/devices; if that is not there either, the uvm nodes are left out with a warning.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use vgpu_cdi::DeviceNode;

/// NVIDIA's registered character-device major for `/dev/nvidia*`.
pub const NVIDIA_MAJOR: i64 = 195;
/// Minor of `/dev/nvidiactl`.
pub const NVIDIACTL_MINOR: i64 = 255;
/// The mode of NVIDIA's device nodes on a host (crw-rw-rw-).
const DEFAULT_MODE: u32 = 0o666;

/// Where to look for the host's device nodes and the kernel's device list.
#[derive(Clone, Debug)]
pub struct DeviceNodes {
    dev_dir: PathBuf,
    proc_devices: PathBuf,
}

/// Major number of a driver in /proc/devices' "Character devices" section.
pub fn char_major(proc_devices: &str, driver: &str) -> Option<i64> {
    let mut in_char = false;
    for line in proc_devices.lines() {
        let line = line.trim();
        if line.eq_ignore_ascii_case("Character devices:") {
            in_char = true;
            continue;
        }
        if line.eq_ignore_ascii_case("Block devices:") {
            in_char = false;
            continue;
        }
        if !in_char {
            continue;
        }
        let mut parts = line.split_whitespace();
        if let (Some(major), Some(name)) = (parts.next(), parts.next())
            && name == driver
        {
            return major.parse().ok();
        }
    }
    None
}

impl DeviceNodes {
    /// `dev_dir`: the host's /dev; `proc_devices`: the kernel's /proc/devices.
    pub fn new(dev_dir: impl Into<PathBuf>, proc_devices: impl Into<PathBuf>) -> Self {
        DeviceNodes {
            dev_dir: dev_dir.into(),
            proc_devices: proc_devices.into(),
        }
    }

    /// Below a host root (`/` normally; where the host is mounted in a container otherwise).
    pub fn under_root(root: &Path) -> Self {
        Self::new(root.join("dev"), root.join("proc/devices"))
    }

    fn stat(&self, name: &str) -> Option<DeviceNode> {
        let meta = std::fs::metadata(self.dev_dir.join(name)).ok()?;
        if !meta.file_type().is_char_device() {
            return None;
        }
        let rdev = meta.rdev();
        Some(DeviceNode {
            path: format!("/dev/{name}"),
            node_type: "c".into(),
            major: Some(nix::sys::stat::major(rdev) as i64),
            minor: Some(nix::sys::stat::minor(rdev) as i64),
            file_mode: Some(meta.mode() & 0o777),
            ..Default::default()
        })
    }

    fn fixed(name: &str, major: i64, minor: i64) -> DeviceNode {
        DeviceNode {
            path: format!("/dev/{name}"),
            node_type: "c".into(),
            major: Some(major),
            minor: Some(minor),
            file_mode: Some(DEFAULT_MODE),
            ..Default::default()
        }
    }

    /// `/dev/nvidia<minor>`.
    pub fn gpu(&self, minor: u32) -> DeviceNode {
        let name = format!("nvidia{minor}");
        self.stat(&name)
            .unwrap_or_else(|| Self::fixed(&name, NVIDIA_MAJOR, minor.into()))
    }

    /// `/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools`.
    pub fn control(&self) -> Vec<DeviceNode> {
        let mut nodes = vec![
            self.stat("nvidiactl")
                .unwrap_or_else(|| Self::fixed("nvidiactl", NVIDIA_MAJOR, NVIDIACTL_MINOR)),
        ];
        // /proc/devices is read only when a node is missing: on a node with the driver
        // loaded, a prepare makes no read beyond the stats.
        let uvm_major = std::cell::LazyCell::new(|| {
            std::fs::read_to_string(&self.proc_devices)
                .ok()
                .and_then(|text| char_major(&text, "nvidia-uvm"))
        });
        for (name, minor) in [("nvidia-uvm", 0), ("nvidia-uvm-tools", 1)] {
            match self.stat(name) {
                Some(node) => nodes.push(node),
                None => match *uvm_major {
                    Some(major) => nodes.push(Self::fixed(name, major, minor)),
                    None => tracing::warn!(
                        node = name,
                        proc_devices = %self.proc_devices.display(),
                        "no /dev/{name} and no nvidia-uvm major in /proc/devices: leaving it out of CDI specs (CUDA needs it on a real node)"
                    ),
                },
            }
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "Character devices:\n  1 mem\n195 nvidia-frontend\n506 nvidia-uvm\n507 nvidia-nvswitch\n\nBlock devices:\n  8 sd\n";

    #[test]
    fn majors_from_proc_devices() {
        assert_eq!(char_major(PROC, "nvidia-uvm"), Some(506));
        assert_eq!(char_major(PROC, "nvidia-frontend"), Some(195));
        assert_eq!(
            char_major(PROC, "sd"),
            None,
            "block devices are not character devices"
        );
        assert_eq!(char_major("garbage", "nvidia-uvm"), None);
    }

    #[test]
    fn fallbacks_without_host_nodes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev")).unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(dir.path().join("proc/devices"), PROC).unwrap();
        // A regular file where a node should be is not a device: fall back.
        std::fs::write(dir.path().join("dev/nvidia2"), "").unwrap();
        let nodes = DeviceNodes::under_root(dir.path());
        let gpu = nodes.gpu(2);
        assert_eq!(
            (gpu.path.as_str(), gpu.major, gpu.minor),
            ("/dev/nvidia2", Some(195), Some(2))
        );
        let control = nodes.control();
        let summary: Vec<(String, Option<i64>, Option<i64>)> = control
            .iter()
            .map(|n| (n.path.clone(), n.major, n.minor))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("/dev/nvidiactl".into(), Some(195), Some(255)),
                ("/dev/nvidia-uvm".into(), Some(506), Some(0)),
                ("/dev/nvidia-uvm-tools".into(), Some(506), Some(1)),
            ]
        );
        std::fs::remove_file(dir.path().join("proc/devices")).unwrap();
        assert_eq!(
            nodes.control().len(),
            1,
            "uvm nodes are left out without a major"
        );
    }

    #[test]
    fn real_character_devices_are_statted() {
        // /dev/null is 1:3 on every Linux system.
        let nodes = DeviceNodes::new("/dev", "/proc/devices");
        let null = nodes.stat("null").unwrap();
        assert_eq!(
            (null.major, null.minor, null.node_type.as_str()),
            (Some(1), Some(3), "c")
        );
    }
}
