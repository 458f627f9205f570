//! CDI names: vendor, class, device, kind (`vendor/class`) and fully
//! qualified device IDs (`vendor/class=name`).
//!
//! The rules are those of the reference Go parser
//! (`tags.cncf.io/container-device-interface/pkg/parser`): a runtime that
//! vendors it must accept every name we hand to kubelet, so we accept exactly
//! what it accepts. The parser itself is version-agnostic; names that need a
//! newer spec version (device name starting with a digit: 0.5.0, `.` in the
//! class: 0.6.0) are handled by [`crate::minimum_version`].
//!
//! One deliberate difference: the Go parser panics on a one-character vendor
//! or class name (it slices `name[1:0]`); here such a name is simply checked
//! (a single letter is valid).

use std::fmt;
use std::str::FromStr;

use crate::error::{NameError, NameKind, ParseError};

fn is_letter(c: char) -> bool {
    c.is_ascii_alphabetic()
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

fn validate(
    name: &str,
    kind: NameKind,
    start_ok: fn(char) -> bool,
    expected_start: &'static str,
    inner_ok: fn(char) -> bool,
) -> Result<(), NameError> {
    let mut chars = name.char_indices();
    let Some((_, first)) = chars.next() else {
        return Err(NameError::Empty { kind });
    };
    if !start_ok(first) {
        return Err(NameError::InvalidStart {
            kind,
            name: name.to_owned(),
            expected: expected_start,
        });
    }
    let last_index = name.len() - name.chars().next_back().map_or(0, char::len_utf8);
    for (index, ch) in chars {
        if index == last_index {
            if !is_alnum(ch) {
                return Err(NameError::InvalidEnd {
                    kind,
                    name: name.to_owned(),
                });
            }
        } else if !inner_ok(ch) {
            return Err(NameError::InvalidChar {
                kind,
                name: name.to_owned(),
                ch,
                index,
            });
        }
    }
    Ok(())
}

fn vendor_class_inner(c: char) -> bool {
    is_alnum(c) || matches!(c, '_' | '-' | '.')
}

fn device_inner(c: char) -> bool {
    is_alnum(c) || matches!(c, '_' | '-' | '.' | ':')
}

/// Checks a vendor name like Go `parser.ValidateVendorName`: ASCII letter
/// first, ASCII letter or digit last, letters, digits, `_`, `-`, `.` between.
pub fn validate_vendor_name(vendor: &str) -> Result<(), NameError> {
    validate(
        vendor,
        NameKind::Vendor,
        is_letter,
        "a letter",
        vendor_class_inner,
    )
}

/// Checks a class name like Go `parser.ValidateClassName` (same rules as the
/// vendor). A `.` in the class needs spec version 0.6.0.
pub fn validate_class_name(class: &str) -> Result<(), NameError> {
    validate(
        class,
        NameKind::Class,
        is_letter,
        "a letter",
        vendor_class_inner,
    )
}

/// Checks a device name like Go `parser.ValidateDeviceName`: ASCII letter or
/// digit first and last; letters, digits, `_`, `-`, `.`, `:` between. A leading
/// digit needs spec version 0.5.0.
pub fn validate_device_name(name: &str) -> Result<(), NameError> {
    validate(
        name,
        NameKind::Device,
        is_alnum,
        "a letter or digit",
        device_inner,
    )
}

/// A validated CDI kind, `vendor/class`. Kubernetes drivers conventionally use
/// vendor `k8s.<driver-name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Kind {
    vendor: String,
    class: String,
}

impl Kind {
    /// Builds a kind from its parts, validating both.
    pub fn new(vendor: impl Into<String>, class: impl Into<String>) -> Result<Self, ParseError> {
        let (vendor, class) = (vendor.into(), class.into());
        let input = format!("{vendor}/{class}");
        validate_vendor_name(&vendor).map_err(|source| ParseError::Name {
            what: "kind",
            input: input.clone(),
            source,
        })?;
        validate_class_name(&class).map_err(|source| ParseError::Name {
            what: "kind",
            input,
            source,
        })?;
        Ok(Self { vendor, class })
    }

    pub fn vendor(&self) -> &str {
        &self.vendor
    }

    pub fn class(&self) -> &str {
        &self.class
    }

    /// The fully qualified ID of device `name` of this kind.
    pub fn device(&self, name: &str) -> Result<QualifiedDevice, ParseError> {
        QualifiedDevice::new(&self.vendor, &self.class, name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vendor, self.class)
    }
}

impl FromStr for Kind {
    type Err = ParseError;

    /// Parses `vendor/class` (splitting at the first `/`, as Go
    /// `parser.ParseQualifier` does) and validates both parts.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((vendor, class)) if !vendor.is_empty() && !class.is_empty() => {
                Kind::new(vendor, class).map_err(|e| match e {
                    ParseError::Name { what, source, .. } => ParseError::Name {
                        what,
                        input: s.to_owned(),
                        source,
                    },
                    other => other,
                })
            }
            _ => Err(ParseError::MalformedKind {
                input: s.to_owned(),
            }),
        }
    }
}

/// A validated fully qualified CDI device ID, `vendor/class=name`, the form
/// kubelet passes to the runtime in `cdi_device_ids`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QualifiedDevice {
    kind: Kind,
    name: String,
}

impl QualifiedDevice {
    /// Builds a qualified device ID, validating all three parts.
    pub fn new(vendor: &str, class: &str, name: &str) -> Result<Self, ParseError> {
        let input = format!("{vendor}/{class}={name}");
        let wrap = |source| ParseError::Name {
            what: "qualified device",
            input: input.clone(),
            source,
        };
        validate_vendor_name(vendor).map_err(wrap)?;
        validate_class_name(class).map_err(wrap)?;
        validate_device_name(name).map_err(wrap)?;
        Ok(Self {
            kind: Kind {
                vendor: vendor.to_owned(),
                class: class.to_owned(),
            },
            name: name.to_owned(),
        })
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    pub fn vendor(&self) -> &str {
        self.kind.vendor()
    }

    pub fn class(&self) -> &str {
        self.kind.class()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for QualifiedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.kind, self.name)
    }
}

impl FromStr for QualifiedDevice {
    type Err = ParseError;

    /// Parses `vendor/class=name` like Go `parser.ParseQualifiedName`: split
    /// at the first `=`, then the qualifier at its first `/`; every part must
    /// be non-empty and valid.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || ParseError::MalformedDevice {
            input: s.to_owned(),
        };
        if s.starts_with('/') {
            return Err(malformed());
        }
        let (qualifier, name) = s.split_once('=').ok_or_else(malformed)?;
        let (vendor, class) = qualifier.split_once('/').ok_or_else(malformed)?;
        if vendor.is_empty() || class.is_empty() || name.is_empty() {
            return Err(malformed());
        }
        QualifiedDevice::new(vendor, class, name).map_err(|e| match e {
            ParseError::Name { what, source, .. } => ParseError::Name {
                what,
                input: s.to_owned(),
                source,
            },
            other => other,
        })
    }
}

/// True if `device` is a valid fully qualified device ID.
pub fn is_qualified_name(device: &str) -> bool {
    device.parse::<QualifiedDevice>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_names() {
        for ok in ["nvidia.com", "k8s.vgpu.hami.io", "a", "A_b-c.d9", "x1"] {
            assert_eq!(validate_vendor_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            validate_vendor_name(""),
            Err(NameError::Empty {
                kind: NameKind::Vendor
            })
        );
        assert!(matches!(
            validate_vendor_name("1abc"),
            Err(NameError::InvalidStart { .. })
        ));
        assert!(matches!(
            validate_vendor_name("abc-"),
            Err(NameError::InvalidEnd { .. })
        ));
        assert_eq!(
            validate_vendor_name("ab/c"),
            Err(NameError::InvalidChar {
                kind: NameKind::Vendor,
                name: "ab/c".into(),
                ch: '/',
                index: 2
            })
        );
        assert!(validate_vendor_name("aé1").is_err());
        assert!(validate_vendor_name("é").is_err());
    }

    #[test]
    fn class_names() {
        assert_eq!(validate_class_name("claim"), Ok(()));
        assert_eq!(validate_class_name("gpu.slice"), Ok(()));
        assert!(validate_class_name("0gpu").is_err());
        assert!(validate_class_name("gpu:0").is_err());
        assert!(validate_class_name("gpu.").is_err());
    }

    #[test]
    fn device_names() {
        for ok in [
            "0",
            "gpu0",
            "3f2a0c1e-1b2c-4d5e-8f90-0123456789ab-gpu-0",
            "a:b",
            "A.b_c",
        ] {
            assert_eq!(validate_device_name(ok), Ok(()), "{ok}");
        }
        assert!(validate_device_name("").is_err());
        assert!(validate_device_name("-x").is_err());
        assert!(validate_device_name("x-").is_err());
        assert!(validate_device_name("x:").is_err());
        assert!(validate_device_name("a=b").is_err());
        assert!(validate_device_name("a b").is_err());
    }

    #[test]
    fn name_error_messages_name_the_input() {
        let e = validate_device_name("-x").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid device name \"-x\": must start with a letter or digit"
        );
        let e = validate_vendor_name("a$b").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid vendor name \"a$b\": invalid character '$' at byte 1"
        );
    }

    #[test]
    fn kind_parse_and_format() {
        let k: Kind = "k8s.vgpu.hami.io/claim".parse().unwrap();
        assert_eq!(k.vendor(), "k8s.vgpu.hami.io");
        assert_eq!(k.class(), "claim");
        assert_eq!(k.to_string(), "k8s.vgpu.hami.io/claim");
        for bad in ["", "/", "a/", "/b", "noslash", "a/b/c", "a/-b", "1a/b"] {
            assert!(bad.parse::<Kind>().is_err(), "{bad:?} should not parse");
        }
        assert!(matches!(
            "a/b/c".parse::<Kind>(),
            Err(ParseError::Name {
                source: NameError::InvalidChar { ch: '/', .. },
                ..
            })
        ));
    }

    #[test]
    fn qualified_device_parse_and_format() {
        let d = QualifiedDevice::new("k8s.vgpu.hami.io", "claim", "1234-gpu-0").unwrap();
        assert_eq!(d.to_string(), "k8s.vgpu.hami.io/claim=1234-gpu-0");
        let back: QualifiedDevice = d.to_string().parse().unwrap();
        assert_eq!(back, d);
        assert_eq!(back.vendor(), "k8s.vgpu.hami.io");
        assert_eq!(back.class(), "claim");
        assert_eq!(back.name(), "1234-gpu-0");
        for bad in [
            "",
            "/dev/nvidia0",
            "vendor/class",
            "vendor/class=",
            "=name",
            "vendor=name",
            "/class=name",
            "vendor/=name",
            "vendor/class=na=me",
            "vendor/class=-x",
        ] {
            assert!(!is_qualified_name(bad), "{bad:?} should not parse");
        }
        let k: Kind = "nvidia.com/gpu".parse().unwrap();
        assert_eq!(k.device("0").unwrap().to_string(), "nvidia.com/gpu=0");
    }
}
