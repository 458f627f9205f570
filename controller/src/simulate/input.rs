//! Reading standard Kubernetes YAML for the simulator: Nodes, Pods, ResourceSlices,
//! DeviceClasses, ResourceClaims and ResourceClaimTemplates (resource.k8s.io v1 or v1beta1),
//! several documents per file. Pods that use templates get the claims the
//! kube-controller-manager would generate. v1beta1 objects are converted to v1 as they are
//! read; claims remember their version so that output gives them back as they came.

use crate::engine::Inputs;
use crate::model::{ClaimView, ClassView, NodeView, PodView};
use dra::convert::{self, DraObject};
use dra::{ApiVersion, ConvertError};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::resource::v1;
use serde::de::DeserializeOwned;
use serde_json::Value;
use vgpu_driver::SliceView;

/// A claim as read: v1, and the version it was written in.
#[derive(Clone, Debug)]
pub struct ClaimObject {
    pub claim: v1::ResourceClaim,
    pub version: ApiVersion,
}

impl ClaimObject {
    pub fn view(&self) -> Result<ClaimView, crate::model::ClaimError> {
        ClaimView::of(&self.claim)
    }

    pub fn uid(&self) -> String {
        self.claim.metadata.uid.clone().unwrap_or_default()
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        let meta = &self.claim.metadata;
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or(""),
            meta.name.as_deref().unwrap_or("")
        )
    }

    /// The claim's JSON in the version it was read in.
    pub fn to_wire(&self) -> Value {
        convert::to_wire(&self.claim, self.version)
    }
}

/// Everything read from the input, in document order.
#[derive(Clone, Debug, Default)]
pub struct Workload {
    pub inputs: Inputs,
    /// Claims in document order (generated ones right after their pod).
    pub claims: Vec<ClaimObject>,
    /// Kinds present but not used by the simulator (Namespaces, Services…).
    pub ignored: Vec<String>,
}

/// Why an input cannot be simulated.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("document {index}: not YAML: {source}")]
    Yaml {
        index: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {index} ({kind} {name}): {message}")]
    Object {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
}

fn decode<T: DeserializeOwned>(
    index: usize,
    kind: &str,
    name: &str,
    doc: Value,
) -> Result<T, InputError> {
    serde_path_to_error::deserialize(doc).map_err(|e| InputError::Object {
        index,
        kind: kind.to_string(),
        name: name.to_string(),
        message: format!("{}: {}", e.path(), e.inner()),
    })
}

/// A resource.k8s.io object, as v1, from either version.
fn decode_dra<K: DraObject>(
    index: usize,
    kind: &str,
    name: &str,
    doc: Value,
) -> Result<K, InputError> {
    convert::from_wire(doc).map_err(|e: ConvertError| InputError::Object {
        index,
        kind: kind.to_string(),
        name: name.to_string(),
        message: format!("{}: {}", e.field, e.message),
    })
}

/// A stable UID for objects written without one, so runs are reproducible.
fn ensure_uid(doc: &mut Value, kind: &str) {
    let meta = &mut doc["metadata"];
    if meta
        .get("uid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        let ns = meta
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        meta["uid"] = Value::String(format!("sim-{}-{ns}-{name}", kind.to_lowercase()));
    }
    if kind != "Node"
        && kind != "ResourceSlice"
        && kind != "DeviceClass"
        && meta.get("namespace").is_none()
    {
        meta["namespace"] = Value::String("default".into());
    }
}

/// Parse a multi-document YAML stream.
pub fn parse(text: &str) -> Result<Workload, InputError> {
    let mut workload = Workload::default();
    let mut templates: Vec<(ClaimTemplate, String)> = Vec::new();
    let mut pods: Vec<(usize, Pod)> = Vec::new();
    // `kubectl get -o yaml` wraps objects in a List: its items count as documents.
    let mut documents = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc: Value = serde::Deserialize::deserialize(document)
            .map_err(|source| InputError::Yaml { index, source })?;
        match doc.get("items").and_then(Value::as_array) {
            Some(items)
                if doc
                    .get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List")) =>
            {
                documents.extend(items.iter().cloned().map(|item| (index, item)));
            }
            _ => documents.push((index, doc)),
        }
    }
    for (index, mut doc) in documents {
        if doc.is_null() {
            continue;
        }
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() && !kind.ends_with("List") {
            return Err(InputError::Object {
                index,
                kind,
                name,
                message: "metadata.name is required".into(),
            });
        }
        ensure_uid(&mut doc, &kind);
        let dra_version = ApiVersion::of_api_version(&api_version);
        match (api_version.as_str(), dra_version, kind.as_str()) {
            ("v1", _, "Node") => workload
                .inputs
                .nodes
                .push(NodeView::from_node(&decode::<Node>(
                    index, &kind, &name, doc,
                )?)),
            ("v1", _, "Pod") => pods.push((index, decode(index, &kind, &name, doc)?)),
            (_, Some(_), "ResourceSlice") => workload
                .inputs
                .slices
                .push(SliceView::of(&decode_dra(index, &kind, &name, doc)?)),
            (_, Some(_), "DeviceClass") => workload
                .inputs
                .classes
                .push(ClassView::of(&decode_dra(index, &kind, &name, doc)?)),
            (_, Some(version), "ResourceClaim") => workload.claims.push(ClaimObject {
                claim: decode_dra(index, &kind, &name, doc)?,
                version,
            }),
            (_, Some(version), "ResourceClaimTemplate") => {
                let template: v1::ResourceClaimTemplate = decode_dra(index, &kind, &name, doc)?;
                let ns = template.metadata.namespace.clone().unwrap_or_default();
                templates.push((ClaimTemplate { template, version }, ns));
            }
            _ => workload
                .ignored
                .push(format!("{api_version} {kind} {name}")),
        }
    }
    for (index, mut pod) in pods {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let mut statuses = Vec::new();
        for rc in pod
            .spec
            .iter()
            .flat_map(|s| s.resource_claims.iter().flatten())
        {
            let Some(template_name) = &rc.resource_claim_template_name else {
                continue;
            };
            let template = templates
                .iter()
                .find(|(t, t_ns)| t.name() == *template_name && *t_ns == ns)
                .map(|(t, _)| t)
                .ok_or_else(|| InputError::Object {
                    index,
                    kind: "Pod".into(),
                    name: pod_name.clone(),
                    message: format!("spec.resourceClaims[{}]: ResourceClaimTemplate {ns}/{template_name} is not in the input", rc.name),
                })?;
            // The kube-controller-manager names generated claims <pod>-<claim>-<random>; the
            // simulator leaves out the random part.
            let claim_name = format!("{pod_name}-{}", rc.name);
            workload
                .claims
                .push(template.instantiate(&ns, &claim_name, &pod_name));
            statuses.push(k8s_openapi::api::core::v1::PodResourceClaimStatus {
                name: rc.name.clone(),
                resource_claim_name: Some(claim_name),
            });
        }
        if !statuses.is_empty() {
            pod.status
                .get_or_insert_with(Default::default)
                .resource_claim_statuses = Some(statuses);
        }
        workload.inputs.pods.push(PodView::from_pod(&pod));
    }
    Ok(workload)
}

/// A template as read, and the version it was written in (its claims are given back in it).
#[derive(Clone, Debug)]
struct ClaimTemplate {
    template: v1::ResourceClaimTemplate,
    version: ApiVersion,
}

impl ClaimTemplate {
    fn name(&self) -> String {
        self.template.metadata.name.clone().unwrap_or_default()
    }

    fn instantiate(&self, ns: &str, name: &str, pod: &str) -> ClaimObject {
        let metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            uid: Some(format!("sim-resourceclaim-{ns}-{name}")),
            annotations: Some(
                [(
                    "resource.kubernetes.io/pod-claim-name".to_string(),
                    name.trim_start_matches(&format!("{pod}-")).to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        };
        ClaimObject {
            claim: v1::ResourceClaim {
                metadata,
                spec: self.template.spec.spec.clone(),
                status: None,
            },
            version: self.version,
        }
    }
}
