//! The CDI spec of one prepared claim (pure: no I/O).
//!
//! One CDI device per (claim, main request), named `<claimUID>-<request>`, carrying every GPU
//! of that request. The kubelet hands a container the CDI ids of the requests it asked for, so
//! one device per request means one consistent `CUDA_VISIBLE_DEVICES` and one set of
//! `CUDA_DEVICE_MEMORY_LIMIT_<i>` per container. Remaining limitation: a container that asks
//! for two requests of one claim gets both devices' edits, and the later device's environment
//! variables win (the runtime merges edits in order); use one request per container for
//! sliced GPUs.
//!
//! The limits use HAMi-core's variable names and value formats (HAMi's device plugin,
//! `Allocate`: `CUDA_DEVICE_MEMORY_LIMIT_<i>=<MiB>m`, `CUDA_DEVICE_SM_LIMIT=<percent>`,
//! `CUDA_DEVICE_MEMORY_SHARED_CACHE=<path>.cache`, library preloaded through a mounted
//! `/etc/ld.so.preload`), so HAMi-core's own `libvgpu.so` works unchanged.

use std::path::Path;
use vgpu_cdi::{ContainerEdits, Device, DeviceNode, Kind, Mount, Spec};

/// Where the enforcement library appears in containers (HAMi's path).
pub const CONTAINER_LIBRARY_PATH: &str = "/usr/local/vgpu/libvgpu.so";
/// Where the per-claim shared directory appears in containers.
pub const CONTAINER_SHARED_DIR: &str = "/usr/local/vgpu/shared";
/// The preload file the dynamic linker reads in every process of the container.
pub const CONTAINER_PRELOAD_PATH: &str = "/etc/ld.so.preload";
/// The CDI class of our per-claim specs: kind `k8s.<driver>/claim`.
pub const CDI_CLASS: &str = "claim";

/// The CDI kind of a driver's claim specs.
pub fn claim_kind(driver: &str) -> Result<Kind, vgpu_cdi::ParseError> {
    Kind::new(format!("k8s.{driver}"), CDI_CLASS)
}

/// `<claimUID>-<request>`, and `-<shareID>` when the kube-scheduler allocated a share of the
/// device natively: one CDI device per share, as the upstream HAMi DRA driver names them.
pub fn device_name(claim_uid: &str, request: &str, share_id: Option<&str>) -> String {
    match share_id {
        Some(share) => format!("{claim_uid}-{request}-{share}"),
        None => format!("{claim_uid}-{request}"),
    }
}

/// The accounting file of a request's containers in the claim's shared directory: the
/// enforcement library writes it, the plugin's usage metrics read it.
pub fn accounting_file_name(request: &str) -> String {
    format!("{request}.cache")
}

/// The content of the plugin-written preload file.
pub fn preload_file_content() -> String {
    format!("{CONTAINER_LIBRARY_PATH}\n")
}

/// One GPU of a request, with what the claim may use of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuLimit {
    pub uuid: String,
    /// `/dev/nvidia<minor>`.
    pub node: DeviceNode,
    pub memory_bytes: u64,
    /// Percent of the GPU's SMs; 0 and 100 both mean "not throttled" to HAMi-core.
    pub cores: u8,
}

/// The GPUs of one main request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestDevices {
    /// Main request name (`/subrequest` stripped).
    pub request: String,
    /// Admin access: the GPUs without any limit, no preload (monitoring, debugging).
    pub admin_access: bool,
    /// The shareID of the request's first device, when allocated natively.
    pub share_id: Option<String>,
    /// In allocation order: index `i` of `CUDA_DEVICE_MEMORY_LIMIT_<i>` is the position here.
    pub gpus: Vec<GpuLimit>,
}

/// Host-side paths and nodes shared by every device of the claim.
#[derive(Clone, Debug)]
pub struct ClaimSpecParams<'a> {
    pub kind: &'a Kind,
    pub claim_uid: &'a str,
    /// Host path of the enforcement library (`--enforcement-library`).
    pub enforcement_library: &'a Path,
    /// Host path of the plugin-written ld.so.preload file.
    pub preload_file: &'a Path,
    /// Host path of this claim's shared directory (`<plugin-dir>/claims/<uid>`).
    pub shared_dir: &'a Path,
    /// `/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/nvidia-uvm-tools` as found on the node.
    pub control_nodes: &'a [DeviceNode],
}

/// Why a spec cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CdiSpecError {
    #[error("request {0:?} has no GPUs")]
    EmptyRequest(String),
    #[error("CDI device name {name:?}: {source}")]
    Name {
        name: String,
        #[source]
        source: vgpu_cdi::NameError,
    },
    #[error("the claim's CDI spec is invalid: {0}")]
    Invalid(#[from] vgpu_cdi::ValidationError),
}

fn mib_limit(bytes: u64) -> String {
    // HAMi-core reads "<n>m" as MiB; 0 would mean "no limit", so never write it.
    format!("{}m", (bytes >> 20).max(1))
}

/// The container edits of one request's device.
pub fn request_edits(params: &ClaimSpecParams<'_>, request: &RequestDevices) -> ContainerEdits {
    let uuids: Vec<&str> = request.gpus.iter().map(|g| g.uuid.as_str()).collect();
    let visible = uuids.join(",");
    let mut env = vec![
        format!("NVIDIA_VISIBLE_DEVICES={visible}"),
        format!("CUDA_VISIBLE_DEVICES={visible}"),
    ];
    let mut device_nodes: Vec<DeviceNode> = request.gpus.iter().map(|g| g.node.clone()).collect();
    device_nodes.extend(params.control_nodes.iter().cloned());
    let mut mounts = Vec::new();
    if !request.admin_access {
        for (i, gpu) in request.gpus.iter().enumerate() {
            env.push(format!(
                "CUDA_DEVICE_MEMORY_LIMIT_{i}={}",
                mib_limit(gpu.memory_bytes)
            ));
        }
        // HAMi-core takes one SM limit per container; every GPU of a request has the same
        // configuration, so the first one's is the request's.
        let cores = request.gpus.first().map_or(0, |g| g.cores);
        env.push(format!("CUDA_DEVICE_SM_LIMIT={cores}"));
        env.push(format!(
            "CUDA_DEVICE_MEMORY_SHARED_CACHE={CONTAINER_SHARED_DIR}/{}",
            accounting_file_name(&request.request)
        ));
        mounts.push(Mount {
            host_path: params.shared_dir.display().to_string(),
            container_path: CONTAINER_SHARED_DIR.into(),
            options: vec!["rw".into(), "nosuid".into(), "nodev".into(), "bind".into()],
            mount_type: String::new(),
        });
        mounts.push(Mount::read_only_bind(
            params.enforcement_library.display().to_string(),
            CONTAINER_LIBRARY_PATH,
        ));
        mounts.push(Mount::read_only_bind(
            params.preload_file.display().to_string(),
            CONTAINER_PRELOAD_PATH,
        ));
    }
    ContainerEdits {
        env,
        device_nodes,
        mounts,
        ..Default::default()
    }
}

/// The claim's spec: one device per request, `cdiVersion` the minimum its content needs.
pub fn build_claim_spec(
    params: &ClaimSpecParams<'_>,
    requests: &[RequestDevices],
) -> Result<Spec, CdiSpecError> {
    let mut devices = Vec::with_capacity(requests.len());
    for request in requests {
        if request.gpus.is_empty() {
            return Err(CdiSpecError::EmptyRequest(request.request.clone()));
        }
        let name = device_name(
            params.claim_uid,
            &request.request,
            request.share_id.as_deref(),
        );
        vgpu_cdi::validate_device_name(&name).map_err(|source| CdiSpecError::Name {
            name: name.clone(),
            source,
        })?;
        devices.push(Device::new(name, request_edits(params, request)));
    }
    let spec = Spec::new(params.kind, devices);
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn node(path: &str, major: i64, minor: i64) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            node_type: "c".into(),
            major: Some(major),
            minor: Some(minor),
            file_mode: Some(0o666),
            ..Default::default()
        }
    }

    fn params_with<'a>(
        kind: &'a Kind,
        control: &'a [DeviceNode],
        paths: &'a [PathBuf; 3],
    ) -> ClaimSpecParams<'a> {
        ClaimSpecParams {
            kind,
            claim_uid: "0b6f3c1e-5d0a-4c8e-9f11-2a7e8c3d4b5a",
            enforcement_library: &paths[0],
            preload_file: &paths[1],
            shared_dir: &paths[2],
            control_nodes: control,
        }
    }

    #[test]
    fn two_gpu_slice_uses_hami_names_and_formats() {
        let kind = claim_kind("vgpu.hami.io").unwrap();
        let control = [node("/dev/nvidiactl", 195, 255)];
        let paths = [
            PathBuf::from("/usr/local/vgpu/libvgpu.so"),
            PathBuf::from("/var/lib/kubelet/plugins/vgpu.hami.io/ld.so.preload"),
            PathBuf::from("/var/lib/kubelet/plugins/vgpu.hami.io/claims/u"),
        ];
        let params = params_with(&kind, &control, &paths);
        let request = RequestDevices {
            request: "gpu".into(),
            share_id: None,
            admin_access: false,
            gpus: vec![
                GpuLimit {
                    uuid: "GPU-a".into(),
                    node: node("/dev/nvidia0", 195, 0),
                    memory_bytes: 4 << 30,
                    cores: 30,
                },
                GpuLimit {
                    uuid: "GPU-b".into(),
                    node: node("/dev/nvidia3", 195, 3),
                    memory_bytes: 4 << 30,
                    cores: 30,
                },
            ],
        };
        let spec = build_claim_spec(&params, std::slice::from_ref(&request)).unwrap();
        assert_eq!(
            spec.cdi_version.as_str(),
            "0.5.0",
            "names start with a digit"
        );
        assert_eq!(spec.kind, "k8s.vgpu.hami.io/claim");
        let v = serde_json::to_value(&spec.devices[0]).unwrap();
        assert_eq!(v["name"], "0b6f3c1e-5d0a-4c8e-9f11-2a7e8c3d4b5a-gpu");
        assert_eq!(
            v["containerEdits"]["env"],
            json!([
                "NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b",
                "CUDA_VISIBLE_DEVICES=GPU-a,GPU-b",
                "CUDA_DEVICE_MEMORY_LIMIT_0=4096m",
                "CUDA_DEVICE_MEMORY_LIMIT_1=4096m",
                "CUDA_DEVICE_SM_LIMIT=30",
                "CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/shared/gpu.cache",
            ])
        );
        let mounts = &v["containerEdits"]["mounts"];
        assert_eq!(mounts[0]["containerPath"], CONTAINER_SHARED_DIR);
        assert_eq!(mounts[0]["options"][0], "rw");
        assert_eq!(mounts[1]["hostPath"], "/usr/local/vgpu/libvgpu.so");
        assert_eq!(mounts[1]["options"][0], "ro");
        assert_eq!(mounts[2]["containerPath"], "/etc/ld.so.preload");
        let nodes = &v["containerEdits"]["deviceNodes"];
        assert_eq!(nodes.as_array().unwrap().len(), 3);
        assert_eq!(nodes[1]["path"], "/dev/nvidia3");
        assert_eq!(nodes[2]["minor"], 255);
    }

    #[test]
    fn admin_access_has_no_limits_and_no_preload() {
        let kind = claim_kind("vgpu.hami.io").unwrap();
        let paths = [
            PathBuf::from("/l"),
            PathBuf::from("/p"),
            PathBuf::from("/s"),
        ];
        let params = params_with(&kind, &[], &paths);
        let request = RequestDevices {
            request: "monitor".into(),
            share_id: None,
            admin_access: true,
            gpus: vec![GpuLimit {
                uuid: "GPU-a".into(),
                node: node("/dev/nvidia0", 195, 0),
                memory_bytes: 1,
                cores: 1,
            }],
        };
        let spec = build_claim_spec(&params, &[request]).unwrap();
        let edits = &spec.devices[0].container_edits;
        assert_eq!(
            edits.env,
            vec!["NVIDIA_VISIBLE_DEVICES=GPU-a", "CUDA_VISIBLE_DEVICES=GPU-a"]
        );
        assert!(edits.mounts.is_empty());
    }

    #[test]
    fn tiny_limits_never_become_unlimited_and_bad_names_are_refused() {
        assert_eq!(mib_limit(1), "1m");
        assert_eq!(mib_limit(3 << 20), "3m");
        let kind = claim_kind("vgpu.hami.io").unwrap();
        let paths = [
            PathBuf::from("/l"),
            PathBuf::from("/p"),
            PathBuf::from("/s"),
        ];
        let mut params = params_with(&kind, &[], &paths);
        params.claim_uid = "bad uid";
        let request = RequestDevices {
            request: "gpu".into(),
            share_id: None,
            admin_access: false,
            gpus: vec![GpuLimit {
                uuid: "GPU-a".into(),
                node: node("/dev/nvidia0", 195, 0),
                memory_bytes: 1,
                cores: 1,
            }],
        };
        assert!(matches!(
            build_claim_spec(&params, std::slice::from_ref(&request)),
            Err(CdiSpecError::Name { .. })
        ));
        params.claim_uid = "u";
        let empty = RequestDevices {
            gpus: vec![],
            ..request
        };
        assert!(matches!(
            build_claim_spec(&params, &[empty]),
            Err(CdiSpecError::EmptyRequest(_))
        ));
    }
}
