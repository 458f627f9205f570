//! The enforcement library's environment parser (compiled from its source: the library itself
//! is a preloadable cdylib that must not be linked into another binary). Arbitrary bytes for
//! every variable, as a container spec could set them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

#[path = "../../enforcement/src/config.rs"]
#[allow(dead_code)]
mod config;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == 0).map(|p| OsString::from_vec(p.to_vec()));
    let values: Vec<OsString> = (0..6).map(|_| parts.next().unwrap_or_default()).collect();
    let parsed = config::Config::from_lookup(|name| {
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
});
