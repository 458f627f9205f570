//! Whole-spec validation before a spec is written (and after it is read).
//!
//! A runtime that cannot load a spec fails `CreateContainer` for every pod
//! using the claim, long after Prepare said "ok"; checking here turns that
//! into a Prepare error. The checks are those of the Go library
//! (`pkg/cdi/spec.go`, `device.go`, `container-edits.go`, `version.go`) plus a
//! few stricter ones that runtimes need in practice: container paths and hook
//! paths must be absolute, and a hook timeout must be positive.

use std::collections::HashSet;

use crate::error::{Problem, ValidationError};
use crate::name::validate_device_name;
use crate::spec::{ContainerEdits, HOOK_NAMES, Spec};
use crate::version::{Version, minimum_version};

/// Kubernetes' limit on the total size of annotations, which the Go library
/// applies to CDI annotations too.
pub const MAX_ANNOTATIONS_SIZE: usize = 256 * 1024;

type Result<T = ()> = std::result::Result<T, ValidationError>;

fn err(field: impl Into<String>, problem: impl Into<Problem>) -> ValidationError {
    ValidationError::new(field, problem)
}

/// Validates a whole spec; the first problem found is returned, naming its
/// field (e.g. `devices[2].name`).
pub fn validate_spec(spec: &Spec) -> Result {
    spec.kind
        .parse::<crate::Kind>()
        .map_err(|e| err("kind", e))?;

    let required = minimum_version(spec);
    if spec.cdi_version < required {
        return Err(err(
            "cdiVersion",
            Problem::VersionTooLow {
                declared: spec.cdi_version,
                required,
            },
        ));
    }

    validate_annotations("annotations", &spec.annotations)?;
    validate_edits("containerEdits", &spec.container_edits, spec.cdi_version)?;

    if spec.devices.is_empty() {
        return Err(err("devices", Problem::NoDevices));
    }
    let mut seen = HashSet::new();
    for (i, dev) in spec.devices.iter().enumerate() {
        let at = format!("devices[{i}]");
        validate_device_name(&dev.name).map_err(|e| err(format!("{at}.name"), e))?;
        if !seen.insert(dev.name.as_str()) {
            return Err(err(
                format!("{at}.name"),
                Problem::DuplicateDevice(dev.name.clone()),
            ));
        }
        validate_annotations(&format!("{at}.annotations"), &dev.annotations)?;
        if dev.container_edits.is_empty() {
            return Err(err(
                format!("{at}.containerEdits"),
                Problem::EmptyDeviceEdits,
            ));
        }
        validate_edits(
            &format!("{at}.containerEdits"),
            &dev.container_edits,
            spec.cdi_version,
        )?;
    }
    Ok(())
}

fn validate_env(at: &str, env: &[String]) -> Result {
    for (i, e) in env.iter().enumerate() {
        match e.find('=') {
            Some(pos) if pos > 0 => {}
            _ => return Err(err(format!("{at}[{i}]"), Problem::InvalidEnv(e.clone()))),
        }
    }
    Ok(())
}

fn validate_abs_path(at: String, path: &str) -> Result {
    if path.is_empty() {
        return Err(err(at, Problem::Empty));
    }
    if path.contains('\0') {
        return Err(err(at, Problem::NulInPath(path.to_owned())));
    }
    if !path.starts_with('/') {
        return Err(err(at, Problem::NotAbsolute(path.to_owned())));
    }
    Ok(())
}

fn validate_edits(at: &str, edits: &ContainerEdits, declared: Version) -> Result {
    validate_env(&format!("{at}.env"), &edits.env)?;

    for (i, n) in edits.device_nodes.iter().enumerate() {
        let at = format!("{at}.deviceNodes[{i}]");
        validate_abs_path(format!("{at}.path"), &n.path)?;
        if !n.host_path.is_empty() {
            validate_abs_path(format!("{at}.hostPath"), &n.host_path)?;
        }
        if !matches!(n.node_type.as_str(), "" | "b" | "c" | "u" | "p") {
            return Err(err(
                format!("{at}.type"),
                Problem::InvalidDeviceType(n.node_type.clone()),
            ));
        }
        let p = n.permissions.as_str();
        if !(p.is_empty() || p == "none" || p.chars().all(|c| matches!(c, 'r' | 'w' | 'm'))) {
            return Err(err(
                format!("{at}.permissions"),
                Problem::InvalidPermissions(p.to_owned()),
            ));
        }
    }

    for (i, h) in edits.hooks.iter().enumerate() {
        let at = format!("{at}.hooks[{i}]");
        if !HOOK_NAMES.contains(&h.hook_name.as_str()) {
            return Err(err(
                format!("{at}.hookName"),
                Problem::InvalidHookName(
                    h.hook_name.clone(),
                    "prestart, createRuntime, createContainer, startContainer, poststart, poststop",
                ),
            ));
        }
        validate_abs_path(format!("{at}.path"), &h.path)?;
        validate_env(&format!("{at}.env"), &h.env)?;
        if h.timeout == Some(0) {
            return Err(err(format!("{at}.timeout"), Problem::ZeroTimeout));
        }
    }

    for (i, m) in edits.mounts.iter().enumerate() {
        let at = format!("{at}.mounts[{i}]");
        if m.host_path.is_empty() {
            return Err(err(format!("{at}.hostPath"), Problem::Empty));
        }
        validate_abs_path(format!("{at}.containerPath"), &m.container_path)?;
    }

    if let Some(rdt) = &edits.intel_rdt {
        let at = format!("{at}.intelRdt");
        let c = rdt.clos_id.as_str();
        if c != "/" && (c.len() >= 4096 || c == "." || c == ".." || c.contains(['/', '\n'])) {
            return Err(err(
                format!("{at}.closID"),
                Problem::InvalidClosId(c.to_owned()),
            ));
        }
        if declared >= Version::V1_1_0 {
            for (set, name) in [(rdt.enable_cmt, "enableCMT"), (rdt.enable_mbm, "enableMBM")] {
                if set {
                    return Err(err(
                        format!("{at}.{name}"),
                        Problem::RemovedInVersion {
                            declared,
                            removed_in: Version::V1_1_0,
                        },
                    ));
                }
            }
        }
    }

    let mut hosts = HashSet::new();
    let mut names = HashSet::new();
    for (i, d) in edits.net_devices.iter().enumerate() {
        let at = format!("{at}.netDevices[{i}]");
        if d.host_interface_name.is_empty() {
            return Err(err(format!("{at}.hostInterfaceName"), Problem::Empty));
        }
        if d.name.is_empty() {
            return Err(err(format!("{at}.name"), Problem::Empty));
        }
        if !hosts.insert(d.host_interface_name.as_str()) {
            return Err(err(
                format!("{at}.hostInterfaceName"),
                Problem::Duplicate(d.host_interface_name.clone()),
            ));
        }
        if !names.insert(d.name.as_str()) {
            return Err(err(
                format!("{at}.name"),
                Problem::Duplicate(d.name.clone()),
            ));
        }
    }
    Ok(())
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Kubernetes `IsQualifiedName` applied to the lower-cased key, as
/// `k8s.ValidateAnnotations` does.
fn annotation_key_problem(key: &str) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    let (prefix, name) = match key.split_once('/') {
        None => (None, key.as_str()),
        Some((p, n)) => (Some(p), n),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            return Some("prefix part must not be empty");
        }
        if prefix.len() > 253 || !prefix.split('.').all(is_dns1123_label) {
            return Some("prefix part must be a lowercase DNS subdomain");
        }
    }
    if name.is_empty() {
        return Some("name part must not be empty");
    }
    if name.len() > 63 {
        return Some("name part must be at most 63 characters");
    }
    let b = name.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    if !alnum(&b[0])
        || !alnum(&b[b.len() - 1])
        || !b
            .iter()
            .all(|c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
    {
        return Some(
            "name part must consist of alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric",
        );
    }
    None
}

fn validate_annotations(
    at: &str,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result {
    let mut size = 0usize;
    for (k, v) in annotations {
        if let Some(reason) = annotation_key_problem(k) {
            return Err(err(
                format!("{at}[{k:?}]"),
                Problem::InvalidAnnotationKey {
                    key: k.clone(),
                    reason,
                },
            ));
        }
        size += k.len() + v.len();
    }
    if size > MAX_ANNOTATIONS_SIZE {
        return Err(err(
            at,
            Problem::AnnotationsTooLarge {
                size,
                limit: MAX_ANNOTATIONS_SIZE,
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Device, DeviceNode, Hook, IntelRdt, Mount, NetDevice};

    fn good() -> Spec {
        Spec {
            cdi_version: Version::V0_5_0,
            kind: "k8s.vgpu.hami.io/claim".into(),
            annotations: Default::default(),
            devices: vec![
                Device::new(
                    "0d1e-gpu-0",
                    ContainerEdits {
                        env: vec!["NVIDIA_VISIBLE_DEVICES=void".into()],
                        device_nodes: vec![DeviceNode {
                            path: "/dev/nvidia0".into(),
                            node_type: "c".into(),
                            major: Some(195),
                            minor: Some(0),
                            permissions: "rw".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ),
                Device::new(
                    "0d1e-gpu-1",
                    ContainerEdits {
                        env: vec!["X=".into()],
                        ..Default::default()
                    },
                ),
            ],
            container_edits: ContainerEdits {
                hooks: vec![Hook {
                    hook_name: "createContainer".into(),
                    path: "/usr/bin/nvidia-cdi-hook".into(),
                    args: vec!["nvidia-cdi-hook".into(), "update-ldcache".into()],
                    env: vec![],
                    timeout: Some(10),
                }],
                mounts: vec![Mount::read_only_bind("/usr/lib/x", "/usr/lib/x")],
                ..Default::default()
            },
        }
    }

    /// Applies `f` to a good spec and returns the error message.
    fn fail(f: impl FnOnce(&mut Spec)) -> String {
        let mut s = good();
        f(&mut s);
        s.validate()
            .expect_err("spec should be invalid")
            .to_string()
    }

    fn assert_starts(msg: String, prefix: &str) {
        assert!(
            msg.starts_with(prefix),
            "{msg:?} should start with {prefix:?}"
        );
    }

    #[test]
    fn good_spec_is_valid() {
        good().validate().unwrap();
    }

    #[test]
    fn kind_errors() {
        assert_starts(
            fail(|s| s.kind = "nokind".into()),
            "kind: invalid kind \"nokind\"",
        );
        assert_starts(
            fail(|s| s.kind = "-v/c".into()),
            "kind: invalid kind \"-v/c\": invalid vendor name",
        );
        assert_starts(
            fail(|s| s.kind = "v/c-".into()),
            "kind: invalid kind \"v/c-\": invalid class name",
        );
    }

    #[test]
    fn version_below_minimum_is_refused() {
        let msg = fail(|s| s.cdi_version = Version::V0_4_0);
        assert_eq!(
            msg,
            "cdiVersion: spec version 0.4.0 is below the minimum 0.5.0 its content needs"
        );
    }

    #[test]
    fn device_errors_name_the_device() {
        assert_eq!(
            fail(|s| s.devices[1].name = "-x".into()),
            "devices[1].name: invalid device name \"-x\": must start with a letter or digit"
        );
        assert_eq!(
            fail(|s| s.devices[1].name = s.devices[0].name.clone()),
            "devices[1].name: duplicate device name \"0d1e-gpu-0\""
        );
        assert_eq!(
            fail(|s| s.devices[1].container_edits = ContainerEdits::default()),
            "devices[1].containerEdits: device has no container edits"
        );
        assert_eq!(fail(|s| s.devices.clear()), "devices: spec has no devices");
    }

    #[test]
    fn env_errors() {
        assert_starts(
            fail(|s| s.devices[0].container_edits.env.push("=x".into())),
            "devices[0].containerEdits.env[1]: invalid environment entry \"=x\"",
        );
        assert_starts(
            fail(|s| s.container_edits.env.push("NOVALUE".into())),
            "containerEdits.env[0]: invalid environment entry \"NOVALUE\"",
        );
        assert_starts(
            fail(|s| s.container_edits.hooks[0].env.push("".into())),
            "containerEdits.hooks[0].env[0]: invalid environment entry",
        );
    }

    #[test]
    fn device_node_errors() {
        fn node(s: &mut Spec) -> &mut DeviceNode {
            &mut s.devices[0].container_edits.device_nodes[0]
        }
        assert_eq!(
            fail(|s| node(s).path = "dev/nvidia0".into()),
            "devices[0].containerEdits.deviceNodes[0].path: path \"dev/nvidia0\" is not absolute"
        );
        assert_eq!(
            fail(|s| node(s).path = String::new()),
            "devices[0].containerEdits.deviceNodes[0].path: must not be empty"
        );
        assert_starts(
            fail(|s| node(s).host_path = "nvidia0".into()),
            "devices[0].containerEdits.deviceNodes[0].hostPath: path \"nvidia0\" is not absolute",
        );
        assert_starts(
            fail(|s| node(s).path = "/dev/a\0b".into()),
            "devices[0].containerEdits.deviceNodes[0].path: path \"/dev/a\\0b\" contains a NUL",
        );
        assert_starts(
            fail(|s| node(s).node_type = "x".into()),
            "devices[0].containerEdits.deviceNodes[0].type: invalid device type \"x\"",
        );
        assert_starts(
            fail(|s| node(s).permissions = "rwx".into()),
            "devices[0].containerEdits.deviceNodes[0].permissions: invalid permissions \"rwx\"",
        );
        for ok in ["", "r", "rwm", "mw", "none"] {
            let mut s = good();
            node(&mut s).permissions = ok.into();
            s.validate().unwrap();
        }
    }

    #[test]
    fn hook_errors() {
        assert_starts(
            fail(|s| s.container_edits.hooks[0].hook_name = "prestop".into()),
            "containerEdits.hooks[0].hookName: invalid hook name \"prestop\"",
        );
        assert_eq!(
            fail(|s| s.container_edits.hooks[0].path = "nvidia-cdi-hook".into()),
            "containerEdits.hooks[0].path: path \"nvidia-cdi-hook\" is not absolute"
        );
        assert_starts(
            fail(|s| s.container_edits.hooks[0].timeout = Some(0)),
            "containerEdits.hooks[0].timeout:",
        );
        for name in HOOK_NAMES {
            let mut s = good();
            s.container_edits.hooks[0].hook_name = name.into();
            s.validate().unwrap();
        }
    }

    #[test]
    fn mount_errors() {
        assert_eq!(
            fail(|s| s.container_edits.mounts[0].container_path = "usr/lib".into()),
            "containerEdits.mounts[0].containerPath: path \"usr/lib\" is not absolute"
        );
        assert_eq!(
            fail(|s| s.container_edits.mounts[0].host_path = String::new()),
            "containerEdits.mounts[0].hostPath: must not be empty"
        );
    }

    #[test]
    fn intel_rdt_and_net_device_errors() {
        let mut base = good();
        base.cdi_version = Version::V1_1_0;
        let fail11 = |f: &dyn Fn(&mut Spec)| {
            let mut s = base.clone();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert_starts(
            fail11(&|s| {
                s.container_edits.intel_rdt = Some(IntelRdt {
                    clos_id: "a/b".into(),
                    ..Default::default()
                })
            }),
            "containerEdits.intelRdt.closID: invalid closID \"a/b\"",
        );
        assert_eq!(
            fail11(&|s| {
                s.container_edits.intel_rdt = Some(IntelRdt {
                    enable_cmt: true,
                    ..Default::default()
                })
            }),
            "containerEdits.intelRdt.enableCMT: field is not valid in spec version 1.1.0 (removed in 1.1.0)"
        );
        // enableMBM is fine below 1.1.0.
        let mut s = good();
        s.cdi_version = Version::V1_0_0;
        s.container_edits.intel_rdt = Some(IntelRdt {
            enable_mbm: true,
            clos_id: "/".into(),
            ..Default::default()
        });
        s.validate().unwrap();

        let nd = |h: &str, n: &str| NetDevice {
            host_interface_name: h.into(),
            name: n.into(),
        };
        assert_eq!(
            fail11(&|s| s.devices[1].container_edits.net_devices = vec![nd("eth0", "")]),
            "devices[1].containerEdits.netDevices[0].name: must not be empty"
        );
        assert_eq!(
            fail11(&|s| {
                s.devices[1].container_edits.net_devices = vec![nd("eth0", "a"), nd("eth0", "b")]
            }),
            "devices[1].containerEdits.netDevices[1].hostInterfaceName: duplicate value \"eth0\""
        );
        assert_eq!(
            fail11(&|s| {
                s.devices[1].container_edits.net_devices = vec![nd("eth0", "a"), nd("eth1", "a")]
            }),
            "devices[1].containerEdits.netDevices[1].name: duplicate value \"a\""
        );
    }

    #[test]
    fn annotation_errors() {
        let mut s = good();
        s.cdi_version = Version::V0_6_0;
        s.annotations
            .insert("vgpu.hami.io/claim-uid".into(), "x".into());
        s.devices[0]
            .annotations
            .insert("Upper.Case_ok".into(), "y".into());
        s.validate().unwrap();

        let mut bad = s.clone();
        bad.devices[0].annotations.insert("a/b/c".into(), "".into());
        assert_starts(
            bad.validate().unwrap_err().to_string(),
            "devices[0].annotations[\"a/b/c\"]: invalid annotation key \"a/b/c\"",
        );
        let mut bad = s.clone();
        bad.annotations.insert("-x".into(), "".into());
        assert_starts(
            bad.validate().unwrap_err().to_string(),
            "annotations[\"-x\"]: invalid annotation key",
        );
        let mut bad = s;
        bad.annotations
            .insert("big".into(), "x".repeat(MAX_ANNOTATIONS_SIZE));
        assert_starts(
            bad.validate().unwrap_err().to_string(),
            "annotations: annotations total",
        );
    }
}
