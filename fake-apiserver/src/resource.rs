//! What the server serves: resources and their group versions.

use std::cmp::Ordering;
use std::fmt;

/// Names one stored collection: group, version and plural. This is the storage key, so a v1
/// and a v1beta1 view of the same resource are two separate collections (see the crate docs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gvr {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
}

impl Gvr {
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Gvr {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        }
    }

    /// The collection a typed k8s-openapi or kube resource lives in.
    pub fn of<K: kube::Resource<DynamicType = ()>>() -> Self {
        Gvr {
            group: K::group(&()).into_owned(),
            version: K::version(&()).into_owned(),
            plural: K::plural(&()).into_owned(),
        }
    }

    /// `v1` for the core group, `group/version` otherwise, as in an object's `apiVersion`.
    pub fn api_version(&self) -> String {
        api_version(&self.group, &self.version)
    }
}

impl fmt::Display for Gvr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.api_version(), self.plural)
    }
}

impl From<&Gvr> for Gvr {
    fn from(gvr: &Gvr) -> Self {
        gvr.clone()
    }
}

impl From<&ResourceKind> for Gvr {
    fn from(kind: &ResourceKind) -> Self {
        kind.gvr()
    }
}

pub(crate) fn api_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}

/// A resource the server serves. Register it with [`crate::FakeApiServer::register`] before
/// clients use it: unregistered resources answer 404 like a server without that API.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResourceKind {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// Whether the resource has a `status` subresource, which changes what PUT and PATCH on
    /// the main resource may touch (see the crate docs).
    pub has_status: bool,
}

/// Which `resource.k8s.io` versions [`ResourceKind::builtin`] registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DraVersions {
    /// `v1beta1` only, like Kubernetes 1.32.
    V1beta1Only,
    /// `v1` only, like Kubernetes 1.34 with the beta APIs switched off.
    V1Only,
    /// Both `v1` and `v1beta1`, each with its own storage.
    Both,
}

impl ResourceKind {
    pub fn new(
        group: &str,
        version: &str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        has_status: bool,
    ) -> Self {
        ResourceKind {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            has_status,
        }
    }

    pub fn gvr(&self) -> Gvr {
        Gvr::new(&self.group, &self.version, &self.plural)
    }

    pub fn api_version(&self) -> String {
        api_version(&self.group, &self.version)
    }

    /// The resources the driver's components use: core v1 nodes, pods, events and namespaces,
    /// events.k8s.io/v1 events, coordination.k8s.io/v1 leases, and the DRA resources of the
    /// chosen `resource.k8s.io` versions.
    pub fn builtin(dra: DraVersions) -> Vec<ResourceKind> {
        let mut kinds = vec![
            ResourceKind::new("", "v1", "Node", "nodes", false, true),
            ResourceKind::new("", "v1", "Pod", "pods", true, true),
            ResourceKind::new("", "v1", "Event", "events", true, false),
            ResourceKind::new("", "v1", "Namespace", "namespaces", false, true),
            ResourceKind::new("events.k8s.io", "v1", "Event", "events", true, false),
            ResourceKind::new("coordination.k8s.io", "v1", "Lease", "leases", true, false),
        ];
        let versions: &[&str] = match dra {
            DraVersions::V1beta1Only => &["v1beta1"],
            DraVersions::V1Only => &["v1"],
            DraVersions::Both => &["v1", "v1beta1"],
        };
        for version in versions {
            kinds.extend(Self::dra(version));
        }
        kinds
    }

    /// The four `resource.k8s.io` resources at one version.
    pub fn dra(version: &str) -> Vec<ResourceKind> {
        const GROUP: &str = "resource.k8s.io";
        vec![
            ResourceKind::new(
                GROUP,
                version,
                "ResourceSlice",
                "resourceslices",
                false,
                false,
            ),
            ResourceKind::new(
                GROUP,
                version,
                "ResourceClaim",
                "resourceclaims",
                true,
                true,
            ),
            ResourceKind::new(GROUP, version, "DeviceClass", "deviceclasses", false, false),
            ResourceKind::new(
                GROUP,
                version,
                "ResourceClaimTemplate",
                "resourceclaimtemplates",
                true,
                false,
            ),
        ]
    }

    /// Field selectors the real server accepts for this resource beyond `metadata.name` and
    /// `metadata.namespace`; anything else is a 400 there, and so here.
    pub(crate) fn extra_field_selectors(&self) -> &'static [&'static str] {
        match (self.group.as_str(), self.plural.as_str()) {
            ("", "pods") => &["spec.nodeName", "status.phase"],
            ("", "nodes") => &["spec.unschedulable"],
            ("", "events") => &[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "reason",
                "type",
            ],
            ("resource.k8s.io", "resourceslices") => &["spec.nodeName", "spec.driver"],
            _ => &[],
        }
    }
}

/// Kubernetes version priority: GA before beta before alpha, higher numbers first, anything
/// unrecognised last in lexical order. Used to order versions in discovery, where the first
/// is the preferred one.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    fn key(v: &str) -> Option<(u8, u64, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let major: u64 = rest[..digits].parse().ok()?;
        let tail = &rest[digits..];
        if tail.is_empty() {
            return Some((3, major, 0));
        }
        let (tier, n) = if let Some(n) = tail.strip_prefix("beta") {
            (2, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n)
        } else {
            return None;
        };
        Some((tier, major, n.parse().ok()?))
    }
    match (key(a), key(b)) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_kubernetes_priority() {
        let mut versions = vec!["v1alpha3", "v1beta1", "v2", "v1", "v1beta2", "foo"];
        versions.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            versions,
            ["v2", "v1", "v1beta2", "v1beta1", "v1alpha3", "foo"]
        );
    }
}
