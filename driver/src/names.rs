//! Kubernetes name rules that the resource.k8s.io API enforces on what we publish.

/// Longest DNS label (device names, request names).
pub const DNS_LABEL_MAX: usize = 63;
/// Longest DNS subdomain (driver names are capped lower, at [`DRIVER_NAME_MAX`]).
pub const DNS_SUBDOMAIN_MAX: usize = 253;
/// Longest driver name (`DriverNameMaxLength`).
pub const DRIVER_NAME_MAX: usize = 63;
/// Longest identifier part of a qualified attribute or capacity name (`DeviceMaxIDLength`).
pub const QUALIFIED_ID_MAX: usize = 32;
/// Longest domain prefix of a qualified name.
pub const QUALIFIED_DOMAIN_MAX: usize = 63;

/// RFC 1123 label: lowercase alphanumerics and '-', starting and ending alphanumeric.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DNS_LABEL_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= DNS_SUBDOMAIN_MAX && s.split('.').all(is_dns_label)
}

/// A driver name: a DNS subdomain of at most 63 characters.
pub fn is_driver_name(s: &str) -> bool {
    s.len() <= DRIVER_NAME_MAX && is_dns_subdomain(s)
}

/// A C identifier of at most 32 characters (the ID of a qualified name).
pub fn is_c_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= QUALIFIED_ID_MAX
}

/// `QualifiedName`: `<id>` or `<domain>/<id>` with a DNS subdomain of at most 63 characters.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((domain, id)) => {
            domain.len() <= QUALIFIED_DOMAIN_MAX && is_dns_subdomain(domain) && is_c_identifier(id)
        }
        None => is_c_identifier(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels() {
        assert!(is_dns_label("gpu-0"));
        assert!(is_dns_label("0"));
        assert!(!is_dns_label("-gpu"));
        assert!(!is_dns_label("gpu-"));
        assert!(!is_dns_label("GPU"));
        assert!(!is_dns_label("gpu.0"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_label(&"a".repeat(63)));
    }

    #[test]
    fn qualified_names() {
        assert!(is_qualified_name("memory"));
        assert!(is_qualified_name("resource.kubernetes.io/pciBusID"));
        assert!(is_qualified_name("_x1"));
        assert!(!is_qualified_name("1x"));
        assert!(!is_qualified_name("pci-bus"));
        assert!(!is_qualified_name("Example.com/x"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(!is_qualified_name(&"a".repeat(33)));
        assert!(!is_qualified_name(""));
    }

    #[test]
    fn driver_names() {
        assert!(is_driver_name("vgpu.hami.io"));
        assert!(!is_driver_name(&format!("{}.io", "a".repeat(61))));
        assert!(!is_driver_name("vgpu..io"));
    }

    proptest! {
        #[test]
        fn label_matches_reference_regex(s in "[a-z0-9.-]{0,70}") {
            let re_ok = !s.is_empty() && s.len() <= 63
                && !s.contains('.')
                && !s.starts_with('-') && !s.ends_with('-');
            prop_assert_eq!(is_dns_label(&s), re_ok);
        }

        #[test]
        fn identifiers_never_panic(s in "\\PC{0,40}") {
            let _ = is_qualified_name(&s);
            let _ = is_dns_subdomain(&s);
        }
    }
}
