//! Rendering a node's GPUs into ResourceSlice objects (resource.k8s.io/v1; the `dra` crate
//! converts for clusters that serve v1beta1) within the API's limits, and reading published
//! slices back.

use crate::capacity::{CORES, FULL_CORES, MEMORY, NATIVE_CORES_MIN, NATIVE_MEMORY_STEP};
use crate::gpu::{Gpu, semver_of};
use crate::names::{is_dns_label, is_driver_name, is_qualified_name};
use crate::quantity::Quantity;
use k8s_openapi::api::resource::v1;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use std::collections::BTreeMap;
use std::sync::Arc;

/// `ResourceSliceMaxDevices`.
pub const MAX_DEVICES_PER_SLICE: usize = 128;
/// `ResourceSliceMaxAttributesAndCapacitiesPerDevice`.
pub const MAX_ATTRIBUTES_AND_CAPACITIES: usize = 32;
/// `DeviceAttributeMaxValueLength`.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 64;
/// Taint key put on a GPU that stopped being healthy, where the API has device taints.
pub const UNHEALTHY_TAINT_KEY: &str = "vgpu.hami.io/unhealthy";
/// The standard attribute name Kubernetes defines for a PCI bus id.
pub const PCI_BUS_ID_ATTRIBUTE: &str = "resource.kubernetes.io/pciBusID";

/// A device attribute value: exactly one of int, bool, string or (semantic) version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttributeValue {
    Int(i64),
    Bool(bool),
    String(String),
    Version(String),
}

/// A device as published, independent of the API version.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PublishedDevice {
    pub name: String,
    /// Keyed by qualified name; unprefixed names belong to the driver's domain.
    pub attributes: BTreeMap<String, AttributeValue>,
    pub capacity: BTreeMap<String, Quantity>,
    /// Set when the device is unhealthy: the reason.
    pub unhealthy: Option<String>,
    /// Native sharing (DRA consumable capacity, 1.34+): the kube-scheduler may allocate the
    /// device to many claims, each consuming part of `memory` and `cores` under the request
    /// policies of [`capacity_request_policy`].
    pub allow_multiple_allocations: bool,
}

/// Why a set of devices cannot be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceError {
    #[error("driver name {0:?} is not a DNS subdomain of at most 63 characters")]
    DriverName(String),
    #[error(
        "pool name {0:?} is not a valid pool name (DNS subdomains separated by '/', at most 253 characters)"
    )]
    PoolName(String),
    #[error("device {device:?}: {message}")]
    Device { device: String, message: String },
    #[error("device name {0:?} appears twice in the pool")]
    DuplicateDevice(String),
}

fn device_error(device: &str, message: impl Into<String>) -> SliceError {
    SliceError::Device {
        device: device.to_string(),
        message: message.into(),
    }
}

/// Truncate a string from hardware to the API's attribute length, on a character boundary.
fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_ATTRIBUTE_VALUE_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The published form of a node's GPUs: one device per physical GPU with its attributes and the
/// shareable capacities `memory` and `cores`.
pub fn gpu_devices(gpus: &[Gpu]) -> Result<Vec<PublishedDevice>, SliceError> {
    let index_of: BTreeMap<&str, u32> = gpus.iter().map(|g| (g.uuid.as_str(), g.index)).collect();
    gpus.iter()
        .map(|gpu| {
            let name = gpu.device_name();
            let mut attributes = BTreeMap::new();
            let mut put = |k: &str, v: AttributeValue| {
                attributes.insert(k.to_string(), v);
            };
            put("type", AttributeValue::String("gpu".into()));
            put("uuid", AttributeValue::String(clip(&gpu.uuid)));
            put("index", AttributeValue::Int(gpu.index.into()));
            put("minor", AttributeValue::Int(gpu.minor.into()));
            put(
                "productName",
                AttributeValue::String(clip(&gpu.product_name)),
            );
            put(
                "architecture",
                AttributeValue::String(clip(&gpu.architecture)),
            );
            for (key, raw) in [
                ("cudaComputeCapability", &gpu.cuda_compute_capability),
                ("driverVersion", &gpu.driver_version),
                ("cudaDriverVersion", &gpu.cuda_driver_version),
            ] {
                let v = semver_of(raw).ok_or_else(|| {
                    device_error(
                        &name,
                        format!("{key} {raw:?} is not a version like 12.4 or 560.35.03"),
                    )
                })?;
                put(key, AttributeValue::Version(v));
            }
            put(
                PCI_BUS_ID_ATTRIBUTE,
                AttributeValue::String(clip(&gpu.pci_bus_id)),
            );
            if let Some(numa) = gpu.numa_node {
                put("numaNode", AttributeValue::Int(numa.into()));
            }
            put(
                "multiprocessors",
                AttributeValue::Int(gpu.multiprocessor_count.into()),
            );
            if !gpu.nvlink_peers.is_empty() {
                let mut peers: Vec<u32> = gpu
                    .nvlink_peers
                    .iter()
                    .map(|uuid| {
                        index_of.get(uuid.as_str()).copied().ok_or_else(|| {
                            device_error(
                                &name,
                                format!("NVLink peer {uuid:?} is not a GPU of this node"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
                peers.sort_unstable();
                peers.dedup();
                let list = peers
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                put("nvlinkPeers", AttributeValue::String(list));
            }
            let mut capacity = BTreeMap::new();
            capacity.insert(
                MEMORY.to_string(),
                Quantity::from_units(gpu.memory_bytes as i64),
            );
            capacity.insert(CORES.to_string(), Quantity::from_units(FULL_CORES.into()));
            let device = PublishedDevice {
                name,
                attributes,
                capacity,
                unhealthy: None,
                allow_multiple_allocations: false,
            };
            validate_device(&device)?;
            Ok(device)
        })
        .collect()
}

/// The request policy a natively shared device publishes for a capacity: memory from
/// [`NATIVE_MEMORY_STEP`] in steps of it up to the last whole step within the memory, cores
/// from 1 to 100 in steps of 1. The API requires a default with a range, and max and default
/// on the steps (a 1.34 API server rejects the slice otherwise). The default is the most a
/// claim can take, so a claim that asks for no amount gets the whole GPU, never a share.
pub fn capacity_request_policy(name: &str, total: &Quantity) -> Option<RequestPolicy> {
    match name {
        MEMORY => {
            let step = NATIVE_MEMORY_STEP;
            let total_bytes = total.to_bytes().unwrap_or(0);
            // max and default must be min + k·step: the largest such amount within the memory.
            let whole = step + total_bytes.saturating_sub(step) / step * step;
            Some(RequestPolicy {
                min: Quantity::from_units(step as i64),
                max: Quantity::from_units(whole as i64),
                step: Quantity::from_units(step as i64),
                default: Quantity::from_units(whole as i64),
            })
        }
        CORES => Some(RequestPolicy {
            min: Quantity::from_units(NATIVE_CORES_MIN.into()),
            max: Quantity::from_units(FULL_CORES.into()),
            step: Quantity::from_units(1),
            default: Quantity::from_units(FULL_CORES.into()),
        }),
        _ => None,
    }
}

/// `requestPolicy` of a consumable capacity: its `validRange` and `default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestPolicy {
    pub min: Quantity,
    pub max: Quantity,
    pub step: Quantity,
    /// What a claim that asks for no amount consumes.
    pub default: Quantity,
}

/// The NVLink peers a published device lists, as device names.
pub fn nvlink_peer_names(device: &PublishedDevice) -> Vec<String> {
    match device.attributes.get("nvlinkPeers") {
        Some(AttributeValue::String(list)) => list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|i| format!("gpu-{i}"))
            .collect(),
        _ => Vec::new(),
    }
}

fn is_semver(s: &str) -> bool {
    let core = s.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
        })
}

/// Check one device against the API's limits.
pub fn validate_device(device: &PublishedDevice) -> Result<(), SliceError> {
    let name = &device.name;
    if !is_dns_label(name) {
        return Err(device_error(
            name,
            "name must be a DNS label (lowercase alphanumerics and '-', at most 63)",
        ));
    }
    let total = device.attributes.len() + device.capacity.len();
    if total > MAX_ATTRIBUTES_AND_CAPACITIES {
        return Err(device_error(
            name,
            format!(
                "{total} attributes and capacities exceed the limit of {MAX_ATTRIBUTES_AND_CAPACITIES}"
            ),
        ));
    }
    for key in device.attributes.keys().chain(device.capacity.keys()) {
        if !is_qualified_name(key) {
            return Err(device_error(
                name,
                format!("{key:?} is not a qualified name"),
            ));
        }
    }
    for (key, value) in &device.attributes {
        match value {
            AttributeValue::String(s) | AttributeValue::Version(s)
                if s.len() > MAX_ATTRIBUTE_VALUE_LEN =>
            {
                return Err(device_error(
                    name,
                    format!(
                        "attribute {key}: {} characters exceed the limit of {MAX_ATTRIBUTE_VALUE_LEN}",
                        s.len()
                    ),
                ));
            }
            AttributeValue::Version(s) if !is_semver(s) => {
                return Err(device_error(
                    name,
                    format!("attribute {key}: {s:?} is not a semantic version"),
                ));
            }
            _ => {}
        }
    }
    for (key, q) in &device.capacity {
        if q.is_negative() {
            return Err(device_error(name, format!("capacity {key} is negative")));
        }
    }
    Ok(())
}

/// Which node a pool belongs to; slices are owned by the Node so they go when it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRef {
    pub name: String,
    pub uid: String,
}

/// How to render a pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub driver: String,
    pub generation: i64,
    /// At most [`MAX_DEVICES_PER_SLICE`].
    pub max_devices_per_slice: usize,
    /// Unhealthy devices get a NoSchedule taint (API with device taints) instead of being left out.
    pub taint_unhealthy: bool,
}

impl PoolOptions {
    pub fn new(driver: &str) -> Self {
        PoolOptions {
            driver: driver.to_string(),
            generation: 0,
            max_devices_per_slice: MAX_DEVICES_PER_SLICE,
            taint_unhealthy: false,
        }
    }
}

/// Render a node's devices as the slices of its pool (pool name = node name): spec.nodeName,
/// an owner reference to the Node, the same generation and resourceSliceCount on every slice,
/// at most `max_devices_per_slice` devices each, at least one (possibly empty) slice.
pub fn render_pool(
    node: &NodeRef,
    devices: &[PublishedDevice],
    opts: &PoolOptions,
) -> Result<Vec<v1::ResourceSlice>, SliceError> {
    if !is_driver_name(&opts.driver) {
        return Err(SliceError::DriverName(opts.driver.clone()));
    }
    if node.name.is_empty()
        || node.name.len() > 253
        || !node.name.split('/').all(crate::names::is_dns_subdomain)
    {
        return Err(SliceError::PoolName(node.name.clone()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in devices {
        validate_device(d)?;
        if !seen.insert(d.name.as_str()) {
            return Err(SliceError::DuplicateDevice(d.name.clone()));
        }
    }
    let offered: Vec<&PublishedDevice> = devices
        .iter()
        .filter(|d| d.unhealthy.is_none() || opts.taint_unhealthy)
        .collect();
    let per_slice = opts.max_devices_per_slice.clamp(1, MAX_DEVICES_PER_SLICE);
    let chunks: Vec<&[&PublishedDevice]> = if offered.is_empty() {
        vec![&[]]
    } else {
        offered.chunks(per_slice).collect()
    };
    let count = chunks.len() as i64;
    let metadata = ObjectMeta {
        generate_name: Some(format!("{}-{}-", node.name, opts.driver)),
        owner_references: Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: node.name.clone(),
            uid: node.uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }]),
        ..ObjectMeta::default()
    };
    Ok(chunks
        .into_iter()
        .map(|chunk| v1::ResourceSlice {
            metadata: metadata.clone(),
            spec: v1::ResourceSliceSpec {
                driver: opts.driver.clone(),
                node_name: Some(node.name.clone()),
                pool: v1::ResourcePool {
                    name: node.name.clone(),
                    generation: opts.generation,
                    resource_slice_count: count,
                },
                devices: Some(chunk.iter().map(|d| to_device(d)).collect()),
                ..Default::default()
            },
        })
        .collect())
}

fn k8s_quantity(q: &Quantity) -> K8sQuantity {
    K8sQuantity(q.to_string())
}

fn to_attr(v: &AttributeValue) -> v1::DeviceAttribute {
    let mut a = v1::DeviceAttribute::default();
    match v {
        AttributeValue::Int(i) => a.int = Some(*i),
        AttributeValue::Bool(b) => a.bool = Some(*b),
        AttributeValue::String(s) => a.string = Some(s.clone()),
        AttributeValue::Version(s) => a.version = Some(s.clone()),
    }
    a
}

fn from_attr(a: &v1::DeviceAttribute) -> Option<AttributeValue> {
    match (a.int, a.bool, &a.string, &a.version) {
        (Some(i), None, None, None) => Some(AttributeValue::Int(i)),
        (None, Some(b), None, None) => Some(AttributeValue::Bool(b)),
        (None, None, Some(s), None) => Some(AttributeValue::String(s.clone())),
        (None, None, None, Some(s)) => Some(AttributeValue::Version(s.clone())),
        _ => None,
    }
}

fn capacity_of(d: &PublishedDevice) -> BTreeMap<String, v1::DeviceCapacity> {
    d.capacity
        .iter()
        .map(|(k, q)| {
            let request_policy = d
                .allow_multiple_allocations
                .then(|| capacity_request_policy(k, q))
                .flatten()
                .map(|p| v1::CapacityRequestPolicy {
                    default: Some(k8s_quantity(&p.default)),
                    valid_values: None,
                    valid_range: Some(v1::CapacityRequestPolicyRange {
                        min: k8s_quantity(&p.min),
                        max: Some(k8s_quantity(&p.max)),
                        step: Some(k8s_quantity(&p.step)),
                    }),
                });
            (
                k.clone(),
                v1::DeviceCapacity {
                    value: k8s_quantity(q),
                    request_policy,
                },
            )
        })
        .collect()
}

fn to_device(d: &PublishedDevice) -> v1::Device {
    v1::Device {
        name: d.name.clone(),
        attributes: Some(
            d.attributes
                .iter()
                .map(|(k, v)| (k.clone(), to_attr(v)))
                .collect(),
        ),
        capacity: Some(capacity_of(d)),
        taints: d.unhealthy.as_ref().map(|reason| {
            vec![v1::DeviceTaint {
                key: UNHEALTHY_TAINT_KEY.into(),
                value: Some(clip(reason)),
                effect: "NoSchedule".into(),
                time_added: None,
            }]
        }),
        allow_multiple_allocations: d.allow_multiple_allocations.then_some(true),
        ..Default::default()
    }
}

fn from_device(d: &v1::Device) -> PublishedDevice {
    PublishedDevice {
        name: d.name.clone(),
        attributes: d
            .attributes
            .iter()
            .flatten()
            .filter_map(|(k, a)| from_attr(a).map(|v| (k.clone(), v)))
            .collect(),
        capacity: d
            .capacity
            .iter()
            .flatten()
            .filter_map(|(k, c)| Quantity::parse(&c.value.0).ok().map(|q| (k.clone(), q)))
            .collect(),
        unhealthy: d
            .taints
            .iter()
            .flatten()
            .find(|t| t.key == UNHEALTHY_TAINT_KEY)
            .map(|t| t.value.clone().unwrap_or_default()),
        allow_multiple_allocations: d.allow_multiple_allocations.unwrap_or(false),
    }
}

/// A published slice as the allocator needs it, whatever version it was read in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceView {
    pub name: String,
    pub driver: String,
    pub pool: String,
    pub generation: i64,
    pub resource_slice_count: i64,
    pub node_name: Option<String>,
    /// Shared: the allocator's GPU table holds the same devices as its cache of slices.
    pub devices: Vec<Arc<PublishedDevice>>,
}

impl SliceView {
    pub fn of(s: &v1::ResourceSlice) -> SliceView {
        SliceView {
            name: s.metadata.name.clone().unwrap_or_default(),
            driver: s.spec.driver.clone(),
            pool: s.spec.pool.name.clone(),
            generation: s.spec.pool.generation,
            resource_slice_count: s.spec.pool.resource_slice_count,
            node_name: s.spec.node_name.clone().filter(|n| !n.is_empty()),
            devices: s
                .spec
                .devices
                .iter()
                .flatten()
                .map(|d| Arc::new(from_device(d)))
                .collect(),
        }
    }
}
