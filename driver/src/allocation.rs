//! A claim's allocation, as the driver reads and writes it (resource.k8s.io/v1).
//!
//! The kubelet plugin reads it to prepare a claim; the controller writes it. Both derive a
//! slice's limits from it through [`ClaimAllocation::slice_limits`], so they cannot disagree
//! on what a claim holds.

use crate::config::{ConfigEntry, ConfigError, ConfigSource, SliceLimits, effective_config};
use crate::quantity::Quantity;
use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};
use k8s_openapi::api::resource::v1;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use std::collections::BTreeMap;

/// One allocated device of a claim (`status.allocation.devices.results[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocatedDevice {
    /// `<request>` or `<request>/<subrequest>`.
    pub request: String,
    pub driver: String,
    pub pool: String,
    pub device: String,
    pub admin_access: bool,
    /// Set by the kube-scheduler for consumable-capacity allocations (1.34+).
    pub share_id: Option<String>,
    /// Consumable-capacity allocations: what the scheduler took of each capacity.
    pub consumed_capacity: BTreeMap<String, Quantity>,
}

impl AllocatedDevice {
    /// The main request name, `/subrequest` stripped, as the kubelet wants it.
    pub fn main_request(&self) -> &str {
        self.request.split('/').next().unwrap_or(&self.request)
    }
}

/// A claim's identity and allocation.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimAllocation {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub results: Vec<AllocatedDevice>,
    pub config: Vec<ConfigEntry>,
    /// The node the allocation is pinned to, when its nodeSelector names one.
    pub node_name: Option<String>,
}

/// Why an allocation cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    #[error("ResourceClaim {0}: status.allocation is not set")]
    NotAllocated(String),
    #[error("ResourceClaim {claim}: {field}: {message}")]
    Invalid {
        claim: String,
        field: String,
        message: String,
    },
    #[error("ResourceClaim {claim}: {source}")]
    Config {
        claim: String,
        #[source]
        source: ConfigError,
    },
}

fn source_of(s: &str) -> Option<ConfigSource> {
    match s {
        "FromClass" => Some(ConfigSource::FromClass),
        "FromClaim" => Some(ConfigSource::FromClaim),
        _ => None,
    }
}

fn source_str(s: ConfigSource) -> &'static str {
    match s {
        ConfigSource::FromClass => "FromClass",
        ConfigSource::FromClaim => "FromClaim",
    }
}

/// The node a selector pins, if it is the single `metadata.name In [node]` field selector an
/// allocator writes (ours and the kube-scheduler's).
pub fn pinned_node(selector: Option<&NodeSelector>) -> Option<String> {
    let term = selector?.node_selector_terms.first()?;
    let field = term
        .match_fields
        .as_ref()?
        .iter()
        .find(|r| r.key == "metadata.name")?;
    match (field.operator.as_str(), field.values.as_deref()) {
        ("In", Some([node])) => Some(node.clone()),
        _ => None,
    }
}

/// The nodeSelector that pins an allocation to one node.
pub fn node_selector_for(node: &str) -> NodeSelector {
    NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.to_string()]),
            }]),
            match_expressions: None,
        }],
    }
}

impl ClaimAllocation {
    /// Read a claim's allocation; errors name the claim and field.
    pub fn of(claim: &v1::ResourceClaim) -> Result<ClaimAllocation, AllocationError> {
        let key = format!(
            "{}/{}",
            claim.metadata.namespace.as_deref().unwrap_or(""),
            claim.metadata.name.as_deref().unwrap_or("")
        );
        let allocation = claim
            .status
            .as_ref()
            .and_then(|s| s.allocation.as_ref())
            .ok_or_else(|| AllocationError::NotAllocated(key.clone()))?;
        let devices = allocation.devices.as_ref();
        // Sized exactly: the controller keeps an allocation for as long as its claim.
        let mut results =
            Vec::with_capacity(devices.and_then(|d| d.results.as_ref()).map_or(0, Vec::len));
        for (i, r) in devices
            .and_then(|d| d.results.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mut consumed = BTreeMap::new();
            for (name, q) in r.consumed_capacity.iter().flatten() {
                let q = Quantity::parse(&q.0).map_err(|e| AllocationError::Invalid {
                    claim: key.clone(),
                    field: format!(
                        "status.allocation.devices.results[{i}].consumedCapacity.{name}"
                    ),
                    message: e.to_string(),
                })?;
                consumed.insert(name.clone(), q);
            }
            results.push(AllocatedDevice {
                request: r.request.clone(),
                driver: r.driver.clone(),
                pool: r.pool.clone(),
                device: r.device.clone(),
                admin_access: r.admin_access.unwrap_or(false),
                share_id: r.share_id.clone(),
                consumed_capacity: consumed,
            });
        }
        let mut config =
            Vec::with_capacity(devices.and_then(|d| d.config.as_ref()).map_or(0, Vec::len));
        for (i, c) in devices
            .and_then(|d| d.config.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            let source = source_of(&c.source).ok_or_else(|| AllocationError::Invalid {
                claim: key.clone(),
                field: format!("status.allocation.devices.config[{i}].source"),
                message: format!("{:?} is neither FromClass nor FromClaim", c.source),
            })?;
            if let Some(opaque) = &c.opaque {
                config.push(ConfigEntry {
                    source,
                    requests: c.requests.clone().unwrap_or_default(),
                    driver: opaque.driver.clone(),
                    parameters: crate::config::shared(opaque.parameters.0.clone()),
                });
            }
        }
        Ok(ClaimAllocation {
            namespace: claim.metadata.namespace.clone().unwrap_or_default(),
            name: claim.metadata.name.clone().unwrap_or_default(),
            uid: claim.metadata.uid.clone().unwrap_or_default(),
            results,
            config,
            node_name: pinned_node(allocation.node_selector.as_ref()),
        })
    }

    /// The `status.allocation` to write for this allocation.
    pub fn to_result(&self) -> v1::AllocationResult {
        v1::AllocationResult {
            devices: Some(v1::DeviceAllocationResult {
                results: Some(
                    self.results
                        .iter()
                        .map(|r| v1::DeviceRequestAllocationResult {
                            request: r.request.clone(),
                            driver: r.driver.clone(),
                            pool: r.pool.clone(),
                            device: r.device.clone(),
                            admin_access: r.admin_access.then_some(true),
                            share_id: r.share_id.clone(),
                            consumed_capacity: (!r.consumed_capacity.is_empty()).then(|| {
                                r.consumed_capacity
                                    .iter()
                                    .map(|(k, q)| (k.clone(), q.into()))
                                    .collect()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                config: (!self.config.is_empty()).then(|| {
                    self.config
                        .iter()
                        .map(|c| v1::DeviceAllocationConfiguration {
                            source: source_str(c.source).into(),
                            requests: (!c.requests.is_empty()).then(|| c.requests.clone()),
                            opaque: Some(v1::OpaqueDeviceConfiguration {
                                driver: c.driver.clone(),
                                parameters: RawExtension((*c.parameters).clone()),
                            }),
                        })
                        .collect()
                }),
            }),
            node_selector: self.node_name.as_deref().map(node_selector_for),
            ..Default::default()
        }
    }
}

impl ClaimAllocation {
    /// `namespace/name`, how Kubernetes names a claim in messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The results of `driver` on `pool`.
    pub fn results_for<'a>(
        &'a self,
        driver: &'a str,
        pool: &'a str,
    ) -> impl Iterator<Item = &'a AllocatedDevice> + 'a {
        self.results
            .iter()
            .filter(move |r| r.driver == driver && r.pool == pool)
    }

    /// Whether any configuration of the result's driver applies to it. A result with none was
    /// not allocated as a slice (the kube-scheduler handed out the whole GPU through a
    /// whole-GPU class) and holds the whole GPU.
    pub fn has_slice_config(&self, result: &AllocatedDevice) -> bool {
        let main = result.main_request();
        self.config.iter().any(|c| {
            c.driver == result.driver
                && (c.requests.is_empty()
                    || c.requests.iter().any(|r| r == &result.request || r == main))
        })
    }

    /// The limits one allocated device holds: the whole GPU, exclusively, when no
    /// configuration of its driver applies (see [`Self::has_slice_config`]); from
    /// consumedCapacity when the kube-scheduler allocated a share natively; otherwise from the
    /// merged configuration resolved against the GPU's memory. Admin access is not counted by
    /// callers (it ignores and does not take capacity).
    pub fn slice_limits(
        &self,
        result: &AllocatedDevice,
        gpu_memory: u64,
    ) -> Result<SliceLimits, AllocationError> {
        if result.share_id.is_none() && !self.has_slice_config(result) {
            return Ok(SliceLimits {
                memory_bytes: gpu_memory,
                cores: 100,
                exclusive: true,
            });
        }
        let config =
            effective_config(&self.config, &result.driver, &result.request).map_err(|source| {
                AllocationError::Config {
                    claim: self.key(),
                    source: source.within("status.allocation.devices"),
                }
            })?;
        let mut limits = config
            .resolve(gpu_memory)
            .map_err(|source| AllocationError::Config {
                claim: self.key(),
                source,
            })?;
        if result.share_id.is_some() && !limits.exclusive {
            if let Some(mem) = result.consumed_capacity.get(crate::capacity::MEMORY) {
                let consumed = mem.to_bytes().unwrap_or(0);
                // A share that leaves less than the smallest share beside it is the whole GPU:
                // what a claim asking for no amount consumes (the policy's step-aligned default).
                limits.memory_bytes =
                    if consumed.saturating_add(crate::capacity::NATIVE_MEMORY_STEP) > gpu_memory {
                        gpu_memory
                    } else {
                        consumed
                    };
            }
            if let Some(cores) = result.consumed_capacity.get(crate::capacity::CORES) {
                limits.cores = cores.ceil_units().clamp(0, 100) as u8;
            }
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{API_VERSION, KIND};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    fn allocation() -> ClaimAllocation {
        ClaimAllocation {
            namespace: "ml".into(),
            name: "train-gpu".into(),
            uid: "0b6f3c1e-5d0a-4c8e-9f11-2a7e8c3d4b5a".into(),
            results: vec![
                AllocatedDevice {
                    request: "gpu/small".into(),
                    driver: "vgpu.hami.io".into(),
                    pool: "node-a".into(),
                    device: "gpu-3".into(),
                    admin_access: false,
                    share_id: None,
                    consumed_capacity: BTreeMap::new(),
                },
                AllocatedDevice {
                    request: "nic".into(),
                    driver: "net.example.com".into(),
                    pool: "node-a".into(),
                    device: "eth1".into(),
                    admin_access: false,
                    share_id: None,
                    consumed_capacity: BTreeMap::new(),
                },
            ],
            config: vec![
                ConfigEntry {
                    source: ConfigSource::FromClass,
                    requests: vec![],
                    driver: "vgpu.hami.io".into(),
                    parameters: json!({"apiVersion": API_VERSION, "kind": KIND, "memory": "8Gi", "cores": 20}).into(),
                },
                ConfigEntry {
                    source: ConfigSource::FromClaim,
                    requests: vec!["gpu".into()],
                    driver: "vgpu.hami.io".into(),
                    parameters: json!({"apiVersion": API_VERSION, "kind": KIND, "cores": 30}).into(),
                },
            ],
            node_name: Some("node-a".into()),
        }
    }

    fn claim_v1(a: &ClaimAllocation) -> v1::ResourceClaim {
        v1::ResourceClaim {
            metadata: ObjectMeta {
                namespace: Some(a.namespace.clone()),
                name: Some(a.name.clone()),
                uid: Some(a.uid.clone()),
                ..Default::default()
            },
            spec: Default::default(),
            status: Some(v1::ResourceClaimStatus {
                allocation: Some(a.to_result()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn round_trips_through_the_claim_status() {
        let a = allocation();
        assert_eq!(ClaimAllocation::of(&claim_v1(&a)).unwrap(), a);
    }

    #[test]
    fn limits_merge_class_then_claim() {
        let a = allocation();
        let ours: Vec<_> = a.results_for("vgpu.hami.io", "node-a").collect();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].main_request(), "gpu");
        let limits = a.slice_limits(ours[0], 80 << 30).unwrap();
        assert_eq!(
            limits,
            SliceLimits {
                memory_bytes: 8 << 30,
                cores: 30,
                exclusive: false
            }
        );
    }

    #[test]
    fn native_share_takes_consumed_capacity() {
        let mut a = allocation();
        a.results[0].share_id = Some("7f0c2a8e-0000-4000-8000-000000000001".into());
        a.results[0].consumed_capacity = [
            ("memory".to_string(), Quantity::parse("4Gi").unwrap()),
            ("cores".to_string(), Quantity::from_units(25)),
        ]
        .into();
        let limits = a.slice_limits(&a.results[0], 80 << 30).unwrap();
        assert_eq!(
            limits,
            SliceLimits {
                memory_bytes: 4 << 30,
                cores: 25,
                exclusive: false
            }
        );
        assert_eq!(ClaimAllocation::of(&claim_v1(&a)).unwrap(), a);
        // A claim that asked for no amount consumed the policy's default, the largest whole
        // number of steps: with no room for another share beside it, it has the whole memory.
        a.results[0].consumed_capacity = [
            ("memory".to_string(), Quantity::parse("81408Mi").unwrap()),
            ("cores".to_string(), Quantity::from_units(100)),
        ]
        .into();
        let whole = a.slice_limits(&a.results[0], 81559 << 20).unwrap();
        assert_eq!(whole.memory_bytes, 81559 << 20);
        // One step less leaves room for a share: the limit is what was consumed.
        a.results[0].consumed_capacity =
            [("memory".to_string(), Quantity::parse("81152Mi").unwrap())].into();
        let share = a.slice_limits(&a.results[0], 81559 << 20).unwrap();
        assert_eq!(share.memory_bytes, 81152 << 20);
    }

    #[test]
    fn errors_name_the_claim_and_field() {
        let mut claim = claim_v1(&allocation());
        claim.status = None;
        assert_eq!(
            ClaimAllocation::of(&claim).unwrap_err().to_string(),
            "ResourceClaim ml/train-gpu: status.allocation is not set"
        );
        let mut a = allocation();
        a.config[1].parameters =
            json!({"apiVersion": API_VERSION, "kind": KIND, "cores": 300}).into();
        let e = a
            .slice_limits(&a.results[0], 80 << 30)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ml/train-gpu")
                && e.contains("config[0] (FromClaim).opaque.parameters.cores"),
            "{e}"
        );
        let mut claim = claim_v1(&allocation());
        let alloc = claim.status.as_mut().unwrap().allocation.as_mut().unwrap();
        alloc.devices.as_mut().unwrap().config.as_mut().unwrap()[0].source = "FromNowhere".into();
        let e = ClaimAllocation::of(&claim).unwrap_err().to_string();
        assert!(e.contains("config[0].source"), "{e}");
    }

    #[test]
    fn results_without_slice_config_hold_the_whole_gpu() {
        let mut a = allocation();
        a.config.clear();
        assert!(!a.has_slice_config(&a.results[0]));
        let limits = a.slice_limits(&a.results[0], 80 << 30).unwrap();
        assert_eq!(
            limits,
            SliceLimits {
                memory_bytes: 80 << 30,
                cores: 100,
                exclusive: true
            }
        );
        // A claim entry for another request does not make this one a slice.
        let mut b = allocation();
        b.config.remove(0);
        b.config[0].requests = vec!["other".into()];
        assert!(!b.has_slice_config(&b.results[0]));
    }

    #[test]
    fn node_pinning() {
        assert_eq!(
            pinned_node(Some(&node_selector_for("n1"))).as_deref(),
            Some("n1")
        );
        assert_eq!(pinned_node(None), None);
    }
}
