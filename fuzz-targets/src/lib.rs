//! The bodies of the fuzz targets, one function per input the project reads from outside.
//! The cargo-fuzz crate (`fuzz/fuzz_targets/*.rs`, run by `hack/fuzz.sh`) hands them
//! libFuzzer's bytes; `tests/corpora.rs` replays the committed corpora (`fuzz/corpus/`)
//! through them in the workspace's `cargo test`, so a regression input fails CI too.
//!
//! Each function must never panic on any input: a panic is the bug the fuzzer looks for.
//! Where a property holds for every input (a printed quantity parses back to itself), it is
//! asserted here.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::sync::OnceLock;
use vgpu_driver::config::{ConfigEntry, ConfigSource, SliceConfig, effective_config};
use vgpu_driver::quantity::Quantity;

#[path = "../../enforcement/src/config.rs"]
#[allow(dead_code)]
mod enforcement_config;

/// A target: any bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("slice_config", slice_config),
    ("quantity", quantity),
    ("cdi", cdi),
    ("cel", cel),
    ("checkpoint", checkpoint),
    ("inventory", inventory),
    ("enforcement_env", enforcement_env),
    ("dra_convert", dra_convert),
];

/// The opaque configuration decoder: any JSON (and any bytes) from a DeviceClass or claim.
pub fn slice_config(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(config) = SliceConfig::decode(&value) {
        // A decoded config resolves against any GPU size without panicking.
        for memory in [0u64, 1, 16 << 30, 81559 << 20, u64::MAX] {
            let _ = config.resolve(memory);
        }
    }
    let entry = |source| ConfigEntry {
        source,
        requests: vec![],
        driver: "vgpu.hami.io".into(),
        parameters: value.clone().into(),
    };
    let _ = effective_config(
        &[
            entry(ConfigSource::FromClass),
            entry(ConfigSource::FromClaim),
        ],
        "vgpu.hami.io",
        "gpu",
    );
}

/// Kubernetes quantities: every string the API server could hand us.
pub fn quantity(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(q) = Quantity::parse(text) {
        let _ = q.to_bytes();
        let _ = q.ceil_units();
        // What we print parses back to the same value.
        let again = Quantity::parse(&q.to_string()).expect("a printed quantity parses");
        assert_eq!(again.compare_to(&q), 0, "{text:?} -> {q} -> {again}");
        let _ = q.checked_add(&again);
        let _ = q.checked_sub(&again);
    }
}

/// CDI names (device, vendor, class, qualified, spec ids) and whole spec files.
pub fn cdi(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vgpu_cdi::validate_device_name(text);
        let _ = vgpu_cdi::validate_vendor_name(text);
        let _ = vgpu_cdi::validate_class_name(text);
        let _ = vgpu_cdi::is_qualified_name(text);
        let _ = vgpu_cdi::validate_spec_id(text);
    }
    if let Ok(spec) = vgpu_cdi::Spec::from_json(data) {
        let _ = vgpu_cdi::validate_spec(&spec);
        let _ = vgpu_cdi::minimum_version(&spec);
        let _ = spec.parsed_kind();
    }
}

fn h100() -> &'static (String, ::cel::Value) {
    static DEVICE: OnceLock<(String, ::cel::Value)> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let inventory =
            vgpu_driver::Inventory::from_yaml(include_str!("../../driver/testdata/hgx-h100.yaml"))
                .expect("the embedded inventory parses");
        let devices =
            vgpu_driver::slice::gpu_devices(&inventory.gpus).expect("the embedded GPUs render");
        let value = controller::cel::device_value("vgpu.hami.io", &devices[0]);
        (devices[0].name.clone(), value)
    })
}

/// The CEL evaluator's inputs: any selector expression a DeviceClass or claim may carry,
/// compiled and evaluated against a published H100.
pub fn cel(data: &[u8]) {
    let Ok(expression) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = controller::cel::Selector::compile(expression) {
        let (name, value) = h100();
        let _ = selector.matches(name, value);
    }
}

/// The checkpoint reader, snapshot and journal: a file truncated by a crash, edited by hand,
/// or written by another version is an error naming the file, never a panic.
pub fn checkpoint(data: &[u8]) {
    use kubelet_plugin::checkpoint::{Payload, decode, decode_journal};
    let _ = decode(Path::new("checkpoint.json"), data);
    let mut payload = Payload::default();
    if let Ok(journal) = decode_journal(Path::new("checkpoint.journal"), data, &mut payload) {
        // Only whole lines are read; what follows the last one is a torn append.
        assert!(journal.len as usize <= data.len());
        assert_eq!(journal.torn, (journal.len as usize) < data.len());
    }
}

/// The fake-GPU inventory (YAML from a ConfigMap) and the domain model's inventory format.
pub fn inventory(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(snapshot) = kubelet_plugin::discovery::fake::parse(Path::new("fake-gpus.yaml"), text)
    {
        let _ = snapshot.published_devices();
    }
    let _ = vgpu_driver::Inventory::from_yaml(text);
}

/// The enforcement library's environment (its parser compiled from source: the library
/// itself is a preloadable cdylib, not linkable into another binary). The input is split at
/// NUL bytes into the values of every variable, as a container spec could set them.
pub fn enforcement_env(data: &[u8]) {
    let mut parts = data
        .split(|b| *b == 0)
        .map(|p| OsString::from_vec(p.to_vec()));
    let values: Vec<OsString> = (0..6).map(|_| parts.next().unwrap_or_default()).collect();
    let parsed = enforcement_config::Config::from_lookup(|name| {
        let i = match name {
            "CUDA_DEVICE_MEMORY_LIMIT" => 0,
            "CUDA_DEVICE_MEMORY_LIMIT_0" => 1,
            "CUDA_DEVICE_SM_LIMIT" => 2,
            "CUDA_DISABLE_CONTROL" => 3,
            "CUDA_VISIBLE_DEVICES" => 4,
            "GPU_CORE_UTILIZATION_POLICY" => 5,
            _ => return None,
        };
        Some(values[i].clone())
    });
    for device in 0..20 {
        let _ = parsed.memory_limit(device);
    }
    let _ = parsed.ordinal_of(Some("GPU-x"), Some(1));
    for problem in &parsed.problems {
        let _ = problem.to_string();
    }
}

/// The wire conversion: any JSON as a resource.k8s.io object of either version. What converts
/// to v1 converts to v1beta1 and back: to the same object, unless a request's `exactly` has no
/// field set (invalid in both versions; Kubernetes drops it on the way back too), and a second
/// round trip changes nothing at all.
pub fn dra_convert(data: &[u8]) {
    use dra::{ApiVersion, convert};
    use k8s_openapi::api::resource::v1;
    fn trip<K: dra::DraObject>(object: &K, version: ApiVersion) -> K {
        convert::from_wire::<K>(convert::to_wire(object, version))
            .unwrap_or_else(|e| panic!("{version} does not convert back: {e}"))
    }
    fn round_trip<K: dra::DraObject + PartialEq>(value: &serde_json::Value) {
        let Ok(object) = convert::from_wire::<K>(value.clone()) else {
            return;
        };
        assert!(
            trip(&object, ApiVersion::V1) == object,
            "v1 changed the object"
        );
        let once = trip(&object, ApiVersion::V1beta1);
        assert!(
            once == object || has_empty_exactly(&convert::to_wire(&object, ApiVersion::V1)),
            "the v1beta1 round trip changed the object"
        );
        assert!(
            trip(&once, ApiVersion::V1beta1) == once,
            "a second v1beta1 round trip changed the object"
        );
    }
    /// A request whose `exactly` sets nothing Kubernetes counts (zero values only).
    fn has_empty_exactly(v1: &serde_json::Value) -> bool {
        let requests = v1
            .pointer("/spec/devices/requests")
            .or_else(|| v1.pointer("/spec/spec/devices/requests"));
        requests
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("exactly")?.as_object())
            .any(|e| !convert::sets_a_request_field(e))
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let _ = convert::convert_value(value.clone(), ApiVersion::V1);
    let _ = convert::convert_value(value.clone(), ApiVersion::V1beta1);
    round_trip::<v1::ResourceClaim>(&value);
    round_trip::<v1::ResourceClaimTemplate>(&value);
    round_trip::<v1::ResourceSlice>(&value);
    round_trip::<v1::DeviceClass>(&value);
}
