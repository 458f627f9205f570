//! Shared by the integration tests: the official CDI JSON schemas and the
//! specs the tests produce.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;
use vgpu_cdi::{
    ContainerEdits, Device, DeviceNode, Hook, IntelRdt, Kind, Mount, NetDevice, Spec, Version,
};

/// The schema versions every produced spec must satisfy.
pub const SCHEMA_VERSIONS: [&str; 2] = ["1.1.0", "0.8.0"];

/// `$CDI_SCHEMA_DIR`, else `<workspace>/../shared/cdi-schema`.
pub fn schema_dir() -> PathBuf {
    match std::env::var_os("CDI_SCHEMA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/cdi-schema"),
    }
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read CDI JSON schema file {}: {e}. The schema tests need the official \
             schemas in <dir>/<version>/{{schema.json,defs.json}}; set CDI_SCHEMA_DIR to that \
             directory (default: {})",
            path.display(),
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/cdi-schema")
                .display()
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("schema file {} is not JSON: {e}", path.display()))
}

/// The official schema of one CDI version, with its `defs.json` registered
/// so the relative `$ref`s resolve offline.
pub struct Schema {
    pub version: &'static str,
    validator: jsonschema::Validator,
}

impl Schema {
    pub fn load(version: &'static str) -> Self {
        let dir = schema_dir().join(version);
        assert!(
            dir.is_dir(),
            "CDI schema directory {} is missing: the schema tests cannot run without the \
             official schemas. Set CDI_SCHEMA_DIR to a directory containing {}/schema.json \
             and {}/defs.json.",
            dir.display(),
            version,
            version
        );
        let schema = read_json(&dir.join("schema.json"));
        let defs = read_json(&dir.join("defs.json"));
        let base = format!("file:///cdi-schema/{version}/");
        let registry = jsonschema::Registry::new()
            .add(format!("{base}defs.json"), defs)
            .expect("register defs.json")
            .prepare()
            .expect("prepare schema registry");
        let validator = jsonschema::options()
            .with_base_uri(format!("{base}schema.json"))
            .with_registry(&registry)
            .build(&schema)
            .unwrap_or_else(|e| panic!("cannot compile CDI schema {version}: {e}"));
        Self { version, validator }
    }

    /// The schema errors for `doc`, empty if valid.
    pub fn errors(&self, doc: &Value) -> Vec<String> {
        self.validator
            .iter_errors(doc)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect()
    }
}

pub fn schemas() -> Vec<Schema> {
    SCHEMA_VERSIONS.into_iter().map(Schema::load).collect()
}

/// Panics unless `doc` is valid under every official schema.
pub fn assert_schema_valid(schemas: &[Schema], what: &str, doc: &Value) {
    for schema in schemas {
        let errors = schema.errors(doc);
        assert!(
            errors.is_empty(),
            "{what} is invalid under CDI schema {}: {errors:#?}\n{doc:#}",
            schema.version
        );
    }
}

pub const CLAIM_UID: &str = "0b7e9c2a-5d41-4f3e-9a8b-1c2d3e4f5a6b";

pub fn claim_kind() -> Kind {
    "k8s.vgpu.hami.io/claim".parse().unwrap()
}

fn char_node(path: &str, major: i64, minor: i64) -> DeviceNode {
    DeviceNode {
        path: path.into(),
        node_type: "c".into(),
        major: Some(major),
        minor: Some(minor),
        permissions: "rw".into(),
        file_mode: Some(0o666),
        ..Default::default()
    }
}

/// What the kubelet plugin writes for a claim with two vGPU slices.
pub fn gpu_claim_spec(uid: &str) -> Spec {
    let slice = |index: u32, minor: i64, mem_mib: u32, cores: u32| {
        Device::new(
            format!("{uid}-gpu-{index}"),
            ContainerEdits {
                env: vec![
                    format!("CUDA_DEVICE_MEMORY_LIMIT_{index}={mem_mib}m"),
                    format!("CUDA_DEVICE_SM_LIMIT_{index}={cores}"),
                    format!(
                        "NVIDIA_VISIBLE_DEVICES=GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd"
                    ),
                ],
                device_nodes: vec![char_node(&format!("/dev/nvidia{minor}"), 195, minor)],
                ..Default::default()
            },
        )
    };
    let mut spec = Spec::new(
        &claim_kind(),
        vec![slice(0, 0, 4096, 30), slice(1, 1, 8192, 50)],
    );
    spec.container_edits = ContainerEdits {
        env: vec![
            "CUDA_DEVICE_MEMORY_SHARED_CACHE=/usr/local/vgpu/cache/claim.cache".into(),
            "LD_PRELOAD=/usr/local/vgpu/libvgpu.so".into(),
        ],
        device_nodes: vec![
            char_node("/dev/nvidiactl", 195, 255),
            DeviceNode {
                path: "/dev/nvidia-uvm".into(),
                host_path: "/dev/nvidia-uvm".into(),
                node_type: "c".into(),
                major: Some(508),
                minor: Some(0),
                permissions: "rwm".into(),
                uid: Some(0),
                gid: Some(0),
                ..Default::default()
            },
        ],
        hooks: vec![Hook {
            hook_name: "createContainer".into(),
            path: "/usr/bin/nvidia-cdi-hook".into(),
            args: vec![
                "nvidia-cdi-hook".into(),
                "update-ldcache".into(),
                "--folder".into(),
                "/usr/lib/x86_64-linux-gnu".into(),
            ],
            env: vec!["PATH=/usr/bin:/bin".into()],
            timeout: Some(30),
        }],
        mounts: vec![
            Mount::read_only_bind("/usr/local/vgpu/libvgpu.so", "/usr/local/vgpu/libvgpu.so"),
            Mount::read_only_bind(
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
            ),
            Mount {
                host_path: format!("/var/lib/vgpu/claims/{uid}"),
                container_path: "/usr/local/vgpu/cache".into(),
                options: vec!["rw".into(), "nosuid".into(), "nodev".into(), "bind".into()],
                mount_type: String::new(),
            },
        ],
        ..Default::default()
    };
    spec.set_minimum_version();
    spec
}

/// The smallest valid spec.
pub fn minimal_spec() -> Spec {
    let kind: Kind = "example.com/gpu".parse().unwrap();
    Spec::new(
        &kind,
        vec![Device::new(
            "gpu",
            ContainerEdits {
                env: vec!["A=1".into()],
                ..Default::default()
            },
        )],
    )
}

/// One spec per version-gated feature, with the minimum version it needs.
pub fn feature_specs() -> Vec<(&'static str, Spec, Version)> {
    let with = |f: &dyn Fn(&mut Spec)| {
        let mut s = minimal_spec();
        f(&mut s);
        s.set_minimum_version();
        s
    };
    vec![
        ("minimal", minimal_spec(), Version::V0_3_0),
        (
            "mount type",
            with(&|s| {
                s.devices[0].container_edits.mounts.push(Mount {
                    host_path: "tmpfs".into(),
                    container_path: "/scratch".into(),
                    options: vec!["size=64m".into()],
                    mount_type: "tmpfs".into(),
                })
            }),
            Version::V0_4_0,
        ),
        (
            "device node hostPath",
            with(&|s| {
                s.container_edits.device_nodes.push(DeviceNode {
                    path: "/dev/nvidia0".into(),
                    host_path: "/dev/nvidia3".into(),
                    ..Default::default()
                })
            }),
            Version::V0_5_0,
        ),
        (
            "device name starting with a digit",
            with(&|s| s.devices[0].name = format!("{CLAIM_UID}-gpu-0")),
            Version::V0_5_0,
        ),
        (
            "spec annotations",
            with(&|s| {
                s.annotations
                    .insert("vgpu.hami.io/claim".into(), "default/c".into());
            }),
            Version::V0_6_0,
        ),
        (
            "device annotations",
            with(&|s| {
                s.devices[0]
                    .annotations
                    .insert("vgpu.hami.io/gpu-uuid".into(), "GPU-1".into());
            }),
            Version::V0_6_0,
        ),
        (
            "dot in class",
            with(&|s| s.kind = "example.com/gpu.slice".into()),
            Version::V0_6_0,
        ),
        (
            "intelRdt (0.7 fields)",
            with(&|s| {
                s.container_edits.intel_rdt = Some(IntelRdt {
                    clos_id: "clos1".into(),
                    l3_cache_schema: "L3:0=ff".into(),
                    mem_bw_schema: "MB:0=70".into(),
                    enable_cmt: true,
                    enable_mbm: true,
                    ..Default::default()
                })
            }),
            Version::V0_7_0,
        ),
        (
            "additionalGids",
            with(&|s| s.devices[0].container_edits.additional_gids = vec![44, 109]),
            Version::V0_7_0,
        ),
        (
            "netDevices",
            with(&|s| {
                s.devices[0].container_edits.net_devices = vec![NetDevice {
                    host_interface_name: "eth1".into(),
                    name: "net1".into(),
                }]
            }),
            Version::V1_1_0,
        ),
        (
            "intelRdt.schemata",
            with(&|s| {
                s.devices[0].container_edits.intel_rdt = Some(IntelRdt {
                    schemata: Some(vec!["L3:0=ff".into(), "MB:0=50".into()]),
                    ..Default::default()
                })
            }),
            Version::V1_1_0,
        ),
        (
            "intelRdt.enableMonitoring",
            with(&|s| {
                s.container_edits.intel_rdt = Some(IntelRdt {
                    enable_monitoring: true,
                    ..Default::default()
                })
            }),
            Version::V1_1_0,
        ),
        ("gpu claim", gpu_claim_spec(CLAIM_UID), Version::V0_5_0),
    ]
}
