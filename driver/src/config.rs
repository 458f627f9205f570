//! The configuration API users write in the opaque parameters of DeviceClasses and
//! ResourceClaims, and the one place where class and claim configuration are merged.
//!
//! ```yaml
//! apiVersion: vgpu.hami.io/v1alpha1
//! kind: GpuSliceConfig
//! memory: 4Gi            # or memoryPercentage: 25 (of the GPU's memory)
//! cores: 30              # percent of the GPU's compute; 0 = no compute share reserved
//! exclusive: false       # true: a whole GPU, shared with no one
//! scheduling:
//!   nodePolicy: Binpack  # or Spread (HAMi's node-scheduler-policy)
//!   gpuPolicy: Spread    # or Binpack (HAMi's gpu-scheduler-policy)
//!   topology: Preferred  # Required | Preferred | None, for claims of several GPUs
//! ```

use crate::quantity::Quantity;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

/// API group of the configuration objects.
pub const API_GROUP: &str = "vgpu.hami.io";
/// The only version served so far.
pub const API_VERSION: &str = "vgpu.hami.io/v1alpha1";
/// Kind of the slice configuration object.
pub const KIND: &str = "GpuSliceConfig";
/// Opaque parameters may not exceed this many bytes (`OpaqueParametersMaxLength`).
pub const MAX_PARAMETERS_BYTES: usize = 10 * 1024;

/// Placement preference between candidates (HAMi's scheduler policies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Policy {
    /// Fill what is already in use first, keeping whole GPUs and nodes free.
    #[serde(alias = "binpack")]
    Binpack,
    /// Prefer what is least used, spreading load.
    #[serde(alias = "spread")]
    Spread,
}

/// How a claim of several GPUs wants them connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Topology {
    /// Only GPUs that are all NVLink peers of each other.
    Required,
    /// NVLink peers first, then GPUs on one NUMA node, then any.
    Preferred,
    /// Ignore topology.
    None,
}

/// Scheduling preferences for one claim, overriding the cluster's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scheduling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
}

/// A memory request as written: a quantity (`4Gi`) or a plain number of bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemoryValue {
    Bytes(i64),
    Quantity(String),
}

/// The wire form of `GpuSliceConfig`, decoded strictly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GpuSliceConfigWire {
    api_version: String,
    kind: String,
    #[serde(default)]
    memory: Option<MemoryValue>,
    #[serde(default)]
    memory_percentage: Option<i64>,
    #[serde(default)]
    cores: Option<i64>,
    #[serde(default)]
    exclusive: Option<bool>,
    #[serde(default)]
    scheduling: Option<Scheduling>,
}

/// How much of a GPU a slice asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryRequest {
    Bytes(u64),
    /// 1 to 100 percent of the GPU's memory.
    Percent(u8),
}

/// A decoded and checked configuration; every field optional so that a class can give defaults
/// that a claim overrides field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SliceConfig {
    pub memory: Option<MemoryRequest>,
    /// 0 to 100.
    pub cores: Option<u8>,
    pub exclusive: Option<bool>,
    pub scheduling: Scheduling,
}

/// A configuration error, with the path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// e.g. `parameters.cores`, prefixed by the caller with where the parameters came from.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Prefix the field path with where the parameters came from.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}

impl SliceConfig {
    /// Decode opaque parameters strictly: the right apiVersion and kind, no unknown fields,
    /// percentages within 0–100, positive memory, at most 10 KiB.
    pub fn decode(parameters: &serde_json::Value) -> Result<SliceConfig, ConfigError> {
        let size = serde_json::to_vec(parameters)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_PARAMETERS_BYTES {
            return Err(ConfigError::new(
                "parameters",
                format!("{size} bytes exceed the API's limit of {MAX_PARAMETERS_BYTES}"),
            ));
        }
        let wire: GpuSliceConfigWire =
            serde_path_to_error::deserialize(parameters).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    "parameters".to_string()
                } else {
                    format!("parameters.{path}")
                };
                ConfigError::new(field, e.into_inner().to_string())
            })?;
        if wire.api_version != API_VERSION {
            return Err(ConfigError::new(
                "parameters.apiVersion",
                format!("{:?} is not served; use {API_VERSION:?}", wire.api_version),
            ));
        }
        if wire.kind != KIND {
            return Err(ConfigError::new(
                "parameters.kind",
                format!(
                    "{:?} is not a kind of {API_VERSION}; use {KIND:?}",
                    wire.kind
                ),
            ));
        }
        let memory = match (&wire.memory, wire.memory_percentage) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "parameters.memory",
                    "set memory or memoryPercentage, not both",
                ));
            }
            (Some(value), None) => Some(MemoryRequest::Bytes(memory_bytes(value)?)),
            (None, Some(pct)) => {
                if !(1..=100).contains(&pct) {
                    return Err(ConfigError::new(
                        "parameters.memoryPercentage",
                        format!("must be between 1 and 100, got {pct}"),
                    ));
                }
                Some(MemoryRequest::Percent(pct as u8))
            }
            (None, None) => None,
        };
        let cores = match wire.cores {
            Some(c) if !(0..=100).contains(&c) => {
                return Err(ConfigError::new(
                    "parameters.cores",
                    format!("must be between 0 and 100 (percent of the GPU), got {c}"),
                ));
            }
            Some(c) => Some(c as u8),
            None => None,
        };
        Ok(SliceConfig {
            memory,
            cores,
            exclusive: wire.exclusive,
            scheduling: wire.scheduling.unwrap_or_default(),
        })
    }

    /// Field-by-field override: what `later` sets wins (the API's rule for class then claim).
    pub fn merge(self, later: SliceConfig) -> SliceConfig {
        SliceConfig {
            memory: later.memory.or(self.memory),
            cores: later.cores.or(self.cores),
            exclusive: later.exclusive.or(self.exclusive),
            scheduling: Scheduling {
                node_policy: later.scheduling.node_policy.or(self.scheduling.node_policy),
                gpu_policy: later.scheduling.gpu_policy.or(self.scheduling.gpu_policy),
                topology: later.scheduling.topology.or(self.scheduling.topology),
            },
        }
    }

    /// The slice this configuration takes of a GPU with `gpu_memory` bytes.
    ///
    /// Unset memory means the whole GPU's memory; unset cores means 0: no compute share is
    /// reserved and none is throttled (HAMi's default). An exclusive slice is the whole GPU.
    pub fn resolve(&self, gpu_memory: u64) -> Result<SliceLimits, ConfigError> {
        if self.exclusive == Some(true) {
            return Ok(SliceLimits {
                memory_bytes: gpu_memory,
                cores: 100,
                exclusive: true,
            });
        }
        let memory_bytes = match self.memory {
            None => gpu_memory,
            Some(MemoryRequest::Percent(p)) => {
                (u128::from(gpu_memory) * u128::from(p) / 100) as u64
            }
            Some(MemoryRequest::Bytes(b)) if b > gpu_memory => {
                return Err(ConfigError::new(
                    "parameters.memory",
                    format!("{b} bytes is more than the GPU's {gpu_memory} bytes"),
                ));
            }
            Some(MemoryRequest::Bytes(b)) => b,
        };
        Ok(SliceLimits {
            memory_bytes,
            cores: self.cores.unwrap_or(0),
            exclusive: false,
        })
    }
}

fn memory_bytes(value: &MemoryValue) -> Result<u64, ConfigError> {
    let field = "parameters.memory";
    let bytes = match value {
        MemoryValue::Bytes(b) => i128::from(*b),
        MemoryValue::Quantity(s) => Quantity::parse(s)
            .map_err(|e| ConfigError::new(field, e.to_string()))?
            .ceil_units(),
    };
    if bytes <= 0 {
        return Err(ConfigError::new(
            field,
            format!("must be positive, got {value:?}"),
        ));
    }
    u64::try_from(bytes).map_err(|_| ConfigError::new(field, "is too large"))
}

/// What a slice holds of one GPU once its configuration is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SliceLimits {
    pub memory_bytes: u64,
    /// Percent of the GPU's compute, 0–100.
    pub cores: u8,
    pub exclusive: bool,
}

/// Where an allocation's configuration entry came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ConfigSource {
    FromClass,
    FromClaim,
}

/// One `allocation.devices.config` (or class/claim `config`) entry, version-neutral.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConfigEntry {
    pub source: ConfigSource,
    /// Requests the entry applies to; empty = all.
    pub requests: Vec<String>,
    pub driver: String,
    /// Shared between equal entries ([`shared`]).
    pub parameters: Arc<serde_json::Value>,
}

/// `value`, sharing one allocation with every equal value made by this function that is still
/// alive. Claims made from one template carry the same configuration, as do the allocations of
/// one class; a controller caching thousands of them would otherwise hold a copy each, and a
/// small JSON object takes hundreds of bytes.
pub fn shared(value: serde_json::Value) -> Arc<serde_json::Value> {
    struct Table {
        values: HashMap<Box<str>, Weak<serde_json::Value>>,
        prune_at: usize,
    }
    static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
        Mutex::new(Table {
            values: HashMap::new(),
            prune_at: 1024,
        })
    });
    // Maps serialize in key order, so equal values have equal text.
    let Ok(key) = serde_json::to_string(&value) else {
        return Arc::new(value);
    };
    let mut table = TABLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(v) = table.values.get(key.as_str()).and_then(Weak::upgrade) {
        return v;
    }
    let v = Arc::new(value);
    table
        .values
        .insert(key.into_boxed_str(), Arc::downgrade(&v));
    if table.values.len() >= table.prune_at {
        table.values.retain(|_, w| w.strong_count() > 0);
        table.prune_at = (table.values.len() * 2).max(1024);
    }
    v
}

impl ConfigEntry {
    fn applies_to(&self, request: &str) -> bool {
        let main = request.split('/').next().unwrap_or(request);
        self.requests.is_empty() || self.requests.iter().any(|r| r == request || r == main)
    }
}

/// The effective configuration of one request: this driver's entries that apply to it, class
/// entries first then claim entries, each in order, later winning field by field. Other
/// drivers' parameters are ignored. Errors name the entry by its place in its own source's
/// list (`config[0] (FromClaim)` is the claim's first entry, whatever the class adds).
pub fn effective_config(
    entries: &[ConfigEntry],
    driver: &str,
    request: &str,
) -> Result<SliceConfig, ConfigError> {
    effective_config_named(entries, driver, request, |source, i| {
        format!("config[{i}] ({source:?})")
    })
}

/// [`effective_config`] with errors prefixed by `name(source, i)`, `i` counting the entries
/// of that source only: a user reads the claim's `config[0]` as the first entry they wrote,
/// not as its place after the class's entries.
pub fn effective_config_named(
    entries: &[ConfigEntry],
    driver: &str,
    request: &str,
    name: impl Fn(ConfigSource, usize) -> String,
) -> Result<SliceConfig, ConfigError> {
    let (mut class_i, mut claim_i) = (0usize, 0usize);
    let mut ordered: Vec<(usize, &ConfigEntry)> = entries
        .iter()
        .map(|e| {
            let counter = match e.source {
                ConfigSource::FromClass => &mut class_i,
                ConfigSource::FromClaim => &mut claim_i,
            };
            *counter += 1;
            (*counter - 1, e)
        })
        .collect();
    // Stable: keeps each source's own order, puts every class entry before any claim entry.
    ordered.sort_by_key(|(_, e)| e.source);
    let mut merged = SliceConfig::default();
    for (i, entry) in ordered {
        if entry.driver != driver || !entry.applies_to(request) {
            continue;
        }
        let decoded = SliceConfig::decode(&entry.parameters)
            .map_err(|e| e.within(&format!("{}.opaque", name(entry.source, i))))?;
        merged = merged.merge(decoded);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(extra: serde_json::Value) -> serde_json::Value {
        let mut v = json!({"apiVersion": API_VERSION, "kind": KIND});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    }

    fn err(extra: serde_json::Value) -> ConfigError {
        SliceConfig::decode(&params(extra)).unwrap_err()
    }

    #[test]
    fn decodes_a_full_config() {
        let c = SliceConfig::decode(&params(json!({
            "memory": "4Gi", "cores": 30, "exclusive": false,
            "scheduling": {"nodePolicy": "Spread", "gpuPolicy": "binpack", "topology": "Required"}
        })))
        .unwrap();
        assert_eq!(c.memory, Some(MemoryRequest::Bytes(4 << 30)));
        assert_eq!(c.cores, Some(30));
        assert_eq!(c.scheduling.node_policy, Some(Policy::Spread));
        assert_eq!(c.scheduling.gpu_policy, Some(Policy::Binpack));
        assert_eq!(c.scheduling.topology, Some(Topology::Required));
        let bytes = SliceConfig::decode(&params(json!({"memory": 1024}))).unwrap();
        assert_eq!(bytes.memory, Some(MemoryRequest::Bytes(1024)));
    }

    #[test]
    fn strict_errors_name_the_field() {
        let e = err(json!({"colour": "red"}));
        assert_eq!(e.field, "parameters.colour");
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(err(json!({"cores": 101})).field, "parameters.cores");
        assert_eq!(err(json!({"cores": -1})).field, "parameters.cores");
        assert_eq!(
            err(json!({"memoryPercentage": 0})).field,
            "parameters.memoryPercentage"
        );
        assert_eq!(
            err(json!({"memoryPercentage": 120})).field,
            "parameters.memoryPercentage"
        );
        assert_eq!(err(json!({"memory": "-1Gi"})).field, "parameters.memory");
        assert_eq!(err(json!({"memory": "4GB"})).field, "parameters.memory");
        assert_eq!(
            err(json!({"memory": "1Gi", "memoryPercentage": 5})).field,
            "parameters.memory"
        );
        assert_eq!(err(json!({"cores": "thirty"})).field, "parameters.cores");
        let e = err(json!({"scheduling": {"gpuPolicy": "Random"}}));
        assert_eq!(e.field, "parameters.scheduling.gpuPolicy", "{e}");
        let e = err(json!({"scheduling": {"nodepolicy": "Spread"}}));
        assert_eq!(e.field, "parameters.scheduling.nodepolicy", "{e}");
        let e = SliceConfig::decode(&json!({"apiVersion": "v1", "kind": KIND})).unwrap_err();
        assert_eq!(e.field, "parameters.apiVersion");
        let e =
            SliceConfig::decode(&json!({"apiVersion": API_VERSION, "kind": "Gpu"})).unwrap_err();
        assert_eq!(e.field, "parameters.kind");
        let e = SliceConfig::decode(&json!({"kind": KIND})).unwrap_err();
        assert!(e.message.contains("apiVersion"), "{e}");
    }

    #[test]
    fn equal_parameters_share_one_value_while_one_lives() {
        let a = shared(json!({"memory": "10Gi", "cores": 20}));
        // Same map, keys in another order: equal, so shared.
        let b = shared(json!({"cores": 20, "memory": "10Gi"}));
        assert!(Arc::ptr_eq(&a, &b));
        let c = shared(json!({"memory": "10Gi", "cores": 21}));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, json!({"memory": "10Gi", "cores": 21}));
        // Once every holder is gone a new value is made, with the same contents.
        drop((a, b));
        let d = shared(json!({"memory": "10Gi", "cores": 20}));
        assert_eq!(*d, json!({"memory": "10Gi", "cores": 20}));
        assert_eq!(Arc::strong_count(&d), 1);
    }

    #[test]
    fn oversized_parameters_are_refused() {
        let e = err(json!({"padding": "x".repeat(MAX_PARAMETERS_BYTES)}));
        assert_eq!(e.field, "parameters");
        assert!(e.message.contains("limit"), "{e}");
    }

    #[test]
    fn resolves_against_the_gpu() {
        let gpu = 80 << 30;
        let c = SliceConfig {
            memory: Some(MemoryRequest::Percent(25)),
            cores: Some(30),
            ..Default::default()
        };
        assert_eq!(
            c.resolve(gpu).unwrap(),
            SliceLimits {
                memory_bytes: 20 << 30,
                cores: 30,
                exclusive: false
            }
        );
        let whole = SliceConfig::default().resolve(gpu).unwrap();
        assert_eq!(
            whole,
            SliceLimits {
                memory_bytes: gpu,
                cores: 0,
                exclusive: false
            }
        );
        let ex = SliceConfig {
            exclusive: Some(true),
            cores: Some(10),
            ..Default::default()
        };
        assert_eq!(
            ex.resolve(gpu).unwrap(),
            SliceLimits {
                memory_bytes: gpu,
                cores: 100,
                exclusive: true
            }
        );
        let too_big = SliceConfig {
            memory: Some(MemoryRequest::Bytes(gpu + 1)),
            ..Default::default()
        };
        assert_eq!(too_big.resolve(gpu).unwrap_err().field, "parameters.memory");
    }

    #[test]
    fn claim_overrides_class_field_by_field_in_one_place() {
        let entry = |source, requests: &[&str], driver: &str, extra| ConfigEntry {
            source,
            requests: requests.iter().map(|s| s.to_string()).collect(),
            driver: driver.into(),
            parameters: params(extra).into(),
        };
        let entries = vec![
            // Listed out of order on purpose: class entries still come first.
            entry(
                ConfigSource::FromClaim,
                &["gpu"],
                "vgpu.hami.io",
                json!({"cores": 50}),
            ),
            entry(
                ConfigSource::FromClass,
                &[],
                "vgpu.hami.io",
                json!({"memory": "8Gi", "cores": 20}),
            ),
            entry(
                ConfigSource::FromClass,
                &[],
                "other.example.com",
                json!({"anything": true}),
            ),
            entry(
                ConfigSource::FromClaim,
                &["other"],
                "vgpu.hami.io",
                json!({"cores": 90}),
            ),
            entry(
                ConfigSource::FromClaim,
                &[],
                "vgpu.hami.io",
                json!({"memory": "2Gi"}),
            ),
        ];
        let c = effective_config(&entries, "vgpu.hami.io", "gpu").unwrap();
        assert_eq!(c.memory, Some(MemoryRequest::Bytes(2 << 30)));
        assert_eq!(c.cores, Some(50));
        // Subrequest results match config naming the main request.
        let sub = effective_config(&entries, "vgpu.hami.io", "gpu/small").unwrap();
        assert_eq!(sub, c);
        let other = effective_config(&entries, "vgpu.hami.io", "other").unwrap();
        assert_eq!(other.cores, Some(90));

        let mut bad = entries.clone();
        bad[4].parameters = params(json!({"cores": 200})).into();
        let e = effective_config(&bad, "vgpu.hami.io", "gpu").unwrap_err();
        assert_eq!(
            // The claim's third entry: the class's two do not shift its number.
            e.field,
            "config[2] (FromClaim).opaque.parameters.cores",
            "{e}"
        );
    }
}
