//! Property tests: the name validators accept exactly what reference regexes
//! (transcribed from the Go parser's rules) accept, and valid names
//! round-trip through formatting and parsing.

use std::sync::LazyLock;

use proptest::prelude::*;
use regex::Regex;
use vgpu_cdi::{
    ContainerEdits, Device, Kind, QualifiedDevice, Spec, Version, minimum_version,
    validate_class_name, validate_device_name, validate_vendor_name,
};

const VENDOR_CLASS: &str = r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?";
const DEVICE: &str = r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?";

static VENDOR_CLASS_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^{VENDOR_CLASS}$")).unwrap());
static DEVICE_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(&format!("^{DEVICE}$")).unwrap());
static KIND_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!("^({VENDOR_CLASS})/({VENDOR_CLASS})$")).unwrap());
static QUALIFIED_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!("^({VENDOR_CLASS})/({VENDOR_CLASS})=({DEVICE})$")).unwrap()
});

fn vendor_class() -> impl Strategy<Value = String> {
    "[A-Za-z]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?"
}

fn device() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]([A-Za-z0-9_.:-]{0,20}[A-Za-z0-9])?"
}

/// Arbitrary strings, biased towards the characters that matter.
fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,10}",
        "[A-Za-z0-9_.:/= é-]{0,8}",
        "[a-z0-9][a-z0-9_.:-]{0,6}[a-z0-9_.:-]",
        vendor_class(),
        device(),
    ]
}

fn any_qualified() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_.:/=-]{0,16}",
        (any_name(), any_name(), any_name()).prop_map(|(v, c, d)| format!("{v}/{c}={d}")),
        (vendor_class(), vendor_class(), any_name()).prop_map(|(v, c, d)| format!("{v}/{c}={d}")),
        (vendor_class(), any_name(), device()).prop_map(|(v, c, d)| format!("{v}/{c}={d}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn vendor_accepted_iff_reference_matches(s in any_name()) {
        prop_assert_eq!(validate_vendor_name(&s).is_ok(), VENDOR_CLASS_RE.is_match(&s), "{:?}", s);
    }

    #[test]
    fn class_accepted_iff_reference_matches(s in any_name()) {
        prop_assert_eq!(validate_class_name(&s).is_ok(), VENDOR_CLASS_RE.is_match(&s), "{:?}", s);
    }

    #[test]
    fn device_accepted_iff_reference_matches(s in any_name()) {
        prop_assert_eq!(validate_device_name(&s).is_ok(), DEVICE_RE.is_match(&s), "{:?}", s);
    }

    #[test]
    fn valid_names_are_accepted(v in vendor_class(), d in device()) {
        prop_assert!(validate_vendor_name(&v).is_ok());
        prop_assert!(validate_class_name(&v).is_ok());
        prop_assert!(validate_device_name(&d).is_ok());
    }

    #[test]
    fn kind_round_trips(v in vendor_class(), c in vendor_class()) {
        let kind = Kind::new(v.clone(), c.clone()).unwrap();
        let text = kind.to_string();
        prop_assert_eq!(&text, &format!("{v}/{c}"));
        let back: Kind = text.parse().unwrap();
        prop_assert_eq!(back.vendor(), v.as_str());
        prop_assert_eq!(back.class(), c.as_str());
        prop_assert_eq!(back, kind);
    }

    #[test]
    fn kind_parses_iff_reference_matches(s in prop_oneof![
        "[A-Za-z0-9_.:/=-]{0,12}",
        (any_name(), any_name()).prop_map(|(v, c)| format!("{v}/{c}")),
    ]) {
        let parsed = s.parse::<Kind>();
        prop_assert_eq!(parsed.is_ok(), KIND_RE.is_match(&s), "{:?}", s);
        if let Ok(kind) = parsed {
            let caps = KIND_RE.captures(&s).unwrap();
            prop_assert_eq!(kind.vendor(), &caps[1]);
            prop_assert_eq!(kind.class(), &caps[2]);
        }
    }

    #[test]
    fn qualified_ids_round_trip(v in vendor_class(), c in vendor_class(), d in device()) {
        let dev = QualifiedDevice::new(&v, &c, &d).unwrap();
        let text = dev.to_string();
        prop_assert_eq!(&text, &format!("{v}/{c}={d}"));
        let back: QualifiedDevice = text.parse().unwrap();
        prop_assert_eq!(back.vendor(), v.as_str());
        prop_assert_eq!(back.class(), c.as_str());
        prop_assert_eq!(back.name(), d.as_str());
        prop_assert_eq!(back.kind(), &Kind::new(v, c).unwrap());
    }

    #[test]
    fn qualified_ids_parse_iff_reference_matches(s in any_qualified()) {
        let parsed = s.parse::<QualifiedDevice>();
        prop_assert_eq!(parsed.is_ok(), QUALIFIED_RE.is_match(&s), "{:?}: {:?}", s, parsed);
        if let Ok(dev) = parsed {
            let caps = QUALIFIED_RE.captures(&s).unwrap();
            prop_assert_eq!(dev.vendor(), &caps[1]);
            prop_assert_eq!(dev.class(), &caps[2]);
            prop_assert_eq!(dev.name(), &caps[3]);
            prop_assert_eq!(dev.to_string(), s);
        }
    }

    /// Version nuances of names: a leading digit in a device name needs
    /// 0.5.0, a '.' in the class 0.6.0; nothing else about names does.
    #[test]
    fn name_driven_minimum_version(c in vendor_class(), d in device()) {
        let kind = Kind::new("example.com", c.clone()).unwrap();
        let spec = Spec::new(&kind, vec![Device::new(d.clone(), ContainerEdits {
            env: vec!["A=1".into()],
            ..Default::default()
        })]);
        let expected = if c.contains('.') {
            Version::V0_6_0
        } else if d.starts_with(|ch: char| ch.is_ascii_digit()) {
            Version::V0_5_0
        } else {
            Version::V0_3_0
        };
        prop_assert_eq!(minimum_version(&spec), expected);
        prop_assert_eq!(spec.cdi_version, expected);
        prop_assert!(spec.validate().is_ok());
    }
}
