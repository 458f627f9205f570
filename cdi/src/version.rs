//! CDI spec versions and the minimum version a spec's content needs.
//!
//! Runtimes vendor CDI libraries of different ages and refuse a spec whose
//! `cdiVersion` they do not know, so we write the lowest version that can
//! express the content. The rules mirror `specs-go/version.go`
//! (`requiresV040` .. `requiresV110`) of the reference Go library.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::VersionError;
use crate::spec::{ContainerEdits, Spec};

/// A released CDI spec version this crate can read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Version {
    /// Earliest version runtimes accept.
    V0_3_0,
    /// `mounts[].type`.
    V0_4_0,
    /// `deviceNodes[].hostPath`; device names starting with a digit.
    V0_5_0,
    /// `annotations` on spec and devices; `.` in the class.
    V0_6_0,
    /// `intelRdt`, `additionalGids`.
    V0_7_0,
    /// API-only change.
    V0_8_0,
    /// API-only change.
    V1_0_0,
    /// `netDevices`, `intelRdt.schemata`, `intelRdt.enableMonitoring`;
    /// `intelRdt.enableCMT`/`enableMBM` removed.
    V1_1_0,
}

impl Version {
    pub const EARLIEST: Version = Version::V0_3_0;
    pub const LATEST: Version = Version::V1_1_0;
    pub const ALL: [Version; 8] = [
        Version::V0_3_0,
        Version::V0_4_0,
        Version::V0_5_0,
        Version::V0_6_0,
        Version::V0_7_0,
        Version::V0_8_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_4_0 => "0.4.0",
            Version::V0_5_0 => "0.5.0",
            Version::V0_6_0 => "0.6.0",
            Version::V0_7_0 => "0.7.0",
            Version::V0_8_0 => "0.8.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Version {
    type Err = VersionError;

    /// Accepts `X.Y.Z` with an optional leading `v`, as the Go library does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s.strip_prefix('v').unwrap_or(s);
        Version::ALL
            .into_iter()
            .find(|v| v.as_str() == bare)
            .ok_or_else(|| VersionError(s.to_owned()))
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn all_edits(spec: &Spec) -> impl Iterator<Item = &ContainerEdits> {
    std::iter::once(&spec.container_edits).chain(spec.devices.iter().map(|d| &d.container_edits))
}

fn requires_v110(spec: &Spec) -> bool {
    all_edits(spec).any(|e| {
        !e.net_devices.is_empty()
            || e.intel_rdt
                .as_ref()
                .is_some_and(|r| r.schemata.is_some() || r.enable_monitoring)
    })
}

fn requires_v070(spec: &Spec) -> bool {
    all_edits(spec).any(|e| e.intel_rdt.is_some() || !e.additional_gids.is_empty())
}

fn requires_v060(spec: &Spec) -> bool {
    !spec.annotations.is_empty()
        || spec.devices.iter().any(|d| !d.annotations.is_empty())
        || spec
            .kind
            .split_once('/')
            .is_some_and(|(_, class)| class.contains('.'))
}

fn requires_v050(spec: &Spec) -> bool {
    spec.devices
        .iter()
        .any(|d| d.name.as_bytes().first().is_some_and(u8::is_ascii_digit))
        || all_edits(spec).any(|e| e.device_nodes.iter().any(|n| !n.host_path.is_empty()))
}

fn requires_v040(spec: &Spec) -> bool {
    all_edits(spec).any(|e| e.mounts.iter().any(|m| !m.mount_type.is_empty()))
}

/// The lowest spec version that can express `spec`'s content (at least
/// [`Version::EARLIEST`]). Ignores the declared `cdiVersion`.
pub fn minimum_version(spec: &Spec) -> Version {
    type Rule = (Version, fn(&Spec) -> bool);
    let rules: [Rule; 5] = [
        (Version::V1_1_0, requires_v110),
        (Version::V0_7_0, requires_v070),
        (Version::V0_6_0, requires_v060),
        (Version::V0_5_0, requires_v050),
        (Version::V0_4_0, requires_v040),
    ];
    rules
        .into_iter()
        .find(|(_, required)| required(spec))
        .map_or(Version::EARLIEST, |(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Device, DeviceNode, IntelRdt, Mount, NetDevice};

    fn base() -> Spec {
        Spec {
            cdi_version: Version::LATEST,
            kind: "vendor.com/gpu".into(),
            annotations: Default::default(),
            devices: vec![Device::new(
                "gpu",
                ContainerEdits {
                    env: vec!["A=B".into()],
                    ..Default::default()
                },
            )],
            container_edits: Default::default(),
        }
    }

    #[test]
    fn parse_and_display() {
        for v in Version::ALL {
            assert_eq!(v.as_str().parse::<Version>(), Ok(v));
            assert_eq!(format!("v{v}").parse::<Version>(), Ok(v));
        }
        for bad in ["0.2.0", "0.9.0", "1.1", "", "v", "1.1.0 "] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?}");
        }
        assert!(Version::V0_3_0 < Version::V0_5_0 && Version::V1_0_0 < Version::V1_1_0);
        assert_eq!(
            serde_json::to_string(&Version::V0_5_0).unwrap(),
            "\"0.5.0\""
        );
    }

    #[test]
    fn base_needs_0_3_0() {
        assert_eq!(minimum_version(&base()), Version::V0_3_0);
    }

    #[test]
    fn mount_type_needs_0_4_0_at_spec_and_device_level() {
        let m = Mount {
            host_path: "tmpfs".into(),
            container_path: "/x".into(),
            options: vec![],
            mount_type: "tmpfs".into(),
        };
        let mut s = base();
        s.container_edits.mounts.push(m.clone());
        assert_eq!(minimum_version(&s), Version::V0_4_0);
        let mut s = base();
        s.devices[0].container_edits.mounts.push(m.clone());
        assert_eq!(minimum_version(&s), Version::V0_4_0);
        // A mount without type does not.
        let mut s = base();
        s.devices[0].container_edits.mounts.push(Mount {
            mount_type: String::new(),
            ..m
        });
        assert_eq!(minimum_version(&s), Version::V0_3_0);
    }

    #[test]
    fn host_path_or_digit_name_needs_0_5_0() {
        let mut s = base();
        s.devices[0].container_edits.device_nodes.push(DeviceNode {
            path: "/dev/a".into(),
            host_path: "/dev/b".into(),
            ..Default::default()
        });
        assert_eq!(minimum_version(&s), Version::V0_5_0);
        let mut s = base();
        s.container_edits.device_nodes.push(DeviceNode {
            path: "/dev/a".into(),
            host_path: "/dev/b".into(),
            ..Default::default()
        });
        assert_eq!(minimum_version(&s), Version::V0_5_0);
        let mut s = base();
        s.devices[0].name = "0a1b-gpu-0".into();
        assert_eq!(minimum_version(&s), Version::V0_5_0);
        s.devices[0].name = "a1b-gpu-0".into();
        assert_eq!(minimum_version(&s), Version::V0_3_0);
    }

    #[test]
    fn annotations_or_dotted_class_need_0_6_0() {
        let mut s = base();
        s.annotations.insert("a".into(), "b".into());
        assert_eq!(minimum_version(&s), Version::V0_6_0);
        let mut s = base();
        s.devices[0].annotations.insert("a".into(), "b".into());
        assert_eq!(minimum_version(&s), Version::V0_6_0);
        let mut s = base();
        s.kind = "vendor.com/gpu.slice".into();
        assert_eq!(minimum_version(&s), Version::V0_6_0);
        // Dots in the vendor do not count.
        s.kind = "a.b.c/gpu".into();
        assert_eq!(minimum_version(&s), Version::V0_3_0);
    }

    #[test]
    fn intel_rdt_or_gids_need_0_7_0() {
        let mut s = base();
        s.devices[0].container_edits.intel_rdt = Some(IntelRdt::default());
        assert_eq!(minimum_version(&s), Version::V0_7_0);
        let mut s = base();
        s.container_edits.intel_rdt = Some(IntelRdt {
            enable_cmt: true,
            ..Default::default()
        });
        assert_eq!(minimum_version(&s), Version::V0_7_0);
        let mut s = base();
        s.container_edits.additional_gids = vec![44];
        assert_eq!(minimum_version(&s), Version::V0_7_0);
        let mut s = base();
        s.devices[0].container_edits.additional_gids = vec![44];
        assert_eq!(minimum_version(&s), Version::V0_7_0);
    }

    #[test]
    fn net_devices_and_new_rdt_fields_need_1_1_0() {
        let mut s = base();
        s.devices[0].container_edits.net_devices = vec![NetDevice {
            host_interface_name: "eth1".into(),
            name: "net1".into(),
        }];
        assert_eq!(minimum_version(&s), Version::V1_1_0);
        let mut s = base();
        s.container_edits.net_devices = s.devices[0].container_edits.net_devices.clone();
        s.container_edits.net_devices.push(NetDevice {
            host_interface_name: "eth1".into(),
            name: "n".into(),
        });
        assert_eq!(minimum_version(&s), Version::V1_1_0);
        let mut s = base();
        s.container_edits.intel_rdt = Some(IntelRdt {
            schemata: Some(vec![]),
            ..Default::default()
        });
        assert_eq!(minimum_version(&s), Version::V1_1_0);
        let mut s = base();
        s.devices[0].container_edits.intel_rdt = Some(IntelRdt {
            enable_monitoring: true,
            ..Default::default()
        });
        assert_eq!(minimum_version(&s), Version::V1_1_0);
    }

    #[test]
    fn highest_rule_wins() {
        let mut s = base();
        s.devices[0].name = "0gpu".into(); // 0.5.0
        s.annotations.insert("a".into(), "b".into()); // 0.6.0
        s.container_edits.mounts.push(Mount {
            host_path: "/a".into(),
            container_path: "/b".into(),
            options: vec![],
            mount_type: "bind".into(),
        }); // 0.4.0
        assert_eq!(minimum_version(&s), Version::V0_6_0);
    }
}
