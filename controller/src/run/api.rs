//! The resource.k8s.io objects in whichever version the API server serves (v1 on Kubernetes
//! 1.34+, v1beta1 on 1.32 and 1.33), behind traits so that the loop is written once.

use crate::model::{ClaimError, ClaimView, ClassView};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::resource::{v1, v1beta1};
use k8s_openapi::{NamespaceResourceScope, Resource as OpenApiResource};
use kube::Client;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use vgpu_driver::{ApiVersion, ClaimAllocation, SliceView};

/// The API group of Dynamic Resource Allocation.
pub const GROUP: &str = "resource.k8s.io";

/// Why the served resource.k8s.io version cannot be chosen.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("listing API groups: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "the API server does not serve {GROUP} v1 or v1beta1 (Kubernetes 1.32/1.33 need the DynamicResourceAllocation feature gate and --runtime-config=resource.k8s.io/v1beta1=true); it serves: {0}"
    )]
    NotServed(String),
}

/// v1 where served, else v1beta1: what `kubectl api-versions` would show decides.
pub async fn discover(client: &Client) -> Result<ApiVersion, DiscoveryError> {
    let groups = client.list_api_groups().await?;
    let versions: Vec<String> = groups
        .groups
        .iter()
        .filter(|g| g.name == GROUP)
        .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
        .collect();
    choose_version(&versions).ok_or_else(|| {
        DiscoveryError::NotServed(if versions.is_empty() {
            format!("no {GROUP} versions")
        } else {
            versions.join(", ")
        })
    })
}

/// The version to speak given the served ones.
pub fn choose_version(served: &[String]) -> Option<ApiVersion> {
    if served.iter().any(|v| v == "v1") {
        Some(ApiVersion::V1)
    } else if served.iter().any(|v| v == "v1beta1") {
        Some(ApiVersion::V1beta1)
    } else {
        None
    }
}

/// What every watched object type needs.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + OpenApiResource
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + OpenApiResource
        + Clone
        + Debug
        + DeserializeOwned
        + Serialize
        + Send
        + Sync
        + 'static
{
}

/// A ResourceClaim of one API version.
pub trait ClaimObject: Watched + kube::Resource<Scope = NamespaceResourceScope> {
    fn view(&self) -> Result<ClaimView, ClaimError>;
    fn is_allocated(&self) -> bool;
    /// Set `status.allocation`, keeping the rest of the status.
    fn set_allocation(&mut self, allocation: &ClaimAllocation);
}

/// A DeviceClass of one API version.
pub trait ClassObject: Watched {
    fn view(&self) -> ClassView;
}

/// A ResourceSlice of one API version.
pub trait SliceObject: Watched {
    fn view(&self) -> SliceView;
}

macro_rules! versioned {
    ($m:ident, $from:ident, $to:ident) => {
        impl ClaimObject for $m::ResourceClaim {
            fn view(&self) -> Result<ClaimView, ClaimError> {
                ClaimView::$from(self)
            }

            fn is_allocated(&self) -> bool {
                self.status.as_ref().is_some_and(|s| s.allocation.is_some())
            }

            fn set_allocation(&mut self, allocation: &ClaimAllocation) {
                self.status.get_or_insert_with(Default::default).allocation =
                    Some(allocation.$to());
            }
        }

        impl ClassObject for $m::DeviceClass {
            fn view(&self) -> ClassView {
                ClassView::$from(self)
            }
        }

        impl SliceObject for $m::ResourceSlice {
            fn view(&self) -> SliceView {
                SliceView::$from(self)
            }
        }
    };
}

versioned!(v1, from_v1, to_v1);
versioned!(v1beta1, from_v1beta1, to_v1beta1);

/// The reference an Event about `claim` points at.
pub fn claim_reference<C: ClaimObject>(claim: &C) -> ObjectReference {
    ObjectReference {
        api_version: Some(C::API_VERSION.to_string()),
        kind: Some(C::KIND.to_string()),
        name: claim.meta().name.clone(),
        namespace: claim.meta().namespace.clone(),
        uid: claim.meta().uid.clone(),
        resource_version: claim.meta().resource_version.clone(),
        field_path: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_preferred_and_v1beta1_is_the_fallback() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose_version(&s(&["v1beta1", "v1", "v1beta2"])),
            Some(ApiVersion::V1)
        );
        assert_eq!(
            choose_version(&s(&["v1beta1", "v1alpha3"])),
            Some(ApiVersion::V1beta1)
        );
        assert_eq!(choose_version(&s(&["v1alpha3"])), None);
        assert_eq!(choose_version(&[]), None);
    }
}
