//! The allocator's views of the Kubernetes objects it reads: Nodes, Pods, and
//! resource.k8s.io v1 DeviceClasses and ResourceClaims (v1beta1 ones arrive converted by
//! the `dra` crate).

use crate::slim::{SlimContainer, SlimPod};
use k8s_openapi::api::core::v1::{Node, NodeSelector, Taint, Toleration};
use k8s_openapi::api::resource::v1;
use std::collections::BTreeMap;
use std::sync::Arc;
use vgpu_driver::class::is_controller_selector;
use vgpu_driver::{ClaimAllocation, ConfigEntry, ConfigSource, Quantity};

/// A Node as placement sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    /// Allocatable CPU in millicores; `None` when the node does not report it (no check).
    pub cpu_millis: Option<i128>,
    /// Allocatable memory in bytes; `None` when unreported.
    pub memory_bytes: Option<i128>,
}

impl NodeView {
    pub fn from_node(node: &Node) -> NodeView {
        let allocatable = node.status.as_ref().and_then(|s| s.allocatable.as_ref());
        let get = |k: &str| {
            allocatable
                .and_then(|a| a.get(k))
                .and_then(|q| Quantity::parse(&q.0).ok())
        };
        NodeView {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default(),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            cpu_millis: get("cpu").map(|q| q.nanos() / 1_000_000),
            memory_bytes: get("memory").map(|q| q.ceil_units()),
        }
    }
}

/// A Pod as placement sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Bound node, if the pod is already scheduled.
    pub node_name: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity.
    pub affinity: Option<NodeSelector>,
    pub tolerations: Vec<Toleration>,
    pub cpu_millis: i128,
    pub memory_bytes: i128,
    /// Names of the ResourceClaims the pod uses (resolved from templates through its status).
    pub claims: Vec<String>,
    /// Some claim of the pod comes from a template whose claim the resourceclaim controller
    /// has yet to create, so `claims` is not yet complete.
    pub awaiting_claims: bool,
    /// The pod's scheduling gates, in order (empty for almost every pod).
    pub scheduling_gates: Vec<String>,
    /// Succeeded or Failed: holds no node resources.
    pub finished: bool,
}

impl PodView {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn of(pod: &SlimPod) -> PodView {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let (mut cpu, mut mem) = (0i128, 0i128);
        let request = |c: &SlimContainer, k: &str| {
            c.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get(k))
                .and_then(|q| Quantity::parse(&q.0).ok())
        };
        for c in spec
            .and_then(|s| s.containers.as_deref())
            .unwrap_or_default()
        {
            cpu += request(c, "cpu")
                .map(|q| q.nanos() / 1_000_000)
                .unwrap_or(0);
            mem += request(c, "memory").map(|q| q.ceil_units()).unwrap_or(0);
        }
        // Init containers run one at a time before the others: the pod needs the larger of
        // their largest request and the sum of the regular containers'.
        for c in spec
            .and_then(|s| s.init_containers.as_deref())
            .unwrap_or_default()
        {
            cpu = cpu.max(
                request(c, "cpu")
                    .map(|q| q.nanos() / 1_000_000)
                    .unwrap_or(0),
            );
            mem = mem.max(request(c, "memory").map(|q| q.ceil_units()).unwrap_or(0));
        }
        let mut claims = Vec::new();
        let mut awaiting_claims = false;
        for rc in spec
            .and_then(|s| s.resource_claims.as_deref())
            .unwrap_or_default()
        {
            if let Some(name) = &rc.resource_claim_name {
                claims.push(name.clone());
                continue;
            }
            // An entry without a name says no claim was needed; no entry, not created yet.
            match status
                .and_then(|s| s.resource_claim_statuses.as_deref())
                .unwrap_or_default()
                .iter()
                .find(|s| s.name == rc.name)
            {
                Some(generated) => claims.extend(generated.resource_claim_name.clone()),
                None => awaiting_claims = true,
            }
        }
        let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("");
        PodView {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node_name: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            node_selector: spec
                .and_then(|s| s.node_selector.clone())
                .unwrap_or_default(),
            affinity: spec
                .and_then(|s| s.affinity.as_ref())
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .clone()
                }),
            tolerations: spec.and_then(|s| s.tolerations.clone()).unwrap_or_default(),
            cpu_millis: cpu,
            memory_bytes: mem,
            claims,
            awaiting_claims,
            scheduling_gates: spec
                .and_then(|s| s.scheduling_gates.as_deref())
                .unwrap_or_default()
                .iter()
                .map(|g| g.name.clone())
                .collect(),
            finished: matches!(phase, "Succeeded" | "Failed"),
        }
    }
}

/// A DeviceClass: its selectors (the controller marker removed) and opaque configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassView {
    pub name: String,
    pub selectors: Vec<String>,
    pub config: Vec<ConfigEntry>,
    /// Carries the controller marker: the controller is the only allocator of its claims.
    pub ours: bool,
}

impl ClassView {
    pub fn of(class: &v1::DeviceClass) -> ClassView {
        let mut selectors = Vec::new();
        let mut ours = false;
        for s in class.spec.selectors.iter().flatten() {
            if let Some(cel) = &s.cel {
                if is_controller_selector(&cel.expression) {
                    ours = true;
                } else {
                    selectors.push(cel.expression.clone());
                }
            }
        }
        let config = class
            .spec
            .config
            .iter()
            .flatten()
            .filter_map(|c| c.opaque.as_ref())
            .map(|o| ConfigEntry {
                source: ConfigSource::FromClass,
                requests: vec![],
                driver: o.driver.clone(),
                parameters: vgpu_driver::config::shared(o.parameters.0.clone()),
            })
            .collect();
        ClassView {
            name: class.metadata.name.clone().unwrap_or_default(),
            selectors,
            config,
            ours,
        }
    }
}

/// How many devices a request wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    Exact(u32),
    /// Every matching device on the chosen node (`allocationMode: All`).
    All,
}

/// One way to satisfy a request: the request itself or one of its `firstAvailable` subrequests.
#[derive(Clone, Debug, PartialEq)]
pub struct Alternative {
    /// The name results carry: `req` or `req/sub`.
    pub result_name: String,
    pub class: String,
    pub selectors: Vec<String>,
    pub count: Count,
    pub admin_access: bool,
    /// `capacity.requests` (v1, consumable capacity): what a native share asks of each device,
    /// by capacity name, as written.
    pub capacity: BTreeMap<String, String>,
}

/// A request of a claim.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestView {
    pub name: String,
    /// Tried in order; one entry for a plain request.
    pub alternatives: Vec<Alternative>,
}

/// A matchAttribute constraint.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstraintView {
    /// Requests it applies to; empty = all.
    pub requests: Vec<String>,
    /// Fully qualified attribute name (`domain/id`).
    pub match_attribute: Option<String>,
    /// Fully qualified attribute name whose values must all differ.
    pub distinct_attribute: Option<String>,
}

/// A ResourceClaim as the allocator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: Option<String>,
    /// metadata.creationTimestamp: claims that waited longest are tried first.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    pub requests: Vec<RequestView>,
    pub constraints: Vec<ConstraintView>,
    /// The claim's own configuration entries (source FromClaim).
    pub config: Vec<ConfigEntry>,
    /// Shared: the controller lays an allocation it wrote over a cached view until the
    /// watch shows it, without copying it.
    pub allocation: Option<Arc<ClaimAllocation>>,
    pub deleting: bool,
    /// Pods (by UID) the claim is reserved for.
    pub reserved_for: Vec<String>,
    pub finalizers: Vec<String>,
}

impl ClaimView {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn count_of(mode: Option<&str>, count: Option<i64>) -> Count {
    match mode {
        Some("All") => Count::All,
        _ => Count::Exact(count.unwrap_or(1).clamp(0, u32::MAX as i64) as u32),
    }
}

/// Why a claim cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ResourceClaim {claim}: {message}")]
pub struct ClaimError {
    pub claim: String,
    pub message: String,
}

fn capacity_of(c: Option<&v1::CapacityRequirements>) -> BTreeMap<String, String> {
    c.and_then(|c| c.requests.as_ref())
        .map(|r| r.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

fn selectors_of(selectors: Option<&Vec<v1::DeviceSelector>>) -> Vec<String> {
    selectors
        .into_iter()
        .flatten()
        .filter_map(|s| s.cel.as_ref().map(|c| c.expression.clone()))
        .collect()
}

impl ClaimView {
    pub fn of(claim: &v1::ResourceClaim) -> Result<ClaimView, ClaimError> {
        let meta = &claim.metadata;
        let error = |message: String| ClaimError {
            claim: key_of(meta),
            message,
        };
        let devices = claim.spec.devices.as_ref();
        let mut requests = Vec::with_capacity(
            devices
                .and_then(|d| d.requests.as_ref())
                .map_or(0, Vec::len),
        );
        for r in devices
            .and_then(|d| d.requests.as_ref())
            .into_iter()
            .flatten()
        {
            let alternatives = match (&r.exactly, &r.first_available) {
                (Some(e), _) => vec![Alternative {
                    result_name: r.name.clone(),
                    class: e.device_class_name.clone(),
                    selectors: selectors_of(e.selectors.as_ref()),
                    count: count_of(e.allocation_mode.as_deref(), e.count),
                    admin_access: e.admin_access.unwrap_or(false),
                    capacity: capacity_of(e.capacity.as_ref()),
                }],
                (None, Some(subs)) => subs
                    .iter()
                    .map(|s| Alternative {
                        result_name: format!("{}/{}", r.name, s.name),
                        class: s.device_class_name.clone(),
                        selectors: selectors_of(s.selectors.as_ref()),
                        count: count_of(s.allocation_mode.as_deref(), s.count),
                        admin_access: false,
                        capacity: capacity_of(s.capacity.as_ref()),
                    })
                    .collect(),
                // The API server refuses such a request; a hand-written simulator input may not.
                (None, None) => {
                    return Err(error(format!(
                        "spec.devices.requests[{}]: neither exactly nor firstAvailable is set",
                        r.name
                    )));
                }
            };
            requests.push(RequestView {
                name: r.name.clone(),
                alternatives,
            });
        }
        let constraints = devices
            .and_then(|d| d.constraints.as_ref())
            .into_iter()
            .flatten()
            .map(|c| ConstraintView {
                requests: c.requests.clone().unwrap_or_default(),
                match_attribute: c.match_attribute.clone(),
                distinct_attribute: c.distinct_attribute.clone(),
            })
            .collect();
        let config = devices
            .and_then(|d| d.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| {
                c.opaque.as_ref().map(|o| ConfigEntry {
                    source: ConfigSource::FromClaim,
                    requests: c.requests.clone().unwrap_or_default(),
                    driver: o.driver.clone(),
                    parameters: vgpu_driver::config::shared(o.parameters.0.clone()),
                })
            })
            .collect();
        let status = claim.status.as_ref();
        let allocation = match status.and_then(|s| s.allocation.as_ref()) {
            Some(_) => Some(Arc::new(
                ClaimAllocation::of(claim).map_err(|e| error(e.to_string()))?,
            )),
            None => None,
        };
        Ok(ClaimView {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            requests,
            constraints,
            config,
            allocation,
            deleting: meta.deletion_timestamp.is_some(),
            reserved_for: status
                .and_then(|s| s.reserved_for.as_ref())
                .map(|r| r.iter().map(|c| c.uid.clone()).collect())
                .unwrap_or_default(),
            finalizers: meta.finalizers.clone().unwrap_or_default(),
        })
    }
}

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Whether `tolerations` tolerate `taint` (Kubernetes' `Toleration.ToleratesTaint`).
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        if t.effect
            .as_deref()
            .is_some_and(|e| !e.is_empty() && e != taint.effect)
        {
            return false;
        }
        if t.key
            .as_deref()
            .is_some_and(|k| !k.is_empty() && k != taint.key)
        {
            return false;
        }
        match t.operator.as_deref() {
            None | Some("") | Some("Equal") => {
                t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
            Some("Exists") => true,
            Some(_) => false,
        }
    })
}

/// Whether a node satisfies a required node selector (terms ORed, requirements ANDed).
pub fn matches_node_selector(selector: &NodeSelector, node: &NodeView) -> bool {
    selector.node_selector_terms.iter().any(|term| {
        let exprs_ok = term.match_expressions.iter().flatten().all(|r| {
            let value = node.labels.get(&r.key);
            let values = r.values.as_deref().unwrap_or_default();
            match r.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                "Gt" | "Lt" => {
                    let (Some(v), Some(bound)) = (
                        value.and_then(|v| v.parse::<i64>().ok()),
                        values.first().and_then(|b| b.parse::<i64>().ok()),
                    ) else {
                        return false;
                    };
                    if r.operator == "Gt" {
                        v > bound
                    } else {
                        v < bound
                    }
                }
                _ => false,
            }
        });
        let fields_ok = term.match_fields.iter().flatten().all(|r| {
            let values = r.values.as_deref().unwrap_or_default();
            match (r.key.as_str(), r.operator.as_str()) {
                ("metadata.name", "In") => values.contains(&node.name),
                ("metadata.name", "NotIn") => !values.contains(&node.name),
                _ => false,
            }
        });
        // An empty term matches no objects.
        let empty = term.match_expressions.as_ref().is_none_or(Vec::is_empty)
            && term.match_fields.as_ref().is_none_or(Vec::is_empty);
        !empty && exprs_ok && fields_ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm};

    fn taint(key: &str, value: Option<&str>, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.map(Into::into),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn tol(
        key: Option<&str>,
        op: Option<&str>,
        value: Option<&str>,
        effect: Option<&str>,
    ) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: op.map(Into::into),
            value: value.map(Into::into),
            effect: effect.map(Into::into),
            toleration_seconds: None,
        }
    }

    #[test]
    fn a_request_with_neither_exactly_nor_first_available_is_named() {
        let claim: v1::ResourceClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c", "namespace": "ml"},
            "spec": {"devices": {"requests": [
                {"name": "ok", "exactly": {"deviceClassName": "vgpu"}},
                {"name": "empty"}
            ]}}
        }))
        .unwrap();
        let e = ClaimView::of(&claim).unwrap_err();
        assert_eq!(e.claim, "ml/c");
        assert!(
            e.to_string()
                .starts_with("ResourceClaim ml/c: spec.devices.requests[empty]: "),
            "{e}"
        );
    }

    #[test]
    fn slim_pods_read_as_the_whole_objects_and_weigh_less() {
        let full = serde_json::json!({
            "metadata": {"name": "p", "namespace": "ml", "uid": "u", "resourceVersion": "7",
                "labels": {"app": "x"}, "annotations": {"a": "b".repeat(2000)},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {
                "nodeName": "n1", "nodeSelector": {"gpu": "h100"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}},
                             "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "kubernetes.io/hostname"}]}},
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "initContainers": [{"name": "init", "image": "busybox", "resources": {"requests": {"cpu": "3", "memory": "1Gi"}}}],
                "containers": [{"name": "main", "image": "registry.example.com/app:1", "command": ["run"],
                    "env": [{"name": "A", "value": "x".repeat(1000)}],
                    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "4"}}}],
                "resourceClaims": [{"name": "gpu", "resourceClaimTemplateName": "t"}],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                "conditions": [{"type": "Ready", "status": "True"}],
                "resourceClaimStatuses": [{"name": "gpu", "resourceClaimName": "p-gpu-abc"}]}
        });
        // Decoded straight into the slim shape, a pod reads as the whole object would.
        let pod: SlimPod = serde_json::from_value(full.clone()).unwrap();
        let view = PodView::of(&pod);
        assert_eq!(
            (
                view.namespace.as_str(),
                view.name.as_str(),
                view.uid.as_str()
            ),
            ("ml", "p", "u")
        );
        assert_eq!(view.node_name.as_deref(), Some("n1"));
        assert_eq!(view.node_selector["gpu"], "h100");
        let term = &view.affinity.as_ref().unwrap().node_selector_terms[0];
        assert_eq!(term.match_expressions.as_ref().unwrap()[0].key, "zone");
        assert_eq!(view.tolerations[0].key.as_deref(), Some("gpu"));
        // The init container's 3 CPUs exceed the containers' 2; memory is the larger 8Gi.
        assert_eq!((view.cpu_millis, view.memory_bytes), (3000, 8 << 30));
        assert_eq!(view.claims, ["p-gpu-abc"]);
        assert!(!view.finished);
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("7"));
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.annotations.is_none());
        let size = serde_json::to_vec(&pod).unwrap().len();
        let whole = serde_json::to_vec(&full).unwrap().len();
        assert!(size * 4 < whole, "{size} vs {whole}");
    }

    #[test]
    fn a_pods_gates_and_unresolved_template_claims_are_read() {
        let pod = |status: serde_json::Value| {
            let pod: SlimPod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ml"},
                "spec": {
                    "schedulingGates": [{"name": "a.io/x"}, {"name": "vgpu.hami.io/allocation"}],
                    "resourceClaims": [
                        {"name": "gpu", "resourceClaimTemplateName": "t"},
                        {"name": "none", "resourceClaimTemplateName": "t2"},
                        {"name": "shared", "resourceClaimName": "shared-claim"}]
                },
                "status": status
            }))
            .unwrap();
            PodView::of(&pod)
        };
        // The resourceclaim controller has not created the template's claims yet.
        let view = pod(serde_json::json!({}));
        assert_eq!(view.scheduling_gates, ["a.io/x", "vgpu.hami.io/allocation"]);
        assert!(view.awaiting_claims);
        assert_eq!(view.claims, ["shared-claim"]);
        // Created; an entry without a name means no claim was needed.
        let view = pod(serde_json::json!({"resourceClaimStatuses": [
            {"name": "gpu", "resourceClaimName": "p-gpu-abc"}, {"name": "none"}]}));
        assert!(!view.awaiting_claims);
        assert_eq!(view.claims, ["p-gpu-abc", "shared-claim"]);
    }

    #[test]
    fn toleration_semantics() {
        let t = taint("gpu", Some("true"), "NoSchedule");
        assert!(tolerates(
            &[tol(
                Some("gpu"),
                Some("Equal"),
                Some("true"),
                Some("NoSchedule")
            )],
            &t
        ));
        assert!(tolerates(
            &[tol(Some("gpu"), Some("Exists"), None, None)],
            &t
        ));
        assert!(tolerates(&[tol(None, Some("Exists"), None, None)], &t));
        assert!(!tolerates(
            &[tol(Some("gpu"), Some("Equal"), Some("false"), None)],
            &t
        ));
        assert!(!tolerates(
            &[tol(Some("gpu"), None, Some("true"), Some("NoExecute"))],
            &t
        ));
        assert!(!tolerates(
            &[tol(Some("other"), Some("Exists"), None, None)],
            &t
        ));
        assert!(!tolerates(&[], &t));
    }

    #[test]
    fn node_selector_semantics() {
        let node = NodeView {
            name: "n1".into(),
            labels: [
                ("zone".to_string(), "a".to_string()),
                ("gen".to_string(), "9".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let req = |key: &str, op: &str, values: &[&str]| NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|s| s.to_string()).collect()),
        };
        let sel = |exprs: Vec<NodeSelectorRequirement>| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(exprs),
                match_fields: None,
            }],
        };
        assert!(matches_node_selector(
            &sel(vec![req("zone", "In", &["a", "b"])]),
            &node
        ));
        assert!(!matches_node_selector(
            &sel(vec![req("zone", "NotIn", &["a"])]),
            &node
        ));
        assert!(matches_node_selector(
            &sel(vec![req("gen", "Gt", &["8"]), req("zone", "Exists", &[])]),
            &node
        ));
        assert!(!matches_node_selector(
            &sel(vec![req("missing", "Exists", &[])]),
            &node
        ));
        assert!(matches_node_selector(
            &vgpu_driver::allocation::node_selector_for("n1"),
            &node
        ));
        assert!(!matches_node_selector(
            &vgpu_driver::allocation::node_selector_for("n2"),
            &node
        ));
        assert!(!matches_node_selector(
            &NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm::default()]
            },
            &node
        ));
    }
}
