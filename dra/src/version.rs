//! Which resource.k8s.io version to speak on the wire: v1 on Kubernetes 1.34+, v1beta1 on 1.32
//! and 1.33. Decided once per process from API discovery, as `kubectl api-versions` shows it.

/// The API group of Dynamic Resource Allocation.
pub const GROUP: &str = "resource.k8s.io";

/// A served version of resource.k8s.io.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiVersion {
    /// Kubernetes 1.32 and 1.33: device fields under `basic`, request fields beside
    /// `firstAvailable`.
    V1beta1,
    /// Kubernetes 1.34 and later; the version the workspace speaks inside.
    V1,
}

impl ApiVersion {
    /// `resource.k8s.io/<version>`, the objects' apiVersion.
    pub fn as_str(&self) -> &'static str {
        match self {
            ApiVersion::V1beta1 => "resource.k8s.io/v1beta1",
            ApiVersion::V1 => "resource.k8s.io/v1",
        }
    }

    /// The version part alone (`v1`, `v1beta1`).
    pub fn version(&self) -> &'static str {
        match self {
            ApiVersion::V1beta1 => "v1beta1",
            ApiVersion::V1 => "v1",
        }
    }

    /// The version of an `apiVersion` string, if it is one of ours.
    pub fn of_api_version(api_version: &str) -> Option<ApiVersion> {
        match api_version {
            "resource.k8s.io/v1" => Some(ApiVersion::V1),
            "resource.k8s.io/v1beta1" => Some(ApiVersion::V1beta1),
            _ => None,
        }
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the served resource.k8s.io version cannot be chosen.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("listing the API server's groups: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "the API server does not serve {GROUP} v1 or v1beta1; enable DRA (Kubernetes 1.32/1.33 \
         need the DynamicResourceAllocation feature gate and \
         --runtime-config=resource.k8s.io/v1beta1=true); it serves: {0}"
    )]
    NotServed(String),
}

/// v1 where served, else v1beta1.
pub async fn discover(client: &kube::Client) -> Result<ApiVersion, DiscoveryError> {
    let groups = client.list_api_groups().await?;
    let versions: Vec<String> = groups
        .groups
        .iter()
        .filter(|g| g.name == GROUP)
        .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
        .collect();
    choose(&versions).ok_or_else(|| {
        DiscoveryError::NotServed(if versions.is_empty() {
            format!("no {GROUP} versions")
        } else {
            versions.join(", ")
        })
    })
}

/// The version to speak given the served ones.
pub fn choose(served: &[String]) -> Option<ApiVersion> {
    if served.iter().any(|v| v == "v1") {
        Some(ApiVersion::V1)
    } else if served.iter().any(|v| v == "v1beta1") {
        Some(ApiVersion::V1beta1)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_preferred_and_v1beta1_is_the_fallback() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose(&s(&["v1beta1", "v1", "v1beta2"])),
            Some(ApiVersion::V1)
        );
        assert_eq!(
            choose(&s(&["v1beta1", "v1alpha3"])),
            Some(ApiVersion::V1beta1)
        );
        assert_eq!(choose(&s(&["v1alpha3"])), None);
        assert_eq!(choose(&[]), None);
    }

    #[test]
    fn api_version_strings_round_trip() {
        for v in [ApiVersion::V1, ApiVersion::V1beta1] {
            assert_eq!(ApiVersion::of_api_version(v.as_str()), Some(v));
            assert!(v.as_str().ends_with(v.version()));
        }
        assert_eq!(ApiVersion::of_api_version("resource.k8s.io/v1beta2"), None);
    }
}
