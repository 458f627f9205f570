//! A Pod as the allocator decodes it: only the fields placement reads. A Pod is decoded
//! straight into this shape (the watch cache's and the simulator's), so a pod's images,
//! environment, volumes, probes, labels, annotations, conditions and managedFields are skipped
//! by the parser instead of being allocated and then dropped. The controller never writes a
//! Pod back whole (lifting its scheduling gate is a JSON patch of that one list entry), so
//! nothing it would need to round-trip is lost.

use k8s_openapi::api::core::v1::{
    NodeAffinity, PodResourceClaim, PodResourceClaimStatus, PodSchedulingGate, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPod {
    /// Identity and resourceVersion only.
    #[serde(default, deserialize_with = "identity")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<SlimPodSpec>,
    #[serde(default)]
    pub status: Option<SlimPodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    #[serde(default)]
    pub containers: Option<Vec<SlimContainer>>,
    #[serde(default)]
    pub init_containers: Option<Vec<SlimContainer>>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub affinity: Option<SlimAffinity>,
    #[serde(default)]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default)]
    pub resource_claims: Option<Vec<PodResourceClaim>>,
    /// Read for the controller's own gate, which it lifts once the pod's claims are allocated.
    #[serde(default)]
    pub scheduling_gates: Option<Vec<PodSchedulingGate>>,
}

/// Node affinity only: pod (anti-)affinity is the kube-scheduler's to check.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimAffinity {
    #[serde(default)]
    pub node_affinity: Option<NodeAffinity>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimContainer {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub resources: Option<SlimResources>,
}

/// Requests only: a pod is placed by what it requests.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimResources {
    #[serde(default)]
    pub requests: Option<BTreeMap<String, Quantity>>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub resource_claim_statuses: Option<Vec<PodResourceClaimStatus>>,
}

/// The metadata fields the cache and the views read; the others are skipped unread.
fn identity<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Identity {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        namespace: Option<String>,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        resource_version: Option<String>,
    }
    let id = Option::<Identity>::deserialize(deserializer)?.unwrap_or_default();
    Ok(ObjectMeta {
        name: id.name,
        namespace: id.namespace,
        uid: id.uid,
        resource_version: id.resource_version,
        ..Default::default()
    })
}

// Served where a Pod is: the watch lists and watches /api/v1/pods into this type.
impl k8s_openapi::Resource for SlimPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for SlimPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
