//! The claims the kubelet names: its reference checked before it reaches a URL or a file
//! name, then the claim read from the API server and checked against what the kubelet holds.

use super::ClaimReader;
use k8s_openapi::api::resource::v1::ResourceClaim;
use vgpu_driver::allocation::pinned_node;
use vgpu_driver::names::{is_dns_label, is_dns_subdomain};

/// The claim identity the kubelet sends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaimRef {
    pub namespace: String,
    pub uid: String,
    pub name: String,
}

impl ClaimRef {
    /// `namespace/name`, as Kubernetes names a claim in messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The kubelet's fields become an API path (namespace, name) and, in drivers, file names
    /// (UID): a value that no API object can have is refused before it reaches either.
    pub fn validate(&self) -> Result<(), ClaimError> {
        let invalid = |field, value: &str, rule| ClaimError::InvalidReference {
            field,
            value: value.to_string(),
            rule,
        };
        if !is_dns_label(&self.namespace) {
            return Err(invalid("namespace", &self.namespace, "a DNS label"));
        }
        if !is_dns_subdomain(&self.name) {
            return Err(invalid("name", &self.name, "a DNS subdomain"));
        }
        // The UID names the claim's CDI spec and directories: the CDI spec id rule.
        if vgpu_cdi::validate_spec_id(&self.uid).is_err() {
            return Err(invalid("uid", &self.uid, "a safe file name"));
        }
        Ok(())
    }
}

/// Why a claim cannot be prepared before the driver sees it; reported for that claim alone.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("the kubelet's claim reference {field} {value:?} is not {rule}")]
    InvalidReference {
        field: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("ResourceClaim {0} not found")]
    NotFound(String),
    #[error("reading ResourceClaim {claim}: {source}")]
    Read {
        claim: String,
        #[source]
        source: crate::client::ClientError,
    },
    #[error(
        "ResourceClaim {claim} has UID {found}, the kubelet asked for {wanted}: the claim was replaced"
    )]
    UidMismatch {
        claim: String,
        found: String,
        wanted: String,
    },
    #[error("ResourceClaim {0}: status.allocation is not set")]
    NotAllocated(String),
    #[error("ResourceClaim {claim} is allocated for node {allocated}, not for this node {node}")]
    OtherNode {
        claim: String,
        allocated: String,
        node: String,
    },
}

impl ClaimReader {
    /// The claim, if it is the one the kubelet means, allocated, and for this node.
    pub(crate) async fn read(&self, claim: &ClaimRef) -> Result<ResourceClaim, ClaimError> {
        let key = claim.key();
        let object = self
            .api(&claim.namespace)
            .get(&claim.name)
            .await
            .map_err(|source| {
                if source.is_not_found() {
                    ClaimError::NotFound(key.clone())
                } else {
                    ClaimError::Read {
                        claim: key.clone(),
                        source,
                    }
                }
            })?;
        check(object, claim, &self.node)
    }
}

/// The checks of [`ClaimReader::read`] on a claim as read.
pub(crate) fn check(
    object: ResourceClaim,
    claim: &ClaimRef,
    node: &str,
) -> Result<ResourceClaim, ClaimError> {
    let key = claim.key();
    let uid = object.metadata.uid.as_deref().unwrap_or_default();
    if uid != claim.uid {
        return Err(ClaimError::UidMismatch {
            claim: key,
            found: uid.to_string(),
            wanted: claim.uid.clone(),
        });
    }
    let Some(allocation) = object.status.as_ref().and_then(|s| s.allocation.as_ref()) else {
        return Err(ClaimError::NotAllocated(key));
    };
    if let Some(allocated) = pinned_node(allocation.node_selector.as_ref())
        && allocated != node
    {
        return Err(ClaimError::OtherNode {
            claim: key,
            allocated,
            node: node.to_string(),
        });
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::resource::v1::{AllocationResult, ResourceClaimStatus};
    use vgpu_driver::allocation::node_selector_for;

    fn reference(namespace: &str, name: &str, uid: &str) -> ClaimRef {
        ClaimRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn references_no_object_can_have_are_refused() {
        let good = "0b6f3c1e-5d0a-4c8e-9f11-2a7e8c3d4b5a";
        assert!(reference("ml", "train", good).validate().is_ok());
        for (field, r) in [
            ("namespace", reference("ml/../kube-system", "train", good)),
            ("name", reference("ml", "good/status", good)),
            ("name", reference("ml", "Train", good)),
            ("uid", reference("ml", "train", "../victim")),
            ("uid", reference("ml", "train", "")),
            ("uid", reference("ml", "train", "a\0b")),
            ("uid", reference("ml", "train", ".hidden")),
        ] {
            let e = r.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("claim reference {field} ")), "{e}");
        }
    }

    #[test]
    fn a_claim_must_be_the_same_allocated_and_for_this_node() {
        let r = reference("ml", "train", "u1");
        let mut claim = ResourceClaim::default();
        claim.metadata.uid = Some("u2".into());
        let e = check(claim.clone(), &r, "n1").unwrap_err();
        assert!(matches!(e, ClaimError::UidMismatch { .. }), "{e}");
        claim.metadata.uid = Some("u1".into());
        let e = check(claim.clone(), &r, "n1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ResourceClaim ml/train: status.allocation is not set"
        );
        claim.status = Some(ResourceClaimStatus {
            allocation: Some(AllocationResult {
                node_selector: Some(node_selector_for("n2")),
                ..Default::default()
            }),
            ..Default::default()
        });
        let e = check(claim.clone(), &r, "n1").unwrap_err().to_string();
        assert!(
            e.contains("allocated for node n2, not for this node n1"),
            "{e}"
        );
        assert!(check(claim, &r, "n2").is_ok());
    }
}
