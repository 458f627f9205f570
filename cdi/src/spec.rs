//! The CDI spec document (versions 0.3.0 to 1.1.0) as serde types.
//!
//! Field names and omission rules follow the Go types in
//! `tags.cncf.io/container-device-interface/specs-go`: optional and empty
//! fields are left out on output, so a spec that uses no newer feature
//! serializes to something an older runtime can read. Unknown fields are
//! rejected on input, as the Go library does (`yaml.UnmarshalStrict`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ParseError, ValidationError};
use crate::name::Kind;
use crate::version::{Version, minimum_version};

fn is_false(b: &bool) -> bool {
    !*b
}

/// A CDI spec: one kind and the devices of that kind, plus edits applied
/// whenever any of its devices is requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub cdi_version: Version,
    /// `vendor/class`; kept as a string so a spec read from disk keeps what
    /// was there. [`Spec::parsed_kind`] validates it.
    pub kind: String,
    /// Added in 0.6.0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub devices: Vec<Device>,
    #[serde(default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

/// One device a container can request as `kind=name`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Device {
    pub name: String,
    /// Added in 0.6.0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub container_edits: ContainerEdits,
}

/// Edits a runtime makes to the container's OCI spec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    /// `KEY=VALUE` entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Added in 0.7.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intel_rdt: Option<IntelRdt>,
    /// Added in 0.7.0.
    #[serde(
        default,
        rename = "additionalGids",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub additional_gids: Vec<u32>,
    /// Added in 1.1.0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_devices: Vec<NetDevice>,
}

impl ContainerEdits {
    /// True if these edits change nothing (valid for a spec, not a device).
    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.device_nodes.is_empty()
            && self.hooks.is_empty()
            && self.mounts.is_empty()
            && self.intel_rdt.is_none()
            && self.additional_gids.is_empty()
            && self.net_devices.is_empty()
    }
}

/// A device node to create in the container (and allow in its cgroup).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    /// Path in the container; absolute.
    pub path: String,
    /// Path on the host if different from `path`. Added in 0.5.0.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_path: String,
    /// `b`, `c`, `u` or `p`; empty lets the runtime stat the host node.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub node_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    /// cgroup access, letters from `rwm` (or `none`); empty means `rwm`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub permissions: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// An OCI hook to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// One of [`HOOK_NAMES`].
    pub hook_name: String,
    /// Absolute path of the executable.
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Seconds; must be > 0 if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u32>,
}

/// The hook names CDI (and OCI) recognise.
pub const HOOK_NAMES: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// A mount to add to the container.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    pub host_path: String,
    /// Absolute path in the container.
    pub container_path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Added in 0.4.0.
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub mount_type: String,
}

impl Mount {
    /// A read-only bind mount of `host_path` at `container_path`.
    pub fn read_only_bind(host_path: impl Into<String>, container_path: impl Into<String>) -> Self {
        Self {
            host_path: host_path.into(),
            container_path: container_path.into(),
            options: vec!["ro".into(), "nosuid".into(), "nodev".into(), "bind".into()],
            mount_type: String::new(),
        }
    }
}

/// Intel RDT settings. Added in 0.7.0; `schemata` and `enableMonitoring`
/// added and `enableCMT`/`enableMBM` removed in 1.1.0.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntelRdt {
    #[serde(default, rename = "closID", skip_serializing_if = "String::is_empty")]
    pub clos_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub l3_cache_schema: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mem_bw_schema: String,
    /// 1.1.0 and later. `Some(vec![])` is written as `[]` and still needs 1.1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schemata: Option<Vec<String>>,
    /// 1.1.0 and later.
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_monitoring: bool,
    /// 0.7.0 to 1.0.x only.
    #[serde(default, rename = "enableCMT", skip_serializing_if = "is_false")]
    pub enable_cmt: bool,
    /// 0.7.0 to 1.0.x only.
    #[serde(default, rename = "enableMBM", skip_serializing_if = "is_false")]
    pub enable_mbm: bool,
}

/// A host network interface to move into the container. Added in 1.1.0.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetDevice {
    pub host_interface_name: String,
    pub name: String,
}

impl Spec {
    /// A spec of `kind` with `devices`, no spec-wide edits, and `cdiVersion`
    /// set to the minimum its content needs.
    pub fn new(kind: &Kind, devices: Vec<Device>) -> Self {
        let mut spec = Self {
            cdi_version: Version::EARLIEST,
            kind: kind.to_string(),
            annotations: BTreeMap::new(),
            devices,
            container_edits: ContainerEdits::default(),
        };
        spec.cdi_version = minimum_version(&spec);
        spec
    }

    /// The validated kind.
    pub fn parsed_kind(&self) -> Result<Kind, ParseError> {
        self.kind.parse()
    }

    /// Sets `cdiVersion` to the minimum version the content needs.
    pub fn set_minimum_version(&mut self) -> Version {
        self.cdi_version = minimum_version(self);
        self.cdi_version
    }

    /// Checks everything a CDI runtime would check when loading this spec
    /// (see [`crate::validate_spec`]).
    pub fn validate(&self) -> Result<(), ValidationError> {
        crate::validate::validate_spec(self)
    }

    /// Parses JSON (rejecting unknown fields) and validates the result.
    pub fn from_json(bytes: &[u8]) -> Result<Self, crate::Error> {
        let spec: Spec = serde_json::from_slice(bytes).map_err(|source| crate::Error::Parse {
            path: "<memory>".into(),
            source,
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Pretty JSON, as written to spec files.
    pub fn to_json_pretty(&self) -> Result<Vec<u8>, crate::Error> {
        let mut out = serde_json::to_vec_pretty(self).map_err(crate::Error::Encode)?;
        out.push(b'\n');
        Ok(out)
    }
}

impl Device {
    /// A device with the given name and edits, no annotations.
    pub fn new(name: impl Into<String>, container_edits: ContainerEdits) -> Self {
        Self {
            name: name.into(),
            annotations: BTreeMap::new(),
            container_edits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_and_default_fields_are_omitted() {
        let kind: Kind = "vendor.com/gpu".parse().unwrap();
        let spec = Spec::new(
            &kind,
            vec![Device::new(
                "gpu0",
                ContainerEdits {
                    device_nodes: vec![DeviceNode {
                        path: "/dev/nvidia0".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            )],
        );
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            v,
            json!({
                "cdiVersion": "0.3.0",
                "kind": "vendor.com/gpu",
                "devices": [{
                    "name": "gpu0",
                    "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}
                }]
            })
        );
    }

    #[test]
    fn all_fields_use_cdi_json_names() {
        let edits = ContainerEdits {
            env: vec!["A=1".into()],
            device_nodes: vec![DeviceNode {
                path: "/dev/x".into(),
                host_path: "/dev/y".into(),
                node_type: "c".into(),
                major: Some(195),
                minor: Some(0),
                file_mode: Some(0o666),
                permissions: "rw".into(),
                uid: Some(0),
                gid: Some(44),
            }],
            hooks: vec![Hook {
                hook_name: "createContainer".into(),
                path: "/bin/true".into(),
                args: vec!["true".into()],
                env: vec!["B=2".into()],
                timeout: Some(5),
            }],
            mounts: vec![Mount {
                host_path: "/h".into(),
                container_path: "/c".into(),
                options: vec!["ro".into()],
                mount_type: "bind".into(),
            }],
            intel_rdt: Some(IntelRdt {
                clos_id: "c1".into(),
                l3_cache_schema: "L3:0=f".into(),
                mem_bw_schema: "MB:0=50".into(),
                schemata: Some(vec!["L2:0=3".into()]),
                enable_monitoring: true,
                enable_cmt: true,
                enable_mbm: true,
            }),
            additional_gids: vec![5],
            net_devices: vec![NetDevice {
                host_interface_name: "eth1".into(),
                name: "net0".into(),
            }],
        };
        let v = serde_json::to_value(&edits).unwrap();
        let keys = |v: &serde_json::Value| {
            v.as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<String>>()
        };
        let mut top = keys(&v);
        top.sort();
        assert_eq!(
            top,
            [
                "additionalGids",
                "deviceNodes",
                "env",
                "hooks",
                "intelRdt",
                "mounts",
                "netDevices"
            ]
        );
        let mut dn = keys(&v["deviceNodes"][0]);
        dn.sort();
        assert_eq!(
            dn,
            [
                "fileMode",
                "gid",
                "hostPath",
                "major",
                "minor",
                "path",
                "permissions",
                "type",
                "uid"
            ]
        );
        let mut rdt = keys(&v["intelRdt"]);
        rdt.sort();
        assert_eq!(
            rdt,
            [
                "closID",
                "enableCMT",
                "enableMBM",
                "enableMonitoring",
                "l3CacheSchema",
                "memBwSchema",
                "schemata"
            ]
        );
        assert_eq!(v["hooks"][0]["hookName"], "createContainer");
        assert_eq!(v["mounts"][0]["containerPath"], "/c");
        assert_eq!(v["mounts"][0]["type"], "bind");
        assert_eq!(v["netDevices"][0]["hostInterfaceName"], "eth1");
        let back: ContainerEdits = serde_json::from_value(v).unwrap();
        assert_eq!(back, edits);
    }

    #[test]
    fn unknown_fields_are_rejected_at_every_level() {
        let base = json!({
            "cdiVersion": "0.5.0",
            "kind": "v.com/c",
            "devices": [{"name": "d", "containerEdits": {"deviceNodes": [{"path": "/dev/x"}]}}]
        });
        assert!(serde_json::from_value::<Spec>(base.clone()).is_ok());
        let mut top = base.clone();
        top["extra"] = json!(1);
        let mut dev = base.clone();
        dev["devices"][0]["extra"] = json!(1);
        let mut node = base.clone();
        node["devices"][0]["containerEdits"]["deviceNodes"][0]["extra"] = json!(1);
        let mut edits = base;
        edits["devices"][0]["containerEdits"]["extra"] = json!(1);
        for bad in [top, dev, node, edits] {
            let err = serde_json::from_value::<Spec>(bad).unwrap_err().to_string();
            assert!(err.contains("unknown field `extra`"), "{err}");
        }
    }

    #[test]
    fn unknown_version_is_rejected_on_read() {
        let v = json!({"cdiVersion": "0.9.0", "kind": "v.com/c", "devices": []});
        let err = serde_json::from_value::<Spec>(v).unwrap_err().to_string();
        assert!(err.contains("0.9.0"), "{err}");
    }
}
