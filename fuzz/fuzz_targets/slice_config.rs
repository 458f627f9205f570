//! The opaque configuration decoder: any JSON (and any bytes) from a DeviceClass or claim.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vgpu_driver::config::{ConfigEntry, ConfigSource, SliceConfig, effective_config};

fuzz_target!(|data: &[u8]| {
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
        parameters: value.clone(),
    };
    let _ = effective_config(
        &[entry(ConfigSource::FromClass), entry(ConfigSource::FromClaim)],
        "vgpu.hami.io",
        "gpu",
    );
});
